"""Model selection of the probe-mode count by views held out of the fit, and the residual's score
for one more mode, on the independent mixtures of tests/mode_mixtures.py (issue 18, part 2).

The measurements of docs/auto_modes.md ("Session 17: held-out views and the residual"):

    python benchmarks/auto_mode_cv.py fixed --its 100 fly:1e6:3:0.08 fly:1e6:1:1
    python benchmarks/auto_mode_cv.py fixed --its 60 --ml 40 fly:1e6:3:0.08     # then Poisson ML
    python benchmarks/auto_mode_cv.py fixed fly:1e6:3:0.08 --its 300 --counts 2 3 4
    python benchmarks/auto_mode_cv.py pixels --its 100 fly:1e6:3:0.08 fly:1e6:1:1
    python benchmarks/auto_mode_cv.py score fly:1e6:3:0.08
    python benchmarks/auto_mode_cv.py start fly:1e6:3:0.08 --its 100

A case is ``family:photons:true count:weakest share`` (``fly:1e6:3:0.08`` is issue 18's fly mixture,
68/24/8 %). Each scan: 64² frames, 100 views, seed 1, as benchmarks/auto_mode_mixtures.py.

``fixed``: for each count K, a reconstruction with K modes fitted (DM, then optionally Poisson ML) on
all views but one in eight of the interior ones; then the error Σ(|F(P·O)| − √I)² of every held-out
view. The count chosen is the first K whose (K + 1)-th mode does not lower the held-out error by
more than 2 standard errors of the paired per-view gain (t > 2). Nothing is tuned: a mode that
only fits noise cannot predict views it never saw.

``pixels``: the same with 10 % of every frame's pixels held out (a random mask per frame) instead
of views: the object stays fully determined and only photon noise is held out. The engine's mask is
one per scan, so this runs the DM Fourier step of :mod:`hxn_ptycho.dm` (same steps, same power
bound) with each frame's own mask here (:class:`FrameMaskedDM`).

``start``: DM with the true count of modes for ``--its`` iterations on all views, from the true
object and modes, from the true modes with the default (flat) object, from the true object with the
default modes, and from the default start with the extra modes at 0.1 (the default), 0.5 and 1.0
of the first mode's power (``extra_mode_power``): the spectrum and the data error each reaches.

``score``: after 20 DM iterations with one mode, the top eigenvalue and eigenvector of the residual
operator A = Σ_j O_j* F⁻¹ diag(√I_j/|F(P·O_j)| − 1) F O_j (the first-order gain of one more
incoherent mode; Lanczos, 20 steps) on the complement of the mode, over the whole window and inside
the probe's pupil; and the same quotient for the true modes (made orthogonal to the fitted one).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np
from mode_mixtures import mixture_scan, spectrum

from hxn_ptycho import dm
from hxn_ptycho.dm_iteration import DMIteration
from hxn_ptycho.engine import Reconstruction
from hxn_ptycho.ml import MLIteration
from hxn_ptycho.params import ReconParams

HOLDOUT_EVERY = 8


def holdout_views(positions: np.ndarray, seed: int = 0) -> np.ndarray:
    """One view in HOLDOUT_EVERY of the interior ones (central 80 % of the scanned range in both
    directions: the object under them is seen by other views), at random."""
    pos = np.asarray(positions, float)
    lo, hi = pos.min(axis=0), pos.max(axis=0)
    rel = (pos - lo) / np.maximum(hi - lo, 1e-9)
    inner = np.nonzero(np.all((rel >= 0.1) & (rel <= 0.9), axis=1))[0]
    held = np.zeros(len(pos), bool)
    held[np.random.default_rng(seed + 104729).choice(inner, max(2, len(pos) // HOLDOUT_EVERY), replace=False)] = True
    return held


def runs(take: np.ndarray, size: int) -> list[slice]:
    out, i = [], 0
    while i < len(take):
        if not take[i]:
            i += 1
            continue
        j = i
        while j < len(take) and take[j] and j - i < size:
            j += 1
        out.append(slice(i, j))
        i = j
    return out


def use_views(rec: Reconstruction, take: np.ndarray) -> None:
    """Every pass over the views that follows covers the views ``take`` only (ψ's rows in the given
    order: this module indexes views, frames and masks by the batches)."""
    rec.use_given_order()
    rec.scheduler.batches = runs(take, rec.plan.batch_size)


def heldout_errors(rec: Reconstruction, held: np.ndarray) -> np.ndarray:
    """Σ_good (|F(P·O)| − √I)² of each held-out view."""
    out = np.zeros(len(held))

    def batch(w: Any, b: slice) -> None:
        be, B = rec.be, b.stop - b.start
        f = be.fft2(rec.geom.exit_waves(be, rec.obj, b, rec.probe, w.objwin[:B], w.phi[:B], w.tmp[:B]))
        diff = dm._modulus(be, f) - rec.diffamp[b]
        if rec.mask is not None:
            diff *= rec.mask
        out[b] = np.sum(np.square(diff), axis=(1, 2), dtype=np.float64)
    use_views(rec, held)
    rec.scheduler.each(batch)
    use_views(rec, ~held)
    return out[held]


def case_scan(text: str, views: int = 100) -> tuple[Any, Any, int]:
    fam, ph, k, weak = text.split(":")
    K = int(k)
    shares = np.array([0.68, 0.24, 0.08]) if (fam == "fly" and K == 3 and float(weak) == 0.08) \
        else spectrum(K, float(weak))
    scan, mix = mixture_scan(fam, shares, float(ph), seed=1, n_positions=views)
    return scan, mix, K


def fit(scan: Any, K: int, its: int, ml_its: int) -> tuple[Reconstruction, np.ndarray]:
    rec = Reconstruction(scan, ReconParams(iterations=its + ml_its, probe_modes=K, threads=1), log=lambda m: None)
    held = holdout_views(rec.geom.positions_all)
    use_views(rec, ~held)
    rec._each(rec._init_psi)
    it_dm = DMIteration(rec)
    for it in range(its):
        it_dm.iterate(it)
        if (it + 1) % 10 == 0:
            rec.modes_mgr.orthogonalize()
    if ml_its:
        ml = MLIteration(rec)
        ml.model = "poisson"
        for i in range(ml_its):
            ml.iterate(its + i)
    rec.modes_mgr.orthogonalize()
    return rec, held


class FrameMaskedDM(DMIteration):
    """DM whose Fourier step uses a mask per frame (``rec.frame_mask``, True = fitted): equations
    (3), (4), (7) of :mod:`hxn_ptycho.dm` with the frame's own good pixels (numpy only; the power
    bound's deviation is the mean over the frame's good pixels, its relaxation floor as DM's)."""

    def __init__(self, rec: Any) -> None:
        rec.use_given_order()           # rows = views: the frames and their masks are indexed by the batches
        super().__init__(rec)

    def _fourier_batch(self, w: Any, b: slice) -> None:
        rec, be, B = self.rec, self.rec.be, b.stop - b.start
        psi, amp, good = rec._load(w, "psi", b), rec.diffamp[b], rec.frame_mask[b]
        phi = rec.geom.exit_waves(be, rec.obj, b, rec.probe, w.objwin[:B], w.phi[:B], w.tmp[:B])   # (2)
        work = be.fft2(dm.reflect(be, phi, psi, w.work[:B]))                         # F(2·P·O − ψ)
        w.err += dm.data_error(be, work, amp, good)                                    # (7)
        modulus = dm._modulus(be, work)
        dev = np.square((modulus - amp) * good).reshape(B, -1).sum(axis=1) / good.reshape(B, -1).sum(axis=1)
        r = dm.relaxation(np, dev, rec.pbound, self.floor_now).astype(modulus.dtype)  # (4), bound and floor
        w.relax.add(r, B, dm.relaxation(np, dev, rec.pbound) if self.floor_now > 0 else None)
        factor = amp / np.maximum(modulus, dm.TINY) * (1 - r)[:, None, None] + r[:, None, None]
        work *= np.where(good, factor, 1.0)[:, None, None]
        dm.dm_update(be, psi, phi, be.ifft2(work), rec.params.beta)                   # (3)
        self._object_sums(w, b, psi)


