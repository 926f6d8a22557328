"""The probe-mode manager: orthogonalisation, adding and dropping modes, and ``probe_modes="auto"``.

A :class:`ProbeModeManager` belongs to one :class:`~hxn_ptycho.engine.Reconstruction` and works
on its parts (probe, exit-wave store, batch scheduler); the DM and ML iteration objects never
change the number of modes themselves. It owns the record of its decisions (``log``, kept in the
result as ``probe_modes_log``) and the state of the automatic mode count.

The automatic rules (``auto_rule``):

- ``trend`` (default): start from one mode; every ``auto_interval`` iterations add one, *strong*
  (the k-th mode with ``auto_new_mode_power`` / (k − 1) of the first mode's power), orthogonal to
  the others. Under DM the share of the intensity a mode carries moves toward what the data ask of
  it: a mode the data support keeps or gains its share, one they do not support (it fits noise,
  or duplicates others) loses it. So after one interval of transient, the newest mode is kept
  only if its power fraction changed by at least ``auto_min_trend`` (default −1 %) over the next
  interval and it carries ``auto_threshold`` of the power; otherwise it is dropped and the count
  is settled. A strong start matters: a weak new mode grows so slowly under DM that a true mode
  cannot be told from a spurious one within a run.
- ``power``: the paper's rule, add a mode while the newest carries ≥ ``auto_threshold``.
- ``prune``: ``power``, then keep the fewest modes beyond which one more lowers the (fitted)
  data error by less than ``auto_prune_gain``.
- ``gain``: keep a new mode when the data error falls faster after it than before.
- ``heldout``: not this manager's: the count is found before the reconstruction, from pixels no fit
  sees (:mod:`hxn_ptycho.mode_count`), and the reconstruction runs with that fixed count.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from . import modes
from .mode_count import wants_count
from .params import ParamError

if TYPE_CHECKING:
    from .engine import Reconstruction

_TRANSIENT = 1      # intervals after a mode is added before its power trend counts


class ProbeModeManager:
    """The probe modes of one reconstruction: their basis, their number, and the auto decisions."""

    def __init__(self, rec: Reconstruction) -> None:
        self._rec = weakref.ref(rec)     # the reconstruction owns its manager: no reference cycle keeps it alive
        p = rec.params
        self.log: list[str] = []
        self.auto = p.probe_modes == "auto"
        if wants_count(p):
            raise ParamError("auto_rule='heldout' counts the probe modes of the whole scan before the "
                             "reconstruction (engine.reconstruct, the job): a reconstruction fed views as they "
                             "arrive (a live session) cannot; give probe_modes a number or use auto_rule='trend'")
        self.rule = p.auto_rule
        self.settled = not self.auto
        self.err_trace: list[float] = []          # data error of each iteration (the 'gain' rule)
        self._prune_at: int | None = None          # iteration of the 'prune' decision
        self._added_at: int | None = None          # iteration at which the newest mode was added
        self._fr: list[float] = []                  # newest mode's power fraction at each decision ('trend')
        self._added_check: int | None = None        # the decision that added the newest mode ('trend')
        self.evidence: list[dict[str, Any]] = []    # each auto decision: shares, trend, action (see record)
        if self.auto and self._cache_batches(rec.probe.shape[0]):
            for w in rec.scheduler.workers:
                w.alloc(rec.plan.batch_size, rec.obj_shape[0], rec.probe.shape[0], rec.n, rec.obj_shape,
                        rec.cdtype, rec.rdtype)

    @property
    def rec(self) -> Reconstruction:
        rec = self._rec()
        if rec is None:
            raise RuntimeError("the reconstruction of this probe-mode manager is gone")
        return rec

    @staticmethod
    def initial_count(params: Any) -> int:
        """Probe modes at the start: 1 for the rules that grow from one mode."""
        if params.probe_modes == "auto" and params.auto_rule in ("gain", "trend"):
            return 1
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
            for name in rec.store.NAMES:
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
        if not np.array_equal(u, np.eye(len(u))):      # one mode: U = 1, the exit waves stay as they are
            self.mix(u)

    def resize(self, K: int, new_modes: np.ndarray | None = None) -> None:
        """Keep the first ``min(K, current)`` modes, append ``new_modes``; new exit waves are P·O."""
        rec = self.rec
        be = rec.be
        L, n = rec.obj_shape[0], rec.n
        k_old = rec.store.shape[2]
        keep = min(K, k_old)
        rec.store.resize_modes(K)
        self._cache_batches(K)
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
                arr = rec.store.load(w, "psi", b)
                arr[:, :, k_old:] = ow[:, :, None] * rec.probe[None, None, k_old:]
                rec.store.store(w, "psi", b, arr)
            rec.scheduler.each(init_new)

    def _cache_batches(self, K: int) -> bool:
        """CPU: batches as large as fit the cache with K modes (the plan sized them for the ceiling,
        auto_max_modes, which the GPU keeps: its memory is planned for the largest count). True when
        the batch size changed (the caller reallocates the workers' buffers)."""
        rec = self.rec
        if not rec.be.cache_batches or rec.params.batch_size:
            return False
        from .engine import cache_batch
        batch = cache_batch(rec.obj_shape[0] * K * rec.n * rec.n * np.dtype(rec.cdtype).itemsize, len(rec.geom))
        if batch == rec.plan.batch_size:
            return False
        rec.plan.batch_size = batch
        rec.scheduler.rebatch(len(rec.geom), batch)
        return True

    def _add_mode(self, it: int, probe: np.ndarray) -> None:
        p, K = self.rec.params, probe.shape[0]
        new = modes.diverse_modes(probe[0], K, p.extra_mode_power, np.random.default_rng(p.seed + it))[-1]
        self.resize(K + 1, new[None])
        self._added_at = len(self.err_trace) - 1

    def _new_modes(self, probe: np.ndarray, count: int, it: int) -> np.ndarray:
        """``count`` further modes: the next derivative shapes of the first mode, orthogonal to all
        modes, the j-th with ``auto_new_mode_power / (K + j)`` of the first mode's power."""
        K = probe.shape[0]
        p = self.rec.params
        cand = modes.diverse_modes(probe[0], K - 1 + count, 1.0, np.random.default_rng(p.seed + it))[K - 1:]
        base = [m.astype(np.complex128) for m in probe]
        p0 = float(np.vdot(probe[0], probe[0]).real)
        out = []
        for j, c in enumerate(cand.astype(np.complex128)):
            for b in base:
                c = c - np.vdot(b, c) / np.vdot(b, b) * b
            c *= np.sqrt(p0 * p.auto_new_mode_power / (K + j) / max(float(np.vdot(c, c).real), 1e-300))
            base.append(c)
            out.append(c)
        return np.asarray(out, probe.dtype)

    # --- error of the models with the k strongest modes -------------------------------------------
    def prefix_errors(self) -> np.ndarray:
        """Data error Σ(|Ψ| − √I)² of the model with only its k strongest probe modes, k = 1..K.

        The modes left out hand their power to the kept ones (scaled by √(1/Σ kept fractions)), so
        each error answers: what would k modes explain of these data? One pass, one FFT per mode.
        (Not a refit: the kept modes were fitted beside the others, so these errors favour more modes.)
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
            amp = rec.frames(w, b)
            for k in range(K):
                inten += (xp.square(f[:, :, k].real) + xp.square(f[:, :, k].imag)).sum(axis=1)
                diff = xp.sqrt(inten * scale[k]) - amp
                if rec.mask is not None:
                    diff *= rec.mask
                out[b, k] = be.asnumpy(xp.sum(xp.square(diff), axis=(1, 2), dtype=xp.float64))
        rec.scheduler.each(batch)
        total = out.sum(axis=0)
        rec.reducer.allreduce_sum([total])
        return total / max(rec.total_intensity, 1e-300)

    # --- the decisions -----------------------------------------------------------------------------
    def note(self, line: str) -> None:
        """Record (in the result) and report (on rank 0) a decision about the probe modes."""
        self.log.append(line)
        if self.rec.reducer.rank == 0:
            self.rec.log(f"hxn-ptycho: probe modes: {line}")
        if self.evidence:
            self.evidence[-1].setdefault("actions", []).append(line.rsplit(": ", 1)[-1])

    def record(self) -> dict[str, Any] | None:
        """The evidence of ``probe_modes="auto"`` for the result and the derived run (None when the
        count was fixed): the rule, the count found, and per decision the iteration, the data error,
        each mode's power share, the newest mode's share change over the last interval ('trend')
        and the actions taken."""
        if not self.auto:
            return None
        return {"rule": self.rule, "found": int(self.rec.probe.shape[0]), "decisions": list(self.evidence)}

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
            elif p.orthogonalize_every and (it + 1) % p.orthogonalize_every == 0:
                self.orthogonalize()

    def finish(self, it: int, interrupted: bool) -> None:
        """At the end of the run: the last decision (unless interrupted), orthogonal modes."""
        if interrupted:
            self.settled = True
            self.orthogonalize()
        else:
            self.settle(it)

    def settle(self, it: int) -> None:
        """Decide now (before ML starts, or at the end of the run) and orthogonalise."""
        if not self.settled:
            self.step(it, final=True)
            self.settled = True
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
        self.evidence.append({"iteration": int(it), "modes": int(K), "shares": [round(float(f), 5) for f in frac],
                              "data_error": float(self.err_trace[-1]) if self.err_trace else None})
        if self.rule == "trend":
            return self._trend_step(it, probe, frac, K, share, final)
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

    def _trend_step(self, it: int, probe: np.ndarray, frac: np.ndarray, K: int, share: str,
                    final: bool) -> bool:
        """Keep the newest mode (added strong) only if its power fraction holds: it changed by at least
        ``auto_min_trend`` over the last interval, after ``_TRANSIENT`` intervals, and it carries at
        least ``auto_threshold``. Else drop it: the count is settled."""
        p = self.rec.params
        self._fr.append(float(frac[-1]))
        c, t = len(self._fr) - 1, self._added_check
        if t is not None:
            if c - t <= _TRANSIENT and not final:
                self.note(f"{share}: waiting")
                return False
            trend = self._fr[c] / max(self._fr[c - 1], 1e-300) - 1 if c > t else -np.inf
            test = f"its share changed by {100 * trend:+.1f} % in the last interval" if c > t else \
                "it came at the last decision, untested"
            if c > t:
                self.evidence[-1]["trend"] = round(float(trend), 5)
            if trend < p.auto_min_trend or frac[-1] < p.auto_threshold:
                self.resize(K - 1)
                self.note(f"{share}, {test}: keeping {K - 1} mode(s)")
                return True
            self.note(f"{share}, {test}: keeping it")
        if K >= p.auto_max_modes or final:
            self.note(f"{share}: keeping {K} mode(s)" + (" (no iterations left)" if final else
                                                        ", the ceiling (auto_max_modes)"))
            return True
        self.resize(K + 1, self._new_modes(probe, 1, it))
        self._added_check = c
        self.note(f"{share}: adding mode {K + 1}")
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
