"""Over-complete fits of the probe's density matrix (issue 18, part 2; docs/auto_modes.md, "Session 21").

Each case is fitted with M modes (M ≥ 2 × the largest true count, so the fit has no rank-K ridge on
its way, session 20's path), from the default start, with a schedule whose probe step moves every
eigenvalue of the density matrix ρ = Σ P_k P_k† at the same rate (``--ml-cap``: ML's probe gradient of
mode k × min(cap, P_1/P_k), ``MLIteration.mode_precondition_cap``). It prints the fitted spectrum (all M
shares), c_K = Tr(Π_K ρ_true)/Tr(ρ_true) for the K strongest fitted modes and c_M for all of them, the
data error of the M-mode fit, and — the session 20 criterion — the data error of its K strongest modes
(with its object) refitted as a K-mode model for ``--cut`` ML iterations, against the fit from the
truth with the same schedule (``--truth``).

    python benchmarks/mode_over.py fly:1e6:3:0.08 gsm:1e6:3:0.03 --modes 6 --alg DM:20,ML:480 --ml-cap 10
    python benchmarks/mode_over.py fly:1e6:1:1 --modes 6 --alg DM:20,ML:480 --ml-cap 10 --set extra_mode_power=1
    python benchmarks/mode_over.py fly:1e6:3:0.08 --truth --modes 6        # the truth + M − K weak extra modes
    python benchmarks/mode_over.py fly:1e6:3:0.08 --chain --modes 6 --alg DM:20,ML:480 --ml-cap 10 \
        --set extra_mode_power=0.3 --json F                                # the count's chain of cuts
    python benchmarks/mode_over.py --summarise docs/auto_modes_s21.jsonl   # the counts of the records
    python benchmarks/mode_over.py fly:1e5:3:0.08 --chain --modes 6 --alg DM:20,ML:480 --ml-cap 10 \
        --set extra_mode_power=0.3 --set ml_noise_model="'poisson'" --json F   # Poisson fits (session 22)
    python benchmarks/mode_over.py --compare docs/auto_modes_s21.jsonl docs/auto_modes_s22_poisson.jsonl
    python benchmarks/mode_over.py fly:1e6:2:0.1 --holdout 0.15 --modes 6 --alg DM:20,ML:480 --ml-cap 10 \
        --set extra_mode_power=0.3 --json F    # session 22: every fit on 85 % of each frame's pixels,
                                               # the chain scored on the 15 % held out (FrameMaskBackend)
    python benchmarks/mode_over.py --summarise docs/auto_modes_s22.jsonl   # its counts and grid table

A case is ``family:photons:true count:weakest share`` as in benchmarks/auto_mode_cv.py (64² frames,
100 views, seed 1). ``--json F`` appends one line a case.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import mode_mixtures
import numpy as np
from auto_mode_bootstrap import per_view
from auto_mode_cv import case_scan
from mode_fit import captured, poisson_gauss_newton
from records import append_record

from hxn_ptycho import ml, mode_count, modes
from hxn_ptycho.mode_count import (FrameMaskBackend, chain_count, choose_start, holdout_split,  # noqa: F401
                                     kept_only, phase_start)
from hxn_ptycho.engine import Reconstruction
from hxn_ptycho.params import ReconParams


ML_STAGES: list[Any] = []      # every ML stage run (its checked-step counters: backtracks, reverts)


def ml_counts(first: int) -> dict[str, int]:
    """The Poisson step's rejected trials and abandoned directions of the ML stages from ``first`` on."""
    st = ML_STAGES[first:]
    return {"backtracks": sum(getattr(m, "backtracks", 0) for m in st),
            "reverts": sum(getattr(m, "reverts", 0) for m in st), "resets": sum(m.resets for m in st)}


its_of = mode_count.schedule_iterations


def set_cap(cap: float) -> None:
    init = ml.MLIteration.__init__
    if getattr(init, "_capped", False):
        init = init._orig      # type: ignore[attr-defined]

    def ml_init(self: Any, rec: Any) -> None:
        init(self, rec)
        self.mode_precondition_cap = cap
        ML_STAGES.append(self)
    ml_init._capped = True     # type: ignore[attr-defined]
    ml_init._orig = init       # type: ignore[attr-defined]
    ml.MLIteration.__init__ = ml_init       # type: ignore[method-assign]


