"""Issue 18 part 2, session 31: the count read from the density matrix refitted on the held-out pixels.

The held-out count's over-complete fit (steps 1–2 of :mod:`hxn_ptycho.mode_count`: the starts screened, the
M-mode fit of the kept pixels) gives an object O and M modes u_m. With O held, the model intensity is *linear*
in the probe's density matrix ρ in the span of the u_m:

    I_j(q) = Σ_mn ρ_mn ψ_jm(q) ψ_jn(q)*,   ψ_jm = F(u_m · O_j)          (Thibault & Menzel's mixed state)

so ρ is a weighted least-squares fit (weights 1/(Î + 1), Poisson) of the **held-out** pixels, whose noise no fit
has seen: its spurious directions carry no signal, and an unconstrained (Hermitian, not positive) ρ spreads
their noise symmetrically about zero. The count is the number of eigenvalues of ρ that the noise does not
explain: step k is kept while λ_k exceeds the (1 − α) quantile of the largest eigenvalue of the views'
bootstrap deviations ρ_b − ρ projected onto the complement of the k − 1 modes kept (one knob, α).

    python benchmarks/mode_rho.py --grid --json F                        # from the rule of record's fit
    python benchmarks/mode_rho.py --grid --object truth --span truth --json F   # the diagnostics (seconds a cell
    python benchmarks/mode_rho.py --grid --object truth --json F                 #  once the fits are cached)
    python benchmarks/mode_rho.py --grid --span truth --json F
    python benchmarks/mode_rho.py --from-truth 500 --cells gsm:1e6:3:0.03 --json F   # the M-mode fit from the truth
    python benchmarks/mode_rho.py --alternate 6 20 --cells gsm:1e8:3:0.03 --json F   # exact ρ steps, object refits
    python benchmarks/mode_rho.py --self 100 --cells fly:1e6:2:0.1 --json F   # each k's object, ρ in the M-span
    python benchmarks/mode_rho.py --more 1500 --cells gsm:1e8:3:0.03 --json F  # the cached fit continued first
    python benchmarks/mode_rho.py --summarise docs/auto_modes_s31_rho.jsonl --against docs/auto_modes_s27.jsonl

Session 32's (docs/auto_modes.md, "Session 32"; records docs/auto_modes_s32_*.jsonl):

    python benchmarks/mode_rho.py --hybrid 200 --cells gsm:1e6:3:0.03 --json F   # the true modes + an object from flat
    python benchmarks/mode_rho.py --basin 500 --cells gsm:1e6:3:0.03 --json F    # from the truth and from the fit
    python benchmarks/mode_rho.py --pupil --cells gsm:1e6:3:0.03 --json F        # the M-mode fit's modes in the pupil
    python benchmarks/mode_rho.py --noise poisson --cells gsm:1e6:3:0.03 --json F  # its fits Poisson ML
    python benchmarks/mode_rho.py --how schedule=DM:100,ML:400 --cells gsm:1e8:3:0.03 --json F  # its schedule

Session 33's (docs/auto_modes.md, "Session 33"; records docs/auto_modes_s33_*.jsonl):

    python benchmarks/mode_rho.py --sparse 0,10 --grid --json F     # the count from sparse fits of the cached fit
    python benchmarks/mode_rho.py --summarise docs/auto_modes_s33_sparse.jsonl --against docs/auto_modes_s27.jsonl

Result (docs/auto_modes.md, "Session 31"; records docs/auto_modes_s31_rho.jsonl, ..._from_truth.jsonl): right on
all 63 grid cells from the true object and a span holding the true modes, and on 0 of 63 from the rule of record's
fit — its object and its modes each bias ρ towards the fit's own spectrum. Not adopted. The M-mode fit of every
cell is kept in ``--cache`` (default /tmp/hxn-rho-cache), so a decision's variants are re-read without refitting.
"""
from __future__ import annotations

import argparse
import os
from contextlib import nullcontext
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from auto_mode_cv import case_scan
from mode_fit import captured, per_mode_capture
from records import append_record, read_records

from hxn_ptycho import mode_count, modes
from hxn_ptycho.backend import available_cores
from hxn_ptycho.engine import Reconstruction
from hxn_ptycho.params import ReconParams

FAMILIES = ("shifted", "defocus", "random", "gsm", "fly")
CASES = ("1:1", "2:0.3", "2:0.1", "3:0.03")


