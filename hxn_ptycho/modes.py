"""Probe modes: initial guesses with diversity, orthogonalisation, power fractions, the 1 % rule.

All functions take and return numpy arrays (probes are small); the engine moves them to the
backend. Probe modes are stored as ``(K, n, n)``.
"""
from __future__ import annotations

import numpy as np


def probe_power(probe: np.ndarray) -> np.ndarray:
    """Σ|P_k|² of each mode."""
    return np.sum(np.abs(probe.reshape(probe.shape[0], -1)) ** 2, axis=1)


def _derivative(p: np.ndarray, order: tuple[int, int]) -> np.ndarray:
    """∂^a/∂row^a ∂^b/∂col^b of a periodic image, through the Fourier transform."""
    kr = 2j * np.pi * np.fft.fftfreq(p.shape[0])[:, None]
    kc = 2j * np.pi * np.fft.fftfreq(p.shape[1])[None, :]
    return np.fft.ifft2(np.fft.fft2(p) * kr ** order[0] * kc ** order[1])


def diverse_modes(p0: np.ndarray, count: int, power: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` further modes derived from ``p0``: its derivatives (the shapes a scan blur or a
    vibration adds), slightly perturbed, orthogonal to ``p0`` and to each other, the k-th with
    ``power / k`` of ``p0``'s power. Identical copies would stay identical under DM."""
    orders = [(0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (2, 1), (1, 2), (2, 2), (0, 3), (3, 0)]
    base = [p0.astype(np.complex128)]
    p0_power = float(np.vdot(p0, p0).real)
    out = []
    for k in range(count):
        a, b = orders[k % len(orders)]
        cand = _derivative(p0.astype(np.complex128), (a, b))
        noise = rng.standard_normal(p0.shape) + 1j * rng.standard_normal(p0.shape)
        cand = cand + 0.05 * np.sqrt(np.vdot(cand, cand).real / cand.size) * noise * (np.abs(p0) > 0.05 * np.abs(p0).max())
        for b_ in base:
            cand = cand - np.vdot(b_, cand) / np.vdot(b_, b_) * b_
        norm = np.sqrt(np.vdot(cand, cand).real)
        if norm == 0:
            cand = noise * np.abs(p0)
            norm = np.sqrt(np.vdot(cand, cand).real)
        cand = cand / norm * np.sqrt(p0_power * power / (k + 1))
        base.append(cand)
        out.append(cand)
    return np.asarray(out, dtype=p0.dtype).reshape(count, *p0.shape)


def initial_probe_modes(p0: np.ndarray, modes: int, extra_power: float, seed: int) -> np.ndarray:
    """``modes`` probe modes: ``p0`` first, then diverse weaker modes; total power is kept."""
    p0 = np.asarray(p0)
    if modes == 1:
        return p0[None].copy()
    extra = diverse_modes(p0, modes - 1, extra_power, np.random.default_rng(seed))
    probe = np.concatenate([p0[None], extra])
    return probe * np.sqrt(probe_power(p0[None]).sum() / probe_power(probe).sum())


def rms_radius(probe: np.ndarray) -> float:
    """RMS radius (pixels) of a probe's intensity about its centre of mass."""
    inten = np.abs(probe) ** 2
    inten = inten / max(float(inten.sum()), 1e-300)
    y, x = np.mgrid[:probe.shape[0], :probe.shape[1]]
    cy, cx = float((inten * y).sum()), float((inten * x).sum())
    return float(np.sqrt((inten * ((y - cy) ** 2 + (x - cx) ** 2)).sum()))


def pupil_phase_probe(mean_amp: np.ndarray, c: float) -> np.ndarray:
    """The probe whose far field is ``mean_amp`` (zero frequency at [0, 0]) with the quadratic (defocus)
    pupil phase π·c·k², k in units of the Nyquist frequency (c = 0: the focus)."""
    n = mean_amp.shape[-1]
    k = np.fft.fftfreq(n) * 2
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    return np.fft.fftshift(np.fft.ifft2(np.asarray(mean_amp, np.float64) * np.exp(1j * np.pi * c * k2), norm="ortho"))


def defocus_for_size(mean_amp: np.ndarray, target_rms: float) -> float:
    """The c of :func:`pupil_phase_probe` whose probe's RMS radius is closest to ``target_rms`` pixels
    (c on 129 points of [0, n/2])."""
    n = mean_amp.shape[-1]
    return float(min(np.linspace(0, n / 2, 129),
                     key=lambda c: abs(rms_radius(pupil_phase_probe(mean_amp, c)) - target_rms)))


def probe_from_amplitude(mean_amp: np.ndarray, target_rms: float | None = None) -> np.ndarray:
    """A probe whose far field has the mean measured amplitude (zero frequency at [0, 0]).

    With no phase this is the focus, usually far smaller than the beam on the sample; a
    quadratic (defocus) phase is added so that the RMS radius matches ``target_rms`` pixels
    (the engine asks for 2.5 × the median step between neighbouring positions, i.e. the
    overlap the scan was planned for).
    """
    return pupil_phase_probe(mean_amp, defocus_for_size(mean_amp, target_rms) if target_rms else 0.0)


def orthogonalize(probe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthogonal modes sorted by power, and the unitary ``U`` with ``new = U @ old`` over modes.

    The exit waves are mixed with the same ``U`` so the model stays the same: the incoherent sum
    of mode intensities is invariant under a unitary change of the probe-mode basis.
    """
    k = probe.shape[0]
    flat = probe.reshape(k, -1).astype(np.complex128)
    gram = flat.conj() @ flat.T                          # G[a, b] = <P_a, P_b>
    w, v = np.linalg.eigh(gram)
    order = np.argsort(w)[::-1]
    u = v[:, order].T                                    # rows: new modes in the old basis (conjugated below)
    new = (u @ flat).reshape(probe.shape)
    return new.astype(probe.dtype), u.astype(probe.dtype)


def power_fractions(probe: np.ndarray) -> np.ndarray:
    """Fraction of the total intensity carried by each (orthogonalised) mode."""
    p = probe_power(probe)
    return p / max(float(p.sum()), 1e-300)
