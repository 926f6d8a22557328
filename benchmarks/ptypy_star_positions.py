"""A peer on the star's positions: PtyPy's DM with its own position refinement, on the same scan.

    python benchmarks/ptypy_star_positions.py [--positions perturbed file] [--iterations 200]

Needs PtyPy beside hxn-ptycho (it is not on PyPI; it was run unmodified, ptycho/ptypy at 1681bec:
``git clone https://github.com/ptycho/ptypy && pip install --no-deps ./ptypy`` in a venv with
numpy, scipy and h5py, then ``PYTHONPATH=. python benchmarks/ptypy_star_positions.py``).

The measured Siemens star with the file's positions, or with those of ``perturbed_positions``
(scale 1.02 + 3 px RMS, seed 0) — the same start as ``star_positions_figure.py``. PtyPy's DM with
the settings of the shared peer results (``alpha=1``, probe from iteration 2, overlap loop 0.05 /
10, inertia 1e-9 / 1e-4, Fourier relaxation 0.05, the file's probe guess scaled to the data) and
its position refinement: the annealing search (``nshifts`` random moves within ``--amplitude``
pixels, shrinking to 0, kept when the Fourier error falls; at most ``--max-shift`` from the start),
iterations ``--start`` to ``--stop``. PtyPy has no global affine term. Prints the refined positions
against the file's (as ``star_positions_checks.py`` does), the cost Σ(|F(P·O)| − √I)² / pixels and
the time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from hxn_ptycho.datasets import perturbed_positions, siemens_star

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ptypy_star import RES
from star_positions_checks import STAR, against



def run_ptypy(frames: np.ndarray, positions_rc: np.ndarray, probe: np.ndarray, args: argparse.Namespace,
              refine: bool) -> tuple[np.ndarray, float, float]:
    """PtyPy's DM on ``frames`` (FFT-shifted, as the star's); returns the final window corners (row, col)
    in object pixels, the cost and the seconds."""
    from ptypy import utils as u
    from ptypy.core import Ptycho
    from ptypy_star import register_star_scan, star_data_params
    register_star_scan(frames, positions_rc)
    p = u.Param()
    p.verbose_level = "critical"
    p.io = u.Param(home="/tmp/ptypy_star/", rfile=None, autosave=u.Param(active=False),
                   autoplot=u.Param(active=False), interaction=u.Param(active=False))
    p.scans = u.Param(star=u.Param(name="Full"))
    p.scans.star.data = star_data_params(u, frames)
    p.scans.star.illumination = u.Param(model=probe.astype(np.complex128), photons=float(frames.sum((1, 2)).mean()),
                                        aperture=None, propagation=None, diversity=None)
    p.scans.star.coherence = u.Param(num_probe_modes=1, num_object_modes=1)
    e = u.Param(name="DM", numiter=args.iterations, alpha=1, probe_update_start=2, overlap_converge_factor=0.05,
                overlap_max_iterations=10, probe_inertia=1e-9, object_inertia=1e-4, fourier_relax_factor=0.05,
                obj_smooth_std=None, clip_object=None, probe_support=None)
    if refine:
        e.position_refinement = u.Param(start=args.start, stop=args.stop, interval=1, nshifts=args.nshifts,
                                        amplitude=args.amplitude * RES, max_shift=args.max_shift * RES,
                                        method="Annealing", metric="fourier", record=False)
    p.engines = u.Param(e0=e)
    t = time.time()
    ptycho = Ptycho(p, level=5)
    seconds = time.time() - t
    pods = sorted(ptycho.pods.values(), key=lambda pod: pod.di_view.layer)      # the frames' order
    corners = np.array([pod.ob_view.coord for pod in pods]) / RES
    cost = float(np.mean([np.mean((np.abs(np.fft.fft2(pod.probe * pod.object, norm="ortho"))
                                   - np.sqrt(frames[pod.di_view.layer])) ** 2) for pod in pods]))
    return corners, cost, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", nargs="+", default=["perturbed", "file"], choices=["perturbed", "file"])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--start", type=int, default=20)
    ap.add_argument("--stop", type=int, default=180)
    ap.add_argument("--nshifts", type=int, default=8)
    ap.add_argument("--amplitude", type=float, default=3.0, help="first search radius (pixels)")
    ap.add_argument("--max-shift", type=float, default=8.0, help="largest move from the start (pixels)")
    ap.add_argument("--no-refine", action="store_true")
    ap.add_argument("--star", type=Path, default=STAR)
    args = ap.parse_args()
    scan = siemens_star(args.star)
    frames = scan.diffamp.astype(np.float64) ** 2
    file_pos = np.stack([scan.points[1], scan.points[0]], axis=1)
    for name in args.positions:
        start = scan if name == "file" else perturbed_positions(scan, 1.02, 3.0, seed=0)
        pos = np.stack([start.points[1], start.points[0]], axis=1)
        corners, cost, seconds = run_ptypy(frames, pos, scan.probe_guess, args, refine=not args.no_refine)
        print(f"PtyPy DM {args.iterations}, {'no refinement' if args.no_refine else 'annealing refinement'}, "
              f"from the {name} positions: started {against(file_pos, pos)}; ended {against(file_pos, corners)}; "
              f"cost {cost:.4f}; {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
