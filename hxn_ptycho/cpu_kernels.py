"""Fused CPU kernels (numba) for the DM passes of :class:`hxn_ptycho.backend.Backend`.

Each pass of the numpy reference (:class:`~hxn_ptycho.backend.NumpyBackend`, the step functions of
:mod:`hxn_ptycho.dm`) sweeps a batch several times and makes temporaries of it; here each is one
loop nest over the batch, in the precision of the arrays (complex64 and float32 throughout for
single precision: the constants are passed in that precision, so nothing is promoted):

- :func:`exit_waves_k`: (2) Φ = P·O straight from the object at the window corners;
- :func:`fourier_update_k`: (7) the data error of F(Φ), (3), (4) the reflection, the modulus step
  with the power bound's relaxation and the DM update of F(ψ), and the copy of F(ψ) that the
  inverse FFT turns into ψ — one sweep without the power bound, two with it (the first measures
  each view's deviation);
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
from typing import Any

import numpy as np

from .backend import BatchBuffers, HostBackend

try:
    import numba
except ImportError as exc:  # pragma: no cover - numba is a core dependency
    raise ImportError(f"the numba backend needs numba (pip install numba): {exc}") from None

logger = logging.getLogger(__name__)
TINY = 1e-30

_jit = numba.njit(nogil=True, cache=True, fastmath=False, error_model="numpy", boundscheck=False)


# (2) out[b, l, k] = O_l(window b) · P_k
@_jit
def exit_waves_k(obj, pos, probe, out):  # type: ignore[no-untyped-def]
    B, L, K, n, m = out.shape
    for b in range(B):
        r0 = pos[b, 0]
        c0 = pos[b, 1]
        for l in range(L):
            for k in range(K):
                for i in range(n):
                    for j in range(m):
                        out[b, l, k, i, j] = obj[l, r0 + i, c0 + j] * probe[k, i, j]


# (2) from gathered (sub-pixel) windows: out[b, l, k] = W[b, l] · P_k
@_jit
def exit_waves_win_k(win, probe, out):  # type: ignore[no-untyped-def]
    B, L, K, n, m = out.shape
    for b in range(B):
        for l in range(L):
            for k in range(K):
                for i in range(n):
                    for j in range(m):
                        out[b, l, k, i, j] = win[b, l, i, j] * probe[k, i, j]


# (7) Σ_good (|F(Φ)| − √I)², modes summed incoherently; fphi (B, M, n, n)
@_jit
def data_error_k(fphi, amp, mask, use_mask):  # type: ignore[no-untyped-def]
    B, M, n, m = fphi.shape
    err = 0.0
    for b in range(B):
        for i in range(n):
            for j in range(m):
                if use_mask and not mask[i, j]:
                    continue
                s = fphi[b, 0, i, j].real * fphi[b, 0, i, j].real + fphi[b, 0, i, j].imag * fphi[b, 0, i, j].imag
                for q in range(1, M):
                    f = fphi[b, q, i, j]
                    s += f.real * f.real + f.imag * f.imag
                d = np.sqrt(s) - amp[b, i, j]
                err += d * d
    return err


# (3), (4), (7): F(ψ) ← F(ψ) + β(Π_F(2F(Φ) − F(ψ)) − F(Φ)) in place, F(ψ) also into psi_out; returns (7)
@_jit
def fourier_update_k(fpsi, fphi, amp, mask, use_mask, pbound, beta, floor, tiny, one, psi_out,
                     relax, raw):  # type: ignore[no-untyped-def]
    """``fpsi``, ``fphi``, ``psi_out`` (B, M, n, n); ``amp`` (B, n, n); ``pbound``, ``beta``,
    ``floor``, ``tiny``, ``one`` in the arrays' real precision; ``relax``, ``raw`` (B,) of that
    precision get each view's r (dm.relaxation) with and without the floor (1 without the bound)."""
    B, M, n, m = fpsi.shape
    err = 0.0
    npix = n * m
    for b in range(B):
        r = one
        if pbound > 0:              # first sweep: the deviation of the reflected waves and (7)
            dev = 0.0
            for i in range(n):
                for j in range(m):
                    if use_mask and not mask[i, j]:
                        continue
                    sp = fphi[b, 0, i, j].real * fphi[b, 0, i, j].real + fphi[b, 0, i, j].imag * fphi[b, 0, i, j].imag
                    x = fphi[b, 0, i, j] + fphi[b, 0, i, j] - fpsi[b, 0, i, j]
                    sr = x.real * x.real + x.imag * x.imag
                    for q in range(1, M):
                        f = fphi[b, q, i, j]
                        sp += f.real * f.real + f.imag * f.imag
                        x = f + f - fpsi[b, q, i, j]
                        sr += x.real * x.real + x.imag * x.imag
                    a = amp[b, i, j]
                    d = np.sqrt(sp) - a
                    err += d * d
                    d = np.sqrt(sr) - a
                    dev += d * d
            dev = dev / npix
            if dev > pbound:
                rr = np.sqrt(pbound / max(dev, 1e-30))
                raw[b] = rr
                if floor > 0 and rr < floor:
                    rr = floor
                relax[b] = rr
                r = relax[b]            # in the arrays' precision, as the reference's
            else:
                relax[b] = one
                raw[b] = one
        for i in range(n):          # the update (and (7) here without the bound)
            for j in range(m):
                good = not use_mask or mask[i, j]
                sp = fphi[b, 0, i, j].real * fphi[b, 0, i, j].real + fphi[b, 0, i, j].imag * fphi[b, 0, i, j].imag
                x = fphi[b, 0, i, j] + fphi[b, 0, i, j] - fpsi[b, 0, i, j]
                sr = x.real * x.real + x.imag * x.imag
                for q in range(1, M):
                    f = fphi[b, q, i, j]
                    sp += f.real * f.real + f.imag * f.imag
                    x = f + f - fpsi[b, q, i, j]
                    sr += x.real * x.real + x.imag * x.imag
                a = amp[b, i, j]
                if good:
                    if pbound <= 0:
                        d = np.sqrt(sp) - a
                        err += d * d
                    factor = a / max(np.sqrt(sr), tiny)
                    if pbound > 0:
                        factor = factor * (one - r) + r
                else:
                    factor = one
                for q in range(M):
                    f = fphi[b, q, i, j]
                    p = fpsi[b, q, i, j]
                    x = f + f - p
                    v = p + beta * (factor * x - f)
                    fpsi[b, q, i, j] = v
                    psi_out[b, q, i, j] = v
    return err


