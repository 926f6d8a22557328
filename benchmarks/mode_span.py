"""Session 24 (issue 18, part 2): the count read from rank-k models fitted inside the span of the
over-complete fit (docs/auto_modes.md, "Session 24").

Session 23 found the chain of refits path-dependent: each k-mode model was the k strongest modes of the
M-mode fit refitted for a fixed number of ML iterations, so models k and k + 1 were compared at
different distances from their optimum, and a weak true mode that the M-mode fit holds split over its
fitted modes k and k + 1 was missed by the k-cut. Here nothing is refitted along a path. The M-mode fit
(object O, orthogonal modes P_1 … P_M) fixes the far fields Ψ_mj = F(P_m · O_j) of every view j; a
k-mode model inside their span is a coefficient matrix A (M × k),

    I_j(A) = Σ_l |Σ_m A_ml Ψ_mj|² = Σ_mm' (A A†)_mm' Ψ_mj Ψ*_m'j     (ρ = A A†, rank k, in the fitted basis)

and is fitted by the same loss as every fit, the amplitude error Σ(√I_j(A) − √I_j)² on the kept pixels
(L-BFGS on A, from the k strongest fitted modes and from the (k − 1)-model plus the fitted mode least
inside it; the lower kept-pixel loss is kept, nothing held out is read). Read alone (session 22's chain
on these models: keep mode k + 1 while the per-view gains of the held-out amplitude error have paired
z > 2) they over-count, the object being the M-mode fit's; session 24's rule refits each with the object
(``mode_over.span_refit_chain``, ``--span --span-refit``). Results: docs/auto_modes.md, "Session 24".
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize

from hxn_ptycho.engine import Reconstruction
from hxn_ptycho.params import ReconParams


def far_fields(scan: Any, obj: np.ndarray, probe: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Ψ_mj = F(P_m · O_j) of every view and fitted mode (views, M, n, n), the scan's √I (views, n, n)
    and the detector mask (None: all good), in the engine's units and the views' given order."""
    rec = Reconstruction(scan, ReconParams(iterations=1, probe_modes=len(probe), threads=1), log=lambda m: None)
    rec.obj = obj.astype(rec.cdtype)
    rec.probe = probe.astype(rec.cdtype)
    rec.use_given_order()
    N, M, n = rec.diffamp.shape[0], len(probe), rec.n
    psi = np.zeros((N, M, n, n), np.complex128)

    def batch(w: Any, b: slice) -> None:
        be, B = rec.be, b.stop - b.start
        f = be.fft2(rec.geom.exit_waves(be, rec.obj, b, rec.probe, w.objwin[:B], w.phi[:B], w.tmp[:B]))
        psi[b] = np.asarray(be.asnumpy(f)).reshape(B, M, n, n)
    rec.scheduler.each(batch)
    # the same far field as the engine's: Σ_m |Ψ_m|² is its model intensity (checked in the tests)
    amp = np.asarray(rec.be.asnumpy(rec.diffamp), np.float64)
    mask = None if rec.mask is None else np.asarray(rec.be.asnumpy(rec.mask), bool)
    rec.close()
    return psi, amp, mask


def _pack(A: np.ndarray) -> np.ndarray:
    return np.concatenate([A.real.ravel(), A.imag.ravel()])


def _unpack(x: np.ndarray, M: int) -> np.ndarray:
    h = len(x) // 2
    return (x[:h] + 1j * x[h:]).reshape(M, -1)


def span_loss(A: np.ndarray, psi: np.ndarray, data: np.ndarray) -> tuple[float, np.ndarray]:
    """Σ(√I(A) − √I)² over the given pixels (``psi`` (M, P), ``data`` (P,)) and ∂/∂A* (M, k)."""
    phi = A.astype(psi.dtype).T @ psi                # Φ_l = Σ_m A_ml Ψ_m   (k, P)
    a = np.sqrt(np.sum(phi.real ** 2 + phi.imag ** 2, axis=0))
    r = a - data
    w = np.divide(r, a, out=np.zeros_like(a), where=a > 0)
    grad = psi.conj() @ (phi * w).T                  # ∂L/∂A* = Σ_p Ψ*_m (√I(A) − √I)/√I(A) · Φ_l
    return float(np.dot(r.astype(np.float64), r.astype(np.float64))), grad.astype(np.complex128)


