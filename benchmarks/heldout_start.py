"""The reconstruction after ``probe_modes=auto, auto_rule=heldout``: started from the count's model against
the engine's own start with the same count, and against the start from the true modes (docs/auto_modes.md,
"Session 27").

    python benchmarks/heldout_start.py defocus:1e6:2:0.3 fly:1e6:3:0.08 --iterations 100 --json F

A case is ``family:photons:true count:weakest share`` as in benchmarks/auto_mode_cv.py (64² frames, 100
views, seed 1). Each arm reconstructs with the user's defaults (DM, ``--iterations``) and the count found;
printed per arm: the final data error (all pixels), c_K (the share of the true modes' power inside the span
of the fitted modes) and the fitted shares. ``--json F`` appends one record a case.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np
from auto_mode_cv import case_scan
from mode_fit import captured
from records import append_record

from hxn_ptycho import modes
from hxn_ptycho.engine import Reconstruction, reconstruct
from hxn_ptycho.params import ReconParams


def arm(res, truth: np.ndarray, K: int) -> dict:
    pr = modes.orthogonalize(np.asarray(res.probe))[0]
    return {"error": float(res.attrs["final_data_error"]), "c_K": round(captured(pr[:min(len(pr), K)], truth), 4),
            "shares": [round(float(s), 3) for s in modes.power_fractions(pr)]}


def run_case(case: str, iterations: int) -> dict:
    scan, mix, K = case_scan(case)
    quiet = {"log": lambda m: None}
    p = ReconParams(probe_modes="auto", auto_rule="heldout", detector_gain=1.0, threads=1, iterations=iterations)
    t = time.perf_counter()
    counted = reconstruct(scan, p, **quiet)
    seconds = time.perf_counter() - t
    ev = counted.attrs["probe_modes_auto"]
    k = int(ev["found"])
    fixed = replace(p, probe_modes=k)
    out = {"case": case, "K": K, "found": k, "start_chosen": ev["start_chosen"], "iterations": iterations,
           "count": arm(counted, mix.probe, K), "default": arm(reconstruct(scan, fixed, **quiet), mix.probe, K),
           "seconds": round(seconds, 1), "load": os.getloadavg()[0]}
    if k == K:
        rec = Reconstruction(scan, fixed, **quiet)
        rec.obj = np.broadcast_to(mix.object[None], rec.obj.shape).astype(rec.cdtype)
        rec.probe = mix.probe.astype(rec.cdtype)
        rec._each(rec._init_psi)
        out["truth"] = arm(rec.run(), mix.probe, K)
        rec.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--json")
    a = ap.parse_args()
    for case in a.cases:
        r = run_case(case, a.iterations)
        line = f"{case}: true {r['K']}, found {r['found']} (start x{r['start_chosen']:g}); " + "; ".join(
            f"{name} {r[name]['error']:.4g}, c_K {r[name]['c_K']:.3f}, shares "
            + "/".join(f"{100 * s:.1f}" for s in r[name]["shares"])
            for name in ("default", "count", "truth") if name in r)
        print(line, flush=True)
        append_record(a.json, r)


if __name__ == "__main__":
    main()
