"""Loaders for public test measurements, converted to :class:`~hxn_ptycho.scanfile.ScanData`."""
from __future__ import annotations

import bz2
import os
from pathlib import Path

import numpy as np

from .h5util import FileFormatError
from .scanfile import ScanData

# Pixel-unit geometry: λ·z / (n·Δ) = 1 µm, so positions in object pixels are positions in µm.
_LAMBDA_NM, _CCD_UM = 0.1, 55.0


def siemens_star(path: str | os.PathLike, margin: float = 0.0) -> ScanData:
    """The APS Velociprobe Siemens star (tike's ``siemens-star-small.npz.bz2``) as a scan.

    Frames are already FFT-shifted (zero frequency at [0, 0]); ``scan[:, 0]`` is the row and
    ``scan[:, 1]`` the column in object pixels; the analytic probe guess is kept as ``probe_guess``.
    """
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"Siemens star file not found: {path}")
    with bz2.open(path, "rb") as fh:
        d = np.load(fh)
        data, scan, probe = d["data"][0], d["scan"][0], d["probe"][0, 0, 0, 0]
    n = data.shape[-1]
    z_m = 1e-6 * n * _CCD_UM * 1e-6 / (_LAMBDA_NM * 1e-9)          # object pixel = 1 µm
    points = np.stack([scan[:, 1], scan[:, 0]]).astype(np.float64)  # row 0 = x = columns
    return ScanData(diffamp=np.sqrt(np.maximum(data, 0)).astype(np.float32), points=points,
                    lambda_nm=_LAMBDA_NM, z_m=z_m, ccd_pixel_um=_CCD_UM, probe_guess=probe.astype(np.complex64),
                    attrs={"scan_id": 0, "source": "APS Velociprobe Siemens star (tike test data)"})


def perturbed_positions(scan: ScanData, scale: float = 1.02, rms_px: float = 3.0, seed: int = 0) -> ScanData:
    """``scan`` with its positions scaled by ``scale`` about their centre plus random errors of
    ``rms_px`` RMS (2-D; µm = object pixels for :func:`siemens_star`): a stage's systematic and
    random errors, for tests of position refinement."""
    import dataclasses
    rng = np.random.default_rng(seed)
    c = scan.points.mean(axis=1, keepdims=True)
    pts = c + (scan.points - c) * scale + rng.standard_normal(scan.points.shape) * rms_px / np.sqrt(2)
    return dataclasses.replace(scan, points=pts)
