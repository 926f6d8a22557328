"""Fused CPU kernels (numba) for the DM passes of :class:`hxn_ptycho.backend.Backend`.

Each pass of the numpy reference (:class:`~hxn_ptycho.backend.NumpyBackend`, the step functions of
:mod:`hxn_ptycho.dm`) sweeps a batch several times and makes temporaries of it; here each is one
loop nest over the batch, in the precision of the arrays (complex64 and float32 throughout for
single precision: the constants are passed in that precision, so nothing is promoted):

- :func:`exit_waves_k`: (2) Φ = P·O straight from the object at the window corners;
- :func:`reflect_at_k`: (2), (3) the reflected wave 2Φ − ψ, Φ = P·O formed from the object at the
  window corners (not stored; ``reflect_win_k`` stores it from sub-pixel windows);
- :func:`project_k`: after its FFT, (7) the data error of the reflected wave and (4) the exact modulus
  projection, in one sweep, with each view's relaxation r of the power bound kept aside (the
  relaxed projection the reference applies in Fourier space is mixed in real space by the update:
  F⁻¹ is linear, and 2Φ − ψ is what the update forms anyway);
- :func:`dm_update_at_k`: after the inverse FFT, (3) ψ ← ψ + β((1 − r)F⁻¹Π_F(…) + r(2Φ − ψ) − Φ) in
  real space, Φ formed again from the object (``dm_update_k`` from a stored Φ); ψ is the only
  full-size state: no F(ψ) is kept;
- :func:`object_sums_k`: (6) Σ_k P_k*·ψ and Σ_k |P_k|² scattered onto the object;
- :func:`probe_sums_k`: (5) Σ O*·ψ and Σ |O|² from the object windows read in place.

The FFTs stay ``scipy.fft`` (pocketfft). Threads: the engine splits the batches of views
statically over ``threads`` workers, each with its own accumulators (``parts.BatchScheduler``);
the kernels release the GIL (``nogil``), so the workers run them in parallel — the threads go
across views, and the sums need neither atomics nor locks and add up in a fixed order.
Compiled code is cached on disk (``cache=True``, numba's cache beside this file or under
``NUMBA_CACHE_DIR``): the first run on a machine compiles (measured in docs/performance.md),
later processes load it.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import numpy as np

from .backend import ALIGN, BatchBuffers, HostBackend, ObjectSums

try:
    import numba
    import numba.core.entrypoints as _numba_entrypoints
except ImportError as exc:  # pragma: no cover - numba is a core dependency
    raise ImportError(f"the numba backend needs numba (pip install numba): {exc}") from None

from . import residency

logger = logging.getLogger(__name__)


def _skip_numba_extensions() -> bool:
    """Keep numba from importing the third-party extensions it finds installed (entry points
    ``numba_extensions``: here awkward and sparse, which the Tiled stack brings) when the first
    kernel is loaded: these kernels use none of their types, and the imports cost 45–53 MiB of
    resident memory and 0.3 s of a rank's start. A process that already loaded them keeps them;
    a later ``import awkward`` still registers its own numba support when it is used. Returns
    whether the extensions were skipped here."""
    if getattr(_numba_entrypoints, "_already_initialized", True):
        return False
    _numba_entrypoints._already_initialized = True
    return True


_skip_numba_extensions()
TINY = 1e-30

# reassoc: the sums over pixels (the error, the deviations) vectorise; contract: fused multiply-adds.
# Both change rounding only (no NaN/Inf assumptions: a diverging run still shows as non-finite).
_FAST = {"reassoc", "contract", "nsz"}
_jit = numba.njit(nogil=True, cache=True, fastmath=_FAST, error_model="numpy", boundscheck=False)
# The per-row helpers shared by several kernels are inlined into each in numba's IR: as plain njit
# calls they cost a call a row (exit_waves_k 1.25 × slower; inlined: equal, docs/performance.md).
_inline = numba.njit(nogil=True, cache=True, fastmath=_FAST, error_model="numpy", boundscheck=False,
                     inline="always")

# The loops run over rows: the innermost loop is along a row of n pixels, indexed from 0 through
# row views (so numba emits no negative-index wrap-around and LLVM vectorises it); modes are looped
# outside it, with per-row scratch. The kernels on the object (windows at the integer corners
# ``pos``) and on gathered sub-pixel windows share the row helpers below.


@_inline
def _window_row(a, pos, b, l, i, m):
    """a[l, pos[b, 0] + i, pos[b, 1]:pos[b, 1] + m]: row i of view b's window of object mode l."""
    c0 = pos[b, 1]
    return a[l, pos[b, 0] + i, c0:c0 + m]


@_inline
def _exit_wave_row(orow, probe, out, b, l, i):
    """(2) on row i: out[b, l, k, i] = orow · P_k[i] for every probe mode k."""
    for k in range(out.shape[2]):
        prow = probe[k, i]
        dst = out[b, l, k, i]
        for j in range(dst.shape[0]):
            dst[j] = orow[j] * prow[j]


