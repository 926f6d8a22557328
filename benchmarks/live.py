"""Reconstruct while the scan runs: the live job on a growing scan file against the post-stop path.

    python benchmarks/live.py --json                          # 64² frames, 2000 views at 50 views/s
    python benchmarks/live.py --json --views 400 --iterations 30 --ranks 1

A simulated step scan (``hxn_ptycho.simulate``) is written into a growing scan file
(:class:`hxn_ptycho.scanfile.GrowingScanWriter`, SWMR, flushed every ``--chunk`` views) at
``--rate`` views a second, while the live job (``python -m hxn_ptycho.job SPEC --follow``, a real
process, ``--ranks`` MPI ranks) follows it; at the stop the file is marked complete. Then the
post-stop path: the offline job (``python -m hxn_ptycho.job SPEC``) on the same, complete file.

By default the scan runs through the RunEngine (the simulated beamline's step scan, a dwell of
1/``--rate`` per point) with the :class:`~hxn_ptycho.callbacks.router.PtychoCallback` (its
``live`` the feed, so the live job is the result) and the
:class:`hxn_ptycho.callbacks.livefeed.LiveFeed` (chunks of ``--chunk`` events); the post-stop
path is then the export of the collected run and the offline job. ``event_cost_us`` gives, per
event document of that one run, the callback alone and the callback plus the feed (median, 90th
and 99th percentile, largest) and the RunEngine's time per point beyond the dwell.
``scan_file_views_equal`` compares the frames, positions, mask and geometry; ``scan_file_equal``
every dataset and attribute, both ways (``differing_datasets``/``differing_attrs`` name the rest), of
the live file and the post-stop export of the same run as the callback makes it (taking the live
file's recorded orientation decision: :func:`hxn_ptycho.callbacks.export.export_scan`
``live_file=``); ``post_stop_path_s`` times the post-stop path of a run without a live file (the
export decides on all frames).
``--direct`` instead writes a simulated scan straight into the growing file (no RunEngine, no
callback).

One JSON line: ``first_preview_s`` (the first preview with at least the first 256 views, after they
were readable), ``previews``, ``max_preview_gap_s`` (while frames arrive), ``lag_first_s`` /
``lag_last_s`` (preview written − newest view in it readable, first and last preview),
``final_after_stop_s`` (stop → outcome record of the live job), ``post_stop_path_s`` (launch of
the offline job → its outcome record), ``scan_file_equal`` (every dataset and attribute of the
one-shot scan file ``write_scan`` writes, with a complete growing file's bookkeeping, equals the
growing file's, both ways), ``data_error_ratio`` and
``nrmse_ratio`` (live final over post-stop; NRMSE of the object to the simulated truth), the load
average. On a shared machine the times mean little when the load is high.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hxn_ptycho.h5util import h5_differences
from hxn_ptycho.job import job_argv, outcome_path, read_outcome
from hxn_ptycho.metrics import illuminated_region, nrmse
from hxn_ptycho.params import ReconParams
from hxn_ptycho.resultfile import read_result
from hxn_ptycho.scanfile import GrowingScanWriter, write_scan
from hxn_ptycho.session import header_of
from hxn_ptycho.simulate import simulate_scan
from hxn_ptycho.spec import Execution, JobSpec, Source


def wait_for(path: Path, timeout: float) -> float:
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)
    return time.time()


def files_equal(one_shot: Path, growing: Path) -> bool:
    """The two files hold the same datasets and attributes (the root's and each object's), equal."""
    ds, at = h5_differences(one_shot, growing)
    return not ds and not at


def through_callback(args: argparse.Namespace) -> dict:
    """The simulated beamline's step scan through the RunEngine and the LiveFeed, then the post-stop path."""
    import warnings

    from bluesky import RunEngine
    from bluesky.preprocessors import SupplementalData
    from event_model import RunRouter

    from hxn_ptycho.callbacks.collector import RunCollector
    from hxn_ptycho.callbacks.export import ExportConfig, build_scan, export_scan
    from hxn_ptycho.callbacks.livefeed import LiveFeed, LiveFeedConfig
    from hxn_ptycho.callbacks.sim_beamline import make_hxn, simulated_scan, step_scan

    sample, truth = simulated_scan("step", n_positions=args.views, seed=7, probe_modes=args.probe_modes)
    params = {"iterations": args.iterations, "threads": args.threads, "probe_modes": args.probe_modes,
              **({"backend": args.backend} if args.backend else {})}
    with tempfile.TemporaryDirectory(prefix="hxn-live-bench-") as tmp:
        d = Path(tmp)
        hxn = make_hxn(d / "detector")
        RE = RunEngine({}, call_returns_result=False)
        RE.preprocessors.append(SupplementalData(baseline=hxn.baseline))
        got: list = []
        RE.subscribe(RunRouter([lambda name, start: ([RunCollector(start, got.append)], [])]))
        cfg = ExportConfig(crop=args.n, data_roots=(str(d),))
        feed = LiveFeed(LiveFeedConfig(work_dir=str(d / "work"), params=params, export=cfg, nprocs=args.ranks,
                                       first_chunk=min(256, args.views), chunk=args.chunk))
        from hxn_ptycho.callbacks.router import CallbackConfig, PtychoCallback
        cb = PtychoCallback(CallbackConfig(work_dir=str(d / "work"), params=params, export=cfg, nprocs=args.ranks))
        cb.live.append(feed)                 # the live job is the result: the callback's post-stop path stands by
        t_cb: list[float] = []
        t_feed: list[float] = []
        events: list[float] = []
        stop_at: list[float] = []

        def timed(name: str, doc: dict) -> None:     # today's callback alone, then the feed: one run
            t = time.perf_counter()
            cb(name, doc)
            t1 = time.perf_counter()
            feed(name, doc)
            t2 = time.perf_counter()
            if name == "event":
                t_cb.append(t1 - t)
                t_feed.append(t2 - t1)
                events.append(time.time())
            if name == "stop":
                stop_at.append(time.time())
        RE.subscribe(timed)
        t_start = time.time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            RE(step_scan(hxn, sample, dwell_s=1.0 / args.rate))
        t_stop = stop_at[0]
        feed.wait(3600)
        cb.flush(600)
        cb.close()
        (live,) = feed.runs.values()
        out_path = live.result_path.with_name(live.result_path.name[:-3] + ".outcome.json")
        t_live_done = out_path.stat().st_mtime if out_path.exists() else float("nan")
        live_out = read_outcome(out_path) or {}
        t0 = time.time()                                  # the post-stop path: export, then the offline job
        post = build_scan(got[0], cfg)
        one_shot = d / "scan_post.h5"
        write_scan(one_shot, post)
        off_res = d / "post" / "recon.h5"
        off_spec = JobSpec(params=ReconParams.from_dict(params), execution=Execution(ranks=args.ranks),
                           source=Source(scan_file=str(one_shot), result_file=str(off_res)))
        off_path = off_spec.write(d / "post.spec.json")
        subprocess.run(job_argv(off_path, nprocs=args.ranks, quiet=True), check=False)
        t_post = wait_for(outcome_path(off_path), 3600) - t0
        off_out = read_outcome(outcome_path(off_path)) or {}
        same_run = d / "scan_post_of_live.h5"     # the post-stop export of this run as the callback makes it
        export_scan(got[0], cfg, same_run, live_file=live.scan_path)   # (the live file's decision taken)
        ds, at = h5_differences(same_run, live.scan_path)
        region = illuminated_region(truth.positions_px, truth.probe, truth.object.shape)
        e_live = nrmse(read_result(live.result_path).object[0], truth.object, region) \
            if live.result_path.exists() else float("nan")
        e_off = nrmse(read_result(off_res).object[0], truth.object, region)
    return {"live_out": live_out, "off_out": off_out, "readable": events, "t_start": t_start, "t_stop": t_stop,
            "t_live_done": t_live_done, "t_post": t_post, "equal": not ds and not at, "datasets_equal": not ds,
            "differing_attrs": at, "differing_datasets": ds,
            "views_equal": not set(ds) & {"diffamp", "points", "mask", "lambda_nm", "z_m", "ccd_pixel_um"},
            "e_live": e_live, "e_off": e_off,
            "event_cost_us": {"callback": _stats_us(t_cb), "callback+feed": _stats_us(np.add(t_cb, t_feed)),
                              "feed": _stats_us(t_feed),
                              "event_interval_excess_ms": _excess_ms(events, 1.0 / args.rate)},
            "export_s": live.export_s, "gave_up": live.gave_up, "feed_marks": dict(live.marks)}