def pixels(a: argparse.Namespace) -> None:
    for case in a.cases:
        scan, _, K = case_scan(case)
        t0 = time.perf_counter()
        good = np.random.default_rng(5).uniform(size=scan.diffamp.shape) >= 0.1
        err = {}
        for k in a.counts:
            rec = Reconstruction(scan, ReconParams(iterations=a.its, probe_modes=k, threads=1), log=lambda m: None)
            rec.frame_mask = good              # type: ignore[attr-defined]
            it_dm = FrameMaskedDM(rec)
            for it in range(a.its):
                it_dm.iterate(it)
                if (it + 1) % 10 == 0:
                    rec.modes_mgr.orthogonalize()
            e = np.zeros(len(good))
            w = rec.scheduler.workers[0]
            for b in rec.scheduler.batches:
                B = b.stop - b.start
                f = rec.be.fft2(rec.geom.exit_waves(rec.be, rec.obj, b, rec.probe, w.objwin[:B], w.phi[:B], w.tmp[:B]))
                e[b] = np.sum(np.square((dm._modulus(rec.be, f) - rec.diffamp[b]) * ~good[b]), axis=(1, 2),
                              dtype=np.float64)
            err[k] = e
            rec.close()
        ts = [t_stat(err[k] - err[k2]) for k, k2 in zip(a.counts[:-1], a.counts[1:])]
        found = next((k for k, t in zip(a.counts[:-1], ts) if t <= 2), a.counts[-1])
        print(f"{case:>18} true {K} chosen {found} {'ok' if found == K else 'WRONG'} ({time.perf_counter() - t0:.0f} s)"
              f" | t(K→K+1) {' '.join(f'{t:.1f}' for t in ts)} | held-out pixels' errors "
              f"{' '.join(f'{err[k].sum():.0f}' for k in a.counts)}", flush=True)


