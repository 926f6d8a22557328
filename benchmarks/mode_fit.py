"""How DM's fixed-count multi-mode fit evolves from our start and from the truth (issue 18, part 2;
docs/auto_modes.md, "Session 20").

Each run: the engine's own loop (``Reconstruction.run``, the defaults unless ``--set``) with the true
count of modes on a mixture of tests/mode_mixtures.py (64² frames, 100 views, seed 1), from the
default start or from the true object and modes; every ``--every`` iterations it prints the model's
data error Σ(|F(P·O)| − √I)²/ΣI and the power spectrum of the orthogonalised modes, and at the start
the data error of the exact true model (the noise floor of this scan).

    python benchmarks/mode_fit.py fly:1e6:3:0.08 gsm:1e6:2:0.3 random:1e6:2:0.1 --start truth default --truth-error
    python benchmarks/mode_fit.py fly:1e6:3:0.08 --start truth default --set power_bound=0
    python benchmarks/mode_fit.py gsm:1e6:2:0.3 --dm-over 3:0.5:20 --set orthogonalize_every=1
    python benchmarks/mode_fit.py gsm:1e6:2:0.3 --start truth default --its 200 --every 100 \
        --set "algorithm='DM:20,ML:180'" --ml-cap 10
    python benchmarks/mode_fit.py gsm:1e6:2:0.3 --its 200 --set "algorithm='DM:20,ML:180'" \
        --set "ml_noise_model='poisson'" --poisson-gn --ml-cap 10
    python benchmarks/mode_fit.py fly:1e6:3:0.08 --held object:truth      # the object held at the fit's
    python benchmarks/mode_fit.py fly:1e6:3:0.08 --over "3/DM:20,ML:130/ML:50" --ml-cap 10

A case is ``family:photons:true count:weakest share`` as in benchmarks/auto_mode_cv.py. Each trace
entry is ``iteration: data error spectrum cF``, F = Tr(Π ρ_true)/Tr(ρ_true), the share of the true
modes' power inside the span of the fitted modes (1 = the right subspace). The variants:
``--dm-over cap:γ[:from]`` scales DM's probe update of mode k by min(cap, (P_1/P_k)^γ) from iteration
``from``; ``--ml-cap`` sets ``MLIteration.mode_precondition_cap`` (hxn_ptycho/ml.py); ``--ml-orth k``
orthogonalises the modes every k ML iterations (restarting the conjugate direction); ``--poisson-gn``
gives the Poisson ML line search the Gauss–Newton curvature (the exact one stalls there); ``--held``
holds the object or the probe (see :func:`held`); ``--over`` fits K + M modes, then K (:func:`over`).
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np
from auto_mode_cv import case_scan

from hxn_ptycho import modes
from hxn_ptycho.engine import Reconstruction
from hxn_ptycho.params import ReconParams


def per_mode_capture(probe: np.ndarray, true_probe: np.ndarray) -> list[float]:
    """Each true mode's share of its power inside the span of the fitted modes ``probe``."""
    q, _ = np.linalg.qr(probe.reshape(len(probe), -1).T.astype(np.complex128))
    t = true_probe.reshape(len(true_probe), -1)
    return [float(x) for x in np.sum(np.abs(q.conj().T @ t.T) ** 2, axis=0) / np.sum(np.abs(t) ** 2, axis=1)]


def captured(probe: np.ndarray, true_probe: np.ndarray) -> float:
    """Tr(Π ρ_true) / Tr(ρ_true): the share of the true modes' power inside the span of the fitted modes (their
    :func:`per_mode_capture` weighted by power)."""
    power = np.sum(np.abs(true_probe.reshape(len(true_probe), -1)) ** 2, axis=1)
    return float(np.asarray(per_mode_capture(probe, true_probe)) @ power / np.sum(power))