def _stats_us(t: "list[float] | np.ndarray") -> dict:
    t = np.asarray(t) * 1e6
    return {"median": float(np.median(t)), "p90": float(np.percentile(t, 90)), "p99": float(np.percentile(t, 99)),
            "max": float(t.max())} if t.size else {}


def _excess_ms(events: list[float], dwell: float) -> dict:
    """The RunEngine's time per point beyond the dwell (every callback and the GIL's other holders)."""
    gaps = (np.diff(events) - dwell) * 1e3
    return {"median": float(np.median(gaps)), "p90": float(np.percentile(gaps, 90)), "max": float(gaps.max())} \
        if gaps.size else {}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--source" in argv and argv[argv.index("--source") + 1:][:1] == ["stream"]:   # issue 20: benchmarks/live_stream.py
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import live_stream
        i = argv.index("--source")
        return live_stream.main(argv[:i] + argv[i + 2:])
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--views", type=int, default=2000)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--rate", type=float, default=50.0, help="views a second")
    ap.add_argument("--chunk", type=int, default=10, help="views flushed at once")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--probe-modes", type=int, default=1)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default=None, help="the jobs' backend (default: ReconParams's; cupy: the GPU "
                    "case of benchmarks/gpu_session.sh)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--direct", action="store_true", help="feed the growing file directly (no RunEngine, no "
                    "callback); default: the simulated beamline's step scan through the RunEngine and the LiveFeed")
    args = ap.parse_args(argv)
    if not args.direct:
        return report_callback(args)
    scan, truth = simulate_scan(n=args.n, n_positions=args.views, probe_modes=args.probe_modes, seed=7)
    params = ReconParams(iterations=args.iterations, probe_modes=args.probe_modes, threads=args.threads,
                         **({"backend": args.backend} if args.backend else {}))
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="hxn-live-bench-") as tmp:
        d = Path(tmp)
        live_scan, live_res = d / "scan_live.h5", d / "live" / "recon.h5"
        spec = JobSpec(params=params, execution=Execution(ranks=args.ranks),
                       source=Source(scan_file=str(live_scan), result_file=str(live_res)))
        spec_path = spec.write(d / "live.spec.json")
        t_launch = time.time()
        job = subprocess.Popen(job_argv(spec_path, nprocs=args.ranks, quiet=True, follow=True))
        p = scan.points
        w = GrowingScanWriter(live_scan, header_of(scan),
                              extent_um=(p[0].min(), p[0].max(), p[1].min(), p[1].max()))
        readable: list[float] = []
        t_start = time.time()
        for c in range(0, scan.n_views, args.chunk):
            due = t_start + (c + args.chunk) / args.rate          # the dwell of every point of the chunk
            time.sleep(max(0.0, due - time.time()))
            w.append(scan.diffamp[c:c + args.chunk], scan.points[:, c:c + args.chunk])
            readable += [time.time()] * len(scan.diffamp[c:c + args.chunk])
        w.mark_complete()
        t_stop = time.time()
        t_live_done = wait_for(outcome_path(spec_path), 3600)
        job.wait()
        live_out = read_outcome(outcome_path(spec_path)) or {}
        # the post-stop path: the offline job on the complete file, from its launch
        off_res = d / "post" / "recon.h5"
        off_spec = JobSpec(params=params, execution=Execution(ranks=args.ranks),
                           source=Source(scan_file=str(live_scan), result_file=str(off_res)))
        off_path = off_spec.write(d / "post.spec.json")
        t0 = time.time()
        subprocess.run(job_argv(off_path, nprocs=args.ranks, quiet=True), check=False)
        t_post = wait_for(outcome_path(off_path), 3600) - t0
        off_out = read_outcome(outcome_path(off_path)) or {}
        one_shot = d / "scan_oneshot.h5"
        write_scan(one_shot, scan, {"n_written": np.array([scan.n_views], np.int64), "complete": np.ones(1, np.int8),
                                    "extent_um": np.array([p[0].min(), p[0].max(), p[1].min(), p[1].max()])})
        equal = files_equal(one_shot, live_scan)
        region = illuminated_region(truth.positions_px, truth.probe, truth.object.shape)
        e_live = nrmse(read_result(live_res).object[0], truth.object, region)
        e_off = nrmse(read_result(off_res).object[0], truth.object, region)
    live = (live_out.get("measured") or {}).get("live") or {}
    plog = live.get("preview_log") or []
    t256 = readable[min(256, len(readable)) - 1]
    first = next((q["written_at"] - t256 for q in plog if q["views"] >= min(256, len(readable))), None)
    during = [q["written_at"] for q in plog if q["written_at"] <= t_stop]
    lags = [q["written_at"] - q["newest_readable_at"] for q in plog]
    out = {
        "views": args.views, "n": args.n, "rate": args.rate, "iterations": args.iterations, "ranks": args.ranks,
        "backend": params.backend,
        "status_live": live_out.get("status"), "status_post": off_out.get("status"),
        "first_preview_s": first, "previews": len(plog),
        "max_preview_gap_s": float(np.diff(during).max()) if len(during) > 1 else None,
        "lag_first_s": lags[0] if lags else None, "lag_last_s": lags[-1] if lags else None,
        "live_iterations": live.get("live_iterations"),
        "scan_s": t_stop - t_start, "job_launch_to_scan_start_s": t_start - t_launch,
        "final_after_stop_s": t_live_done - t_stop, "post_stop_path_s": t_post,
        "scan_file_equal": equal,
        "data_error_ratio": float((live_out.get("measured") or {}).get("final_data_error", np.nan))
        / float((off_out.get("measured") or {}).get("final_data_error", np.nan)),
        "nrmse_ratio": e_live / e_off, "nrmse_live": e_live, "nrmse_post": e_off,
        "load_before": load0, "load_after": os.getloadavg()[0],
        "note": "--direct: the feeder writes the growing file (no RunEngine, no callback)",
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:28s} {v}")
    return 0


