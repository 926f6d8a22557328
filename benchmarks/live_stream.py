"""Fly scans live from the detector's streams (issue 20): the simulated fly2dpd's Eiger and PandA streams
→ the receiver → the growing scan file → the live job, then the comparison with the post-stop export.

    python benchmarks/live.py --source stream --views 10000 --rate 1000 --drop 0.01 --json
    python benchmarks/live_stream.py --views 3000 --sweep 1000 2000 4000 --json   # where this machine saturates

The RunEngine runs the simulated ``fly2dpd`` whose PandA flyer sends both streams at ``--rate`` frames
a second (full raw frames of 96² + margins, bslz4; the PandA's 41-sample messages), ``--drop`` of
the frame ids never sent, as many sent twice and as many sent late; a :class:`StreamFeed` ties them to
the run, pairs them by id and appends chunks to the growing file, which the live job
(``python -m hxn_ptycho.job --follow``) follows. One JSON line: ``views_received`` (views in the
live file), ``views_dropped_by_receiver`` (frames sent but not in the file), ``injected_drops``,
``missing_ids_match_injected``, ``first_preview_s`` (first preview with ≥ 256 views after the
256th view was in the file), ``lag_first_s``/``lag_last_s`` (preview written − newest view in it
readable), ``scan_file_equal`` (the live file equals the post-stop export; false by design when
frames were dropped on the stream: the detector's file has them), ``received_views_equal`` (each
received view equals the export's view of its id), the emitter's achieved rate, the receiver's
status, the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def run_once(views: int, rate: float, drop: float, *, iterations: int = 10, launch: bool = True, chunk: int = 64,
             seed: int = 7, nice: int = 10, orientation: str = "default") -> dict:
    from bluesky import RunEngine
    from bluesky.preprocessors import SupplementalData

    from hxn_ptycho.callbacks.export import ExportConfig
    from hxn_ptycho.callbacks.sim_beamline import fly2dpd, make_hxn, simulated_scan
    from hxn_ptycho.callbacks.sim_streams import SimStreamConfig, SimStreams
    from hxn_ptycho.callbacks.stream import StreamConfig, StreamFeed, StreamFeedConfig
    from hxn_ptycho.job import read_outcome

    load0 = os.getloadavg()
    t_sim = time.time()
    sample, _truth = simulated_scan("fly2dpd", n_positions=views, seed=seed)
    t_sim = time.time() - t_sim
    with tempfile.TemporaryDirectory(prefix="hxn-stream-bench-") as tmp:
        d = Path(tmp)
        hxn = make_hxn(d / "detector")
        RE = RunEngine({}, call_returns_result=False)
        RE.preprocessors.append(SupplementalData(baseline=hxn.baseline))
        sims = SimStreams(SimStreamConfig(rate=rate, drop=drop, duplicate=drop, reorder=drop, seed=seed,
                                          process=True))         # the detector sends from its own process
        cfg = ExportConfig(crop=64, data_roots=(str(d),), orientation=orientation)
        scfg = StreamConfig(eiger=sims.eiger_address, panda=sims.panda_address, roi=sims.roi(hxn.eiger2.frame_shape),
                            scaler_channel=sims.cfg.scaler_channel, first_chunk=min(256, views), chunk=chunk)
        # the live job shares this machine's cores with the receiver: it yields to it (at HXN it runs elsewhere)
        feed = StreamFeed(StreamFeedConfig(work_dir=str(d / "work"), export=cfg, stream=scfg, launch=launch,
                                           params={"iterations": iterations, "threads": 1}, job_nice=nice)).start()
        RE.subscribe(feed)
        stop_at: list[float] = []
        RE.subscribe(lambda name, doc: stop_at.append(time.time()), "stop")
        t0 = time.time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            RE(fly2dpd(hxn, sample, streams=sims))
        (run,) = feed.runs.values()
        run.done.wait(600)
        t_file_complete = time.time()
        facts = feed.compare(run.uid, 600) or {}
        sent = sims.emitted[-1]
        outcome = None
        if run.job is not None:
            run.job.wait(1800)
            outcome = read_outcome(run.outcome_path) or {}
        feed.close()
        sims.close()
    sent_ids = {i for i in range(views) if not np.isnan(sent.sent_at[i])}
    written = set(run.written_ids)
    live = ((outcome or {}).get("measured") or {}).get("live") or {}
    plog = live.get("preview_log") or []
    k = min(256, len(run.readable_at))
    t256 = run.readable_at[k - 1] if k else float("nan")
    first = next((q["written_at"] - t256 for q in plog if q["views"] >= k), None)
    lags = [q["written_at"] - q["newest_readable_at"] for q in plog]
    last_sent = np.nanmax(np.asarray(sent.sent_at)) if sent_ids else float("nan")
    status = run.status()
    sent_at = np.asarray(sent.sent_at)
    rl = np.array([t - sent_at[i] for i, t in zip(run.written_ids, run.readable_at)])   # frame sent → view in the file
    return {
        "source": "stream", "views": views, "rate": rate, "drop": drop, "frame": "96x96 file frame (full raw "
        f"{96 + sum(sims.cfg.margin[0::2])}x{96 + sum(sims.cfg.margin[1::2])}, {sims.cfg.encoding}), 64x64 after the crop",
        "views_received": len(written), "views_dropped_by_receiver": len(sent_ids - written),
        "injected_drops": len(sent.dropped), "missing_ids_match_injected": run.pairer.missing == sent.dropped,
        "receiver_lag_first_s": float(rl[min(255, rl.size - 1)]) if rl.size else None,
        "receiver_lag_last_s": float(rl[-1]) if rl.size else None,
        "receiver_lag_max_s": float(rl.max()) if rl.size else None,
        "receiver_lag_p50_s": float(np.median(rl)) if rl.size else None,
        "first_preview_s": first, "previews": len(plog), "lag_first_s": lags[0] if lags else None,
        "lag_last_s": lags[-1] if lags else None,
        "scan_file_equal": bool(facts.get("equal")), "received_views_equal": facts.get("received_views_equal"),
        "differences": facts.get("differences"),
        "emitter_rate_achieved": views / sent.elapsed_s if sent.elapsed_s else None,
        "emitter_behind_s": sent.behind_s,
        "file_complete_after_last_frame_s": t_file_complete - last_sent,
        "stop_after_last_frame_s": (stop_at[0] - last_sent) if stop_at else None,
        "appended_during_scan": run.appended_during_scan,
        "receiver_blocked_s": status["receiver_blocked_s"], "duplicates_dropped": status["duplicates_dropped"],
        "late_refused": status["late_refused"], "live_status": (outcome or {}).get("status"),
        "scan_s": (stop_at[0] - t0) if stop_at else None, "simulate_s": t_sim, "live_job_nice": nice,
        "orientation": orientation, "decisions": run.decisions,
        "max_undecided_views": run.max_undecided, "falling_behind_reported": run.max_undecided > scfg.behind_views,
        "load_before": load0, "load_after": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--views", type=int, default=10000)
    ap.add_argument("--rate", type=float, default=1000.0, help="frames a second")
    ap.add_argument("--drop", type=float, default=0.0, help="fraction of frame ids never sent (as many duplicated and late)")
    ap.add_argument("--iterations", type=int, default=10, help="the live job's final schedule")
    ap.add_argument("--no-job", action="store_true", help="the receiver and the file only (no live job)")
    ap.add_argument("--nice", type=int, default=10, help="niceness of the live job (it shares the receiver's cores)")
    ap.add_argument("--orientation", default="default", help="the export's orientation: 'default' (the detector's) "
                    "or 'auto' (decided by DM trials on the first chunk, in its own thread)")
    ap.add_argument("--sweep", type=float, nargs="*", help="rates to try without the live job: where it saturates")
    ap.add_argument("--json", action="store_true")
    args, _ = ap.parse_known_args(argv)
    if args.sweep:
        for rate in args.sweep:
            r = run_once(args.views, rate, args.drop, launch=False)
            keep = ("rate", "views", "views_received", "views_dropped_by_receiver", "emitter_rate_achieved",
                    "emitter_behind_s", "receiver_lag_p50_s", "receiver_lag_max_s", "receiver_lag_last_s",
                    "max_undecided_views", "receiver_blocked_s", "load_before")
            print(json.dumps({k: r[k] for k in keep}), flush=True)
        return 0
    out = run_once(args.views, args.rate, args.drop, iterations=args.iterations, launch=not args.no_job, nice=args.nice,
                   orientation=args.orientation)
    print(json.dumps(out) if args.json else "\n".join(f"{k:34s} {v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