def t_stat(gain: np.ndarray) -> float:
    return float(gain.mean() / (gain.std(ddof=1) / np.sqrt(len(gain))))


def fixed(a: argparse.Namespace) -> None:
    for case in a.cases:
        scan, _, K = case_scan(case)
        t0 = time.perf_counter()
        err, shares = {}, {}
        for k in a.counts:
            rec, held = fit(scan, k, a.its, a.ml)
            err[k] = heldout_errors(rec, held)
            shares[k] = "/".join(f"{100 * s:.1f}" for s in
                                 np.sum(np.abs(rec.probe) ** 2, axis=(1, 2)) / np.sum(np.abs(rec.probe) ** 2))
            rec.close()
        ts = [t_stat(err[k] - err[k2]) for k, k2 in zip(a.counts[:-1], a.counts[1:])]
        found = next((k for k, t in zip(a.counts[:-1], ts) if t <= 2), a.counts[-1])
        print(f"{case:>18} true {K} chosen {found} {'ok' if found == K else 'WRONG'} ({time.perf_counter() - t0:.0f} s)"
              f" | t(K→K+1) {' '.join(f'{t:.1f}' for t in ts)} | held-out errors "
              f"{' '.join(f'{err[k].sum():.0f}' for k in a.counts)} | shares {' '.join(shares[k] for k in a.counts)}",
              flush=True)


def lanczos_top(matvec: Any, v0: np.ndarray, steps: int) -> tuple[float, np.ndarray]:
    """Largest eigenvalue of a Hermitian operator and its Ritz vector (full reorthogonalisation)."""
    q = [v0 / np.linalg.norm(v0)]
    alpha: list[float] = []
    beta: list[float] = []
    for j in range(steps):
        w = matvec(q[j])
        alpha.append(float(np.vdot(q[j], w).real))
        for _ in range(2):
            for qi in q:
                w = w - np.vdot(qi, w) * qi
        if j == steps - 1:
            break
        beta.append(float(np.linalg.norm(w)))
        q.append(w / beta[-1])
    t = np.diag(alpha) + np.diag(beta[:len(alpha) - 1], 1) + np.diag(beta[:len(alpha) - 1], -1)
    evals, evecs = np.linalg.eigh(t)
    return float(evals[-1]), np.sum([evecs[i, -1] * q[i] for i in range(len(alpha))], axis=0)