def grid_cells(families: tuple[str, ...] = FAMILIES) -> list[str]:
    """The grid of docs/auto_modes.md as ``family:photons:K:weakest`` (fly with its 68/24/8 mixture too)."""
    return [f"{fam}:{ph}:{case}" for fam in families for ph in ("1e5", "1e6", "1e8")
            for case in CASES + (("3:0.08",) if fam == "fly" else ())]


def mode_waves(scan: Any, obj: np.ndarray, probe: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """ψ_jm = F(P_m · O_j) of every mode m and view j (views' given order), the measured I, and the scan's mask."""
    rec = Reconstruction(scan, ReconParams(iterations=1, probe_modes=len(probe), threads=1),
                         log=lambda m: None, spatial_order=False)
    try:
        rec.obj = obj.astype(rec.cdtype)
        rec.probe = probe.astype(rec.cdtype)
        out = np.zeros((len(rec.diffamp),) + probe.shape, np.complex128)

        def batch(w: Any, b: slice) -> None:
            be, B = rec.be, b.stop - b.start
            out[b] = be.asnumpy(be.fft2(rec.geom.exit_waves(be, rec.obj, b, rec.probe, w.objwin[:B], w.phi[:B],
                                                            w.tmp[:B])))[:, 0]
        rec.scheduler.each(batch)
        mask = None if rec.mask is None else np.asarray(rec.be.asnumpy(rec.mask), bool)
        return out, np.square(np.asarray(rec.be.asnumpy(rec.diffamp), np.float64)), mask
    finally:
        rec.close()


def features(psi: np.ndarray) -> np.ndarray:
    """The real features of a Hermitian ρ (M² of them) for far fields ψ (..., M): |ψ_m|², then for m < n
    2Re(ψ_m ψ_n*) and −2Im(ψ_m ψ_n*) (the coefficients of Re ρ_mn and Im ρ_mn)."""
    M = psi.shape[-1]
    cols = [np.abs(psi[..., m]) ** 2 for m in range(M)]
    for m in range(M):
        for n in range(m + 1, M):
            c = psi[..., m] * np.conj(psi[..., n])
            cols += [2 * c.real, -2 * c.imag]
    return np.stack(cols, axis=-1)


def to_matrix(x: np.ndarray, M: int) -> np.ndarray:
    """ρ (M × M Hermitian) from its real parameters (:func:`features`' order)."""
    rho = np.zeros((M, M), np.complex128)
    rho[np.diag_indices(M)] = x[:M]
    i = M
    for m in range(M):
        for n in range(m + 1, M):
            rho[m, n] = x[i] + 1j * x[i + 1]
            rho[n, m] = np.conj(rho[m, n])
            i += 2
    return rho


def unit_waves(scan: Any, obj: np.ndarray, probe: np.ndarray, modelled: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The far fields of ``probe``'s modes at unit power ψ_jm/‖P_m‖ (:func:`mode_waves`), the measured I, the model
    intensity Î = Σ|ψ_jm|² of its first ``modelled`` modes (all: None) for the weights, the scan's good pixels
    (views, n, n), and the modes' norms ‖P_m‖."""
    psi, data, mask = mode_waves(scan, obj, probe)
    norms = np.sqrt(np.sum(np.abs(probe) ** 2, axis=(1, 2)))
    psi = psi / norms[None, :, None, None]
    k = len(probe) if modelled is None else modelled
    model = np.einsum("vmij,m->vij", np.abs(psi[:, :k]) ** 2, norms[:k] ** 2)
    good = np.ones(data.shape, bool) if mask is None else np.broadcast_to(mask[None], data.shape)
    return psi, data, model, good, norms


def view_normals(psi: np.ndarray, data: np.ndarray, pixels: np.ndarray, model: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Each view's weighted normal equations (G_j, h_j) over its ``pixels``, weights 1/(Î + 1)."""
    V, M = psi.shape[:2]
    P = M * M
    G, h = np.zeros((V, P, P)), np.zeros((V, P))
    for j in range(V):
        sel = pixels[j]
        X = features(np.moveaxis(psi[j][:, sel], 0, -1))
        w = 1.0 / (model[j][sel] + 1.0)
        G[j] = X.T @ (X * w[:, None])
        h[j] = X.T @ (w * data[j][sel])
    return G, h


def rho_fit(G: np.ndarray, h: np.ndarray, M: int) -> np.ndarray:
    """ρ from the summed normal equations."""
    return to_matrix(np.linalg.solve(G.sum(0), h.sum(0)), M)


def rho_count(G: np.ndarray, h: np.ndarray, M: int, alpha: float = 0.01, boots: int = 1000, seed: int = 31
              ) -> dict[str, Any]:
    """The count from the views' normal equations: ρ's eigenvalues, and per step k the null quantile of the
    largest eigenvalue of the bootstrap deviations on the complement of the k − 1 modes kept."""
    rho = rho_fit(G, h, M)
    lam, vec = np.linalg.eigh(rho)
    lam, vec = lam[::-1], vec[:, ::-1]
    rng = np.random.default_rng(seed)
    V = len(G)
    counts = rng.multinomial(V, np.full(V, 1.0 / V), size=boots).astype(np.float64)
    Gb, hb = np.einsum("bv,vpq->bpq", counts, G), counts @ h
    dev = np.array([to_matrix(x, M) for x in np.linalg.solve(Gb, hb[..., None])[..., 0]]) - rho
    steps, found = [], None
    for k in range(M):
        comp = vec[:, k:]                                  # the complement of the k modes kept before this step
        null = np.linalg.eigvalsh(np.einsum("mi,bmn,nj->bij", comp.conj(), dev, comp))[:, -1]
        q = float(np.quantile(null, 1 - alpha))
        p = float((np.sum(null >= lam[k]) + 1) / (boots + 1))
        steps.append({"lambda": float(lam[k]), "null_q": q, "p": p})
        if found is None and lam[k] <= q:
            found = k
    total = float(np.sum(lam[lam > 0]))
    return {"found": M if found is None else found, "alpha": alpha, "eigen_share": [float(x / total) for x in lam],
            "steps": steps}


def truth_basis(true: np.ndarray, fitted: np.ndarray) -> np.ndarray:
    """The true modes (their powers) and, after them, the fitted modes' parts outside their span,
    orthonormalised, the strongest first (at a unit power each): an M-dimensional span holding the truth."""
    K, M = len(true), len(fitted)
    t = true.reshape(K, -1)
    q, _ = np.linalg.qr(t.T)
    f = fitted.reshape(M, -1)
    f = f - (f @ q.conj()) @ q.T
    u, s, vh = np.linalg.svd(f, full_matrices=False)
    extra = vh[:M - K] * np.sqrt(float(np.mean(np.sum(np.abs(t) ** 2, axis=1))))
    return np.concatenate([t, extra]).reshape(M, *true.shape[1:])


def cell(text: str, cache: Path, workers: int, obj_from: str = "fit", span_from: str = "fit",
         from_truth: int = 0, more: int = 0, pupil: bool = False, noise: str = "amplitude",
         how: mode_count.HeldOutCount = mode_count.RULE) -> dict[str, Any]:
    scan, mix, K = case_scan(text)
    params = count_params(ml_noise_model=noise)
    kept, keep = mode_count.holdout_split(scan, how.holdout, how.seed)
    path = cache / (text.replace(":", "_") + ".npz")
    t0 = time.perf_counter()
    if from_truth:          # the diagnostic: the M-mode fit started from the truth (ML, kept pixels) instead
        from mode_over import truth_start
        sched = replace(params, probe_modes=how.fit_modes, algorithm=f"ML:{from_truth}", iterations=from_truth,
                        backend="numpy", extra_mode_power=how.extra_mode_power)
        obj, probe, _e = mode_count.fit(kept, sched, keep, mix.object[None],
                                        truth_start(mix, how.fit_modes, 1e-3), mode_cap=how.mode_cap)
    elif path.exists():
        z = np.load(path)
        obj, probe = z["obj"], z["probe"]
    else:
        from mode_support import held_to_pupil
        with held_to_pupil(kept.diffamp) if pupil else nullcontext():   # the variant: modes held to the pupil
            over = mode_count.overcomplete_fit(scan, kept, keep, params, how, how.fit_modes, workers,
                                               lambda m: None)
        obj, probe = over.obj, over.probe
        np.savez(path, obj=obj, probe=probe)
    if more:                # the diagnostic: the cached M-mode fit continued for ``more`` ML iterations (kept pixels)
        sched = replace(params, probe_modes=how.fit_modes, algorithm=f"ML:{more}", iterations=more, backend="numpy")
        obj, probe, _e = mode_count.fit(kept, sched, keep, obj, probe, mode_cap=how.mode_cap)
    t_fit = time.perf_counter() - t0
    fit_errors = errors(scan, keep, obj, probe)          # the M-mode fit's own, before any swap below
    fit_captured = captured(probe, mix.probe)
    # the diagnostics: the true object (the engine keeps the truth's frame: no shift or phase ramp between them),
    # and/or the true modes in the span with the fit's other directions beside them
    if span_from == "truth":
        probe = truth_basis(mix.probe, probe)
    if obj_from == "truth":
        obj = mix.object[None]
    psi, data, model, good, norms = unit_waves(scan, obj, probe)
    G, h = view_normals(psi, data, ~keep & good, model)
    out: dict[str, Any] = {"cell": text, "K": K, "fit_shares": [float(x) for x in norms ** 2 / np.sum(norms ** 2)],
                           "fit_seconds": round(t_fit, 1), "object": obj_from, "span": span_from,
                           "from_truth": from_truth, "more": more, "pupil": pupil, "noise": noise,
                           "errors": fit_errors, "captured": fit_captured,
                           "how": {f: v for f, v in vars(how).items() if v != getattr(mode_count.RULE, f)}}
    out["decisions"] = {str(a): rho_count(G, h, len(probe), alpha=a) for a in (0.05, 0.01, 0.001)}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def psd_modes(rho: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """The modes of ρ's positive part in ``basis`` (unit modes, M × n × n), strongest first."""
    lam, vec = np.linalg.eigh(rho)
    lam, vec = lam[::-1], vec[:, ::-1]
    keep = lam > 0
    return np.einsum("mk,mij->kij", vec[:, keep] * np.sqrt(lam[keep]), basis)


def cached_cell(text: str, cache: Path) -> tuple[Any, Any, int, Any, np.ndarray, np.ndarray, np.ndarray]:
    """A cell whose M-mode fit :func:`cell` cached: its scan, mixture and true count, the scan with the rule's held-out
    pixels emptied and their mask, and the fit's object and modes."""
    path = cache / (text.replace(":", "_") + ".npz")
    if not path.exists():
        raise SystemExit(f"mode_rho.py: no cached M-mode fit of {text} in {cache}: run "
                         f"`python benchmarks/mode_rho.py --cells {text} --cache {cache}` first")
    scan, mix, K = case_scan(text)
    kept, keep = mode_count.holdout_split(scan, mode_count.RULE.holdout, mode_count.RULE.seed)
    z = np.load(path)
    return scan, mix, K, kept, keep, z["obj"], z["probe"]


def alternate(text: str, cache: Path, rounds: int, obj_its: int) -> list[dict[str, Any]]:
    """The diagnostic: from the cached M-mode fit, ``rounds`` of (ρ solved exactly on the kept pixels in the span
    of the current modes, its positive part; the object refitted for ``obj_its`` ML iterations with the modes
    held); after each, ρ on the held-out pixels and its count, and the share of the true modes' power captured."""
    scan, mix, K, kept, keep, obj, probe = cached_cell(text, cache)
    how = mode_count.RULE
    M = len(probe)
    out = []
    for r in range(rounds + 1):
        psi, data, model, good, norms = unit_waves(scan, obj, probe)
        basis = probe / norms[:, None, None]
        d = rho_count(*view_normals(psi, data, ~keep & good, model), M)
        cap = captured(probe, mix.probe)                   # the true modes' share of power in the span
        ho = float(np.sum(mode_count.held_out_errors(scan, obj, probe, ~keep)))
        shares = norms ** 2 / np.sum(norms ** 2)
        out.append({"round": r, "shares": [float(x) for x in shares], "held_out_error": ho, "captured": cap,
                    "rho_found": d["found"], "rho_shares": d["eigen_share"]})
        print(f"{text} round {r}: fit % " + "/".join(f"{100 * x:.1f}" for x in shares)
              + f"  c {cap:.4f}  ho {ho:.1f}  held-out rho {d['found']}: "
              + "/".join(f"{100 * x:.1f}" for x in d["eigen_share"]), flush=True)
        if r == rounds:
            break
        Gk, hk = view_normals(psi, data, keep & good, model)
        probe = psd_modes(rho_fit(Gk, hk, M), basis)
        if len(probe) < M:        # keep M modes: pad with tiny copies of the weakest directions
            probe = np.concatenate([probe, 1e-3 * basis[len(probe):] * norms[len(probe):, None, None]])
        probe = modes.orthogonalize(probe.astype(np.complex64))[0]      # as a fit returns its modes
        obj = object_fit(kept, keep, obj, probe, obj_its, how.mode_cap)
    return out


def count_params(**extra: Any) -> ReconParams:
    """The user's parameters of the grid's counts (`--auto-rule heldout`, one thread, gain 1)."""
    return ReconParams.from_dict({"iterations": 100, "threads": 1, "detector_gain": 1, "probe_modes": "auto",
                                  "auto_rule": "heldout", **extra})


def ml_params(M: int, its: int, **extra: Any) -> ReconParams:
    """``its`` ML iterations with ``M`` modes, as the count's fits run them (one thread, gain 1, numpy)."""
    return ReconParams.from_dict({"iterations": its, "threads": 1, "detector_gain": 1, "probe_modes": M,
                                  "algorithm": f"ML:{its}", "backend": "numpy", **extra})


def object_fit(kept: Any, keep: np.ndarray, obj: np.ndarray, probe: np.ndarray, its: int, mode_cap: float = 1.0
               ) -> np.ndarray:
    """The object fitted to the kept pixels for ``its`` ML iterations from ``obj`` with ``probe`` held (``mode_cap``:
    ML's per-mode gradient scaling, which still enters its conjugate-gradient weights)."""
    return mode_count.fit(kept, ml_params(len(probe), its, probe_update_start=10 ** 9), keep, obj, probe,
                          mode_cap=mode_cap)[0]


def held_out_rho(scan: Any, keep: np.ndarray, obj: np.ndarray, basis: np.ndarray, modelled: int | None = None,
                 weights: np.ndarray | None = None) -> dict[str, Any]:
    """The count of ρ fitted on the held-out pixels in the span of ``basis`` (:func:`rho_count`), weighted by the
    model of its first ``modelled`` modes (:func:`unit_waves`), or of the modes ``weights`` when given."""
    psi, data, model, good, _norms = unit_waves(scan, obj, basis, modelled)
    if weights is not None:
        model = unit_waves(scan, obj, weights)[2]
    return rho_count(*view_normals(psi, data, ~keep & good, model), len(basis))


def errors(scan: Any, keep: np.ndarray, obj: np.ndarray, probe: np.ndarray) -> dict[str, float]:
    """A model's data error (the count's loss, :func:`mode_count.held_out_errors`) on the kept and held-out pixels."""
    return {"kept": float(np.sum(mode_count.held_out_errors(scan, obj, probe, keep))),
            "held_out": float(np.sum(mode_count.held_out_errors(scan, obj, probe, ~keep)))}


def hybrid(text: str, cache: Path, obj_its: int) -> dict[str, Any]:
    """The diagnostic: which half of the cached M-mode fit is wrong. Data errors on the kept and held-out pixels
    (:func:`errors`) of the truth, of the fit, of the true modes with an object fitted from a flat one (``obj_its``
    ML iterations of the kept pixels, the modes held), and of the fit's modes with an object fitted from the true
    one; and each true mode's share inside the fit's span."""
    scan, mix, K, kept, keep, obj, probe = cached_cell(text, cache)
    true_obj = mix.object[None]
    out = {"cell": text, "K": K, "hybrid": obj_its, "truth": errors(scan, keep, true_obj, mix.probe),
           "fit": errors(scan, keep, obj, probe),
           "true_modes_object_from_flat": errors(scan, keep, object_fit(kept, keep, np.ones_like(obj), mix.probe,
                                                                        obj_its), mix.probe),
           "fit_modes_object_from_truth": errors(scan, keep, object_fit(kept, keep, true_obj.astype(obj.dtype),
                                                                        probe, obj_its), probe),
           "per_mode_captured": per_mode_capture(probe, mix.probe)}
    print(f"{text} (true {K}) kept / held-out error: " + ", ".join(
        f"{k.replace('_', ' ')} {out[k]['kept']:.1f} / {out[k]['held_out']:.1f}"
        for k in ("truth", "fit", "true_modes_object_from_flat", "fit_modes_object_from_truth"))
        + "; true modes inside the fit's span " + "/".join(f"{100 * c:.1f}" for c in out["per_mode_captured"])
        + " %", flush=True)
    return out


def basin(text: str, cache: Path, its: int) -> dict[str, Any]:
    """The diagnostic: is the fit's spectrum the loss's or the optimiser's? ``its`` ML iterations of the kept pixels
    (the count's loss and schedule of its M-mode fit) from the truth with K modes, from the truth with M (the extra
    ones at 1e-3, as ``--from-truth``), and from the cached M-mode fit; each end's kept and held-out errors,
    shares and captured power, beside the truth's errors."""
    from mode_over import truth_start
    scan, mix, K, kept, keep, obj, probe = cached_cell(text, cache)
    how = mode_count.RULE
    out: dict[str, Any] = {"cell": text, "K": K, "basin": its, "truth": errors(scan, keep, mix.object[None], mix.probe)}
    starts = {"truth_K": (mix.object[None], truth_start(mix, K, 1e-3)),
              "truth_M": (mix.object[None], truth_start(mix, how.fit_modes, 1e-3)), "fit": (obj, probe)}
    for name, (o0, p0) in starts.items():
        sched = ml_params(len(p0), its, extra_mode_power=how.extra_mode_power)
        o, p, _e = mode_count.fit(kept, sched, keep, o0.astype(np.complex64), p0.astype(np.complex64),
                                  mode_cap=how.mode_cap)
        out[name] = {**errors(scan, keep, o, p), "shares": [float(x) for x in modes.power_fractions(p)],
                     "captured": captured(p, mix.probe)}
    print(f"{text} (true {K}) +{its} ML, kept / held-out error (truth {out['truth']['kept']:.1f} / "
          f"{out['truth']['held_out']:.1f}): " + "; ".join(
              f"from {n.replace('_', ' ')} {out[n]['kept']:.1f} / {out[n]['held_out']:.1f}, "
              + "/".join(f"{100 * x:.1f}" for x in out[n]["shares"]) + f" %, c {out[n]['captured']:.4f}"
              for n in starts), flush=True)
    return out


def sparse(text: str, cache: Path, mus: tuple[float, ...], its: int, workers: int) -> dict[str, Any]:
    """Session 33's count (docs/auto_modes.md, "Session 33"): the cached M-mode fit continued ``its`` ML iterations
    once a sparsity in ``mus`` (:func:`mode_count.sparse_fit`), the one with the lowest held-out error chosen, the
    count its modes above 1 % (:func:`mode_count.sparse_count`, as ``HeldOutCount.sparsity`` runs it)."""
    scan, mix, K, kept, keep, obj, probe = cached_cell(text, cache)
    how = replace(mode_count.RULE, sparsity=mus, sparse_its=its)
    params = count_params()
    over = mode_count.OverCompleteFit(obj, probe, float("nan"), [], 1.0, mode_count.fit_schedules(params, how, len(probe)))
    t0 = time.perf_counter()
    ev, _model, _why = mode_count.sparse_count(scan, kept, keep, over, how, params, workers)
    ev["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{text:>22} true {K} found {ev['found']} {'ok' if ev['found'] == K else 'XX'} (sparsity "
          f"{ev['sparsity_chosen']:g}) " + "; ".join(
              f"{f['sparsity']:g}: held-out {f['held_out_error']:.1f} " + "/".join(f"{100 * x:.2f}" for x in f["shares"])
              for f in ev["sparse"]) + f"  {ev['seconds']} s", flush=True)
    return {"cell": text, "K": K, **ev, "load": os.getloadavg()[0]}


def kind(r: dict[str, Any]) -> str:
    """Which object and span a record's ρ was fitted with (and how its fit differs from the rule of record's)."""
    k = f"object {r.get('object', 'fit')}, span {r.get('span', 'fit')}"
    return (k + (", modes held to the pupil" if r.get("pupil") else "")
            + (f", {r['noise']} ML" if r.get("noise", "amplitude") != "amplitude" else "")
            + "".join(f", {f} {v}" for f, v in (r.get("how") or {}).items())
            + (f", fit from the truth ({r['from_truth']} ML)" if r.get("from_truth") else "")
            + (f", the fit continued ({r['more']} ML)" if r.get("more") else ""))


def self_consistency(text: str, cache: Path, obj_its: int) -> list[dict[str, Any]]:
    """The diagnostic: for each k, the object refitted (``obj_its`` ML iterations of the kept pixels) with the probe
    held at the cached M-mode fit's k strongest modes, then ρ fitted on the held-out pixels in the span of all M
    modes with that object, and its count. A k whose count is k is consistent with its own object."""
    scan, mix, K, kept, keep, obj0, probe = cached_cell(text, cache)
    how = mode_count.RULE
    M = len(probe)
    out = []
    for k in range(1, M + 1):
        obj = object_fit(kept, keep, obj0, probe[:k], obj_its, how.mode_cap)
        d = held_out_rho(scan, keep, obj, probe, modelled=k)
        ho = float(np.sum(mode_count.held_out_errors(scan, obj, probe[:k], ~keep)))
        out.append({"k": k, "rho_found": d["found"], "rho_shares": d["eigen_share"], "held_out_error": ho})
        print(f"{text} (true {K}) object fitted with k = {k}: held-out rho count {d['found']}, "
              + "/".join(f"{100 * x:.1f}" for x in d["eigen_share"]) + f"  ho {ho:.1f}", flush=True)
    return out


def summarise(path: str, against: str | None, alpha: str) -> None:
    """Per cell, the count of each kind of record in ``path`` (:func:`kind`), and the rule of record's
    (``against``: benchmarks/auto_mode_mixtures.py records); then each kind's right cells."""
    from auto_mode_mixtures import case_key
    recs: dict[str, dict[str, dict[str, Any]]] = {}
    for r in read_records(path):
        if not {"alternate", "self", "hybrid", "basin"} & set(r):
            recs.setdefault(r["cell"], {})[kind(r)] = r
    ref = {case_key(r["family"], float(r["photons"]), int(r["K"]), float(r["weakest"])): r["found"]
           for r in read_records(against)} if against else {}
    kinds = list(dict.fromkeys(k for by in recs.values() for k in by))
    right, seen = dict.fromkeys(kinds, 0), dict.fromkeys(kinds, 0)
    rref = 0
    for c, by in recs.items():
        K = next(iter(by.values()))["K"]
        rref += ref.get(c) == K
        line = f"{c:>22} true {K} record {ref.get(c, '-')}"
        for t in kinds:
            if t in by:
                d = by[t]["decisions"][alpha]
                seen[t] += 1
                right[t] += d["found"] == K
                line += (f" | {t}: {d['found']}{' ' if d['found'] == K else '✗'} eig % "
                         + "/".join(f"{100 * s:.1f}" for s in d["eigen_share"]))
        print(line)
    print(f"alpha {alpha}: " + "; ".join(f"{t}: {right[t]} of {seen[t]}" for t in kinds)
          + (f"; the rule of record on these cells {rref}" if against else ""))


def summarise_sparse(path: str, against: str | None) -> None:
    """Session 33's records (:func:`sparse`): per cell the count (the chosen sparsity's modes above 1 %), each
    sparsity's own share count and held-out error, and the rule of record's (``against``); then the right cells,
    in all and by photon count, of the count, of each sparsity alone, and of the rule of record."""
    from auto_mode_mixtures import case_key
    recs = [r for r in read_records(path) if r.get("count_by") == "sparse"]
    ref = {case_key(r["family"], float(r["photons"]), int(r["K"]), float(r["weakest"])): r["found"]
           for r in read_records(against)} if against else {}
    right: dict[str, dict[str, int]] = {}

    def score(name: str, photons: str, ok: bool) -> None:
        by = right.setdefault(name, {})
        by[photons] = by.get(photons, 0) + ok
        by["all"] = by.get("all", 0) + ok
    for r in recs:
        K, photons = r["K"], r["cell"].split(":")[1]
        line = f"{r['cell']:>22} true {K} found {r['found']}{' ' if r['found'] == K else '✗'} (sparsity " \
               f"{r['sparsity_chosen']:g})"
        score("count", photons, r["found"] == K)
        for f in r["sparse"]:
            n = mode_count.share_count(f["shares"], r["share_min"])
            score(f"sparsity {f['sparsity']:g} alone", photons, n == K)
            line += f" | {f['sparsity']:g}: {n} held-out {f['held_out_error']:.1f} " + "/".join(
                f"{100 * x:.1f}" for x in f["shares"])
        if against:
            score("the rule of record", photons, ref.get(r["cell"]) == K)
            line += f" | record {ref.get(r['cell'], '-')}"
        print(line)
    for name, by in right.items():
        print(f"{name}: {by['all']} of {len(recs)} (" + ", ".join(f"{k} {v}" for k, v in by.items() if k != "all") + ")")


def schedule_of(changes: list[str]) -> mode_count.HeldOutCount:
    """The rule of record's schedule with ``FIELD=VALUE`` changes (each value read as the field's own type)."""
    fields = vars(mode_count.RULE)
    out = {}
    for change in changes:
        name, _sep, value = change.partition("=")
        if name not in fields or not value:
            raise SystemExit(f"mode_rho.py: --how {change!r}: expected FIELD=VALUE with FIELD one of "
                             + ", ".join(fields))
        kind_of = int if fields[name] is None else type(fields[name])
        try:
            out[name] = tuple(float(v) for v in value.split(",")) if kind_of is tuple else kind_of(value)
        except ValueError:
            raise SystemExit(f"mode_rho.py: --how {change!r}: {name} takes {kind_of.__name__} "
                             f"(the rule of record's: {fields[name]!r})") from None
    return replace(mode_count.RULE, **out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", nargs="*", default=[])
    ap.add_argument("--grid", action="store_true")
    ap.add_argument("--cache", default="/tmp/hxn-rho-cache")
    ap.add_argument("--workers", type=int, default=available_cores())
    ap.add_argument("--json")
    ap.add_argument("--summarise")
    ap.add_argument("--against")
    ap.add_argument("--alpha", default="0.01")
    ap.add_argument("--object", choices=("fit", "truth"), default="fit", help="the object ρ is fitted with")
    ap.add_argument("--span", choices=("fit", "truth"), default="fit",
                    help="ρ's span: the fit's M modes, or the true modes and the fit's others beside them")
    ap.add_argument("--from-truth", type=int, default=0, metavar="N",
                    help="the diagnostic: the M-mode fit started from the truth (its extra modes at 1e-3 of "
                         "the first's power), N ML iterations (not cached)")
    ap.add_argument("--more", type=int, default=0, metavar="N",
                    help="the diagnostic: the cached M-mode fit continued for N ML iterations first")
    ap.add_argument("--pupil", action="store_true",
                    help="the M-mode fit's modes held to the pupil (cached apart, in CACHE-pupil)")
    ap.add_argument("--noise", choices=("amplitude", "poisson"), default="amplitude",
                    help="the fits' ML noise model (a fit not from the truth is cached apart, in CACHE-poisson)")
    ap.add_argument("--self", type=int, metavar="OBJ_ITS",
                    help="the diagnostic: each k's object refitted with the fit's k strongest modes held")
    ap.add_argument("--hybrid", type=int, metavar="OBJ_ITS",
                    help="the diagnostic: the true modes with an object fitted from flat, the fit's modes with one "
                         "fitted from the truth (held-out errors), and each true mode's share inside the fit's span")
    ap.add_argument("--how", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="the M-mode fit's schedule changed (HeldOutCount fields: schedule=DM:100,ML:400 "
                         "extra_mode_power=0.1 …; cached apart)")
    ap.add_argument("--basin", type=int, metavar="ITS",
                    help="the diagnostic: ITS ML iterations from the truth (K and M modes) and from the cached fit")
    ap.add_argument("--alternate", nargs=2, type=int, metavar=("ROUNDS", "OBJ_ITS"))
    ap.add_argument("--sparse", metavar="MU[,MU…]",
                    help="session 33's count: the cached fit continued with each sparsity (ml.mode_penalty), the "
                         "lowest held-out error chosen, its modes above 1 %% counted")
    ap.add_argument("--sparse-its", type=int, default=500, help="with --sparse: the ML iterations of each")
    a = ap.parse_args(argv)
    if a.sparse:
        try:
            mus = tuple(float(x) for x in a.sparse.split(","))
        except ValueError:
            raise SystemExit(f"mode_rho.py: --sparse {a.sparse!r}: expected sparsities such as 0,10") from None
        for text in (grid_cells() if a.grid else []) + a.cells:
            append_record(a.json, sparse(text, Path(a.cache), mus, a.sparse_its, a.workers))
        return
    if a.self:
        for text in a.cells:
            append_record(a.json, {"cell": text, "self": a.self, "ks": self_consistency(text, Path(a.cache), a.self)})
        return
    if a.basin:
        for text in a.cells:
            append_record(a.json, basin(text, Path(a.cache), a.basin))
        return
    if a.hybrid:
        for text in a.cells:
            append_record(a.json, hybrid(text, Path(a.cache), a.hybrid))
        return
    if a.alternate:
        for text in a.cells:
            rounds = alternate(text, Path(a.cache), *a.alternate)
            append_record(a.json, {"cell": text, "alternate": a.alternate, "rounds": rounds})
        return
    if a.summarise:
        if any(r.get("count_by") == "sparse" for r in read_records(a.summarise)):
            summarise_sparse(a.summarise, a.against)
        else:
            summarise(a.summarise, a.against, a.alpha)
        return
    how = schedule_of(a.how)
    cache = Path(a.cache + ("-pupil" if a.pupil else "") + ("-poisson" if a.noise == "poisson" else "")
                 + "".join(f"-{x.replace(':', '').replace(',', '')}" for x in a.how))
    cache.mkdir(parents=True, exist_ok=True)
    for text in (grid_cells() if a.grid else []) + a.cells:
        r = cell(text, cache, a.workers, a.object, a.span, a.from_truth, a.more, a.pupil, a.noise, how)
        r["load"] = os.getloadavg()[0]
        d = r["decisions"]
        print(f"{text:>22} true {r['K']} found " + " ".join(f"a{k}:{v['found']}" for k, v in d.items())
              + "  eig % " + "/".join(f"{100 * s:.1f}" for s in d["0.01"]["eigen_share"])
              + f"  c {r['captured']:.4f}  kept {r['errors']['kept']:.1f} held-out {r['errors']['held_out']:.1f}"
              + f"  {r['seconds']} s", flush=True)
        append_record(a.json, r)


if __name__ == "__main__":
    main()
