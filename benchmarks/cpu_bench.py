"""CPU benchmark of the DM engine: throughput, ratio to an FFT-only floor, peak memory, Siemens star.

    python benchmarks/cpu_bench.py --iterations 5 --threads 2 --json
                                                   # n = 128, 2000 views, 1 and 3 probe modes: one
                                                   # JSON line per case (the issue's proof fields)
    python benchmarks/cpu_bench.py --backend numpy # the numpy reference instead of the numba kernels
    python benchmarks/cpu_bench.py --star 200      # also the Siemens star, 200 iterations, 1 and 3 modes
    python benchmarks/cpu_bench.py --modes --star-ml DM:40,ML:20 --star-positions 180
                                                   # DM then ML on the star (against DM alone), and
                                                   # position refinement on the star with its positions
                                                   # perturbed (3 px RMS + 2 % scale): gradient and search
    python benchmarks/cpu_bench.py --modes --overlap 200
                                                   # DM against PtyPy's: the overlap alternation, the
                                                   # probe start and the power bound, on the star (1 and
                                                   # 3 modes; correlation with PtyPy's object) and on
                                                   # high-count simulations at gains 1, 37.5, 0.02
                                                   # (all: ~30 min; --overlap-cases star1 sim1
                                                   #  --overlap-settings single alt beta1 ptypy: a few)

Each throughput case runs in a fresh process (its peak resident memory is the case's own) on a
scan written once to a temporary file (so the simulation's memory is not counted): a warm-up
iteration, then ``--iterations`` DM iterations each followed by the **FFT floor** — one forward +
inverse orthonormal FFT of every exit wave, in place, in the engine's batches on the engine's
worker threads — interleaved, so that both see the same load. Per case: seconds per iteration,
frames·iterations per second, the floor, their ratio (summed over the pairs), the peak resident
memory (VmHWM), and what DM must hold: the exit waves ψ (one copy) and the data √I (GiB), with
``peak_target_gb`` = 1.5 × their sum, ``stored_exit_waves_gb`` (what the engine keeps: ψ alone),
``rss_before_reconstruction_gb`` (interpreter, libraries, compiled kernels and the data read) and the
load average. ``cpu_s_per_iter``, ``fft_floor_cpu_s`` and ``cpu_ratio_to_fft_floor`` are the same
in process CPU time (all threads): steadier than wall time where other jobs take the cores (it
leaves out the time a thread waits for a core, not the cost of sharing caches and memory).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from hxn_ptycho.backend import available_cores
from hxn_ptycho.dm_iteration import DMIteration
from hxn_ptycho.engine import Reconstruction
from hxn_ptycho.params import ReconParams
from hxn_ptycho.simulate import simulate_scan

STAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "siemens-star-small" / "siemens-star-small.npz.bz2"


def _proc_status_gb(field: str) -> float | None:
    """A memory line of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in GiB; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:     # pragma: no cover - not Linux
        pass
    return None


def peak_rss_gb() -> float:
    """The process's peak resident memory (GiB): VmHWM of its own address space — unlike
    ``ru_maxrss``, which keeps the high-water mark of the parent it was forked from."""
    peak = _proc_status_gb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gb() -> float:
    """The process's resident memory now (VmRSS, GiB)."""
    now = _proc_status_gb("VmRSS")
    return now if now is not None else float("nan")


def _load() -> float:
    return os.getloadavg()[0]


def fft_floor(rec: Reconstruction) -> float:
    """Seconds of one forward + inverse orthonormal FFT of all exit waves ψ, in place, in the engine's
    batches on its worker threads (``rec._each``): the transforms an iteration cannot avoid."""
    be = rec.be

    def one(w, b: slice) -> None:
        be.ifft2(be.fft2(rec.psi[b]))
    be.synchronize()
    t0 = time.perf_counter()
    rec._each(one)
    be.synchronize()
    return time.perf_counter() - t0


