"""What the refined star positions mean: the README's checks beside the figure script.

    python benchmarks/star_positions_checks.py [--checks agree passes frozen] [--threads 2 1]

On the measured Siemens star with the positions of ``perturbed_positions`` (scale 1.02 + 3 px RMS,
seed 0), ``DM:80,ML:70`` with refinement at iterations 80–135 (the figure script's settings):

- ``agree``: refined from the perturbed positions and refined from the file's own, each against the
  file's (RMS after removing the mean translation; after removing an affine map; the fitted scale)
  and against each other — for each ``--threads`` (other rounding of the sums);
- ``passes``: three passes, each started from the positions the previous one refined (1 thread);
- ``frozen``: a first pass without refinement, then refinement from iteration 10 with that pass's
  probe frozen (1 thread);
- ``curvature``: the same refinement, from the perturbed and from the file's own positions, with
  the file's probe guess given other wavefront curvatures (its far field multiplied by
  exp(i·Δa·q²), Δa taking its quadratic phase to ``--curvatures`` rad/px²; the guess has
  0.0535, 0.0572 along rows, columns);
- ``hold``: a calibrated stage: the positions perturbed by 3 px RMS only (scale 1, seed 0), refined
  with a free scale and with ``position_hold_scale``, and the file's own positions refined with it.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from hxn_ptycho.datasets import perturbed_positions, siemens_star
from hxn_ptycho.engine import reconstruct
from hxn_ptycho.params import ReconParams
from hxn_ptycho.positions import affine_terms, fit_affine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from star_scale_curvature import far_field_curvature

STAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "siemens-star-small" / "siemens-star-small.npz.bz2"
QUIET = {"log": lambda m: None}


def rms(d: np.ndarray) -> float:
    d = d - d.mean(axis=0)
    return float(np.sqrt(np.mean(np.sum(d ** 2, axis=1))))


def against(ref: np.ndarray, est: np.ndarray) -> str:
    return (f"{rms(est - ref):.3f} px (not affine {rms(est - fit_affine(ref, est)):.3f}, "
            f"scale {np.diag(affine_terms(ref, est)).round(4).tolist()})")


def with_curvature(probe: np.ndarray, target: float) -> np.ndarray:
    """``probe`` with the quadratic phase of its far field set to ``target`` (rad/px²) along rows and columns."""
    n = probe.shape[0]
    q = np.fft.fftfreq(n) * n
    qr, qc = np.meshgrid(q, q, indexing="ij")
    a_r, a_c = far_field_curvature(probe)
    f = np.fft.fft2(probe) * np.exp(1j * ((target - a_r) * qr ** 2 + (target - a_c) * qc ** 2))
    return np.fft.ifft2(f).astype(probe.dtype)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checks", nargs="+", default=["agree", "passes", "frozen"])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--curvatures", type=float, nargs="+", default=[0.045, 0.038])
    ap.add_argument("--star", type=Path, default=STAR)
    args = ap.parse_args()
    scan = siemens_star(args.star)
    bad = perturbed_positions(scan, 1.02, 3.0, seed=0)
    file_pos = np.stack([scan.points[1], scan.points[0]], axis=1)      # (row, col) = (y, x), pixels = µm
    p = ReconParams(algorithm="DM:80,ML:70", refine_positions=True, position_start=80, position_end=135)
    if "agree" in args.checks:
        for t in args.threads:
            a = reconstruct(bad, p.replace(threads=t), **QUIET).positions_refined_px
            b = reconstruct(scan, p.replace(threads=t), **QUIET).positions_refined_px
            print(f"threads {t}: perturbed, refined vs file {against(file_pos, a)}; file's own, refined vs file "
                  f"{against(file_pos, b)}; the two refined sets {against(b, a)}", flush=True)
    if "passes" in args.checks:
        cur = bad
        for k in range(3):
            est = reconstruct(cur, p.replace(threads=1), **QUIET).positions_refined_px
            print(f"pass {k + 1}: vs file {against(file_pos, est)}", flush=True)
            cur = dataclasses.replace(cur, points=np.stack([est[:, 1], est[:, 0]]).astype(np.float64))
    if "frozen" in args.checks:
        first = reconstruct(bad, ReconParams(algorithm="DM:80,ML:70", threads=1), **QUIET)
        guess = dataclasses.replace(bad, probe_guess=first.probe[0])
        res = reconstruct(guess, p.replace(threads=1, probe_init="file", probe_update_start=10 ** 6,
                                           position_start=10), **QUIET)
        print(f"probe frozen from a first pass, refinement 10-135: vs file {against(file_pos, res.positions_refined_px)}",
              flush=True)
    if "curvature" in args.checks:
        for target in args.curvatures:
            for name, start in (("perturbed", bad), ("file's own", scan)):
                guess = dataclasses.replace(start, probe_guess=with_curvature(start.probe_guess, target))
                res = reconstruct(guess, p.replace(threads=args.threads[0]), **QUIET)
                a_r, a_c = far_field_curvature(res.probe[0])
                print(f"probe guess at {target:g} rad/px², from the {name} positions: vs file "
                      f"{against(file_pos, res.positions_refined_px)}, cost {res.attrs['final_cost']:.4f}, "
                      f"final probe {a_r:.4f}, {a_c:.4f}", flush=True)
    if "hold" in args.checks:
        random_only = perturbed_positions(scan, 1.0, 3.0, seed=0)
        t = args.threads[0]
        for name, start, hold in (("random errors only", random_only, False), ("random errors only", random_only, True),
                                  ("the file's own", scan, True)):
            res = reconstruct(start, p.replace(threads=t, position_hold_scale=hold), **QUIET)
            print(f"from {name} positions, scale {'held' if hold else 'free'}: vs file "
                  f"{against(file_pos, res.positions_refined_px)}, cost {res.attrs['final_cost']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
