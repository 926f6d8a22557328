"""CPU benchmark of the DM engine: throughput, ratio to an FFT-only floor, peak memory, Siemens star.

    python benchmarks/cpu_bench.py                 # n = 128, 2000 views, 1 and 3 probe modes
    python benchmarks/cpu_bench.py --star 200      # also the Siemens star, 200 iterations, 1 and 3 modes

Prints, per case: seconds per DM iteration, frames·iterations per second, the seconds of the
forward + inverse FFTs of the same exit waves alone (same threads), their ratio, and the peak
resident memory of the process.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import scipy.fft

from hxn_ptycho.backend import NumpyBackend, available_cores
from hxn_ptycho.engine import Reconstruction
from hxn_ptycho.params import ReconParams
from hxn_ptycho.simulate import simulate_scan

STAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "siemens-star-small" / "siemens-star-small.npz.bz2"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fft_floor(psi: np.ndarray, threads: int, repeats: int, batch: int) -> float:
    """Seconds of one forward + inverse orthonormal FFT of all exit waves, in place: the faster of
    the whole array at once and cache-sized batches (the engine's batch size), ``threads`` workers."""
    work = psi.copy()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        work = scipy.fft.fft2(work, norm="ortho", overwrite_x=True, workers=threads)
        work = scipy.fft.ifft2(work, norm="ortho", overwrite_x=True, workers=threads)
        best = min(best, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(0, len(work), batch):
            part = work[i:i + batch]
            part[...] = scipy.fft.fft2(part, norm="ortho", overwrite_x=True, workers=threads)
            part[...] = scipy.fft.ifft2(part, norm="ortho", overwrite_x=True, workers=threads)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_case(n: int, views: int, modes: int, iterations: int, threads: int) -> dict:
    scan, _ = simulate_scan(n=n, n_positions=views, probe_modes=1, photons=1e6, seed=3, overlap_step=n / 10)
    params = ReconParams(iterations=iterations + 1, probe_modes=modes, probe_update_start=0,
                         orthogonalize_every=0, max_memory_gb=16)
    rec = Reconstruction(scan, params, backend=NumpyBackend(threads), log=lambda m: None)
    rec.iterate(0)                                   # warm-up (FFT plans, page faults)
    t0 = time.perf_counter()
    for it in range(1, iterations + 1):
        rec.iterate(it)
    per_iter = (time.perf_counter() - t0) / iterations
    floor = fft_floor(rec.psi, threads, 3, rec.plan.batch_size)
    return {"n": n, "views": views, "modes": modes, "threads": threads, "s_per_iter": per_iter,
            "frames_iter_per_s": views / per_iter, "fft_s": floor, "ratio": per_iter / floor,
            "peak_rss_gb": peak_rss_gb()}


def bench_star(iterations: int, modes: int) -> dict:
    from hxn_ptycho.datasets import siemens_star
    scan = siemens_star(STAR)
    t0 = time.perf_counter()
    rec = Reconstruction(scan, ReconParams(iterations=iterations, probe_modes=modes), log=lambda m: None)
    res = rec.run()
    return {"modes": modes, "iterations": iterations, "seconds": time.perf_counter() - t0,
            "cost": res.attrs["final_cost"], "peak_rss_gb": peak_rss_gb()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--views", type=int, default=2000)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--modes", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--threads", type=int, default=available_cores())
    ap.add_argument("--star", type=int, default=0, help="also time the Siemens star for this many iterations")
    args = ap.parse_args()
    print(f"# hxn-ptycho CPU benchmark, {available_cores()} cores, threads {args.threads}")
    print("n     views  modes  s/iter   frames*it/s  FFT-only s  ratio  peak RSS GB")
    for m in args.modes:
        r = bench_case(args.n, args.views, m, args.iterations, args.threads)
        print(f"{r['n']:<5} {r['views']:<6} {r['modes']:<6} {r['s_per_iter']:<8.3f} {r['frames_iter_per_s']:<12.0f} "
              f"{r['fft_s']:<11.3f} {r['ratio']:<6.2f} {r['peak_rss_gb']:.2f}", flush=True)
    if args.star:
        if not STAR.exists():
            print(f"Siemens star not found at {STAR}", file=sys.stderr)
            return 1
        print("Siemens star: modes  iterations  seconds  cost")
        for m in (1, 3):
            r = bench_star(args.star, m)
            print(f"              {r['modes']:<6} {r['iterations']:<11} {r['seconds']:<8.1f} {r['cost']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
