"""Where a DM iteration's time goes on the CPU (numba backend), pass by pass, and the memory floor.

    python benchmarks/dm_profile.py                       # n = 128, 2000 views, 1 mode, 2 threads
    python benchmarks/dm_profile.py --modes 3 --batch 8   # other cases
    python benchmarks/dm_profile.py --bandwidth-only      # the machine's memory bandwidth alone

Prints one JSON line per measurement:

- ``bandwidth``: numba loops on ``--threads`` threads over arrays of ψ's size (complex64): a read
  (sum), a write (fill), a copy and a triad (a = b + s·c), in GB/s counting the bytes the loop
  reads and writes (not the write-allocate reads); the best of ``--repeat``;
- ``passes``: one DM iteration with every kernel, FFT and serial step timed (thread seconds,
  summed over the workers, per iteration; ``python`` = a batch's wall time not inside a kernel or
  an FFT: numba dispatch, the scipy.fft call, bookkeeping), the mean over ``--iterations``, with
  the interleaved FFT floor (``cpu_bench.fft_floor``) and the iteration's wall time;
- ``cache_resident``: the same kernels on one batch that stays in cache, called repeatedly (the
  minimum of ``--repeat`` calls, ms), against the same FFT pair.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _bandwidth(threads: int, nbytes: int, repeat: int) -> dict:
    import numba

    @numba.njit(nogil=True, fastmath=True)
    def read_k(a):
        s = np.float32(0)
        for i in range(a.shape[0]):
            s += a[i]
        return s

    @numba.njit(nogil=True)
    def fill_k(a, v):
        for i in range(a.shape[0]):
            a[i] = v

    @numba.njit(nogil=True)
    def copy_k(a, b):
        for i in range(a.shape[0]):
            a[i] = b[i]

    @numba.njit(nogil=True)
    def triad_k(a, b, c, s):
        for i in range(a.shape[0]):
            a[i] = b[i] + s * c[i]

    n = nbytes // 4
    a, b, c = (np.ones(n, np.float32) for _ in range(3))
    pool = ThreadPoolExecutor(threads)
    chunks = [slice(i * n // threads, (i + 1) * n // threads) for i in range(threads)]

    def run(fn: Callable, *arrays: Any) -> float:
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            list(pool.map(lambda s: fn(*[x[s] if isinstance(x, np.ndarray) else x for x in arrays]), chunks))
            best = min(best, time.perf_counter() - t0)
        return best
    gb = nbytes / 1e9
    out = {"what": "bandwidth", "threads": threads, "array_gb": gb,
           "read_GBps": gb / run(read_k, a),
           "write_GBps": gb / run(fill_k, a, np.float32(2)),
           "copy_GBps": 2 * gb / run(copy_k, a, b),
           "triad_GBps": 3 * gb / run(triad_k, a, b, c, np.float32(0.5))}
    pool.shutdown()
    return out


class _Timers:
    """Thread seconds per name, and the wall time of each batch call."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.local = threading.local()
        self.lock = threading.Lock()
        self.total: dict[str, float] = defaultdict(float)

    def add(self, name: str, dt: float) -> None:
        with self.lock:
            self.total[name] += dt
            if name.startswith("batch"):
                self.total[f"thread {threading.get_ident()} {name}"] += dt

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*a: Any, **k: Any) -> Any:
            t0 = self.clock()
            try:
                return fn(*a, **k)
            finally:
                self.add(name, self.clock() - t0)
        return timed