@_inline
def _probe_sums_row(orow, psi, b, l, i, num, den):
    """(5) on row i: den[i] += |orow|², num[k, i] += orow*·ψ[b, l, k, i] for every probe mode k."""
    m = orow.shape[0]
    drow = den[i]
    if psi.shape[2] == 1:           # one probe mode: both sums in one loop (each object pixel loaded once)
        dst = num[0, i]
        src = psi[b, l, 0, i]
        for j in range(m):
            o = orow[j]
            drow[j] += o.real * o.real + o.imag * o.imag
            dst[j] += o.conjugate() * src[j]
        return
    for j in range(m):
        drow[j] += orow[j].real * orow[j].real + orow[j].imag * orow[j].imag
    for k in range(psi.shape[2]):
        dst = num[k, i]
        src = psi[b, l, k, i]
        for j in range(m):
            dst[j] += orow[j].conjugate() * src[j]


# (2) out[b, l, k] = O_l(window b) · P_k
@_jit
def exit_waves_k(obj, pos, probe, out):
    B, L, K, n, m = out.shape
    for b in range(B):
        for l in range(L):
            for i in range(n):
                _exit_wave_row(_window_row(obj, pos, b, l, i, m), probe, out, b, l, i)


# (2) from gathered (sub-pixel) windows: out[b, l, k] = W[b, l] · P_k
@_jit
def exit_waves_win_k(win, probe, out):
    B, L, K, n, m = out.shape
    for b in range(B):
        for l in range(L):
            for i in range(n):
                _exit_wave_row(win[b, l, i], probe, out, b, l, i)


# (7) Σ_good (|F(Φ)| − √I)², modes summed incoherently; fphi (B, M, n, n)
@_jit
def data_error_k(fphi, amp, mask, use_mask):
    B, M, n, m = fphi.shape
    sp = np.empty(m, amp.dtype)
    err = 0.0
    for b in range(B):
        for i in range(n):
            _row_intensity(fphi, b, i, sp)
            arow = amp[b, i]
            e = sp[0] * 0
            if use_mask:
                mrow = mask[i]
                for j in range(m):
                    d = np.sqrt(sp[j]) - arow[j]
                    e += d * d * mrow[j]
            else:
                for j in range(m):
                    d = np.sqrt(sp[j]) - arow[j]
                    e += d * d
            err += e
    return err


@_jit
def _row_intensity(f, b, i, out):
    """out[j] = Σ_q |f[b, q, i, j]|²."""
    M = f.shape[1]
    row = f[b, 0, i]
    for j in range(out.shape[0]):
        out[j] = row[j].real * row[j].real + row[j].imag * row[j].imag
    for q in range(1, M):
        row = f[b, q, i]
        for j in range(out.shape[0]):
            out[j] += row[j].real * row[j].real + row[j].imag * row[j].imag


@_inline
def _reflect_row(orow, prow, p, dst, m):
    """dst = 2Φ − ψ on one row, Φ = orow·prow."""
    for j in range(m):
        v = orow[j] * prow[j]
        dst[j] = v + v - p[j]


# (3) the reflected wave 2Φ − ψ alone, Φ = O_l(window b)·P_k formed on the fly (not stored:
# dm_update_at_k forms it again, which costs less than writing and reading it back)
@_jit
def reflect_at_k(obj, pos, probe, psi, out):
    B, L, K, n, m = out.shape
    for b in range(B):
        r0 = pos[b, 0]
        c0 = pos[b, 1]
        for l in range(L):
            for i in range(n):
                orow = obj[l, r0 + i, c0:c0 + m]
                if K == 1:          # one probe mode: the row without the mode loop (~2 % faster)
                    _reflect_row(orow, probe[0, i], psi[b, l, 0, i], out[b, l, 0, i], m)
                    continue
                for k in range(K):
                    _reflect_row(orow, probe[k, i], psi[b, l, k, i], out[b, l, k, i], m)


@_inline
def _dm_coefficients(r, beta, one):
    """(3) with (4)'s relaxation r: ψ + β·((1 − r)·F⁻¹Π_F + r·(2Φ − ψ) − Φ) = a₁ψ + a₂F⁻¹Π_F + a₃Φ."""
    return one - beta * r, beta * (one - r), beta * (r + r - one)


@_inline
def _dm_value(p, x, f, a1, a2, a3):
    """a₁ψ + a₂x + a₃Φ on one pixel, by real and imaginary parts (real × complex products as complex
    ones would multiply by a zero imaginary part too)."""
    return complex(a1 * p.real + a2 * x.real + a3 * f.real, a1 * p.imag + a2 * x.imag + a3 * f.imag)


