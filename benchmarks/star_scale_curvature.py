"""The Siemens star's scan scale against its probe's curvature: the README's numbers.

    python benchmarks/star_scale_curvature.py [--algorithm DM:80,ML:40] [--scales 0.98 1.0 1.02]

Reconstructs the measured star (no position refinement) with the file's positions scaled about
their centre by each factor, and prints the final cost and the quadratic phase of the probe's far
field along rows and columns (fitted to the phase differences of neighbouring pixels over the
pupil, |F(P)| > 10 % of its peak; no unwrapping needed). A probe whose wavefront curvature follows
the scale means the data fix the scale only weakly.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from hxn_ptycho.datasets import siemens_star
from hxn_ptycho.engine import reconstruct
from hxn_ptycho.params import ReconParams

STAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "siemens-star-small" / "siemens-star-small.npz.bz2"


def far_field_curvature(probe: np.ndarray) -> tuple[float, float]:
    """Coefficient a (rad / pixel²) of a·q² in the phase of fftshift(F(P)), along rows and columns."""
    f = np.fft.fftshift(np.fft.fft2(probe, norm="ortho"))
    n = f.shape[0]
    q = np.arange(n) - n // 2
    qr, qc = np.meshgrid(q, q, indexing="ij")
    bright = np.abs(f) > 0.1 * np.abs(f).max()
    out = []
    for axis, qa in ((0, qr), (1, qc)):
        lo = [slice(None)] * 2
        hi = [slice(None)] * 2
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        step = np.angle(f[tuple(hi)] * np.conj(f[tuple(lo)]))       # = a·(2q + 1) + b
        use = bright[tuple(hi)] & bright[tuple(lo)]
        a = np.stack([(2 * qa[tuple(lo)] + 1)[use], np.ones(int(use.sum()))], axis=1)
        out.append(float(np.linalg.lstsq(a, step[use], rcond=None)[0][0]))
    return out[0], out[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithm", default="DM:80,ML:40")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.98, 1.0, 1.02])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--star", type=Path, default=STAR)
    args = ap.parse_args()
    scan = siemens_star(args.star)
    c = scan.points.mean(axis=1, keepdims=True)
    print("scale  cost     far-field quadratic phase (rad/px²): rows, columns")
    for s in args.scales:
        scaled = dataclasses.replace(scan, points=c + (scan.points - c) * s)
        res = reconstruct(scaled, ReconParams(algorithm=args.algorithm, threads=args.threads), log=lambda m: None)
        rows, cols = far_field_curvature(res.probe[0])
        print(f"{s:<6g} {res.attrs['final_cost']:.4f}   {rows:.5f}, {cols:.5f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