def _profile(args: argparse.Namespace) -> list[dict]:
    from cpu_bench import fft_floor
    from hxn_ptycho import cpu_kernels
    from hxn_ptycho.backend import get_backend
    from hxn_ptycho.dm_iteration import DMIteration
    from hxn_ptycho.engine import Reconstruction
    from hxn_ptycho.params import ReconParams
    from hxn_ptycho.scanfile import read_scan, write_scan
    from hxn_ptycho.simulate import simulate_scan

    if args.star:
        from hxn_ptycho.datasets import siemens_star
        from ptypy_dm_compare import _star_path
        scan = siemens_star(_star_path())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "scan.h5")
            sim, _ = simulate_scan(n=args.n, n_positions=args.views, probe_modes=1, photons=1e6, seed=3,
                                   overlap_step=args.n / 10)
            write_scan(path, sim)
            del sim
            scan = read_scan(path)
    be = get_backend("numba", args.threads)
    params = ReconParams(iterations=args.iterations + 1, probe_modes=args.modes, probe_update_start=0,
                         orthogonalize_every=0, max_memory_gb=16, backend="numba", threads=args.threads,
                         **({"batch_size": args.batch} if args.batch else {}))
    rec = Reconstruction(scan, params, backend=be, log=lambda m: None)
    step = DMIteration(rec)
    step.iterate(0)
    fft_floor(rec)
    timers = _Timers(time.thread_time if args.cpu_time else time.perf_counter)
    names = [k.__name__ for k in cpu_kernels.KERNELS]
    originals = {nm: getattr(cpu_kernels, nm) for nm in names}
    for nm in names:
        setattr(cpu_kernels, nm, timers.wrap(nm, originals[nm]))
    fft2, ifft2 = be.fft2, be.ifft2
    be.fft2 = timers.wrap("fft2", fft2)          # type: ignore[method-assign]
    be.ifft2 = timers.wrap("ifft2", ifft2)       # type: ignore[method-assign]
    for meth in ("_fourier_batch", "_probe_sums", "_object_sums"):
        setattr(step, meth, timers.wrap("batch" + meth, getattr(step, meth)))
    for meth in ("update_object", "fourier_step", "update_probe"):
        setattr(step, meth, timers.wrap("step_" + meth, getattr(step, meth)))
    walls, floors = [], []
    for it in range(1, args.iterations + 1):
        t0 = time.perf_counter()
        step.iterate(it)
        walls.append(time.perf_counter() - t0)
        be.fft2, be.ifft2 = fft2, ifft2          # the floor untimed
        floors.append(fft_floor(rec))
        be.fft2, be.ifft2 = timers.wrap("fft2", fft2), timers.wrap("ifft2", ifft2)
    for nm in names:
        setattr(cpu_kernels, nm, originals[nm])
    be.fft2, be.ifft2 = fft2, ifft2
    it_n = args.iterations
    t = {k: v / it_n for k, v in timers.total.items()}
    kernels = {k: round(1e3 * v, 2) for k, v in t.items() if k in names or k in ("fft2", "ifft2")}
    fourier_inner = sum(t.get(k, 0.0) for k in ("reflect_at_k", "project_k", "dm_update_sums_at_k", "dm_update_num_at_k", "fft2", "ifft2"))
    res = {"what": "passes", "scan": "star" if args.star else "simulated spiral", "n": scan.n, "views": scan.n_views,
           "probe_modes": args.modes,
           "threads": args.threads, "batch": rec.plan.batch_size,
           "iteration_ms": round(1e3 * float(np.mean(walls)), 1), "fft_floor_ms": round(1e3 * float(np.mean(floors)), 1),
           "ratio": round(float(np.sum(walls) / np.sum(floors)), 3),
           "thread_ms": kernels,
           "fourier_batches_ms": round(1e3 * t.get("batch_fourier_batch", 0), 1),
           "fourier_python_ms": round(1e3 * (t.get("batch_fourier_batch", 0) - fourier_inner), 1),
           "probe_batches_ms": round(1e3 * t.get("batch_probe_sums", 0), 1),
           "probe_python_ms": round(1e3 * (t.get("batch_probe_sums", 0) - t.get("probe_sums_k", 0)), 1),
           "per_worker_fourier_ms": sorted(round(1e3 * v, 1) for k, v in t.items()
                                           if k.startswith("thread") and k.endswith("batch_fourier_batch")),
           "fourier_step_wall_ms": round(1e3 * t.get("step_fourier_step", 0), 1),
           "update_probe_wall_ms": round(1e3 * t.get("step_update_probe", 0), 1),
           "update_object_wall_ms": round(1e3 * t.get("step_update_object", 0), 1),
           "load_avg_1min": os.getloadavg()[0]}
    out = [res, _cache_resident(rec, args.repeat)]
    rec.close()
    return out


