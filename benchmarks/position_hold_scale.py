"""Holding a calibrated stage's scale, on simulations: the README's figures for --position-hold-scale.

    python benchmarks/position_hold_scale.py [--seeds 5 6 7]

The 64² simulation of ``tests/test_positions.py`` (120 views, 1e6 photons, seed 11) with random
position errors of 3 px RMS whose affine part (translation, scale, rotation, shear) is removed —
a stage with a calibrated scale — seeded by each ``--seeds``; refined (180 iterations, refinement
30–119) with the scale free and held. Prints the RMS distance of the refined positions from the
truth (mean translation removed), the linear map refined → nominal and the final cost.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from hxn_ptycho.engine import reconstruct
from hxn_ptycho.params import ReconParams
from hxn_ptycho.positions import affine_terms, fit_affine
from hxn_ptycho.simulate import simulate_scan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from star_positions_checks import rms

REFINE = ReconParams(iterations=180, refine_positions=True, position_start=30, position_end=119)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[5, 6, 7])
    args = ap.parse_args()
    exact, truth = simulate_scan(n=64, n_positions=120, probe_modes=1, photons=1e6, seed=11)
    pixel_um = exact.lambda_nm * 1e-9 * exact.z_m / (exact.n * exact.ccd_pixel_um * 1e-6) * 1e6
    print("seed  scale  RMS from truth (px)  map refined -> nominal        cost")
    for seed in args.seeds:
        err = np.random.default_rng(seed).standard_normal(truth.positions_px.shape) * 3.0 / np.sqrt(2)
        err -= fit_affine(truth.positions_px, err)
        scan = dataclasses.replace(exact, points=exact.points + np.stack([err[:, 1], err[:, 0]]) * pixel_um)
        for hold in (False, True):
            res = reconstruct(scan, REFINE.replace(position_hold_scale=hold), log=lambda m: None)
            est = res.positions_refined_px
            lin = np.round(affine_terms(est, res.positions_px), 4).tolist()
            print(f"{seed:<5} {'held' if hold else 'free':<6} {rms(est - truth.positions_px):<20.3f} "
                  f"{lin!s:<29} {res.attrs['final_cost']:.5f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
