"""Quality figures: NRMSE of a reconstruction against the truth, after removing the ambiguities.

Ptychography determines the object only up to a global complex scale, a shift (traded with the
probe) and a linear phase ramp (also traded with the probe). :func:`nrmse` removes all three —
the shift by cross-correlation registration without phase normalisation — and compares over
the well-illuminated region.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .registration import fourier_shift, register_shift


def illumination(positions_px: np.ndarray, probe: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Σ_j Σ_k |P_k(r − r_j)|² over the object array."""
    probe = probe.reshape(-1, *probe.shape[-2:])
    n = probe.shape[-1]
    inten = np.sum(np.abs(probe) ** 2, axis=0)
    out = np.zeros(shape)
    for r, c in np.round(positions_px).astype(int):
        out[r:r + n, c:c + n] += inten
    return out


def illuminated_region(positions_px: np.ndarray, probe: np.ndarray, shape: tuple[int, int],
                       threshold: float = 0.3) -> np.ndarray:
    """Pixels whose illumination is at least ``threshold`` of the maximum."""
    ill = illumination(positions_px, probe, shape)
    return ill >= threshold * ill.max()


def remove_phase_ramp(img: np.ndarray, ref: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``img`` times the linear phase ramp (and constant) that best matches ``ref`` on ``region``."""
    z = ref * np.conj(img)
    rows, cols = np.nonzero(region)
    w = np.abs(z[rows, cols])
    c0 = np.sum(z[rows, cols])
    phase = np.angle(z[rows, cols] * np.conj(c0))
    A = np.stack([rows - rows.mean(), cols - cols.mean(), np.ones_like(rows, dtype=float)], axis=1)
    coef, *_ = np.linalg.lstsq(A * w[:, None], phase * w, rcond=None)
    yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
    ramp = coef[0] * (yy - rows.mean()) + coef[1] * (xx - cols.mean()) + coef[2] + np.angle(c0)
    return img * np.exp(1j * ramp)


def nrmse(recon: np.ndarray, truth: np.ndarray, region: np.ndarray | None = None) -> float:
    """‖c·R − T‖ / ‖T‖ over ``region`` after registration, phase-ramp removal and the best complex c."""
    recon = np.asarray(recon, np.complex128)
    truth = np.asarray(truth, np.complex128)
    if recon.shape != truth.shape:
        raise ValueError(f"nrmse needs equal shapes, got {recon.shape} and {truth.shape}")
    if region is None:
        region = np.ones(truth.shape, bool)
    rr = np.where(region, recon, 0)
    tt = np.where(region, truth, 0)
    shift = register_shift(tt, rr, upsample=20)
    aligned = fourier_shift(recon, shift)
    aligned = remove_phase_ramp(aligned, truth, region)
    a, t = aligned[region], truth[region]
    c = np.vdot(a, t) / max(np.vdot(a, a).real, 1e-300)
    return float(np.linalg.norm(c * a - t) / np.linalg.norm(t))


def shifted_correlation(a: np.ndarray, b: np.ndarray, shift_px: np.ndarray, region: np.ndarray
                        ) -> tuple[float, np.ndarray]:
    """|<a, b'>| / (|a| |b'|) over ``region`` and b' itself: ``b`` moved by the whole-pixel part of
    ``shift_px`` (the offset of its frame from ``a``'s; ones where it has no pixels), then registered
    on ``a`` sub-pixel and given ``a``'s global phase."""
    off = np.round(shift_px).astype(int)
    b2 = np.ones_like(a)
    src = b[max(off[0], 0):, max(off[1], 0):]
    r, c = max(-off[0], 0), max(-off[1], 0)
    h, w = min(a.shape[0] - r, src.shape[0]), min(a.shape[1] - c, src.shape[1])
    b2[r:r + h, c:c + w] = src[:h, :w]
    b3 = fourier_shift(b2, register_shift(np.where(region, a, 0), np.where(region, b2, 0), upsample=20))
    x, y = a[region], b3[region]
    dot = np.vdot(y, x)
    return float(abs(dot) / np.linalg.norm(x) / np.linalg.norm(y)), b3 * np.exp(1j * np.angle(dot))


def position_rms(est: np.ndarray, truth: np.ndarray) -> float:
    """RMS distance (px) of positions ``est`` from ``truth`` (both (n, 2)) after removing the mean
    offset (a global shift is traded with the object)."""
    d = np.asarray(est, float) - np.asarray(truth, float)
    d = d - d.mean(axis=0)
    return float(np.sqrt(np.mean(np.sum(d ** 2, axis=1))))


def object_in_truth_frame(res: Any, truth: Any, positions: np.ndarray) -> np.ndarray:
    """The first object layer of a reconstruction ``res`` (``.object``) cropped into a simulation's
    frame ``truth`` (``.object``, ``.positions_px``), shifted by the mean position offset (ones
    where the reconstruction does not reach)."""
    off = np.round((np.asarray(positions) - truth.positions_px).mean(axis=0)).astype(int)
    H, W = truth.object.shape
    crop = np.ones((H, W), complex)
    src = res.object[0][max(off[0], 0):, max(off[1], 0):]
    r, c = max(-off[0], 0), max(-off[1], 0)
    h, w = min(H - r, src.shape[0]), min(W - c, src.shape[1])
    crop[r:r + h, c:c + w] = src[:h, :w]
    return crop


def object_error(res: Any, truth: Any, positions: np.ndarray) -> float:
    """Object NRMSE of a reconstruction ``res`` (``.object``) in a simulation's frame ``truth``
    (``.object``, ``.probe``, ``.positions_px``): shifted by the mean position offset, then
    registered over the truth's illuminated region."""
    crop = object_in_truth_frame(res, truth, positions)
    region = illuminated_region(truth.positions_px, truth.probe, truth.object.shape)
    return nrmse(crop, truth.object, region)
