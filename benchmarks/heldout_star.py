"""The held-out count on real data: the shared Siemens star (APS, 516 views of 128²), counted on its 100
central views, then all 516 views reconstructed from the count's model laid on their canvas, against the
engine's own start with the same count (docs/auto_modes.md, "Session 28"). One JSON line.

    python benchmarks/heldout_star.py ../shared/data/siemens-star-small/siemens-star-small.npz.bz2 [--iterations 100]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from hxn_ptycho.datasets import siemens_star
from hxn_ptycho.engine import reconstruct
from hxn_ptycho.params import ReconParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("star")
    ap.add_argument("--iterations", type=int, default=100)
    a = ap.parse_args()
    scan = siemens_star(a.star)
    p = ReconParams(probe_modes="auto", auto_rule="heldout", iterations=a.iterations, threads=1)
    t = time.perf_counter()
    counted = reconstruct(scan, p, log=lambda m: None)
    seconds = time.perf_counter() - t
    ev = counted.attrs["probe_modes_auto"]
    own = reconstruct(scan, replace(p, probe_modes=int(ev["found"])), log=lambda m: None)
    print(json.dumps({"views": scan.n_views, "n": scan.n, "found": ev["found"], "at_cap": ev.get("at_cap"),
                      "workers": ev.get("workers"), "views_counted": ev["views_counted"],
                      "z": [c.get("z") for c in ev["chain"]], "fit_shares": ev["fit_shares"],
                      "start_chosen": ev["start_chosen"], "count_seconds": ev["seconds"], "seconds": round(seconds, 1),
                      "error_from_count": counted.attrs["final_data_error"],
                      "error_engine_start": own.attrs["final_data_error"], "iterations": a.iterations}))


if __name__ == "__main__":
    main()