@_inline
def _update_num_row(orow, prow, p, x, dst, m, a1, a2, a3):
    """(3) on one row, ψ ← a₁ψ + a₂x + a₃Φ (Φ = orow·prow), then (6)'s numerator dst += P*·ψ; P* is
    formed from the probe row in hand (not read from a stored conj(P): one stream less, the same values)."""
    for j in range(m):
        q = prow[j]
        v = _dm_value(p[j], x[j], orow[j] * q, a1, a2, a3)
        p[j] = v
        dst[j] += q.conjugate() * v


# (3) ψ ← ψ + β·((1 − r)·F⁻¹Π_F(F(2Φ − ψ)) + r·(2Φ − ψ) − Φ), Φ = O_l(window b)·P_k formed again from
# the object (r: project_k's relax; 2Φ − ψ from Φ and the old ψ in registers)
@_jit
def dm_update_at_k(psi, obj, pos, probe, proj, beta, relax, one):
    B, L, K, n, m = psi.shape
    for b in range(B):
        r0 = pos[b, 0]
        c0 = pos[b, 1]
        a1, a2, a3 = _dm_coefficients(relax[b], beta, one)
        for l in range(L):
            for i in range(n):
                orow = obj[l, r0 + i, c0:c0 + m]
                for k in range(K):
                    prow = probe[k, i]
                    p = psi[b, l, k, i]
                    x = proj[b, l, k, i]
                    for j in range(m):
                        p[j] = _dm_value(p[j], x[j], orow[j] * prow[j], a1, a2, a3)


# (3) then the numerator of (6) in the same sweep: ψ ← ψ + β·(…) as dm_update_at_k, and the new ψ's
# num[l, window b] += Σ_k P_k*·ψ[b, l, k] (the additions object_sums_k makes, in its order; to rounding,
# as the compiler may fuse the multiply-adds differently). On one process object_update then forms the
# denominator from the probe and the corners (den_band_k); else dm_update_sums_at_k adds it per view
@_jit
def dm_update_num_at_k(psi, obj, pos, probe, proj, beta, relax, one, num):
    B, L, K, n, m = psi.shape
    for b in range(B):
        r0 = pos[b, 0]
        c0 = pos[b, 1]
        a1, a2, a3 = _dm_coefficients(relax[b], beta, one)
        for l in range(L):
            for i in range(n):
                orow = obj[l, r0 + i, c0:c0 + m]
                dst = num[l, r0 + i, c0:c0 + m]
                if K == 1:          # one probe mode: the row without the mode loop (~3 % faster)
                    _update_num_row(orow, probe[0, i], psi[b, l, 0, i], proj[b, l, 0, i], dst, m, a1, a2, a3)
                    continue
                for k in range(K):
                    _update_num_row(orow, probe[k, i], psi[b, l, k, i], proj[b, l, k, i], dst, m, a1, a2, a3)


# (3) then (6) in the same sweep: dm_update_num_at_k, then the views' den[0, window b] += Σ_k |P_k|²
# (den apart from num, so each array's additions keep object_sums_k's order)
@_jit
def dm_update_sums_at_k(psi, obj, pos, probe, proj, beta, relax, one, pint, num, den):
    dm_update_num_at_k(psi, obj, pos, probe, proj, beta, relax, one, num)
    B, n, m = psi.shape[0], psi.shape[3], psi.shape[4]
    for b in range(B):
        r0 = pos[b, 0]
        c0 = pos[b, 1]
        for i in range(n):
            drow = den[0, r0 + i, c0:c0 + m]
            src = pint[i]
            for j in range(m):
                drow[j] += src[j]


# (6) the denominator Σ_j Σ_k |P_k|²(window j) on rows r0:r1 of den, every view's window rows in
# that band added in the views' order, a few rows at a time (they stay in L1 while every view adds to
# them); returns the band's largest value (α's scale)
@_jit
def den_band_k(pint, pos, den, r0, r1):
    n, m = pint.shape
    W = den.shape[2]
    top = pint[0, 0] * 0
    step = 8
    for s0 in range(r0, r1, step):
        s1 = min(s0 + step, r1)
        for r in range(s0, s1):
            row = den[0, r]
            for j in range(W):
                row[j] = 0
        for b in range(pos.shape[0]):
            y0 = pos[b, 0]
            if y0 >= s1 or y0 + n <= s0:
                continue
            c0 = pos[b, 1]
            for r in range(max(y0, s0), min(y0 + n, s1)):
                src = pint[r - y0]
                dst = den[0, r, c0:c0 + m]
                for j in range(m):
                    dst[j] += src[j]
        for r in range(s0, s1):
            row = den[0, r]
            for j in range(W):
                if row[j] > top or row[j] != row[j]:
                    top = row[j]
    return top


