"""The steps of the multi-mode Difference Map, one function each.

Equation numbers are those of Dong, Fang, Huang, Yan et al., *High-Performance Multi-Mode
Ptychography Reconstruction on Distributed GPUs* (NSLS-II HXN), after Thibault & Menzel's
mixed-state model. Every function works on one batch of views and is written against the array
module ``be.xp``: these are the definitions, which :class:`hxn_ptycho.backend.NumpyBackend` runs
as they are; the other backends fuse them into whole batch passes (:class:`hxn_ptycho.backend.Backend`)
and are tested against them.

Shapes: object ``(L, H, W)``, probe ``(K, n, n)``, exit waves ``(B, L, K, n, n)``, object windows
``(B, L, n, n)``, ``diffamp`` ``(B, n, n)`` = √I, ``mask`` ``(n, n)`` (true = good) or None.
"""
from __future__ import annotations

from typing import Any

TINY = 1e-30


# (2) ψ_j^(k,l) = P_k · O_l(r − r_j)
def exit_waves(be: Any, probe: Any, obj_windows: Any, out: Any) -> Any:
    return be.xp.multiply(obj_windows[:, :, None], probe[None, None], out=out)


# (3) input of the Fourier projection: 2·P·O − ψ (in real space, dm_step; or on the transforms, F is linear)
def reflect(be: Any, fphi: Any, fpsi: Any, out: Any) -> Any:
    xp = be.xp
    xp.subtract(fphi, fpsi, out=out)
    out += fphi
    return out


# (4) the power bound's relaxation of each view: r = max(r_min, √(pbound / dev)) above the bound, 1 within it
def relaxation(xp: Any, per_view_dev: Any, pbound: float, floor: float = 0.0) -> Any:
    """Per-view factor r of the relaxed projection from the mean squared modulus deviation ``dev``.

    With β = 1, DM then computes ψ ← (1 − r)·DM(ψ) + r·P·O: RAAR with β_RAAR = 1 − r (Luke,
    *Inverse Problems* 21, 37 (2005)), so r is DM's only damping. √(pbound/dev) alone falls as the
    counts rise on data with model errors (dev grows with the counts, the photon-noise bound does
    not); the floor r ≥ ``floor`` keeps the damping independent of the count level.
    """
    r = xp.sqrt(pbound / xp.maximum(per_view_dev, TINY))
    if floor > 0:
        r = xp.maximum(r, floor)
    return xp.where(per_view_dev > pbound, r, 1.0)


class RelaxSum:
    """Σ r of the relaxed projections of a pass, over ``views`` views, and Σ √(bound/deviation)
    (capped at 1) without the floor: the mean of that says whether the bound damps DM at all."""

    def __init__(self) -> None:
        self.total: Any = 0.0
        self.raw: Any = 0.0
        self.views = 0

    def add(self, r: Any, views: int, raw: Any = None) -> None:
        if r is not None:
            self.total = self.total + r.sum()
            self.raw = self.raw + (r if raw is None else raw).sum()
        self.views += views

    def add_sums(self, total: float, raw: float, views: int) -> None:
        """Σ r and Σ r without the floor of ``views`` relaxed views, already summed (a fused pass's)."""
        self.total = self.total + total
        self.raw = self.raw + raw
        self.views += views


# (4) Π_F: Ψ ← √I · Ψ / (Σ_kl |Ψ^(k,l)|²)^½ on good pixels; masked pixels keep the model's modulus
def fourier_projection(be: Any, waves_f: Any, diffamp: Any, mask: Any, pbound: float = 0.0,
                       floor: float = 0.0, stats: RelaxSum | None = None) -> Any:
    """In place on the Fourier-space waves ``(B, L, K, n, n)`` of a batch.

    ``pbound`` > 0 relaxes the projection for noisy data (PtyPy's power bound): a view whose
    mean squared modulus deviation is below ``pbound`` is left as it is, one above it is moved
    only onto the sphere of radius √pbound around the data, i.e. the target modulus is
    √I + r·(|Ψ| − √I) with r = √(pbound / deviation) — factor r + (1 − r)·√I/|Ψ| — but never
    less than ``floor`` (:func:`relaxation`). ``stats`` collects Σ r over the views (r = 0
    without the bound: the exact projection).
    """
    xp = be.xp
    B, n = waves_f.shape[0], waves_f.shape[-1]
    modulus = _modulus(be, waves_f)
    renorm = None
    if pbound > 0:
        dev = xp.subtract(modulus, diffamp)
        if mask is not None:
            dev *= mask
        per_view = xp.square(dev, out=dev).reshape(B, -1).mean(axis=1)
        renorm = relaxation(xp, per_view, pbound, floor).astype(modulus.dtype)
        if stats is not None:
            stats.add(renorm, B, relaxation(xp, per_view, pbound) if floor > 0 else None)
        if not bool((renorm < 1).any()):
            return waves_f                      # every view within the bound: nothing to do
    elif stats is not None:
        stats.add(None, B)
    factor = xp.maximum(modulus, TINY, out=modulus)
    xp.divide(diffamp, factor, out=factor)
    if renorm is not None:
        factor *= (1.0 - renorm)[:, None, None]
        factor += renorm[:, None, None]
    if mask is not None:
        xp.copyto(factor, 1.0, where=~mask)
    waves_f.reshape(B, -1, n, n)[...] *= factor[:, None]
    return waves_f