def poisson_gauss_newton() -> None:
    """ML Poisson: the line search's curvature Σ (I/I_m²)·c1² (Gauss–Newton, never negative; the exact
    one stalls with the per-mode step, docs/auto_modes.md session 20)."""
    from hxn_ptycho import ml
    ls = ml.ml_line_search

    def gn_line_search(be: Any, f0: Any, f1: Any, f2: Any, diffamp: Any, intensity: Any, mask: Any,
                       floor: float, model: str) -> tuple[float, float]:
        if model != "poisson":
            return ls(be, f0, f1, f2, diffamp, intensity, mask, floor, model)
        xp = be.xp
        B_, n = f0.shape[0], f0.shape[-1]
        g0, g1 = f0.reshape(B_, -1, n, n), f1.reshape(B_, -1, n, n)
        c1 = 2 * (g0.real * g1.real + g0.imag * g1.imag).sum(axis=1)
        i0 = xp.maximum(ml.dm._modulus(be, f0) ** 2, floor)
        d1 = (1 - intensity / i0) * c1
        d2 = intensity / i0 / i0 * c1 * c1
        if mask is not None:
            d1 *= mask
            d2 *= mask
        return float(xp.sum(d1, dtype=xp.float64)), float(xp.sum(d2, dtype=xp.float64))
    ml.ml_line_search = gn_line_search



def spectrum_text(probe: np.ndarray) -> str:
    return "/".join(f"{100 * x:.1f}" for x in modes.power_fractions(modes.orthogonalize(probe)[0]))


def truth_error(scan: Any, mix: Any, K: int) -> float:
    rec = Reconstruction(scan, ReconParams(iterations=1, probe_modes=K, threads=1), log=lambda m: None)
    rec.obj = mix.object[None].astype(rec.cdtype)
    rec.probe = mix.probe.astype(rec.cdtype)
    err = rec.model_cost()[1]
    rec.close()
    return err


def run(case: str, its: int, start: str, every: int, sets: dict[str, Any]) -> dict[str, Any]:
    scan, mix, K = case_scan(case)
    t0 = time.perf_counter()
    p = ReconParams(iterations=its, probe_modes=K, threads=1, **sets)
    rec = Reconstruction(scan, p, log=lambda m: None)
    if start == "truth":
        rec.obj = mix.object[None].astype(rec.cdtype)
        rec.probe = mix.probe.astype(rec.cdtype)
        rec._each(rec._init_psi)
    trace: list[tuple[int, float, str]] = []
    orig = rec.modes_mgr.after_iteration

    def after(it: int, err: float, dm: bool, last: bool) -> None:
        orig(it, err, dm, last)
        if (it + 1) % every == 0 and not last:
            pr = rec.be.asnumpy(rec.probe)
            trace.append((it + 1, rec.model_cost()[1], f"{spectrum_text(pr)} c{captured(pr, mix.probe):.3f}"))
    rec.modes_mgr.after_iteration = after         # type: ignore[method-assign]
    res = rec.run()
    pr = np.asarray(res.probe)
    trace.append((its, float(res.attrs["final_data_error"]), f"{spectrum_text(pr)} c{captured(pr, mix.probe):.3f}"))
    rec.close()
    print(f"{case} start {start} {sets} ({time.perf_counter() - t0:.0f} s): "
          + "; ".join(f"{i}: {e:.6f} {s}" for i, e, s in trace), flush=True)
    return {"case": case, "start": start, "sets": sets, "trace": trace}


