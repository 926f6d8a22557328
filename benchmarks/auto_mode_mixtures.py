"""probe_modes=auto on probe mixtures it was not tuned on (tests/mode_mixtures.py), family × power × count.

    python benchmarks/auto_mode_mixtures.py                                  # the grid of docs/auto_modes.md
    python benchmarks/auto_mode_mixtures.py --families fly --photons 1e6 --log
    python benchmarks/auto_mode_mixtures.py --held-out                       # the held-out family (once)
    python benchmarks/auto_mode_mixtures.py --fixed --families fly --photons 1e6 --cases 1:1 3:0.08

``--fixed``: instead of ``auto``, each count 1..4 fixed for 100 iterations; prints the final data
errors and the fall from K to K + 1 in units of one mode's AIC penalty (its 2n² real parameters at
the Poisson amplitude variance 1/4: n² / (views · photons) of the normalised error).

Each scan: 64x64 frames, ``--positions`` views (a raster for 'fly', a Fermat spiral otherwise),
Poisson noise, K orthonormal modes of the family with a geometric power spectrum whose weakest
mode carries the given share (issue 18's fly mixture: 68/24/8 %). Prints, per scan: the true
count, the count found, the found shares, and the seconds; with ``--log``, every decision.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np
from mode_mixtures import FAMILIES, HELD_OUT, mixture_scan, spectrum

from hxn_ptycho.engine import reconstruct
from hxn_ptycho.params import ReconParams, parse_assignments

#: (true count, weakest mode's share): one mode, two at 30 % / 10 %, three with the weakest at 3 %
CASES = ((1, 1.0), (2, 0.3), (2, 0.1), (3, 0.03))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--held-out", action="store_true", help=f"run the held-out family '{HELD_OUT}' only")
    ap.add_argument("--photons", type=float, nargs="+", default=[1e5, 1e6, 1e8])
    ap.add_argument("--cases", nargs="+", help="K:weakest, e.g. 1:1 3:0.08 (default: CASES)")
    ap.add_argument("--positions", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--log", action="store_true", help="print the decisions of every run")
    ap.add_argument("--fixed", action="store_true", help="fixed counts 1..4 and their error gains (see above)")
    ap.add_argument("--set", nargs="*", default=[], help="extra parameters, name=value")
    a = ap.parse_args()
    extra = parse_assignments(a.set)
    cases = [(int(c.split(":")[0]), float(c.split(":")[1])) for c in a.cases] if a.cases else list(CASES)
    families = [HELD_OUT] if a.held_out else a.families
    if not a.fixed:
        print(f"{'family':>8} {'photons':>7} {'true shares %':>16} {'found':>5} {'found shares %':>24} {'s':>6}")
    right = total = 0
    for fam in families:
        fam_cases = cases + ([(3, 0.08)] if fam == "fly" and not a.cases else [])
        for ph in a.photons:
            for K, weak in fam_cases:
                shares = np.array([0.68, 0.24, 0.08]) if (fam == "fly" and K == 3 and weak == 0.08) \
                    else spectrum(K, weak)
                scan, _ = mixture_scan(fam, shares, ph, seed=a.seed, n_positions=a.positions)
                if a.fixed:
                    errs = np.array([reconstruct(scan, ReconParams.from_dict(
                        {"iterations": 100, "threads": 1, **extra, "probe_modes": k}), log=lambda m: None)
                        .attrs["final_data_error"] for k in (1, 2, 3, 4)])
                    gains = (errs[:-1] - errs[1:]) / (scan.n ** 2 / (a.positions * ph))
                    print(f"{fam:>8} {ph:>7.0e} {'/'.join(f'{100 * s:.0f}' for s in shares):>16}  errors "
                          f"{' '.join(f'{e:.6f}' for e in errs)}  gains/AIC {' '.join(f'{g:.2f}' for g in gains)}",
                          flush=True)
                    continue
                p = ReconParams.from_dict({"iterations": 20 * (K + 2) + 10, "threads": 1, **extra,
                                           "probe_modes": "auto"})
                t = time.perf_counter()
                res = reconstruct(scan, p, log=lambda m: None)
                dt = time.perf_counter() - t
                found = res.probe.shape[0]
                right += found == K
                total += 1
                print(f"{fam:>8} {ph:>7.0e} {'/'.join(f'{100 * s:.0f}' for s in shares):>16} {found:>5}"
                      f"{' ' if found == K else '!'}{'/'.join(f'{100 * s:.1f}' for s in res.probe_power_fraction):>23}"
                      f" {dt:>6.1f}", flush=True)
                if a.log:
                    for line in res.attrs["probe_modes_log"]:
                        print("        " + line)
    if not a.fixed:
        print(f"right: {right} of {total}")


if __name__ == "__main__":
    main()