def _gap_at(plog: list, t_start: float, t_stop: float) -> dict | None:
    """Where the largest gap between previews during the scan fell: seconds into the scan, the
    views and iterations of the previews on either side."""
    during = [q for q in plog if q["written_at"] <= t_stop]
    if len(during) < 2:
        return None
    i = int(np.argmax(np.diff([q["written_at"] for q in during])))
    a, b = during[i], during[i + 1]
    return {"at_s": round(a["written_at"] - t_start, 2), "views": [a["views"], b["views"]],
            "iterations": [a["iteration"], b["iteration"]]}


def breakdown(r: dict, live: dict, t256: float) -> dict:
    """Where the time goes: the first preview's path (seconds after the 256th view was readable:
    the feed's first export in its child, the incremental export, the file, the job's first views,
    first iteration, first preview) and the final's (seconds after the stop document: the job sees
    the file complete, the final phase, the job's end, the outcome). ``warm`` gives what the start
    document's warm-ups cost (paid during the scan)."""
    fm, jm = r.get("feed_marks") or {}, live.get("timeline") or {}
    plog = live.get("preview_log") or []

    def rel(t: float | None, t0: float) -> float | None:
        return None if t is None or not np.isfinite(t0) else round(float(t) - t0, 3)
    t_stop = r["t_stop"]
    return {
        "first": {"decision_from": rel(fm.get("decision_from"), t256),
                  "decision_to": rel(fm.get("decision_to"), t256), "decided_early": fm.get("decided_early"),
                  "incremental_ahead": fm.get("first_incremental_ahead"),
                  "export_from": rel(fm.get("first_export_from"), t256),
                  "export_to": rel(fm.get("first_export_to"), t256),
                  "incremental_to": rel(fm.get("first_incremental_to"), t256),
                  "written": rel(fm.get("first_views_written_at"), t256),
                  "job_views_in": rel(jm.get("first_views_in_at"), t256),
                  "job_first_iteration": rel(jm.get("first_iteration_at"), t256),
                  "first_preview": rel(plog[0]["written_at"], t256) if plog else None},
        "warm": {"job_started_after_start_doc": rel(jm.get("job_started_at"), fm.get("start_document_at", np.nan)),
                 "job_warm_up": jm.get("warm_up_s"), "child_warm": fm.get("child_warm_s"),
                 "child_warm_done_after_start_doc": rel(fm.get("child_warm_at"), fm.get("start_document_at", np.nan))},
        "final": {"complete_seen": rel(live.get("complete_seen_at"), t_stop),
                  "phase_from": rel(jm.get("final_phase_from"), t_stop),
                  "phase_to": rel(jm.get("final_phase_to"), t_stop),
                  "job_done": rel(live.get("finished_at"), t_stop),
                  "outcome": rel(r["t_live_done"], t_stop),
                  "final_phase_cpu": jm.get("final_phase_cpu_s")},
        "job_cpu_s_to_first_iteration": jm.get("cpu_s_to_first_iteration")}


