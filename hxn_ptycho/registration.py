"""Sub-pixel image registration by cross-correlation (matrix-multiply DFT upsampling).

The method of Guizar-Sicairos, Thurman & Fienup, Opt. Lett. 33, 156 (2008): the integer
peak of the cross-correlation, then a local upsampled DFT around it. Used by the metrics
(shift between a reconstruction and the truth) and by the stitching of async regions.
"""
from __future__ import annotations

import numpy as np


def _upsampled_dft(data: np.ndarray, region: int, upsample: int, offset: tuple[float, float]) -> np.ndarray:
    """DFT of ``data`` (already in Fourier space) on a ``region``² grid upsampled by ``upsample``
    around ``offset`` (in upsampled pixels)."""
    rows, cols = data.shape
    kc = np.fft.ifftshift(np.arange(cols)) - cols // 2
    kr = np.fft.ifftshift(np.arange(rows)) - rows // 2
    c_kernel = np.exp(-2j * np.pi / (cols * upsample) * np.outer(kc, np.arange(region) - offset[1]))
    r_kernel = np.exp(-2j * np.pi / (rows * upsample) * np.outer(np.arange(region) - offset[0], kr))
    return r_kernel @ data @ c_kernel


def register_shift(ref: np.ndarray, img: np.ndarray, upsample: int = 20) -> tuple[float, float]:
    """The (row, col) shift that, applied to ``img``, best aligns it with ``ref``.

    Complex images are correlated as they are (no phase normalisation), so the phase of the
    correlation peak also gives their relative global phase (see :func:`register`).
    """
    shift, _ = register(ref, img, upsample)
    return shift


def register(ref: np.ndarray, img: np.ndarray, upsample: int = 20) -> tuple[tuple[float, float], complex]:
    """Shift of ``img`` onto ``ref`` and the complex cross-correlation value at that shift."""
    if ref.shape != img.shape or ref.ndim != 2:
        raise ValueError(f"register needs two 2-D images of one shape, got {ref.shape} and {img.shape}")
    F = np.fft.fft2(ref) * np.conj(np.fft.fft2(img))
    cc = np.fft.ifft2(F)
    peak = np.unravel_index(int(np.argmax(np.abs(cc))), cc.shape)
    shape = np.array(cc.shape)
    shift = np.array(peak, dtype=float)
    shift[shift > shape // 2] -= shape[shift > shape // 2]
    if upsample > 1:
        region = int(np.ceil(upsample * 1.5))
        centre = region // 2
        shift = np.round(shift * upsample) / upsample
        up = _upsampled_dft(np.conj(F), region, upsample, tuple(centre - shift * upsample))
        up = np.conj(up)
        p = np.unravel_index(int(np.argmax(np.abs(up))), up.shape)
        value = up[p] / img.size
        shift = shift + (np.array(p, dtype=float) - centre) / upsample
    else:
        value = cc[peak]
    return (float(shift[0]), float(shift[1])), complex(value)


def fourier_shift(img: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """``img`` moved by a (row, col) sub-pixel shift (periodic, through the Fourier transform)."""
    kr = np.fft.fftfreq(img.shape[-2])[:, None]
    kc = np.fft.fftfreq(img.shape[-1])[None, :]
    ramp = np.exp(-2j * np.pi * (kr * shift[0] + kc * shift[1]))
    out = np.fft.ifft2(np.fft.fft2(img) * ramp)
    return out if np.iscomplexobj(img) else out.real
