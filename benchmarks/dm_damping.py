"""DM's damping at high counts (issue 18, part 1): misfit and object NRMSE of the issue's two
high-count scans, and the noise-limited guards, for one or more values of ``dm_relax_floor``.

    nice -n 5 python benchmarks/dm_damping.py [--floors 0,0.15] [--cases mix,psf,sim1,sim3] [--beta 0.8]
        [--ptypy-bound]

"misfit" is the result's ``final_cost`` (mean over frames and good pixels of (|F(P·O)| − √I)²,
photon-noise level 0.25); NRMSE is the object's against the truth over the illuminated region.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from hxn_ptycho.engine import reconstruct
from hxn_ptycho.metrics import illuminated_region, nrmse
from hxn_ptycho.params import ReconParams
from hxn_ptycho.simulate import simulate_scan


def gaussian_psf(frames: np.ndarray, sigma_px: float) -> np.ndarray:
    """Each frame convolved (circularly) with a Gaussian of ``sigma_px`` detector pixels."""
    n = frames.shape[-1]
    k = np.fft.fftfreq(n)
    otf = np.exp(-2 * (np.pi * sigma_px) ** 2 * (k[:, None] ** 2 + k[None, :] ** 2))
    return np.fft.ifft2(np.fft.fft2(frames) * otf).real.clip(0)


def mixture_scan() -> tuple[Any, Any]:
    """The issue's first case: six orthogonal modes, 10⁸ photons, reconstructed with 3."""
    return simulate_scan(n=64, n_positions=200, probe_modes=6, photons=1e8, seed=5,
                         mode_powers=(0.4, 0.2, 0.15, 0.1, 0.1, 0.05))


def psf_scan(photons: float = 1e8, sigma_px: float = 0.7, seed: int = 2) -> tuple[Any, Any]:
    """The issue's second case: the 3-mode blur scan (tests' sim3) at ``photons``, its intensities
    convolved with a Gaussian detector point spread of ``sigma_px`` before the Poisson noise."""
    scan, truth = simulate_scan(n=64, n_positions=150, probe_modes=3, photons=None, seed=seed, blur_px=2.5)
    inten = np.square(scan.diffamp.astype(np.float64)) * (photons / 1e6)   # photons=None simulates 10⁶
    inten = np.random.default_rng(seed + 77).poisson(gaussian_psf(inten, sigma_px)).astype(np.float64)
    scan.diffamp = np.sqrt(inten).astype(np.float32)
    return scan, truth


CASES = {
    "mix": (mixture_scan, dict(iterations=200, probe_modes=3)),
    "psf": (psf_scan, dict(iterations=200, probe_modes=3)),
    "sim1": (lambda: simulate_scan(n=64, n_positions=120, probe_modes=1, photons=1e6, seed=11),
             dict(iterations=80)),
    "sim3": (lambda: simulate_scan(n=64, n_positions=150, probe_modes=3, photons=1e6, seed=2, blur_px=2.5),
             dict(iterations=150, probe_modes=3)),
}


def ptypy_bound(scan: Any, relax: float = 0.05) -> dict[str, float]:
    """PtyPy's DM power bound (0.25 · fourier_relax_factor² · max_j ΣI_j / pixels) in data units."""
    power = np.sum(np.square(scan.diffamp, dtype=np.float64), axis=(1, 2))
    return {"power_bound": 0.25 * relax ** 2 * float(power.max()) / scan.diffamp[0].size, "detector_gain": 1.0}


def run_case(name: str, floor: float | None, beta: float = 1.0, ptypy: bool = False) -> dict[str, float]:
    make, kw = CASES[name]
    scan, truth = make()
    extra: dict[str, Any] = {} if floor is None else {"dm_relax_floor": floor}
    extra["beta"] = beta
    if ptypy:
        extra.update(ptypy_bound(scan))
    t0 = time.perf_counter()
    res = reconstruct(scan, ReconParams(**kw, **extra), log=lambda m: None)
    dt = time.perf_counter() - t0
    region = illuminated_region(truth.positions_px, truth.probe, truth.object.shape)
    relax = getattr(res, "error_relax", None)
    return {"misfit": float(res.attrs["final_cost"]), "nrmse": nrmse(res.object[0], truth.object, region),
            "mean_r_last": float(relax[-1]) if relax is not None and len(relax) else float("nan"),
            "mean_r_min": float(np.nanmin(relax)) if relax is not None and len(relax) else float("nan"),
            "seconds": dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--floors", default="default", help="comma-separated dm_relax_floor values ('default')")
    ap.add_argument("--cases", default="mix,psf,sim1,sim3")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--ptypy-bound", action="store_true", help="PtyPy's power bound (scales with the counts)")
    a = ap.parse_args()
    floors = [None if f == "default" else float(f) for f in a.floors.split(",")]
    for name in a.cases.split(","):
        for f in floors:
            r = run_case(name, f, a.beta, a.ptypy_bound)
            tag = f"{name:5s} floor={f!s:8s} beta={a.beta} {'PtyPy bound ' if a.ptypy_bound else ''}"
            print(f"{tag}misfit {r['misfit']:.4g}  NRMSE {r['nrmse']:.4f}  "
                  f"mean r last {r['mean_r_last']:.3f} (min {r['mean_r_min']:.3f})  {r['seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