def _case_child(path: str, modes: int, iterations: int, threads: int, backend: str, spatial: bool = True) -> dict:
    """One throughput case in this (fresh) process: DM iterations and the FFT floor, interleaved."""
    from hxn_ptycho.backend import get_backend
    from hxn_ptycho.scanfile import read_scan
    base_rss = peak_rss_gb()
    t0 = time.perf_counter()
    be = get_backend(backend, threads)
    start_s = time.perf_counter() - t0
    scan = read_scan(path)
    params = ReconParams(iterations=iterations + 1, probe_modes=modes, probe_update_start=0,
                         orthogonalize_every=0, max_memory_gb=16, backend=backend, threads=threads)
    libs_rss = current_rss_gb()                      # interpreter, libraries and the data read
    rec = Reconstruction(scan, params, backend=be, log=lambda m: None, spatial_order=spatial)
    stored = rec.store.psi.nbytes / 2**30            # the full-size state the engine keeps
    step = DMIteration(rec)
    step.iterate(0)                                  # warm-up (FFT plans, kernels, page faults)
    fft_floor(rec)
    iters, floors, loads, cpu_iters, cpu_floors = [], [], [], [], []
    for it in range(1, iterations + 1):
        c0 = time.process_time()
        t0 = time.perf_counter()
        step.iterate(it)
        be.synchronize()
        iters.append(time.perf_counter() - t0)
        c1 = time.process_time()
        floors.append(fft_floor(rec))
        cpu_floors.append(time.process_time() - c1)
        cpu_iters.append(c1 - c0)
        loads.append(_load())
    rec.close()
    views = scan.n_views
    n = scan.n
    L = rec.obj_shape[0]
    per_iter = float(np.mean(iters))
    return {"backend": be.name, "fft_library": be.fft_library,
            "view_order": "given" if rec.geom.order is None else "spatial",
            "n": n, "views": views, "probe_modes": modes, "threads": threads,
            "s_per_iter": per_iter, "frames_iterations_per_s": views / per_iter,
            "fft_floor_s": float(np.mean(floors)), "ratio_to_fft_floor": float(np.sum(iters) / np.sum(floors)),
            "ratio_min": float(min(iters) / min(floors)),
            "cpu_s_per_iter": float(np.mean(cpu_iters)), "fft_floor_cpu_s": float(np.mean(cpu_floors)),
            "cpu_ratio_to_fft_floor": float(np.sum(cpu_iters) / np.sum(cpu_floors)),
            "peak_rss_gb": peak_rss_gb(), "exit_waves_gb": views * L * modes * n * n * 8 / 2**30,
            "data_gb": scan.diffamp.nbytes / 2**30, "stored_exit_waves_gb": stored,
            "peak_target_gb": 1.5 * (views * L * modes * n * n * 8 + scan.diffamp.nbytes) / 2**30,
            "baseline_rss_gb": base_rss, "rss_before_reconstruction_gb": libs_rss,
            "backend_start_s": start_s, "load_avg_1min": float(np.mean(loads))}


