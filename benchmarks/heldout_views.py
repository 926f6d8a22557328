"""The held-out count of a scan larger than the rule was measured on (100 views): counted on its 100 views
nearest the centre (``HeldOutCount.max_views``, the library's default) against counted on every view (the
rule before session 28), and the reconstruction of the whole scan from each count's model against the
engine's own start (docs/auto_modes.md, "Session 28").

    python benchmarks/heldout_views.py fly:1e6:3:0.08 gsm:1e6:2:0.1 --views 400 --json F

A case is ``family:photons:true count:weakest share`` as in benchmarks/auto_mode_cv.py (64² frames, seed 1),
here with ``--views`` positions (the same family's pattern, larger). Each arm reconstructs the whole scan
with the user's defaults (DM, ``--iterations``) and the count found; printed per arm: the count, the steps'
z, the count's seconds, the final data error (all pixels), c_K (the share of the true modes' power inside the
span of the fitted modes). ``--json F`` appends one record a case.
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

from auto_mode_cv import case_scan
from heldout_start import arm
from records import append_record

from hxn_ptycho import mode_count
from hxn_ptycho.engine import reconstruct
from hxn_ptycho.params import ReconParams


def counted(scan, p: ReconParams, most: int, truth, K: int) -> dict:
    rule = mode_count.RULE
    mode_count.RULE = replace(rule, max_views=most)
    try:
        t = time.perf_counter()
        res = reconstruct(scan, p, log=lambda m: None)
        seconds = time.perf_counter() - t
    finally:
        mode_count.RULE = rule
    ev = res.attrs["probe_modes_auto"]
    return {"found": int(ev["found"]), "views_counted": ev["views_counted"], "start_chosen": ev["start_chosen"],
            "z": [c["z"] for c in ev["chain"][1:]], "count_seconds": ev["seconds"], "seconds": round(seconds, 1),
            **arm(res, truth, K)}


def run_case(case: str, views: int, iterations: int) -> dict:
    scan, mix, K = case_scan(case, views)
    p = ReconParams(probe_modes="auto", auto_rule="heldout", detector_gain=1.0, threads=1, iterations=iterations)
    out = {"case": case, "K": K, "views": views, "iterations": iterations,
           "central": counted(scan, p, mode_count.RULE.max_views, mix.probe, K),
           "whole": counted(scan, p, views, mix.probe, K)}
    fixed = replace(p, probe_modes=out["central"]["found"])
    out["default"] = arm(reconstruct(scan, fixed, log=lambda m: None), mix.probe, K)
    out["load"] = os.getloadavg()[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--views", type=int, default=400)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--json")
    a = ap.parse_args()
    for case in a.cases:
        r = run_case(case, a.views, a.iterations)
        print(f"{case} ({a.views} views): true {r['K']}; " + "; ".join(
            f"{name}: found {r[name]['found']} on {r[name]['views_counted']} views (z "
            + ", ".join(f"{z:.1f}" for z in r[name]["z"]) + f"), {r[name]['count_seconds']:.0f} s, "
            f"error {r[name]['error']:.4g}, c_K {r[name]['c_K']:.3f}" for name in ("central", "whole"))
            + f"; engine's start {r['default']['error']:.4g}, c_K {r['default']['c_K']:.3f}", flush=True)
        append_record(a.json, r)


if __name__ == "__main__":
    main()
