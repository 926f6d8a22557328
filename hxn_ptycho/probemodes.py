"""The probe-mode manager: orthogonalisation, adding and dropping modes, and ``probe_modes="auto"``.

A :class:`ProbeModeManager` belongs to one :class:`~hxn_ptycho.engine.Reconstruction` and works
on its parts (probe, exit-wave store, batch scheduler); the DM and ML iteration objects never
change the number of modes themselves. It owns the record of its decisions (``log``, kept in the
result as ``probe_modes_log``) and the state of the automatic mode count.

The automatic rules (``auto_rule``):

- ``holdout`` (default) — cross-validation on detector pixels. A random ``auto_holdout`` share
  of the good pixels is left out of the fit (the Fourier projection keeps the model's modulus
  there, as for masked pixels) while the count is decided. Starting from one mode, a mode is
  added every ``auto_interval`` iterations; once the newest mode's power fraction has settled,
  the model with the K orthogonalised modes is compared, on the held-out pixels only, with the
  model without the newest (its power handed to the others). A mode that only fits noise does
  not predict pixels it was not fitted to, so the newest mode is kept only when it lowers the
  held-out error significantly (a paired test over frames, ``auto_significance`` standard
  errors) and carries at least ``auto_threshold`` of the power; otherwise it is dropped and the
  count is settled. The held-out pixels then rejoin the fit for the remaining iterations.
- ``power`` — the paper's rule: add a mode while the newest carries ≥ ``auto_threshold``.
- ``prune`` — ``power``, then keep the fewest modes beyond which one more lowers the (fitted)
  data error by less than ``auto_prune_gain``.
- ``gain`` — keep a new mode when the data error falls faster after it than before.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import modes

if TYPE_CHECKING:
    from .engine import Reconstruction

# the newest mode's power fraction counts as settled when it changed by less than this share
# of itself over one interval (or after this many intervals)
_ENV = __import__("os").environ
_AUTO_START = int(_ENV.get("H2_START", 3))
_AUTO_MODE_POWER = float(_ENV.get("H2_POWER", 0.3))
_WARMUP = int(_ENV.get("H2_WARMUP", 3))
_GROW = int(_ENV.get("H2_GROW", 2))


class ProbeModeManager:
    """The probe modes of one reconstruction: their basis, their number, and the auto decisions."""

    def __init__(self, rec: Reconstruction) -> None:
        self.rec = rec
        p = rec.params
        self.log: list[str] = []
        self.auto = p.probe_modes == "auto"
        self.rule = p.auto_rule
        self.settled = not self.auto
        self.err_trace: list[float] = []          # data error of each iteration (the 'gain' rule)
        self._prune_at: int | None = None          # iteration of the 'prune' decision
        self._added_at: int | None = None          # iteration at which the newest mode was added
        self._checks = 0                            # decisions since the newest mode was added
        self._last_frac: float | None = None        # newest mode's power fraction at the last decision
        self._last_k: int | None = None             # modes supported at the last decision ('holdout')
        self.holdout: list[slice] | None = None     # batches of the held-out views while deciding
        self._all_batches: list[slice] = []
        self._fit_batches: list[slice] = []

    @staticmethod
    def initial_count(params: Any) -> int:
        """Probe modes at the start: 1 for the rules that grow from one mode."""
        if params.probe_modes == "auto" and params.auto_rule == "gain":
            return 1
        if params.probe_modes == "auto" and params.auto_rule == "holdout":
            return min(_AUTO_START, params.auto_max_modes)
        return int(params.initial_probe_modes)

    # --- the basis -----------------------------------------------------------------------------
    def mix(self, u: np.ndarray) -> None:
        """Apply the unitary mode change ``u`` to the exit waves (the model is unchanged).

        Elementwise (K² multiply-adds per view), not a BLAS product: it runs in the worker threads.
        """
        rec = self.rec
        be = rec.be
        coef = [[complex(c) for c in row] for row in u]
        K = len(coef)

        def mix(w: Any, b: slice) -> None:
            for name in ("psi", "fpsi"):
                arr = rec.store.load(w, name, b)
                old = arr.copy()
                for i in range(K):
                    out = arr[:, :, i]
                    be.xp.multiply(old[:, :, 0], coef[i][0], out=out)
                    for k in range(1, K):
                        out += coef[i][k] * old[:, :, k]
                rec.store.store(w, name, b, arr)
        rec.scheduler.each(mix)

    def orthogonalize(self) -> None:
        """Orthogonal probe modes sorted by power; the exit waves follow (the model is unchanged)."""
        rec = self.rec
        probe, u = modes.orthogonalize(rec.be.asnumpy(rec.probe))
        rec.probe = rec.be.asarray(probe, rec.cdtype)
        self.mix(u)

    def resize(self, K: int, new_modes: np.ndarray | None = None) -> None:
        """Keep the first ``min(K, current)`` modes, append ``new_modes``; new exit waves are P·O."""
        rec = self.rec
        be = rec.be
        L, n = rec.obj_shape[0], rec.n
        k_old = rec.store.shape[2]
        keep = min(K, k_old)
        rec.store.resize_modes(K)
        probe = be.asnumpy(rec.probe)[:keep]
        if new_modes is not None:
            probe = np.concatenate([probe, new_modes])
        rec.probe = be.asarray(probe, rec.cdtype)
        for w in rec.scheduler.workers:
            w.alloc(rec.plan.batch_size, L, K, n, rec.obj_shape, rec.cdtype, rec.rdtype)
        if K > k_old:
            def init_new(w: Any, b: slice) -> None:
                B = b.stop - b.start
                ow = rec.geom.gather(be, rec.obj, b, w.objwin[:B], w.tmp[:B])
                for name in ("psi", "fpsi"):
                    arr = rec.store.load(w, name, b)
                    arr[:, :, k_old:] = ow[:, :, None] * rec.probe[None, None, k_old:]
                    if name == "fpsi":
                        arr[:, :, k_old:] = be.fft2(arr[:, :, k_old:].copy())
                    rec.store.store(w, name, b, arr)
            rec.scheduler.each(init_new)

    def _add_mode(self, it: int, probe: np.ndarray) -> None:
        p, K = self.rec.params, probe.shape[0]
        new = modes.diverse_modes(probe[0], K, p.extra_mode_power, np.random.default_rng(p.seed + it))[-1]
        self.resize(K + 1, new[None])
        self._added_at = len(self.err_trace) - 1
        self._checks, self._last_frac = 0, None

    @staticmethod
    def extra_power(params: Any) -> float:
        """Power of the extra initial modes (relative to the first, the k-th extra divided by k)."""
        if params.probe_modes == "auto" and params.auto_rule == "holdout":
            return max(params.extra_mode_power, _AUTO_MODE_POWER)
        return float(params.extra_mode_power)

    def _new_modes(self, probe: np.ndarray, count: int, it: int) -> np.ndarray:
        """``count`` further modes: the next derivative shapes of the first mode, orthogonal to all
        modes, the j-th with ``extra_power / (K + j)`` of the first mode's power."""
        K = probe.shape[0]
        p = self.rec.params
        cand = modes.diverse_modes(probe[0], K - 1 + count, 1.0, np.random.default_rng(p.seed + it))[K - 1:]
        base = [m.astype(np.complex128) for m in probe]
        p0 = float(np.vdot(probe[0], probe[0]).real)
        out = []
        for j, c in enumerate(cand.astype(np.complex128)):
            for b in base:
                c = c - np.vdot(b, c) / np.vdot(b, b) * b
            c *= np.sqrt(p0 * self.extra_power(p) / (K + j) / max(float(np.vdot(c, c).real), 1e-300))
            base.append(c)
            out.append(c)
        return np.asarray(out, probe.dtype)

    # --- error of the models with the k strongest modes -------------------------------------------
    def prefix_errors(self, batches: list[slice] | None = None, per_view: bool = False) -> np.ndarray:
        """Data error Σ(|Ψ| − √I)² of the model with only its k strongest probe modes, k = 1..K.

        The modes left out hand their power to the kept ones (scaled by √(1/Σ kept fractions)), so
        each error answers: what would k modes explain of these data? One pass, one FFT per mode.
        ``batches`` picks the views (default: those fitted). Returns the sums / ΣI over all ranks,
        ``(K,)``; or, with ``per_view``, the sums of each of this process's views, ``(views, K)``
        (zero for views not in ``batches``), not divided.
        """
        rec = self.rec
        probe = rec.be.asnumpy(rec.probe)
        K = probe.shape[0]
        scale = 1.0 / np.cumsum(modes.power_fractions(probe))
        out = np.zeros((len(rec.geom), K))

        def batch(w: Any, b: slice) -> None:
            be, B = rec.be, b.stop - b.start
            xp = be.xp
            f = be.fft2(rec.geom.exit_waves(be, rec.obj, b, rec.probe, w.objwin[:B], w.phi[:B], w.tmp[:B]))
            inten = xp.zeros((B,) + f.shape[-2:], f.real.dtype)
            for k in range(K):
                inten += (xp.square(f[:, :, k].real) + xp.square(f[:, :, k].imag)).sum(axis=1)
                diff = xp.sqrt(inten * scale[k]) - rec.diffamp[b]
                if rec.mask is not None:
                    diff *= rec.mask
                out[b, k] = be.asnumpy(xp.sum(xp.square(diff), axis=(1, 2), dtype=xp.float64))
        fitted = rec.scheduler.batches
        if batches is not None:
            rec.scheduler.batches = batches
        try:
            rec.scheduler.each(batch)
        finally:
            rec.scheduler.batches = fitted
        if per_view:
            return out
        total = out.sum(axis=0)
        rec.reducer.allreduce_sum([total])
        return total / max(rec.total_intensity, 1e-300)

    # --- held-out views (the 'holdout' rule) ------------------------------------------------------
    def _hold_out_views(self) -> None:
        """Leave a random ``auto_holdout`` share of this process's views out of the fit: the batches
        the iterations visit are the runs of the other views (at most the plan's batch size)."""
        rec, p = self.rec, self.rec.params
        n_views = len(rec.geom)
        held = np.zeros(n_views, bool)
        count = int(round(p.auto_holdout * n_views))
        if count < 2 or n_views - count < 2:
            return
        held[np.random.default_rng(p.seed + 7 + rec.reducer.rank).choice(n_views, count, replace=False)] = True
        size = rec.plan.batch_size
        self._all_batches = rec.scheduler.batches
        self._fit_batches = _runs(~held, size)
        self.holdout = _runs(held, size)
        rec.scheduler.batches = self._fit_batches

    def _release_views(self) -> None:
        """The held-out views rejoin the fit (the count is settled); their exit waves start from P·O."""
        if self.holdout is None:
            return
        rec = self.rec
        rec.scheduler.batches = self.holdout
        rec.scheduler.each(rec._init_psi)
        rec.scheduler.batches = self._all_batches
        self.holdout = None

    def holdout_z(self) -> np.ndarray:
        """For k = 1..K−1: how much the model with k+1 modes lowers the held-out error against the
        one with k, in standard errors (the mean drop over views / its standard error, all ranks)."""
        e = self.prefix_errors(batches=self.holdout, per_view=True)
        e = e[np.concatenate([np.arange(b.start, b.stop) for b in self.holdout])]
        d = e[:, :-1] - e[:, 1:]
        sums = np.concatenate([d.sum(axis=0), np.square(d).sum(axis=0), [float(len(d))]])
        self.rec.reducer.allreduce_sum([sums])
        k = d.shape[1]
        s, s2, m = sums[:k], sums[k:2 * k], max(sums[-1], 1.0)
        var = np.maximum(s2 / m - (s / m) ** 2, 1e-300)
        return (s / m) / np.sqrt(var / m)

    # --- the decisions -----------------------------------------------------------------------------
    def note(self, line: str) -> None:
        """Record (in the result) and report (on rank 0) a decision about the probe modes."""
        self.log.append(line)
        if self.rec.reducer.rank == 0:
            self.rec.log(f"hxn-ptycho: probe modes: {line}")

    def start(self) -> None:
        """Before the first iteration: hold views out of the fit ('holdout' rule)."""
        if self.auto and self.rule == "holdout" and not self.settled:
            self._hold_out_views()

    def after_iteration(self, it: int, err: float, dm: bool, last: bool) -> None:
        """After DM/ML iteration ``it`` (data error ``err``): the auto decisions and orthogonalisation."""
        p = self.rec.params
        self.err_trace.append(err)
        if last:
            return
        if self._prune_at is not None and it >= self._prune_at:
            self._prune(it)
            self._prune_at = None
        if dm:
            if not self.settled and (it + 1) % p.auto_interval == 0:
                self.settled = self.step(it)
                if self.settled:
                    self._release_views()
            elif p.orthogonalize_every and (it + 1) % p.orthogonalize_every == 0:
                self.orthogonalize()

    def finish(self, it: int, interrupted: bool) -> None:
        """At the end of the run: the last decision (unless interrupted), orthogonal modes."""
        if interrupted:
            self.settled = True
            self._release_views()
            self.orthogonalize()
        else:
            self.settle(it)

    def settle(self, it: int) -> None:
        """Decide now (before ML starts, or at the end of the run) and orthogonalise."""
        if not self.settled:
            self.step(it, final=True)
            self.settled = True
        self._release_views()
        if self._prune_at is not None:
            self._prune(it)
            self._prune_at = None
        self.orthogonalize()

    def step(self, it: int, final: bool = False) -> bool:
        """One decision of ``probe_modes="auto"`` after iteration ``it``; True once the count is settled."""
        p = self.rec.params
        self.orthogonalize()
        probe = self.rec.be.asnumpy(self.rec.probe)
        frac, K = modes.power_fractions(probe), probe.shape[0]
        share = f"iteration {it}: the newest of {K} modes carries {100 * frac[-1]:.2f} %"
        if self.rule == "holdout":
            return self._holdout_step(it, probe, frac, K, share, final)
        if self.rule == "gain":
            return self._gain_step(it, probe, frac, K, share, final)
        if frac[-1] >= p.auto_threshold and K < p.auto_max_modes and not final:
            self._add_mode(it, probe)
            self.note(f"{share} >= {100 * p.auto_threshold:g} %: adding mode {K + 1}")
            return False
        if frac[-1] < p.auto_threshold and K > 1:
            self.resize(K - 1)
            self.note(f"{share} < {100 * p.auto_threshold:g} %: keeping {K - 1} mode(s)")
        else:
            self.note(f"{share}: keeping {K} mode(s)" + (", the ceiling (auto_max_modes)" if K >= p.auto_max_modes
                                                           else " (no iterations left)"))
        if self.rule == "prune":       # once the last modes have converged a little
            self._prune_at = it + p.auto_prune_after
        return True

    def _holdout_step(self, it: int, probe: np.ndarray, frac: np.ndarray, K: int, share: str,
                      final: bool) -> bool:
        """Cross-validated count: the leading modes that each predict the held-out pixels better.

        Mode k+1 is supported when the model with k+1 modes has a lower held-out error than the one
        with k, by ``auto_significance`` standard errors, and it carries ``auto_threshold`` of the
        power. The count is the number of leading supported modes, decided once it is the same at
        two decisions, ``_WARMUP`` intervals after the last change; if every mode is supported, two
        more are added and the test repeats.
        """
        p = self.rec.params
        self._checks += 1
        if K > 1:
            z = self.holdout_z()
            ok = (z >= p.auto_significance) & (frac[1:] >= p.auto_threshold)
            k = int(np.argmin(ok)) + 1 if not ok.all() else K
            test = "held-out error drop of each further mode, in standard errors: " + \
                   ", ".join(f"{v:.1f}" for v in z)
        else:
            k, test = 1, "one mode"
        line = f"iteration {it}: {K} modes, power {', '.join(f'{100 * f:.1f}' for f in frac)} %; {test}"
        if final and self._checks <= 2:            # too early to judge: keep what there is
            self.note(f"{line}: keeping {K} mode(s) (no iterations left to decide)")
            return True
        steady = self._checks > _WARMUP and k == self._last_k
        self._last_k = k
        if not (steady or final):
            self.note(f"{line}: {k} supported, waiting")
            return False
        if k < K:
            self.resize(k)
            self.note(f"{line}: keeping {k} mode(s)")
            return True
        if K >= p.auto_max_modes or final:
            self.note(f"{line}: keeping {K} mode(s)" + (" (no iterations left)" if final else
                                                        ", the ceiling (auto_max_modes)"))
            return True
        add = min(_GROW, p.auto_max_modes - K)
        self.resize(K + add, self._new_modes(probe, add, it))
        self._checks, self._last_k = 0, None
        self.note(f"{line}: all supported, adding mode(s) {', '.join(str(K + 1 + i) for i in range(add))}")
        return False

    def _prune(self, it: int) -> None:
        """Keep the fewest modes k such that a (k+1)-th lowers the data error by less than auto_prune_gain."""
        K = self.rec.probe.shape[0]
        if K < 2:
            return
        self.orthogonalize()
        e = self.prefix_errors()
        gains = e[:-1] / np.maximum(e[1:], 1e-300) - 1
        small = np.nonzero(gains < self.rec.params.auto_prune_gain)[0]
        k = int(small[0]) + 1 if small.size else K
        text = ", ".join(f"{100 * g:.1f} %" for g in gains)
        if k < K:
            self.resize(k)
        self.note(f"iteration {it}: each further mode lowers the data error by {text}: keeping {k} "
                  f"mode(s) (a further one must bring {100 * self.rec.params.auto_prune_gain:g} %)")

    def _gain_step(self, it: int, probe: np.ndarray, frac: np.ndarray, K: int, share: str, final: bool) -> bool:
        """Keep the newest mode only if it makes the data error fall clearly faster than before.

        With Δ = ``auto_interval``: drop_after = e(t_add) − e(t_add + Δ), drop_before =
        e(t_add − Δ) − e(t_add) over an interval without a change of modes; the mode is kept when
        drop_after ≥ ``auto_min_gain`` × drop_before and it carries ≥ ``auto_threshold`` of the power.
        """
        p, e, iv = self.rec.params, self.err_trace, self.rec.params.auto_interval
        t = self._added_at
        if t is not None and K > 1:
            before = e[t - iv] - e[t] if t - iv >= 0 else np.inf
            after = e[t] - e[len(e) - 1]
            if frac[-1] < p.auto_threshold or after < p.auto_min_gain * before:
                self.resize(K - 1)
                self.note(f"{share}; error drop {after:.3g} after it vs {before:.3g} before: "
                          f"keeping {K - 1} mode(s)")
                return True
        if K >= p.auto_max_modes or final:
            self.note(f"{share}: keeping {K} mode(s)" + (" (no iterations left)" if final else
                                                           ", the ceiling (auto_max_modes)"))
            return True
        if len(e) < 2 * iv:            # the first interval converges from the initial guess: wait one more
            self.note(f"{share}: waiting")
            return False
        self._add_mode(it, probe)
        self.note(f"{share}: adding mode {K + 1}")
        return False


def _runs(take: np.ndarray, size: int) -> list[slice]:
    """Slices of at most ``size`` over the runs of true entries of ``take``."""
    out, i, n = [], 0, len(take)
    while i < n:
        if not take[i]:
            i += 1
            continue
        j = i
        while j < n and take[j] and j - i < size:
            j += 1
        out.append(slice(i, j))
        i = j
    return out
