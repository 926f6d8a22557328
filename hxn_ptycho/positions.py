"""Position refinement: every view's window corner, sub-pixel, from the current model and the data.

Two methods over the same parts (geometry, batches, reducer), chosen by ``position_method``:

- **gradient** (as Tike and Pty-Chi): a Gauss-Newton step per view. With the model exit wave
  Φ = P·O(r + p) and its Fourier-projected version Π_F(Φ), the shift δ that best explains the
  residual R = Π_F(Φ) − Φ by Φ(p + δ) ≈ Φ + δ·∇Φ solves the 2×2 system
  A δ = b, A_ab = Σ Re(∂_a Φ* ∂_b Φ), b_a = Σ Re(∂_a Φ* R), with ∂_a Φ = P·∂_a O. It costs one
  forward and one inverse FFT of the view's exit waves.
- **search** (as the beamline backend and PtyPy): the data error Σ(|F(Φ)| − √I)² is evaluated
  at ±s along rows and columns and the view moves to the best; s shrinks geometrically. It costs
  four forward FFTs per view.

After either, the refined corners of all views are summed through the reducer (every rank refines
only its own views, then all hold all positions), the mean move is removed (a global translation
is traded with the object), with ``position_hold_scale`` the stretch of the linear map refined →
nominal is removed (its rotation stays: the scale of a calibrated stage is kept, since the data
fix it only weakly — it trades with the probe's wavefront curvature), and — with
``position_affine`` — a global affine term (scale, rotation, shear) is fitted to nominal → refined;
each view's correction beyond it is bounded by ``position_max_shift``.

Before these, with ``position_search_radius`` > 0, a **coarse global stage** (:meth:`PositionRefiner.coarse`,
three rounds ten DM iterations apart). With ``position_grow`` (the default) its first round grows the
object in scan order (:mod:`hxn_ptycho.position_search`): each view registered against the object of
the views recorded before it, around the drift predicted from them, outliers searched over the whole
radius — a smooth drift is visible only that way. The other rounds search every view on a grid over
the radius (halved each round) against the object *without its own exit wave* (leave-one-out: the
object a view painted at its current corner otherwise holds it there), fit an affine map and the
smooth drift over the scan order to the moves found, search the outliers again around the
prediction, and move a view only where its data error falls. Half-way through the gradient stage the
object is grown once more, with the probe the gradient stage has refined, and the nominal scale is
held from there (the scale trades with the probe's curvature). At the end of refinement a **guard**
(:meth:`PositionRefiner.guard`) sends back to its nominal corner every view whose data error is lower
there: refinement never leaves a view where the model fits it worse than not refining. Then, with the
coarse stage, the **layout's global scale** along rows and columns is chosen by the data error of
short re-fits from a flat object (:meth:`PositionRefiner.choose_scale`): the gradient stage can
leave the whole layout 1-2.5 % too large or small; last, **each view's pixel** is checked
(:meth:`PositionRefiner.check_pixels`): a view whose refined position lies near the rounding boundary
can snap to the neighbouring pixel and be painted in there. Measured in docs/position_search.md
(``benchmarks/position_search.py``, ``benchmarks/position_scale.py``).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np

from . import dm

logger = logging.getLogger(__name__)
# an astigmatic member must fit the grown views at most this much of the defocus alone's misfit
ASTIGMATISM_GAIN = 0.8


def smoothed(be: Any, obj: Any, sigma: float) -> Any:
    """``obj`` convolved with a Gaussian of ``sigma`` pixels (periodic, through the FFT of the object)."""
    if sigma <= 0.05:
        return obj
    xp = be.xp
    kr = xp.fft.fftfreq(obj.shape[1])[:, None]
    kc = xp.fft.fftfreq(obj.shape[2])[None, :]
    g = xp.exp(-2 * (np.pi * sigma) ** 2 * (kr ** 2 + kc ** 2))
    mean = obj.mean(axis=(1, 2), keepdims=True)
    return (xp.fft.ifft2(xp.fft.fft2(obj - mean) * g) + mean).astype(obj.dtype)


def object_gradient(be: Any, obj: Any) -> tuple[Any, Any]:
    """∂O/∂row and ∂O/∂col by central differences (one-sided at the edges)."""
    xp = be.xp
    out = []
    for axis in (1, 2):
        d = xp.empty_like(obj)

        def at(s: slice, axis: int = axis) -> tuple:
            sl: list[slice] = [slice(None)] * 3
            sl[axis] = s
            return tuple(sl)
        d[at(slice(1, -1))] = 0.5 * (obj[at(slice(2, None))] - obj[at(slice(None, -2))])
        d[at(slice(0, 1))] = obj[at(slice(1, 2))] - obj[at(slice(0, 1))]
        d[at(slice(-1, None))] = obj[at(slice(-1, None))] - obj[at(slice(-2, -1))]
        out.append(d)
    return out[0], out[1]


def view_errors(be: Any, fphi: Any, diffamp: Any, mask: Any) -> np.ndarray:
    """Σ_good (|F(Φ)| − √I)² of each view of a batch, as numpy ``(B,)`` (``diffamp`` may be ``(1, n, n)``)."""
    xp = be.xp
    diff = dm._modulus(be, fphi)
    diff -= diffamp
    if mask is not None:
        diff *= mask
    return be.asnumpy(xp.sum(xp.square(diff), axis=(1, 2), dtype=xp.float64))


# Gauss-Newton normal equations per view: A_ab = Σ Re(∂_a O* ∂_b O)·Σ_k|P_k|², b_a = Σ Re(∂_a O* Σ_k P_k* R_k)
def normal_equations(be: Any, gr: Any, gc: Any, q: Any, pint: Any) -> tuple[np.ndarray, ...]:
    """(A_rr, A_cc, A_rc, b_r, b_c), each numpy ``(B,)``, from the gathered object gradients ``gr``,
    ``gc`` and ``q`` = Σ_k P_k*·R_k (all ``(B, L, n, n)``) and ``pint`` = Σ_k |P_k|² ``(n, n)``."""
    xp = be.xp

    def dot(a: Any, c: Any, weight: Any = None) -> np.ndarray:
        v = (a.real * c.real + a.imag * c.imag)
        if weight is not None:
            v = v * weight
        return be.asnumpy(v.sum(axis=(1, 2, 3), dtype=xp.float64))
    return dot(gr, gr, pint), dot(gc, gc, pint), dot(gr, gc, pint), dot(gr, q), dot(gc, q)


def disc_grid(radius: float, step: float) -> np.ndarray:
    """Offsets (row, col) on a square grid of ``step`` pixels inside the disc of ``radius``, (0, 0) first."""
    k = int(np.floor(radius / step))
    g = np.arange(-k, k + 1) * step
    off = np.stack(np.meshgrid(g, g, indexing="ij"), axis=-1).reshape(-1, 2)
    off = off[np.hypot(off[:, 0], off[:, 1]) <= radius + 1e-9]
    return off[np.argsort(np.hypot(off[:, 0], off[:, 1]), kind="stable")]


def global_prediction(current: np.ndarray, found: np.ndarray, good: np.ndarray, window: int = 7) -> np.ndarray:
    """Where each view should be from the global terms of ``found`` − ``current``: an affine map fitted
    to the ``good`` views (trimmed: moves more than 3 median deviations from the fit refitted without),
    plus the smooth drift over the scan (time) order, the running median of the views' residuals."""
    use = good.copy()
    if use.sum() < 6:
        return current.copy()
    for _ in range(3):
        x, coef = _affine_lstsq(current[use], found[use])
        xa = np.concatenate([current - current[use].mean(axis=0), np.ones((len(current), 1))], axis=1)
        pred = xa @ coef
        resid = np.hypot(*(found - pred).T)
        mad = float(np.median(resid[use])) + 0.5
        keep = good & (resid <= 3 * mad)
        if keep.sum() < 6 or np.array_equal(keep, use):
            break
        use = keep
    res = np.where(use[:, None], found - pred, np.nan)
    drift = np.zeros_like(res)
    h = window // 2
    for j in range(len(res)):
        part = res[max(0, j - h):j + h + 1]
        part = part[np.isfinite(part[:, 0])]
        drift[j] = np.median(part, axis=0) if len(part) else 0.0
    return pred + drift


