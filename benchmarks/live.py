"""Reconstruct while the scan runs: the live job on a growing scan file against the post-stop path.

    python benchmarks/live.py --json                          # 64² frames, 2000 views at 50 views/s
    python benchmarks/live.py --json --views 400 --iterations 30 --ranks 1

A simulated step scan (``hxn_ptycho.simulate``) is written into a growing scan file
(:class:`hxn_ptycho.scanfile.GrowingScanWriter`, SWMR, flushed every ``--chunk`` views) at
``--rate`` views a second, while the live job (``python -m hxn_ptycho.job SPEC --follow``, a real
process, ``--ranks`` MPI ranks) follows it; at the stop the file is marked complete. Then the
post-stop path: the offline job (``python -m hxn_ptycho.job SPEC``) on the same, complete file.

NOT YET through the RunEngine and the callback: the feeder here stands in for the callback's
export (the callback side of issue 19 is not built; see docs/live.md).

One JSON line: ``first_preview_s`` (the first preview with at least the first 256 views, after they
were readable), ``previews``, ``max_preview_gap_s`` (while frames arrive), ``lag_first_s`` /
``lag_last_s`` (preview written − newest view in it readable, first and last preview),
``final_after_stop_s`` (stop → outcome record of the live job), ``post_stop_path_s`` (launch of
the offline job → its outcome record), ``scan_file_equal`` (every dataset and attribute of the
one-shot scan file ``write_scan`` writes equals the growing file's), ``data_error_ratio`` and
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

import h5py
import numpy as np

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
    """Every dataset and attribute of ``one_shot`` is in ``growing``, equal."""
    with h5py.File(one_shot, "r") as a, h5py.File(growing, "r") as b:
        names: list[str] = []
        a.visit(names.append)
        for k in names:
            if k not in b or not np.array_equal(a[k][()], b[k][()]):
                return False
        return all(k in b.attrs and np.array_equal(a.attrs[k], b.attrs[k]) for k in a.attrs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--views", type=int, default=2000)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--rate", type=float, default=50.0, help="views a second")
    ap.add_argument("--chunk", type=int, default=10, help="views flushed at once")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--probe-modes", type=int, default=1)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    scan, truth = simulate_scan(n=args.n, n_positions=args.views, probe_modes=args.probe_modes, seed=7)
    params = ReconParams(iterations=args.iterations, probe_modes=args.probe_modes, threads=args.threads)
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
        write_scan(one_shot, scan)
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
        "note": "feeder writes the growing file directly (not yet through RunEngine + callback)",
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
