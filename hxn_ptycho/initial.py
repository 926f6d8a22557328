"""The initial guesses of a reconstruction: the object, the probe modes and the data's power.

One part of the engine (:class:`~hxn_ptycho.engine.Reconstruction` calls these once, before the
first iteration): every function here takes what it needs explicitly and returns numpy arrays,
so a new algorithm or a front end can make the same start without a reconstruction.

- The object: ones (or random phases, ``object_init``), extra object modes weaker and perturbed
  (Thibault & Menzel's mixed states need them distinct), or a previous result (``init_from``).
- The probe: the scan file's guess, or one made from the mean diffraction amplitude, scaled so
  that Σ|P|² equals the mean frame power; extra modes with diversity at ``extra_mode_power``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import modes
from .params import ParamError, ReconParams
from .resultfile import ResultData
from .scanfile import ScanData


def median_step(pos: np.ndarray) -> float:
    """Median distance (pixels) from each position to its nearest neighbour."""
    if len(pos) < 2:
        return 0.0
    from scipy.spatial import cKDTree
    d, _ = cKDTree(pos).query(pos, k=2)
    return float(np.median(d[:, 1]))


def initial_object(obj_shape: tuple[int, int, int], params: ReconParams,
                   previous: ResultData | None = None) -> np.ndarray:
    """The object modes ``(L, H, W)`` to start from (complex128)."""
    L, H, W = obj_shape
    if previous is not None:
        if previous.object.shape[1:] != (H, W):
            raise ParamError(f"init_from {params.init_from}: object shape {previous.object.shape[1:]} differs "
                             f"from this scan's {(H, W)} (other positions, margin or pixel size)")
        obj = np.empty(obj_shape, np.complex128)
        m = min(L, previous.object.shape[0])
        obj[:m] = previous.object[:m]
        obj[m:] = 0.1 * previous.object[:1]
        return obj
    rng = np.random.default_rng(params.seed)
    if params.object_init == "random":
        obj = np.exp(1j * rng.uniform(-np.pi / 4, np.pi / 4, (L, H, W)))
    else:
        obj = np.ones((L, H, W), np.complex128)
    for l in range(1, L):       # weaker, perturbed extra object modes
        obj[l] = 0.1 * obj[0] * np.exp(1j * rng.uniform(-np.pi, np.pi, (H, W)))
    return obj


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
    probe = modes.initial_probe_modes(p0, K, params.extra_mode_power, params.seed)
    if source == "file" and np.asarray(scan.probe_guess).ndim == 3:
        g = np.asarray(scan.probe_guess, np.complex128)
        m = min(K, g.shape[0])
        probe[:m] = g[:m] * np.sqrt(power / modes.probe_power(g).sum())
    return probe