def _affine_lstsq(nominal: np.ndarray, refined: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The design matrix [nominal − mean, 1] and the least-squares coefficients of refined on it."""
    x = np.concatenate([nominal - nominal.mean(axis=0), np.ones((len(nominal), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(x, refined, rcond=None)
    return x, coef


def fit_affine(nominal: np.ndarray, refined: np.ndarray) -> np.ndarray:
    """Least-squares affine map of the nominal corners onto the refined ones, as predicted corners."""
    x, coef = _affine_lstsq(nominal, refined)
    return x @ coef


def affine_terms(nominal: np.ndarray, refined: np.ndarray) -> np.ndarray:
    """The 2×2 linear part of the fitted affine map (identity = no scale, rotation or shear error)."""
    return _affine_lstsq(nominal, refined)[1][:2].T


def robust_linear(nominal: np.ndarray, refined: np.ndarray, rounds: int = 3) -> np.ndarray:
    """:func:`affine_terms` fitted without the views whose residual exceeds 3 median residuals (slipped
    views and the jitter's tail would otherwise bias the scale)."""
    use = np.ones(len(nominal), bool)
    for _ in range(rounds):
        x, coef = _affine_lstsq(nominal[use], refined[use])
        xa = np.concatenate([nominal - nominal[use].mean(axis=0), np.ones((len(nominal), 1))], axis=1)
        resid = np.hypot(*(refined - xa @ coef).T)
        keep = resid <= 3 * float(np.median(resid)) + 1e-9
        if keep.sum() < 6 or np.array_equal(keep, use):
            break
        use = keep
    return coef[:2].T


def rotation_part(linear: np.ndarray) -> np.ndarray:
    """The rotation of the polar decomposition ``linear`` = R·S (S symmetric: scale and stretch)."""
    u, _, vt = np.linalg.svd(linear)
    if np.linalg.det(u @ vt) < 0:          # never a reflection
        u[:, -1] *= -1
    return u @ vt


def constrain(nominal: np.ndarray, current: np.ndarray, proposed: np.ndarray, max_shift: float,
              affine: bool, hold_scale: bool = False, robust: bool = False) -> np.ndarray:
    """Remove the mean move, remove the global stretch (if ``hold_scale``; fitted without outliers if
    ``robust``), fit the global affine term (if asked) and bound each view's correction."""
    moved = proposed - (proposed - current).mean(axis=0)
    if hold_scale:
        # the stage's errors nominal − refined have no stretch as a function of the refined (true)
        # positions: the linear map refined → nominal, L = R·S, becomes its rotation R, by refined ← S·refined
        # (fitted this way round: regressed on the nominal, which carry the errors, the map would be
        # shrunk by var(true) / (var(true) + var(errors)) — 0.7 % on a 64² simulation with 3 px errors)
        linear = robust_linear(moved, nominal) if robust else affine_terms(moved, nominal)
        stretch = rotation_part(linear).T @ linear
        m = moved.mean(axis=0)
        moved = m + (moved - m) @ stretch.T
    base = fit_affine(nominal, moved) if affine else nominal
    dev = moved - base
    norm = np.hypot(dev[:, 0], dev[:, 1])
    scale = np.minimum(1.0, max_shift / np.maximum(norm, 1e-12))
    return base + dev * scale[:, None]


class PositionRefiner:
    """Refines the positions of a :class:`~hxn_ptycho.engine.Reconstruction`'s views in place."""
    probe_astigmatism: bool = True    # after the defocus, a search along the detector's two axes
    pixel_check: bool = True          # after the layout's choice, each view's pixel checked (check_pixels)

    def __init__(self, rec: Any) -> None:
        if rec.geom.order is not None:      # views addressed by their scan index j (rows = j - start)
            raise ValueError("position refinement needs ψ's rows in the views' given order (Reconstruction._view_order)")
        self.rec = rec
        p = rec.params
        self.method = p.position_method
        self.step = float(p.position_step)
        self.max_shift = max(float(p.position_max_shift), float(p.position_search_radius))
        self.affine = bool(p.position_affine)
        self.hold_scale = bool(p.position_hold_scale)
        self.count = 0
        self.rescue_every, self.outlier, self.rescued = 10, 3.0, 0
        self.sigma0, self.decay = 2.0, 0.95     # coarse to fine: the gradient of a smoothed object first
        self.moves: list[float] = []        # RMS move of each refinement (pixels)
        self.radius = float(p.position_search_radius)
        self.coarse_rounds = 3 if self.radius > 0 else 0
        self.coarse_every = 10             # DM iterations between coarse rounds: the object follows the moves
        self.coarse_moved: list[int] = []
        grows = bool(p.position_grow) and self.radius > 0
        self.grow_rounds = {0} if grows else set()          # coarse rounds that grow the object in scan order
        self.late_grow, self._late, self.late_fracs = grows, False, (0.5,)
        self.local_radius = 10.0
        self.hold_after_grow = True         # the nominal scale held after the second growth,
        self.robust_scale = False           # fitted without the slipped views from then on
        self.grow_errors: list[tuple[float, float]] = []   # (current, grown) data error of each growth
        self.probe_defocus = grows and bool(p.position_probe_defocus)
        self.defocus_views = 48             # views (scan order) grown to score each probe of the family
        self.defocus_chosen: float | None = None     # the family's coefficient taken (None: the probe kept)
        self.defocus_scores: dict[str, Any] = {}    # the growth misfits of the choice (attrs)
        self.defocus_astigmatism = 0.0              # the astigmatism taken (0: none)
        self.defocus_seconds = 0.0
        self.reverted = 0
        self.rescued_at_end = 0             # outliers found again by the guard (coarse stage only)
        self._bufs: dict[int, tuple] = {}
        self.scale_search = self.radius > 0          # the global scale chosen by re-fits after refinement
        self.scale_iterations = 15                   # DM iterations of each candidate's re-fit
        self.scale_range = 0.05                      # candidates within ±5 % of the current scale
        self.scale_finest_px = 0.5                   # the coordinate descent's finest step, at the outermost views
        self.scale_max_refits = 40                   # candidates tried at most
        self.scale_gain = 0.02                       # a scale is taken if its re-fit fits ≤ 98 % of the current's
        self.scale_refits = 0
        self.scale_shear = False                     # the off-diagonal terms of the linear map too (2x the re-fits)
        # a second search, with the isotropic probe of the defocus choice, the off-diagonal terms and
        # steps down to 0.25 px: the refined probe holds the layout's linear map (its quadratic phase
        # follows it), so the first search can prefer the current map (docs/position_search.md,
        # "session 20, second draw"); its map is taken only if a long re-fit from the engine's
        # first probe (unbiased by either) fits it better than the first search's result
        self.scale_second = True
        self.scale_second_finest_px = 0.25
        self.scale_second_max_refits = 80
        self.scale_judge_iterations = 150
        self.scale_restart = True                    # a fresh start (first probe, flat object) at the final corners, where it fits better
        self.scale_restarted: tuple[float, float] | None = None
        self._first_probe = np.array(rec.be.asnumpy(rec.probe), copy=True)
        self._family_probe: np.ndarray | None = None
        self.scale_second_map: tuple[float, ...] | None = None
        self.scale_judged: tuple[float, float] | None = None
        self.scale_chosen: tuple[float, ...] | None = None
        self.scale_scores: dict[str, float] = {}
        self.scale_seconds = 0.0
        # then a check of each view's pixel (the windows are on the grid from here): a view whose
        # refined position lies near the rounding boundary can snap to the neighbouring pixel, and
        # the model painted there holds it (docs/position_search.md, "Session 21")
        self.pixel_ambiguous = 0.25      # proposed: a 1-px move costs < this fraction of the median view's
        self.pixel_rounds = 3            # proposals judged (a fresh start each) at most
        self.pixel_moved: list[int] = []                 # views moved to a neighbouring pixel
        self.pixel_judged: list[tuple[float, float, int]] = []   # (model, fresh start moved, views proposed)
        self.pixel_seconds = 0.0

    @property
    def end(self) -> int:
        """The last iteration of refinement."""
        p = self.rec.params
        return p.position_end or max(p.position_start, int(0.8 * self.rec.iterations) - 1)

    @property
    def gradient_start(self) -> int:
        """The first iteration of the gradient (or search) stage: after the coarse rounds."""
        return self.rec.params.position_start + self.coarse_rounds * self.coarse_every

    @property
    def late_grow_at(self) -> list[int]:
        """The iterations of the later growths (with the probe the gradient stage has refined): at
        ``late_fracs`` of the gradient stage."""
        span = max(0, self.end - self.gradient_start)
        return [self.gradient_start + int(f * span) for f in self.late_fracs]

    def coarse_due(self, it: int) -> bool:
        p = self.rec.params
        if p.refine_positions and self.radius > 0 and self.late_grow and it in self.late_grow_at:
            self._late = True
            return True
        k = it - p.position_start
        return (p.refine_positions and self.coarse_rounds > 0 and 0 <= k < self.coarse_rounds * self.coarse_every
                and k % self.coarse_every == 0 and it <= self.end)

    def due(self, it: int) -> bool:
        p = self.rec.params
        return (p.refine_positions and self.gradient_start <= it <= self.end
                and (it - self.gradient_start) % p.position_interval == 0)

    def _buffers(self, w: Any) -> tuple:
        rec = self.rec
        B = rec.plan.batch_size
        L, K, n = rec.obj_shape[0], rec.probe.shape[0], rec.n
        key = id(w)
        bufs = self._bufs.get(key)
        if bufs is None or bufs[0].shape[0] < B or bufs[2].shape[2] != K:
            be = rec.be
            bufs = (be.empty((B, L, n, n), rec.cdtype), be.empty((B, L, n, n), rec.cdtype),
                    be.empty((B, L, K, n, n), rec.cdtype), be.empty((B, L, n, n), rec.cdtype))
            self._bufs[key] = bufs
        return bufs

    # --- the coarse global stage -------------------------------------------------------------------
    def coarse(self) -> int:
        """One round of the coarse global stage; returns the number of views moved.

        1. every view: the data error on a grid (2 px steps, on the object smoothed by 1 px: the
           basin of a shift is as wide as the object's features) over the disc of
           ``position_search_radius`` around its corner, then the best pixel around the best node;
        2. the global terms of the moves found: an affine map (trimmed fit) and the smooth drift over
           the scan order (:func:`global_prediction`);
        3. outliers — views whose move disagrees with the global terms by more than 3 median
           deviations — are searched again, pixel by pixel around the prediction;
        4. a view moves only where its data error falls (on the unsmoothed object).
        Then the mean move is removed (a global translation is traded with the object).
        """
        rec, be, geom = self.rec, self.rec.be, self.rec.geom
        if self._late:
            self._late = False
            return self.grow(late=True) if rec.reducer.size == 1 else 0
        if len(self.coarse_moved) in self.grow_rounds and rec.reducer.size == 1:
            return self.grow()
        radius = max(3.0, self.radius / 2 ** len(self.coarse_moved))     # later rounds: around the last moves
        cur = geom.positions_all.copy()
        N = len(cur)
        step = 2.0 if radius > 4 else 1.0
        grid, fine = disc_grid(radius, step), disc_grid(1.5, 1.0)
        scratch = self._scratch()
        found, e_found, e_cur = np.zeros_like(cur), np.zeros(N), np.zeros(N)
        num, den, alpha = self._object_sums()
        loo: dict[int, Any] = {}
        for j in range(geom.start, geom.stop):
            loo[j] = obj_j = self._leave_one_out(j, num, den, alpha)
            cand = self._clip(cur[j] + grid)
            best = cand[int(np.argmin(self._errors_at(j, cand, smoothed(be, obj_j, 0.5 * step), scratch)))]
            cand = self._clip(np.concatenate([cur[j][None], best + fine]))
            e = self._errors_at(j, cand, obj_j, scratch)
            i = int(np.argmin(e))
            found[j], e_found[j], e_cur[j] = cand[i], e[i], e[0]
        rec.reducer.allreduce_sum([found, e_found, e_cur])
        improved = e_found < 0.9 * e_cur
        pred = global_prediction(cur, found, improved)
        off = np.hypot(*(found - pred).T)
        mad = float(np.median(off[improved])) if improved.any() else 0.0
        outliers = np.nonzero(off > max(3.0, 3 * mad))[0]
        again, e_again = np.zeros_like(cur), np.full(N, np.inf)
        near = disc_grid(max(3.0, 3 * mad), 1.0)
        for j in outliers.tolist():
            if geom.start <= j < geom.stop:
                cand = self._clip(np.round(pred[j]) + near)
                e = self._errors_at(j, cand, loo[j], scratch)
                i = int(np.argmin(e))
                again[j], e_again[j] = cand[i], e[i]
        e_again[~np.isfinite(e_again)] = 0.0
        rec.reducer.allreduce_sum([again, e_again])
        better = np.isin(np.arange(N), outliers) & (e_again < e_found) & (e_again > 0)
        found[better], e_found[better] = again[better], e_again[better]
        move = e_found < e_cur
        new = np.where(move[:, None], found, cur)
        new -= (new - cur).mean(axis=0)
        new = self._clip(new)
        geom.set_positions(new)
        self.coarse_moved.append(int(move.sum()))
        return int(move.sum())

    def grow(self, late: bool = False) -> int:
        """A growth round: the object grown in scan order from a flat start at the current object's
        probe-weighted mean level, each view registered against the views before it
        (:mod:`hxn_ptycho.position_search`); the model's object becomes the grown one. ``late`` (with
        the refined probe): the stretch of the grown corners against the nominal ones is removed and
        the nominal scale held for the rest of refinement. Returns the views moved (at least 1, so
        the engine renews the exit waves)."""
        from .position_search import Grower, grow
        rec, be, geom = self.rec, self.rec.be, self.rec.geom
        obj = be.asnumpy(rec.obj)
        probe = be.asnumpy(rec.probe)
        cur = geom.positions_all.copy()
        pint = np.sum(np.abs(probe) ** 2, axis=0)
        corners = np.clip(np.round(cur).astype(np.int64), 0, None)
        n = rec.n
        level = np.mean([np.sum(obj[:, r:r + n, c:c + n] * pint, axis=(1, 2)) for r, c in corners], axis=0)
        start = np.broadcast_to((level / pint.sum())[:, None, None], obj.shape)
        amps = be.asnumpy(rec.diffamp)
        mask = None if rec.mask is None else be.asnumpy(rec.mask)
        old_probe = probe
        if self.probe_defocus and not late and not self.grow_errors:
            t0 = time.perf_counter()
            probe = self._choose_defocus(probe, level / pint.sum(), obj.shape, amps, mask, cur)
            self.defocus_seconds = time.perf_counter() - t0
        g = Grower(start, probe, amps, mask)
        new, rep = grow(g, cur, self.radius, local_radius=self.local_radius)
        # checked: the grown model must fit the data better than the current one, or nothing changes
        g_now = g if probe is old_probe else Grower(obj[:, :1, :1], old_probe, amps, mask)
        e_now = sum(g_now.misfit(j, g.clip(cur[j][None]), obj)[0] for j in range(len(cur)))
        e_grown = sum(g.misfit(j, g.clip(new[j][None]))[0] for j in range(len(cur)))
        self.grow_errors.append((float(e_now), float(e_grown)))
        if not e_grown < e_now:
            rec.log(f"hxn-ptycho: positions grown in scan order fit worse ({e_grown:.4g} vs {e_now:.4g}): not kept")
            if probe is not old_probe:                  # the probe of the family goes with the growth
                self.defocus_chosen, self.hold_after_grow = None, True
                self._family_probe = None               # nor is the second scale search's probe taken
                self.defocus_astigmatism = 0.0
            self.coarse_moved.append(0)
            return 0
        new -= (new - cur).mean(axis=0)
        if late:
            new = constrain(geom.nominal_all, cur, new, self.max_shift, False, hold_scale=True, robust=True)
            self.robust_scale = True
            self.hold_scale = self.hold_scale or self.hold_after_grow    # the probe's curvature must follow
        geom.set_positions(self._clip(new))
        rec.obj = be.asarray(g.obj, rec.cdtype)
        if probe is not old_probe:
            rec.probe = be.asarray(probe, rec.cdtype)
        self.grow_report = rep
        self.coarse_moved.append(rep.moved)
        rec.log(f"hxn-ptycho: positions grown in scan order: {rep.moved} views moved, {rep.wide} searched wide")
        return max(1, rep.moved)

    def _choose_defocus(self, probe: np.ndarray, level: np.ndarray, shape: tuple[int, ...], amps: np.ndarray,
                        mask: np.ndarray | None, cur: np.ndarray) -> np.ndarray:
        """The probe (K, n, n) whose first mode fits the first ``defocus_views`` views best once they
        are grown in scan order: the current one or a member of the defocus family
        (:func:`~hxn_ptycho.position_search.defocus_family`: the mean measured amplitude with a
        defocus phase π·c·k²). A probe at the nominal corners cannot be judged by its misfit there
        (the position errors dominate it); grown, the views are registered and the probe's error shows.

        Cheap enough to run whenever the coarse stage does (docs/position_search.md, session 19):
        the growths that score the probes run at half resolution (the central n/2 of the far field,
        :func:`~hxn_ptycho.position_search.half_resolution`; a member c becomes c/4 there), and
        coarse to fine — c over ±n in steps of n/4 and the current probe; the current probe is kept
        if it fits better than every member (10 growths), else ±n/8, ±n/16 and ±n/32 around the
        best member (6 more), which is taken if it fits better than the current probe. Then an
        astigmatism along the detector's axes (:meth:`_choose_astigmatism`, at most 12 more)."""
        from .position_search import defocus_family, growth_misfit, half_resolution, mean_pupil
        rec = self.rec
        n = rec.n
        f = 2 if n >= 32 and n % 4 == 0 else 1
        amps_s, mask_s, probe_s, cur_s, shape_s = half_resolution(amps, mask, probe, cur, shape, f)
        m = amps_s.shape[-1]
        good = np.ones((m, m), bool) if mask_s is None else mask_s
        mean_amp = mean_pupil(amps_s, mask_s)
        # every candidate at the power the data ask of a flat object at ``level`` (Parseval)
        energy = float(np.mean(np.sum(np.square(amps_s, dtype=np.float64) * good, axis=(1, 2))))
        probe_s *= np.sqrt(energy / max(float(np.sum(np.abs(level) ** 2)), 1e-300)
                           / max(float(np.sum(np.abs(probe_s) ** 2)), 1e-300))
        power_s = float(np.sum(np.abs(probe_s[0]) ** 2))
        views = self.defocus_views

        def score(p0: np.ndarray) -> float:
            cand = probe_s.copy()
            cand[0] = p0
            return growth_misfit(cand, level, shape_s, amps_s, mask_s, cur_s, self.radius / f,
                                 self.local_radius / f, views)
        tried: dict[float, float] = {}

        def scan(cs: np.ndarray) -> float:
            cs = np.array([c for c in cs if float(c) not in tried])
            for c, p0 in zip(cs, defocus_family(mean_amp, power_s, cs / f ** 2)):
                tried[float(c)] = score(p0)
            return min(tried, key=tried.__getitem__)
        best = scan(np.arange(-n, n + n / 8, n / 4))
        e_current = score(probe_s[0])
        self.defocus_scores = {"coarse": dict(tried), "current": e_current}
        if not tried[best] < e_current:
            rec.log(f"hxn-ptycho: probe defocus: the current probe fits {e_current:.4g}, better than every c "
                    f"(best c = {best:.0f}: {tried[best]:.4g}; {views} views grown at 1/{f} resolution): kept")
            return probe
        step = n / 8
        for _ in range(3):
            best = scan(np.array([best - step, best + step]))
            step /= 2
        self.defocus_scores["all"] = dict(tried)
        logger.debug("probe defocus scores: %s", self.defocus_scores)
        rec.log(f"hxn-ptycho: probe defocus: c = {best:.1f} fits {tried[best]:.4g} against {e_current:.4g} "
                f"for the current probe ({views} views grown at 1/{f} resolution)")
        if not tried[best] < e_current:
            return probe
        astig = 0.0
        if self.probe_astigmatism:
            best, astig = self._choose_astigmatism(best, tried[best], mean_amp, power_s, score, f)
        self.defocus_chosen = best
        self.defocus_astigmatism = astig
        # a probe of the right defocus: the late growth's scale is the data's, not held to the nominal
        # one (held, seed 2 ended at 0.81 px and 8.6x the true run's object error)
        self.hold_after_grow = False
        out = probe.copy()
        out[0] = defocus_family(mean_pupil(amps, mask), float(np.sum(np.abs(probe[0]) ** 2)), np.array([best]),
                                np.array([astig]))[0]
        self._family_probe = out.copy()
        return out

    def _choose_astigmatism(self, c: float, e_c: float, mean_amp: np.ndarray, power_s: float,
                            score: Callable[..., float], f: int) -> tuple[float, float]:
        """The astigmatism a along the detector's axes (a defocus c − a along the rows, c + a along
        the columns) that, with the defocus ``c`` just chosen (growth misfit ``e_c``), fits the
        grown views best: a coordinate search in the two axes' defocus, steps n/8, n/16, n/32, each
        axis ±step in turn (at most 12 growths). Without it an astigmatic probe trades with an uneven
        scale of the layout (docs/position_search.md, "Session 19, astigmatism"). The growth misfit
        varies by up to 20 % between neighbouring members of no better fit (the simulator's zone
        plate, drift seed 3), so the member found is taken only if it fits at most
        ``ASTIGMATISM_GAIN`` of ``e_c`` (the astigmatic zone plate: 0.73). Returns the mean defocus
        (c_row + c_col)/2 and a; (c, 0) where none is taken."""
        from .position_search import defocus_family
        rec = self.rec
        n = rec.n
        tried: dict[tuple[float, float], float] = {(c, c): e_c}

        def at(cr: float, cc: float) -> np.ndarray:
            return defocus_family(mean_amp, power_s, np.array([(cr + cc) / 2 / f ** 2]),
                                  np.array([(cc - cr) / 2 / f ** 2]))[0]
        best = (c, c)
        step = n / 8
        for _ in range(3):
            for axis in (0, 1):
                for sign in (-1.0, 1.0):
                    cand = list(best)
                    cand[axis] += sign * step
                    key = (float(cand[0]), float(cand[1]))
                    if key not in tried:
                        tried[key] = score(at(*key))
                best = min(tried, key=tried.__getitem__)
            step /= 2
        self.defocus_scores["astigmatism"] = {f"{r:g},{q:g}": e for (r, q), e in tried.items()}
        if not tried[best] <= ASTIGMATISM_GAIN * e_c:
            rec.log(f"hxn-ptycho: probe astigmatism: the best, rows {best[0]:.1f} and columns {best[1]:.1f}, "
                    f"fits {tried[best]:.4g} against {e_c:.4g} for c = {c:.1f}: none")
            return c, 0.0
        rec.log(f"hxn-ptycho: probe astigmatism: rows {best[0]:.1f}, columns {best[1]:.1f} fit {tried[best]:.4g} "
                f"against {e_c:.4g} for c = {c:.1f}: taken")
        return (best[0] + best[1]) / 2, (best[1] - best[0]) / 2

    # --- the global scale -------------------------------------------------------------------------
    def choose_scale(self, it: int) -> bool:
        """The layout's global linear map (scale along rows and columns; with ``scale_shear`` the
        off-diagonal terms too), chosen after refinement by the data error of short re-fits.

        The gradient stage can leave the layout 1-2.5 % too large or small (docs/position_search.md,
        session 20). The data fix the scale: reconstructed from the true positions scaled by 1 %, the
        annular lens and the astigmatic zone plate fit 13-31 % worse. Not from the current model,
        though: its object and probe hold the current scale (re-fits from it, even with the object
        resampled to each candidate's scale, preferred a layout further off). So each candidate
        map of the current corners about their centre is scored by the model error after
        ``scale_iterations`` DM iterations (object and probe updated) from the engine's first object
        at the current object's level and the current probe, with the windows on the pixel grid as
        after refinement (the corners snapped as the engine snaps them; maps that snap to the same
        corners are one candidate). Coordinate descent: steps that move the outermost views by 1 px
        (or 1 % of the extent, where more) halved down to ``scale_finest_px``, within
        ``scale_range`` of the identity. The best map is taken only if its re-fit's error is at most
        ``1 - scale_gain`` of the current layout's own re-fit; then its corners and re-fitted model
        replace the current ones, otherwise the model stays (the exit waves restart from it either
        way).

        The refined probe holds the layout's linear map (its quadratic phase follows it), so that
        search can prefer the current map (the annular lens, drift seed 2: rows 1.8 % small and a
        shear kept). Where the defocus choice took a member of its family (an isotropic probe that
        never saw the refined layout; ``scale_second``), a second search from that probe, with the
        off-diagonal terms and steps down to ``scale_second_finest_px``, proposes another map; where
        it snaps to other corners than the first search's result, both are judged by
        ``scale_judge_iterations`` DM iterations from the engine's first probe and the flat object
        (as a reconstruction starts, biased by neither probe), and the second map is taken if it
        fits at most ``1 - scale_gain`` of the first's, with that long re-fit's model
        (docs/position_search.md, "session 20, second draw").

        Then (``scale_restart``, unless the judge's long re-fit is already the model) the model at
        the final corners is compared with a fresh start there — ``scale_judge_iterations`` DM
        iterations from the engine's first probe and the flat object — and replaced by it where its
        data error is at most ``1 - scale_gain`` of the model's: the refined layout can be right
        while the model refined along with it is not (the annular lens, seed 5: 1.28x, from
        scratch at the same corners 1.00x). Last (``pixel_check``) each view's pixel,
        :meth:`check_pixels`. Returns whether the layout's map was taken."""
        from .dm_iteration import DMIteration
        from .initial import initial_object
        rec, be, geom = self.rec, self.rec.be, self.rec.geom
        t0 = time.perf_counter()
        sub = geom.subpixel_windows
        geom.use_subpixel(False)       # bilinear windows blur by each view's fraction: scored on the grid
        cur = geom.positions_all.copy()
        n = rec.n
        c = cur.mean(axis=0)
        obj0, probe0 = rec.obj, rec.probe
        rounds = len(rec.overlap_rounds)
        probe_h = be.asnumpy(probe0)
        pint = np.sum(np.abs(probe_h) ** 2, axis=0)
        obj_h = be.asnumpy(obj0)
        acc = np.array([sum(complex(np.sum(obj_h[0, r:r + n, q:q + n] * pint)) for r, q in geom.corner), len(geom)],
                       np.complex128)
        rec.reducer.allreduce_sum([acc])
        level = acc[0] / max(acc[1].real, 1.0) / float(pint.sum())
        flat = be.asarray(initial_object(rec.obj_shape, rec.params) * level, rec.cdtype)

        def layout(m: tuple[float, ...]) -> np.ndarray:
            pos = c + (cur - c) @ np.reshape(m, (2, 2)).T
            # snapped as the engine snaps: the common sub-pixel offset first
            pos -= np.angle(np.mean(np.exp(2j * np.pi * pos), axis=0)) / (2 * np.pi)
            return self._clip(pos)
        self.scale_refits = 0

        def refit_here(probe: Any, iterations: int) -> tuple[float, Any, Any]:
            # DM from the flat object and ``probe`` at the current corners: (model error, object, probe)
            rec.obj, rec.probe = flat, probe
            rec._each(rec._init_psi)
            stage = DMIteration(rec)
            for _ in range(iterations):
                stage.iterate(it)
            return rec.model_cost()[0], rec.obj, rec.probe

        def fitted(s: tuple[float, ...], probe: Any, iterations: int, seen: dict) -> tuple[float, Any, Any]:
            geom.set_positions(layout(s))
            corners = np.round(geom.positions_all).tobytes()     # on the grid; the same on every rank
            if corners not in seen:
                seen[corners] = refit_here(probe, iterations)
                self.scale_refits += 1
            return seen[corners]
        one: tuple[float, ...] = (1.0, 0.0, 0.0, 1.0)          # the linear map (row-major) of the corners about their centre
        ext = np.maximum(np.abs(cur - c).max(axis=0), 1.0)

        def search(probe: Any, shear: bool, finest: float, max_refits: int) -> tuple[tuple[float, ...], dict]:
            tried: dict[tuple[float, ...], tuple[float, Any, Any]] = {}
            seen: dict[bytes, tuple[float, Any, Any]] = {}     # by the windows' corners: scales that snap alike

            def refit(s: tuple[float, ...]) -> None:
                if s not in tried:
                    tried[s] = fitted(s, probe, self.scale_iterations, seen)
            refit(one)
            best = one
            # steps as moves of the outermost views: from 1 px (or 1 % where that is more) down to ``finest``
            edge = [max(1.0, 0.01 * float(ext.max()))]
            while edge[-1] / 2 >= finest:
                edge.append(edge[-1] / 2)
            for step in edge:
                while len(tried) < max_refits:
                    for k in ((0, 3, 1, 2) if shear else (0, 3)):
                        for sign in (-1.0, 1.0):
                            cand = list(best)
                            cand[k] = round(cand[k] + sign * step / float(ext[k % 2]), 6)
                            if abs(cand[k] - one[k]) > self.scale_range:
                                continue
                            refit(tuple(cand))
                    new = min(tried, key=lambda k: tried[k][0])      # ties: the first tried (nearest the current)
                    if new == best:
                        break
                    best = new
            return best, tried
        best, tried = search(probe0, self.scale_shear, self.scale_finest_px, self.scale_max_refits)
        e_one, e_best = tried[one][0], tried[best][0]
        taken = best != one and e_best <= (1.0 - self.scale_gain) * e_one
        self.scale_second_map, self.scale_judged = None, None
        if self.scale_second and self._family_probe is not None:
            fam = be.asarray(self._family_probe, rec.cdtype)
            second, _ = search(fam, True, self.scale_second_finest_px, self.scale_second_max_refits)
            self.scale_second_map = second
            first = best if taken else one
            if np.round(layout(second)).tobytes() != np.round(layout(first)).tobytes():
                # judged by long re-fits from the engine's first probe, as a reconstruction would start
                p1 = be.asarray(self._first_probe, rec.cdtype)
                e_first = fitted(first, p1, self.scale_judge_iterations, {})[0]
                judged = fitted(second, p1, self.scale_judge_iterations, {})
                e_second = judged[0]
                self.scale_judged = (float(e_first), float(e_second))
                if e_second <= (1.0 - self.scale_gain) * e_first:
                    best, taken = second, True
                    tried[second] = judged          # the model: that long re-fit (15 from the current probe did worse)
                    e_best = judged[0]
        geom.subpixel_windows = sub
        if taken:
            geom.set_positions(layout(best))
            rec.obj, rec.probe = tried[best][1], tried[best][2]
        else:
            geom.set_positions(cur)
            rec.obj, rec.probe = obj0, probe0
        rec._each(rec._init_psi)
        self.scale_restarted = None
        if self.scale_restart and not (taken and self.scale_judged is not None and best == self.scale_second_map):
            # the model at the final corners against a fresh start there (the first probe, the flat object)
            e_model = rec.model_cost()[0]
            obj1, probe1 = rec.obj, rec.probe
            e_fresh = refit_here(be.asarray(self._first_probe, rec.cdtype), self.scale_judge_iterations)[0]
            self.scale_restarted = (float(e_model), float(e_fresh))
            if not e_fresh <= (1.0 - self.scale_gain) * e_model:
                rec.obj, rec.probe = obj1, probe1
            rec._each(rec._init_psi)
        self.pixel_moved, self.pixel_judged = [], []
        if self.pixel_check:
            self.check_pixels(lambda: refit_here(be.asarray(self._first_probe, rec.cdtype),
                                                 self.scale_judge_iterations))
        del rec.overlap_rounds[rounds:]
        self.scale_chosen = best if taken else one
        self.scale_scores = {",".join(f"{v:g}" for v in k): e[0] for k, e in tried.items()}
        if self.scale_judged is not None:
            second_map = np.round(self.scale_second_map or (), 4).tolist()
            rec.log(f"hxn-ptycho: layout scale: second search (the defocus choice's probe) {second_map}; "
                    f"long re-fits from the first probe: {self.scale_judged[0]:.5g} (first) against {self.scale_judged[1]:.5g}")
        self.scale_seconds = time.perf_counter() - t0
        logger.debug("layout scale re-fits: %s", self.scale_scores)
        rec.log(f"hxn-ptycho: layout scale: the best linear map {np.round(best, 4).tolist()} fits {e_best:.5g} "
                f"against {e_one:.5g} at the current scale ({self.scale_refits} re-fits of {self.scale_iterations} "
                f"DM iterations, {self.scale_seconds:.1f} s): {'taken' if taken else 'kept the current'}")
        return taken

    def check_pixels(self, fresh_start: Callable[[], tuple[float, Any, Any]]) -> int:
        """Each view's pixel, after the layout's choice (windows on the grid): returns the views moved.

        The refined layout is right to a few tenths of a pixel, but a view whose position lies
        near the rounding boundary can snap to the neighbouring pixel, and the model refined or
        started afresh there paints it in (the annular lens, drift seed 4: three views 1 px off,
        their refined positions 0.50-0.60 px from the truth; from scratch at those corners the
        object is 1.26x the true-position run's, the data error +5 %; docs/position_search.md,
        "Session 21"). Each view's data error against the object without its own exit wave
        (:meth:`_leave_one_out`) at its pixel and the 8 around it: moving a well-placed view
        1 px costs 1.4-4x its error (median about 2.4x), the wrongly snapped views' best neighbour
        0.93-1.32x — the co-adapted model still favours them where they are, so no neighbour need
        fit better. A view whose best neighbour costs less than ``pixel_ambiguous`` of the median
        view's cost (ratio - 1) is proposed there; the proposals are judged together by
        ``fresh_start`` (the fresh start of :meth:`choose_scale`: the first probe, the flat object)
        at the moved corners, taken where its data error is at most ``1 - scale_gain`` of the
        current model's, which that fresh start's model then replaces; up to ``pixel_rounds``
        rounds while proposals are taken."""
        rec, geom = self.rec, self.rec.geom
        t0 = time.perf_counter()
        N = len(geom.positions_all)
        near = np.array([(0, 0)] + [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)], float)
        for _ in range(self.pixel_rounds):
            cur = geom.positions_all.copy()
            corner = np.round(cur)                     # the windows' corners (on the grid)
            num, den, alpha = self._object_sums()      # from the exit waves P·O of the model
            illum = den[0] > 0.1 * float(den.max())
            level = rec.obj[:, illum].mean(axis=1)[:, None, None]
            scratch = self._scratch()
            errs = np.zeros((N, len(near)))
            for j in range(geom.start, geom.stop):
                obj_j = self._leave_one_out(j, num, den, alpha, fill=level)
                errs[j] = self._errors_at(j, self._clip(corner[j] + near), obj_j, scratch)
            rec.reducer.allreduce_sum([errs])
            cost = errs[:, 1:].min(axis=1) / np.maximum(errs[:, 0], 1e-300) - 1.0   # the cheapest 1-px move
            proposed = np.nonzero(cost < self.pixel_ambiguous * float(np.median(cost)))[0]
            if not len(proposed):
                break
            new = cur.copy()
            new[proposed] = self._clip(corner[proposed] + near[1 + np.argmin(errs[proposed, 1:], axis=1)])
            e_model, obj1, probe1 = rec.model_cost()[0], rec.obj, rec.probe
            geom.set_positions(new)
            e_new = fresh_start()[0]
            self.pixel_judged.append((float(e_model), float(e_new), int(len(proposed))))
            taken = e_new <= (1.0 - self.scale_gain) * e_model
            rec.log(f"hxn-ptycho: pixel check: views {proposed.tolist()} proposed on a neighbouring pixel; a fresh "
                    f"start there fits {e_new:.5g} against the model's {e_model:.5g}: {'taken' if taken else 'kept'}")
            if not taken:
                geom.set_positions(cur)
                rec.obj, rec.probe = obj1, probe1
                rec._each(rec._init_psi)
                break
            self.pixel_moved += proposed.tolist()
            rec._each(rec._init_psi)
        self.pixel_seconds = time.perf_counter() - t0
        return len(self.pixel_moved)

    def _object_sums(self) -> tuple[Any, Any, float]:
        """The numerator Σ_j P*·ψ_j and denominator Σ_j |P|² of the object update (6) from the
        current exit waves, over all views, and its regulariser α."""
        rec, be, geom = self.rec, self.rec.be, self.rec.geom
        xp = be.xp
        num = be.zeros(rec.obj_shape, rec.cdtype)
        den = be.zeros((1,) + rec.obj_shape[1:], rec.rdtype)
        pconj = xp.conj(rec.probe)
        pint = (xp.square(rec.probe.real) + xp.square(rec.probe.imag)).sum(axis=0)
        for b in rec.batches:
            psi = be.asarray(rec.psi[b])
            src = dm.object_numerator(be, psi, pconj, be.empty(psi.shape[:2] + psi.shape[3:], rec.cdtype))
            geom.scatter_add(be, num, b, src)
            geom.scatter_add(be, den, b, pint)
        rec.reducer.allreduce_sum([num, den])
        self._pconj, self._pint = pconj, pint
        return num, den, rec.params.object_reg * float(den.max()) + dm.TINY

    def _leave_one_out(self, j: int, num: Any, den: Any, alpha: float, fill: Any = None) -> Any:
        """The object update (6) without view ``j``'s own exit wave: a view's current corner is
        otherwise favoured by the object it painted there itself. Where no other view illuminates,
        the current object — or ``fill`` (e.g. the object's mean level: no evidence there)."""
        rec, be, geom = self.rec, self.rec.be, self.rec.geom
        i = j - geom.start
        b = slice(i, i + 1)
        psi = be.asarray(rec.psi[b])
        src = dm.object_numerator(be, psi, self._pconj, be.empty(psi.shape[:2] + psi.shape[3:], rec.cdtype))
        n_j, d_j = num.copy(), den.copy()
        geom.scatter_add(be, n_j, b, -src)
        geom.scatter_add(be, d_j, b, -self._pint)
        prior = rec.obj if fill is None else fill
        return ((n_j + alpha * prior) / (be.xp.maximum(d_j, 0) + alpha)).astype(rec.cdtype, copy=False)

    def errors_at_positions(self, positions: np.ndarray) -> np.ndarray:
        """Each view's data error with the current model at ``positions`` (all views; summed over ranks)."""
        rec, geom = self.rec, self.rec.geom
        scratch = self._scratch()
        out = np.zeros(len(positions))
        for j in range(geom.start, geom.stop):
            out[j] = self._errors_at(j, self._clip(positions[j][None]), rec.obj, scratch)[0]
        rec.reducer.allreduce_sum([out])
        return out

    def guard(self) -> int:
        """Refinement must not make the data error worse than not refining: each view whose data
        error with the current model is lower at its nominal corner (moved by the mean refinement
        shift, traded with the object) than at its refined one goes back; returns how many.

        With the coarse stage (``position_search_radius`` > 0) each view is judged against the
        object *without its own exit wave* (:meth:`_leave_one_out`, the mean level where no other
        view illuminates): a view left at a wrong corner has painted the object there itself and
        fits it. Views whose error so judged is far above the others' (relative to the frame's
        energy) are searched again over ``position_max_shift`` around the drift of their neighbours
        in scan order (:meth:`_rescue_outliers`) before the comparison."""
        geom = self.rec.geom
        cur = geom.positions_all.copy()
        shift = np.median(cur - geom.nominal_all, axis=0)
        back = self._clip(geom.nominal_all + shift)
        if self.radius > 0:
            e_cur, e_back, cur = self._rescue_outliers(cur, back)
            geom.set_positions(cur)
        else:
            e_back, e_cur = self.errors_at_positions(back), self.errors_at_positions(cur)
        worse = e_back < e_cur
        if worse.any():
            cur[worse] = back[worse]
            geom.set_positions(cur)
        self.reverted = int(worse.sum())
        return self.reverted + self.rescued_at_end

    def _rescue_outliers(self, cur: np.ndarray, back: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each view's data error at ``cur`` and at ``back`` against the object without its own exit
        wave, and the corners with the outliers searched again: a view whose error at ``cur``
        relative to its frame's energy exceeds 3x the median moves to the best corner of a grid
        (2 px on the smoothed object, then 1 px) over ``position_max_shift`` around its nominal
        corner plus the median correction of the 9 views around it in scan order, if its error
        there is below 0.7x the lower of the two."""
        rec, be, geom = self.rec, self.rec.be, self.rec.geom
        N = len(cur)
        num, den, alpha = self._object_sums()
        illum = den[0] > 0.1 * float(den.max())
        level = rec.obj[:, illum].mean(axis=1)[:, None, None]
        scratch = self._scratch()
        e_cur, e_back, energy = np.zeros(N), np.zeros(N), np.zeros(N)
        for j in range(geom.start, geom.stop):
            obj_j = self._leave_one_out(j, num, den, alpha, fill=level)
            e_cur[j], e_back[j] = self._errors_at(j, self._clip(np.stack([cur[j], back[j]])), obj_j, scratch)
            amp = rec.diffamp[j - geom.start]
            energy[j] = float(be.asnumpy(be.xp.sum(be.xp.square(amp if rec.mask is None else amp * rec.mask),
                                                   dtype=be.xp.float64)))
        rec.reducer.allreduce_sum([e_cur, e_back, energy])
        rel = e_cur / np.maximum(energy, 1e-300)
        flagged = np.nonzero(rel > 3.0 * float(np.median(rel)))[0]
        corr = cur - geom.nominal_all
        typical = np.ones(N, bool)
        typical[flagged] = False
        found, e_found = np.zeros_like(cur), np.zeros(N)
        coarse, fine = disc_grid(self.max_shift, 2.0), disc_grid(1.5, 1.0)
        for j in flagged.tolist():
            if not geom.start <= j < geom.stop:
                continue
            near = [k for k in range(max(0, j - 4), min(N, j + 5)) if typical[k]]
            pred = geom.nominal_all[j] + (np.median(corr[near], axis=0) if near else 0.0)
            obj_j = self._leave_one_out(j, num, den, alpha, fill=level)
            cand = self._clip(np.round(pred) + coarse)
            best = cand[int(np.argmin(self._errors_at(j, cand, smoothed(be, obj_j, 1.0), scratch)))]
            cand = self._clip(best + fine)
            e = self._errors_at(j, cand, obj_j, scratch)
            i = int(np.argmin(e))
            found[j], e_found[j] = cand[i], e[i]
        rec.reducer.allreduce_sum([found, e_found])
        moved = np.isin(np.arange(N), flagged) & (e_found > 0) & (e_found < 0.7 * np.minimum(e_cur, e_back))
        cur = cur.copy()
        cur[moved], e_cur[moved] = found[moved], e_found[moved]
        self.rescued_at_end = int(moved.sum())
        if len(flagged):
            rec.log(f"hxn-ptycho: guard: {len(flagged)} views fit their refined corners badly without their own "
                    f"exit waves; {self.rescued_at_end} found again")
        return e_cur, e_back, cur

    # --- one refinement ------------------------------------------------------------------------
    def refine(self) -> float:
        """Move every view; returns the RMS move (pixels) over all views."""
        rec = self.rec
        geom = rec.geom
        self._new = geom.local.copy()
        self._err = np.zeros(len(geom))
        if self.method == "gradient":
            xp = rec.be.xp
            sigma = self.sigma0 * self.decay ** self.count
            self._dobj = rec.be.object_gradient(smoothed(rec.be, rec.obj, sigma))
            self._pint = (xp.square(rec.probe.real) + xp.square(rec.probe.imag)).sum(axis=0)
            self._pconj = xp.conj(rec.probe)
            rec._each(self._gradient_batch)
        else:
            self._s = max(0.02, self.step * 0.93 ** self.count)
            rec._each(self._search_batch)
        full = np.zeros_like(geom.positions_all)
        full[geom.start:geom.stop] = self._new
        errs = np.zeros(len(full))
        errs[geom.start:geom.stop] = self._err
        rec.reducer.allreduce_sum([full, errs])
        if self.method == "gradient" and self.count % self.rescue_every == self.rescue_every - 1:
            full = self._rescue(full, errs)
        new = constrain(geom.nominal_all, geom.positions_all, full, self.max_shift, self.affine,
                        self.hold_scale, self.robust_scale)
        hr, hc = geom.limits
        new[:, 0] = np.clip(new[:, 0], 0.0, hr)
        new[:, 1] = np.clip(new[:, 1], 0.0, hc)
        move = float(np.sqrt(np.mean(np.sum((new - geom.positions_all) ** 2, axis=1))))
        geom.set_positions(new)
        self.count += 1
        self.moves.append(move)
        return move

    def _gradient_batch(self, w: Any, b: slice) -> None:
        rec, be = self.rec, self.rec.be
        B = b.stop - b.start
        gr, gc, resid, q = (x[:B] for x in self._buffers(w))
        # the model at the estimate itself (bilinear when sub-pixel), whatever windows the engine uses
        pos = rec.geom.local[b]
        win = rec.geom.gather_at(be, rec.obj, pos, w.objwin[:B], w.tmp[:B])
        phi = dm.exit_waves(be, rec.probe, win, w.phi[:B])
        resid[...] = phi
        be.fft2(resid)
        self._err[b] = be.view_errors(resid, rec.diffamp[b], rec.mask)
        dm.fourier_projection(be, resid, rec.diffamp[b], rec.mask, 0.0)          # (4), exact
        be.ifft2(resid)
        resid -= phi                                                             # R = Π_F(Φ) − Φ
        q = dm.object_numerator(be, resid, self._pconj, q)                       # Σ_k P_k* R_k
        rec.geom.gather_at(be, self._dobj[0], pos, gr, w.tmp[:B])
        rec.geom.gather_at(be, self._dobj[1], pos, gc, w.tmp[:B])
        a_rr, a_cc, a_rc, b_r, b_c = be.normal_equations(gr, gc, q, self._pint)
        lam = 1e-3 * (a_rr + a_cc) + 1e-30
        a_rr, a_cc = a_rr + lam, a_cc + lam
        det = a_rr * a_cc - a_rc * a_rc
        d_r = (a_cc * b_r - a_rc * b_c) / det
        d_c = (a_rr * b_c - a_rc * b_r) / det
        d = np.stack([d_r, d_c], axis=1)
        norm = np.hypot(d[:, 0], d[:, 1])
        d *= np.minimum(1.0, self.step / np.maximum(norm, 1e-12))[:, None]
        self._new[b] = pos + np.where(np.isfinite(d), d, 0.0)

    def _scratch(self) -> tuple:
        rec, be = self.rec, self.rec.be
        L, K, n = rec.obj_shape[0], rec.probe.shape[0], rec.n
        chunk = max(1, rec.plan.batch_size)
        return (be.empty((chunk, L, n, n), rec.cdtype), be.empty((chunk, L, n, n), rec.cdtype),
                be.empty((chunk, L, K, n, n), rec.cdtype))

    def _errors_at(self, j: int, cand: np.ndarray, obj: Any, scratch: tuple) -> np.ndarray:
        """Data error Σ(|F(P·O(r + c))| − √I_j)² of view ``j`` (global index, held here) at each corner ``c``."""
        rec, be, geom = self.rec, self.rec.be, self.rec.geom
        win, tmp, waves = scratch
        chunk = win.shape[0]
        amp = rec.diffamp[j - geom.start]
        e = np.empty(len(cand))
        for i in range(0, len(cand), chunk):
            c = cand[i:i + chunk]
            m = len(c)
            ow = geom.gather_at(be, obj, c, win[:m], tmp[:m])
            f = be.fft2(dm.exit_waves(be, rec.probe, ow, waves[:m]))
            e[i:i + m] = be.view_errors(f, amp[None], rec.mask)
        return e

    def _clip(self, cand: np.ndarray) -> np.ndarray:
        hr, hc = self.rec.geom.limits
        return np.stack([np.clip(cand[:, 0], 0, hr), np.clip(cand[:, 1], 0, hc)], axis=1)

    def _rescue(self, full: np.ndarray, errs: np.ndarray) -> np.ndarray:
        """Views caught in a wrong local minimum (data error far above the median, as a gradient step
        cannot leave them): a bounded grid search over ``position_max_shift`` around them."""
        rec = self.rec
        geom = rec.geom
        med = float(np.median(errs))
        flagged = np.nonzero(errs > self.outlier * max(med, 1e-300))[0]
        mine = [int(j) for j in flagged if geom.start <= j < geom.stop]
        out = np.zeros_like(full)
        mask_rows = np.zeros(len(full))
        grid = disc_grid(self.max_shift, 1.0)
        scratch = self._scratch()
        for j in mine:
            cand = self._clip(full[j] + grid)
            e = self._errors_at(j, cand, rec.obj, scratch)
            best = int(np.argmin(e))
            if e[best] < 0.7 * errs[j]:
                out[j] = cand[best]
                mask_rows[j] = 1.0
        rec.reducer.allreduce_sum([out, mask_rows])
        moved = mask_rows > 0
        self.rescued += int(moved.sum())
        full = full.copy()
        full[moved] = out[moved]
        return full

    def _search_batch(self, w: Any, b: slice) -> None:
        rec, be = self.rec, self.rec.be
        B = b.stop - b.start
        s = self._s
        pos0 = rec.geom.local[b]
        hr, hc = rec.geom.limits

        def error_at(pos: np.ndarray) -> np.ndarray:
            pos = np.stack([np.clip(pos[:, 0], 0, hr), np.clip(pos[:, 1], 0, hc)], axis=1)
            win = rec.geom.gather_at(be, rec.obj, pos, w.objwin[:B], w.tmp[:B])
            f = be.fft2(dm.exit_waves(be, rec.probe, win, w.phi[:B]))
            return be.view_errors(f, rec.diffamp[b], rec.mask)
        e0 = error_at(pos0)
        best = pos0.copy()
        for axis in (0, 1):
            cand_err = [e0]
            cands = [0.0]
            for sign in (1.0, -1.0):
                pos = pos0.copy()
                pos[:, axis] += sign * s
                cand_err.append(error_at(pos))
                cands.append(sign * s)
            pick = np.argmin(np.stack(cand_err), axis=0)
            best[:, axis] += np.asarray(cands)[pick]
        self._new[b] = best
