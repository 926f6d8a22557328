"""Do the data fix the layout's global scale? (issue 18 part 3, the two probes where the object misses)

Reconstructs a scan from its *true* positions and from the true positions scaled about their mean
(isotropically and along rows or columns alone), refinement off, the same iterations, and prints
each run's final data error (the engine's ``final_cost``) and object NRMSE — plain, and after
resampling the object by the inverse of the layout's scale (``nrmse_unscaled``: what is left once
the scale is taken out), and with the scale fitted to the object (``nrmse_fit``, ``fit``). With
``--refined`` the default coarse-stage refinement from the heavy-tailed nominal positions runs too,
scored the same way (its layout's least-squares scale against the truth and the object's NRMSE with
the scale taken out).

    nice -n 5 python benchmarks/position_scale.py --family zernike --scales 1,1.01,1.02,0.99 \
        --aniso 1.02:1,1:1.02 [--refined [--pixel-check off]]
    nice -n 5 python benchmarks/position_scale.py --family defocus --seed 4 --scales 1 --refined

(``--scales 1``: the true-position run, the reference of the refined run's object error.)

One JSON line per run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import affine_transform

sys.path.insert(0, str(Path(__file__).resolve().parent))
from position_search import heavy_scan, mixture_heavy_scan

from hxn_ptycho.engine import reconstruct
from hxn_ptycho.metrics import illuminated_region, nrmse, object_error, object_in_truth_frame, position_rms
from hxn_ptycho.params import ReconParams


def scaled(scan, s_rows: float, s_cols: float):
    """The scan with its positions scaled about their mean (points are (x = columns, y = rows))."""
    p = np.array(scan.points, float)
    m = p.mean(axis=1, keepdims=True)
    p = m + (p - m) * np.array([[s_cols], [s_rows]])
    return dataclasses.replace(scan, points=p)


def layout_scale(pos: np.ndarray, truth: np.ndarray) -> list[float]:
    """Least-squares scale of ``pos`` against ``truth`` along rows and columns (both centred)."""
    a, b = pos - pos.mean(axis=0), truth - truth.mean(axis=0)
    return [float(np.sum(a[:, i] * b[:, i]) / np.sum(b[:, i] ** 2)) for i in (0, 1)]


def nrmse_scaled(crop: np.ndarray, truth, s: tuple[float, float]) -> float:
    """NRMSE of ``crop`` (painted by a layout ``s`` times the truth's about the views' centre) after
    resampling it back to the truth's scale: out(y) = crop(c + s·(y − c))."""
    n = truth.probe.shape[-1]
    c = truth.positions_px.mean(axis=0) + n / 2
    mat = np.diag(s)
    offset = c - mat @ c
    back = (affine_transform(crop.real, mat, offset, order=3, mode="nearest")
            + 1j * affine_transform(crop.imag, mat, offset, order=3, mode="nearest"))
    region = illuminated_region(truth.positions_px, truth.probe, truth.object.shape)
    return nrmse(back, truth.object, region)


def fit_scale(crop: np.ndarray, truth, start: tuple[float, float]) -> tuple[list[float], float]:
    """The (rows, cols) scale minimising :func:`nrmse_scaled`: coordinate descent, steps 0.4 % → 0.05 %."""
    best = list(start)
    e = nrmse_scaled(crop, truth, tuple(best))
    for step in (0.004, 0.002, 0.001, 0.0005):
        improved = True
        while improved:
            improved = False
            for axis in (0, 1):
                for sign in (-1, 1):
                    cand = list(best)
                    cand[axis] += sign * step
                    ec = nrmse_scaled(crop, truth, tuple(cand))
                    if ec < e - 1e-6:
                        best, e, improved = cand, ec, True
    return [round(v, 4) for v in best], e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="zernike", help="a tests/mode_mixtures.py family, or 'sim'")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--views", type=int, default=100)
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--scales", default="1,1.01,1.02", help="isotropic scales of the true layout")
    ap.add_argument("--aniso", default="", help="rows:cols pairs, comma separated")
    ap.add_argument("--refined", action="store_true", help="also the default refinement from the nominal")
    ap.add_argument("--pixel-check", default="on", choices=("on", "off"),
                    help="with --refined: PositionRefiner.check_pixels after the layout's choice (on by default)")
    a = ap.parse_args()
    if a.family == "sim":
        scan, exact, truth, err = heavy_scan(a.seed, a.views)
    else:
        scan, exact, truth, err = mixture_heavy_scan(a.family, a.seed, a.views)
    cases = [(float(s), float(s)) for s in a.scales.split(",") if s]
    cases += [tuple(float(v) for v in pair.split(":")) for pair in a.aniso.split(",") if pair]
    q = lambda m: None  # noqa: E731
    for s_r, s_c in cases:
        t0 = time.perf_counter()
        res = reconstruct(scaled(exact, s_r, s_c), ReconParams(iterations=a.iterations), log=q)
        crop = object_in_truth_frame(res, truth, res.positions_px)
        fit, e_fit = fit_scale(crop, truth, (s_r, s_c))
        print(json.dumps({"family": a.family, "seed": a.seed, "scale": [s_r, s_c],
                          "cost": round(float(res.attrs["final_cost"]), 5),
                          "data_error": float(res.attrs["final_data_error"]),
                          "nrmse": round(object_error(res, truth, res.positions_px), 4),
                          "nrmse_unscaled": round(nrmse_scaled(crop, truth, (s_r, s_c)), 4),
                          "fit": fit, "nrmse_fit": round(e_fit, 4),
                          "s": round(time.perf_counter() - t0, 1)}), flush=True)
    if a.refined:
        t0 = time.perf_counter()
        p = ReconParams(iterations=a.iterations, refine_positions=True, position_start=20,
                        position_end=int(0.7 * a.iterations), position_max_shift=32.0, position_search_radius=32.0)
        from hxn_ptycho.positions import PositionRefiner
        PositionRefiner.pixel_check = a.pixel_check == "on"
        try:
            res = reconstruct(scan, p, log=q)
        finally:
            PositionRefiner.pixel_check = True
        pos = res.positions_refined_px
        s = layout_scale(pos, truth.positions_px)
        crop = object_in_truth_frame(res, truth, pos)
        fit, e_fit = fit_scale(crop, truth, tuple(s))
        print(json.dumps({"family": a.family, "seed": a.seed, "refined": True,
                          "pos_rms": round(position_rms(pos, truth.positions_px), 3),
                          "layout_scale": [round(v, 4) for v in s],
                          "cost": round(float(res.attrs["final_cost"]), 5),
                          "data_error": float(res.attrs["final_data_error"]),
                          "nrmse": round(object_error(res, truth, pos), 4),
                          "nrmse_unscaled": round(nrmse_scaled(crop, truth, tuple(s)), 4),
                          "fit": fit, "nrmse_fit": round(e_fit, 4), "pixel_check": a.pixel_check,
                          **{k[9:]: v for k, v in res.attrs.items()
                             if k.startswith(("position_scale", "position_pixel", "position_probe"))},
                          "s": round(time.perf_counter() - t0, 1)}, default=lambda v: round(float(v), 5)), flush=True)


if __name__ == "__main__":
    main()