def _cache_resident(rec: Any, repeat: int) -> dict:
    """Each kernel of the Fourier and probe passes on the first batch, again and again (min, ms)."""
    from hxn_ptycho import cpu_kernels as ck
    be, w = rec.be, rec._workers[0]
    b = rec.batches[0]
    B = b.stop - b.start
    psi = rec.psi[b].copy()
    pos = np.ascontiguousarray(rec.pos[b], np.int64)
    work = w.work[:B]
    amp = rec.diffamp[b]
    m1 = np.ones((1, 1), np.bool_)
    rdt = psi.real.dtype.type
    pint = np.ascontiguousarray((np.abs(rec.probe) ** 2).sum(0), rdt)
    onum = np.zeros_like(rec.obj)
    oden = np.zeros((1,) + rec.obj.shape[1:], rdt)
    pnum = np.zeros_like(rec.probe)
    pden = np.zeros(rec.probe.shape[1:], rdt)
    pb = rdt(rec.pbound)
    iota = np.arange(len(amp), dtype=np.int64)
    relax = np.zeros(len(amp), rdt)
    calls = {
        "reflect_at_k": lambda: ck.reflect_at_k(rec.obj, pos, rec.probe, psi, work),
        "fft2": lambda: be.fft2(work),
        "project_k": lambda: ck.project_k(ck._views(work), amp, iota, m1, False, pb, rdt(0), rdt(ck.TINY), rdt(1), relax),
        "ifft2": lambda: be.ifft2(work),
        "dm_update_sums_at_k": lambda: ck.dm_update_sums_at_k(psi, rec.obj, pos, rec.probe, work, rdt(1), relax, rdt(1), pint,
                                                              onum, oden),
        "probe_sums_k": lambda: ck.probe_sums_k(psi, rec.obj, pos, pnum, pden),
        "copy_batch": lambda: np.copyto(work, psi),
    }
    out: dict[str, Any] = {"what": "cache_resident", "batch": B, "probe_modes": psi.shape[2]}
    for name, fn in calls.items():
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
            if name == "ifft2":
                work[...] = psi           # keep the values bounded
        out[name + "_ms"] = round(1e3 * best, 4)
    ffts = out["fft2_ms"] + out["ifft2_ms"]
    passes = sum(out[k + "_ms"] for k in ("reflect_at_k", "project_k", "dm_update_sums_at_k", "probe_sums_k"))
    out["passes_over_ffts"] = round(passes / ffts, 3)
    out["load_avg_1min"] = os.getloadavg()[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--views", type=int, default=2000)
    ap.add_argument("--modes", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0, help="views per batch (0: the engine's choice)")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--star", action="store_true", help="the Siemens star (516 views of 128², raster) instead")
    ap.add_argument("--cpu-time", action="store_true", help="time the passes by thread CPU time (not wall)")
    ap.add_argument("--bandwidth-only", action="store_true")
    ap.add_argument("--no-bandwidth", action="store_true")
    args = ap.parse_args()
    if not args.no_bandwidth:
        nbytes = args.views * args.modes * args.n * args.n * 8
        print(json.dumps(_bandwidth(args.threads, nbytes, max(3, args.repeat // 5))), flush=True)
        if args.threads > 1:
            print(json.dumps(_bandwidth(1, nbytes, max(3, args.repeat // 5))), flush=True)
    if args.bandwidth_only:
        return
    for line in _profile(args):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