def fit_span(psi: np.ndarray, data: np.ndarray, A0: np.ndarray, maxiter: int = 1000) -> tuple[np.ndarray, float, dict[str, Any]]:
    """The k-mode model in the span minimising the amplitude error from ``A0`` (M, k), by L-BFGS."""
    M = A0.shape[0]

    def f(x: np.ndarray) -> tuple[float, np.ndarray]:
        loss, g = span_loss(_unpack(x, M), psi, data)
        return loss, 2 * _pack(g)                    # ∂L/∂Re A = 2 Re(∂L/∂A*), ∂L/∂Im A = 2 Im(∂L/∂A*)
    res = minimize(f, _pack(A0), jac=True, method="L-BFGS-B",
                   options={"maxiter": maxiter, "ftol": 1e-13, "gtol": 1e-10, "maxcor": 20})
    A = _unpack(res.x, M)
    grad_rel = float(np.linalg.norm(res.jac) / max(abs(res.fun), 1e-300))
    # an abnormal line search with a vanishing gradient is the single-precision floor of the loss
    return A, float(res.fun), {"iterations": int(res.nit), "converged": bool(res.success) or grad_rel < 1e-5,
                               "message": str(res.message), "grad_rel": grad_rel}


def span_models(psi: np.ndarray, amp: np.ndarray, keep: np.ndarray, mask: np.ndarray | None,
                maxiter: int = 1000) -> dict[str, Any]:
    """Rank-k models k = 1 … M in the span (fitted on the kept pixels, scored on the held-out ones):
    per-view held-out amplitude errors of each k, the kept-pixel losses, the models' spectra (shares of
    ρ = A A†'s eigenvalues in the fitted modes' basis) and the fits' diagnostics."""
    N, M = psi.shape[:2]
    good = np.ones(amp.shape, bool) if mask is None else np.broadcast_to(mask, amp.shape)
    kept, held = keep & good, ~keep & good
    flat = psi.transpose(1, 0, 2, 3).reshape(M, -1)
    k_idx = np.flatnonzero(kept.ravel())
    # each fitted mode's far field scaled to unit norm on the kept pixels (A scaled back after each
    # fit): the curvature no longer spans the modes' power ratio, L-BFGS needs ~40 % fewer steps;
    # single precision for the fields, double for every sum
    norm = np.sqrt(np.sum(np.abs(flat[:, k_idx]) ** 2, axis=1))
    psi_k = np.ascontiguousarray(flat[:, k_idx] / norm[:, None], np.complex64)
    data_k = amp.ravel()[k_idx].astype(np.float32)
    h_idx = np.flatnonzero(held.ravel())
    psi_h, data_h = np.ascontiguousarray(flat[:, h_idx]), amp.ravel()[h_idx]
    view_h = h_idx // (amp.shape[1] * amp.shape[2])
    eye = np.eye(M, dtype=np.complex128)            # the fitted modes: A = I is the M-mode fit itself
    out: dict[str, Any] = {"kept_loss": [], "ho_view": [], "spectra": [], "fits": [], "init": []}
    prev = None
    for k in range(1, M + 1):
        tries = [("cut", eye[:, :k])]
        if prev is not None:
            # the (k − 1)-model and the fitted mode least inside its span (of equals, the strongest)
            q, _ = np.linalg.qr(prev)
            resid = eye - q @ (q.conj().T @ eye)
            j = int(np.argmax(np.linalg.norm(resid, axis=0)))
            tries.append(("nested", np.concatenate([prev, resid[:, j:j + 1] / np.linalg.norm(resid[:, j])], axis=1)))
        best = None
        for name, A0 in tries:
            A, loss, info = fit_span(psi_k, data_k, A0 * norm[:, None], maxiter)
            A = A / norm[:, None]
            if best is None or loss < best[1]:
                best = (A, loss, info, name)
        A, loss, info, name = best
        prev = A
        phi = A.T @ psi_h
        a = np.sqrt(np.sum(phi.real ** 2 + phi.imag ** 2, axis=0))
        out["ho_view"].append(np.bincount(view_h, weights=(a - data_h) ** 2, minlength=N))
        out["kept_loss"].append(loss)
        ev = np.sort(np.linalg.eigvalsh(A @ A.conj().T))[::-1][:k]
        out["spectra"].append([round(float(x), 5) for x in ev / ev.sum()])
        out["fits"].append(info)
        out["init"].append(name)
        out.setdefault("A", []).append(A)
    return out


def span_probe(A: np.ndarray, probe: np.ndarray) -> np.ndarray:
    """The model's modes in real space: Σ_m A_ml P_m (k, n, n)."""
    M = probe.shape[0]
    return np.tensordot(A.T, probe.reshape(M, -1), axes=1).reshape(A.shape[1], *probe.shape[1:])
