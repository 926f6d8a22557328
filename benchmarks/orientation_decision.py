"""Cost (s) and margin of the orientation decision on the independent simulator's scans.

    python benchmarks/orientation_decision.py [--positions 100] [--frame 64] [--seeds 0 1 2]

For every case (fly2dpd/eiger2, fermat/eiger1 with both Eiger sign conventions and both
``start['motors']`` orders, FlyPlan2D/merlin1) the documents go through the collector and the
export with no beamline options; printed: the stage-frame class chosen, whether it is the one the
simulator used (its frames equal this project's stage-frame model of the truth), the margin of
the best twin pair over the next pair, the twin's own trial error ratio, and the decision's cost.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import hxn_indep_sim as ind

from hxn_ptycho.callbacks.export import ExportConfig, build_scan

CASES = [("fly2dpd", "holoptycho", "xy", "identity,x+,y+"), ("fermat", "holoptycho", "xy", "identity,x+,y+"),
         ("fermat", "holoptycho", "yx", "identity,x+,y+"), ("fermat", "ptycho_gui", "xy", "fliplr,x+,y+"),
         ("fermat", "ptycho_gui", "yx", "fliplr,x+,y+"), ("FlyPlan2D", "ptycho_gui", "xy", "fliplr,x+,y+")]


def collected(scan: ind.IndepScan):
    from event_model import RunRouter

    from hxn_ptycho.callbacks.collector import RunCollector
    got: list = []
    ind.emit(scan, RunRouter([lambda name, start: ([RunCollector(start, got.append)], [])]))
    return got[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=100)
    ap.add_argument("--frame", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = ap.parse_args()
    print(f"{'case':34s} {'seed':>4s} {'chosen':16s} {'right':5s} {'margin':>8s} {'cost s':>7s} {'export s':>8s}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, signs, order, expected in CASES:
            for seed in a.seeds:
                sim = ind.simulate(kind, Path(tmp) / f"{kind}{signs}{order}{seed}", n_positions=a.positions,
                                   frame_size=a.frame, eiger_signs=signs, motor_order=order, seed=seed)
                run = collected(sim)
                t0 = time.perf_counter()
                scan = build_scan(run, ExportConfig(crop=a.frame))
                total = time.perf_counter() - t0
                r = json.loads(scan.attrs["orientation_report"])
                case = f"{kind}/{sim.detector} {signs} {order}"
                print(f"{case:34s} {seed:4d} {r['chosen']:16s} {str(r['chosen'] == expected):5s} "
                      f"{r['margin']:8.2f} {r['cost_s']:7.2f} {total:8.2f}", flush=True)


if __name__ == "__main__":
    main()
