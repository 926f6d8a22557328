"""The probe-mode count by a parametric bootstrap (a calibrated null), on the independent mixtures of
tests/mode_mixtures.py (issue 18, part 2; docs/auto_modes.md, "Session 19").

    python benchmarks/auto_mode_bootstrap.py fly:1e6:3:0.08 gsm:1e6:3:0.03 shifted:1e6:2:0.1
    python benchmarks/auto_mode_bootstrap.py fly:1e6:1:1 --its 60 --alpha-z 2
    python benchmarks/auto_mode_bootstrap.py --summarise results.jsonl [alpha_z]   # the rules' counts

A case is ``family:photons:true count:weakest share`` (``fly:1e6:3:0.08`` is issue 18's fly mixture,
68/24/8 %); 64² frames, 100 views, seed 1, as benchmarks/auto_mode_mixtures.py. A ``fly`` scan
carries ``scan_kind`` fly2dpd (what an exported fly scan's file says), so the library's start is the
motion start (``probe_modes_init`` auto).

The rule (sequential, from K = 1): fit K and K + 1 modes, each a fixed-count reconstruction with
``--its`` DM iterations from the library's start; the real gain is the per-view fall of the data
error d_j = e_j(K) − e_j(K + 1) (e_j = Σ(|F(P·O)| − √I)² of view j over ΣI). The null: Poisson
data drawn from the fitted K-mode model (its object and modes, the same positions, the model's
intensity as the mean), fitted by exactly the same procedure (same start, same iterations) with K
and K + 1 modes: d0_j. The null thus carries what one more mode gains by fitting noise at this count
*and* what it gains because DM's K-mode fit has not converged from this start. Mode K + 1 is kept
when the real gain exceeds the null's by ``--alpha-z`` standard errors (Welch: the mean of d minus
the mean of d0 over √(var d/N + var d0/N)); else the count is K. The share of the new mode in the
real and the null K + 1 fits is printed too (the share variant of the same test).

``--over``: over-complete, then reduce — one ``--max-modes`` fit of the real data; for K = 1, 2, …
Poisson data from its K strongest modes and its object, fitted by the same over-complete procedure;
the count is the first K whose (K + 1)-th share is no larger on the real data than on that null.

``--start residual``: the K + 1 fits continue the K fit (object and modes) with one more mode seeded
from the top eigenvector of the residual operator (session 17's A, benchmarks/auto_mode_cv.py
``score``, inside the probe's pupil, Lanczos) at ``--seed-power`` of the first mode's power, instead of
the library's fresh start; the gain is then taken against the K fit continued as long, and the null
runs the same chain from one mode.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np
from mode_mixtures import mixture_scan, spectrum
from records import append_record

from hxn_ptycho import dm, modes
from hxn_ptycho.engine import Reconstruction
from hxn_ptycho.params import ReconParams, parse_assignments
from hxn_ptycho.scanfile import ScanData

QUIET = {"log": lambda m: None}


def case_scan(text: str, seed: int) -> tuple[ScanData, int]:
    fam, ph, k, weak = text.split(":")
    K = int(k)
    shares = np.array([0.68, 0.24, 0.08]) if (fam == "fly" and K == 3 and float(weak) == 0.08) \
        else spectrum(K, float(weak))
    scan, _ = mixture_scan(fam, shares, float(ph), seed=seed)
    if fam == "fly":
        scan.attrs["scan_kind"] = "fly2dpd"
    return scan, K


def per_view(rec: Reconstruction) -> tuple[np.ndarray, np.ndarray]:
    """Per view: Σ(|F(P·O)| − √I)² / ΣI (sums to the engine's normalised data error), and the model
    intensity |F(P·O)|² summed over the modes (the mean of the null's Poisson draw)."""
    rec.use_given_order()               # rows = views: the arrays below are indexed by the batches
    N = rec.diffamp.shape[0]
    err = np.zeros(N)
    model = np.zeros(rec.diffamp.shape)

    def batch(w: Any, b: slice) -> None:
        be, B = rec.be, b.stop - b.start
        f = be.fft2(rec.geom.exit_waves(be, rec.obj, b, rec.probe, w.objwin[:B], w.phi[:B], w.tmp[:B]))
        amp = dm._modulus(be, f)
        diff = amp - rec.diffamp[b]
        if rec.mask is not None:
            diff *= rec.mask
        err[b] = np.sum(np.square(diff), axis=(1, 2), dtype=np.float64)
        model[b] = np.square(be.asnumpy(amp), dtype=np.float64)
    rec.scheduler.each(batch)
    return err / rec.total_intensity, model


def residual_mode(rec: Reconstruction, power: float, steps: int = 20) -> np.ndarray:
    """The top eigenvector of A = Σ_j O_j* F⁻¹ diag(√I_j/|F(P·O_j)| − 1) F O_j (the first-order gain of
    one more incoherent mode) on the complement of the current modes and inside the probe's pupil (the
    far-field support of the first mode: > 1 % of its peak; session 17's 'pupil' variant, the whole
    window's top vector being dark-field noise), by Lanczos (``steps``, benchmarks/auto_mode_cv.py),
    scaled to ``power`` of the first mode's power."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from auto_mode_cv import lanczos_top
    rec.use_given_order()               # rows = views: the frames are indexed by the batches
    probe = rec.be.asnumpy(rec.probe).astype(np.complex128)
    K, n = probe.shape[0], rec.n
    q, _ = np.linalg.qr(probe.reshape(K, -1).T)
    far = np.abs(np.fft.fft2(probe[0], norm="ortho")) ** 2
    pupil = far > 0.01 * far.max()

    def project(x: np.ndarray) -> np.ndarray:
        x = np.fft.ifft2(np.fft.fft2(x.reshape(n, n), norm="ortho") * pupil, norm="ortho").ravel()
        return x - q @ (q.conj().T @ x)

    parts: list[tuple[np.ndarray, np.ndarray]] = []

    def prep(w: Any, b: slice) -> None:
        be, B = rec.be, b.stop - b.start
        f = be.fft2(rec.geom.exit_waves(be, rec.obj, b, rec.probe, w.objwin[:B], w.phi[:B], w.tmp[:B]))
        r = be.asnumpy(rec.diffamp[b]) / np.maximum(be.asnumpy(dm._modulus(be, f)), 1.0) - 1.0
        if rec.mask is not None:
            r *= be.asnumpy(rec.mask)
        wins = be.asnumpy(be.gather(rec.obj, rec.geom.corner[b], n, out=w.objwin[:B]))[:, 0].astype(np.complex128)
        parts.append((r, wins))
    rec.scheduler.each(prep)

    def apply(x: np.ndarray) -> np.ndarray:
        v = x.reshape(n, n)
        out = np.zeros((n, n), np.complex128)
        for r, wins in parts:
            out += np.sum(wins.conj() * np.fft.ifft2(r * np.fft.fft2(wins * v[None], norm="ortho"), norm="ortho"),
                          axis=0)
        return out.ravel()

    rng = np.random.default_rng(0)
    _, v = lanczos_top(lambda x: project(apply(project(x))), project(rng.standard_normal(n * n) + 0j), steps)
    v = project(v)
    v /= np.linalg.norm(v)
    p0 = float(np.vdot(probe[0], probe[0]).real)
    return (v.reshape(n, n) * np.sqrt(power * p0)).astype(rec.be.asnumpy(rec.probe).dtype)


ALGORITHM: str | None = None     # --algorithm: e.g. DM:100,ML:50 (with ML_NOISE) instead of --its DM iterations
ML_NOISE = "amplitude"
EXTRA: dict[str, Any] = {}       # --set name=value: any further parameter of every fit


def fit(scan: ScanData, K: int, its: int, start: tuple[np.ndarray, np.ndarray] | None = None
        ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A fixed-count fit: final error, per-view errors, model intensity, power shares, object, probe."""
    extra: dict[str, Any] = {"algorithm": ALGORITHM, "ml_noise_model": ML_NOISE} if ALGORITHM else {"iterations": its}
    rec = Reconstruction(scan, ReconParams.from_dict({"threads": 1, **EXTRA, **extra, "probe_modes": K}), **QUIET)
    try:
        if start is not None:
            rec.obj = rec.be.asarray(start[0], rec.cdtype)
            rec.probe = rec.be.asarray(start[1], rec.cdtype)
            rec._each(rec._init_psi)
        res = rec._run()
        e, model = per_view(rec)
        return (float(res.attrs["final_data_error"]), e, model, modes.power_fractions(rec.be.asnumpy(rec.probe)),
                rec.be.asnumpy(rec.obj).copy(), rec.be.asnumpy(rec.probe).copy())
    finally:
        rec.close()


def grown_start(scan: ScanData, obj: np.ndarray, probe: np.ndarray, power: float) -> tuple[np.ndarray, np.ndarray]:
    """The K fit plus one mode from the residual's top eigenvector."""
    K = probe.shape[0]
    rec = Reconstruction(scan, ReconParams(iterations=1, probe_modes=K, threads=1), **QUIET)
    try:
        rec.obj = rec.be.asarray(obj, rec.cdtype)
        rec.probe = rec.be.asarray(probe, rec.cdtype)
        new = residual_mode(rec, power)
    finally:
        rec.close()
    return obj, np.concatenate([probe, new[None]])


def null_scan(scan: ScanData, model: np.ndarray, seed: int) -> ScanData:
    draw = np.random.default_rng(seed).poisson(np.maximum(model, 0.0))
    return ScanData(diffamp=np.sqrt(draw).astype(np.float32), points=scan.points, lambda_nm=scan.lambda_nm,
                    z_m=scan.z_m, ccd_pixel_um=scan.ccd_pixel_um, mask=scan.mask, attrs=dict(scan.attrs))


RULES = ("error", "share", "both")


def decide(steps: list[dict[str, Any]], rule: str, alpha_z: float) -> tuple[int, bool]:
    """The count a rule gives from a case's recorded steps, and whether it stopped within them (False:
    it kept every mode measured, so the count is at least the one given).

    'error': keep mode K + 1 while the real error gain beats the null's by ``alpha_z`` standard errors;
    'share': while its share in the real K + 1 fit exceeds its share in the null's K + 1 fit (the null's
    share hardly varies between Poisson draws: 0.02–0.03 points over 3 draws, so no margin);
    'both': while both hold."""
    for st in sorted(steps, key=lambda x: x["K"]):
        ok_err = st["z"] > alpha_z
        ok_share = st["share_new"] > st["null_share_new"]
        keep = ok_err if rule == "error" else ok_share if rule == "share" else (ok_err and ok_share)
        if not keep:
            return int(st["K"]), True
    return int(max(st["K"] for st in steps)) + 1, False


def summarise(path: str, alpha_z: float) -> None:
    """One line per recorded case: the true count and the count of each rule (✓ right, ✗ wrong)."""
    print(f"{'case':>20} {'true':>4} " + " ".join(f"{r:>6}" for r in RULES))
    right = dict.fromkeys(RULES, 0)
    n = 0
    with open(path) as fh:
        records = [json.loads(line) for line in fh]
    for r in records:
        found = {rule: decide(r["steps"], rule, alpha_z) for rule in RULES}
        n += 1
        ok = {x: found[x][1] and found[x][0] == r["true"] for x in RULES}
        for rule in RULES:
            right[rule] += ok[rule]
        print(f"{r['case']:>20} {r['true']:>4} " + " ".join(
            f"{('' if found[x][1] else '≥') + str(found[x][0]):>5}{'✓' if ok[x] else '✗'}" for x in RULES))
    print(f"right of {n}: " + ", ".join(f"{x} {right[x]}" for x in RULES))


def overcomplete(text: str, a: argparse.Namespace) -> None:
    """Over-complete, then reduce: one fit with ``--max-modes`` modes of the real data (spectrum s); for
    K = 1, 2, …: Poisson data from that fit's K strongest modes (the rest's power given to them) and
    its object, fitted by the same over-complete procedure (spectrum s0); the count is the first K whose
    (K + 1)-th share is no larger on the real data than on this K-mode null."""
    t0 = time.perf_counter()
    scan, K_true = case_scan(text, a.seed)
    M = a.max_modes
    real = fit(scan, M, a.its)
    s = real[3]
    found, rows = None, []
    for K in range(1, M):
        probe = real[5][:K] * np.sqrt(1.0 / float(np.sum(s[:K])))
        rec = Reconstruction(scan, ReconParams(iterations=1, probe_modes=K, threads=1), **QUIET)
        try:
            rec.obj = rec.be.asarray(real[4], rec.cdtype)
            rec.probe = rec.be.asarray(probe, rec.cdtype)
            model = per_view(rec)[1]
        finally:
            rec.close()
        s0 = fit(null_scan(scan, model, seed=2000 + K), M, a.its)[3]
        rows.append({"K": K, "share": float(s[K]), "null_share": float(s0[K]),
                     "null_spectrum": [round(float(x), 4) for x in s0]})
        print(f"  {text} K {K}: real {'/'.join(f'{100 * x:.2f}' for x in s)}  null {'/'.join(f'{100 * x:.2f}' for x in s0)}"
              f"  mode {K + 1}: {100 * s[K]:.2f} vs {100 * s0[K]:.2f} %", flush=True)
        if s[K] <= s0[K] and found is None:
            found = K
            if not a.full:
                break
    found = found or M
    dt = time.perf_counter() - t0
    print(f"{text}: true {K_true}, found {found} {'ok' if found == K_true else 'WRONG'}  ({dt:.0f} s)", flush=True)
    append_record(a.json, {"case": text, "mode": "over", "its": a.its, "max_modes": M, "true": K_true,
                           "found": found, "seconds": round(dt, 1), "spectrum": [float(x) for x in s], "steps": rows})


def main() -> None:
    if sys.argv[1:2] == ["--summarise"]:
        summarise(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 2.0)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--its", type=int, default=100)
    ap.add_argument("--alpha-z", type=float, default=2.0)
    ap.add_argument("--max-modes", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start", choices=("library", "residual"), default="library")
    ap.add_argument("--seed-power", type=float, default=0.1)
    ap.add_argument("--full", action="store_true", help="go on past the first rejected mode (up to the true count + 1)")
    ap.add_argument("--null-draws", type=int, default=1, help="null data sets per step (>= 3: a z for the share too)")
    ap.add_argument("--algorithm", help="e.g. DM:100,ML:50 instead of --its DM iterations")
    ap.add_argument("--ml-noise", default="amplitude")
    ap.add_argument("--set", nargs="*", default=[], help="extra parameters of every fit, name=value")
    ap.add_argument("--judge", action="store_true", help="every step up to the true count, then stop (enough to "
                    "tell whether each rule is right: the cheapest grid run)")
    ap.add_argument("--over", action="store_true", help="over-complete, then reduce (see overcomplete)")
    ap.add_argument("--json", help="append each case's record to this file (JSON lines)")
    ap.add_argument("--ml-cap", type=float, default=1.0, help="ML: MLIteration.mode_precondition_cap of every fit "
                    "(docs/auto_modes.md, 'Session 20')")
    a = ap.parse_args()
    if a.ml_cap > 1:
        from hxn_ptycho import ml
        init = ml.MLIteration.__init__

        def ml_init(self: Any, rec: Any) -> None:
            init(self, rec)
            self.mode_precondition_cap = a.ml_cap
        ml.MLIteration.__init__ = ml_init       # type: ignore[method-assign]
    global ALGORITHM, ML_NOISE
    ALGORITHM, ML_NOISE = a.algorithm, a.ml_noise
    EXTRA.update(parse_assignments(a.set))
    for text in a.cases:
        if a.over:
            overcomplete(text, a)
            continue
        t0 = time.perf_counter()
        scan, K_true = case_scan(text, a.seed)
        fits: dict[int, Any] = {1: fit(scan, 1, a.its)}
        found, steps = None, []
        K = 1
        limit = K_true + 1 if a.judge else a.max_modes
        while K < limit:
            if a.start == "residual":
                # the chain: the K + 1 fit continues the K fit with one residual-seeded mode; its reference
                # is the K fit continued as long, so the gain is the mode's, not the extra iterations'
                if K + 1 not in fits:
                    fits[K + 1] = fit(scan, K + 1, a.its, grown_start(scan, fits[K][4], fits[K][5], a.seed_power))
                ref = fit(scan, K, a.its, (fits[K][4], fits[K][5]))
            else:
                if K + 1 not in fits:
                    fits[K + 1] = fit(scan, K + 1, a.its)
                ref = fits[K]
            d = ref[1] - fits[K + 1][1]
            d0s, s0s, nulls = [], [], []
            for r in range(a.null_draws):
                null = null_scan(scan, fits[K][2], seed=1000 + 100 * r + K)
                if a.start == "residual":        # the same chain from one mode on the null data
                    chain = [fit(null, 1, a.its)]
                    for k in range(1, K + 1):
                        chain.append(fit(null, k + 1, a.its, grown_start(null, chain[-1][4], chain[-1][5],
                                                                          a.seed_power)))
                    n_k, n_k1 = fit(null, K, a.its, (chain[K - 1][4], chain[K - 1][5])), chain[K]
                else:
                    n_k = fit(null, K, a.its)
                    n_k1 = fit(null, K + 1, a.its)
                d0s.append(n_k[1] - n_k1[1])
                s0s.append(float(n_k1[3][-1]))
                nulls.append((n_k[0], n_k1[0]))
            d0 = np.mean(d0s, axis=0)
            N = len(d)
            # the null's per-view spread: of one draw (the mean of R draws has 1/R of it)
            v0 = np.mean([x.var(ddof=1) for x in d0s]) / a.null_draws
            z = (d.mean() - d0.mean()) / np.sqrt(d.var(ddof=1) / N + v0 / N)
            s_new = float(fits[K + 1][3][-1])
            zs = (s_new - np.mean(s0s)) / np.std(s0s, ddof=1) if len(s0s) >= 3 else float("nan")
            n_err = (float(np.mean([x[0] for x in nulls])), float(np.mean([x[1] for x in nulls])))
            step = {"K": K, "err_K": ref[0], "err_K1": fits[K + 1][0], "null_err_K": n_err[0],
                    "null_err_K1": n_err[1], "gain": float(d.sum()), "null_gain": float(d0.sum()), "z": float(z),
                    "share_new": s_new, "null_share_new": float(np.mean(s0s)), "null_shares": s0s,
                    "z_share": float(zs), "shares_K1": [round(float(s), 4) for s in fits[K + 1][3]]}
            steps.append(step)
            print(f"  {text} K {K}->{K + 1}: gain {1e6 * d.sum():8.2f} null {1e6 * d0.sum():8.2f} (1e-6) z {z:6.2f}  "
                  f"share new {100 * step['share_new']:.2f} % null {'/'.join(f'{100 * x:.2f}' for x in s0s)} % z {zs:5.1f}  "
                  f"shares {'/'.join(f'{100 * s:.1f}' for s in fits[K + 1][3])}  errors {ref[0]:.6f} "
                  f"{fits[K + 1][0]:.6f} null {n_err[0]:.6f} {n_err[1]:.6f}", flush=True)
            if z <= a.alpha_z and found is None:
                found = K
                if not a.full or K >= K_true + 1:
                    break
            K += 1
        found = found or limit
        dt = time.perf_counter() - t0
        print(f"{text}: true {K_true}, found {found} {'ok' if found == K_true else 'WRONG'}  ({dt:.0f} s)", flush=True)
        append_record(a.json, {"case": text, "its": a.its, "set": a.set, "algorithm": a.algorithm, "start": a.start,
                               "alpha_z": a.alpha_z, "ml_cap": a.ml_cap, "true": K_true, "found": found,
                               "seconds": round(dt, 1), "steps": steps})


if __name__ == "__main__":
    main()
