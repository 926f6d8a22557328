"""Is there a barrier between DM's fixed-count fit from our start and its fit from the truth? (issue 18,
part 2; docs/auto_modes.md, "Session 20").

Both fits (100 DM iterations, the defaults) of a mixture of tests/mode_mixtures.py; then along the
straight path between them — the object (the first fit's global scale and phase aligned to the second)
and the probe's density matrix ρ = Σ_k P_k P_k^† interpolated, the K strongest eigenmodes of ρ(t) kept —
the data error of the model at t, and after ``--relax`` DM iterations with the probe held (the object
adapts to the probe at t). A monotone fall from t = 0 to 1 says the fit from our start is not in a
separate minimum: it is slow, and a better optimiser would reach the truth's fit.

    python benchmarks/mode_path.py fly:1e6:3:0.08 gsm:1e6:2:0.3
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np
from auto_mode_cv import case_scan
from mode_fit import spectrum_text

from hxn_ptycho.dm_iteration import DMIteration
from hxn_ptycho.engine import Reconstruction
from hxn_ptycho.params import ReconParams


def fit(scan, mix, K: int, its: int, truth: bool) -> tuple[np.ndarray, np.ndarray]:
    rec = Reconstruction(scan, ReconParams(iterations=its, probe_modes=K, threads=1), log=lambda m: None)
    if truth:
        rec.obj = mix.object[None].astype(rec.cdtype)
        rec.probe = mix.probe.astype(rec.cdtype)
        rec._each(rec._init_psi)
    res = rec.run()
    rec.close()
    return np.asarray(res.object)[0].astype(np.complex128), np.asarray(res.probe).astype(np.complex128)


def modes_of(rho_factors: list[tuple[float, np.ndarray]], K: int) -> np.ndarray:
    """The K strongest eigenmodes of Σ w·P P^† (P: (m, n, n) modes), scaled by √eigenvalue."""
    B = np.concatenate([np.sqrt(w) * P.reshape(len(P), -1) for w, P in rho_factors]).T     # (n², M)
    u, s, _ = np.linalg.svd(B, full_matrices=False)
    n = int(round(np.sqrt(B.shape[0])))
    return (u[:, :K] * s[:K]).T.reshape(K, n, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--its", type=int, default=100)
    ap.add_argument("--relax", type=int, default=30)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rank", choices=("K", "2K"), default="K",
                    help="modes kept along the path: the count (K), or every mode of ρ(t) (2K: no truncation)")
    a = ap.parse_args()
    for case in a.cases:
        scan, mix, K = case_scan(case)
        o0, p0 = fit(scan, mix, K, a.its, False)
        o1, p1 = fit(scan, mix, K, a.its, True)
        c = np.vdot(o0, o1) / np.vdot(o0, o0)
        o0, p0 = o0 * c, p0 / c
        row = []
        for t in np.linspace(0, 1, a.steps + 1):
            keep = K if a.rank == "K" else 2 * K
            probe = modes_of([(1 - t, p0), (t, p1)], keep)
            rec = Reconstruction(scan, ReconParams(iterations=a.relax, probe_modes=keep, threads=1, orthogonalize_every=0),
                                 log=lambda m: None)
            rec.obj = ((1 - t) * o0 + t * o1)[None].astype(rec.cdtype)
            rec.probe = probe.astype(rec.cdtype)
            rec._each(rec._init_psi)
            e0 = rec.model_cost()[1]
            saved = DMIteration.update_probe
            DMIteration.update_probe = lambda self: None        # type: ignore[method-assign]
            try:
                e1 = float(rec.run().attrs["final_data_error"])
            finally:
                DMIteration.update_probe = saved                 # type: ignore[method-assign]
                rec.close()
            row.append(f"t {t:.2f}: {e0:.6f} → {e1:.6f} ({spectrum_text(probe)})")
            print(case, row[-1], flush=True)


if __name__ == "__main__":
    main()