def _modulus(be: Any, waves_f: Any) -> Any:
    """(Σ over modes of |Ψ|²)^½, per view and pixel: ``(B, n, n)``."""
    xp = be.xp
    B, n = waves_f.shape[0], waves_f.shape[-1]
    w = waves_f.reshape(B, -1, n, n)
    if w.shape[1] == 1:
        return xp.abs(w[:, 0])
    intensity = xp.square(w.real[:, 0])
    intensity += xp.square(w.imag[:, 0])
    for m in range(1, w.shape[1]):
        intensity += xp.square(w.real[:, m])
        intensity += xp.square(w.imag[:, m])
    return xp.sqrt(intensity, out=intensity)


# (3) ψ ← ψ + β · (Π_F(2·P·O − ψ) − P·O), in real space (dm_step) or on the transforms (F is linear)
def dm_update(be: Any, fpsi: Any, fphi: Any, projected: Any, beta: float) -> Any:
    projected -= fphi
    projected *= beta
    fpsi += projected
    return fpsi


# (7) data error of the model: Σ_good (|F(P·O)| − √I)², modes summed incoherently
def data_error(be: Any, fphi: Any, diffamp: Any, mask: Any) -> Any:
    xp = be.xp
    diff = _modulus(be, fphi)
    diff -= diffamp
    if mask is not None:
        diff *= mask
    return xp.sum(xp.square(diff, out=diff), dtype=xp.float64)     # no BLAS: runs in worker threads


# (3), (4), (7) together: the data error of F(P·O), then ψ's DM update through the projection
def fourier_update(be: Any, fpsi: Any, fphi: Any, diffamp: Any, mask: Any, pbound: float, beta: float,
                   floor: float = 0.0, stats: RelaxSum | None = None, work: Any = None) -> Any:
    """One batch's Fourier step on F(ψ) in place; returns Σ_good (|F(P·O)| − √I)². The form the CUDA
    kernel ``fourier_update`` implements (tested against this); the engine runs :func:`dm_step`.

    ``work`` is scratch shaped like ``fpsi``. ``floor`` and ``stats``: those of :func:`fourier_projection`.
    """
    err = data_error(be, fphi, diffamp, mask)                   # (7)
    work = reflect(be, fphi, fpsi, work)                        # F(2·P·O − ψ)
    work = fourier_projection(be, work, diffamp, mask, pbound, floor, stats)  # (4)
    dm_update(be, fpsi, fphi, work, beta)                       # (3)
    return err


# (3), (4), (7) with ψ in real space (the engine's state): ψ ← ψ + β·(F⁻¹Π_F(F(2·P·O − ψ)) − P·O)
def dm_step(be: Any, psi: Any, phi: Any, diffamp: Any, mask: Any, pbound: float, beta: float,
            floor: float = 0.0, stats: RelaxSum | None = None, work: Any = None) -> Any:
    """One batch's DM update of ψ in place from Φ = P·O; returns Σ_good (|F(2·P·O − ψ)| − √I)², the
    data error of the reflected wave that the projection sees (PtyPy's Fourier error).

    The same update as :func:`fourier_update` on F(ψ) (F is linear), with one full-size state
    instead of two: ψ alone is kept, so an iteration still costs one forward and one inverse FFT,
    but the model's own error F(P·O) is not transformed (``error_pass`` measures it when needed).
    ``work`` is scratch shaped like ``psi``; ``floor`` and ``stats``: those of :func:`fourier_projection`.
    """
    work = reflect(be, phi, psi, work)                          # 2·P·O − ψ
    be.fft2(work)
    err = data_error(be, work, diffamp, mask)                   # (7) of the reflected wave
    work = fourier_projection(be, work, diffamp, mask, pbound, floor, stats)  # (4)
    be.ifft2(work)
    dm_update(be, psi, phi, work, beta)                         # (3)
    return err


# (6) numerator of the object update: Σ_k P_k* · ψ^(k,l), per view and object mode
def object_numerator(be: Any, psi: Any, probe_conj: Any, out: Any) -> Any:
    xp = be.xp
    xp.multiply(psi[:, :, 0], probe_conj[0], out=out)
    for k in range(1, psi.shape[2]):
        out += psi[:, :, k] * probe_conj[k]
    return out


