"""The real APS Siemens star: the cost against the peers' metric, and the star itself."""
from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from hxn_ptycho.datasets import siemens_star
from hxn_ptycho.engine import reconstruct
from hxn_ptycho.params import ReconParams


def angular_spectrum(img: np.ndarray, centre: tuple[int, int], radii) -> np.ndarray:
    """Power of the angular harmonics of ``img`` on rings around ``centre``, summed over the rings."""
    theta = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    spec = 0.0
    for r in radii:
        y = np.round(centre[0] + r * np.sin(theta)).astype(int)
        x = np.round(centre[1] + r * np.cos(theta)).astype(int)
        v = img[y, x] - img[y, x].mean()
        spec = spec + np.abs(np.fft.rfft(v)) ** 2
    return spec


def peer_spoke_harmonic(png) -> int:
    """The dominant angular harmonic of the peer's phase image (right panel of its PNG)."""
    img = mpimg.imread(png)[..., :3].mean(axis=-1)
    panel = img[30:485, 632:1085]
    spec = angular_spectrum(panel, (panel.shape[0] // 2, panel.shape[1] // 2), range(80, 160, 4))
    return int(np.argmax(spec[5:]) + 5)


def test_siemens_star_cost_and_spokes(star_path):
    scan = siemens_star(star_path)
    res = reconstruct(scan, ReconParams(iterations=40), log=lambda m: None)
    cost = res.attrs["final_cost"]          # mean over frames and pixels of (|F(P·O)| − √I)², orthonormal FFT
    assert cost < 0.6, cost                 # the peers: tike rPIE 0.454 after 64 epochs, starts at 3.27
    phase = np.angle(res.object[0])
    centre = (phase.shape[0] // 2, phase.shape[1] // 2)
    spec = angular_spectrum(phase, centre, range(80, 160, 4))
    harmonic = int(np.argmax(spec[5:]) + 5)
    assert harmonic == peer_spoke_harmonic(star_path.parent / "peer_rpie64_object.png")
    assert spec[harmonic] > 50 * np.median(spec[5:])    # sharp spokes, not noise


def _rms(d: np.ndarray) -> float:
    """RMS length of the rows of ``d`` after removing their mean (a global translation is free)."""
    d = d - d.mean(axis=0)
    return float(np.sqrt(np.mean(np.sum(d ** 2, axis=1))))


def test_star_subset_random_position_errors_are_refined(star_path):
    """The 114 central views of the star, positions scaled by 1.02 plus 3 px RMS random errors;
    60 DM iterations, refinement 15–45 (~15 s).

    Measured: the non-affine part of the errors 3.01 → 1.41 px RMS (the positions' distance to an
    affine map of the file's). The raw RMS (3.22 → 3.98 px) is not asserted: on this small patch
    the global scale drifts (see the slow test and the README).
    """
    import dataclasses
    from hxn_ptycho.datasets import perturbed_positions
    from hxn_ptycho.positions import fit_affine
    scan = siemens_star(star_path)
    c = scan.points.mean(axis=1, keepdims=True)
    keep = np.all(np.abs(scan.points - c) < 80, axis=0)
    sub = dataclasses.replace(scan, diffamp=scan.diffamp[keep], points=scan.points[:, keep])
    bad = perturbed_positions(sub, 1.02, 3.0, seed=0)
    true = np.stack([sub.points[1], sub.points[0]], axis=1)
    res = reconstruct(bad, ReconParams(iterations=60, refine_positions=True, position_start=15, position_end=45),
                      log=lambda m: None)
    est, nominal = res.positions_refined_px, res.positions_px
    before, after = _rms(nominal - fit_affine(true, nominal)), _rms(est - fit_affine(true, est))
    assert before > 2.5 and after < 2.0, (before, after)


@pytest.mark.slow
def test_star_with_perturbed_positions_is_recovered(star_path):
    """Positions scaled by 1.02 plus 3 px RMS random errors; DM:80,ML:70, refinement 80–135 (in the
    ML stage, whose probe is closer to the truth: see the README); ~4 min on 2 shared cores.

    Measured (``benchmarks/star_positions_figure.py``, the same settings): positions 4.07 → 1.58 px RMS
    from the file's (mean translation removed), 1.03 px after removing an affine map; refined scale
    (1.010, 1.007) of the file's; object correlation 0.996, cost 0.321 (0.332 from the file's positions). "Within 1 px RMS of the file's
    positions" is not met: refining the file's own positions with the same settings moves them by
    1.96 px RMS (scale 0.988, 0.986) — the scale is a weakly observed mode that the probe's errors
    bias (README).
    """
    from hxn_ptycho.datasets import perturbed_positions
    from hxn_ptycho.metrics import illuminated_region, shifted_correlation
    from hxn_ptycho.positions import fit_affine
    scan = siemens_star(star_path)
    bad = perturbed_positions(scan, 1.02, 3.0, seed=0)
    true = np.stack([scan.points[1], scan.points[0]], axis=1)
    p = ReconParams(algorithm="DM:80,ML:70")
    ref = reconstruct(scan, p, log=lambda m: None)
    res = reconstruct(bad, p.replace(refine_positions=True, position_start=80, position_end=135),
                      log=lambda m: None)
    plain = reconstruct(bad, p, log=lambda m: None)
    region = illuminated_region(ref.positions_px, ref.probe, ref.object.shape[1:])
    base = (ref.positions_px - true).mean(0)
    corr, _ = shifted_correlation(ref.object[0], res.object[0], (res.positions_refined_px - true).mean(0) - base,
                                  region)
    corr_plain, _ = shifted_correlation(ref.object[0], plain.object[0], (plain.positions_px - true).mean(0) - base,
                                        region)
    assert corr >= 0.97 and corr > corr_plain, (corr, corr_plain)
    assert res.attrs["final_cost"] < plain.attrs["final_cost"]
    est = res.positions_refined_px
    raw, nominal = _rms(est - true), _rms(plain.positions_px - true)
    resid = _rms(est - fit_affine(true, est))
    assert raw < 2.0 and resid < 1.5 and nominal > 3.0, (raw, resid, nominal)