# (2), (3) from gathered (sub-pixel) windows: Φ = W[b, l]·P_k into phi, 2Φ − ψ into out
@_jit
def reflect_win_k(win, probe, psi, phi, out):
    B, L, K, n, m = out.shape
    for b in range(B):
        for l in range(L):
            for i in range(n):
                wrow = win[b, l, i]
                for k in range(K):
                    prow = probe[k, i]
                    f = phi[b, l, k, i]
                    p = psi[b, l, k, i]
                    dst = out[b, l, k, i]
                    for j in range(m):
                        v = wrow[j] * prow[j]
                        f[j] = v
                        dst[j] = v + v - p[j]


# (4), (7): Π_F in place on the reflected waves, w ← √I·w/|w| (w where masked), in one sweep; the power
# bound's relaxation r of each view into ``relax`` (the update takes (1 − r)·F⁻¹Π_F + r·(2Φ − ψ));
# returns Σ_good (|F(2Φ − ψ)| − √I)²
@_jit
def project_k(w, amp, rows, mask, use_mask, pbound, floor, tiny, one, relax):
    """``w`` (B, M, n, n) Fourier-space reflected waves; view b's frame ``amp[rows[b]]`` (``rows``
    (B,) int64: the frames read where they lie, not gathered); ``pbound``, ``floor``,
    ``tiny``, ``one`` in the arrays' real precision. Writes the exact projection Π_F into ``w`` and
    each view's r (dm.relaxation, in the arrays' precision) into ``relax`` (B,): 1 within the bound,
    0 without a bound. The relaxed projection of the reference, F(2Φ − ψ)·((√I/|w|)(1 − r) + r), is
    by the linearity of F⁻¹ the mix (1 − r)·F⁻¹Π_F + r·(2Φ − ψ) that the update kernels form in real
    space (``_dm_coefficients``): one sweep here where the relaxed projection needs two (the view's
    deviation decides r only once the view has been read). Returns (the error (7), Σ_b r_b, Σ_b r_b
    without the floor); the sums in float64 (0, 0 without the bound: ``dm.RelaxSum.add_sums``)."""
    B, M, n, m = w.shape
    raw = np.empty(B, amp.dtype)
    sum_relax = 0.0
    sum_raw = 0.0
    sr = np.empty(m, amp.dtype)          # Σ_q |w|² of a row
    fac = np.empty(m, amp.dtype)
    zero = one - one
    err = 0.0
    npix = n * m
    for b in range(B):
        dev = 0.0
        for i in range(n):
            arow = amp[rows[b], i]
            e = zero
            if M == 1:              # one mode: each pixel read and written once, in one loop
                row = w[b, 0, i]
                if use_mask:
                    mrow = mask[i]
                    for j in range(m):
                        x = row[j]
                        s = np.sqrt(x.real * x.real + x.imag * x.imag)
                        d = s - arow[j]
                        e += d * d * (one if mrow[j] else zero)
                        f = arow[j] / max(s, tiny) if mrow[j] else one
                        row[j] = complex(x.real * f, x.imag * f)
                else:
                    for j in range(m):
                        x = row[j]
                        s = np.sqrt(x.real * x.real + x.imag * x.imag)
                        d = s - arow[j]
                        e += d * d
                        f = arow[j] / max(s, tiny)
                        row[j] = complex(x.real * f, x.imag * f)
                dev += e
                continue
            _row_intensity(w, b, i, sr)
            if use_mask:
                mrow = mask[i]
                for j in range(m):
                    s = np.sqrt(sr[j])
                    d = s - arow[j]
                    e += d * d * (one if mrow[j] else zero)
                    fac[j] = arow[j] / max(s, tiny) if mrow[j] else one
            else:
                for j in range(m):
                    s = np.sqrt(sr[j])
                    d = s - arow[j]
                    e += d * d
                    fac[j] = arow[j] / max(s, tiny)
            dev += e
            for q in range(M):
                row = w[b, q, i]
                for j in range(m):
                    row[j] = row[j] * fac[j]
        err += dev
        if pbound <= 0:
            relax[b] = zero         # the exact projection
            continue
        dev = dev / npix
        if dev > pbound:
            rr = np.sqrt(pbound / max(dev, 1e-30))
            raw[b] = rr
            if floor > 0 and rr < floor:
                rr = floor
            relax[b] = rr           # in the arrays' precision, as the reference's
            sum_relax += relax[b]
            sum_raw += raw[b]
        else:
            relax[b] = one          # within the bound: the view stays as it is (2Φ − ψ)
            sum_relax += 1.0
            sum_raw += 1.0
    return err, sum_relax, sum_raw


# (3) ψ ← ψ + β·((1 − r)·F⁻¹Π_F(F(2Φ − ψ)) + r·(2Φ − ψ) − Φ), in real space (r: project_k's relax)
@_jit
def dm_update_k(psi, phi, proj, beta, relax, one):
    B, M, n, m = psi.shape
    for b in range(B):
        a1, a2, a3 = _dm_coefficients(relax[b], beta, one)
        for q in range(M):
            for i in range(n):
                p = psi[b, q, i]
                f = phi[b, q, i]
                x = proj[b, q, i]
                for j in range(m):
                    p[j] = _dm_value(p[j], x[j], f[j], a1, a2, a3)


