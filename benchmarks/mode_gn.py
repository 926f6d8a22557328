"""A diagnostic for issue 18, part 2 (docs/auto_modes.md, "Session 30"): does a Gauss–Newton fit (Levenberg–
Marquardt, the normal equations solved by preconditioned conjugate gradients) bring a k-mode refit of the
held-out count's chain nearer its optimum than the engine's ML (Polak–Ribière CG), for the same number of
FFT passes? Sessions 24–26 found that the count is blocked by refits that do not converge.

    python benchmarks/mode_gn.py gsm:1e6:3:0.03 [--k 3] [--budget 1600] [--inner 10]

The cell (family:photons:K:weakest, seed 1, 100 views of 64²) is split as the count splits it (15 % of every
frame's pixels held out), the count's 6-mode fit is run (default start, ``DM:20,ML:480``), its k strongest
modes with its object are the start, and then, from that start:

- **ML**: the engine's ML (``mode_count.fit``, per-mode cap 10) for N iterations, N = budget/32 … budget/4 (an
  ML iteration is 4 FFT passes: the gradient's two, the line search's two);
- **GN**: this file's Levenberg–Marquardt on the same loss Σ_kept (|Ψ| − √I)² (its own numpy model of the
  engine's: the engine's canvas, corners and data), each outer step one forward and one adjoint pass and two a
  CG iteration.

For each: the kept-pixel loss, the held-out error Σ_held (|Ψ| − √I)², c (the true modes' power inside the
fitted modes' span) and the shares. One JSON line each on stdout, plus the FFT passes and seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np
import scipy.fft as sfft
from auto_mode_cv import case_scan
from mode_fit import captured

from hxn_ptycho import mode_count as mc
from hxn_ptycho import modes
from hxn_ptycho.engine import Reconstruction
from hxn_ptycho.params import ReconParams


class AmplitudeModel:
    """Σ_kept (√Σ_k |F(P_k·O_j)|² − √I_j)² over views j, with its Jacobian products (real inner product on
    the complex unknowns: ⟨a, b⟩ = Re Σ conj(a)·b)."""

    def __init__(self, corners: np.ndarray, data: np.ndarray, keep: np.ndarray, shape: tuple[int, int]) -> None:
        self.corners, self.d, self.m = corners, data.astype(np.float64), keep.astype(np.float64)
        self.shape = shape
        self.n = data.shape[-1]
        self.passes = 0

    def windows(self, O: np.ndarray) -> np.ndarray:
        n = self.n
        return np.stack([O[r:r + n, c:c + n] for r, c in self.corners])

    def scatter(self, w: np.ndarray) -> np.ndarray:
        out = np.zeros(self.shape, np.complex128)
        n = self.n
        for (r, c), x in zip(self.corners, w):
            out[r:r + n, c:c + n] += x
        return out

    def state(self, O: np.ndarray, P: np.ndarray) -> dict:
        W = self.windows(O)
        psi = sfft.fft2(P[None] * W[:, None], norm="ortho", workers=1)
        self.passes += 1
        a = np.sqrt(np.sum(psi.real ** 2 + psi.imag ** 2, axis=1))
        a_safe = np.maximum(a, 1e-9)
        r = self.m * (a - self.d)
        return {"O": O, "P": P, "W": W, "psi": psi, "a": a_safe, "r": r, "loss": float(np.sum(r * r))}

    def jv(self, s: dict, dO: np.ndarray, dP: np.ndarray) -> np.ndarray:
        # δa = Σ_k Re(conj(ψ_k)·F(δP_k·O_j + P_k·δO_j)) / a   (on the kept pixels)
        dpsi = sfft.fft2(dP[None] * s["W"][:, None] + s["P"][None] * self.windows(dO)[:, None], norm="ortho", workers=1)
        self.passes += 1
        return self.m * np.sum(s["psi"].real * dpsi.real + s["psi"].imag * dpsi.imag, axis=1) / s["a"]

    def jt(self, s: dict, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Jᵀu: χ = F⁻¹(u·ψ/a); ∂O = Σ_j scatter(Σ_k conj(P_k)·χ), ∂P_k = Σ_j conj(O_j)·χ
        chi = sfft.ifft2((self.m * u / s["a"])[:, None] * s["psi"], norm="ortho", workers=1)
        self.passes += 1
        gO = self.scatter(np.sum(np.conj(s["P"])[None] * chi, axis=1))
        gP = np.sum(np.conj(s["W"])[:, None] * chi, axis=0)
        return gO, gP


def dot(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> float:
    return float(sum(np.vdot(x, y).real for x, y in zip(a, b)))


def grad(O: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The object's differences along rows and columns (∇O)."""
    return O[1:] - O[:-1], O[:, 1:] - O[:, :-1]


