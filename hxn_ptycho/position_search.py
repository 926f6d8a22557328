"""The coarse global stage of position refinement: positions found by growing the object in scan order.

A smooth drift of the stage over the scan (time) order is not visible to a search of each view
against the object reconstructed from all views: that object is a warped but self-consistent copy
painted by the drifted views themselves, and each view's best corner in it is its drifted one
(docs/position_search.md). What the data do fix is a view's position *relative to the views
recorded before it* where they overlap. So the object is grown in scan order (as the data were
taken), each new view registered against the object of the views before it:

1. the prediction: the view's nominal corner plus the robust (median) correction of the views
   just before it — the drift as it accumulates, tracked in time;
2. a local search (1 px steps, ``local_radius``) of the data error
   Σ(|F(P·O(r + c))| − √I)² around the prediction (the model's misfit over candidate shifts:
   the measured amplitudes cannot be correlated with the object directly);
3. views whose best misfit is far above their recent neighbours' (relative to the frame's own
   energy) or whose best lies on the rim are outliers: searched again over the whole ``radius``
   (2 px steps on a smoothed object, then 1 px around the best node) and moved only where the
   misfit falls;
4. the object follows: ePIE updates (Maiden & Rodenburg 2009, probe fixed) over the new views,
   then one sweep over all views so far.

A growth is as good as its probe. :func:`defocus_family` and :func:`growth_misfit` choose the
first probe's far-field defocus by the data error of the first views grown with each member
(``position_probe_defocus``): at the nominal corners the misfit cannot tell the defocus, grown it can.

It needs every view's frame in one process (with MPI ranks it is skipped). Written for numpy;
the object and probe are moved to the host for it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .positions import disc_grid

logger = logging.getLogger(__name__)


@dataclass
class GrowReport:
    """What the growth stage did: views searched wide (outliers of the drift) and moved."""
    wide: int = 0
    moved: int = 0
    corrections: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))


def smooth(obj: np.ndarray, sigma: float) -> np.ndarray:
    """``obj`` (L, H, W) convolved with a Gaussian of ``sigma`` pixels (periodic, FFT)."""
    if sigma <= 0.05:
        return obj
    kr = np.fft.fftfreq(obj.shape[1])[:, None]
    kc = np.fft.fftfreq(obj.shape[2])[None, :]
    g = np.exp(-2 * (np.pi * sigma) ** 2 * (kr ** 2 + kc ** 2))
    mean = obj.mean(axis=(1, 2), keepdims=True)
    return np.fft.ifft2(np.fft.fft2(obj - mean) * g) + mean


class Grower:
    """The object (L, H, W) and the view frames, with the model misfit at integer corners."""

    def __init__(self, obj: np.ndarray, probe: np.ndarray, amps: np.ndarray, mask: np.ndarray | None) -> None:
        self.obj = np.array(obj, np.complex128)
        self.probe = np.asarray(probe, np.complex128)          # (K, n, n)
        self.amps = amps                                       # (N, n, n) √I
        self.mask = None if mask is None else np.asarray(mask, bool)
        self.n = self.probe.shape[-1]
        self.hi = np.array([self.obj.shape[1] - self.n, self.obj.shape[2] - self.n])
        pint = np.sum(np.abs(self.probe) ** 2, axis=0)
        self.pmax = float(pint.max())
        good = np.ones(self.amps.shape[1:], bool) if self.mask is None else self.mask
        self.energy = np.maximum(np.sum(np.square(self.amps, dtype=np.float64) * good, axis=(1, 2)), 1e-30)

    def clip(self, corners: np.ndarray) -> np.ndarray:
        return np.clip(np.round(corners).astype(np.int64), 0, self.hi)

    def windows(self, obj: np.ndarray, corners: np.ndarray) -> np.ndarray:
        """(m, L, n, n) windows of ``obj`` at integer ``corners`` (m, 2)."""
        sw = sliding_window_view(obj, (self.n, self.n), axis=(1, 2))      # (L, H-n+1, W-n+1, n, n)
        return np.moveaxis(sw[:, corners[:, 0], corners[:, 1]], 0, 1)

    # (the data error) Σ_good (|F(Σ_k P_k·O)| − √I)², relative to Σ I: of view j at each corner
    def misfit(self, j: int, corners: np.ndarray, obj: np.ndarray | None = None, chunk: int = 64) -> np.ndarray:
        obj = self.obj if obj is None else obj
        out = np.empty(len(corners))
        # single precision: a ranking of candidate shifts (3x faster than double, the same argmin)
        probe = self.probe.astype(np.complex64)
        amp = self.amps[j].astype(np.float32)
        for i in range(0, len(corners), chunk):
            c = corners[i:i + chunk]
            waves = self.windows(obj, c).astype(np.complex64)[:, :, None] * probe[None, None]   # (m, L, K, n, n)
            f = np.fft.fft2(waves, norm="ortho")
            d = np.sqrt(np.sum(np.square(f.real) + np.square(f.imag), axis=(1, 2))) - amp[None]
            if self.mask is not None:
                d *= self.mask
            out[i:i + len(c)] = np.einsum("ijk,ijk->i", d, d, dtype=np.float64) / self.energy[j]
        return out

    # ePIE object update: O ← O + β Σ_k P_k*(ψ'_k − ψ_k) / max Σ_k|P_k|², ψ' the Fourier projection of ψ = P·O
    def update(self, j: int, corner: np.ndarray, beta: float = 1.0, probe_beta: float = 0.0) -> None:
        r, c = int(corner[0]), int(corner[1])
        n = self.n
        win = self.obj[:, r:r + n, c:c + n]                                          # (L, n, n) view
        psi = win[:, None] * self.probe[None]                                        # (L, K, n, n)
        f = np.fft.fft2(psi, norm="ortho")
        mod = np.sqrt(np.sum(np.abs(f) ** 2, axis=(0, 1)))
        ratio = self.amps[j] / np.maximum(mod, 1e-30)
        if self.mask is not None:
            ratio = np.where(self.mask, ratio, 1.0)
        dpsi = np.fft.ifft2(f * ratio, norm="ortho") - psi
        if probe_beta > 0:                    # ePIE probe update: P_k ← P_k + β Σ_l O_l*(ψ'_k − ψ_k) / max|O|²
            o2 = np.sum(np.abs(win) ** 2, axis=0)
            dprobe = np.sum(np.conj(win)[:, None] * dpsi, axis=0) / float(o2.max())
        win += beta * np.sum(np.conj(self.probe)[None] * dpsi, axis=1) / self.pmax
        if probe_beta > 0:
            self.probe += probe_beta * dprobe
            self.pmax = float(np.sum(np.abs(self.probe) ** 2, axis=0).max())

    def best(self, j: int, around: np.ndarray, radius: float, obj: np.ndarray | None = None,
             coarse: bool = False) -> tuple[np.ndarray, float, np.ndarray]:
        """The corner of least misfit within ``radius`` of ``around``: (corner, misfit, offset)."""
        base = np.round(around)
        if coarse:
            step = 2.0
            grid = disc_grid(radius, step)
            cand = self.clip(base + grid)
            e = self.misfit(j, cand, smooth(self.obj, 0.5 * step) if obj is None else obj)
            base = cand[int(np.argmin(e))].astype(float)
            radius = 1.5
        cand = self.clip(base + disc_grid(radius, 1.0))
        e = self.misfit(j, cand, obj)
        i = int(np.argmin(e))
        return cand[i].astype(float), float(e[i]), cand[i] - np.round(around)


def drift_prediction(corr: np.ndarray, known: np.ndarray, j: int, window: int) -> np.ndarray:
    """The correction predicted for view ``j``: the median over the last ``window`` known corrections
    before it (in scan order), robust to the heavy-tailed jitter and the slipped views."""
    idx = np.nonzero(known[:j])[0][-window:]
    if len(idx) == 0:
        return np.zeros(2)
    return np.median(corr[idx], axis=0)


def grow(g: Grower, nominal: np.ndarray, radius: float, local_radius: float = 6.0, seed_views: int = 4,
         chunk: int = 4, window: int = 9, outlier: float = 2.5, sweeps: int = 2,
         probe_beta: float = 0.0, seeded: np.ndarray | None = None) -> tuple[np.ndarray, GrowReport]:
    """Corners of every view (N, 2) found by growing ``g.obj`` over the views in scan order (see the
    module's notes); ``g.obj`` ends as the object of all views at them."""
    N = len(nominal)
    pos = np.asarray(nominal, np.float64).copy()
    corr = np.zeros_like(pos)
    known = np.zeros(N, bool)
    rel = np.full(N, np.nan)                     # best relative misfit of each view when it was added
    rep = GrowReport()
    rng = np.random.default_rng(0)
    if seeded is not None:                  # the first views' corners, their object already in g.obj
        m0 = len(seeded)
        pos[:m0] = seeded
        corr[:m0] = seeded - nominal[:m0]
    else:
        m0 = min(N, seed_views)
        for _ in range(2 * sweeps):
            for j in range(m0):
                g.update(j, g.clip(pos[j][None])[0], probe_beta=probe_beta)
    known[:m0] = True
    for s in range(m0, N, chunk):
        new = list(range(s, min(N, s + chunk)))
        for j in new:
            pred = nominal[j] + drift_prediction(corr, known, j, window)
            corner, e, off = g.best(j, pred, local_radius)
            recent = rel[np.nonzero(known[:j])[0][-window:]]
            recent = recent[np.isfinite(recent)]
            typical = float(np.median(recent)) if len(recent) else np.inf
            if np.hypot(*off) > local_radius - 1.0 or e > outlier * typical:
                rep.wide += 1
                c2, e2, _ = g.best(j, pred, radius, coarse=True)
                if e2 < e:
                    corner, e = c2, e2
            pos[j], rel[j], known[j] = corner, e, True
            corr[j] = corner - nominal[j]
        for _ in range(sweeps):
            for j in new:
                g.update(j, g.clip(pos[j][None])[0], probe_beta=probe_beta)
        for j in rng.permutation(s + len(new)):
            g.update(int(j), g.clip(pos[j][None])[0], probe_beta=probe_beta)
    rep.moved = int(np.sum(np.any(np.abs(pos - nominal) >= 0.5, axis=1)))
    rep.corrections = corr
    return pos, rep


def pupil_amplitude(mean_amp: np.ndarray, support: float = 0.3) -> np.ndarray:
    """The probe's far-field amplitude from the frames' mean amplitude: pixels below ``support`` of
    its maximum set to zero. The mean pattern is the pupil blurred by the object's scattering, which
    fills a zone plate's central stop and its edge; cut, the defocus family fits the grown views as
    well as the true probe does (0.327 against 0.339 on the simulator's zone plate, 0.154 against
    0.111 on an astigmatic one, against 0.572 and 0.338 uncut; docs/position_search.md)."""
    amp = np.asarray(mean_amp, np.float64)
    return np.where(amp >= support * float(amp.max()), amp, 0.0)


def mean_pupil(amps: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """:func:`pupil_amplitude` of the frames' root-mean-square amplitude (masked pixels zero)."""
    good = np.ones(amps.shape[1:], bool) if mask is None else mask
    return pupil_amplitude(np.sqrt(np.mean(np.square(amps, dtype=np.float64), axis=0)) * good)


def defocus_family(mean_amp: np.ndarray, power: float, coefficients: np.ndarray,
                   astigmatism: np.ndarray | None = None) -> np.ndarray:
    """Probes (C, n, n) whose far field is the mean measured amplitude with a defocus phase
    π·c·k² (k in units of the Nyquist frequency, as :func:`hxn_ptycho.modes.probe_from_amplitude`),
    one per coefficient ``c``, each of total power ``power``. Both signs: a scan fixes the sign the
    data's positions agree with. ``astigmatism`` (C,): an astigmatism a along the detector's axes,
    the phase π·((c − a)·k_row² + (c + a)·k_col²) — a defocus c − a along the rows, c + a along
    the columns."""
    n = mean_amp.shape[-1]
    k = np.fft.fftfreq(n) * 2
    k2r, k2c = k[:, None] ** 2, k[None, :] ** 2
    astig = np.zeros(len(coefficients)) if astigmatism is None else np.asarray(astigmatism, np.float64)
    out = np.empty((len(coefficients), n, n), np.complex128)
    for i, (c, a) in enumerate(zip(coefficients, astig)):
        phase = np.pi * ((c - a) * k2r + (c + a) * k2c)
        p = np.fft.fftshift(np.fft.ifft2(np.asarray(mean_amp, np.float64) * np.exp(1j * phase)))
        out[i] = p * np.sqrt(power / max(float(np.vdot(p, p).real), 1e-300))
    return out


def half_resolution(amps: np.ndarray, mask: np.ndarray | None, probe: np.ndarray, corners: np.ndarray,
                    shape: tuple[int, ...], f: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray,
                                                          np.ndarray, tuple[int, ...]]:
    """The scan at 1/``f`` of the resolution for cheap growths: the central n/f of each frame's far
    field (zero frequency at [0, 0]), the probe's far field cropped alike (its real-space pixel f
    times larger), the corners divided by f and the object's shape to hold them. ``f`` = 1: as given."""
    if f == 1:
        return amps, mask, np.array(probe, np.complex128), np.round(corners), tuple(shape)
    far = np.fft.fft2(np.fft.ifftshift(np.asarray(probe, np.complex128), axes=(-2, -1)), norm="ortho")
    probe_s = np.fft.fftshift(np.fft.ifft2(crop_far_field(far, f), norm="ortho"), axes=(-2, -1))
    shape_s = (shape[0], shape[1] // f + 1, shape[2] // f + 1)
    return (np.ascontiguousarray(crop_far_field(amps, f)), None if mask is None else crop_far_field(mask, f), probe_s,
            np.round(np.asarray(corners) / f), shape_s)


def crop_far_field(a: np.ndarray, f: int) -> np.ndarray:
    """The central n/``f`` × n/``f`` of far fields ``a`` (..., n, n), zero frequency at [0, 0] in and out."""
    n = a.shape[-1]
    m = n // f
    o = (n - m) // 2
    return np.fft.ifftshift(np.fft.fftshift(a, axes=(-2, -1))[..., o:o + m, o:o + m], axes=(-2, -1))


def growth_misfit(probe: np.ndarray, level: np.ndarray, shape: tuple[int, ...], amps: np.ndarray,
                  mask: np.ndarray | None, nominal: np.ndarray, radius: float, local_radius: float,
                  views: int) -> float:
    """The data error of the first ``views`` views (scan order) after growing them with ``probe``
    (K, n, n) from a flat object at ``level`` (L,): how well that probe explains the data once each
    view is registered against the views before it — low for a probe close to the true one, where
    a misfit at the nominal corners does not discriminate (docs/position_search.md)."""
    m = min(views, len(nominal))
    g = Grower(np.broadcast_to(level[:, None, None], shape), probe, amps[:m], mask)
    found, _ = grow(g, nominal[:m], radius, local_radius=local_radius)
    return float(sum(g.misfit(j, g.clip(found[j][None]))[0] for j in range(m)))