def score(a: argparse.Namespace) -> None:
    for case in a.cases:
        scan, mix, K = case_scan(case)
        rec, held = fit(scan, 1, 20, 0)
        be, n = rec.be, rec.n
        wts = np.zeros((len(held), n, n))

        def weights(w: Any, b: slice) -> None:
            B = b.stop - b.start
            f = be.fft2(rec.geom.exit_waves(be, rec.obj, b, rec.probe, w.objwin[:B], w.phi[:B], w.tmp[:B]))
            wts[b] = rec.diffamp[b] / np.maximum(dm._modulus(be, f), 1.0) - 1
        rec.scheduler.each(weights)

        def apply(v: np.ndarray) -> np.ndarray:
            acc = np.zeros((n, n), complex)
            for b in rec.scheduler.batches:
                ow = rec.geom.gather(be, rec.obj, b, np.empty((b.stop - b.start, 1, n, n), rec.cdtype), None)
                x = np.fft.fft2(ow * v.reshape(n, n), norm="ortho") * wts[b][:, None]
                acc += np.sum(np.conj(ow) * np.fft.ifft2(x, norm="ortho"), axis=(0, 1))
            return acc.ravel()

        p = rec.probe[0].ravel().astype(complex)
        p /= np.linalg.norm(p)
        far = np.abs(np.fft.fft2(rec.probe[0], norm="ortho")) ** 2
        pupil = far > 0.01 * far.max()
        true = mix.probe.reshape(K, -1) / np.linalg.norm(mix.probe.reshape(K, -1), axis=1)[:, None]
        line = [f"{case:>18}: fitted mode's overlap with the true ones "
                f"{' '.join(f'{x:.3f}' for x in np.abs(true.conj() @ p) ** 2)}"]
        for name, inside in (("window", None), ("pupil", pupil)):
            def proj(x: np.ndarray, inside: Any = inside) -> np.ndarray:
                if inside is not None:
                    x = np.fft.ifft2(np.fft.fft2(x.reshape(n, n), norm="ortho") * inside, norm="ortho").ravel()
                return x - p * np.vdot(p, x)
            rng = np.random.default_rng(0)
            lam, v = lanczos_top(lambda x: proj(apply(proj(x))), proj(rng.standard_normal(n * n) + 0j), 20)
            v = proj(v)
            v /= np.linalg.norm(v)
            line.append(f"top eigenvalue ({name}) {lam:.3g}, its overlap with the true modes "
                        f"{' '.join(f'{x:.4f}' for x in np.abs(true.conj() @ v) ** 2)}")
        quot = []
        for m in true[1:]:
            u = m - p * np.vdot(p, m)
            u /= np.linalg.norm(u)
            quot.append(float(np.vdot(u, apply(u)).real))
        line.append(f"quotient of the true weaker modes {' '.join(f'{x:.3g}' for x in quot)}")
        print("\n    ".join(line), flush=True)
        rec.close()


def start(a: argparse.Namespace) -> None:
    from hxn_ptycho import modes
    for case in a.cases:
        scan, mix, K = case_scan(case)
        for name, emp in (("the truth", None), ("true modes, flat object", None),
                          ("true object, default modes", None), ("default start", 0.1),
                          ("extra modes at 0.5", 0.5), ("extra modes at 1.0", 1.0)):
            rec = Reconstruction(scan, ReconParams(iterations=a.its, probe_modes=K, threads=1,
                                                   extra_mode_power=emp or 0.1), log=lambda m: None)
            if "true object" in name or name == "the truth":
                power = float(np.sum(np.abs(mix.probe) ** 2) / np.sum(np.abs(rec.probe) ** 2))
                rec.obj = mix.object[None].astype(rec.cdtype)
                rec.probe = (rec.probe * np.sqrt(power)).astype(rec.cdtype)
            if "true modes" in name or name == "the truth":
                rec.probe = mix.probe.astype(rec.cdtype)
            if emp is None:
                rec._each(rec._init_psi)
            it_dm = DMIteration(rec)
            for it in range(a.its):
                err = it_dm.iterate(it if emp else it + a.its)[0]
                if (it + 1) % 10 == 0:
                    rec.modes_mgr.orthogonalize()
            rec.modes_mgr.orthogonalize()
            print(f"{case:>18} from {name:>26}: data error {err:.6f}, spectrum "
                  f"{'/'.join(f'{100 * x:.1f}' for x in modes.power_fractions(rec.probe))} %", flush=True)
            rec.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("fixed", "pixels", "score", "start"))
    ap.add_argument("cases", nargs="+", help="family:photons:true count:weakest share")
    ap.add_argument("--its", type=int, default=100, help="DM iterations of each fit")
    ap.add_argument("--ml", type=int, default=0, help="Poisson ML iterations after DM")
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 2, 3, 4])
    a = ap.parse_args()
    {"fixed": fixed, "pixels": pixels, "score": score, "start": start}[a.what](a)


if __name__ == "__main__":
    main()