def report_callback(args: argparse.Namespace) -> int:
    load0 = os.getloadavg()[0]
    r = through_callback(args)
    live = (r["live_out"].get("measured") or {}).get("live") or {}
    plog = live.get("preview_log") or []
    readable = r["readable"]
    k = min(256, len(readable))
    t256 = readable[k - 1] if readable else float("nan")
    first = next((q["written_at"] - t256 for q in plog if q["views"] >= k), None)
    during = [q["written_at"] for q in plog if q["written_at"] <= r["t_stop"]]
    lags = [q["written_at"] - q["newest_readable_at"] for q in plog]
    de_live = (r["live_out"].get("measured") or {}).get("final_data_error")
    de_off = (r["off_out"].get("measured") or {}).get("final_data_error")
    out = {"path": "RunEngine + LiveFeed + live job; post-stop: export + offline job",
           "views": args.views, "n": args.n, "rate": args.rate, "iterations": args.iterations, "ranks": args.ranks,
           "backend": args.backend or ReconParams().backend,
           "probe_modes": args.probe_modes,
           "status_live": r["live_out"].get("status"), "status_post": r["off_out"].get("status"),
           "first_preview_s": first, "previews": len(plog),
           "max_preview_gap_s": float(np.diff(during).max()) if len(during) > 1 else None,
           "preview_gap_s_p50_p90": [float(np.percentile(np.diff(during), q)) for q in (50, 90)]
           if len(during) > 1 else None,
           "max_preview_gap_at": _gap_at(plog, r["t_start"], r["t_stop"]),
           "lag_first_s": lags[0] if lags else None, "lag_last_s": lags[-1] if lags else None,
           "lag_s_by_fifth": [float(np.median(part)) for part in np.array_split(lags, 5)] if len(lags) >= 5 else None,
           "scan_s": r["t_stop"] - r["t_start"], "final_after_stop_s": r["t_live_done"] - r["t_stop"],
           "post_stop_path_s": r["t_post"], "scan_file_equal": r["equal"], "scan_file_datasets_equal": r["datasets_equal"],
           "differing_attrs": r["differing_attrs"], "differing_datasets": r["differing_datasets"],
           "scan_file_views_equal": r["views_equal"],
           "data_error_ratio": float(de_live) / float(de_off) if de_live and de_off else None,
           "nrmse_ratio": r["e_live"] / r["e_off"], "nrmse_live": r["e_live"], "nrmse_post": r["e_off"],
           "live_iterations": live.get("live_iterations"), "live_credit": live.get("live_credit"),
           "resumed_at_iteration": live.get("resumed_at_iteration"), "final_phase_s": live.get("final_phase_s"),
           "final_latency_s": live.get("final_latency_s"), "event_cost_us": r["event_cost_us"],
           "exports": len(r["export_s"]), "export_s_first_last": [r["export_s"][0][1], r["export_s"][-1][1]]
           if r["export_s"] else None, "feed_gave_up": r["gave_up"],
           "breakdown_s": breakdown(r, live, t256),
           "load_before": load0, "load_after": os.getloadavg()[0]}
    print(json.dumps(out) if args.json else "\n".join(f"{k:28s} {v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