def held(case: str, its: int, every: int, hold: str, modes_from: str) -> None:
    """DM with one part held: the object (``hold`` = 'object') or the probe ('probe'), held at the
    truth or at the default start's fit after ``its`` iterations; the other part starts from the truth
    or from that fit (``modes_from``). Says whether the held part pins the spectrum."""
    from hxn_ptycho.dm_iteration import DMIteration
    scan, mix, K = case_scan(case)
    rec = Reconstruction(scan, ReconParams(iterations=its, probe_modes=K, threads=1), log=lambda m: None)
    fit = rec.run()
    rec.close()
    obj_fit = np.asarray(fit.object)[0]
    c = np.vdot(obj_fit, mix.object) / np.vdot(obj_fit, obj_fit)      # the fit's global scale and phase
    obj_fit, probe_fit = obj_fit * c, np.asarray(fit.probe) / c
    rec = Reconstruction(scan, ReconParams(iterations=its, probe_modes=K, threads=1), log=lambda m: None)
    rec.obj = (obj_fit if hold == "object" else mix.object)[None].astype(rec.cdtype)
    rec.probe = (mix.probe if modes_from == "truth" else probe_fit).astype(rec.cdtype)
    if hold == "probe":
        rec.obj = (mix.object if modes_from == "truth" else obj_fit)[None].astype(rec.cdtype)
        rec.probe = (probe_fit if modes_from == "truth" else mix.probe).astype(rec.cdtype)
    rec._each(rec._init_psi)
    start = (rec.model_cost()[1], spectrum_text(rec.be.asnumpy(rec.probe)))
    saved = DMIteration.update_object, DMIteration.update_probe
    if hold == "object":
        DMIteration.update_object = lambda self: None       # type: ignore[method-assign]
    else:
        DMIteration.update_probe = lambda self: None        # type: ignore[method-assign]
    trace: list[tuple[int, float, str]] = []
    orig = rec.modes_mgr.after_iteration

    def after(it: int, err: float, dm: bool, last: bool) -> None:
        orig(it, err, dm, last)
        if (it + 1) % every == 0 and not last:
            trace.append((it + 1, rec.model_cost()[1], spectrum_text(rec.be.asnumpy(rec.probe))))
    rec.modes_mgr.after_iteration = after         # type: ignore[method-assign]
    res = rec.run()
    DMIteration.update_object, DMIteration.update_probe = saved      # type: ignore[method-assign]
    trace.append((its, float(res.attrs["final_data_error"]), spectrum_text(np.asarray(res.probe))))
    rec.close()
    print(f"{case} {hold} held ({'fit' if hold == 'object' else 'truth' if modes_from == 'fit' else 'fit'}), "
          f"the other from the {modes_from}: start {start[0]:.6f} {start[1]}; "
          + "; ".join(f"{i}: {e:.6f} {s}" for i, e, s in trace), flush=True)


def over(case: str, extra: int, first: str, then: str, every: int, sets: dict[str, Any]) -> None:
    """An over-complete fit (K + ``extra`` modes, algorithm ``first``), then its K strongest orthogonal
    modes and its object start a K-mode fit (algorithm ``then``); the same two phases from the truth
    (K modes throughout) for reference."""
    scan, mix, K = case_scan(case)
    out = []
    for start in ("truth", "over"):
        t0 = time.perf_counter()
        k1 = K if start == "truth" else K + extra
        p = ReconParams(iterations=_its(first), probe_modes=k1, threads=1, algorithm=first, **sets)
        rec = Reconstruction(scan, p, log=lambda m: None)
        if start == "truth":
            rec.obj = mix.object[None].astype(rec.cdtype)
            rec.probe = mix.probe.astype(rec.cdtype)
            rec._each(rec._init_psi)
        r1 = rec.run()
        rec.close()
        pr1 = np.asarray(r1.probe)
        p = ReconParams(iterations=_its(then), probe_modes=K, threads=1, algorithm=then, **sets)
        rec = Reconstruction(scan, p, log=lambda m: None)
        rec.obj = np.asarray(r1.object).astype(rec.cdtype)
        rec.probe = modes.orthogonalize(pr1)[0][:K].astype(rec.cdtype)
        rec._each(rec._init_psi)
        r2 = rec.run()
        rec.close()
        pr2 = np.asarray(r2.probe)
        out.append(f"{start}: phase 1 {r1.attrs['final_data_error']:.6f} {spectrum_text(pr1)}, "
                   f"phase 2 {r2.attrs['final_data_error']:.6f} {spectrum_text(pr2)} c{captured(pr2, mix.probe):.3f} "
                   f"({time.perf_counter() - t0:.0f} s)")
    print(f"{case} over +{extra} {first} then {then} {sets}: " + "; ".join(out), flush=True)