# (6) num[l, window b] += Σ_k P_k*·ψ[b, l, k], den[0, window b] += Σ_k |P_k|²
@_jit
def object_sums_k(psi, pconj, pint, pos, num, den):  # type: ignore[no-untyped-def]
    B, L, K, n, m = psi.shape
    for b in range(B):
        r0 = pos[b, 0]
        c0 = pos[b, 1]
        for l in range(L):
            for i in range(n):
                for j in range(m):
                    s = pconj[0, i, j] * psi[b, l, 0, i, j]
                    for k in range(1, K):
                        s += pconj[k, i, j] * psi[b, l, k, i, j]
                    num[l, r0 + i, c0 + j] += s
        for i in range(n):
            for j in range(m):
                den[0, r0 + i, c0 + j] += pint[i, j]


# (6) the numerator alone, per view (sub-pixel windows: the bilinear scatter follows)
@_jit
def object_numerator_k(psi, pconj, out):  # type: ignore[no-untyped-def]
    B, L, K, n, m = psi.shape
    for b in range(B):
        for l in range(L):
            for i in range(n):
                for j in range(m):
                    s = pconj[0, i, j] * psi[b, l, 0, i, j]
                    for k in range(1, K):
                        s += pconj[k, i, j] * psi[b, l, k, i, j]
                    out[b, l, i, j] = s


# (5) num[k] += Σ_b,l O_l*(window b)·ψ[b, l, k], den += Σ_b,l |O_l(window b)|²
@_jit
def probe_sums_k(psi, obj, pos, num, den):  # type: ignore[no-untyped-def]
    B, L, K, n, m = psi.shape
    for b in range(B):
        r0 = pos[b, 0]
        c0 = pos[b, 1]
        for l in range(L):
            for i in range(n):
                for j in range(m):
                    o = obj[l, r0 + i, c0 + j]
                    den[i, j] += o.real * o.real + o.imag * o.imag
                    oc = o.conjugate()
                    for k in range(K):
                        num[k, i, j] += oc * psi[b, l, k, i, j]


