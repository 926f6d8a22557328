"""The initial guesses of a reconstruction: the object, the probe modes and the data's power.

One part of the engine (:class:`~hxn_ptycho.engine.Reconstruction` calls these once, before the
first iteration): every function here takes what it needs explicitly and returns numpy arrays,
so a new algorithm or a front end can make the same start without a reconstruction.

- The object: ones (or random phases, ``object_init``), extra object modes weaker and perturbed
  (Thibault & Menzel's mixed states need them distinct), or a previous result (``init_from``).
- The probe: the scan file's guess, or one made from the mean diffraction amplitude, scaled so
  that Σ|P|² equals the mean frame power; extra modes with diversity at ``extra_mode_power``, or,
  for a fly scan (``probe_modes_init``), the first mode's successive derivatives along the scan's
  motion at ``motion_mode_power``: a probe that moves by s during the exposure is the incoherent
  mixture ∫ P(r − s u) ds, whose coherent modes are, to first order in s, P and its derivatives
  u·∇P, (u·∇)²P, … along the motion u (docs/auto_modes.md, "Session 17: the motion start").
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from . import modes
from .params import ParamError, ReconParams
from .resultfile import ResultData
from .scanfile import ScanData

log = logging.getLogger(__name__)

# ``scan_kind`` values of a scan file (callbacks/export.py ``scan_kind``) whose views are exposed
# while the stage moves: PandA fly scans (hxn-profile-collection 93-scanplan-panda.py ``fly2dpd``)
# and hxnfly's ``FlyPlan2D``. Step scans stop at each point.
FLY_SCAN_KINDS = ("fly2dpd", "FlyPlan2D")


def nearest_distances(pos: np.ndarray) -> np.ndarray:
    """Each position's distance to its nearest other one (exact; ``pos`` (N, 2), N ≥ 2).

    The positions sorted along the axis of larger extent, the pairs k apart in that order are
    compared for k = 1, 2, … until every position's best distance is within the gap along that
    axis to its k-th successor and predecessor: farther ones in the order lie farther along the
    axis. A scan's lines make k about two lines' views: O(N·k) without a tree (scipy.spatial's
    cKDTree gave the same distances, but its import holds 12 MiB in every rank: issue 24)."""
    p = np.asarray(pos, dtype=np.float64)
    axis = int(np.ptp(p[:, 1]) > np.ptp(p[:, 0]))
    order = np.argsort(p[:, axis], kind="stable")
    s = p[order]
    best = np.full(len(s), np.inf)
    for k in range(1, len(s)):
        d = s[k:] - s[:-k]
        dist = np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1])
        np.minimum(best[:-k], dist, out=best[:-k])
        np.minimum(best[k:], dist, out=best[k:])
        gap = d[:, axis]
        if np.all(gap >= best[:-k]) and np.all(gap >= best[k:]):
            break
    out = np.empty_like(best)
    out[order] = best
    return out


def median_step(pos: np.ndarray) -> float:
    """Median distance (pixels) from each position to its nearest neighbour."""
    if len(pos) < 2:
        return 0.0
    return float(np.median(nearest_distances(pos)))


def lay_object(obj: np.ndarray, its_origin: Any, origin: Any, fill: np.ndarray) -> np.ndarray:
    """``obj`` (L', h, w), whose pixel (0, 0) lies at ``its_origin``, laid on a copy of ``fill`` (L, H, W),
    a canvas whose pixel (0, 0) lies at ``origin`` (both in object pixels (row, col) of one scan frame:
    :meth:`hxn_ptycho.engine.Reconstruction.canvas_origin`): its first min(L, L') modes, shifted by the
    origins' difference rounded to whole pixels; ``fill`` wherever it does not reach."""
    r, c = np.round(np.asarray(its_origin, np.float64) - np.asarray(origin, np.float64)).astype(int)
    out = np.array(fill, np.complex128)
    L, (h, w) = min(out.shape[0], obj.shape[0]), obj.shape[1:]
    r0, c0, r1, c1 = max(r, 0), max(c, 0), min(r + h, out.shape[1]), min(c + w, out.shape[2])
    if r1 > r0 and c1 > c0:
        out[:L, r0:r1, c0:c1] = obj[:L, r0 - r:r1 - r, c0 - c:c1 - c]
    return out


def _check_pixel(params: ReconParams, theirs: float | None, ours: float | None, size: int) -> None:
    """A previous object laid on this canvas must have its pixel size, to a pixel across the canvas."""
    if theirs is None or ours is None or abs(theirs - ours) * size <= 0.5 * ours:
        return
    raise ParamError(f"init_from {params.init_from}: its object's pixel is {theirs:.6g} µm, this scan's "
                     f"{ours:.6g} µm (another energy, distance or frame size): laid on this canvas it would "
                     f"be off by more than half a pixel at {size} pixels")


def initial_object(obj_shape: tuple[int, int, int], params: ReconParams, previous: Any = None,
                   origin: Any = None, pixel_um: float | None = None) -> np.ndarray:
    """The object modes ``(L, H, W)`` to start from (complex128): the fresh start of ``params``, or
    ``previous``'s object (a :class:`~hxn_ptycho.resultfile.ResultData` of ``init_from``, or the held-out
    count's :class:`~hxn_ptycho.mode_count.CountedModel`). Where both it and this canvas know where their
    pixel (0, 0) lies (``previous.origin``, ``origin``), it is laid on this canvas by their difference
    (:func:`lay_object`: another margin, refined positions, a part of the scan's views), this canvas's own
    start beyond it; else it must have this canvas's shape."""
    L, H, W = obj_shape
    if previous is not None:
        prev, its = previous.object, getattr(previous, "origin", None)
        if its is not None and origin is not None:
            _check_pixel(params, getattr(previous, "pixel_um", None), pixel_um, max(H, W))
            prev = lay_object(prev, its, origin, initial_object(obj_shape, params))
        elif prev.shape[1:] != (H, W):
            raise ParamError(f"init_from {params.init_from}: object shape {prev.shape[1:]} differs "
                             f"from this scan's {(H, W)} (other positions, margin or pixel size), and the "
                             f"file does not say where its object lies (no 'frame' attribute)")
        obj = np.empty(obj_shape, np.complex128)
        m = min(L, prev.shape[0])
        obj[:m] = prev[:m]
        obj[m:] = 0.1 * prev[:1]
        return obj
    rng = np.random.default_rng(params.seed)
    if params.object_init == "random":
        obj = np.exp(1j * rng.uniform(-np.pi / 4, np.pi / 4, (L, H, W)))
    else:
        obj = np.ones((L, H, W), np.complex128)
    for l in range(1, L):       # weaker, perturbed extra object modes
        obj[l] = 0.1 * obj[0] * np.exp(1j * rng.uniform(-np.pi, np.pi, (H, W)))
    return obj


def motion_direction(positions: np.ndarray) -> np.ndarray | None:
    """The unit direction (row, col) of the stage's motion between consecutive views, in the pixel
    frame the probe is reconstructed in (``positions`` are the views' window corners in acquisition
    order, as ``positions_px`` gives them), or None with fewer than two distinct positions.

    The principal axis of the consecutive steps' unit vectors (a sign-free average: a snake scan's
    alternate lines and a raster's fly-back along the line count alike; the rare steps to the
    next line weigh one each)."""
    d = np.diff(np.asarray(positions, np.float64), axis=0)
    length = np.hypot(d[:, 0], d[:, 1])
    d = d[length > 0] / length[length > 0, None]
    if len(d) == 0:
        return None
    w, v = np.linalg.eigh(d.T @ d)
    u = v[:, int(np.argmax(w))]
    return u * (1.0 if u[int(np.argmax(np.abs(u)))] > 0 else -1.0)


def directional_derivative(p: np.ndarray, u: np.ndarray, order: int) -> np.ndarray:
    """(u·∇)^order p of a periodic image, u = (row, col) a unit vector, through the Fourier transform."""
    kr = 2j * np.pi * np.fft.fftfreq(p.shape[0])[:, None]
    kc = 2j * np.pi * np.fft.fftfreq(p.shape[1])[None, :]
    return np.fft.ifft2(np.fft.fft2(p) * (u[0] * kr + u[1] * kc) ** order)


def motion_modes(p0: np.ndarray, count: int, u: np.ndarray, power: float) -> np.ndarray:
    """``count`` modes after ``p0``: its derivatives of order 1, 2, … along ``u``, orthonormalised
    (Gram–Schmidt against ``p0`` and each other), the k-th with ``power / k`` of ``p0``'s power."""
    p0 = np.asarray(p0, np.complex128)
    p0_power = float(np.vdot(p0, p0).real)
    base, out = [p0 / np.sqrt(p0_power)], []
    for k in range(1, count + 1):
        c = directional_derivative(p0, u, k)
        for b in base:
            c = c - np.vdot(b, c) * b
        norm = float(np.linalg.norm(c))
        if norm <= 1e-12 * np.sqrt(p0_power):
            raise ParamError(f"probe_modes_init motion: the first mode has no component along the motion "
                             f"{u.tolist()} of derivative order {k} (a flat probe)")
        base.append(c / norm)
        out.append(c / norm * np.sqrt(p0_power * power / k))
    return np.asarray(out)


def probe_modes_init(scan: ScanData, params: ReconParams) -> str:
    """'motion' or 'default': what ``probe_modes_init`` means for this scan ('auto': 'motion' where
    the scan file's ``scan_kind`` is a fly scan)."""
    choice = params.probe_modes_init
    if choice == "auto":
        choice = "motion" if scan.attrs.get("scan_kind") in FLY_SCAN_KINDS else "default"
    return choice


def initial_modes(p0: np.ndarray, K: int, scan: ScanData, params: ReconParams, positions: np.ndarray) -> np.ndarray:
    """``K`` modes from the first, ``p0``: the extra ones per ``probe_modes_init``; total power kept."""
    if K == 1 or probe_modes_init(scan, params) == "default":
        return modes.initial_probe_modes(p0, K, params.extra_mode_power, params.seed)
    u = motion_direction(positions)
    if u is None:
        raise ParamError("probe_modes_init motion: the scan has no two distinct positions, so no motion direction")
    log.info("probe modes %d..%d: derivatives of the first along the motion (row, col) = (%.3f, %.3f), "
             "scan_kind %s, first at %g of its power", 2, K, u[0], u[1], scan.attrs.get("scan_kind"),
             params.motion_mode_power)
    probe = np.concatenate([np.asarray(p0, np.complex128)[None], motion_modes(p0, K - 1, u, params.motion_mode_power)])
    return probe * np.sqrt(modes.probe_power(probe[:1]).sum() / modes.probe_power(probe).sum())


def mean_frame_power(scan: ScanData, total_intensity: float, reducer: Any) -> tuple[float, np.ndarray]:
    """Mean Σ I of a frame (masked pixels filled in proportion) and the mean amplitude, over all ranks.

    ``total_intensity`` is Σ I over the good pixels of every rank's frames (already reduced).
    """
    mean_amp = np.sum(scan.diffamp, axis=0, dtype=np.float64)
    buf: list[np.ndarray] = [np.asarray(mean_amp), np.array([float(len(scan.diffamp))])]
    reducer.allreduce_sum(buf)
    mean_amp = buf[0] / buf[1][0]
    frac = 1.0 if scan.mask is None else float(scan.mask.mean())
    return total_intensity / scan.n_views / frac, mean_amp


def initial_probe(scan: ScanData, params: ReconParams, K: int, power: float, mean_amp: np.ndarray,
                  positions: np.ndarray, previous: ResultData | None = None) -> np.ndarray:
    """``K`` probe modes ``(K, n, n)`` with total power ``power`` (complex128).

    ``positions`` are all views' window corners (pixels): their spacing sizes the probe made
    from ``mean_amp`` when the scan file has no guess.
    """
    n = scan.n
    if previous is not None:
        prev = previous.probe
        if prev.shape[-1] != n:
            raise ParamError(f"init_from {params.init_from}: probe is {prev.shape[-1]}x{prev.shape[-1]}, "
                             f"the scan's frames are {n}x{n}")
        if prev.shape[0] >= K:
            return prev[:K]
        return np.concatenate([prev, modes.diverse_modes(prev[0], K - prev.shape[0], params.extra_mode_power,
                                                         np.random.default_rng(params.seed))])
    source = params.probe_init
    if source == "auto":
        source = "file" if scan.probe_guess is not None else "amplitude"
    if source == "file":
        if scan.probe_guess is None:
            raise ParamError("probe_init = 'file' but the scan file has no 'probe_guess'")
        guess = np.asarray(scan.probe_guess, np.complex128)
        p0 = guess if guess.ndim == 2 else guess[0]
    else:
        p0 = modes.probe_from_amplitude(mean_amp, 2.5 * median_step(positions))
    p0 = p0 * np.sqrt(power / max(float(np.vdot(p0, p0).real), 1e-300))
    probe = initial_modes(p0, K, scan, params, positions)
    if source == "file" and np.asarray(scan.probe_guess).ndim == 3:
        g = np.asarray(scan.probe_guess, np.complex128)
        m = min(K, g.shape[0])
        probe[:m] = g[:m] * np.sqrt(power / modes.probe_power(g).sum())
    return probe
