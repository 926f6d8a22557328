"""probe_modes=auto against the true number of modes, on simulated partially coherent beams.

    python benchmarks/auto_modes.py                       # 1, 2, 3, 5 true modes; "trend" vs fixed
    python benchmarks/auto_modes.py --rules holdout power prune gain --photons 1e5 --seeds 4 5

Each scan: 64x64 frames, 120 views on a Fermat spiral, Poisson noise at ``--photons`` counts a
frame, K orthogonal probe modes with the decreasing powers of POWERS (a partially coherent beam:
each further mode weaker). Prints, per scan and rule: the modes found, the final data error
Σ(|F(P·O)| − √I)²/ΣI, the seconds, and the same for DM with the true number of modes fixed.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from hxn_ptycho.engine import reconstruct
from hxn_ptycho.params import ReconParams, parse_assignments
from hxn_ptycho.simulate import simulate_scan

POWERS = {1: None, 2: (0.7, 0.3), 3: (0.6, 0.25, 0.15), 5: (0.45, 0.22, 0.15, 0.1, 0.08)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", type=int, nargs="+", default=[1, 2, 3, 5], choices=sorted(POWERS))
    ap.add_argument("--rules", nargs="+", default=["trend"])
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--photons", type=float, default=1e6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[4])
    ap.add_argument("--positions", type=int, default=120)
    ap.add_argument("--powers", help="mode powers of one scan instead of POWERS, e.g. 0.52,0.26,0.13,0.06,0.03")
    ap.add_argument("--no-fixed", action="store_true", help="skip the fixed-mode runs")
    ap.add_argument("--log", action="store_true", help="print the decisions of every auto run")
    ap.add_argument("--set", nargs="*", default=[], help="extra parameters, name=value")
    a = ap.parse_args()
    extra = parse_assignments(a.set)
    print(f"{'true':>4} {'seed':>4} {'run':>14} {'found':>5} {'data error':>11} {'seconds':>8}")
    powers = dict(POWERS)
    if a.powers:
        w = tuple(float(x) for x in a.powers.split(","))
        powers, a.modes = {len(w): w}, [len(w)]
    for seed in a.seeds:
        for K in a.modes:
            scan, _ = simulate_scan(n=64, n_positions=a.positions, probe_modes=K, photons=a.photons, seed=seed,
                                    mode_powers=powers[K])
            base = ReconParams.from_dict({"iterations": a.iterations, "threads": 1, **extra})
            runs = [(f"auto {r}", base.replace(probe_modes="auto", auto_rule=r)) for r in a.rules]
            if not a.no_fixed:
                runs.append((f"fixed {K}", base.replace(probe_modes=K)))
            for name, p in runs:
                t = time.perf_counter()
                res = reconstruct(scan, p, log=lambda m: None)
                dt = time.perf_counter() - t
                print(f"{K:>4} {seed:>4} {name:>14} {res.probe.shape[0]:>5} "
                      f"{res.attrs['final_data_error']:>11.5f} {dt:>8.1f}", flush=True)
                if a.log and name.startswith("auto"):
                    for line in res.attrs["probe_modes_log"]:
                        print("        " + line)


if __name__ == "__main__":
    main()