def laplace(O: np.ndarray) -> np.ndarray:
    """∇ᵀ∇O (the adjoint of :func:`grad` applied to it): half the gradient of Σ|∇O|²."""
    gy, gx = grad(O)
    out = np.zeros_like(O)
    out[1:] += gy
    out[:-1] -= gy
    out[:, 1:] += gx
    out[:, :-1] -= gx
    return out


def smoothness(O: np.ndarray) -> float:
    return float(sum(np.sum(np.abs(g) ** 2) for g in grad(O)))


def lm_fit(model: AmplitudeModel, O: np.ndarray, P: np.ndarray, budget: int, inner: int,
           lam: float = 1e-2, mu: float = 0.0) -> tuple[np.ndarray, np.ndarray, list[tuple[int, float]]]:
    """Levenberg–Marquardt until ``budget`` FFT passes: (JᵀJ + μ∇ᵀ∇ + λD)δ = −(Jᵀr + μ∇ᵀ∇O) by PCG (``inner``
    iterations), D the diagonal of Σ|P|² (object) and Σ|O_j|² (modes) over the views (Marquardt's scaling);
    ``mu`` > 0 adds μΣ|∇O|² to the loss (a smooth object: fewer unknowns that fit noise)."""
    s = model.state(O, P)
    s["loss"] += mu * smoothness(O)
    curve = [(model.passes, s["loss"])]
    while model.passes < budget:
        dO_diag = model.scatter(np.broadcast_to(np.sum(np.abs(s["P"]) ** 2, axis=0), s["W"].shape)).real
        dP_diag = np.sum(np.abs(s["W"]) ** 2, axis=0)[None].repeat(len(s["P"]), 0)
        D = (np.maximum(dO_diag, 1e-12 * dO_diag.max()), np.maximum(dP_diag, 1e-12 * dP_diag.max()))
        gO, gP = model.jt(s, s["r"])
        b = (-gO - mu * laplace(s["O"]), -gP)
        pre = ((1 + lam) * D[0] + 8 * mu, (1 + lam) * D[1])

        def A(v: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            jO, jP = model.jt(s, model.jv(s, *v))
            return jO + mu * laplace(v[0]) + lam * D[0] * v[0], jP + lam * D[1] * v[1]

        x = (np.zeros_like(O), np.zeros_like(P))
        res = b
        z = tuple(ri / pi for ri, pi in zip(res, pre))
        p = z
        rz = dot(res, z)
        for _ in range(inner):
            Ap = A(p)
            alpha = rz / max(dot(p, Ap), 1e-300)
            x = tuple(xi + alpha * pi for xi, pi in zip(x, p))
            res = tuple(ri - alpha * api for ri, api in zip(res, Ap))
            z = tuple(ri / pi for ri, pi in zip(res, pre))
            rz_new = dot(res, z)
            p = tuple(zi + (rz_new / max(rz, 1e-300)) * pi for zi, pi in zip(z, p))
            rz = rz_new
        trial = model.state(s["O"] + x[0], s["P"] + x[1])
        trial["loss"] += mu * smoothness(trial["O"])
        if trial["loss"] < s["loss"]:
            s, lam = trial, max(lam / 3, 1e-6)
        else:
            lam *= 10
        curve.append((model.passes, s["loss"]))
    return s["O"], s["P"], curve


def engine_canvas(kept, k: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    rec = Reconstruction(kept, ReconParams(iterations=1, probe_modes=k, threads=1), log=lambda m: None,
                         spatial_order=False)
    try:
        return np.asarray(rec.pos), np.asarray(rec.be.asnumpy(rec.diffamp), np.float64), tuple(rec.obj.shape[-2:])
    finally:
        rec.close()


def report(arm: str, O: np.ndarray, P: np.ndarray, model: AmplitudeModel, held: AmplitudeModel, mix, passes: int,
           secs: float, **extra) -> None:
    Po = modes.orthogonalize(P)[0]
    kept_loss = model.state(O, Po)["loss"]
    held_loss = held.state(O, Po)["loss"]
    print(json.dumps({"arm": arm, "passes": passes, "seconds": round(secs, 1), "kept_loss": round(kept_loss, 2),
                      "held_out": round(held_loss, 2), "c": round(captured(Po, mix.probe), 4),
                      "shares": [round(float(x), 4) for x in modes.power_fractions(Po)], **extra}), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case")
    ap.add_argument("--k", type=int, default=None, help="the refit's modes (default: the true count)")
    ap.add_argument("--budget", type=int, default=1600, help="FFT passes of the longest run of each arm")
    ap.add_argument("--inner", type=int, default=10, help="CG iterations an LM step")
    ap.add_argument("--arms", default="ML,GN", help="which arms to run (ML, GN or both)")
    ap.add_argument("--once", action="store_true", help="each arm once, at the whole budget (not at 1/8 … 1 of it)")
    ap.add_argument("--mu", type=float, nargs="*", default=[0.0],
                    help="GN's object smoothness μΣ|∇O|², μ = share × (¼ × kept pixels) / Σ|∇O_start|²: "
                         "the same μ for every k (the start's object is the 6-mode fit's)")
    a = ap.parse_args(argv)
    arms = {x.strip().upper() for x in a.arms.split(",")}
    scan, mix, K = case_scan(a.case)
    k = a.k or K
    kept, keep = mc.holdout_split(scan, 0.15, 22)
    base = ReconParams(iterations=500, probe_modes=6, threads=1, algorithm="DM:20,ML:480", extra_mode_power=0.3,
                       detector_gain=1, backend="numpy")
    t0 = time.perf_counter()
    obj, pr, _ = mc.fit(kept, base, keep, mode_cap=10.0)
    print(json.dumps({"case": a.case, "k": k, "fit6_seconds": round(time.perf_counter() - t0, 1),
                      "fit6_shares": [round(float(x), 4) for x in modes.power_fractions(pr)],
                      "fit6_c": round(captured(pr[:K], mix.probe), 4)}), flush=True)
    corners, data, shape = engine_canvas(kept, k)
    O0 = np.asarray(obj, np.complex128).reshape(shape)
    P0 = np.asarray(pr[:k], np.complex128)
    model = AmplitudeModel(corners, data, keep, shape)
    held = AmplitudeModel(corners, engine_canvas(scan, k)[1], ~keep, shape)
    report("start", O0, P0, model, held, mix, 0, 0.0)
    for div in ((4,) if a.once else (32, 16, 8, 4)) if "ML" in arms else ():
        n_it = max(1, a.budget // div)
        p = replace(base, probe_modes=k, algorithm=f"ML:{n_it}", iterations=n_it)
        t = time.perf_counter()
        o, q, _ = mc.fit(kept, p, keep, obj, pr[:k], mode_cap=10.0)
        report("ML", np.asarray(o, np.complex128).reshape(shape), np.asarray(q, np.complex128), model, held, mix,
               4 * n_it, time.perf_counter() - t, iterations=n_it)
    noise = 0.25 * float(keep.sum())          # the kept pixels' noise in √I units (¼ a pixel): the same for every k
    for share in a.mu if "GN" in arms else ():
        mu = share * noise / max(smoothness(O0), 1e-300)
        for div in (1,) if a.once else (8, 4, 2, 1):
            m2 = AmplitudeModel(corners, data, keep, shape)
            t = time.perf_counter()
            o, q, curve = lm_fit(m2, O0.copy(), P0.copy(), a.budget // div, a.inner, mu=mu)
            report("GN", o, q, model, held, mix, m2.passes, time.perf_counter() - t, inner=a.inner,
                   steps=len(curve) - 1, mu_share=share, smoothness=round(smoothness(o), 2))


if __name__ == "__main__":
    main()