def fit(scan: Any, M: int, alg: str, sets: dict[str, Any], obj: np.ndarray | None = None,
        probe: np.ndarray | None = None, keep: np.ndarray | None = None,
        phase: float | None = None, until: StopWhenFlat | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """An M-mode fit (from the default start, or from ``obj``/``probe``): object, orthogonal modes
    sorted by power, data error — :func:`hxn_ptycho.mode_count.fit` (``keep``: only those pixels of each
    frame are fitted; ``phase``: the default start's pupil phase scaled) with ``sets``, one thread, and ML's
    per-mode cap of ``--ml-cap`` (:func:`set_cap`). ``until``: the run stops when its error is flat
    (:class:`StopWhenFlat`, which keeps the errors it saw)."""
    p = ReconParams(iterations=its_of(alg), probe_modes=M, threads=1, algorithm=alg, **sets)
    return mode_count.fit(scan, p, keep, obj, probe, phase, attach=until.attach if until is not None else None)


@dataclass
class StopWhenFlat:
    """Stops a run once its data error fell by less than ``tol`` (relative) over the last ``window``
    iterations: one ML run, never restarted, so its conjugate directions and step lengths carry on (session
    25; session 24's blocks of ``--converge`` restarted them, and a restart can raise the error). ``errors``:
    the run's error at every iteration; ``flat``: whether it stopped so (else it ran its schedule out);
    ``snapshots``: the model (object, modes) after each iteration count in ``snapshots_at``."""
    tol: float
    window: int
    errors: list[float] = field(default_factory=list)
    flat: bool = False
    snapshots_at: tuple[int, ...] = ()
    snapshots: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def attach(self, rec: Any) -> None:
        after = rec.modes_mgr.after_iteration

        def record(it: int, err: float, dm: bool, last: bool) -> None:
            self.errors.append(float(err))
            after(it, err, dm, last)
            if len(self.errors) in self.snapshots_at:
                self.snapshots.append((np.array(rec.be.asnumpy(rec.obj)), np.array(rec.be.asnumpy(rec.probe))))
        rec.modes_mgr.after_iteration = record
        rec.stop = self

    def __call__(self) -> bool:
        e = self.errors
        self.flat = len(e) > self.window and e[-1 - self.window] - e[-1] < self.tol * e[-1 - self.window]
        return self.flat


def truth_start(mix: Any, M: int, extra: float) -> np.ndarray:
    """The true modes and M − K weak extra ones (:func:`padded`)."""
    return padded(mix.probe, M, extra)


def padded(probe: np.ndarray, M: int, extra: float) -> np.ndarray:
    """``probe``'s K modes and M − K weak extra ones (derivatives of the first, orthogonal to all K, the k-th at
    extra/k of the first's power), total power kept."""
    K = len(probe)
    if M == K:
        return probe.copy()
    ex = modes.diverse_modes(probe[0], M - K, extra, np.random.default_rng(0)).astype(np.complex128)
    t = probe.reshape(K, -1).astype(np.complex128)
    q, _ = np.linalg.qr(t.T)
    f = ex.reshape(M - K, -1)
    f = f - (f @ q.conj()) @ q.T
    p0 = float(np.vdot(t[0], t[0]).real)
    f = f / np.linalg.norm(f, axis=1, keepdims=True) * np.sqrt(p0 * extra / np.arange(1, M - K + 1))[:, None]
    pr = np.concatenate([t, f]).reshape(M, *probe.shape[1:])
    return pr * np.sqrt(float(np.sum(np.abs(t) ** 2)) / float(np.sum(np.abs(pr) ** 2)))


def view_errors(scan: Any, obj: np.ndarray, probe: np.ndarray,
                pixels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of each view j: Σ(|F(P·O_j)| − √I_j)² (unnormalised), the Poisson deviance
    2 Σ (λ − I + I log(I/λ)) of the data I under the model's intensity λ, and the Anscombe error
    Σ(√(λ + 3/8) − √(I + 3/8))² (variance ≈ 1/4 a pixel at any count; good pixels). ``pixels``
    (views, n, n): sum over those pixels of each frame only (the held-out ones)."""
    rec = Reconstruction(scan, ReconParams(iterations=1, probe_modes=len(probe), threads=1), log=lambda m: None)
    rec.obj = obj.astype(rec.cdtype)
    rec.probe = probe.astype(rec.cdtype)
    err, lam = per_view(rec)
    err = err * rec.total_intensity
    inten = np.square(np.asarray(rec.be.asnumpy(rec.diffamp), np.float64))
    lam = np.maximum(lam, 1e-9)
    dev = 2 * (lam - inten + np.where(inten > 0, inten * np.log(np.maximum(inten, 1e-300) / lam), 0.0))
    ans = np.square(np.sqrt(lam + 0.375) - np.sqrt(inten + 0.375))
    if rec.mask is not None:
        dev = dev * np.asarray(rec.be.asnumpy(rec.mask), bool)
        ans = ans * np.asarray(rec.be.asnumpy(rec.mask), bool)
    if pixels is not None:
        amp = np.square(np.sqrt(lam) - np.sqrt(inten)) * pixels
        if rec.mask is not None:
            amp = amp * np.asarray(rec.be.asnumpy(rec.mask), bool)
        err = amp.reshape(len(amp), -1).sum(axis=1)
        dev, ans = dev * pixels, ans * pixels
    rec.close()
    return err, dev.reshape(len(dev), -1).sum(axis=1), ans.reshape(len(ans), -1).sum(axis=1)


def null_gain(scan: Any, obj: np.ndarray, probe: np.ndarray, M: int, alg: str, cut: int,
              sets: dict[str, Any], seed: int) -> np.ndarray:
    """The step k → k + 1 (k = len(probe)) of the chain on null data: Poisson draws from the k-mode model
    (``obj``, ``probe``), fitted by the same M-mode schedule and cut to k and k + 1 modes; per-view gains
    of the amplitude error (what the real step's gains are compared with)."""
    from auto_mode_bootstrap import null_scan
    k = len(probe)
    null = null_scan(scan, model_intensity(scan, obj, probe)[0], seed)
    o0, p0, _ = fit(null, M, alg, sets)
    cut_sets = {key: v for key, v in sets.items() if key != "extra_mode_power"}
    e = []
    for j in (k, k + 1):
        o_j, p_j, _ = fit(null, j, f"ML:{cut}", cut_sets, o0, p0[:j])
        e.append(view_errors(null, o_j, p_j)[0])
    return np.asarray(e[0] - e[1])


REUSED = ("cut", "error_cut", "shares_cut", "c_cut", "chain", "dev_chain", "chain_shares", "ml_chain",
          "total_intensity", "view_gain", "view_dev_gain", "view_anscombe_gain", "holdout", "ho_sums",
          "ho_view_gain", "ho_view_dev_gain", "ho_view_anscombe_gain", "found_ho", "ho_z", "found_ho_dev",
          "ho_dev_z", "found_ho_sum")


def load_records(path: str, field: str = "ho_view_gain") -> dict[str, dict[str, Any]]:
    """The first record of each case in ``path`` that has ``field`` (default: a held-out chain's; none if
    the file is absent)."""
    out: dict[str, dict[str, Any]] = {}
    if path and os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                r = json.loads(line)
                if field in r:
                    out.setdefault(r["case"], r)
    return out


def run_case(case: str, M: int, alg: str, cut: int, sets: dict[str, Any], truth: bool,
             chain: bool = False, null: bool = False, holdout: float = 0.0,
             starts: list[float] | None = None, reuse: str = "", screen: str = "", span: bool = False,
             phase_from: str = "", span_refit: bool = False, converge: float = 0.0,
             forward: int = 0, fixed_object: bool = False, curve: tuple[int, ...] = (),
             oracle: int = 0, null_own: bool = False, null_draws: int = 1, span_null: int = 0,
             null_from_truth: bool = False) -> dict[str, Any]:
    scan, mix, K = case_scan(case)
    if oracle:
        kept_scan, kept = holdout_split(scan, holdout)
        rec = {"case": case, "K": K, "holdout": holdout, "sets": sets, "cap": ml_cap,
               **oracle_steps(kept_scan, scan, mix, kept, {**sets, "detector_gain": 1.0}, oracle, curve),
               "load": os.getloadavg()[0]}
        for s_ in rec["oracle_steps"]:
            print(f"  {case} from the truth, step {s_['k']} -> {s_['k'] + 1}: "
                  + ", ".join(f"N {p['iterations']}: {p['ho_a']:.1f}/{p['ho_b']:.1f} z {p['z']:.1f}" for p in s_["curve"]),
                  flush=True)
        return rec
    t0 = time.perf_counter()
    n0 = len(ML_STAGES)
    keep = None
    if holdout:
        # every fit below sees the kept pixels only; the chain is scored on the held-out ones (``scan``)
        full = scan
        scan, keep = holdout_split(full, holdout)
        sets = {**sets, "detector_gain": 1.0}     # the simulation's photon units (no estimate from the data)
    start_recs: list[dict[str, Any]] = []
    chosen = 1.0
    if truth:
        obj, pr, err = fit(scan, M, alg, sets, mix.object[None], truth_start(mix, M, sets.get("extra_mode_power", 0.1)),
                           keep=keep)
    elif starts:
        # session 23: the M-mode fit from every start; the one chosen by the held-out pixels goes on
        if keep is None or 1.0 not in starts:
            raise ValueError("starts need held-out pixels and the default start (1) among them")
        fits, ho = {}, {}
        for f in starts:
            ts = time.perf_counter()
            fits[f] = fit(scan, M, screen or alg, sets, keep=keep, phase=f)
            ho[f] = view_errors(full, fits[f][0], fits[f][1], ~keep)[0]
            start_recs.append({"factor": f, "error_M": fits[f][2], "ho_M": float(np.sum(ho[f])),
                               "shares": [round(float(s), 5) for s in modes.power_fractions(fits[f][1])],
                               "c_K": captured(fits[f][1][:K], mix.probe), "c_M": captured(fits[f][1], mix.probe),
                               "ho_view_M": [float(f"{x:.6g}") for x in ho[f]],
                               "seconds": round(time.perf_counter() - ts, 1)})
        chosen, zs = choose_start(ho)
        for s in start_recs:
            s["z_vs_default"] = round(zs[s["factor"]], 2)
        print(f"  {case} starts " + ", ".join(f"{s['factor']:g}: held-out {s['ho_M']:.1f} (z {s['z_vs_default']:.1f}, "
                                              f"c_K {s['c_K']:.3f})" for s in start_recs) + f": chosen {chosen:g}",
              flush=True)
        obj, pr, err = fits[chosen]
        old = load_records(reuse).get(case)
        if old is not None and old.get("cut", 50) != cut:
            old = None              # another refit length: nothing to reuse
        if screen and (chosen != 1.0 or old is None):
            # screened: the chosen start's fit with the full schedule, from its start (not continued)
            obj, pr, err = fit(scan, M, alg, sets, keep=keep, phase=chosen)
        elif screen:
            err = old["error_M"]       # the default start's full fit is the earlier record's (not rerun)
    elif phase_from:
        # session 24: the start the records of ``phase_from`` chose (session 23's rule, deterministic),
        # fitted with the full schedule; its error_M is checked against the record's
        prior = load_records(phase_from).get(case)
        if prior is None:
            raise ValueError(f"--phase-from {phase_from}: no held-out record of {case}")
        chosen = float(prior.get("start_chosen", 1.0))
        obj, pr, err = fit(scan, M, alg, sets, keep=keep, phase=chosen)
    else:
        obj, pr, err = fit(scan, M, alg, sets, keep=keep)
    n1 = len(ML_STAGES)
    shares = modes.power_fractions(pr)
    rec = {"case": case, "K": K, "M": M, "alg": alg, "sets": sets, "start": "truth" if truth else "default",
           "cap": ml_cap, "error_M": err, "shares": [round(float(s), 5) for s in shares],
           "c_K": captured(pr[:K], mix.probe), "c_M": captured(pr, mix.probe),
           "true_shares": [round(float(s), 4) for s in mix.shares], "ml_fit": ml_counts(n0)}
    if starts:
        rec.update(starts=start_recs, start_chosen=chosen, start=f"phase x{chosen:g}" if chosen != 1.0 else "default",
                   screen=screen)
        if screen and chosen == 1.0 and old is not None:
            rec.update({k: old[k] for k in ("shares", "c_K", "c_M") if k in old}, fit_from=os.path.basename(reuse))
        if chosen == 1.0 and old is not None and old["error_M"] == err:
            # the default start won: its fit is the earlier record's, bit for bit (error_M equal), so its
            # chain is that record's (not rerun)
            rec.update({k: old[k] for k in REUSED if k in old}, chain_from=os.path.basename(reuse))
            # the count read as the rule reads it (session 22's check records stored the deviance's there)
            found, zs = chain_count(old["ho_view_gain"])
            rec.update(found_ho=found, ho_z=[round(z, 2) for z in zs])
            chain = null = False
            cut = 0
            print(f"  {case} default start chosen: its fit equals {reuse}'s (error_M {err:.9g}); chain reused: "
                  f"found {rec['found_ho']}, true {K}", flush=True)
        elif chosen == 1.0 and old is not None:
            print(f"  {case} default start chosen but its error_M {err!r} differs from {reuse}'s {old['error_M']!r}: "
                  "chain rerun", flush=True)
            rec["reuse_mismatch"] = old["error_M"]
    if phase_from:
        rec.update(start_chosen=chosen, start=f"phase x{chosen:g}" if chosen != 1.0 else "default",
                   phase_from=os.path.basename(phase_from), error_M_prior=prior["error_M"],
                   prior_found_ho=chain_count(prior["ho_view_gain"])[0])
        print(f"  {case} start x{chosen:g} from {phase_from}: error_M {err!r} "
              f"{'equals' if err == prior['error_M'] else 'DIFFERS from'} the record's", flush=True)
    def null_fit(nl: Any) -> tuple[np.ndarray, np.ndarray]:
        """The M-mode fit of a null scan, as the real one was fitted (same schedule, start, kept pixels)."""
        if keep is None:
            raise ValueError("a null scan's M-mode fit needs held-out pixels (--holdout)")
        return fit(kept_only(nl, keep), M, alg, sets, keep=keep, phase=chosen)[:2]
    if forward:
        if keep is None:
            raise ValueError("--forward needs held-out pixels (--holdout)")
        rec.update(forward_chain(scan, full, obj, pr, keep, mix.probe, forward, sets,
                                 StopWhenFlat(converge or 1e-4, cut or 50), fixed_object, curve, null,
                                 null_fit=null_fit if null_own else None, null_draws=null_draws))
        chain = null = False      # session 25's rule alone (session 23's chain on the same fits: the s24 records)
        cut = 0
        ab = ", ".join(f"{s_['ho_a']:.1f}/{s_['ho_b']:.1f}" for s_ in rec["fwd_steps"])
        print(f"  {case} forward steps of {forward}: held-out A/B {ab}; z "
              f"{', '.join(f'{z:.1f}' for z in rec['fwd_z'])}: found {rec['found_fwd']}, true {K}", flush=True)
    if span:
        if keep is None:
            raise ValueError("--span needs held-out pixels (--holdout)")
        span_rec, span_modes = span_chain(full, obj, pr, keep, mix.probe)
        rec.update(span_rec)
        if span_null:
            rec.update(span_null_chain(scan, full, obj, span_modes, keep, mix.probe, span_null, sets, null_fit,
                                       null_from_truth))
            chain = null = False
            cut = 0
            print(f"  {case} span + refits of {span_null} against the null pipeline: z "
                  f"{', '.join(f'{z:.1f}' for z in rec['spannull_z'])}: found {rec['found_spannull']}, true {K}", flush=True)
        elif span_refit:
            rec.update(span_refit_chain(scan, full, obj, span_modes, keep, mix.probe, cut, sets, converge))
            if converge:
                chain = null = False      # session 25's rule alone (session 23's chain on the same fits: the s24 records)
                cut = 0
            print(f"  {case} span + refits of {rec['spanref_cut']}: held-out errors "
                  f"{', '.join(f'{x:.1f}' for x in rec['spanref_ho_sums'])}; z "
                  f"{', '.join(f'{z:.1f}' for z in rec['spanref_z'])}: found {rec['found_spanref']}, true {K}", flush=True)
        else:
            chain = null = False     # the span count alone (with --span-refit session 23's chain runs beside it)
            cut = 0
        print(f"  {case} span: held-out errors {', '.join(f'{x:.1f}' for x in rec['span_ho_sums'])}; z "
              f"{', '.join(f'{z:.1f}' for z in rec['span_z'])}: found {rec['found_span']}, true {K} "
              f"(inits {'/'.join(rec['span_init'])})", flush=True)
    if cut and M > K:
        cut_sets = {k: v for k, v in sets.items() if k != "extra_mode_power"}
        _, prk, errk = fit(scan, K, f"ML:{cut}", cut_sets, obj, pr[:K], keep=keep)
        rec.update(error_cut=errk, shares_cut=[round(float(s), 5) for s in modes.power_fractions(prk)],
                   c_cut=captured(prk, mix.probe))
    if chain:
        # e_k: the k strongest modes and the object refitted as a k-mode model, k = 1 .. M
        cut_sets = {k: v for k, v in sets.items() if k != "extra_mode_power"}
        errs, views, devs, anss, models = [], [], [], [], []
        held: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for k in range(1, M + 1):
            o_k, p_k, e_k = fit(scan, k, f"ML:{cut}", cut_sets, obj, pr[:k], keep=keep)
            if converge:
                o_k, p_k, e_k, done = refit_to_convergence(scan, k, cut, cut_sets, o_k, p_k, e_k, keep, converge)
                rec.setdefault("converge_blocks", []).append(done)
            models.append((o_k, p_k))
            errs.append(e_k)
            # in-sample: the kept pixels only, when some are held out
            ve, vd, va = view_errors(scan, o_k, p_k) if keep is None else view_errors(full, o_k, p_k, keep)
            views.append(ve)
            devs.append(vd)
            anss.append(va)
            if keep is not None:
                held.append(view_errors(full, o_k, p_k, ~keep))
        rec["chain"] = errs
        rec["cut"] = cut
        if converge:
            rec["converge"] = converge
        rec["dev_chain"] = [float(np.sum(d)) for d in devs]
        rec["chain_shares"] = [[round(float(x), 5) for x in modes.power_fractions(m[1])] for m in models]
        rec["ml_chain"] = ml_counts(n1)
        rec["total_intensity"] = float(np.sum(views[0]) / errs[0])
        rec["view_gain"] = [[float(x) for x in views[k] - views[k + 1]] for k in range(M - 1)]
        rec["view_dev_gain"] = [[float(x) for x in devs[k] - devs[k + 1]] for k in range(M - 1)]
        rec["view_anscombe_gain"] = [[float(x) for x in anss[k] - anss[k + 1]] for k in range(M - 1)]
        if keep is not None:
            # the held-out pixels' scores of each refit k (amplitude error, Poisson deviance, Anscombe)
            # and their per-view gains k → k + 1; the count: the deviance's chain (z > 2, chain_count)
            rec["holdout"] = holdout
            rec["ho_sums"] = {name: [float(h[i].sum()) for h in held]
                              for i, name in enumerate(("amplitude", "deviance", "anscombe"))}
            for i, name in enumerate(("ho_view_gain", "ho_view_dev_gain", "ho_view_anscombe_gain")):
                rec[name] = [[float(f"{x:.6g}") for x in held[k][i] - held[k + 1][i]] for k in range(M - 1)]
            # the rule (session 22, fixed after the check cells): the held-out amplitude error — the fits'
            # own loss — paired z > 2; the deviance's chain (the rule declared first) kept as a variant
            rec["found_ho"], zs = chain_count(rec["ho_view_gain"])
            rec["ho_z"] = [round(z, 2) for z in zs]
            rec["found_ho_dev"], zd = chain_count(rec["ho_view_dev_gain"])
            rec["ho_dev_z"] = [round(z, 2) for z in zd]
            d = rec["ho_sums"]["amplitude"]
            rec["found_ho_sum"] = next((k + 1 for k in range(M - 1) if d[k + 1] >= d[k]), M)
            print(f"  {case} held-out ({holdout:.2f}) amplitude errors {', '.join(f'{x:.1f}' for x in d)}; z "
                  f"{', '.join(f'{z:.1f}' for z in zs)}: found {rec['found_ho']} (sum rule {rec['found_ho_sum']}, "
                  f"deviance {rec['found_ho_dev']}), true {K}", flush=True)
        if null:
            # the calibrated chain: keep mode k + 1 while the real step's per-view gains exceed the null's
            # (Poisson data from the k-mode cut, the same fit and cut), Welch z > 2
            steps = []
            for k in range(1, M):
                d = views[k - 1] - views[k]
                d0 = null_gain(scan, models[k - 1][0], models[k - 1][1], M, alg, cut, sets, seed=3000 + k)
                z = welch_z(d, d0)
                steps.append({"k": k, "gain": float(d.sum()), "null_gain": float(d0.sum()), "z": z,
                              "view_null_gain": [float(f"{x:.3g}") for x in d0]})
                print(f"  {case} step {k} -> {k + 1}: gain {d.sum():.0f}, null {d0.sum():.0f}, z {z:.1f}", flush=True)
                if z <= 2:
                    break
            rec["null_steps"] = steps
            rec["found_null"] = steps[-1]["k"] if steps[-1]["z"] <= 2 else M
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    rec["load"] = os.getloadavg()[0]
    sh = "/".join(f"{100 * s:.1f}" for s in shares)
    line = (f"{case} {rec['start']} M={M} {alg} cap {ml_cap} {sets}: error_M {err:.6f}, shares {sh}, "
            f"c_K {rec['c_K']:.3f}, c_M {rec['c_M']:.3f}")
    if "error_cut" in rec:
        line += (f"; cut to K={K} + ML {cut}: {rec['error_cut']:.6f} "
                 f"{'/'.join(f'{100 * s:.1f}' for s in rec['shares_cut'])} c {rec['c_cut']:.3f}")
    print(line + f" ({rec['seconds']:.0f} s, load {rec['load']:.1f})", flush=True)
    return rec


ml_cap = 1.0


CONVERGE_CAP = 10          # blocks of --cut ML iterations at most (500 with --cut 50)


def refit_to_convergence(scan: Any, k: int, cut: int, cut_sets: dict[str, Any], obj: np.ndarray, probe: np.ndarray,
                         err: float, keep: np.ndarray | None, tol: float) -> tuple[np.ndarray, np.ndarray, float, dict[str, Any]]:
    """Session 24's diagnostic: a k-mode refit continued in blocks of ``cut`` ML iterations until its
    kept-pixel data error falls by less than ``tol`` (relative) over a block, at most
    :data:`CONVERGE_CAP` blocks in all (the first, already run, included): the chain's models compared at
    a checked common convergence rather than after a fixed schedule."""
    blocks, rel = 1, float("nan")
    while blocks < CONVERGE_CAP:
        o2, p2, e2 = fit(scan, k, f"ML:{cut}", cut_sets, obj, probe, keep=keep)
        blocks += 1
        rel = (err - e2) / err
        if e2 <= err:
            obj, probe, err = o2, p2, e2
        if rel < tol:
            break
    # converged: the last block lowered the error by less than tol; a block that raised it ended the refit
    return obj, probe, err, {"blocks": blocks, "last_rel": rel, "converged": bool(0 <= rel < tol),
                             "rose": bool(rel < 0)}


def span_refit_chain(scan: Any, full: Any, obj: np.ndarray, span_modes: list[np.ndarray], keep: np.ndarray,
                     truth: np.ndarray, cut: int, sets: dict[str, Any], converge: float = 0.0) -> dict[str, Any]:
    """Session 24's rule: each k-mode span model (``span_modes``, from :func:`span_chain`) and the M-mode fit's object
    refitted together for ``cut`` ML iterations on the kept pixels (session 23's refit, from the span's
    k-mode model instead of the k strongest fitted modes); the chain read from their held-out amplitude
    errors (z > 2). Session 25's rule, with ``converge``: each refit one ML run of up to
    :data:`CONVERGE_CAP` × ``cut`` iterations that stops when ``cut`` iterations lower its kept-pixel error by
    less than ``converge`` (:class:`StopWhenFlat`), and the chain stopped at its first step with z ≤ 2 (the
    count :func:`chain_count` reads from the whole chain is that step's k, so the models above it are not
    fitted)."""
    t0 = time.perf_counter()
    cut_sets = {k: v for k, v in sets.items() if k != "extra_mode_power"}
    held, shares, cs, blocks = [], [], [], []
    for p_k in span_modes:
        if converge:
            # one ML run of up to CONVERGE_CAP × cut iterations, stopped when a window of cut lowers it < converge
            until = StopWhenFlat(converge, cut)
            o_k, q_k, _ = fit(scan, len(p_k), f"ML:{CONVERGE_CAP * cut}", cut_sets, obj, p_k, keep=keep, until=until)
            blocks.append({"iterations": len(until.errors), "flat": until.flat, "error": until.errors[-1]})
        else:
            o_k, q_k, _ = fit(scan, len(p_k), f"ML:{cut}", cut_sets, obj, p_k, keep=keep)
        held.append(view_errors(full, o_k, q_k, ~keep)[0])
        shares.append([round(float(x), 5) for x in modes.power_fractions(q_k)])
        cs.append(captured(q_k, truth))
        if converge and len(held) > 1 and chain_count([list(held[-2] - held[-1])])[0] == 1:
            break
    gains = [held[k] - held[k + 1] for k in range(len(held) - 1)]
    found, zs = chain_count([list(g) for g in gains])
    out = {"found_spanref": found, "spanref_z": [round(z, 2) for z in zs], "spanref_cut": cut,
           "spanref_ho_sums": [float(h.sum()) for h in held], "spanref_shares": shares, "spanref_c": cs,
           "spanref_view_gain": [[float(f"{x:.6g}") for x in g] for g in gains],
           "spanref_seconds": round(time.perf_counter() - t0, 1)}
    if converge:
        out.update(spanref_converge=converge, spanref_blocks=blocks)
    return out


def span_null_chain(scan: Any, full: Any, obj: np.ndarray, span_modes: list[np.ndarray], keep: np.ndarray,
                    truth: np.ndarray, arm: int, sets: dict[str, Any],
                    null_fit: Callable[[Any], tuple[np.ndarray, np.ndarray]], from_truth: bool = False) -> dict[str, Any]:
    """Session 26's rule: each k-mode span model refitted with the M-mode fit's object for ``arm`` ML
    iterations on the kept pixels (R_k, session 24's refit); the step k → k + 1 is taken where the per-view
    kept-pixel gains of R_k + 1 over R_k beat, by Welch z > 2, those of the same pipeline run on a Poisson
    draw from R_k's model (the k-mode model the data are tested against): the null's own M-mode fit
    (``null_fit``, from the same start and schedule), its span models k and k + 1, each refitted as R is.
    So the null's models are as far from converged as the real ones, and its k + 1-th mode is read from its
    own data — session 25's null started converged (its arms from the null's truth), and session 26's
    forward chain tested a k-mode state that was not the best k-mode model (gsm 10⁶ 81/16/3's 3 % mode
    split over its 3rd and 4th modes). The chain stops at its first step not taken (the held-out z of
    each step is recorded beside it). ``from_truth``: the null's two refits start from its truth instead
    (R_k, and R_k plus :func:`spurious_mode` at 2 % of the power, as ``--oracle``), no null M-mode fit."""
    from auto_mode_bootstrap import null_scan
    t0 = time.perf_counter()
    cut_sets = {k: v for k, v in sets.items() if k != "extra_mode_power"}

    def refit(sc: Any, o: np.ndarray, p_k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        o_k, q_k, _ = fit(sc, len(p_k), f"ML:{arm}", cut_sets, o, p_k, keep=keep, until=StopWhenFlat(-np.inf, arm))
        return o_k, q_k

    models = [refit(scan, obj, span_modes[0])]
    steps: list[dict[str, Any]] = []
    found = len(span_modes)
    for k in range(1, len(span_modes)):
        models.append(refit(scan, obj, span_modes[k]))
        (o_a, p_a), (o_b, p_b) = models[k - 1], models[k]
        d = view_errors(full, o_a, p_a, keep)[0] - view_errors(full, o_b, p_b, keep)[0]
        z_ho = chain_count([list(view_errors(full, o_a, p_a, ~keep)[0] - view_errors(full, o_b, p_b, ~keep)[0])])[1][0]
        null = null_scan(full, model_intensity(full, o_a, p_a)[0], 2600 + k)
        kept = kept_only(null, keep)
        if from_truth:
            p_n = np.concatenate([p_a, spurious_mode(p_a, 0.02)[None]])
            (o_na, p_na), (o_nb, p_nb) = refit(kept, o_a, p_a), refit(kept, o_a, p_n)
        else:
            o_n, p_n = null_fit(null)
            null_span = span_chain(null, o_n, p_n, keep, truth)[1]
            (o_na, p_na), (o_nb, p_nb) = refit(kept, o_n, null_span[k - 1]), refit(kept, o_n, null_span[k])
        d0 = view_errors(null, o_na, p_na, keep)[0] - view_errors(null, o_nb, p_nb, keep)[0]
        z = welch_z(d, d0)
        steps.append({"k": k, "z": round(z, 2), "z_holdout": round(z_ho, 2), "kept_gain": float(d.sum()),
                      "null_gain": float(d0.sum()), "shares_b": [round(float(x), 5) for x in modes.power_fractions(p_b)],
                      "c_a": captured(p_a, truth), "c_b": captured(p_b, truth),
                      "null_shares_M": [round(float(x), 5) for x in modes.power_fractions(p_n)],
                      "view_kept_gain": [float(f"{x:.6g}") for x in d], "view_null_gain": [float(f"{x:.6g}") for x in d0]})
        print(f"    step {k} -> {k + 1}: kept gain {d.sum():.0f}, null {d0.sum():.0f}, z {z:.1f} "
              f"(held-out z {z_ho:.1f}), c {steps[-1]['c_b']:.3f}", flush=True)
        if z <= 2:
            found = k
            break
    return {"found_spannull": found, "spannull_z": [s["z"] for s in steps], "spannull_arm": arm,
            "spannull_from_truth": from_truth,
            "spannull_steps": steps, "spannull_seconds": round(time.perf_counter() - t0, 1)}


def next_direction(probe: np.ndarray, fitted: np.ndarray) -> np.ndarray:
    """The M-mode fit's mode least inside the span of ``probe``'s modes, less its part in that span (its
    power kept): the candidate k + 1-th mode of :func:`forward_chain`."""
    q, _ = np.linalg.qr(probe.reshape(len(probe), -1).T.astype(np.complex128))
    f = fitted.reshape(len(fitted), -1).T.astype(np.complex128)
    resid = f - q @ (q.conj().T @ f)
    j = int(np.argmax(np.sum(np.abs(resid) ** 2, axis=0)))
    return resid[:, j].reshape(fitted.shape[1:])


def model_intensity(scan: Any, obj: np.ndarray, probe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Σ_k |F(P_k · O_j)|² of every view j and the data's √I as the engine reads them (the views' given
    order): the model's intensity and the measured amplitude it is compared with."""
    r = Reconstruction(scan, ReconParams(iterations=1, probe_modes=len(probe), threads=1), log=lambda m: None)
    r.obj = obj.astype(r.cdtype)
    r.probe = probe.astype(r.cdtype)
    model = per_view(r)[1]
    amp = np.asarray(r.be.asnumpy(r.diffamp), np.float64)
    r.close()
    return model, amp


def null_arms(full: Any, keep: np.ndarray, obj: np.ndarray, probe: np.ndarray,
              extra: np.ndarray | Callable[[Any], np.ndarray], arm: int,
              sets: dict[str, Any], seed: int) -> np.ndarray:
    """A forward step's two arms on null data: a Poisson draw from the model (``obj``, ``probe``: the step's
    state), arm A its k modes, arm B those and ``extra`` (spurious there by construction; a callable: the
    mode it gives for the null scan, read from it as the real step's was from the real data), ``arm`` ML
    iterations each on the kept pixels from the state; the per-view gains A − B of the kept pixels' error."""
    from auto_mode_bootstrap import null_scan
    null = null_scan(full, model_intensity(full, obj, probe)[0], seed)
    kept = kept_only(null, keep)
    if callable(extra):
        extra = extra(null)
    e = []
    for p in (probe, np.concatenate([probe, extra[None]])):
        o_j, p_j, _ = fit(kept, len(p), f"ML:{arm}", sets, obj, p, keep=keep, until=StopWhenFlat(-np.inf, arm))
        e.append(view_errors(null, o_j, p_j, keep)[0])
    return np.asarray(e[0] - e[1])


def forward_chain(scan: Any, full: Any, obj: np.ndarray, pr: np.ndarray, keep: np.ndarray, truth: np.ndarray,
                  arm: int, sets: dict[str, Any], first: StopWhenFlat, fixed_object: bool = False,
                  curve: tuple[int, ...] = (), bootstrap: bool = False,
                  null_fit: Callable[[Any], tuple[np.ndarray, np.ndarray]] | None = None,
                  null_draws: int = 1) -> dict[str, Any]:
    """Session 25's rule: the count by forward steps, each a paired comparison of two arms from one state.
    The 1-mode state: the M-mode fit's object and strongest mode refitted until flat (``first``). A step
    k → k + 1 runs, from the k-mode state, arm A (the k modes) and arm B (the k modes and the M-mode fit's
    mode least inside their span, :func:`next_direction`) for ``arm`` ML iterations each on the kept pixels;
    the step is taken where B's held-out amplitude errors beat A's by paired z > 2 (:func:`chain_count`),
    and B is the next state; the count is k at the first step not taken. Both arms start from the same
    object and get the same iterations, so what B gains over A on held-out pixels is its extra mode's, not
    a longer or a differently started refit's (sessions 23–24: refits from the M-mode fit's object, which
    holds every fitted mode's compensation, decide the count by how far they got). ``fixed_object``: the
    arms refit the probe modes only (the state's object held: its step scaled to ~0 by a huge object
    regulariser), and a step taken refits B's modes with the object until flat for the next state (a
    variant: an extra mode cannot speed the object's convergence then). ``curve``: iteration counts at which
    both arms' held-out errors are also read (a diagnostic: each step's z against the arms' length).
    ``bootstrap``: a step is taken where its per-view gains on the **kept** pixels beat those of the same
    two arms run on a Poisson draw from the k-mode state's model (:func:`null_arms`: there the extra mode
    is spurious by construction) by Welch z > 2, not on held-out pixels (which are still read).
    ``null_fit`` (session 26, with ``bootstrap``): the null arm B's extra mode is read from the null scan as
    the real one is from the real scan — :func:`next_direction` of the M-mode fit (object, modes) that ``null_fit`` makes of
    the null scan (the same schedule and start), not of the real data's M-mode fit (session 25).
    ``null_draws``: that many Poisson draws a step (seeds 100 apart), their per-view gains pooled (the
    null's gain: their totals' mean; each draw's total is recorded)."""
    t0 = time.perf_counter()
    cut_sets = {k: v for k, v in sets.items() if k != "extra_mode_power"}
    arm_sets = {**cut_sets, "object_reg": 1e12} if fixed_object else cut_sets
    o, p, _ = fit(scan, 1, f"ML:{CONVERGE_CAP * first.window}", cut_sets, obj, pr[:1], keep=keep, until=first)
    steps: list[dict[str, Any]] = []
    gains: list[list[float]] = []
    found = len(pr)
    for k in range(1, len(pr)):
        ua, ub = (StopWhenFlat(-np.inf, arm, snapshots_at=curve) for _ in range(2))
        extra = next_direction(p, pr)
        o_a, p_a, e_a = fit(scan, k, f"ML:{arm}", arm_sets, o, p, keep=keep, until=ua)
        o_b, p_b, e_b = fit(scan, k + 1, f"ML:{arm}", arm_sets, o, np.concatenate([p, extra[None]]),
                            keep=keep, until=ub)
        h_a, h_b = view_errors(full, o_a, p_a, ~keep)[0], view_errors(full, o_b, p_b, ~keep)[0]
        gains.append([float(f"{x:.6g}") for x in h_a - h_b])
        z = chain_count([gains[-1]])[1][0]
        if bootstrap:
            d = view_errors(full, o_a, p_a, keep)[0] - view_errors(full, o_b, p_b, keep)[0]
            null_extra: np.ndarray | Callable[[Any], np.ndarray] = extra
            if null_fit is not None:
                null_extra = lambda null, p=p: next_direction(p, null_fit(null)[1])  # noqa: E731
            draws = [null_arms(full, keep, o, p, null_extra, arm, arm_sets, seed=2500 + k + 100 * i)
                     for i in range(null_draws)]
            d0 = np.concatenate(draws)
            z_ho = z
            z = welch_z(d, d0)
        steps.append({"k": k, "ho_a": float(h_a.sum()), "ho_b": float(h_b.sum()), "z": round(z, 2),
                      "error_a": e_a, "error_b": e_b, "shares_b": [round(float(x), 5) for x in modes.power_fractions(p_b)],
                      "c_a": captured(p_a, truth), "c_b": captured(p_b, truth)})
        if bootstrap:
            steps[-1].update(z_holdout=round(z_ho, 2), kept_gain=float(d.sum()), null_gain=float(d0.sum()) / null_draws,
                             null_draw_gains=[float(x.sum()) for x in draws],
                             view_kept_gain=[float(f"{x:.6g}") for x in d], view_null_gain=[float(f"{x:.6g}") for x in d0])
        if curve:
            pts = []
            for n_it, (oa, pa), (ob, pb) in zip(curve, ua.snapshots, ub.snapshots):
                ha, hb = view_errors(full, oa, pa, ~keep)[0], view_errors(full, ob, pb, ~keep)[0]
                pts.append({"iterations": n_it, "ho_a": float(ha.sum()), "ho_b": float(hb.sum()),
                            "z": round(chain_count([list(ha - hb)])[1][0], 2), "c_b": captured(pb, truth)})
            steps[-1]["curve"] = pts
        if z <= 2:
            found = k
            break
        o, p = o_b, p_b
        if fixed_object:
            until = StopWhenFlat(first.tol, first.window)
            o, p, _ = fit(scan, k + 1, f"ML:{CONVERGE_CAP * first.window}", cut_sets, o, p, keep=keep, until=until)
            steps[-1]["state_iterations"] = len(until.errors)
    return {"found_fwd": found, "fwd_z": [s["z"] for s in steps], "fwd_arm": arm, "fwd_steps": steps,
            "fwd_fixed_object": fixed_object, "fwd_bootstrap": bootstrap, "fwd_null_fit": null_fit is not None,
            "fwd_view_gain": gains, "fwd_first": {"iterations": len(first.errors), "flat": first.flat,
                                                  "tol": first.tol, "window": first.window},
            "fwd_seconds": round(time.perf_counter() - t0, 1)}


def spurious_mode(probe: np.ndarray, share: float) -> np.ndarray:
    """A mode that is not in ``probe``: the first mode's derivative along x, less its part in the modes'
    span, at ``share`` of their total power (session 25's oracle steps; session 26's null from the truth)."""
    K = len(probe)
    d = np.gradient(probe[0], axis=1)
    q, _ = np.linalg.qr(probe.reshape(K, -1).T)
    d = d.ravel() - q @ (q.conj().T @ d.ravel())
    return (d * np.sqrt(share * np.sum(np.abs(probe) ** 2) / np.sum(np.abs(d) ** 2))).reshape(probe.shape[1:])


def oracle_steps(scan: Any, full: Any, mix: Any, keep: np.ndarray, sets: dict[str, Any], arm: int,
                 curve: tuple[int, ...], spurious: float = 0.02) -> dict[str, Any]:
    """Session 25's diagnostic: the forward steps' two arms started from the truth — is the weakest true
    mode's step, and a spurious mode's, decided right by held-out pixels when the compared fits start at
    the answer? Step K − 1 → K: arm A the true object and the K − 1 strongest true modes, arm B all K;
    step K → K + 1: A all K, B those and a spurious mode (the first mode's derivative along x, orthogonal
    to the true modes, at ``spurious`` of the power). Each arm ``arm`` ML iterations on the kept pixels,
    read at ``curve``'s iteration counts too."""
    t0 = time.perf_counter()
    cut_sets = {k: v for k, v in sets.items() if k != "extra_mode_power"}
    true = mix.probe
    K = len(true)
    d = spurious_mode(true, spurious)
    pairs = ([(K - 1, true[:K - 1], true)] if K > 1 else []) + [(K, true, np.concatenate([true, d[None]]))]
    steps = []
    for k, pa, pb in pairs:
        ua, ub = (StopWhenFlat(-np.inf, arm, snapshots_at=curve + (arm,)) for _ in range(2))
        fit(scan, k, f"ML:{arm}", cut_sets, mix.object[None], pa, keep=keep, until=ua)
        fit(scan, k + 1, f"ML:{arm}", cut_sets, mix.object[None], pb, keep=keep, until=ub)
        pts = []
        for n_it, (oa, qa), (ob, qb) in zip(curve + (arm,), ua.snapshots, ub.snapshots):
            ha, hb = view_errors(full, oa, qa, ~keep)[0], view_errors(full, ob, qb, ~keep)[0]
            pts.append({"iterations": n_it, "ho_a": float(ha.sum()), "ho_b": float(hb.sum()),
                        "z": round(chain_count([list(ha - hb)])[1][0], 2), "c_b": captured(qb, true)})
        steps.append({"k": k, "curve": pts, "error_a": ua.errors[-1], "error_b": ub.errors[-1]})
    start = [view_errors(full, mix.object[None], pb, ~keep)[0].sum() for _, _, pb in pairs]
    return {"oracle_steps": steps, "oracle_arm": arm, "oracle_spurious": spurious,
            "oracle_start_ho": [float(x) for x in start], "oracle_seconds": round(time.perf_counter() - t0, 1)}


def span_chain(full: Any, obj: np.ndarray, pr: np.ndarray, keep: np.ndarray,
               truth: np.ndarray) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Session 24's count (benchmarks/mode_span.py): rank-k models fitted inside the span of the M-mode
    fit (object fixed, kept pixels), the chain read from their held-out amplitude errors (z > 2); the
    record and the models' modes in real space, k = 1 … M."""
    from mode_span import far_fields, span_models, span_probe
    t0 = time.perf_counter()
    psi, amp, mask = far_fields(full, obj, pr)
    sm = span_models(psi, amp, keep, mask)
    models = [span_probe(A, pr) for A in sm["A"]]
    gains = [sm["ho_view"][k] - sm["ho_view"][k + 1] for k in range(len(pr) - 1)]
    found, zs = chain_count([list(g) for g in gains])
    return {"found_span": found, "span_z": [round(z, 2) for z in zs],
            "span_ho_sums": [float(h.sum()) for h in sm["ho_view"]], "span_kept": sm["kept_loss"],
            "span_view_gain": [[float(f"{x:.6g}") for x in g] for g in gains],
            "span_spectra": sm["spectra"], "span_fits": sm["fits"], "span_init": sm["init"],
            "span_c": [captured(m, truth) for m in models],
            "span_seconds": round(time.perf_counter() - t0, 1)}, models


def welch_z(d: np.ndarray, d0: np.ndarray) -> float:
    """Welch's z of the mean per-view gain ``d`` over the null's ``d0`` (the nulls' decision statistic)."""
    return float((d.mean() - d0.mean()) / np.sqrt(d.var(ddof=1) / len(d) + d0.var(ddof=1) / len(d0)))


def summarise(path: str, poisson: bool = False) -> None:
    """The chain's count for every record of ``path`` that has one (docs/auto_modes_s21.jsonl): the
    amplitude fits by their amplitude gains; with ``poisson`` the Poisson fits by their deviance gains
    (docs/auto_modes_s22_poisson.jsonl)."""
    seen: dict[str, bool] = {}
    with open(path) as fh:
        lines = fh.readlines()
    for line in lines:
        r = json.loads(line)
        if "view_gain" not in r or (r.get("sets", {}).get("ml_noise_model") == "poisson") != poisson:
            continue
        found, zs = chain_count(r["view_dev_gain" if poisson else "view_gain"])
        seen.setdefault(r["case"], found == r["K"])
        print(f"{r.get('run', ''):20s} {r['case']:20s} true {r['K']} found {found} "
              f"{'ok' if found == r['K'] else 'WRONG'}  z {', '.join(f'{z:.1f}' for z in zs)}")
    grid = {c: ok for c, ok in seen.items() if not c.startswith("zernike")}
    held = {c: ok for c, ok in seen.items() if c.startswith("zernike")}
    print(f"right (distinct cells, {'Poisson fits, deviance' if poisson else 'amplitude fits'}): grid {sum(grid.values())} of {len(grid)}, "
          f"held-out {sum(held.values())} of {len(held)}")


def trace_spectrum(every: int) -> None:
    """Print the fitted spectrum, L and the data error every ``every`` ML iterations (stdout)."""
    iterate = ml.MLIteration.iterate

    def traced(self: Any, it: int) -> Any:
        out = iterate(self, it)
        if it % every == 0:
            sh = modes.power_fractions(modes.orthogonalize(np.asarray(self.rec.be.asnumpy(self.rec.probe)))[0])
            print(f"  ML iteration {it}: L {self.last_nll:.1f}, data error {out[0]:.6f}, rejected trials "
                  f"{getattr(self, 'backtracks', 0)}, spectrum {'/'.join(f'{100 * x:.1f}' for x in sh)}", flush=True)
        return out
    ml.MLIteration.iterate = traced     # type: ignore[method-assign]


def compare(amp_path: str, poisson_path: str) -> None:
    """Each cell of ``poisson_path`` (Poisson fits) against the last amplitude fit of the same cell in
    ``amp_path`` with the deviance chain: c_K, the K-cut's spectrum, the deviance gain of every step
    k → k + 1 (Σ over views) with its paired z, and the count read from the deviance (z > 2)."""
    def load(path: str, poisson: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with open(path) as fh:
            for line in fh:
                r = json.loads(line)
                if "view_dev_gain" in r and (r.get("sets", {}).get("ml_noise_model") == "poisson") == poisson:
                    out[r["case"]] = r
        return out
    amp, poi = load(amp_path, False), load(poisson_path, True)
    for case, rp in poi.items():
        for name, r in (("amplitude", amp.get(case)), ("poisson", rp)):
            if r is None:
                print(f"{case:18s} {name:9s} (no record)")
                continue
            found, zs = chain_count(r["view_dev_gain"])
            gains = [sum(g) for g in r["view_dev_gain"]]
            cut = "/".join(f"{100 * x:.1f}" for x in r.get("shares_cut", [1.0]))
            full = "/".join(f"{100 * x:.1f}" for x in r["shares"])
            print(f"{case:18s} {name:9s} c_K {r['c_K']:.3f} cut {cut:16s} M {full:28s} dev gains "
                  f"{', '.join(f'{g:.0f} ({z:.1f})' for g, z in zip(gains, zs))}  found {found} "
                  f"{'ok' if found == r['K'] else 'WRONG'}")


COLUMNS = (("1:1", "true 1: 100 %"), ("2:0.3", "true 2: 70/30 %"), ("2:0.1", "true 2: 90/10 %"),
           ("3:0.03", "true 3: 81/16/3 %"), ("3:0.08", "true 3: 68/24/8 %"))


def trend_grid(doc: str) -> dict[tuple[str, str, str], str]:
    """`trend`'s counts of the first grid table of docs/auto_modes.md: (family, photons, column) → text."""
    out: dict[tuple[str, str, str], str] = {}
    with open(doc) as fh:
        for line in fh:
            if out and not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 7 and cells[1].startswith("1e+0"):
                fam = cells[0].split(" ")[0]
                for (key, _), text in zip(COLUMNS, cells[2:]):
                    if text:
                        out[(fam, f"{float(cells[1]):.0e}".replace("+0", ""), key)] = text.replace("*", "")
    return out


def mark(found: int, K: int, notes: list[str]) -> str:
    """A grid cell's text: the count found (bold where it is the true ``K``, ✗ where not), then the
    non-empty ``notes`` in brackets."""
    txt = f"**{found}**" if found == K else f"{found} ✗"
    return txt + (f" ({', '.join(n for n in notes if n)})" if any(notes) else "")


def grid_table(cells: dict[tuple[str, str, str], Any], held: Callable[[str], bool],
               text: Callable[[str, str, str, Any], str]) -> None:
    """Print the family × photons table of ``cells`` ((family, photons, column key) → a record), one
    column per :data:`COLUMNS`, the held-out families last; ``text(family, photons, key, cell)`` gives
    a cell's text."""
    print("\n| family | photons | " + " | ".join(c for _, c in COLUMNS) + " |\n|---|---|" + "---|" * len(COLUMNS))
    for fam in sorted({f for f, _, _ in cells}, key=lambda f: (held(f), f)):
        for ph in ("1e5", "1e6", "1e8"):
            row = [text(fam, ph, key, cells[(fam, ph, key)]) if (fam, ph, key) in cells else "" for key, _ in COLUMNS]
            if any(row):
                print(f"| {fam} | {ph} | " + " | ".join(row) + " |")


def holdout_summary(path: str, s21: str, doc: str) -> None:
    """Session 22: the held-out chain's count (``found_ho``, recomputed from the per-view gains) of every
    record of ``path`` that has one, then the grid table with session 21's chain (``s21``) and `trend`."""
    recs = load_records(path)
    old: dict[str, int] = {}
    if s21 and os.path.exists(s21):
        with open(s21) as fh:
            for line in fh:
                r = json.loads(line)
                if "view_gain" in r and r.get("sets", {}).get("ml_noise_model") != "poisson":
                    old.setdefault(r["case"], chain_count(r["view_gain"])[0])
    trend = trend_grid(doc) if doc and os.path.exists(doc) else {}
    cells: dict[tuple[str, str, str], tuple[int, int, int | None]] = {}
    for case, r in recs.items():
        found, zs = chain_count(r["ho_view_gain"])
        dev = chain_count(r["ho_view_dev_gain"])[0]
        # the in-sample chain of the same fits (session 21's rule on the kept pixels; the check records
        # predate it and scored all pixels of the filled scan: not comparable, left out)
        ins = chain_count(r["view_gain"])[0] if r.get("run") != "check" else None
        fam, ph, k, weak = case.split(":")
        cells[(fam, ph, f"{k}:{weak}")] = (found, r["K"], ins)
        print(f"{r.get('run', ''):16s} {case:20s} true {r['K']} found {found} {'ok' if found == r['K'] else 'WRONG'}"
              f"  z {', '.join(f'{z:.1f}' for z in zs)}  (deviance {dev}; in-sample {ins}; s21 chain "
              f"{old.get(case, '-')}; c_K {r['c_K']:.3f}; {r['seconds']:.0f} s, load {r['load']:.1f})")
    tally: dict[str, list[int]] = {}

    def text(fam: str, ph: str, key: str, cell: tuple[int, int, int | None]) -> str:
        found, K, ins = cell
        t = tally.setdefault(f"{'held-out' if fam.startswith('kb') else 'grid'} {ph}", [0, 0, 0, 0, 0, 0])
        ok21 = old.get(f"{fam}:{ph}:{key}")
        tr = trend.get((fam, ph, key), "")
        for i, v in enumerate((found == K, 1, ok21 == K, tr.strip() == str(K), ins == K, ins is not None)):
            t[i] += v
        return mark(found, K, [f"in {ins}" if ins is not None else "", f"s21 {ok21}" if ok21 is not None else "",
                               f"trend {tr.split(' ')[0]}" if tr else ""])
    grid_table(cells, lambda f: f.startswith("kb"), text)
    for name, (ok, n, ok21, okt, okin, nin) in sorted(tally.items()):
        print(f"{name}: right {ok} of {n} (in-sample chain of the same fits {okin} of {nin}; session 21's "
              f"chain {ok21}, trend {okt} of the same cells)")


def starts_summary(path: str, s22: str) -> None:
    """Session 23: each cell's starts (screened held-out error, z against the default, c_K), the start
    chosen, the chain's count (recomputed from the per-view held-out gains: the chosen start's chain, or
    session 22's record where the default was chosen) against session 22's count, then the grid table."""
    recs = load_records(path)
    old = load_records(s22)
    cells: dict[tuple[str, str, str], tuple[int, int, float, int | None, float]] = {}
    for case, r in recs.items():
        found, zs = chain_count(r["ho_view_gain"])
        was = chain_count(old[case]["ho_view_gain"])[0] if case in old else None
        st = ", ".join(f"{s['factor']:g}: {s['ho_M']:.0f} z {s['z_vs_default']:.1f} c_K {s['c_K']:.2f}"
                       for s in r.get("starts", []))
        fam, ph, k, weak = case.split(":")
        cells[(fam, ph, f"{k}:{weak}")] = (found, r["K"], r.get("start_chosen", 1.0), was, r["c_K"])
        print(f"{r.get('run', ''):14s} {case:18s} true {r['K']} found {found} {'ok' if found == r['K'] else 'WRONG'}"
              f" (s22 {was}) chosen {r.get('start_chosen', 1.0):g} c_K {r['c_K']:.3f}  z {', '.join(f'{z:.1f}' for z in zs)}"
              f"  [{st}] {r['seconds']:.0f} s, load {r['load']:.1f}")
    tally: dict[str, list[int]] = {}
    held = {HELD_FAMILY_S22, HELD_FAMILY_S23}

    def text(fam: str, ph: str, key: str, cell: tuple[int, int, float, int | None, float]) -> str:
        found, K, chosen, was, cK = cell
        t = tally.setdefault(f"{'held-out ' + fam if fam in held else 'grid'} {ph}", [0, 0, 0, 0])
        for i, v in enumerate((found == K, 1, was == K, was is not None)):
            t[i] += v
        return mark(found, K, [f"start ×{chosen:g}, c_K {cK:.2f}" if chosen != 1.0 else "",
                               f"s22 {was}" if was is not None else ""])
    grid_table(cells, lambda f: f in held, text)
    tot = [0, 0, 0]
    for name, (ok, n, ok22, n22) in sorted(tally.items()):
        print(f"{name}: right {ok} of {n}" + (f" (session 22: {ok22} of {n22})" if n22 else ""))
        if name.startswith("grid"):
            tot = [tot[0] + ok, tot[1] + n, tot[2] + ok22]
    print(f"grid: right {tot[0]} of {tot[1]} (session 22: {tot[2]})")


def span_summary(path: str) -> None:
    """Session 24: each cell's count by the rule (``found_spanref``: the span models refitted, recomputed
    from the per-view held-out gains) against session 23's chain on the same fit (``found_ho``, the k
    strongest fitted modes refitted), the span models alone (``found_span``) and session 23's record
    (``prior_found_ho``, its own fit), then the grid table and the tallies."""
    recs = load_records(path, "spanref_view_gain")
    cells: dict[tuple[str, str, str], dict[str, Any]] = {}
    for case, r in recs.items():
        K = r["K"]
        c = {"rule": chain_count(r["spanref_view_gain"])[0], "K": K, "s23 chain": chain_count(r["ho_view_gain"])[0],
             "span alone": chain_count(r["span_view_gain"])[0], "s23 record": r.get("prior_found_ho")}
        zs = chain_count(r["spanref_view_gain"])[1]
        fam, ph, k, weak = case.split(":")
        cells[(fam, ph, f"{k}:{weak}")] = c
        print(f"{r.get('run', ''):12s} {case:17s} true {K} found {c['rule']} {'ok' if c['rule'] == K else 'WRONG':5s} "
              f"(s23 chain {c['s23 chain']}, span alone {c['span alone']}, s23 record {c['s23 record']}) "
              f"start x{r.get('start_chosen', 1.0):g} c_K {r['c_K']:.3f}, refit c_K {r['spanref_c'][K - 1]:.3f}  "
              f"z {', '.join(f'{z:.1f}' for z in zs)}  {r['seconds']:.0f} s, load {r['load']:.1f}")
    tallied_grid(cells, ("rule", "s23 chain", "span alone", "s23 record"),
                 lambda c: [f"s23 chain {c['s23 chain']}" if c["s23 chain"] != c["rule"] else ""],
                 lambda t: f"session 23's chain on the same fits {t['s23 chain']}, the span models alone "
                           f"{t['span alone']}, session 23's record {t['s23 record']}")


def tallied_grid(cells: dict[tuple[str, str, str], dict[str, Any]], names: tuple[str, ...],
                 note: Callable[[dict[str, Any]], list[str]], legend: Callable[[dict[str, int]], str]) -> None:
    """The grid table of ``cells`` (each the counts of ``names``, the first the rule's, and the true ``K``;
    ``note(cell)``: the bracket of its text) and each group's tally: how many cells each name gets right
    (``legend(tally)``: the bracket of its line); the held-out families apart, the grid's total last."""
    tally: dict[str, dict[str, int]] = {}
    held = {HELD_FAMILY_S22, HELD_FAMILY_S23, HELD_FAMILY_S24, HELD_FAMILY_S25}

    def text(fam: str, ph: str, key: str, c: dict[str, Any]) -> str:
        t = tally.setdefault(f"{'held-out ' + fam if fam in held else 'grid'} {ph}", dict.fromkeys(("n",) + names, 0))
        t["n"] += 1
        for name in names:
            t[name] += c[name] == c["K"]
        return mark(c[names[0]], c["K"], note(c))
    grid_table(cells, lambda f: f in held, text)
    tot = dict.fromkeys(("n",) + names, 0)
    for name, t in sorted(tally.items()):
        print(f"{name}: right {t[names[0]]} of {t['n']} ({legend(t)})")
        if name.startswith("grid"):
            tot = {k: tot[k] + t[k] for k in tot}
    print(f"grid: right {tot[names[0]]} of {tot['n']} ({legend(tot)})")


def converge_summary(path: str, s24: str) -> None:
    """Session 25: each cell's count by the rule (``found_spanref`` of ``--span --span-refit --converge``,
    recomputed from the per-view held-out gains) against session 24's rule and session 23's chain on the
    same fit (``s24``'s record where its error_M is equal: the same fit bit for bit) and session 23's
    record (``prior_found_ho``), then the grid table and the tallies."""
    recs, old = load_records(path, "spanref_converge"), load_records(s24, "spanref_view_gain")
    cells: dict[tuple[str, str, str], dict[str, Any]] = {}
    for case, r in recs.items():
        K, o = r["K"], old.get(case)
        same = o if o is not None and o["error_M"] == r["error_M"] else None     # the same fit, bit for bit
        c = {"rule": chain_count(r["spanref_view_gain"])[0], "K": K,
             "s24 rule": chain_count(same["spanref_view_gain"])[0] if same else None,
             "s23 chain": chain_count(same["ho_view_gain"])[0] if same else None, "s23 record": r.get("prior_found_ho")}
        zs = chain_count(r["spanref_view_gain"])[1]
        fam, ph, k, weak = case.split(":")
        cells[(fam, ph, f"{k}:{weak}")] = c
        # one run a model (its iterations; + where it ran to the cap) or, the first check, blocks of 50
        its = "/".join(f"{b['iterations']}{'' if b['flat'] else '+'}" if "iterations" in b else
                       f"{b['blocks']}x{r['spanref_cut']}{'*' if b['rose'] else ''}" for b in r["spanref_blocks"])
        print(f"{r.get('run', ''):12s} {case:17s} true {K} found {c['rule']} {'ok' if c['rule'] == K else 'WRONG':5s} "
              f"(same fit: s24 rule {c['s24 rule']}, s23 chain {c['s23 chain']}; s23 record {c['s23 record']}) "
              f"z {', '.join(f'{z:.1f}' for z in zs)}  iterations {its}  {r['seconds']:.0f} s, load {r['load']:.1f}")
    names = ("rule", "s24 rule", "s23 chain", "s23 record")
    tallied_grid(cells, names, lambda c: [f"{name} {c[name]}" for name in names[1:3]
                                          if c[name] is not None and c[name] != c["rule"]],
                 lambda t: f"on the same fits: session 24's rule {t['s24 rule']}, session 23's chain "
                           f"{t['s23 chain']}; session 23's record {t['s23 record']}")


def forward_summary(path: str) -> None:
    """Session 25's forward steps (``--forward``): every record of ``path`` (a case may be there with
    several arm lengths), its steps' held-out errors of arms A and B, their z, the count, and the share
    of the true modes' power inside each step's B (``c``)."""
    with open(path) as fh:
        recs = [json.loads(line) for line in fh if '"fwd_steps"' in line]
    for r in recs:
        found, zs = chain_count(r["fwd_view_gain"])
        steps = ", ".join(f"{s['k']}->{s['k'] + 1} {s['ho_a']:.0f}/{s['ho_b']:.0f} z {z:.1f} c {s['c_b']:.3f}"
                          for s, z in zip(r["fwd_steps"], zs))
        held = " (arms: modes only)" if r.get("fwd_fixed_object") else ""
        if r.get("fwd_bootstrap"):
            # decided by the kept pixels' gains against the null arms' (their z), not the held-out z below
            found = next((s["k"] for s in r["fwd_steps"] if s["z"] <= 2), len(r["fwd_steps"]) + 1)
            own = ", the null's own fit's mode" if r.get("fwd_null_fit") else ""
            held = f" (kept pixels against a null{own}: " + ", ".join(
                f"{s['k']}->{s['k'] + 1} gain {s['kept_gain']:.0f}, null {s['null_gain']:.0f}"
                + (" [draws " + "/".join(f"{g:.0f}" for g in s["null_draw_gains"]) + "]"
                   if len(s.get("null_draw_gains", ())) > 1 else "")
                + f", z {s['z']:.1f}, held-out z {s['z_holdout']:.1f}" for s in r["fwd_steps"]) + ")"
        print(f"{r.get('run', ''):14s} {r['case']:17s} arms of {r['fwd_arm']:5d}{held}: true {r['K']} found {found} "
              f"{'ok' if found == r['K'] else 'WRONG':5s} first state {r['fwd_first']['iterations']} it.  "
              f"{steps}  ({r['seconds']:.0f} s, load {r['load']:.1f})")
        for s in r["fwd_steps"]:
            if "curve" in s:
                print(f"{'':33s}step {s['k']}->{s['k'] + 1}, z after N iterations of both arms: "
                      + ", ".join(f"N {p['iterations']}: {p['z']:.1f}" for p in s["curve"]))


def span_null_summary(path: str) -> None:
    """Session 26's span models against the null pipeline (``--span --span-null N``): each record's steps,
    their kept-pixel gains against the null's, z (held-out z beside it), the count, c of R_k + 1, and the
    shares of the null's own M-mode fit (a draw from a k-mode model)."""
    with open(path) as fh:
        recs = [json.loads(line) for line in fh if '"spannull_steps"' in line]
    for r in recs:
        found = r["found_spannull"]
        start = " (null from its truth)" if r.get("spannull_from_truth") else ""
        print(f"{r.get('run', ''):20s} {r['case']:17s} refits of {r['spannull_arm']:5d}{start}: true {r['K']} found {found} "
              f"{'ok' if found == r['K'] else 'WRONG':5s} ({r['seconds']:.0f} s, load {r['load']:.1f})")
        for s in r["spannull_steps"]:
            print(f"{'':26s}{s['k']}->{s['k'] + 1} kept gain {s['kept_gain']:7.0f}, null {s['null_gain']:6.0f}, "
                  f"z {s['z']:5.1f} (held-out z {s['z_holdout']:5.1f}), c {s['c_b']:.4f}"
                  + ("" if start else f"; the null's M-mode shares {'/'.join(f'{100 * x:.1f}' for x in s['null_shares_M'])}"))


def oracle_summary(path: str) -> None:
    """Session 25's diagnostic (``--oracle``): each record's two steps from the truth, the held-out errors
    of arms A/B and z at each iteration count read."""
    with open(path) as fh:
        recs = [json.loads(line) for line in fh if '"oracle_steps"' in line]
    for r in recs:
        for st in r["oracle_steps"]:
            kind = "the weakest true mode" if st["k"] < r["K"] else "a spurious mode"
            gain = (st["error_a"] - st["error_b"]) / st["error_a"]
            print(f"{r.get('run', ''):12s} {r['case']:17s} from the truth, step {st['k']}->{st['k'] + 1} ({kind}): "
                  + ", ".join(f"N {p['iterations']}: {p['ho_a']:.0f}/{p['ho_b']:.0f} z {p['z']:.1f}" for p in st["curve"])
                  + f"; kept-pixel error lower by {100 * gain:.3f} % after {r['oracle_arm']}")


HELD_FAMILY_S22 = mode_mixtures.HELD_OUT_S22
HELD_FAMILY_S23 = mode_mixtures.HELD_OUT_S23
HELD_FAMILY_S24 = mode_mixtures.HELD_OUT_S24
HELD_FAMILY_S25 = mode_mixtures.HELD_OUT_S25


def main(argv: list[str] | None = None) -> None:
    global ml_cap
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--modes", type=int, default=6, help="M, the over-complete count")
    ap.add_argument("--alg", default="DM:20,ML:480")
    ap.add_argument("--ml-cap", type=float, default=10.0)
    ap.add_argument("--cut", type=int, default=50, help="ML iterations of the K-mode refit after the cut (0: none)")
    ap.add_argument("--truth", action="store_true", help="start from the true object and modes (+ M − K extra)")
    ap.add_argument("--set", action="append", default=[], help="a parameter, key=value")
    ap.add_argument("--chain", action="store_true", help="refit the k strongest modes for every k (the errors e_k)")
    ap.add_argument("--poisson-gn", action="store_true", help="with --set ml_noise_model='poisson': "
                    "the Gauss–Newton line-search curvature")
    ap.add_argument("--json", default="")
    ap.add_argument("--trace", type=int, default=0, help="print the spectrum every N ML iterations")
    ap.add_argument("--null", action="store_true", help="the chain against a parametric-bootstrap null of each "
                    "step (one more M-mode fit a step); with --forward, each step decided by its kept-pixel gains "
                    "against the same two arms on a Poisson draw from the step's state (null_arms)")
    ap.add_argument("--holdout", type=float, default=0.0, help="hold this fraction of every frame's pixels "
                    "out of every fit (a fixed random mask a frame) and read the count from the chain's amplitude "
                    "error on them (implies --chain; session 22)")
    ap.add_argument("--starts", default="", help="session 23: comma-separated factors of the default start's "
                    "quadratic pupil phase (1 = the default start, required), e.g. 1,0.5,-1; the M-mode fit is run "
                    "from each and the one with the lowest held-out amplitude error among those better than the "
                    "default's by paired z > 2 goes on (the default if none); needs --holdout")
    ap.add_argument("--screen", default="", help="with --starts: the schedule each start is screened with "
                    "(e.g. DM:20,ML:80); the chosen start is then fitted with --alg from its start")
    ap.add_argument("--reuse", default="", help="with --starts: a records file whose chain is copied (not rerun) "
                    "where the default start is chosen and its fit's error_M equals the record's")
    ap.add_argument("--span", action="store_true", help="session 24: the count from rank-k models fitted "
                    "inside the span of the M-mode fit (object fixed; benchmarks/mode_span.py), instead of the "
                    "chain of refits (beside it with --span-refit); needs --holdout")
    ap.add_argument("--span-refit", action="store_true", help="session 24's rule: with --span, also refit each "
                    "k-mode span model with the object for --cut ML iterations and read the chain from those")
    ap.add_argument("--converge", type=float, default=0.0, help="session 24's diagnostic: continue each refit "
                    "of the chain in blocks of --cut ML iterations until its kept-pixel error falls by less than "
                    "this fraction over a block (at most 10 blocks); with --span --span-refit, session 25's rule: each span "
                    "model's refit one ML run of up to 10 x --cut iterations, stopped when --cut iterations lower its "
                    "error by less than this fraction, and the chain stopped at its first step with z <= 2")
    ap.add_argument("--forward", type=int, default=0, help="session 25's rule: the count by forward steps k -> "
                    "k + 1, each two arms of this many ML iterations from one state (the k modes; the k modes and "
                    "the fit's mode least inside their span), read on held-out pixels (needs --holdout; the 1-mode "
                    "state refitted until --converge (default 1e-4) over --cut iterations)")
    ap.add_argument("--oracle", type=int, default=0, help="session 25's diagnostic: the steps K-1 -> K and "
                    "K -> K+1 (a spurious mode) as two arms of this many ML iterations from the truth, read on "
                    "held-out pixels (needs --holdout; --curve too)")
    ap.add_argument("--curve", default="", help="with --forward: comma-separated iteration counts at which each "
                    "step's arms are also read on held-out pixels (a diagnostic of z against the arms' length)")
    ap.add_argument("--fixed-object", action="store_true", help="with --forward: the arms refit the probe "
                    "modes only (the state's object held), a step taken refits object and modes until flat")
    ap.add_argument("--null-own", action="store_true", help="with --forward --null (session 26): the null arm "
                    "B's extra mode from the null scan's own M-mode fit (same schedule and start), as the real "
                    "arm B's is from the real scan's")
    ap.add_argument("--span-null", type=int, default=0, help="session 26's rule: with --span, each span model "
                    "refitted this many ML iterations, each step decided by its kept-pixel gains against the same "
                    "pipeline (M-mode fit, span models, refits) run on a Poisson draw from the step's k-mode model")
    ap.add_argument("--null-from-truth", action="store_true", help="with --span-null: the null's refits start "
                    "from its truth (the step's k-mode model, and it plus a spurious mode at 2 %%), no null M-mode fit")
    ap.add_argument("--null-draws", type=int, default=1, help="with --forward --null: Poisson draws a step, "
                    "their per-view gains pooled (session 26)")
    ap.add_argument("--phase-from", default="", help="session 24: fit from the start that this records file "
                    "(session 23's, with start_chosen) chose for the case; its error_M is checked against it")
    ap.add_argument("--run", default="", help="a label stored in each record (field run)")
    ap.add_argument("--summarise", default="", help="a records file: print each chain's count, run nothing")
    ap.add_argument("--compare", nargs=2, default=None, metavar=("AMPLITUDE", "POISSON"),
                    help="two records files: each Poisson cell against the same cell's amplitude fit")
    ap.add_argument("--poisson", action="store_true", help="with --summarise: the Poisson fits' records, "
                    "counted by their deviance gains")
    a = ap.parse_args(argv)
    if not 0.0 <= a.holdout < 1.0:
        ap.error(f"--holdout {a.holdout}: the fraction of each frame's pixels held out must be in [0, 1)")
    if a.starts and (a.truth or not a.holdout):
        ap.error("--starts: the starts are chosen on held-out pixels (needs --holdout), not with --truth")
    starts = None
    if a.starts:
        try:
            starts = [float(x) for x in a.starts.split(",")]
        except ValueError:
            ap.error(f"--starts {a.starts!r}: comma-separated numbers (factors of the default start's pupil phase)")
        if 1.0 not in starts:
            ap.error(f"--starts {a.starts!r}: the default start (1) must be among the starts")
    if a.span and not a.holdout:
        ap.error("--span: the count is read on held-out pixels (needs --holdout)")
    if a.converge < 0 or (a.converge and a.span and not a.span_refit):
        ap.error("--converge: a positive fraction, for the chain of refits or, with --span, --span-refit's refits")
    if a.forward < 0 or (a.forward and (not a.holdout or a.span)):
        ap.error("--forward: a positive number of ML iterations an arm, on held-out pixels (needs --holdout; "
                 "not with --span)")
    try:
        curve = tuple(int(x) for x in a.curve.split(",")) if a.curve else ()
    except ValueError:
        ap.error(f"--curve {a.curve!r}: comma-separated iteration counts")
    arms = a.forward or a.oracle
    if curve and (not arms or max(curve) > arms or min(curve) < 1):
        ap.error(f"--curve {a.curve!r}: iteration counts within the arms (needs --forward or --oracle)")
    if a.oracle < 0 or (a.oracle and (not a.holdout or a.forward or a.span)):
        ap.error("--oracle: a positive number of ML iterations an arm, on held-out pixels (needs --holdout; "
                 "not with --forward or --span)")
    if a.null_own and not (a.forward and a.null):
        ap.error("--null-own applies to --forward --null only")
    if a.null_draws < 1 or (a.null_draws != 1 and not (a.forward and a.null)):
        ap.error(f"--null-draws {a.null_draws}: a positive number of draws, with --forward --null only")
    if a.fixed_object and not a.forward:
        ap.error("--fixed-object applies to --forward only")
    if a.span_null < 0 or (a.span_null and (not a.span or a.span_refit)):
        ap.error(f"--span-null {a.span_null}: a positive number of ML iterations a refit, with --span "
                 "(not with --span-refit)")
    if a.null_from_truth and not a.span_null:
        ap.error("--null-from-truth applies to --span-null only")
    if a.span_refit and not a.span:
        ap.error("--span-refit refits the span models: it needs --span")
    if a.phase_from and (starts or a.truth or not a.holdout):
        ap.error("--phase-from: the start is the records' (not with --starts or --truth; needs --holdout)")
    for opt, val in (("--screen", a.screen), ("--reuse", a.reuse)):
        if val and not starts:
            ap.error(f"{opt} applies to --starts only")
    if a.compare:
        compare(*a.compare)
        return
    if a.summarise:
        # the records' kind, by a field only it has (newest first), chooses the summary
        docs, path = Path(__file__).resolve().parents[1] / "docs", a.summarise
        kinds: list[tuple[str, Callable[[], None]]] = [
            ('"spannull_steps"', lambda: span_null_summary(path)),
            ('"oracle_steps"', lambda: oracle_summary(path)),
            ('"fwd_steps"', lambda: forward_summary(path)),
            ('"spanref_converge"', lambda: converge_summary(path, str(docs / "auto_modes_s24.jsonl"))),
            ('"spanref_view_gain"', lambda: span_summary(path)),
            ('"start_chosen"', lambda: starts_summary(path, str(docs / "auto_modes_s22.jsonl"))),
            ("ho_view_gain", lambda: holdout_summary(path, str(docs / "auto_modes_s21.jsonl"),
                                                     str(docs / "auto_modes.md")))]
        with open(path) as fh:
            text = fh.read()
        for marker, show in kinds:
            if marker in text:
                show()
                return
        summarise(a.summarise, a.poisson)
        return
    sets = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in a.set)}
    ml_cap = a.ml_cap
    set_cap(a.ml_cap)
    if a.poisson_gn:
        poisson_gauss_newton()
    if a.trace:
        trace_spectrum(a.trace)
    for case in a.cases:
        r = run_case(case, a.modes, a.alg, a.cut, sets, a.truth, a.chain or a.null or bool(a.holdout), a.null,
                     a.holdout, starts, a.reuse, a.screen, a.span, a.phase_from, a.span_refit, a.converge,
                     a.forward, a.fixed_object, curve, a.oracle, a.null_own, a.null_draws, a.span_null,
                     a.null_from_truth)
        if a.run:
            r["run"] = a.run
        append_record(a.json, r)


if __name__ == "__main__":
    main()