def bench_case(n: int, views: int, modes: int, iterations: int, threads: int, backend: str = "numba",
               scan_path: str | None = None, spatial: bool = True) -> dict:
    """One case in a fresh process (the peak memory is the case's own); the scan is simulated and
    written to ``scan_path`` (a temporary file by default) first."""
    with tempfile.TemporaryDirectory() as tmp:
        path = scan_path or os.path.join(tmp, f"sim_{n}_{views}.h5")
        if not os.path.exists(path):
            from hxn_ptycho.scanfile import write_scan
            scan, _ = simulate_scan(n=n, n_positions=views, probe_modes=1, photons=1e6, seed=3, overlap_step=n / 10)
            write_scan(path, scan)
            del scan
        out = subprocess.run([sys.executable, __file__, "--_case", json.dumps(
            {"path": path, "modes": modes, "iterations": iterations, "threads": threads, "backend": backend,
             "spatial": spatial})],
            check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def bench_star(iterations: int, modes: int) -> dict:
    from hxn_ptycho.datasets import siemens_star
    scan = siemens_star(STAR)
    t0 = time.perf_counter()
    rec = Reconstruction(scan, ReconParams(iterations=iterations, probe_modes=modes), log=lambda m: None)
    res = rec.run()
    return {"modes": modes, "iterations": iterations, "seconds": time.perf_counter() - t0,
            "cost": res.attrs["final_cost"], "peak_rss_gb": peak_rss_gb()}


def bench_star_ml(algorithm: str) -> list[dict]:
    """The star with ``algorithm`` (e.g. DM:40,ML:20) and with DM alone for as many iterations."""
    from hxn_ptycho.datasets import siemens_star
    from hxn_ptycho.params import algorithm_stages
    scan = siemens_star(STAR)
    total = sum(c for _, c in algorithm_stages(ReconParams(algorithm=algorithm)))
    out = []
    for alg in (f"DM:{total}", algorithm):
        t0 = time.perf_counter()
        res = Reconstruction(scan, ReconParams(algorithm=alg), log=lambda m: None).run()
        out.append({"algorithm": alg, "seconds": time.perf_counter() - t0, "cost": res.attrs["final_cost"]})
    return out


def perturbed_star(seed: int = 0):
    """The star with its positions scaled by 1.02 about their centre plus 3 px RMS random errors."""
    from hxn_ptycho.datasets import perturbed_positions, siemens_star
    scan = siemens_star(STAR)
    return scan, perturbed_positions(scan, 1.02, 3.0, seed)


def bench_star_positions(iterations: int) -> list[dict]:
    """Refined positions against the file's (object pixels = µm here), correlation with the object
    reconstructed from the file's positions, for both refinement methods."""
    from hxn_ptycho.metrics import illuminated_region, shifted_correlation
    from hxn_ptycho.positions import affine_terms
    scan, bad = perturbed_star()
    true = np.stack([scan.points[1], scan.points[0]], axis=1)
    ref = Reconstruction(scan, ReconParams(iterations=iterations), log=lambda m: None).run()

    def rms(a):
        d = a - true
        d = d - d.mean(axis=0)
        return float(np.sqrt(np.mean(np.sum(d ** 2, axis=1))))
    out = []
    for method in ("gradient", "search"):
        p = ReconParams(iterations=iterations, refine_positions=True, position_method=method, position_start=50,
                        position_end=int(0.77 * iterations))
        t0 = time.perf_counter()
        res = Reconstruction(bad, p, log=lambda m: None).run()
        secs = time.perf_counter() - t0
        est = res.positions_refined_px
        reg = illuminated_region(ref.positions_px, ref.probe, ref.object.shape[1:])
        corr, _ = shifted_correlation(ref.object[0], res.object[0],
                                      (est - true).mean(0) - (ref.positions_px - true).mean(0), reg)
        out.append({"method": method, "seconds": secs, "nominal_rms": rms(res.positions_px), "refined_rms": rms(est),
                    "scale": np.diag(affine_terms(true, est)).tolist(), "correlation": corr,
                    "cost": res.attrs["final_cost"], "cost_unperturbed": ref.attrs["final_cost"]})
    return out


# settings of the DM comparison with PtyPy (``--overlap``): key -> (label, parameters), each over the
# baseline β 0.8, one probe/object update, probe from iteration 2; "ptypy_bound": PtyPy's power bound in
# data units; PtyPy's alpha = 1 is β = 1 here
OVERLAP_BASE = {"beta": 0.8, "update_rounds": 1, "overlap_converge": 0.0, "probe_update_start": 2}
ALTERNATE = {"update_rounds": 10, "overlap_converge": 0.05}
OVERLAP_SETTINGS: dict[str, tuple[str, dict]] = {
    "single": ("beta 0.8, single update", {}),
    "alt": ("alternate <=10, tol 0.05", ALTERNATE),
    "alt-tight": ("alternate <=10, tol 0.005", {"update_rounds": 10, "overlap_converge": 0.005}),
    "start0": ("probe from iteration 0", {"probe_update_start": 0}),
    "bound": ("PtyPy power bound", {"ptypy_bound": True}),
    "alt+bound": ("alternate + PtyPy bound", {**ALTERNATE, "ptypy_bound": True}),
    "beta1": ("beta 1", {"beta": 1.0}),
    "beta1+alt": ("beta 1, alternate", {"beta": 1.0, **ALTERNATE}),
    "beta1+start0": ("beta 1, probe from iteration 0", {"beta": 1.0, "probe_update_start": 0}),
    "ptypy": ("beta 1, alternate, PtyPy bound", {"beta": 1.0, **ALTERNATE, "ptypy_bound": True}),
}


def ptypy_power_bound(scan, relax: float = 0.05) -> float:
    """PtyPy's DM power bound in data units: 0.25 · fourier_relax_factor² · max_j ΣI_j / pixels."""
    frame_power = np.sum(np.square(scan.diffamp, dtype=np.float64), axis=(1, 2))
    return 0.25 * relax ** 2 * float(frame_power.max()) / scan.diffamp[0].size


def overlap_params(base: ReconParams, setting: dict, scan) -> ReconParams:
    setting = {**OVERLAP_BASE, **setting}
    if setting.pop("ptypy_bound", False):
        setting.update(power_bound=ptypy_power_bound(scan), detector_gain=1.0)
    return base.replace(**setting)


def star_correlation(res, peer: dict) -> tuple[float, float]:
    """|<a, b>| / (|a| |b|) of our object and PtyPy's over our illuminated region, after moving the
    peer's by the whole-pixel offset of the two frames and registering the rest (sub-pixel):
    global phase removed (the modulus of the inner product); then of the deviations from the mean
    (the contrast alone), the phase ramp also removed."""
    from hxn_ptycho.metrics import illuminated_region, remove_phase_ramp, shifted_correlation
    a, b = res.object[0].astype(np.complex128), peer["object"].astype(np.complex128)
    reg = illuminated_region(res.positions_px, res.probe, a.shape)
    c, b3 = shifted_correlation(a, b, (peer["top_left_px"] - res.positions_px).mean(0), reg)
    x, y = a[reg], remove_phase_ramp(b3, a, reg)[reg]
    x, y = x - x.mean(), y - y.mean()
    return c, float(abs(np.vdot(x, y)) / np.linalg.norm(x) / np.linalg.norm(y))


def _run_setting(scan, params: ReconParams) -> tuple[object, float, float]:
    t0 = time.perf_counter()
    rec = Reconstruction(scan, params, log=lambda m: None)
    res = rec.run()
    rounds = np.array(rec.overlap_rounds, float)
    return res, time.perf_counter() - t0, float(rounds[rounds > 0].mean()) if (rounds > 0).any() else 0.0


def bench_overlap(iterations: int, threads: int, settings: list[str] | None = None,
                  cases: list[str] | None = None) -> Iterator[dict]:
    """DM with each of ``OVERLAP_SETTINGS`` on the star (1, 3 modes) and on high-count simulations,
    one result at a time."""
    from hxn_ptycho.datasets import siemens_star
    from hxn_ptycho.metrics import illuminated_region, nrmse
    names = settings or list(OVERLAP_SETTINGS)
    runs = [OVERLAP_SETTINGS[k] for k in names]
    want = cases or ["star1", "star3", "sim1", "sim37.5", "sim0.02"]
    for case in want:
        if case.startswith("star"):
            modes = int(case[4:])
            scan = siemens_star(STAR)
            peer = dict(np.load(STAR.parent / f"peer_ptypy_dm200_{'1mode' if modes == 1 else '3modes'}.npz"))
            base = ReconParams(iterations=iterations, probe_modes=modes, threads=threads)
            for name, setting in runs:
                res, secs, rounds = _run_setting(scan, overlap_params(base, setting, scan))
                c, c_ramp = star_correlation(res, peer)
                yield ({"case": f"star, {modes} mode(s)", "setting": name, "seconds": secs, "rounds": rounds,
                            "cost": res.attrs["final_cost"], "corr": c, "corr_ramp": c_ramp,
                            "peer_cost": float(peer["tike_style_gaussian_cost"])})
        else:
            gain = float(case[3:])
            scan, truth = simulate_scan(n=64, n_positions=200, probe_modes=3, photons=1e8, seed=5, gain=gain)
            base = ReconParams(iterations=iterations, probe_modes=3, threads=threads)
            for name, setting in runs:
                res, secs, rounds = _run_setting(scan, overlap_params(base, setting, scan))
                reg = illuminated_region(res.positions_px, res.probe, res.object.shape[1:])
                yield ({"case": f"simulation 1e8 photons, gain {gain:g}", "setting": name, "seconds": secs,
                            "rounds": rounds, "cost": res.attrs["final_cost"] / gain,
                            "nrmse": nrmse(res.object[0], truth.object, reg)})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--views", type=int, default=2000)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--modes", type=int, nargs="*", default=[1, 3], help="(none: skip the throughput cases)")
    ap.add_argument("--threads", type=int, default=available_cores())
    ap.add_argument("--star", type=int, default=0, help="also time the Siemens star for this many iterations")
    ap.add_argument("--star-ml", default="", help="the star with this chain (e.g. DM:40,ML:20) against DM alone")
    ap.add_argument("--star-positions", type=int, default=0,
                    help="position refinement on the perturbed star for this many iterations")
    ap.add_argument("--overlap", type=int, default=0,
                    help="DM against PtyPy's (overlap alternation, probe start, power bound) for this many iterations")
    ap.add_argument("--overlap-cases", nargs="*", default=None, help="star1 star3 sim1 sim37.5 sim0.02")
    ap.add_argument("--overlap-settings", nargs="*", default=None, help=" ".join(OVERLAP_SETTINGS))
    ap.add_argument("--backend", default="numba",
                    help="numba (the fused kernels), numpy (the reference) or cupy (the contract on a GPU)")
    ap.add_argument("--json", action="store_true", help="one JSON line per throughput case")
    ap.add_argument("--given-order", action="store_true",
                    help="the exit waves in the scan's view order, not the spatial one (Reconstruction spatial_order)")
    ap.add_argument("--_case", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._case:
        c = json.loads(args._case)
        print(json.dumps(_case_child(c["path"], c["modes"], c["iterations"], c["threads"], c["backend"],
                                     c.get("spatial", True))))
        return 0
    if args.overlap:
        print(f"# DM against PtyPy, {args.overlap} iterations, threads {args.threads}; simulation costs in photon "
              f"units (cost / gain), object NRMSE against the truth", flush=True)
        for r in bench_overlap(args.overlap, args.threads, args.overlap_settings, args.overlap_cases):
            extra = (f"corr with PtyPy {r['corr']:.4f} (contrast {r['corr_ramp']:.4f}), PtyPy cost "
                     f"{r['peer_cost']:.4f}") if "corr" in r else f"NRMSE {r['nrmse']:.4f}"
            print(f"{r['case']:<36} {r['setting']:<31} {r['seconds']:7.1f} s  rounds {r['rounds']:4.2f}  "
                  f"cost {r['cost']:.4f}  {extra}", flush=True)
    if args.star_ml:
        for r in bench_star_ml(args.star_ml):
            print(f"Siemens star {r['algorithm']:<14} {r['seconds']:7.1f} s  cost {r['cost']:.4f}", flush=True)
    if args.star_positions:
        for r in bench_star_positions(args.star_positions):
            print(f"Siemens star positions ({r['method']}, {args.star_positions} it): {r['seconds']:.1f} s, RMS "
                  f"{r['nominal_rms']:.2f} -> {r['refined_rms']:.2f} px, scale {r['scale'][0]:.4f} "
                  f"{r['scale'][1]:.4f}, correlation {r['correlation']:.4f}, cost {r['cost']:.4f} "
                  f"(unperturbed {r['cost_unperturbed']:.4f})", flush=True)
    if not args.json:
        print(f"# hxn-ptycho CPU benchmark, {available_cores()} cores, threads {args.threads}, backend {args.backend}")
        print("n     views  modes  s/iter   frames*it/s  FFT-only s  ratio  peak RSS GB  exit waves GB  data GB  load")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "scan.h5")
        for m in args.modes:
            r = bench_case(args.n, args.views, m, args.iterations, args.threads, args.backend, path,
                           not args.given_order)
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                print(f"{r['n']:<5} {r['views']:<6} {r['probe_modes']:<6} {r['s_per_iter']:<8.3f} "
                      f"{r['frames_iterations_per_s']:<12.0f} {r['fft_floor_s']:<11.3f} {r['ratio_to_fft_floor']:<6.2f} "
                      f"{r['peak_rss_gb']:<12.2f} {r['exit_waves_gb']:<14.2f} {r['data_gb']:<8.2f} "
                      f"{r['load_avg_1min']:.1f}", flush=True)
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