def _its(algorithm: str) -> int:
    return sum(int(s.split(":")[1]) for s in algorithm.split(","))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--its", type=int, default=100)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--start", nargs="+", choices=("default", "truth"), default=["default"])
    ap.add_argument("--truth-error", action="store_true", help="print the exact true model's data error")
    ap.add_argument("--set", action="append", default=[], help="a parameter, key=value")
    ap.add_argument("--ml-cap", type=float, default=0.0, help="ML: mode k's probe gradient × min(cap, λ_1/λ_k)")
    ap.add_argument("--poisson-gn", action="store_true", help="ML Poisson: Gauss–Newton line-search curvature")
    ap.add_argument("--ml-orth", type=int, default=0, help="ML: orthogonalise the modes every k iterations "
                    "(and restart the conjugate direction)")
    ap.add_argument("--dm-over", default="", help="DM: mode k's probe update × min(cap, (λ_1/λ_k)^γ), 'cap:γ'")
    ap.add_argument("--over", default="", help="'M/ALG1/ALG2': K + M modes "
                    "by ALG1, then the K strongest by ALG2")
    ap.add_argument("--held", default="", help="'object:truth' etc.: hold a part (see held())")
    a = ap.parse_args()
    sets = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in a.set)}
    if a.over:
        m, first, then = a.over.split("/")
        for case in a.cases:
            over(case, int(m), first, then, a.every, sets)
        return
    if a.held:
        hold, frm = a.held.split(":")
        for case in a.cases:
            held(case, a.its, a.every, hold, frm)
        return
    if a.dm_over:
        cap, gamma, *rest = (float(x) for x in a.dm_over.split(":"))
        from_it = int(rest[0]) if rest else 0
        from hxn_ptycho.dm_iteration import DMIteration
        upd = DMIteration.update_probe

        def update_probe(self: Any) -> None:
            rec = self.rec
            old = rec.probe
            upd(self)
            if len(rec.overlap_rounds) < from_it:
                return
            pw = np.sum(np.abs(rec.be.asnumpy(old)) ** 2, axis=(1, 2))
            f = np.minimum(cap, (pw.max() / np.maximum(pw, 1e-300)) ** gamma)
            rec.probe = (old + (rec.probe - old) * f[:, None, None].astype(np.float32)).astype(rec.cdtype)
            rec._probe_terms()
        DMIteration.update_probe = update_probe     # type: ignore[method-assign]
    if a.ml_cap:
        from hxn_ptycho import ml
        init = ml.MLIteration.__init__

        def ml_init(self: Any, rec: Any) -> None:
            init(self, rec)
            self.mode_precondition_cap = a.ml_cap or 1.0
        ml.MLIteration.__init__ = ml_init       # type: ignore[method-assign]
    if a.poisson_gn:
        poisson_gauss_newton()
    if a.ml_orth:
        from hxn_ptycho import ml
        iterate = ml.MLIteration.iterate

        def ml_iterate(self: Any, it: int) -> Any:
            if it % a.ml_orth == 0:
                self.rec.modes_mgr.orthogonalize()
                self.h_obj = self.h_probe = None
                self.nll_prev = np.inf
            return iterate(self, it)
        ml.MLIteration.iterate = ml_iterate     # type: ignore[method-assign]
    for case in a.cases:
        if a.truth_error:
            scan, mix, K = case_scan(case)
            print(f"{case}: the true model's data error {truth_error(scan, mix, K):.6f}, spectrum "
                  f"{'/'.join(f'{100 * x:.1f}' for x in mix.shares)}", flush=True)
        for s in a.start:
            run(case, a.its, s, a.every, sets)


if __name__ == "__main__":
    main()
