"""One held-out count of the issue's fly 68/24/8 mixture (10⁶ photons, 100 views) on frames larger than the
grid's 64² (docs/auto_modes.md, "Session 28"): its seconds, the count and the steps' z, one JSON line a size.

    python benchmarks/heldout_cost.py 128 [256]
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import numpy as np
from mode_mixtures import mixture_scan

from hxn_ptycho import mode_count
from hxn_ptycho.params import ReconParams

for n in [int(a) for a in sys.argv[1:]] or [128]:
    scan, _ = mixture_scan("fly", np.array([0.68, 0.24, 0.08]), 1e6, seed=1, n=n, n_positions=100)
    t = time.perf_counter()
    ev, m = mode_count.count_and_model(scan, ReconParams(probe_modes="auto", auto_rule="heldout", detector_gain=1.0,
                                                         threads=1), log_fn=print)
    print(json.dumps({"n": n, "views": 100, "found": ev["found"], "seconds": round(time.perf_counter() - t, 1),
                      "z": [c.get("z") for c in ev["chain"]], "fit_shares": ev["fit_shares"]}), flush=True)