# (5) numerator and denominator of the probe update: Σ_j,l O_l* · ψ^(k,l) and Σ_j,l |O_l|²
def probe_sums(be: Any, psi: Any, obj_windows: Any, num: Any, den: Any, work: Any) -> None:
    """Adds the batch's sums to ``num`` (K, n, n) and ``den`` (n, n); ``obj_windows`` is scratch."""
    xp = be.xp
    ow = obj_windows
    den += (xp.square(ow.real) + xp.square(ow.imag)).sum(axis=(0, 1))
    ow = xp.conjugate(ow, out=ow)
    work = xp.multiply(ow[:, :, None], psi, out=work)
    num += work.sum(axis=(0, 1))


# (5), (6) the regularised ratio: X ← (num + α·X_old) / (den + α), α = reg · max(den)
def regularised_ratio(be: Any, num: Any, den: Any, old: Any, reg: float, consume: bool = False,
                      rows: int = 64) -> Any:
    """Written as α·X_old + num, times 1/(den + α): one new array, and a real reciprocal instead of a
    complex division (bit for bit the same values: numpy's complex division by a number with a zero
    imaginary part multiplies by that same reciprocal).

    ``consume``: ``num`` and ``den`` are the caller's to overwrite (fresh sums): the result is
    written into ``num`` — num + α·X_old (the same sum: addition commutes) formed ``rows`` rows
    at a time, 1/(den + α) in ``den`` — with no temporary of the object's size (issue 24)."""
    xp = be.xp
    alpha = reg * float(den.max()) + TINY
    if not consume:
        out = xp.multiply(old, alpha)
        out += num
        out *= xp.reciprocal(den + alpha)
        return out
    for r in range(0, num.shape[-2], rows):
        num[..., r:r + rows, :] += xp.multiply(old[..., r:r + rows, :], alpha)
    den += alpha
    num *= xp.reciprocal(den, out=den)
    return num


# (6) with the workers' sums: O = (Σ_w num_w + α·O_old) / (Σ_w den_w + α), and ε_O of (7)
def object_update(be: Any, nums: Any, dens: Any, old: Any, reg: float, den_at: Any = None) -> tuple[Any, Any]:
    """The object update from the workers' accumulators ``nums`` (L, H, W) and ``dens`` (1, H, W),
    summed in their order (:meth:`hxn_ptycho.parts.BatchScheduler.sum`): the new object (a new array,
    :func:`regularised_ratio`) and its relative change from ``old`` per mode (:func:`relative_change`).
    The accumulators are left zero (the next pass adds to them). ``den_at`` = (probe intensity,
    corners of every view): the denominator Σ_j Σ_k |P_k|²(window j) is formed from them instead
    (``dens`` unused), the views added in their order."""
    def total(parts: Any) -> Any:                 # a new array: first + second (+= the rest)
        out = parts[0] + parts[1] if len(parts) > 1 else parts[0].copy()
        for more in parts[2:]:
            out += more
        return out
    num = total(nums)
    if den_at is None:
        den = total(dens)
    else:
        den = be.zeros((1,) + tuple(old.shape[1:]), old.real.dtype)
        be.scatter_add(den, den_at[1], den_at[0])
    new = regularised_ratio(be, num, den, old, reg, consume=True)
    for a in (*nums, *(dens if den_at is None else ())):
        a[...] = 0
    return new, relative_change(be, new, old)


# (7) relative change ε = ‖X_new − X_old‖ / ‖X_old‖, per mode
def relative_change(be: Any, new: Any, old: Any, rows: int = 64) -> Any:
    """Per mode (axis 0), in the arrays' real precision; the sums are taken ``rows`` rows at a time
    (added in float64): no temporary of the object's size (issue 24)."""
    xp = be.xp
    axes = tuple(range(1, new.ndim))
    num = xp.zeros(new.shape[0], xp.float64)
    den = xp.zeros(new.shape[0], xp.float64)
    for r in range(0, new.shape[-2], rows):
        rn, ro = new[..., r:r + rows, :], old[..., r:r + rows, :]
        num += xp.sum(_sq_parts(xp, xp.subtract(rn, ro), out=True), axis=axes)   # |z|² = re² + im², real view
        den += xp.sum(_sq_parts(xp, ro), axis=axes)
    return be.asnumpy(xp.sqrt(num / xp.maximum(den, TINY))).astype(new.real.dtype, copy=False)


def _sq_parts(xp: Any, z: Any, out: bool = False) -> Any:
    """re² and im² of a C-contiguous complex array, side by side: shape (..., 2·last) of reals
    (summed over the last axis: Σ|z|²), in place when ``out``."""
    z = xp.ascontiguousarray(z)
    r = z.view(z.real.dtype)
    return xp.square(r, out=r) if out else xp.square(r)


# overlap-loop convergence (Thibault et al. 2009): δ = ‖P_new − P_old‖ / ‖P_new‖, all modes together
def probe_change(be: Any, new: Any, old: Any) -> float:
    xp = be.xp
    d = new - old
    num = float(xp.sum(xp.square(d.real) + xp.square(d.imag)))
    den = float(xp.sum(xp.square(new.real) + xp.square(new.imag)))
    return (num / max(den, TINY)) ** 0.5
