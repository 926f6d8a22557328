"""Position refinement on heavy-tailed stage errors (issue 18, part 3).

Scans simulated with :func:`hxn_ptycho.simulate.heavy_tailed_errors` (a smooth drift plus heavy-tailed
jitter and slipped views: ≥ 6 px RMS, the worst ≥ 25 px) on several objects (seeds), reconstructed
several ways: from the true positions (``true``), from the nominal ones without refinement (``off``),
with the gradient refinement alone (``gradient``), with the coarse global stage first without and
with the growth in scan order (``coarse_nogrow``, ``coarse``) and with the probe's defocus chosen by
the growth before it (``defocus``, ``position_probe_defocus``).

    nice -n 5 python benchmarks/position_search.py [--seeds 1,2,3] [--views 100] [--iterations 150]
    nice -n 5 python benchmarks/position_search.py --family defocus --seeds 1 --ways true,off,default

(``--family``: another probe and object, a tests/mode_mixtures.py family's first mode on its own
object; ``default``: ``--refine-positions`` with the radius, every other option at its default.)

Prints the position error (RMS after removing the mean offset) and the object NRMSE of each.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from hxn_ptycho.engine import reconstruct
from hxn_ptycho.metrics import object_error, position_rms
from hxn_ptycho.params import ReconParams
from hxn_ptycho.simulate import heavy_tailed_errors, simulate_scan


def heavy_scan(seed: int, views: int, worst: float = 28.0, drift: float = 4.0, jitter: float = 2.0,
               outliers: float = 0.05):
    err = heavy_tailed_errors(views, seed=seed, worst_px=worst, drift_px=drift, jitter_px=jitter, outliers=outliers)
    scan, truth = simulate_scan(n=64, n_positions=views, probe_modes=1, photons=1e6, seed=seed,
                                position_errors=err)
    exact, _ = simulate_scan(n=64, n_positions=views, probe_modes=1, photons=1e6, seed=seed)
    return scan, exact, truth, err


def mixture_heavy_scan(family: str, seed: int, views: int, worst: float = 28.0, drift: float = 4.0,
                       jitter: float = 2.0, outliers: float = 0.05):
    """As :func:`heavy_scan` with another probe and object: the first mode of ``family`` from
    tests/mode_mixtures.py (e.g. ``defocus``: an annular lens at a quarter of the simulator's
    defocus; ``zernike``: an annular zone plate with astigmatism) on its independent object (disks
    of amplitude, a phase of filtered noise), one mode, 10⁶ photons a frame, a Fermat spiral."""
    import dataclasses
    import sys
    from pathlib import Path

    from hxn_ptycho.simulate import Truth
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from mode_mixtures import mixture_scan
    err = heavy_tailed_errors(views, seed=seed, worst_px=worst, drift_px=drift, jitter_px=jitter, outliers=outliers)
    exact, mix = mixture_scan(family, (1.0,), 1e6, seed=seed, n_positions=views)
    pixel_um = exact.lambda_nm * 1e-3 * exact.z_m / (exact.n * exact.ccd_pixel_um * 1e-6)
    corners = np.round(exact.points[::-1].T / pixel_um).astype(float)
    scan = dataclasses.replace(exact, points=exact.points + err[:, ::-1].T * pixel_um)
    return scan, exact, Truth(object=mix.object, probe=mix.probe, positions_px=corners), err


def params(iterations: int, radius: float, refine: bool = True, grow: bool = True,
           defocus: bool = False) -> ReconParams:
    return ReconParams(iterations=iterations, refine_positions=refine, position_start=20,
                       position_end=int(0.7 * iterations), position_max_shift=32.0,
                       position_search_radius=radius, position_grow=grow, position_probe_defocus=defocus)


def run(seed: int, views: int, iterations: int, ways: list[str], drift: float = 4.0, jitter: float = 2.0,
        outliers: float = 0.05, family: str = "sim") -> dict:
    if family == "sim":
        scan, exact, truth, err = heavy_scan(seed, views, drift=drift, jitter=jitter, outliers=outliers)
    else:
        scan, exact, truth, err = mixture_heavy_scan(family, seed, views, drift=drift, jitter=jitter,
                                                     outliers=outliers)
    d = np.hypot(*err.T)
    out = {"family": family, "seed": seed, "err_rms_axis": round(float(np.sqrt(np.mean(err ** 2))), 2), "err_max": round(float(d.max()), 1)}
    q = lambda m: None  # noqa: E731
    for way in ways:
        t0 = time.perf_counter()
        if way == "true":
            res = reconstruct(exact, params(iterations, 0, refine=False), log=q)
            pos = res.positions_px
        elif way == "off":
            res = reconstruct(scan, params(iterations, 0, refine=False), log=q)
            pos = res.positions_px
        elif way in ("default", "default_noastig"):   # --refine-positions with the radius, other options as they are
            from hxn_ptycho.positions import PositionRefiner
            PositionRefiner.probe_astigmatism = way == "default"
            try:
                res = reconstruct(scan, params(iterations, 0, refine=True).replace(
                    position_search_radius=32.0, position_grow=ReconParams.position_grow,
                    position_probe_defocus=ReconParams.position_probe_defocus), log=q)
            finally:
                PositionRefiner.probe_astigmatism = True
            pos = res.positions_refined_px
        else:
            res = reconstruct(scan, params(iterations, 0.0 if way == "gradient" else 32.0,
                                           grow=way in ("coarse", "defocus"), defocus=way == "defocus"), log=q)
            pos = res.positions_refined_px
        out[way] = {"pos_rms": round(position_rms(pos, truth.positions_px), 3),
                    "nrmse": round(object_error(res, truth, pos), 4),
                    "cost": round(float(res.attrs["final_cost"]), 4), "s": round(time.perf_counter() - t0, 1)}
        if "position_probe_defocus" in res.attrs:
            out[way]["defocus"] = res.attrs["position_probe_defocus"]
            out[way]["astigmatism"] = res.attrs.get("position_probe_astigmatism")
            out[way]["defocus_s"] = res.attrs.get("position_probe_defocus_seconds")
            pos_c = pos - pos.mean(axis=0)
            tru_c = truth.positions_px - truth.positions_px.mean(axis=0)
            out[way]["scale_rows_cols"] = [round(float(np.sum(pos_c[:, i] * tru_c[:, i]) / np.sum(tru_c[:, i] ** 2)), 4)
                                           for i in (0, 1)]
        if "position_scale" in res.attrs:
            out[way]["scale"] = res.attrs["position_scale"]
            out[way]["scale_s"] = res.attrs["position_scale_seconds"]
        if "position_scale_restarted" in res.attrs:   # (the model's, a fresh start's) error at the final corners
            out[way]["restarted"] = res.attrs["position_scale_restarted"]
        if "position_scale_judged" in res.attrs:      # the second search's map and the long re-fits' (first, second)
            out[way]["scale_second"] = res.attrs["position_scale_second"]
            out[way]["scale_judged"] = res.attrs["position_scale_judged"]
        if "position_pixel_judged" in res.attrs:      # the pixel check: (model, fresh start moved, proposed) each round
            out[way]["pixel_judged"] = res.attrs["position_pixel_judged"]
            out[way]["pixel_moved"] = res.attrs["position_pixel_moved"]
            out[way]["pixel_s"] = res.attrs["position_pixel_seconds"]
        if "position_reverted" in res.attrs:
            out[way]["reverted"] = res.attrs["position_reverted"]
            out[way]["rescued"] = res.attrs.get("position_rescued_at_end")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--views", type=int, default=100)
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--ways", default="true,off,gradient,coarse_nogrow,coarse")
    ap.add_argument("--drift", type=float, default=4.0, help="RMS per axis of the smooth drift (px)")
    ap.add_argument("--jitter", type=float, default=2.0, help="scale of the heavy-tailed jitter (px)")
    ap.add_argument("--family", default="sim", help="'sim' (the simulator's zone plate and star) or a "
                    "tests/mode_mixtures.py family's first mode on its own object (defocus, zernike, shifted)")
    ap.add_argument("--outliers", type=float, default=0.05, help="fraction of slipped views (12 px to the worst)")
    a = ap.parse_args()
    for seed in (int(s) for s in a.seeds.split(",")):
        r = run(seed, a.views, a.iterations, a.ways.split(","), a.drift, a.jitter, a.outliers, a.family)
        r.update(drift=a.drift, jitter=a.jitter, outliers=a.outliers, views=a.views, iterations=a.iterations)
        print(json.dumps(r, default=lambda v: round(float(v), 4)), flush=True)


if __name__ == "__main__":
    main()
