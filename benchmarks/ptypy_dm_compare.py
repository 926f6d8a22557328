"""PtyPy's DM on 2 MPI ranks against ours on the same 2 cores, interleaved in one run, on the Siemens star.

    python benchmarks/ptypy_dm_compare.py --ptypy-python /work/wt/ptypy-venv/bin/python \\
        [--iterations 100] [--modes 1 3] [--repeats 1] [--json]

PtyPy is not a dependency: install it from its public source in a side environment (ptycho/ptypy at
1681bec, run unmodified: ``python3 -m venv ptypy-venv && ptypy-venv/bin/pip install numpy scipy h5py
mpi4py mpich && ptypy-venv/bin/pip install --no-deps ./ptypy``) and name that environment's Python.
Its ``mpiexec`` (the ``mpich`` wheel's, beside that Python) starts PtyPy on ``--ranks`` ranks (one
thread each: ``OMP_NUM_THREADS=1``), the best a user of PtyPy's CPU engine can pick on 2 cores.

PtyPy runs with the settings of the shared peer results (``peer_ptypy_dm200_*.npz``: ``alpha=1``,
probe from iteration 2, overlap loop 0.05 / 10, inertia 1e-9 / 1e-4, Fourier relaxation 0.05, the
file's probe guess scaled to the data, extra modes with diversity noise (0.5, 1.0) and power 0.1).
Ours runs in this process with ``--threads`` worker threads (the numba backend), first with its
defaults (what a user gets), then with PtyPy's settings (``benchmarks/cpu_bench.py``'s "ptypy"
setting: β 1, overlap loop 0.05 / 10, PtyPy's power bound); its FFTs are ``scipy.fft``'s unless
``HXN_PTYCHO_FFT=fftw`` is set (FFTW through pyfftw: ``pip install -e ".[fftw]"``), which each
result names (``fft_library``); PtyPy then runs on FFTW too (its ``ffttype``; ``--ptypy-ffttype``
overrides), so both sides use the same FFT library. The cases alternate — PtyPy 1 mode, ours
1 mode, PtyPy 3 modes, ours 3 modes, repeated ``--repeats`` times — so that all see the same load.

Each figure is the wall time of the whole reconstruction inside the process (PtyPy's
``Ptycho(p, level=5)``: data preparation, initialisation and iterations; ours: ``Reconstruction``
and ``run``), without the interpreter's start, and the cost ``mean over frames and pixels of
(|F(P·O)| − √I)²`` (orthonormal FFT, modes summed incoherently) of the final model, PtyPy's summed
over its ranks. The 1-minute load average is printed with each. With ``--to-cost`` (default) ours is
also run, and timed, for as many iterations as it needs to reach PtyPy's final cost (the first
iteration whose model's cost is at most PtyPy's): the time to an equal cost. ``--baseline-python
PY`` (repeatable) also runs ours with another environment's code — e.g. ``/work/venv/bin/python``,
whose ``hxn_ptycho`` is the main branch's checkout — right after ours, each in a fresh process, so a
change is measured against the code before it in the same interleaved run.
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



def _star_path() -> Path:
    here = Path(__file__).resolve()
    for up in here.parents:
        p = up / "shared" / "data" / "siemens-star-small" / "siemens-star-small.npz.bz2"
        if p.exists():
            return p
    return Path("/work/shared/data/siemens-star-small/siemens-star-small.npz.bz2")


# --- PtyPy's side: runs under mpiexec in the PtyPy environment (no hxn_ptycho import) ----------------
def ptypy_child(npz: str, modes: int, iterations: int, out: str, ffttype: str = "scipy") -> None:
    from ptypy import utils as u
    from ptypy.core import Ptycho
    from ptypy_star import register_star_scan, star_data_params
    from ptypy.utils import parallel

    d = np.load(npz)
    frames, positions_rc, probe = d["frames"], d["positions_rc"], d["probe"]
    n = frames.shape[-1]
    register_star_scan(frames, positions_rc)
    p = u.Param()
    p.verbose_level = "critical"
    p.io = u.Param(home=tempfile.mkdtemp(prefix="ptypy_dm_"), rfile=None, autosave=u.Param(active=False),
                   autoplot=u.Param(active=False), interaction=u.Param(active=False))
    p.scans = u.Param(star=u.Param(name="Full"))
    p.scans.star.data = star_data_params(u, frames)
    diversity = u.Param(noise=(0.5, 1.0), power=0.1) if modes > 1 else None
    p.scans.star.illumination = u.Param(model=probe.astype(np.complex128), photons=float(frames.sum((1, 2)).mean()),
                                        aperture=None, propagation=None, diversity=diversity)
    p.scans.star.coherence = u.Param(num_probe_modes=modes, num_object_modes=1)
    p.scans.star.ffttype = ffttype      # PtyPy's own FFT choice: scipy (its default) or fftw (pyfftw)
    p.engines = u.Param(e0=u.Param(name="DM", numiter=iterations, alpha=1, probe_update_start=2,
                                   overlap_converge_factor=0.05, overlap_max_iterations=10, probe_inertia=1e-9,
                                   object_inertia=1e-4, fourier_relax_factor=0.05, obj_smooth_std=None,
                                   clip_object=None, probe_support=None))
    parallel.barrier()
    t = time.time()
    ptycho = Ptycho(p, level=5)
    seconds = time.time() - t
    # the cost of the final model over this rank's frames: modes summed per diffraction view
    model: dict = {}
    for pod in ptycho.pods.values():
        if not pod.active:
            continue
        f = np.fft.fft2(pod.probe * pod.object, norm="ortho")
        key = pod.di_view.ID
        inten = model.get(key, (0.0, pod))[0] + np.abs(f) ** 2
        model[key] = (inten, pod)
    acc = np.zeros(2)
    for inten, pod in model.values():
        meas = np.fft.ifftshift(np.asarray(pod.diff, np.float64))           # back to frequency 0 at [0, 0]
        acc[0] += float(np.sum((np.sqrt(inten) - np.sqrt(np.maximum(meas, 0))) ** 2))
        acc[1] += meas.size
    acc = parallel.allreduce(acc)
    t_all = np.array([seconds])
    t_all = parallel.allreduce(t_all) / parallel.size
    if parallel.master:
        with open(out, "w") as fh:
            json.dump({"seconds": float(t_all[0]), "cost": float(acc[0] / acc[1]), "frames": int(acc[1] // (n * n)),
                       "ranks": parallel.size}, fh)


# --- our side ----------------------------------------------------------------------------------
def run_ptypy(python: str, ranks: int, npz: str, modes: int, iterations: int, ffttype: str = "scipy") -> dict:
    mpiexec = str(Path(python).parent / "mpiexec")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ptypy.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env.pop("PYTHONPATH", None)
        subprocess.run([mpiexec, "-n", str(ranks), python, __file__, "--_ptypy", npz, str(modes), str(iterations),
                        out, ffttype], check=True, env=env, stdout=subprocess.DEVNULL)
        with open(out) as fh:
            return json.load(fh)


def run_ours(scan, modes: int, iterations: int, threads: int, ptypy_settings: bool) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cpu_bench import OVERLAP_SETTINGS, overlap_params
    from hxn_ptycho.engine import Reconstruction
    from hxn_ptycho.params import ReconParams
    params = ReconParams(iterations=iterations, probe_modes=modes, threads=threads)
    if ptypy_settings:
        params = overlap_params(params, OVERLAP_SETTINGS["ptypy"][1], scan)
    # modules imported before the clock starts, as PtyPy's are in ptypy_child (numba is otherwise imported
    # lazily by the first backend); loading our kernels from numba's cache stays inside the timed part
    import hxn_ptycho.cpu_kernels  # noqa: F401
    t0 = time.perf_counter()
    rec = Reconstruction(scan, params, log=lambda m: None)
    res = rec.run()
    seconds = time.perf_counter() - t0
    # the cost of the model at each iteration: error_data is Σ(|F(P·O)| − √I)² / ΣI of that iteration's model
    costs = np.asarray(res.error_data) * rec.total_intensity / rec.good_pixels_total
    return {"seconds": seconds, "cost": float(res.attrs["final_cost"]), "backend": res.attrs["backend"],
            "fft_library": rec.be.fft_library,
            "costs": costs.tolist()}


def run_ours_in(python: str, star: Path, modes: int, iterations: int, threads: int) -> dict:
    """:func:`run_ours` (defaults) in a fresh process of another environment's Python — e.g. the main
    branch's checkout — timed the same way inside that process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ours.json")
        env = dict(os.environ)
        if python != sys.executable and os.environ.get("BASELINE_NUMBA_CACHE_DIR"):   # keep its numba cache apart
            env["NUMBA_CACHE_DIR"] = os.environ["BASELINE_NUMBA_CACHE_DIR"]
        subprocess.run([python, __file__, "--_ours", str(star), str(modes), str(iterations), str(threads), out],
                       check=True, stdout=subprocess.DEVNULL, env=env)
        with open(out) as fh:
            return json.load(fh)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ptypy-python", default="", help="the Python of the environment PtyPy is installed in")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--modes", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-ptypy-settings", action="store_true", help="ours with its defaults only")
    ap.add_argument("--to-cost", action=argparse.BooleanOptionalAction, default=True,
                    help="also time ours for as many iterations as it needs to reach PtyPy's final cost")
    ap.add_argument("--star", type=Path, default=_star_path())
    ap.add_argument("--ptypy-ffttype", choices=("scipy", "fftw"), default=None,
                    help="PtyPy's FFT library (default: fftw when HXN_PTYCHO_FFT=fftw, so both sides use the same, "
                         "else scipy); fftw needs pyfftw in PtyPy's environment")
    ap.add_argument("--baseline-python", action="append", default=[],
                    help="also run ours (defaults) with this Python's hxn_ptycho, e.g. another checkout's venv, "
                         "after ours; then ours runs in a fresh process too (both pay the kernels' loading)")
    ap.add_argument("--_ptypy", nargs=5, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_ours", nargs=5, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._ours:
        from hxn_ptycho.datasets import siemens_star
        star, modes, iterations, threads, out = args._ours
        r = run_ours(siemens_star(star), int(modes), int(iterations), int(threads), False)
        import hxn_ptycho
        r["code"] = str(Path(hxn_ptycho.__file__).resolve().parents[1])
        with open(out, "w") as fh:
            json.dump(r, fh)
        return 0
    if args._ptypy:
        npz, modes, iterations, out, ffttype = args._ptypy
        ptypy_child(npz, int(modes), int(iterations), out, ffttype)
        return 0
    if not args.ptypy_python:
        ap.error("--ptypy-python is required (PtyPy is not a dependency: see the module docstring)")
    ffttype = args.ptypy_ffttype or ("fftw" if os.environ.get("HXN_PTYCHO_FFT", "").lower() == "fftw" else "scipy")
    from hxn_ptycho.datasets import siemens_star
    scan = siemens_star(args.star)
    print(f"# PtyPy DM ({args.ranks} MPI ranks) against hxn-ptycho DM ({args.threads} threads), Siemens star, "
          f"{args.iterations} iterations, {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "star.npz")
        np.savez(npz, frames=scan.diffamp.astype(np.float64) ** 2,
                 positions_rc=np.stack([scan.points[1], scan.points[0]], axis=1), probe=scan.probe_guess)
        for rep in range(args.repeats):
            for modes in args.modes:
                runs: list = [("ptypy", None)] + [("hxn-ptycho", False)] + ([] if args.no_ptypy_settings else
                                                                           [("hxn-ptycho, PtyPy's settings", True)])
                if args.baseline_python:
                    runs[1] = ("hxn-ptycho", sys.executable)
                    runs[2:2] = [(f"hxn-ptycho ({py})", py) for py in args.baseline_python]
                ptypy_s, ptypy_cost = None, 0.0
                for name, settings in runs:
                    load0 = os.getloadavg()[0]
                    if settings is None:
                        r = run_ptypy(args.ptypy_python, args.ranks, npz, modes, args.iterations, ffttype)
                        ptypy_s, ptypy_cost = r["seconds"], r["cost"]
                    elif isinstance(settings, str):
                        r = run_ours_in(settings, args.star, modes, args.iterations, args.threads)
                    else:
                        r = run_ours(scan, modes, args.iterations, args.threads, settings)
                    if settings is None:
                        r["fft_library"] = ffttype
                    r.update({"impl": name, "probe_modes": modes, "iterations": args.iterations, "repeat": rep,
                              "load_avg_1min": (load0 + os.getloadavg()[0]) / 2})
                    costs = r.pop("costs", None)
                    if isinstance(settings, str):
                        settings = False
                    if settings is not None and ptypy_s:
                        r["ptypy_over_ours"] = ptypy_s / r["seconds"]
                        # the iterations ours needs to reach PtyPy's final cost, and that run timed on its own
                        below = np.nonzero(np.asarray(costs if costs is not None else []) <= ptypy_cost)[0]
                        if len(below) and args.to_cost and costs is not None:
                            k = int(below[0]) + 1
                            t = run_ours(scan, modes, k, args.threads, settings)
                            r.update({"iterations_to_ptypy_cost": k, "seconds_to_ptypy_cost": t["seconds"],
                                      "cost_at_those_iterations": t["cost"],
                                      "ptypy_over_ours_at_ptypy_cost": ptypy_s / t["seconds"]})
                    print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
