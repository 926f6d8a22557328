"""GPU benchmark of the CuPy backend (needs CuPy and a CUDA GPU).

    python benchmarks/gpu_bench.py [--quick] [--json OUT.json] [--cases a,b,b192,scatter]

Prints, with the device named:
  (a) 1 000 views of 256×256, 1 probe mode: seconds per DM iteration;
  (b) the paper's case scaled to one GPU: N = 10 000 views of 188×188 (and 192×192), 5 probe
      modes, 50 iterations: total seconds and peak device memory;
  (c) the ratio of the iteration time to the bare cuFFT time (one forward + one inverse batched
      FFT of the same exit waves, the least any DM iteration must do).
Each case is timed twice: through the engine (``dm_iteration.DMIteration.iterate``, the code users
run; since session 18 its state is ψ alone, ``dm.dm_step``) and as the fused-kernel pipeline
below (``fused_iteration``: F(ψ) kept beside ψ, the one-kernel ``fourier_update`` — faster, at
twice the exit waves' memory). Also: the overlap accumulation with atomics
versus non-overlapping sets (the paper left that open).
Targets on one H100: (a) ≤ 4 ms/iteration, (b) ≤ 3 s, (c) ≤ 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hxn_ptycho.gpu import CupyBackend, gpu_available


def synthetic_scan(be, N: int, n: int, K: int, seed: int = 0):
    """A raster scan of N views (step n/4), K probe modes, frames computed on the GPU."""
    from hxn_ptycho.scanfile import ScanData
    from hxn_ptycho.simulate import CCD_PIXEL_UM, DISTANCE_M, ENERGY_KEV, wavelength_nm, zone_plate_probe
    cp = be.xp
    rng = np.random.default_rng(seed)
    side = int(math.ceil(math.sqrt(N)))
    step = max(1, n // 4)
    rr, cc = np.divmod(np.arange(N), side)
    margin = 4
    corners = np.stack([rr * step, cc * step], 1) + margin + rng.integers(0, 3, (N, 2))
    H, W = int(corners[:, 0].max()) + n + margin, int(corners[:, 1].max()) + n + margin
    obj = (0.6 + 0.4 * rng.random((1, H, W))) * np.exp(1j * rng.uniform(-0.5, 0.5, (1, H, W)))
    p1 = zone_plate_probe(n)
    probe = np.stack([np.roll(p1, s - K // 2, axis=1) for s in range(K)]) / math.sqrt(K)
    d_obj, d_probe = be.asarray(obj, np.complex64), be.asarray(probe, np.complex64)
    diffamp = np.empty((N, n, n), np.float32)
    chunk = max(1, int(2**28 // (K * n * n * 8)))
    for s in range(0, N, chunk):
        pos = corners[s:s + chunk].astype(np.int64)
        win = be.gather(d_obj, pos, n)
        w = be.empty((len(pos), 1, K, n, n), np.complex64)
        be.fft_exit_waves(d_probe, win, w)
        diffamp[s:s + len(pos)] = cp.asnumpy(cp.sqrt((cp.abs(w) ** 2).sum(axis=(1, 2))))
    lam = wavelength_nm(ENERGY_KEV)
    pixel_m = lam * 1e-9 * DISTANCE_M / (n * CCD_PIXEL_UM * 1e-6)
    points = np.stack([corners[:, 1], corners[:, 0]]).astype(np.float64) * pixel_m * 1e6
    scan = ScanData(diffamp=diffamp, points=points, lambda_nm=lam, z_m=DISTANCE_M, ccd_pixel_um=CCD_PIXEL_UM)
    return scan, corners.astype(np.int64), obj, probe


def timed(be, fn, repeat: int) -> float:
    """Mean seconds of fn() over ``repeat`` runs (after one warm-up), CUDA events on the stream."""
    cp = be.xp
    fn()
    be.synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(repeat):
        fn()
    stop.record()
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / 1e3 / repeat


class FusedState:
    """Device state of the fused-kernel pipeline: Fourier-space exit waves only (no real-space copy)."""

    def __init__(self, be, scan, corners, K: int, batch: int):
        cp = be.xp
        self.be, self.n, self.K = be, scan.n, K
        N = scan.diffamp.shape[0]
        self.pos = corners
        self.batches = [slice(i, min(N, i + batch)) for i in range(0, N, batch)]
        self.amp = be.asarray(scan.diffamp, np.float32)
        H = int(corners[:, 0].max()) + self.n + 4
        W = int(corners[:, 1].max()) + self.n + 4
        self.obj = cp.ones((1, H, W), np.complex64)
        self.probe = cp.asarray(np.stack([np.fft.fftshift(np.fft.ifft2(np.ones((self.n, self.n))))] * K)
                                .astype(np.complex64)) * 10
        self.fpsi = cp.empty((N, 1, K, self.n, self.n), np.complex64)
        self.fphi = cp.empty((batch, 1, K, self.n, self.n), np.complex64)
        self.objwin = cp.empty((batch, 1, self.n, self.n), np.complex64)
        self.onum = cp.empty((batch, 1, self.n, self.n), np.complex64)
        self.obj_num = cp.zeros_like(self.obj)
        self.obj_den = cp.zeros((1, H, W), np.float32)
        self.probe_num = cp.zeros((K, self.n, self.n), np.complex64)
        self.probe_den = cp.zeros((self.n, self.n), np.float32)
        for b in self.batches:
            B = b.stop - b.start
            win = be.gather(self.obj, self.pos[b], self.n, out=self.objwin[:B])
            be.fft_exit_waves(self.probe, win, self.fpsi[b])
        self.pbound = 0.25 * 0.05 ** 2 * float(cp.mean(self.amp ** 2))


def fused_iteration(st: FusedState, beta: float = 0.8) -> None:
    """One DM iteration with the fused kernels: per batch gather → F(P·O) → fourier_update →
    raw inverse cuFFT (scale folded) → object numerator/denominator scatter and probe sums; then the
    object and probe ratios."""
    be, cp, n = st.be, st.be.xp, st.n
    s = 1.0 / n
    st.obj_num.fill(0)
    st.obj_den.fill(0)
    st.probe_num.fill(0)
    st.probe_den.fill(0)
    pconj = cp.conj(st.probe) * np.float32(s)
    pint = (cp.abs(st.probe) ** 2).sum(axis=0).astype(np.float32)
    err = 0.0
    for b in st.batches:
        B = b.stop - b.start
        pos = st.pos[b]
        win = be.gather(st.obj, pos, n, out=st.objwin[:B])
        fphi = be.fft_exit_waves(st.probe, win, st.fphi[:B])
        err = err + be.fourier_update(st.fpsi[b], fphi, st.amp[b], None, st.pbound, beta)
        psi = be.raw_ifft2(st.fpsi[b], st.fphi[:B])            # n·ψ (raw), into the free buffer
        be.object_numerator(psi, pconj, st.onum[:B])
        be.scatter_add(st.obj_num, pos, st.onum[:B])
        be.scatter_add(st.obj_den, pos, pint)
        be.probe_sums(psi, win, st.probe_num, st.probe_den)   # numerator and denominator
    st.probe_num *= np.float32(s)
    a = 1e-3 * float(st.obj_den.max()) + 1e-30
    st.obj = (st.obj_num + a * st.obj) / (st.obj_den + a)
    a = 1e-3 * float(st.probe_den.max()) + 1e-30
    st.probe = (st.probe_num + a * st.probe) / (st.probe_den + a)
    float(err)


def fft_floor(be, shape, dtype=np.complex64) -> float:
    """Seconds for one forward + one inverse raw batched cuFFT of an array of ``shape``."""
    cp = be.xp
    a = cp.ones(shape, dtype)
    fwd, inv = be._cufft.CUFFT_FORWARD, be._cufft.CUFFT_INVERSE
    t = timed(be, lambda: (be._raw_fft(a, fwd), be._raw_fft(a, inv)), 5)
    del a
    be.clear_plans()
    return t


def engine_case(be, scan, K: int, iters: int, batch: int | None):
    """(seconds per iteration through the engine, total seconds for ``iters``, peak pool bytes)."""
    from hxn_ptycho.dm_iteration import DMIteration
    from hxn_ptycho.engine import Reconstruction
    from hxn_ptycho.params import ReconParams
    cp = be.xp
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    free, total = be.memory_info()
    params = ReconParams(iterations=iters, probe_modes=K, precision="single", batch_size=batch,
                         max_memory_gb=0.92 * total / 2**30, orthogonalize_every=10)
    t0 = time.perf_counter()
    rec = Reconstruction(scan, params, backend=be, log=lambda m: print("   ", m))
    be.synchronize()
    t_setup = time.perf_counter() - t0
    step = DMIteration(rec)
    t1 = time.perf_counter()
    for it in range(iters):
        step.iterate(it)
        if params.orthogonalize_every and (it + 1) % params.orthogonalize_every == 0 and it + 1 < iters:
            rec.modes_mgr.orthogonalize()
    be.synchronize()
    t_iter = time.perf_counter() - t1
    peak = pool.total_bytes()
    del rec
    be.clear_plans()
    pool.free_all_blocks()
    return t_iter / iters, t_setup + t_iter, peak, t_setup


def fused_case(be, scan, corners, K: int, iters: int, batch: int):
    cp = be.xp
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    t0 = time.perf_counter()
    st = FusedState(be, scan, corners, K, batch)
    be.synchronize()
    t_setup = time.perf_counter() - t0
    per_iter = timed(be, lambda: fused_iteration(st), iters)
    peak = pool.total_bytes()
    be.clear_plans()
    del st
    pool.free_all_blocks()
    return per_iter, t_setup + per_iter * iters, peak


def scatter_case(be, scan, corners, K: int):
    """Seconds of the object-numerator scatter of all views: atomics vs non-overlapping sets."""
    cp = be.xp
    n, N = scan.n, scan.diffamp.shape[0]
    H, W = int(corners[:, 0].max()) + n + 4, int(corners[:, 1].max()) + n + 4
    acc = cp.zeros((1, H, W), np.complex64)
    src = cp.ones((N, 1, n, n), np.complex64)
    out = {}
    for mode in ("atomic", "sets"):
        out[mode] = timed(be, lambda: be.scatter_add(acc, corners, src, mode=mode), 5)
    out["sets_count"] = len(be._dev_sets(corners, n))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test of the script)")
    ap.add_argument("--cases", default="a,b,b192,scatter")
    ap.add_argument("--engine", default="yes", choices=("yes", "no"), help="also time through the engine")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    ok, why = gpu_available()
    if not ok:
        print(f"gpu_bench: no GPU: {why}", file=sys.stderr)
        return 2
    be = CupyBackend(0)
    cp = be.xp
    free, total = be.memory_info()
    dev = f"{be.device_name} ({total / 2**30:.0f} GiB, {be.sm_count} SMs), CuPy {cp.__version__}, " \
          f"CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}, driver {cp.cuda.runtime.driverGetVersion()}"
    print(f"device: {dev}", flush=True)
    res: dict = {"device": dev, "cases": {}}
    cases = args.cases.split(",")
    q = args.quick
    spec = {"a": (100 if q else 1000, 256, 1, 5 if q else 20),
            "b": (500 if q else 10000, 188, 5, 5 if q else 50),
            "b192": (500 if q else 10000, 192, 5, 5 if q else 50)}
    for name in [c for c in cases if c in spec]:
        N, n, K, iters = spec[name]
        print(f"== case {name}: N={N} views of {n}x{n}, {K} probe mode(s), {iters} iterations", flush=True)
        t0 = time.perf_counter()
        scan, corners, _, _ = synthetic_scan(be, N, n, K)
        print(f"   synthetic scan on the GPU in {time.perf_counter() - t0:.1f} s", flush=True)
        r: dict = {"N": N, "n": n, "K": K, "iterations": iters}
        fft_s = fft_floor(be, (N, 1, K, n, n))
        r["fft_fwd_inv_s"] = fft_s
        print(f"   bare cuFFT (forward + inverse of the exit waves): {1e3 * fft_s:.2f} ms", flush=True)
        per, tot, peak = fused_case(be, scan, corners, K, iters, min(N, 2500))
        r["fused"] = {"s_per_iter": per, "total_s": tot, "peak_bytes": peak, "ratio_to_fft": per / fft_s}
        print(f"   fused kernels: {1e3 * per:.2f} ms/iteration, {iters} iterations {tot:.2f} s (with set-up), "
              f"peak {peak / 2**30:.2f} GiB, iteration/FFT = {per / fft_s:.2f}", flush=True)
        if args.engine == "yes":
            try:
                per, tot, peak, setup = engine_case(be, scan, K, iters, None)
                r["engine"] = {"s_per_iter": per, "total_s": tot, "setup_s": setup, "peak_bytes": peak,
                               "ratio_to_fft": per / fft_s}
                print(f"   engine: {1e3 * per:.2f} ms/iteration, total {tot:.2f} s (set-up {setup:.2f} s), "
                      f"peak {peak / 2**30:.2f} GiB, iteration/FFT = {per / fft_s:.2f}", flush=True)
            except Exception as exc:  # keep the other numbers when the engine path fails
                r["engine"] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"   engine: FAILED {type(exc).__name__}: {exc}", flush=True)
        res["cases"][name] = r
        del scan
        be.clear_plans()
        cp.get_default_memory_pool().free_all_blocks()
    if "scatter" in cases:
        N, n, K = (500, 188, 5) if q else (10000, 188, 5)
        scan, corners, _, _ = synthetic_scan(be, N, n, 1)
        sc = scatter_case(be, scan, corners, K)
        res["cases"]["scatter"] = {"N": N, "n": n, **sc}
        print(f"== overlap accumulation of {N} views of {n}x{n} (complex64): atomics {1e3 * sc['atomic']:.2f} ms, "
              f"non-overlapping sets {1e3 * sc['sets']:.2f} ms ({sc['sets_count']} sets) -> "
              f"{'atomics' if sc['atomic'] <= sc['sets'] else 'sets'} faster", flush=True)
    print("\n| case | fused kernels | engine | bare cuFFT fwd+inv | iteration/FFT (fused, engine) | peak memory |")
    print("|---|---|---|---|---|---|")
    for name, r in res["cases"].items():
        if name == "scatter":
            continue
        f, e = r["fused"], r.get("engine", {})
        eng = f"{1e3 * e['s_per_iter']:.2f} ms/it, {e['total_s']:.2f} s" if "s_per_iter" in e else e.get("error", "-")
        er = f"{e['ratio_to_fft']:.2f}" if "ratio_to_fft" in e else "-"
        print(f"| {name}: {r['N']}×{r['n']}², K={r['K']}, {r['iterations']} it | {1e3 * f['s_per_iter']:.2f} ms/it, "
              f"{f['total_s']:.2f} s | {eng} | {1e3 * r['fft_fwd_inv_s']:.2f} ms | {f['ratio_to_fft']:.2f}, {er} | "
              f"{f['peak_bytes'] / 2**30:.2f} GiB (fused)"
              + (f", {e['peak_bytes'] / 2**30:.2f} GiB (engine)" if "peak_bytes" in e else "") + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
