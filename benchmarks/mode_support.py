"""A diagnostic for issue 18, part 2 (docs/auto_modes.md, "Session 30"): the held-out count with every fit's probe
modes held to the pupil — their far field zero outside the bright-field disk (the frames' root-mean-square amplitude cut at
``--threshold`` of its maximum, :func:`hxn_ptycho.position_search.pupil_amplitude`, grown by ``--dilate`` pixels).

A lens forms every coherent mode of its probe through its own aperture, so every mode's far field lies inside
the pupil (widened by the source's angular size). A fit without that constraint gives each mode n² free complex
pixels, and a spurious mode fits photon noise outside the pupil too; the object fits noise as well (the kept
pixels' error of the fits ends ~23 % below the true model's, session 30). This asks whether a count whose fits
hold their modes to the pupil is right on more cells.

    python benchmarks/mode_support.py gsm:1e6:2:0.3 [more cells] [--threshold 0.3] [--dilate 2] [--json F]
    python benchmarks/mode_support.py --summarise F [--against docs/auto_modes_s27.jsonl]

Each cell (family:photons:K:weakest, seed 1, 100 views of 64², ``detector_gain=1``) is counted by
``mode_count.count_and_model`` (the rule of record, unchanged but for the projection after every iteration of
every fit: the screens, the M-mode fit and the refits); one JSON line a cell with the count, the steps' z, the
M-mode fit's shares and c (the true modes' power inside its K strongest modes' span).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np
import scipy.ndimage as ndi
from auto_mode_cv import case_scan
from mode_fit import captured
from records import append_record

from hxn_ptycho import mode_count as mc
from hxn_ptycho.params import ReconParams
from hxn_ptycho.position_search import pupil_amplitude


def pupil_support(diffamp: np.ndarray, threshold: float, dilate: int) -> np.ndarray:
    """The bright-field disk of the frames' mean amplitude (zero frequency at [0, 0]), grown by ``dilate`` px."""
    rms = np.sqrt(np.mean(np.square(np.asarray(diffamp, np.float64)), axis=0))
    inside = pupil_amplitude(rms, threshold) > 0
    if dilate:
        shifted = np.fft.fftshift(inside)
        shifted = ndi.binary_dilation(shifted, iterations=dilate)
        inside = np.fft.ifftshift(shifted)
    return inside


def project(probe: np.ndarray, support: np.ndarray) -> np.ndarray:
    """P_k ← F⁻¹(S·F(P_k)): each mode's far field outside the support set to zero."""
    f = np.fft.fft2(probe, norm="ortho")
    f *= support
    return np.fft.ifft2(f, norm="ortho").astype(probe.dtype)


FIT = mc.fit


def with_support(support: np.ndarray) -> Any:
    """``mode_count.fit`` with the probe projected on ``support`` at the start and after every iteration."""
    fit = FIT

    def fit_in_pupil(scan: Any, params: ReconParams, keep: Any = None, obj: Any = None, probe: Any = None,
                     phase: Any = None, mode_cap: float = 1.0, attach: Any = None, stop: Any = None) -> Any:
        def hook(rec: Any) -> None:
            rec.probe[...] = project(rec.be.asnumpy(rec.probe), support)
            rec._each(rec._init_psi)
            after = rec.modes_mgr.after_iteration

            def after_iteration(it: int, err: float, dm: bool, last: bool) -> None:
                after(it, err, dm, last)
                rec.probe[...] = project(rec.be.asnumpy(rec.probe), support)
            rec.modes_mgr.after_iteration = after_iteration
            if attach is not None:
                attach(rec)
        return fit(scan, params, keep, obj, probe, phase, mode_cap, hook, stop)
    return fit_in_pupil


@contextmanager
def held_to_pupil(diffamp: np.ndarray, threshold: float = 0.3, dilate: int = 2) -> Iterator[np.ndarray]:
    """Within it every ``mode_count.fit`` holds its modes to the pupil of ``diffamp`` (:func:`pupil_support`: pass
    the kept pixels' frames, as the fits see them); yields the support."""
    support = pupil_support(diffamp, threshold, dilate)
    mc.fit = with_support(support)
    try:
        yield support
    finally:
        mc.fit = FIT


def cell_name(family: str, photons: float, K: int, weakest: float) -> str:
    return f"{family}:{photons:.0e}".replace("+0", "") + f":{K}:{1 if K == 1 else f'{weakest:g}'}"


def summarise(path: str, against: str | None) -> None:
    """Right per photon row, and each cell whose count differs from the rule of record's (``against``: session
    27's records of the held-out count without the support)."""
    recs = {r["case"]: r for r in map(json.loads, Path(path).read_text().splitlines())}
    old = {}
    if against:
        for r in map(json.loads, Path(against).read_text().splitlines()):
            old[cell_name(r["family"], r["photons"], r["K"], r["weakest"])] = r["found"]
    rows: dict[str, list[int]] = {}
    for case, r in sorted(recs.items()):
        row = rows.setdefault(case.split(":")[1], [0, 0, 0])
        row[0] += r["found"] == r["true"]
        row[1] += 1
        row[2] += old.get(case) == r["true"]
        if case in old and old[case] != r["found"]:
            print(f"{case:22s} true {r['true']}  without support {old[case]}  with {r['found']}"
                  f"  z {', '.join(f'{z:.1f}' for z in r['z'])}")
    for ph, (right, n, was) in sorted(rows.items()):
        print(f"{ph}: right {right} of {n} (without the support: {was})")
    print(f"all: right {sum(r[0] for r in rows.values())} of {sum(r[1] for r in rows.values())} "
          f"(without the support: {sum(r[2] for r in rows.values())})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--summarise", default=None, help="print the table of a records file")
    ap.add_argument("--against", default=None, help="with --summarise: the records without the support")
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--dilate", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.summarise:
        summarise(a.summarise, a.against)
        return
    for case in a.cases:
        scan, mix, K = case_scan(case)
        t0 = time.perf_counter()
        with held_to_pupil(mc.holdout_split(scan, mc.RULE.holdout, mc.RULE.seed)[0].diffamp, a.threshold,
                           a.dilate) as support:        # from the kept pixels only, as the fits see them
            ev, model = mc.count_and_model(scan, ReconParams(probe_modes="auto", auto_rule="heldout", detector_gain=1,
                                                             iterations=100), log_fn=lambda m: None)
        rec = {"case": case, "true": K, "found": ev["found"], "threshold": a.threshold, "dilate": a.dilate,
               "support_px": int(support.sum()),
               "z": [c.get("z") for c in ev["chain"][1:]], "fit_shares": ev["fit_shares"],
               "start_chosen": ev["start_chosen"], "c_model": round(captured(model.probe, mix.probe), 4),
               "seconds": round(time.perf_counter() - t0, 1), "load": round(os.getloadavg()[0], 2)}
        print(json.dumps(rec), flush=True)
        append_record(a.json, rec)


if __name__ == "__main__":
    main()
