"""The held-out count with its fits one at a time and several at a time (threads; docs/auto_modes.md,
"Session 29"): the seconds of each, whether the count, every held-out error and z and the model are the same
bit for bit, and, where the cell has one, whether its evidence equals the grid's record (session 27), one
JSON line a cell and setting, interleaved (1, N, 1, N ... on the same machine, one process).

    python benchmarks/heldout_workers.py fly:1e6:2:0.1 gsm:1e6:3:0.03 [--workers 1 2] [--rounds 1]
        [--record docs/auto_modes_s27.jsonl] [--json FILE]
"""
import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import numpy as np
from auto_mode_cv import case_scan
from records import append_record

from hxn_ptycho import mode_count
from hxn_ptycho.backend import available_cores
from hxn_ptycho.params import ReconParams


def facts(ev: dict) -> str:
    """The evidence less what may differ between two runs of one count: seconds and the workers."""
    out = {k: v for k, v in ev.items() if k not in ("seconds", "workers")}
    out["starts"] = [{k: v for k, v in s.items() if k != "seconds"} for s in ev["starts"]]
    return json.dumps(out, sort_keys=True)


def recorded(path: str, text: str) -> dict | None:
    fam, ph, k, weak = text.split(":")
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if (r.get("family"), float(r.get("photons", 0)), int(r.get("K", 0))) == (fam, float(ph), int(k)) \
                and abs(float(r.get("weakest", -1)) - float(weak if int(k) > 1 else 1.0)) < 1e-9:
            return r.get("evidence")
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cells", nargs="+", help="family:photons:K:weakest, as benchmarks/auto_mode_cv.py")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--record", default="docs/auto_modes_s27.jsonl")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    params = ReconParams(probe_modes="auto", auto_rule="heldout", detector_gain=1.0, iterations=100)
    for text in a.cells:
        scan, _mix, K = case_scan(text)
        ref = recorded(a.record, text) if a.record and Path(a.record).exists() else None
        first = None
        for rnd in range(a.rounds):
            for w in a.workers:
                t = time.perf_counter()
                ev, model = mode_count.count_and_model(scan, params, replace(mode_count.RULE, workers=w),
                                                       log_fn=lambda m: None)
                row = {"cell": text, "true": K, "round": rnd, "workers": w, "found": ev["found"],
                       "seconds": round(time.perf_counter() - t, 1), "cores": available_cores(),
                       "load": round(os.getloadavg()[0], 2), "z": [c.get("z") for c in ev["chain"]]}
                if first is None:
                    first = (facts(ev), model)
                row["same_as_first"] = facts(ev) == first[0] and np.array_equal(model.object, first[1].object) \
                    and np.array_equal(model.probe, first[1].probe)
                if ref is not None:
                    row["same_as_record"] = facts(ev) == facts({**ref, "views_counted": ev["views_counted"],
                                                                "views_total": ev["views_total"],
                                                                "at_cap": ev["at_cap"]})
                print(json.dumps(row), flush=True)
                append_record(a.json, row)


if __name__ == "__main__":
    main()