# (5) from gathered (sub-pixel) windows
@_jit
def probe_sums_win_k(psi, win, num, den):  # type: ignore[no-untyped-def]
    B, L, K, n, m = psi.shape
    for b in range(B):
        for l in range(L):
            for i in range(n):
                for j in range(m):
                    o = win[b, l, i, j]
                    den[i, j] += o.real * o.real + o.imag * o.imag
                    oc = o.conjugate()
                    for k in range(K):
                        num[k, i, j] += oc * psi[b, l, k, i, j]


KERNELS = (exit_waves_k, exit_waves_win_k, data_error_k, fourier_update_k, object_sums_k, object_numerator_k,
           probe_sums_k, probe_sums_win_k)


def _views(a: np.ndarray) -> np.ndarray:
    """``(B, L, K, n, n)`` as ``(B, L·K, n, n)`` (a view: the arrays are C-contiguous)."""
    return a.reshape(a.shape[0], -1, a.shape[-2], a.shape[-1])


class NumbaBackend(HostBackend):
    """CPU backend with the DM passes fused (numba); FFTs by ``scipy.fft``; ML and position sums are
    the numpy definitions (:class:`~hxn_ptycho.backend.HostBackend`'s)."""

    name = "numba"

    def __init__(self, threads: int | None = None) -> None:
        super().__init__(threads)
        self._mask_cache: tuple[Any, np.ndarray] | None = None

    def _mask(self, mask: Any, n: int, m: int) -> tuple[np.ndarray, bool]:
        if mask is None:
            return np.ones((1, 1), np.bool_), False
        cached = self._mask_cache
        if cached is None or cached[0] is not mask:
            cached = self._mask_cache = (mask, np.ascontiguousarray(mask, dtype=np.bool_))
        return cached[1], True

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

    def fourier_pass(self, obj: Any, pos: Any, probe: Any, fpsi: Any, psi: Any, diffamp: Any, mask: Any,
                     pbound: float, beta: float, floor: float, stats: Any, buf: BatchBuffers,
                     windows: Any = None) -> Any:
        B = len(fpsi)
        if B == 0:
            return 0.0
        fphi = self.fft2(self._phi(obj, pos, probe, buf.phi[:B], windows))                # F(P·O)
        rdt = fpsi.real.dtype.type
        m, use = self._mask(mask, fpsi.shape[-2], fpsi.shape[-1])
        relax = np.ones(B, rdt)
        raw = np.ones(B, rdt)
        err = fourier_update_k(_views(fpsi), _views(fphi), diffamp, m, use, rdt(pbound), rdt(beta), rdt(floor),
                               rdt(TINY), rdt(1), _views(psi), relax, raw)                # (3), (4), (7)
        if stats is not None:
            if pbound > 0:
                stats.add(relax, B, raw if floor > 0 else None)
            else:
                stats.add(None, B)
        self.ifft2(psi)                                                                  # ψ
        return err

    def object_pass(self, psi: Any, probe_conj: Any, probe_intensity: Any, pos: Any, obj_num: Any, obj_den: Any,
                    buf: BatchBuffers, subpixel: bool = False) -> None:
        if len(psi) == 0:
            return
        pconj = np.ascontiguousarray(probe_conj, dtype=psi.dtype)
        pint = np.ascontiguousarray(probe_intensity, dtype=obj_den.dtype)
        if subpixel:
            src = buf.onum_src[:len(psi)]
            object_numerator_k(psi, pconj, src)
            self.scatter_add_subpixel(obj_num, pos, src)
            self.scatter_add_subpixel(obj_den, pos, pint)
        else:
            object_sums_k(psi, pconj, pint, self._pos(pos), obj_num, obj_den)

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
        fourier_update_k(_views(waves), _views(waves.copy()), amp, m, True, rdt(0), rdt(1), rdt(0), rdt(TINY),
                         rdt(1), _views(waves.copy()), np.ones(B, rdt), np.ones(B, rdt))
        object_sums_k(waves, probe, np.ones((n, n), rdt), pos, np.zeros_like(obj), np.zeros((1, n + 1, n + 1), rdt))
        object_numerator_k(waves, probe, win)
        probe_sums_k(waves, obj, pos, np.zeros_like(probe), np.zeros((n, n), rdt))
        probe_sums_win_k(waves, win, np.zeros_like(probe), np.zeros((n, n), rdt))
        secs = time.perf_counter() - t0
        logger.debug("numba kernels for %s ready in %.3f s", cdt, secs)
        return secs
