"""Paper-like synthetic ptychography scans with known truth.

The object's amplitude and phase come from two different images (a Siemens star with rings,
and smooth blobs with sharp-edged features); the probe is a zone-plate-like focus (annular
pupil with a central stop) seen out of focus; positions lie on a jittered raster or a Fermat
spiral. A fly scan's motion blur enters as an incoherent mixture of ``probe_modes`` shifted
probes. Poisson noise at a chosen photon count and dead pixels are optional.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .scanfile import ScanData, write_scan

ENERGY_KEV = 12.0
DISTANCE_M = 0.5
CCD_PIXEL_UM = 55.0


def wavelength_nm(energy_kev: float) -> float:
    return 1.2398419843320026 / energy_kev


def star_image(shape: tuple[int, int], spokes: int = 36, rng: np.random.Generator | None = None) -> np.ndarray:
    """A Siemens star with concentric rings, values in [0, 1]."""
    h, w = shape
    y, x = np.mgrid[:h, :w]
    y = y - h / 2 + 0.5
    x = x - w / 2 + 0.5
    r = np.hypot(x, y)
    theta = np.arctan2(y, x)
    star = 0.5 + 0.5 * np.sign(np.sin(spokes / 2 * theta))
    rings = (np.floor(r / (min(h, w) / 9)) % 2)
    return np.where(r < min(h, w) / 6, star, 0.35 + 0.65 * np.abs(star - rings))


def blobs_image(shape: tuple[int, int], rng: np.random.Generator, count: int = 40) -> np.ndarray:
    """Smooth Gaussian blobs plus sharp rectangles, values in [0, 1]."""
    h, w = shape
    y, x = np.mgrid[:h, :w]
    img = np.zeros(shape)
    for _ in range(count):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        s = rng.uniform(2, min(h, w) / 10)
        img += rng.uniform(0.3, 1.0) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s * s))
    for _ in range(count // 4):
        r0, c0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        img[r0:r0 + rng.integers(3, 12), c0:c0 + rng.integers(3, 12)] += 0.6
    img -= img.min()
    return img / img.max()


def zone_plate_probe(n: int, defocus: float = 0.5, stop: float = 0.4, radius: float | None = None) -> np.ndarray:
    """An out-of-focus zone-plate probe: annular pupil in the far field, propagated by ``defocus``.

    ``radius`` is the pupil radius in detector pixels (default n/6); the focus is then a few
    pixels wide and the defocus spreads it to roughly a quarter of the window.
    """
    radius = radius or n / 6
    k = np.fft.fftfreq(n) * n
    kr = np.hypot(k[:, None], k[None, :])
    pupil = ((kr <= radius) & (kr >= stop * radius)).astype(np.complex128)
    pupil *= np.exp(1j * np.pi * defocus * (kr / radius) ** 2 * 8)
    p = np.fft.fftshift(np.fft.ifft2(pupil))
    return p / np.sqrt(np.sum(np.abs(p) ** 2))


def fermat_spiral(count: int, step: float) -> np.ndarray:
    """(count, 2) positions (row, col) on a Fermat spiral with nearest-neighbour spacing ~ ``step``."""
    golden = np.pi * (3 - np.sqrt(5))
    i = np.arange(count)
    r = step * np.sqrt(i) * 0.57
    return np.stack([r * np.sin(i * golden), r * np.cos(i * golden)], axis=1)


def raster(count: int, step: float, jitter: float, rng: np.random.Generator) -> np.ndarray:
    side = int(np.ceil(np.sqrt(count)))
    r, c = np.divmod(np.arange(count), side)
    pos = np.stack([r, c], axis=1).astype(float) * step
    return pos + rng.uniform(-jitter, jitter, pos.shape)


def _shift(img: np.ndarray, dr: float, dc: float) -> np.ndarray:
    kr = np.fft.fftfreq(img.shape[0])[:, None]
    kc = np.fft.fftfreq(img.shape[1])[None, :]
    return np.fft.ifft2(np.fft.fft2(img) * np.exp(-2j * np.pi * (kr * dr + kc * dc)))


def heavy_tailed_errors(count: int, seed: int = 0, drift_px: float = 4.0, jitter_px: float = 1.5,
                        worst_px: float = 30.0, outliers: float = 0.04) -> np.ndarray:
    """(count, 2) stage errors in pixels like a real nanoprobe scan's: a smooth drift over the scan
    (time) order, ``drift_px`` RMS per axis, plus per-view jitter with heavy (Student t, 2 degrees of
    freedom) tails of scale ``jitter_px``, and a fraction ``outliers`` of views thrown 12 px to
    ``worst_px`` away (a stage that slipped); no error larger than ``worst_px``."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, count)[:, None]
    drift = np.zeros((count, 2))
    for k in (1, 2, 3):
        drift += rng.standard_normal((1, 2)) / k * np.sin(np.pi * k * t + rng.uniform(0, 2 * np.pi, (1, 2)))
    drift *= drift_px / max(float(np.sqrt(np.mean(drift ** 2))), 1e-12)
    jitter = rng.standard_t(2.0, (count, 2)) * jitter_px
    err = drift + jitter
    bad = rng.choice(count, max(1, int(round(outliers * count))), replace=False)
    angle = rng.uniform(0, 2 * np.pi, len(bad))
    dist = np.concatenate([[worst_px * 0.95], rng.uniform(12.0, worst_px, len(bad) - 1)])
    err[bad] = np.stack([np.sin(angle), np.cos(angle)], axis=1) * dist[:, None]
    norm = np.hypot(err[:, 0], err[:, 1])
    return err * np.minimum(1.0, worst_px / np.maximum(norm, 1e-12))[:, None]