# (6) num[l, window b] += Σ_k P_k*·ψ[b, l, k], den[0, window b] += Σ_k |P_k|²
@_jit
def object_sums_k(psi, pconj, pint, pos, num, den):
    B, L, K, n, m = psi.shape
    for b in range(B):
        r0 = pos[b, 0]
        c0 = pos[b, 1]
        for l in range(L):
            for i in range(n):
                dst = num[l, r0 + i, c0:c0 + m]
                for k in range(K):
                    pc = pconj[k, i]
                    src = psi[b, l, k, i]
                    for j in range(m):
                        dst[j] += pc[j] * src[j]
        for i in range(n):
            dst = den[0, r0 + i, c0:c0 + m]
            src = pint[i]
            for j in range(m):
                dst[j] += src[j]


# (6) the numerator alone, per view (sub-pixel windows: the bilinear scatter follows)
@_jit
def object_numerator_k(psi, pconj, out):
    B, L, K, n, m = psi.shape
    for b in range(B):
        for l in range(L):
            for i in range(n):
                dst = out[b, l, i]
                pc = pconj[0, i]
                src = psi[b, l, 0, i]
                for j in range(m):
                    dst[j] = pc[j] * src[j]
                for k in range(1, K):
                    pc = pconj[k, i]
                    src = psi[b, l, k, i]
                    for j in range(m):
                        dst[j] += pc[j] * src[j]


# (5) num[k] += Σ_b,l O_l*(window b)·ψ[b, l, k], den += Σ_b,l |O_l(window b)|²
@_jit
def probe_sums_k(psi, obj, pos, num, den):
    B, L, K, n, m = psi.shape
    for b in range(B):
        for l in range(L):
            for i in range(n):
                _probe_sums_row(_window_row(obj, pos, b, l, i, m), psi, b, l, i, num, den)


# (5) from gathered (sub-pixel) windows
@_jit
def probe_sums_win_k(psi, win, num, den):
    B, L, K, n, m = psi.shape
    for b in range(B):
        for l in range(L):
            for i in range(n):
                _probe_sums_row(win[b, l, i], psi, b, l, i, num, den)


# (6) α's scale: the largest Σ_w den_w over rows r0:r1 (the workers' denominators added in their order)
@_jit
def den_max_k(dens, r0, r1):
    W = dens[0].shape[2]
    s = np.empty(W, dens[0].dtype)
    top = dens[0][0, r0, 0] * 0
    for r in range(r0, r1):
        first = dens[0][0, r]
        for j in range(W):
            s[j] = first[j]
        for t in range(1, len(dens)):
            row = dens[t][0, r]
            for j in range(W):
                s[j] += row[j]
        for j in range(W):
            if s[j] > top or s[j] != s[j]:       # NaN wins (a diverged run stays visible)
                top = s[j]
    return top


# (6) O = (Σ_w num_w + α·O_old) · 1/(Σ_w den_w + α) over rows r0:r1, the accumulators zeroed as they
# are read, and the sums of ε_O (7): change[l] += (Σ|O − O_old|², Σ|O_old|²) — dm.object_update in one sweep
@_jit
def object_update_k(nums, dens, old, alpha, one, out, change, r0, r1):
    L, H, W = old.shape
    T = len(nums)
    inv = np.empty(W, dens[0].dtype)
    acc = np.empty(W, old.dtype)
    for r in range(r0, r1):
        first = dens[0][0, r]
        for j in range(W):
            inv[j] = first[j]
            first[j] = 0
        for t in range(1, len(dens)):
            row = dens[t][0, r]
            for j in range(W):
                inv[j] += row[j]
                row[j] = 0
        for j in range(W):
            inv[j] = one / (inv[j] + alpha)
        for l in range(L):
            first = nums[0][l, r]
            for j in range(W):
                acc[j] = first[j]
                first[j] = 0
            for t in range(1, T):
                row = nums[t][l, r]
                for j in range(W):
                    acc[j] += row[j]
                    row[j] = 0
            orow = old[l, r]
            dst = out[l, r]
            dn = 0.0
            do = 0.0
            for j in range(W):
                o = orow[j]
                v = (acc[j] + o * alpha) * inv[j]
                dst[j] = v
                d = v - o
                dn += d.real * d.real + d.imag * d.imag
                do += o.real * o.real + o.imag * o.imag
            change[l, 0] += dn
            change[l, 1] += do


KERNELS = (exit_waves_k, exit_waves_win_k, data_error_k, reflect_at_k, reflect_win_k, project_k,
           dm_update_k, dm_update_at_k, dm_update_sums_at_k, object_sums_k, object_numerator_k, probe_sums_k, probe_sums_win_k,
           dm_update_num_at_k, den_band_k, den_max_k, object_update_k)


