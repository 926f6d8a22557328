"""Cases shared by the backend-contract tests: every pass of a backend against the numpy reference.

``check_passes_match(be, ref, ...)`` runs each DM pass of :class:`hxn_ptycho.backend.Backend` on one
random batch with both backends from the same inputs and compares the outputs (the exit waves'
state ψ, the data error, Σ r of the power bound, the object and probe sums).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from hxn_ptycho import dm
from hxn_ptycho.backend import ObjectSums


def crandn(rng, shape, dtype):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.complex128), np.asarray(b, np.complex128)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def buffers(be, B, L, K, n, cdt):
    return SimpleNamespace(phi=be.empty((B, L, K, n, n), cdt), work=be.empty((B, L, K, n, n), cdt),
                           objwin=be.empty((B, L, n, n), cdt), tmp=be.empty((B, L, n, n), cdt),
                           onum_src=be.empty((B, L, n, n), cdt))


def check_passes_match(be, ref, cdt, modes: int, masked: bool, bound: bool, subpixel: bool, tol: float,
                       seed: int = 3, n: int = 16, B: int = 7, L: int = 1) -> None:
    rng = np.random.default_rng(seed)
    rdt = np.float32 if np.dtype(cdt) == np.complex64 else np.float64
    K = modes
    H, W = 3 * n, 3 * n + 5
    obj = crandn(rng, (L, H, W), cdt)
    probe = crandn(rng, (K, n, n), cdt)
    if subpixel:
        pos = rng.uniform(0, H - n - 2, (B, 2))
        pos[0] = [0.25, H - n - 1.5]
    else:
        pos = np.stack([rng.integers(0, H - n + 1, B), rng.integers(0, W - n + 1, B)], 1).astype(np.int64)
        pos[:2] = [[0, 0], [H - n, W - n]]
    psi0 = crandn(rng, (B, L, K, n, n), cdt)
    amp = (np.abs(np.fft.fft2(obj[0, :n, :n] * probe[0], norm="ortho"))[None] *
           rng.uniform(0.3, 3.0, (B, 1, 1))).astype(rdt)
    mask = (rng.random((n, n)) > 0.15) if masked else None
    # the same frames among others, in another order: the fused pass below reads them by ``rows``
    rows = rng.permutation(B + 3)[:B].astype(np.int64)
    amp_all = (rng.uniform(0.5, 2.0, (B + 3, n, n)) * amp.max()).astype(rdt)
    amp_all[rows] = amp
    pbound = floor = 0.0
    if bound:       # a bound at the median deviation of the reflected waves (dm.fourier_projection's), a
        # floor that binds for the farthest view only: views inside, relaxed, and at the floor
        bufs = buffers(ref, B, L, K, n, cdt)
        win = ref.gather_subpixel(obj, pos, n, bufs.objwin, bufs.tmp) if subpixel else ref.gather(obj, pos, n)
        phi = win[:, :, None] * probe[None, None]
        refl = np.sqrt((np.abs(np.fft.fft2(2 * phi - psi0, norm="ortho")) ** 2).reshape(B, -1, n, n).sum(1))
        dev = ((refl - amp) * (1 if mask is None else mask)) ** 2
        dev = np.sort(dev.reshape(B, -1).mean(1))
        pbound = float(dev[B // 2]) * 0.999
        floor = float(np.sqrt(pbound / dev[-2]))
    out = {}
    for name, b in (("ref", ref), ("be", be)):
        bufs = buffers(b, B, L, K, n, cdt)
        o, p = b.asarray(obj), b.asarray(probe)
        windows = b.gather_subpixel(o, pos, n, bufs.objwin, bufs.tmp) if subpixel else None
        psi = b.asarray(psi0.copy())
        stats = dm.RelaxSum()
        err = b.fourier_pass(o, pos, p, psi, b.asarray(amp), None if mask is None else b.asarray(mask),
                             pbound, 0.9, floor, stats, bufs, windows)
        onum, oden = b.zeros((L, H, W), cdt), b.zeros((1, H, W), rdt)
        pconj = b.xp.conj(p)
        pint = (b.xp.abs(p) ** 2).sum(axis=0).astype(rdt)
        b.object_pass(psi, pconj, pint, pos, onum, oden, bufs, subpixel)
        # the same Fourier pass with the object sums (6) of the new ψ in it (fused on the numba
        # backend), its frames read at ``rows`` of all frames
        psi_f = b.asarray(psi0.copy())
        sums = ObjectSums(pconj, pint, b.zeros((L, H, W), cdt), b.zeros((1, H, W), rdt))
        windows_f = b.gather_subpixel(o, pos, n, bufs.objwin, bufs.tmp) if subpixel else None
        err_f = b.fourier_pass(o, pos, p, psi_f, b.asarray(amp_all), None if mask is None else b.asarray(mask),
                               pbound, 0.9, floor, None, bufs, windows_f, sums, rows)
        # and with the numerator of (6) alone (ObjectSums.den None: the object update forms the
        # denominator — what the engine asks of the CPU backends, cache_batches, on one process)
        psi_n, sums_n, err_n = psi_f, sums, err_f
        if be.cache_batches:
            psi_n = b.asarray(psi0.copy())
            sums_n = ObjectSums(pconj, pint, b.zeros((L, H, W), cdt), None)
            windows_n = b.gather_subpixel(o, pos, n, bufs.objwin, bufs.tmp) if subpixel else None
            err_n = b.fourier_pass(o, pos, p, psi_n, b.asarray(amp_all), None if mask is None else b.asarray(mask),
                                   pbound, 0.9, floor, None, bufs, windows_n, sums_n, rows)
        if subpixel:
            windows = b.gather_subpixel(o, pos, n, bufs.objwin, bufs.tmp)
        pnum, pden = b.zeros((K, n, n), cdt), b.zeros((n, n), rdt)
        b.probe_pass(psi, o, pos, pnum, pden, bufs, windows)
        if subpixel:
            windows = b.gather_subpixel(o, pos, n, bufs.objwin, bufs.tmp)
        merr = b.error_pass(o, pos, p, b.asarray(amp), None if mask is None else b.asarray(mask), bufs, windows)
        out[name] = dict(err=float(err), psi=b.asnumpy(psi), onum=b.asnumpy(onum),
                         oden=b.asnumpy(oden), pnum=b.asnumpy(pnum), pden=b.asnumpy(pden), merr=float(merr),
                         relax=float(stats.total), raw=float(stats.raw), views=stats.views,
                         err_f=float(err_f), psi_f=b.asnumpy(psi_f), onum_f=b.asnumpy(sums.num),
                         oden_f=b.asnumpy(sums.den), err_n=float(err_n), psi_n=b.asnumpy(psi_n),
                         onum_n=b.asnumpy(sums_n.num))
    r, g = out["ref"], out["be"]
    assert abs(g["err"] / r["err"] - 1) < tol, (g["err"], r["err"])
    assert abs(g["merr"] / r["merr"] - 1) < tol, (g["merr"], r["merr"])
    for key in ("psi", "onum", "oden", "pnum", "pden"):
        assert rel(g[key], r[key]) < tol, (key, rel(g[key], r[key]))
    for key in ("psi", "onum", "oden"):     # the pass with its object sums: those of the two passes
        assert rel(g[key + "_f"], r[key]) < tol, (key, rel(g[key + "_f"], r[key]))
        assert rel(r[key + "_f"], r[key]) < tol, (key, rel(r[key + "_f"], r[key]))
    for key in ("psi", "onum"):             # the pass with the numerator alone
        assert rel(g[key + "_n"], r[key]) < tol, (key, rel(g[key + "_n"], r[key]))
    assert abs(g["err_f"] / r["err"] - 1) < tol and abs(r["err_f"] / r["err"] - 1) < tol
    assert abs(g["err_n"] / r["err"] - 1) < tol
    assert g["views"] == r["views"] == B
    assert abs(g["relax"] - r["relax"]) < 1e-5 * B and abs(g["raw"] - r["raw"]) < 1e-5 * B
    if bound:       # the case relaxes some views (r < 1) and leaves others: both branches are compared
        assert 0 < r["relax"] < B and r["raw"] < r["relax"]
