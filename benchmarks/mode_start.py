"""How the fixed-count multi-mode DM fit depends on its start (issue 18, part 2; docs/auto_modes.md,
"Session 17: the fixed-count fit").

Each run: the engine's own loop (``Reconstruction.run``: DM, orthogonalisation every 10 iterations,
defaults otherwise) with the true count of modes on a mixture of tests/mode_mixtures.py (64² frames,
100 views, seed 1), from one start; it prints the final data error and the power spectrum.

    python benchmarks/mode_start.py fly:1e6:3:0.08 --start truth          # the target
    python benchmarks/mode_start.py fly:1e6:3:0.08                        # the default start
    python benchmarks/mode_start.py fly:1e6:3:0.08 --set extra_mode_power=0.3 --set probe_reg=1e-5
    python benchmarks/mode_start.py fly:1e6:3:0.08 --orders 0,1 0,2 --set extra_mode_power=0.3
    python benchmarks/mode_start.py fly:1e6:3:0.08 --start reseed --at 20 --set extra_mode_power=0.3
    python benchmarks/mode_start.py fly:1e6:3:0.08 --start over --extra 3 --at 60 --set extra_mode_power=0.3
    python benchmarks/mode_start.py fly:1e6:3:0.08 --scan-kind fly2dpd        # the library's motion start
    python benchmarks/mode_start.py gsm:1e6:3:0.03 --set "probe_modes_init='motion'"

Starts: ``default`` (the library's); ``truth`` (the true object and modes); ``reseed`` (one mode
until ``--at``, then the extra modes made from the derivatives of the mode fitted so far);
``over`` (``--extra`` more modes than the count until ``--at``, then the strongest K are kept).
``--orders`` replaces the derivative orders (row, column) of the extra modes' shapes
(``modes.diverse_modes``; default (0,1), (1,0), (1,1), …), each at ``extra_mode_power / k``.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np
from auto_mode_cv import case_scan

from hxn_ptycho import modes
from hxn_ptycho.engine import Reconstruction
from hxn_ptycho.params import ReconParams

ORDERS: list[tuple[int, int]] = []


def derivative_modes(orders: list[tuple[int, int]]) -> Any:
    """A ``diverse_modes`` replacement: the given derivative orders of p0, orthogonalised, the k-th
    at ``power / k`` of p0's power (no noise)."""
    def make(p0: np.ndarray, count: int, power: float, rng: np.random.Generator) -> np.ndarray:
        base, out = [p0.astype(np.complex128)], []
        p0_power = float(np.vdot(p0, p0).real)
        for k in range(count):
            c = modes._derivative(p0.astype(np.complex128), orders[k % len(orders)])
            for b in base:
                c = c - np.vdot(b, c) / np.vdot(b, b) * b
            c = c / np.linalg.norm(c) * np.sqrt(p0_power * power / (k + 1))
            base.append(c)
            out.append(c)
        return np.asarray(out, p0.dtype)
    return make


def run(case: str, its: int, start: str, at: int, extra: int, sets: dict[str, Any], scan_kind: str | None) -> None:
    scan, mix, K = case_scan(case)
    if scan_kind:
        scan.attrs["scan_kind"] = scan_kind     # what an exported fly scan's file says (probe_modes_init auto)
    t0 = time.perf_counter()
    p = ReconParams(iterations=its, probe_modes=K, threads=1, **sets)
    rec = Reconstruction(scan, p, log=lambda m: None)
    mgr = rec.modes_mgr
    if start == "truth":
        rec.obj = mix.object[None].astype(rec.cdtype)
        rec.probe = mix.probe.astype(rec.cdtype)
        rec._each(rec._init_psi)
    elif start in ("reseed", "over"):
        count = 1 if start == "reseed" else K + extra
        probe = rec.be.asnumpy(rec.probe)
        mgr.resize(1)
        if count > 1:
            mgr.resize(count, modes.diverse_modes(probe[0], count - 1, p.extra_mode_power, np.random.default_rng(p.seed)))
        orig = mgr.after_iteration

        def after(it: int, err: float, dm: bool, last: bool) -> None:
            orig(it, err, dm, last)
            if it == at - 1:
                mgr.orthogonalize()
                if start == "over":
                    mgr.resize(K)
                else:
                    p0 = rec.be.asnumpy(rec.probe)[0]
                    mgr.resize(K, modes.diverse_modes(p0, K - 1, p.extra_mode_power,
                                                      np.random.default_rng(p.seed + it)))
        mgr.after_iteration = after         # type: ignore[method-assign]
    res = rec.run()
    sp = modes.power_fractions(np.asarray(res.probe))
    shapes = f" orders {ORDERS}" if ORDERS else ""
    kind = f" scan_kind {scan_kind}" if scan_kind else ""
    print(f"{case} start {start}{shapes}{kind} {sets}: data error {res.attrs['final_data_error']:.6f}, spectrum "
          f"{'/'.join(f'{100 * x:.1f}' for x in sp)} % ({time.perf_counter() - t0:.0f} s)", flush=True)
    rec.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+", help="family:photons:true count:weakest share")
    ap.add_argument("--its", type=int, default=100)
    ap.add_argument("--start", choices=("default", "truth", "reseed", "over"), default="default")
    ap.add_argument("--at", type=int, default=20, help="iteration of the reseed / truncation")
    ap.add_argument("--extra", type=int, default=3, help="'over': modes beyond the count until --at")
    ap.add_argument("--orders", nargs="+", default=None, help="derivative orders row,col of the extra modes")
    ap.add_argument("--scan-kind", default=None, help="the scan file's scan_kind attribute (e.g. fly2dpd)")
    ap.add_argument("--set", action="append", default=[], help="a parameter, key=value")
    a = ap.parse_args()
    if a.orders:
        ORDERS[:] = [(int(o.split(",")[0]), int(o.split(",")[1])) for o in a.orders]
        modes.diverse_modes = derivative_modes(ORDERS)
    sets = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in a.set)}
    for case in a.cases:
        run(case, a.its, a.start, a.at, a.extra, sets, a.scan_kind)


if __name__ == "__main__":
    main()