@dataclass
class Truth:
    object: np.ndarray          # (H, W) complex, in the engine's object frame (margin included)
    probe: np.ndarray           # (K, n, n) complex: the mixture's modes (shifted probes, weighted)
    positions_px: np.ndarray    # (N, 2) window corners (row, col)


def simulate_scan(n: int = 64, n_positions: int = 100, probe_modes: int = 1, photons: float | None = 1e6,
                  seed: int = 0, pattern: str = "spiral", overlap_step: float | None = None,
                  dead_pixels: float = 0.0, phase_range: float = 1.0, blur_px: float = 3.0,
                  margin: int = 4, position_error_px: float = 0.0, scale_error: float = 0.0,
                  gain: float = 1.0, mode_powers: tuple[float, ...] | None = None,
                  position_errors: np.ndarray | None = None) -> tuple[ScanData, Truth]:
    """A synthetic scan and its truth.

    ``probe_modes`` K > 1 blurs each exposure over ``blur_px`` pixels along the scan's fast axis
    (an incoherent sum of K shifted probes, as in a fly scan) — or, with ``mode_powers`` (K
    fractions), K orthogonal modes carrying those shares of the intensity; ``photons`` is the
    mean count per frame (None: no noise); ``dead_pixels`` the fraction of masked detector pixels.

    Stage errors: the file's positions are the true ones scaled by ``1 + scale_error`` about
    their centre plus random errors of ``position_error_px`` pixels RMS (of the 2-D distance); the
    truth keeps the true ones. ``gain`` multiplies the counts after the Poisson noise (a detector
    reading in units other than photons). ``position_errors`` (N, 2) pixels (row, col), e.g. from
    :func:`heavy_tailed_errors`, are added to the file's positions as well.
    """
    rng = np.random.default_rng(seed)
    probe1 = zone_plate_probe(n)
    step = overlap_step or n / 8
    if pattern == "spiral":
        pos = fermat_spiral(n_positions, step)
    elif pattern == "raster":
        pos = raster(n_positions, step, 0.15 * step, rng)
    else:
        raise ValueError(f"pattern must be 'spiral' or 'raster', got {pattern!r}")
    pos -= pos.min(axis=0)
    corners = np.round(pos).astype(int) + margin
    H = int(corners[:, 0].max()) + n + margin
    W = int(corners[:, 1].max()) + n + margin
    amp = 0.55 + 0.45 * star_image((H, W))
    phase = phase_range * (blobs_image((H, W), rng) - 0.5)
    obj = amp * np.exp(1j * phase)
    # modes of the fly-scan blur: K probes shifted along the columns, equal weights
    if mode_powers is not None:
        from .modes import diverse_modes
        if len(mode_powers) != probe_modes:
            raise ValueError(f"mode_powers needs {probe_modes} fractions, got {len(mode_powers)}")
        w = np.asarray(mode_powers, float) / float(np.sum(mode_powers))
        extra = diverse_modes(probe1, probe_modes - 1, 1.0, np.random.default_rng(seed + 1000))
        basis = np.concatenate([probe1[None], extra])
        basis /= np.sqrt(np.sum(np.abs(basis) ** 2, axis=(1, 2)))[:, None, None]
        probe = basis * np.sqrt(w)[:, None, None]
    elif probe_modes > 1:
        shifts = np.linspace(-blur_px / 2, blur_px / 2, probe_modes)
        probe = np.stack([_shift(probe1, 0.0, s) for s in shifts]) / np.sqrt(probe_modes)
    else:
        probe = probe1[None]
    # photons: scale the probe so a frame holds ~photons counts (object amplitude ~ 0.8)
    scale = np.sqrt((photons or 1e6) / (np.sum(np.abs(probe) ** 2) * np.mean(amp ** 2)))
    probe = probe * scale
    frames = np.empty((n_positions, n, n), np.float64)
    for j, (r, c) in enumerate(corners):
        win = obj[r:r + n, c:c + n]
        frames[j] = np.sum(np.abs(np.fft.fft2(probe * win, norm="ortho")) ** 2, axis=0)
    if photons is not None:
        frames = rng.poisson(frames).astype(np.float64)
    frames *= gain
    mask = None
    if dead_pixels > 0:
        mask = rng.uniform(size=(n, n)) >= dead_pixels
        frames[:, ~mask] = 0.0
    lam = wavelength_nm(ENERGY_KEV)
    pixel_m = lam * 1e-9 * DISTANCE_M / (n * CCD_PIXEL_UM * 1e-6)
    # points (µm): row 0 = x (columns), row 1 = y (rows); use the exact (rounded) pixel positions
    nominal = corners.astype(np.float64)
    if scale_error or position_error_px:
        centre = nominal.mean(axis=0)
        err = rng.standard_normal(nominal.shape) * position_error_px / np.sqrt(2)
        nominal = centre + (nominal - centre) * (1 + scale_error) + err
    if position_errors is not None:
        errors = np.asarray(position_errors, np.float64)
        if errors.shape != nominal.shape:
            raise ValueError(f"position_errors must be {nominal.shape}, got {errors.shape}")
        nominal = nominal + errors
    points = np.stack([nominal[:, 1], nominal[:, 0]]) * pixel_m * 1e6
    scan = ScanData(diffamp=np.sqrt(frames).astype(np.float32), points=points, lambda_nm=lam, z_m=DISTANCE_M,
                    ccd_pixel_um=CCD_PIXEL_UM, mask=mask,
                    attrs={"scan_id": int(seed), "simulated": True, "photons": float(photons or 0),
                           "probe_modes_true": probe_modes})
    return scan, Truth(object=obj, probe=probe, positions_px=(corners - corners.min(axis=0) + margin).astype(float))


def write_simulation(path: str | os.PathLike, scan: ScanData, truth: Truth) -> None:
    """The scan file with the truth beside it (``truth/object``, ``truth/probe``, ``truth/positions_px``)."""
    write_scan(path, scan, extras={"truth/object": truth.object, "truth/probe": truth.probe,
                                   "truth/positions_px": truth.positions_px})


def read_truth(path: str | os.PathLike) -> Truth:
    from .h5util import read_h5
    with read_h5(path) as f:
        if "truth" not in f:
            raise KeyError(f"{path} holds no simulation truth")
        return Truth(object=f["truth/object"][()], probe=f["truth/probe"][()],
                     positions_px=f["truth/positions_px"][()])

