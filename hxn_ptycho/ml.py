"""Maximum-likelihood refinement (Poisson noise) by preconditioned conjugate gradient, after DM.

The negative Poisson log-likelihood of the model intensities I_m = Σ_kl |F(P_k · O_l(r + r_j))|²,

    L = Σ_j Σ_good (I_m − I · log I_m),

is minimised over the object and every probe mode together (Thibault & Guizar-Sicairos, *New J.
Phys.* 14, 063004 (2012); PtyPy's ML engine and PyNX's ML operator do the same with their own noise
models). One iteration is two passes over the views, each summed through the reducer (so K MPI
ranks give the 1-process result to rounding):

1. the gradient: χ = F⁻¹[(1 − I/I_m)·F(Φ)], g_O = Σ_j,k P_k*·χ (scattered), g_P = Σ_j,l O_l*·χ,
   preconditioned by the DM denominators (Σ|P|² for the object, Σ|O|² for the probe); the
   direction is Polak–Ribière conjugate (reset when the likelihood rose or the angle is poor);
2. the line search: along (h_O, h_P) the exit wave is exactly Φ(α) = Φ + α·A1 + α²·A2 with
   A1 = P·h_O + h_P·O and A2 = h_P·h_O, so I_m(α) ≈ I_m + α·c1 + α²·c2 per pixel and one Newton
   step on L(α) gives α = −L'(0)/L''(0) (PtyPy's polynomial line search, for the Poisson model);
   the amplitude model takes the Gauss–Newton curvature L'' ≈ 2Σ a'² (a = |F(Φ(α))|), which is
   never negative (the exact one is, after a short DM, and ML then stalled) and needs no F(A2).
   A step that cannot be taken along a descent direction restarts the direction at the gradient.
3. the Poisson model's step is *checked* (:meth:`MLIteration._judge_trial`): the next iteration's pass 1
   evaluates L at the trial point anyway, and the step is kept only if L fell by the Armijo amount
   (L(α) ≤ L(0) + c·α·L'(0), c = 10⁻⁴, Nocedal & Wright, *Numerical Optimization*, 3.1); otherwise the
   model goes back to the last accepted point plus a shorter step (the minimum of the quadratic through
   L(0), L'(0), L(α), kept within [0.1, 0.5]·α) and is judged again, or after :data:`MAX_BACKTRACKS`
   tries returns to that point and restarts along the gradient. A non-finite L at a trial is a failed
   test, not an error. So the accepted likelihoods fall strictly and the fit cannot diverge, whatever
   the curvature (the exact one may be negative; a first step is then :data:`TRIAL_STEP` of the
   model's norm over the direction's) and with any per-mode scaling of the probe gradient. A rejected
   trial costs one pass 1 (an iteration); the stage's last step is judged by one more pass 1 at its
   end, so the stage ends on an accepted point (an interrupted run may end on an unjudged one). Position
   refinement inside an ML stage changes L between iterations without changing the model: a trial is
   then judged against the L of the old positions. The amplitude model keeps its step (an overshoot
   halves the step back and restarts; its results are unchanged). docs/auto_modes.md, "Session 22".

With ``Reconstruction.ml_mode_sparsity`` > 0 (the held-out count's sparse fits only) ML minimises L + R, R the modes'
group penalty μ Σ_k ‖P_k‖ (:func:`mode_penalty`): its gradient joins the probe's, its slope and curvature along the
direction join the line search's (:func:`mode_penalty_line`), once per iteration after the sums over ranks.

Four FFTs per view and mode per iteration (three for the amplitude model); the Fourier transforms
F(Φ) of pass 1 are kept in the exit-wave store for pass 2. The per-pixel work of each pass is one step function here
(:func:`ml_gradient`, :func:`ml_line_search`, the numpy definition); a backend with a fused version
of the same name (the CuPy one: ``cuda/ml.cu``) runs it in one kernel.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from . import dm

log = logging.getLogger(__name__)

FLOOR = 1e-6          # of the mean measured intensity per pixel: I_m is kept above it
ARMIJO = 1e-4         # the Poisson step is kept when L(α) ≤ L(0) + ARMIJO·α·L'(0)
MAX_BACKTRACKS = 8    # shorter trials along one direction before going back to its start
SPARSITY_EPS = 1e-4   # mode_penalty's smoothing, of the modes' total norm
TRIAL_STEP = 0.05     # without a usable curvature: the first trial step, ‖(O, P)‖/‖h‖ × this


# (ML) the data term: Σ_good (I_m − I log I_m) and the weight (1 − I/I_m) of ∂L/∂Ψ* = (1 − I/I_m)·Ψ
def poisson_terms(be: Any, fphi: Any, intensity: Any, mask: Any, floor: float) -> tuple[float, Any, Any]:
    xp = be.xp
    model = dm._modulus(be, fphi)
    model = xp.square(model, out=model)
    model = xp.maximum(model, floor, out=model)
    nll = model - intensity * xp.log(model)
    weight = 1.0 - intensity / model
    if mask is not None:
        nll *= mask
        weight *= mask
    return float(xp.sum(nll, dtype=xp.float64)), weight, model


# (ML, amplitude model) Σ_good (|Ψ| − √I)² — the variance-stabilised Poisson model, the peers' cost —
# and its weight (1 − √I/|Ψ|) of ∂L/∂Ψ* = (1 − √I/|Ψ|)·Ψ
def amplitude_terms(be: Any, fphi: Any, diffamp: Any, mask: Any, floor: float) -> tuple[float, Any, Any]:
    xp = be.xp
    model = dm._modulus(be, fphi)
    model = xp.maximum(model, np.sqrt(floor), out=model)
    dev = model - diffamp
    weight = 1.0 - diffamp / model
    if mask is not None:
        dev *= mask
        weight *= mask
    return float(xp.sum(xp.square(dev), dtype=xp.float64)), weight, model


# (ML) pass 1 of one batch: the data term L, the data error (7) and χ̂ = w·F(Φ) (w the weight above) into out
def ml_gradient(be: Any, fphi: Any, diffamp: Any, intensity: Any, mask: Any, floor: float, model: str,
                out: Any) -> tuple[float, float]:
    """Returns (L, Σ_good (|F(Φ)| − √I)²) of the batch; ``out`` (may be ``fphi``) gets w·F(Φ).

    ``intensity`` = ``diffamp``² (precomputed; a fused kernel squares ``diffamp`` itself).
    """
    err = float(dm.data_error(be, fphi, diffamp, mask))                          # (7) of this model
    if model == "poisson":
        nll, weight, _ = poisson_terms(be, fphi, intensity, mask, floor)
    else:
        nll, weight, _ = amplitude_terms(be, fphi, diffamp, mask, floor)
    be.xp.multiply(fphi, weight[:, None, None], out=out)
    return nll, err


# (ML) pass 2 of one batch: L'(0), L''(0) along Φ(α) = Φ + α·A1 + α²·A2, from f0, f1, f2 = F(Φ), F(A1), F(A2)
def ml_line_search(be: Any, f0: Any, f1: Any, f2: Any, diffamp: Any, intensity: Any, mask: Any, floor: float,
                   model: str) -> tuple[float, float]:
    """Σ_good L'(0) and Σ_good L''(0) of the batch; I_m(α) ≈ I_m + α·c1 + α²·c2 per pixel.

    The amplitude model's curvature is the Gauss–Newton one, 2Σ a'² (a = √I_m along the line): the
    exact 2Σ (a'² + (a − √I)·a'') has the term (a − √I)·a'', which goes to −∞ where the model is far
    below the data (|Ψ| − √I is a cone at Ψ = 0), and after a short DM its sum is negative — the
    Newton step then has no minimum and ML stalled (issue 18's fly-scan case). 2Σ a'² ≥ 0, and > 0
    wherever L'(0) ≠ 0; the overshoot test of :meth:`MLIteration.iterate` backs off a step too long.
    """
    xp = be.xp
    B_, L, K, n = f0.shape[0], f0.shape[1], f0.shape[2], f0.shape[-1]
    g0 = f0.reshape(B_, L * K, n, n)
    g1 = f1.reshape(B_, L * K, n, n)
    g2 = f2.reshape(B_, L * K, n, n)
    c1 = 2 * (g0.real * g1.real + g0.imag * g1.imag).sum(axis=1)
    i0 = xp.maximum(dm._modulus(be, f0) ** 2, floor)
    if model == "poisson":     # L = Σ I_m − I log I_m
        c2 = (g1.real ** 2 + g1.imag ** 2 + 2 * (g0.real * g2.real + g0.imag * g2.imag)).sum(axis=1)
        ratio = intensity / i0
        d1 = (1 - ratio) * c1
        d2 = 2 * (1 - ratio) * c2 + ratio / i0 * c1 * c1
    else:                      # L = Σ (√I_m − √I)²: a = √I_m, a' = c1/2a; Gauss–Newton L'' ≈ 2a'²
        a = xp.sqrt(i0)
        da = c1 / (2 * a)
        d1 = 2 * (a - diffamp) * da
        d2 = 2 * da * da
    if mask is not None:
        d1 *= mask
        d2 *= mask
    return float(xp.sum(d1, dtype=xp.float64)), float(xp.sum(d2, dtype=xp.float64))


# (ML) the step along h: α = −L'(0)/L''(0), one Newton step on L(α) (Thibault & Guizar-Sicairos 2012)
def ml_step(d1: float, d2: float, alpha_last: float) -> float:
    """α ≥ 0 from the summed slope ``d1`` and curvature ``d2``; 0 when ``d1`` ≥ 0 (no descent).

    Where the curvature is not positive along a descent direction the quadratic model has no
    minimum: the step is the last positive step ``alpha_last`` (halved back by the overshoot test of
    the next iteration if L rose) or, without one, 0 (the caller restarts along the gradient).
    """
    if not d1 < 0:
        return 0.0
    if d2 > 0:
        return -d1 / d2
    return alpha_last if alpha_last > 0 and np.isfinite(alpha_last) else 0.0


# (ML, mode sparsity) R = μ Σ_k √(‖P_k‖² + ε²) and ∂R/∂P_k* = μ P_k / 2√(‖P_k‖² + ε²): the group penalty on the modes
def mode_penalty(be: Any, probe: Any, mu: float) -> tuple[float, Any]:
    """The penalty R and its gradient (in ``g_probe``'s convention, dR/dα = 2 Re⟨∂R/∂P*, h⟩).

    For orthogonal modes Σ_k ‖P_k‖ is the nuclear norm of the modes' matrix (Σ_k √λ_k of the density
    matrix ρ = Σ_k P_k P_k^H), the convex envelope of its rank: it drives modes that the data do not pay for
    to zero and leaves a mode only where the data's gradient along it exceeds μ/2 (the held-out count's
    sparse fit, docs/auto_modes.md, "Session 33"). ε = :data:`SPARSITY_EPS` × the total norm smooths it at 0.
    """
    s = _smoothed_norms(be.xp, probe)
    return mu * float(be.xp.sum(s)), (0.5 * mu / s)[:, None, None].astype(probe.real.dtype) * probe


def _smoothed_norms(xp: Any, probe: Any) -> Any:
    """s_k = √(‖P_k‖² + ε²) of every mode, ε = :data:`SPARSITY_EPS` × the modes' total norm (float64)."""
    norm2 = xp.sum(xp.square(xp.abs(probe)), axis=(1, 2)).astype(xp.float64)
    return xp.sqrt(norm2 + (SPARSITY_EPS ** 2) * float(xp.sum(norm2)))


# (ML, mode sparsity) R'(0) = μ Σ_k Re⟨P_k, h_k⟩/s_k and R''(0) = μ Σ_k (‖h_k‖² − Re⟨P_k, h_k⟩²/s_k²)/s_k along P + α·h
def mode_penalty_line(be: Any, probe: Any, h: Any, mu: float) -> tuple[float, float]:
    """The penalty's slope and (exact, non-negative) curvature along the probe direction ``h``."""
    xp = be.xp
    s = _smoothed_norms(xp, probe)
    ph = xp.sum(probe.real * h.real + probe.imag * h.imag, axis=(1, 2)).astype(xp.float64)
    hh = xp.sum(xp.square(xp.abs(h)), axis=(1, 2)).astype(xp.float64)
    return mu * float(xp.sum(ph / s)), mu * float(xp.sum((hh - ph * ph / (s * s)) / s))


class MLIteration:
    """Poisson ML by conjugate gradient over a :class:`~hxn_ptycho.engine.Reconstruction`'s parts."""

    name = "ML"

    def __init__(self, rec: Any) -> None:
        self.rec = rec
        be = rec.be
        self.model = rec.params.ml_noise_model
        amp = rec.frames_in_rows()                  # √I in ψ's rows (a copy when they are reordered)
        self.intensity = be.xp.square(amp) if amp is rec.diffamp else be.xp.square(amp, out=amp)
        mean_i = rec.total_intensity / max(rec.good_pixels_total, 1.0)
        self.floor = FLOOR * max(mean_i, 1e-30)
        self.h_obj: Any = None              # conjugate search directions (object, probe)
        self.h_probe: Any = None
        self.g_prev: Any = None             # preconditioned gradient of the previous iteration
        self.gg_prev = 0.0
        self.nll_prev = np.inf
        self.alpha_prev = 0.0
        self.alpha_last = 0.0               # the last positive step (ml_step's fallback)
        self.resets = 0
        self.stalls = 0                     # iterations that took no step (the direction was reset)
        # the Poisson model's checked step (_judge_trial): a trial is (obj, probe) at the last accepted
        # point, its L, L'(0) along h, data error, the step α, the tries, and the trial's own (obj, probe)
        self.backtrack = self.model == "poisson"
        self.trial: dict[str, Any] | None = None
        self.backtracks = 0                 # trials rejected (each cost one pass 1)
        self.reverts = 0                    # directions abandoned after MAX_BACKTRACKS
        self.accepted_nll: list[float] = [] # L at every accepted point (Poisson): strictly falling
        self.stage_end: int | None = None   # the last iteration of this ML stage (its step judged at once)
        # > 1: mode k's probe gradient × min(cap, P_1/P_k) (its power P_k), the density matrix's own
        # gradient step rather than the modes' (weak modes move as fast as strong ones): the held-out
        # count's over-complete fits (hxn_ptycho.mode_count; docs/auto_modes.md, "Session 20"); 1, off,
        # is the engine's default (``Reconstruction.ml_mode_cap``).
        self.mode_precondition_cap = float(getattr(rec, "ml_mode_cap", 1.0))
        # > 0: μ of :func:`mode_penalty` in units of √gain (the data's amplitude units): ML minimises L + R
        # (the held-out count's sparse fit); 0, off, is the engine's default (``Reconstruction.ml_mode_sparsity``)
        self.mode_sparsity = float(getattr(rec, "ml_mode_sparsity", 0.0)) * float(np.sqrt(getattr(rec, "gain", 1.0)))

    # --- pass 1: likelihood and gradient ----------------------------------------------------------
    def _gradient_batch(self, w: Any, b: slice) -> None:
        rec, be = self.rec, self.rec.be
        B = b.stop - b.start
        phi = rec.geom.exit_waves(be, rec.obj, b, rec.probe, w.objwin[:B], w.phi[:B], w.tmp[:B])   # (2)
        fphi = rec._load(w, "psi", b)
        fphi[...] = phi
        be.fft2(fphi)
        rec._store(w, "psi", b, fphi)
        chi = w.work[:B]
        nll, err = be.ml_gradient(fphi, rec.frames(w, b), self.intensity[b], rec.mask, self.floor, self.model, chi)
        w.nll += nll
        w.err += err
        be.ifft2(chi)                                                              # χ = ∂L/∂Φ*
        pos, sub = rec.geom.pass_positions(b)
        be.object_pass(chi, rec._probe_conj, rec._probe_intensity, pos, w.obj_num, w.obj_den, w, sub)  # Σ_k P_k* χ
        windows = rec.geom.gather(be, rec.obj, b, w.objwin[:B], w.tmp[:B]) if sub else None
        be.probe_pass(chi, rec.obj, pos, w.probe_num, w.probe_den, w, windows)    # Σ_j,l O_l* χ, Σ|O|²

    # --- pass 2: the line-search polynomial ------------------------------------------------------
    def _line_batch(self, w: Any, b: slice) -> None:
        rec, be = self.rec, self.rec.be
        B = b.stop - b.start
        geom = rec.geom
        fphi = rec._load(w, "psi", b)
        ow = geom.gather(be, rec.obj, b, w.objwin[:B], w.tmp[:B])
        how = geom.gather(be, self.h_obj, b, w.onum_src[:B], w.tmp[:B])
        a1 = dm.exit_waves(be, rec.probe, how, w.phi[:B])                          # P·h_O
        a1 += ow[:, :, None] * self.h_probe[None, None]                            # + h_P·O
        be.fft2(a1)
        if self.model == "poisson":
            a2 = dm.exit_waves(be, self.h_probe, how, w.work[:B])                  # h_P·h_O
            be.fft2(a2)
        else:                   # the amplitude model's Gauss–Newton curvature does not use F(A2)
            a2 = a1
        d1, d2 = be.ml_line_search(fphi, a1, a2, rec.frames(w, b), self.intensity[b], rec.mask, self.floor,
                                   self.model)
        w.d1 += d1
        w.d2 += d2

    # --- one iteration ----------------------------------------------------------------------------
    def _pass_one(self) -> tuple[float, float, Any, Any, Any, Any]:
        """Pass 1 over every view, summed over workers and ranks: (L, data error, g_O, Σ|P|², g_P, Σ|O|²)."""
        rec = self.rec
        rec._probe_terms()
        for w in rec._workers:
            w.nll = w.d1 = w.d2 = 0.0
        rec._reset("obj_num", "obj_den", "probe_num", "probe_den", "err")
        rec._each(self._gradient_batch)
        g_obj, d_obj = rec._sum_workers("obj_num"), rec._sum_workers("obj_den")
        g_probe, d_probe = rec._sum_workers("probe_num"), rec._sum_workers("probe_den")
        scal = np.array([sum(w.nll for w in rec._workers), sum(float(w.err) for w in rec._workers)])
        rec.reducer.allreduce_sum([g_obj, g_probe])
        rec.reducer.allreduce_sum([d_obj, d_probe])
        rec.reducer.allreduce_sum([scal])
        nll, err = float(scal[0]), float(scal[1])
        if self.mode_sparsity:          # the same on every rank (the probe is): added after the sums
            r, g_r = mode_penalty(rec.be, rec.probe, self.mode_sparsity)
            nll += r
            g_probe = g_probe + g_r.astype(g_probe.dtype, copy=False)
        return nll, err / max(rec.total_intensity, 1e-300), g_obj, d_obj, g_probe, d_probe

    def iterate(self, it: int) -> tuple[float, np.ndarray, np.ndarray]:
        rec, be = self.rec, self.rec.be
        xp = be.xp
        obj_old, probe_old = rec.obj, rec.probe
        nll, data_err, g_obj, d_obj, g_probe, d_probe = self._pass_one()
        # preconditioned gradient (the DM denominators, regularised like the DM updates)
        a_o = rec.params.object_reg * float(d_obj.max()) + dm.TINY
        a_p = rec.params.probe_reg * float(d_probe.max()) + dm.TINY
        pg_obj = g_obj / (d_obj + a_o)
        pg_probe = g_probe / (d_probe[None] + a_p)
        if self.mode_precondition_cap > 1 and pg_probe.shape[0] > 1:
            power = be.asnumpy(xp.sum(xp.square(xp.abs(rec.probe)), axis=(1, 2))).astype(np.float64)
            f = np.minimum(self.mode_precondition_cap, power.max() / np.maximum(power, 1e-300))
            pg_probe = pg_probe * be.asarray(f.astype(pg_probe.real.dtype))[:, None, None]
        if self.backtrack:
            if self.stage_end is None:
                self.stage_end = self._stage_end(it)
            judged = self._judge_trial(nll, it)
            self.last_nll = nll
            if judged is not None:          # a shorter trial, or back at the last accepted point
                if it >= self.stage_end:
                    judged = self._close_stage(it, judged)
                return judged, dm.relative_change(be, rec.probe, probe_old), dm.relative_change(be, rec.obj, obj_old)
        if not np.isfinite(nll):
            raise FloatingPointError("ML: non-finite likelihood")
        gg = float(xp.sum(g_obj.real * pg_obj.real + g_obj.imag * pg_obj.imag)) + \
            float(xp.sum(g_probe.real * pg_probe.real + g_probe.imag * pg_probe.imag))
        restart = self.h_obj is None or nll > self.nll_prev
        if restart and self.h_obj is not None and nll > self.nll_prev:
            # the last step overshot: go back half of it and restart along the gradient
            rec.obj = (rec.obj - 0.5 * self.alpha_prev * self.h_obj).astype(rec.cdtype, copy=False)
            rec.probe = (rec.probe - 0.5 * self.alpha_prev * self.h_probe).astype(rec.cdtype, copy=False)
            self.resets += 1
            self.h_obj = self.h_probe = None
            self.nll_prev = np.inf
            return data_err, dm.relative_change(be, rec.probe, probe_old), dm.relative_change(be, rec.obj, obj_old)
        if restart:
            beta_cg = 0.0
        else:
            g0o, g0p = self.g_prev
            overlap = float(xp.sum(g0o.real * pg_obj.real + g0o.imag * pg_obj.imag)) + \
                float(xp.sum(g0p.real * pg_probe.real + g0p.imag * pg_probe.imag))
            beta_cg = max(0.0, (gg - overlap) / max(self.gg_prev, 1e-300))     # Polak–Ribière+
        if beta_cg == 0.0:
            self.h_obj, self.h_probe = -pg_obj, -pg_probe
        else:
            self.h_obj = beta_cg * self.h_obj - pg_obj
            self.h_probe = beta_cg * self.h_probe - pg_probe
        if it < rec.params.probe_update_start:
            self.h_probe = xp.zeros_like(self.h_probe)
        self.h_obj = self.h_obj.astype(rec.cdtype, copy=False)
        self.h_probe = self.h_probe.astype(rec.cdtype, copy=False)
        self.g_prev = (g_obj, g_probe)
        self.gg_prev = gg
        rec._each(self._line_batch)
        curv = np.array([sum(w.d1 for w in rec._workers), sum(w.d2 for w in rec._workers)])
        rec.reducer.allreduce_sum([curv])
        d1, d2 = float(curv[0]), float(curv[1])
        if self.mode_sparsity:
            r1, r2 = mode_penalty_line(be, rec.probe, self.h_probe, self.mode_sparsity)
            d1, d2 = d1 + r1, d2 + r2
        alpha = ml_step(d1, d2, self.alpha_last)
        if self.backtrack and alpha == 0.0 and d1 < 0:      # no usable curvature yet: a trial the check shortens
            alpha = self._first_step()
        if alpha == 0.0:        # no step along h: restart along the gradient next time (never stall)
            if d1 < 0:
                log.warning("ML iteration %d: curvature %.3g along a descent direction (slope %.3g) gives no "
                            "step; restarting along the gradient", it, d2, d1)
            self.h_obj = None
            self.stalls += 1
        if alpha and self.backtrack:
            self.trial = {"obj": rec.obj, "probe": rec.probe, "nll": nll, "d1": d1, "err": data_err,
                          "alpha": alpha, "tries": 0}
        if alpha:
            rec.obj = (rec.obj + alpha * self.h_obj).astype(rec.cdtype, copy=False)
            rec.probe = (rec.probe + alpha * self.h_probe).astype(rec.cdtype, copy=False)
        if alpha and self.trial is not None:
            self.trial["obj_t"], self.trial["probe_t"] = rec.obj, rec.probe
        self.alpha_prev = alpha
        if alpha > 0 and not self.backtrack:     # (Poisson: set when the trial is accepted)
            self.alpha_last = alpha
        self.nll_prev = nll
        self.last_nll = nll
        if self.backtrack and self.stage_end is not None and it >= self.stage_end:
            data_err = self._close_stage(it, data_err)
        return data_err, dm.relative_change(be, rec.probe, probe_old), dm.relative_change(be, rec.obj, obj_old)

    # --- the Poisson model's checked step ---------------------------------------------------------
    def _stage_end(self, it: int) -> int:
        """The last iteration of the ML stage that iteration ``it`` belongs to."""
        schedule = self.rec._stage_at()
        end = it
        while end + 1 < len(schedule) and schedule[end + 1] == "ML":
            end += 1
        return end

    def _first_step(self) -> float:
        """A trial step without a usable curvature: ``TRIAL_STEP`` × ‖(O, P)‖/‖(h_O, h_P)‖."""
        xp = self.rec.be.xp
        x2 = float(xp.sum(xp.square(xp.abs(self.rec.obj)))) + float(xp.sum(xp.square(xp.abs(self.rec.probe))))
        h2 = float(xp.sum(xp.square(xp.abs(self.h_obj)))) + float(xp.sum(xp.square(xp.abs(self.h_probe))))
        return TRIAL_STEP * float(np.sqrt(x2 / h2)) if h2 > 0 and np.isfinite(h2) else 0.0

    def _close_stage(self, it: int, err: float) -> float:
        """At the stage's last iteration: judge the pending trial now (one more pass 1 a try) so that the
        stage ends on an accepted point; returns that point's data error."""
        while self.trial is not None:
            nll, data_err = self._pass_one()[:2]
            judged = self._judge_trial(nll, it)
            self.last_nll = nll
            err = data_err if judged is None else judged
        return err

    # (ML, Poisson) Armijo backtracking: keep x + αh if L(x + αh) ≤ L(x) + c·α·L'(0), else shorten α (N&W 3.1)
    def _judge_trial(self, nll: float, it: int) -> float | None:
        """Judge the pending trial with its likelihood ``nll`` (pass 1 at the trial point).

        Returns ``None`` when the iteration goes on from the current point (the trial accepted, or
        none pending); otherwise the model was moved (a shorter trial, or back to the last accepted
        point) and the return is the data error of that accepted point, the iteration's report.
        """
        rec = self.rec
        t = self.trial
        if t is None:
            if not self.accepted_nll and np.isfinite(nll):
                self.accepted_nll.append(nll)                  # the stage's start
            return None
        if rec.obj is not t["obj_t"] or rec.probe is not t["probe_t"]:
            # the model was changed between iterations (modes pruned or orthogonalised): start afresh from it
            self.trial = None
            self.h_obj = self.h_probe = None
            self.nll_prev = np.inf
            return None
        alpha, nll0, d1 = t["alpha"], t["nll"], t["d1"]
        if np.isfinite(nll) and nll <= nll0 + ARMIJO * alpha * d1:
            self.trial = None
            self.alpha_last = alpha
            self.accepted_nll.append(nll)
            return None
        self.backtracks += 1
        t["tries"] += 1
        if t["tries"] > MAX_BACKTRACKS:
            # back to the last accepted point; the next direction starts along its gradient
            self.reverts += 1
            log.debug("ML iteration %d: no decrease along the direction after %d shorter steps; back to the "
                      "last accepted point", it, MAX_BACKTRACKS)
            rec.obj, rec.probe = t["obj"], t["probe"]
            self.trial = None
            self.h_obj = self.h_probe = None
            self.nll_prev = np.inf
            return float(t["err"])
        if np.isfinite(nll):     # the minimum of the quadratic through L(0), L'(0), L(α), within [0.1, 0.5]·α
            q = -d1 * alpha / (2.0 * (nll - nll0 - d1 * alpha))
            q = min(0.5, max(0.1, q)) if np.isfinite(q) else 0.1
        else:
            q = 0.1
        t["alpha"] = alpha * q
        rec.obj = (t["obj"] + t["alpha"] * self.h_obj).astype(rec.cdtype, copy=False)
        rec.probe = (t["probe"] + t["alpha"] * self.h_probe).astype(rec.cdtype, copy=False)
        t["obj_t"], t["probe_t"] = rec.obj, rec.probe
        return float(t["err"])
