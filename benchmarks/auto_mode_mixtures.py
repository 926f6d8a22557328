"""probe_modes=auto on probe mixtures it was not tuned on (tests/mode_mixtures.py), family × power × count.

    python benchmarks/auto_mode_mixtures.py                                  # the grid of docs/auto_modes.md
    python benchmarks/auto_mode_mixtures.py --families fly --photons 1e6 --log
    python benchmarks/auto_mode_mixtures.py --held-out                       # the held-out family (once)
    python benchmarks/auto_mode_mixtures.py --fixed --families fly --photons 1e6 --cases 1:1 3:0.08
    python benchmarks/auto_mode_mixtures.py --families gsm --photons 1e6 --cases 3:0.03 \
        --set auto_rule=heldout detector_gain=1 iterations=100 --json F    # the library's held-out count

``--json F`` appends one record a scan (the count found, the true count, ``probe_modes_auto``'s evidence,
the seconds and the load); ``--summarise F`` prints the grid table of such records.

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
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np
from mode_mixtures import (FAMILIES, HELD_OUT, HELD_OUT_S22, HELD_OUT_S23, HELD_OUT_S24, HELD_OUT_S25, mixture_scan,
                           spectrum)
from records import append_record

from hxn_ptycho.engine import reconstruct
from hxn_ptycho.params import ReconParams, parse_assignments

#: (true count, weakest mode's share): one mode, two at 30 % / 10 %, three with the weakest at 3 %
CASES = ((1, 1.0), (2, 0.3), (2, 0.1), (3, 0.03))
HELD_OUTS = (HELD_OUT, HELD_OUT_S22, HELD_OUT_S23, HELD_OUT_S24, HELD_OUT_S25)


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
    ap.add_argument("--json", help="append one record a scan to this file")
    ap.add_argument("--summarise", metavar="F", help="print the grid table of the records in F and stop")
    ap.add_argument("--against", metavar="F", help="with --summarise: benchmarks/mode_over.py records to compare")
    a = ap.parse_args()
    if a.summarise:
        summarise(a.summarise, a.against)
        return
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
                append_record(a.json, {"family": fam, "photons": ph, "K": K, "weakest": weak,
                                       "shares": [round(float(x), 4) for x in shares], "found": found, "sets": a.set,
                                       "seed": a.seed, "views": a.positions,
                                       "evidence": res.attrs.get("probe_modes_auto"),
                                       "seconds": round(dt, 1), "load": os.getloadavg()[0]})
                if a.log:
                    for line in res.attrs["probe_modes_log"]:
                        print("        " + line)
    if not a.fixed:
        print(f"right: {right} of {total}")


COLUMNS = ((1, 1.0), (2, 0.3), (2, 0.1), (3, 0.03), (3, 0.08))


def case_key(family: str, photons: float, K: int, weakest: float) -> str:
    """A cell as benchmarks/mode_over.py names it (``family:photons:K:weakest``, e.g. ``fly:1e6:3:0.08``)."""
    return f"{family}:{f'{photons:.0e}'.replace('e+0', 'e')}:{K}:{weakest:g}"


def summarise(path: str, against: str | None = None) -> None:
    """The grid of the records in ``path``: a row a family and photon count, a column a mixture, the
    count found (**bold**: right; ✗: wrong), and the tallies per photon count and in all. ``against``:
    benchmarks/mode_over.py records (session 24's) whose held-out chain (``found_ho``) is shown in
    brackets where it differs, and tallied."""
    recs: dict[tuple[str, float, int, float], dict] = {}
    with open(path) as fh:
        for line in fh:
            r = json.loads(line)
            recs[(r["family"], float(r["photons"]), int(r["K"]), float(r["weakest"]))] = r
    other: dict[str, int] = {}
    if against:
        with open(against) as fh:
            for line in fh:
                o = json.loads(line)
                if "found_ho" in o and o.get("run") in (None, "grid", "s24-check", "heldout-fzp"):
                    other.setdefault(o["case"], int(o["found_ho"]))
    same = [0, 0, 0]         # cells compared, equal, right in ``against``
    heads = {(1, 1.0): "true 1: 100 %", (2, 0.3): "true 2: 70/30 %", (2, 0.1): "true 2: 90/10 %",
             (3, 0.03): "true 3: 81/16/3 %", (3, 0.08): "true 3: 68/24/8 %"}
    print("| family | photons | " + " | ".join(heads[c] for c in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    tally: dict[str, list[int]] = {}
    for fam, ph in sorted({(k[0], k[1]) for k in recs}):
        cells = []
        for K, w in COLUMNS:
            r = recs.get((fam, ph, K, w))
            if r is None:
                cells.append("")
                continue
            ok = r["found"] == r["K"]
            t = tally.setdefault(f"{fam} {ph:.0e}" if fam in HELD_OUTS else f"grid {ph:.0e}", [0, 0])
            t[0] += ok
            t[1] += 1
            o = other.get(case_key(fam, ph, K, w))
            note = f" (s24 {o})" if o is not None and o != r["found"] else ""
            if o is not None and fam not in HELD_OUTS:
                same[0] += 1
                same[1] += o == r["found"]
                same[2] += o == r["K"]
            cells.append((f"**{r['found']}**" if ok else f"{r['found']} ✗") + note)
        print(f"| {fam}{' (held out)' if fam in HELD_OUTS else ''} | {ph:.0e} | " + " | ".join(cells) + " |")
    grid = [0, 0]
    for name, (ok, n) in sorted(tally.items()):
        print(f"{name}: right {ok} of {n}")
        if name.startswith("grid"):
            grid = [grid[0] + ok, grid[1] + n]
    print(f"grid: right {grid[0]} of {grid[1]}")
    if against:
        print(f"against {against}: {same[0]} grid cells compared, the same count on {same[1]}; "
              f"right there {same[2]}")


if __name__ == "__main__":
    main()