def _views(a: np.ndarray) -> np.ndarray:
    """``(B, L, K, n, n)`` as ``(B, L·K, n, n)`` (a view: the arrays are C-contiguous)."""
    return a.reshape(a.shape[0], -1, a.shape[-2], a.shape[-1])


_PREPARED: set[str] = set()      # the precisions whose kernels this process has loaded (prepare)


class NumbaBackend(HostBackend):
    """CPU backend with the DM passes fused (numba); FFTs by ``scipy.fft``; ML and position sums are
    the numpy definitions (:class:`~hxn_ptycho.backend.HostBackend`'s)."""

    name = "numba"

    def __init__(self, threads: int | None = None) -> None:
        super().__init__(threads)
        self._mask_cache: tuple[Any, np.ndarray] | None = None
        self._probe_cache: tuple[Any, np.ndarray] | None = None
        self._iota = np.arange(64, dtype=np.int64)      # the frames' indices of a batch given its frames
        self._const_cache: dict[tuple, tuple] = {}
        self._no_mask = np.ones((1, 1), np.bool_)

    def _mask(self, mask: Any, n: int, m: int) -> tuple[np.ndarray, bool]:
        if mask is None:
            return self._no_mask, False
        cached = self._mask_cache
        if cached is None or cached[0] is not mask:
            cached = self._mask_cache = (mask, np.ascontiguousarray(mask, dtype=np.bool_))
        return cached[1], True

    def _rows(self, rows: Any, B: int) -> np.ndarray:
        """The frames' indices of a batch: ``rows``, or 0..B−1 (the frames are the batch's)."""
        if rows is not None:
            return np.ascontiguousarray(rows, dtype=np.int64)
        if len(self._iota) < B:
            self._iota = np.arange(max(B, 64), dtype=np.int64)
        return self._iota[:B]

    @staticmethod
    def _pos(pos: Any) -> np.ndarray:
        return np.ascontiguousarray(pos, dtype=np.int64)

    def _phi(self, obj: Any, pos: Any, probe: Any, out: Any, windows: Any) -> Any:
        if windows is None:
            exit_waves_k(obj, self._pos(pos), probe, out)
        else:
            exit_waves_win_k(windows, probe, out)
        return out

    def exit_waves(self, obj: Any, pos: Any, probe: Any, out: Any, windows: Any = None) -> Any:
        """(2) of a batch into ``out`` (B, L, K, n, n)."""
        return self._phi(obj, pos, probe, out, windows)

    def _consts(self, dtype: Any, pbound: float, floor: float, beta: float) -> tuple:
        """(pbound, floor, tiny, one, beta) in the real precision of ``dtype``: made once per setting,
        not per batch (numpy scalars cost a call each, and a batch's Python time counts: issue 24)."""
        key = (dtype, pbound, floor, beta)
        c = self._const_cache.get(key)
        if c is None:
            rdt = np.dtype(dtype).type(0).real.dtype.type
            c = self._const_cache[key] = (rdt(pbound), rdt(floor), rdt(TINY), rdt(1), rdt(beta))
        return c

    def fourier_pass(self, obj: Any, pos: Any, probe: Any, psi: Any, diffamp: Any, mask: Any,
                     pbound: float, beta: float, floor: float, stats: Any, buf: BatchBuffers,
                     windows: Any = None, sums: ObjectSums | None = None, rows: Any = None) -> Any:
        B = len(psi)
        if B == 0:
            return 0.0
        work = buf.work[:B]
        probe = self._aligned(probe)
        cpb, cfl, ctiny, cone, cbeta = self._consts(psi.dtype, pbound, floor, beta)
        if windows is None:
            ipos = self._pos(pos)
            reflect_at_k(obj, ipos, probe, psi, work)                                     # 2Φ − ψ
        else:
            phi = buf.phi[:B]
            reflect_win_k(windows, probe, psi, phi, work)                                 # Φ, 2Φ − ψ
        self.fft2(work)
        m, use = self._mask(mask, psi.shape[-2], psi.shape[-1])
        relax = np.empty(B, cone.dtype)                                                  # r of each view
        err, sum_r, sum_raw = project_k(_views(work), diffamp, self._rows(rows, B), m, use, cpb, cfl, ctiny,
                                        cone, relax)                                      # (4), (7)
        if stats is not None:
            stats.add_sums(sum_r, sum_raw, B) if pbound > 0 else stats.add(None, B)
        self.ifft2(work)
        if windows is None:
            if sums is not None and sums.den is None:                                     # (3), (6)'s numerator
                dm_update_num_at_k(psi, obj, ipos, probe, work, cbeta, relax, cone, sums.num)
            elif sums is not None:                                                        # (3), (6)
                dm_update_sums_at_k(psi, obj, ipos, probe, work, cbeta, relax, cone,
                                    self._pint(sums.probe_intensity, sums.den), sums.num, sums.den)
            else:
                dm_update_at_k(psi, obj, ipos, probe, work, cbeta, relax, cone)           # (3)
            return err
        dm_update_k(_views(psi), _views(phi), _views(work), cbeta, relax, cone)
        if sums is not None:                                                              # (6), sub-pixel
            if sums.den is None:
                src = buf.onum_src[:B]
                object_numerator_k(psi, self._pconj(sums.probe_conj, psi), src)
                self.scatter_add_subpixel(sums.num, pos, src)
            else:
                self.object_pass(psi, sums.probe_conj, sums.probe_intensity, pos, sums.num, sums.den, buf, True)
        return err

    def _aligned(self, probe: np.ndarray) -> np.ndarray:
        """``probe`` in an array starting on a cache line (every view's rows read it: the kernels'
        loads stay within a line), copied once per probe (the engine makes a new one per update)."""
        cached = self._probe_cache
        if cached is not None and cached[0] is probe:
            return cached[1]
        if probe.ctypes.data % ALIGN == 0 and probe.flags.c_contiguous:
            out = probe
        else:
            out = self.empty(probe.shape, probe.dtype)
            out[...] = probe
        self._probe_cache = (probe, out)
        return out

    @staticmethod
    def _pconj(probe_conj: Any, psi: Any) -> np.ndarray:
        return np.ascontiguousarray(probe_conj, dtype=psi.dtype)

    @staticmethod
    def _pint(probe_intensity: Any, den: Any) -> np.ndarray:
        return np.ascontiguousarray(probe_intensity, dtype=den.dtype)

    def object_pass(self, psi: Any, probe_conj: Any, probe_intensity: Any, pos: Any, obj_num: Any, obj_den: Any,
                    buf: BatchBuffers, subpixel: bool = False) -> None:
        if len(psi) == 0:
            return
        pconj = self._pconj(probe_conj, psi)
        pint = self._pint(probe_intensity, obj_den)
        if subpixel:
            src = buf.onum_src[:len(psi)]
            object_numerator_k(psi, pconj, src)
            self.scatter_add_subpixel(obj_num, pos, src)
            self.scatter_add_subpixel(obj_den, pos, pint)
        else:
            object_sums_k(psi, pconj, pint, self._pos(pos), obj_num, obj_den)

    def object_update(self, nums: Sequence[Any], dens: Sequence[Any] | None, old: Any, reg: float,
                      split: Callable[[Callable[[int, int], None]], None] | None = None,
                      den_at: tuple[Any, Any] | None = None) -> tuple[Any, np.ndarray]:
        """``dm.object_update`` in two sweeps over the object's rows, each shared out by ``split``:
        the largest denominator (α) — with ``den_at`` the denominator itself, each part its band of
        rows from every view (``den_band_k``: in cache, where the Fourier pass's scatter of it went to
        L3) —, then the ratio, ε_O's sums and the accumulators zeroed: in place of the reference's
        serial sums, ratio, change and reset (docs/performance.md, session 21's second pass)."""
        H = old.shape[1]
        run = split or (lambda fn: fn(0, 1))
        tops: dict[int, float] = {}
        if den_at is not None:
            pint, corners = den_at
            den = self.empty((1,) + old.shape[1:], old.real.dtype)
            pint, corners = self._pint(pint, den), self._pos(corners)
            dens = (den,)

            def top(part: int, parts: int) -> None:
                tops[part] = den_band_k(pint, corners, den, H * part // parts, H * (part + 1) // parts)
        else:
            assert dens is not None
            dens = tuple(dens)

            def top(part: int, parts: int) -> None:
                tops[part] = den_max_k(dens, H * part // parts, H * (part + 1) // parts)
        nums = tuple(nums)
        run(top)
        rdt = dens[0].dtype.type
        alpha = rdt(reg * float(np.max([tops[p] for p in sorted(tops)])) + TINY)
        new = self.empty(old.shape, old.dtype)
        changes: dict[int, np.ndarray] = {}

        def ratio(part: int, parts: int) -> None:
            ch = changes[part] = np.zeros((old.shape[0], 2))
            object_update_k(nums, dens, old, alpha, rdt(1), new, ch, H * part // parts, H * (part + 1) // parts)
        run(ratio)
        ch = np.zeros((old.shape[0], 2))
        for p in sorted(changes):               # the parts' sums in a fixed order
            ch += changes[p]
        eps = np.sqrt(ch[:, 0] / np.maximum(ch[:, 1], TINY)).astype(dens[0].dtype, copy=False)
        return new, eps

    def probe_pass(self, psi: Any, obj: Any, pos: Any, num: Any, den: Any, buf: BatchBuffers,
                   windows: Any = None) -> None:
        if len(psi) == 0:
            return
        if windows is None:
            probe_sums_k(psi, obj, self._pos(pos), num, den)
        else:
            probe_sums_win_k(psi, windows, num, den)

    def error_pass(self, obj: Any, pos: Any, probe: Any, diffamp: Any, mask: Any, buf: BatchBuffers,
                   windows: Any = None) -> Any:
        B = len(diffamp)
        if B == 0:
            return 0.0
        fphi = self.fft2(self._phi(obj, pos, probe, buf.phi[:B], windows))
        m, use = self._mask(mask, fphi.shape[-2], fphi.shape[-1])
        return data_error_k(_views(fphi), diffamp, m, use)

    def prepare(self, cdtype: Any = np.complex64) -> None:
        """Before a reconstruction allocates its arrays: load every kernel for ``cdtype`` from the
        cache (compiled on a machine's first run), then give back what loading left resident —
        the heap it freed and LLVM's start-up code pages (:mod:`hxn_ptycho.residency`): the
        loaded kernels never call into LLVM again. All thirteen are loaded (1–2 MiB more than
        the few of a plain DM run) so that no later pass, ML or sub-pixel, loads one and touches
        LLVM's code again. Once per precision and process."""
        key = np.dtype(cdtype).str
        if key in _PREPARED:
            return
        secs = self.warm_up(cdtype)
        trimmed = residency.trim_heap()
        released = residency.release_library_code()
        _PREPARED.add(key)
        logger.debug("numba kernels for %s loaded in %.3f s; heap trimmed: %s; %.0f MiB of LLVM's code "
                     "pages released", key, secs, trimmed, released / 2**20)

    def warm_up(self, cdtype: Any = np.complex64) -> float:
        """Compile (first run) or load (cached) every kernel for ``cdtype``; returns the seconds."""
        t0 = time.perf_counter()
        cdt = np.dtype(cdtype)
        rdt = np.float32 if cdt == np.complex64 else np.float64
        n, B, L, K = 4, 1, 1, 1
        obj = np.ones((L, n + 1, n + 1), cdt)
        pos = np.zeros((B, 2), np.int64)
        probe = np.ones((K, n, n), cdt)
        waves = np.ones((B, L, K, n, n), cdt)
        win = np.ones((B, L, n, n), cdt)
        amp = np.ones((B, n, n), rdt)
        m = np.ones((n, n), np.bool_)
        exit_waves_k(obj, pos, probe, waves)
        exit_waves_win_k(win, probe, waves)
        data_error_k(_views(waves), amp, m, True)
        reflect_win_k(win, probe, waves.copy(), waves.copy(), waves)
        relax = np.zeros(B, rdt)
        project_k(_views(waves), amp, np.zeros(B, np.int64), m, True, rdt(0), rdt(0), rdt(TINY), rdt(1), relax)
        dm_update_k(_views(waves), _views(waves.copy()), _views(waves.copy()), rdt(1), relax, rdt(1))
        reflect_at_k(obj, pos, probe, waves.copy(), waves)
        dm_update_at_k(waves, obj, pos, probe, waves.copy(), rdt(1), relax, rdt(1))
        dm_update_sums_at_k(waves, obj, pos, probe, waves.copy(), rdt(1), relax, rdt(1), np.ones((n, n), rdt),
                            np.zeros_like(obj), np.zeros((1, n + 1, n + 1), rdt))
        object_sums_k(waves, probe, np.ones((n, n), rdt), pos, np.zeros_like(obj), np.zeros((1, n + 1, n + 1), rdt))
        object_numerator_k(waves, probe, win)
        probe_sums_k(waves, obj, pos, np.zeros_like(probe), np.zeros((n, n), rdt))
        probe_sums_win_k(waves, win, np.zeros_like(probe), np.zeros((n, n), rdt))
        for T in sorted({1, self.workers}):         # the object update over the engine's workers' sums
            dens = tuple(np.zeros((1, n + 1, n + 1), rdt) for _ in range(T))
            nums = tuple(np.zeros_like(obj) for _ in range(T))
            den_max_k(dens, 0, n + 1)
            object_update_k(nums, dens, obj, rdt(1), rdt(1), np.empty_like(obj), np.zeros((L, 2)), 0, n + 1)
            object_update_k(nums, dens[:1], obj, rdt(1), rdt(1), np.empty_like(obj), np.zeros((L, 2)), 0, n + 1)
        den_band_k(np.ones((n, n), rdt), pos, np.zeros((1, n + 1, n + 1), rdt), 0, n + 1)
        dm_update_num_at_k(waves, obj, pos, probe, waves.copy(), rdt(1), relax, rdt(1), np.zeros_like(obj))
        secs = time.perf_counter() - t0
        logger.debug("numba kernels for %s ready in %.3f s", cdt, secs)
        return secs
