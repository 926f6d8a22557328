"""Issue 18 part 2, session 32: probes of the held-out count's M-mode fit (docs/auto_modes.md, "Session 32", section 3).

Each probe starts from a grid cell (``family:photons:K:weakest``, :func:`auto_mode_cv.case_scan`) and the rule of
record's held-out pixels; all but ``trajectory`` and ``modes`` read the cell's cached M-mode fit
(``benchmarks/mode_rho.py --cells CELL`` makes it). Each prints one line per step with the kept and held-out errors
(:func:`mode_rho.errors`), the captured share of the true modes' power and the fitted shares.

    python benchmarks/mode_fit_probes.py trajectory gsm:1e6:3:0.03      # the rule's fit every 20 iterations
    python benchmarks/mode_fit_probes.py modes gsm:1e6:3:0.03 --M 12     # the over-complete fit with M modes
    python benchmarks/mode_fit_probes.py union gsm:1e6:3:0.03 --its 200  # ρ in the span of the fit and its continuation
    python benchmarks/mode_fit_probes.py reset gsm:1e6:3:0.03            # the object reset to flat, then joint ML
    python benchmarks/mode_fit_probes.py crossfit fly:1e6:2:0.1 --start truth   # object and modes on different pixels
    python benchmarks/mode_fit_probes.py truncate gsm:1e8:3:0.03 --M 3 --its 500  # the fit's 3 strongest + weak extras
    python benchmarks/mode_fit_probes.py coarse gsm:1e8:3:0.03         # the fit at 32², then 64² from its modes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import mode_rho as mr
from auto_mode_cv import case_scan
from mode_fit import captured, per_mode_capture

from hxn_ptycho import ml, mode_count, modes
from hxn_ptycho.params import ReconParams


def line(tag: str, scan: Any, keep: np.ndarray, mix: Any, obj: np.ndarray, probe: np.ndarray,
         rho: bool = False) -> dict[str, Any]:
    """One step's figures (the modes orthogonalised first); with ``rho`` also the held-out ρ count (session 31)."""
    probe = modes.orthogonalize(probe)[0]
    out: dict[str, Any] = {**mr.errors(scan, keep, obj, probe), "captured": captured(probe, mix.probe),
                           "shares": [float(x) for x in modes.power_fractions(probe)]}
    text = (f"{tag}: kept {out['kept']:.1f} held-out {out['held_out']:.1f} c {out['captured']:.5f} fit % "
            + "/".join(f"{100 * x:.1f}" for x in out["shares"]))
    if rho:
        out["rho"] = mr.held_out_rho(scan, keep, obj, probe)
        text += f"  held-out rho {out['rho']['found']}: " + "/".join(f"{100 * x:.1f}" for x in out["rho"]["eigen_share"])
    print(text, flush=True)
    return out


def trajectory(text: str, every: int = 20) -> None:
    """The rule of record's M-mode fit (its starts screened, its schedule) with a snapshot every ``every``
    iterations; the held-out ρ count at every 100th."""
    scan, mix, K = case_scan(text)
    how = mode_count.RULE
    kept, keep = mode_count.holdout_split(scan, how.holdout, how.seed)
    snaps: list[tuple[int, np.ndarray, np.ndarray]] = []
    fit = mode_count.fit

    def watched(scan_: Any, p: ReconParams, keep_: Any = None, obj: Any = None, probe: Any = None,
                phase: Any = None, mode_cap: float = 1.0, attach: Any = None, stop: Any = None) -> Any:
        def hook(rec: Any) -> None:
            after = rec.modes_mgr.after_iteration

            def after_iteration(it: int, err: float, dm: bool, last: bool) -> None:
                after(it, err, dm, last)
                if (it + 1) % every == 0 or last:
                    snaps.append((it + 1, np.array(rec.be.asnumpy(rec.obj)), np.array(rec.be.asnumpy(rec.probe))))
            rec.modes_mgr.after_iteration = after_iteration
        return fit(scan_, p, keep_, obj, probe, phase, mode_cap, hook if p.algorithm == how.schedule else attach, stop)
    mode_count.fit = watched
    try:
        params = mr.count_params()
        mode_count.overcomplete_fit(scan, kept, keep, params, how, how.fit_modes, 2, print)
    finally:
        mode_count.fit = fit
    line(f"{text} truth", scan, keep, mix, mix.object[None], mix.probe)
    for it, o, p in snaps:
        line(f"{text} iteration {it}", scan, keep, mix, o, p, rho=it % 100 == 0)


def more_modes(text: str, M: int) -> None:
    """The rule of record's over-complete fit with ``M`` modes instead of its six."""
    scan, mix, K = case_scan(text)
    how = mode_count.RULE
    kept, keep = mode_count.holdout_split(scan, how.holdout, how.seed)
    params = mr.count_params()
    over = mode_count.overcomplete_fit(scan, kept, keep, params, how, M, 2, lambda m: None)
    line(f"{text} M {M}", scan, keep, mix, over.obj, over.probe)
    print("true modes inside its span " + "/".join(f"{100 * c:.2f}" for c in per_mode_capture(over.probe, mix.probe))
          + " %", flush=True)


def union(text: str, cache: Path, its: int) -> None:
    """ρ on the held-out pixels in the span of the cached fit's modes and of the same fit continued ``its`` ML
    iterations (the direction it travels), with the continued fit's object."""
    scan, mix, K, kept, keep, obj0, p0 = mr.cached_cell(text, cache)
    obj1, p1, _e = mode_count.fit(kept, mr.ml_params(len(p0), its), keep, obj0, p0, mode_cap=mode_count.RULE.mode_cap)
    line(f"{text} continued {its}", scan, keep, mix, obj1, p1, rho=True)
    a = np.concatenate([p0.reshape(len(p0), -1), p1.reshape(len(p1), -1)]).astype(np.complex128)
    _u, s, vh = np.linalg.svd(a, full_matrices=False)
    scale = np.sqrt(np.mean(np.sum(np.abs(p0) ** 2, axis=(1, 2))))
    basis = (vh[s > 1e-3 * s[0]] * scale).reshape(-1, *p0.shape[1:])
    d = mr.held_out_rho(scan, keep, obj1, basis, weights=p1)
    print(f"{text} the union span ({len(basis)} directions, c {captured(basis, mix.probe):.5f}): held-out rho "
          f"{d['found']}: " + "/".join(f"{100 * x:.1f}" for x in d["eigen_share"]), flush=True)


def reset(text: str, cache: Path, obj_its: int, rounds: int) -> None:
    """The cached fit's object replaced by a flat one, refitted for ``obj_its`` ML iterations with the modes held,
    then ``rounds`` × 100 joint ML iterations."""
    scan, mix, K, kept, keep, obj, probe = mr.cached_cell(text, cache)
    line(f"{text} the fit", scan, keep, mix, obj, probe, rho=True)
    obj = mr.object_fit(kept, keep, np.ones_like(obj), probe, obj_its)
    line(f"{text} object from flat, {obj_its} ML", scan, keep, mix, obj, probe, rho=True)
    for r in range(rounds):
        obj, probe, _e = mode_count.fit(kept, mr.ml_params(len(probe), 100), keep, obj, probe,
                                        mode_cap=mode_count.RULE.mode_cap)
        line(f"{text} +{100 * (r + 1)} joint ML", scan, keep, mix, obj, probe, rho=True)


def truncate(text: str, cache: Path, k: int, its: int) -> None:
    """The cached fit's ``k`` strongest modes and its object, the other M − k modes replaced by weak ones (orthogonal
    to them, 10⁻³ of the first's power, as ``--from-truth`` pads the truth), then ``its`` ML iterations of the M-mode
    fit: does a start without the split pieces reach the truth's basin?"""
    scan, mix, K, kept, keep, obj, probe = mr.cached_cell(text, cache)
    from mode_over import padded
    M = len(probe)
    start = padded(probe[:k], M, 1e-3).astype(np.complex64)
    how = mode_count.RULE
    obj, probe, _e = mode_count.fit(kept, mr.ml_params(M, its, extra_mode_power=how.extra_mode_power), keep, obj,
                                    start, mode_cap=how.mode_cap)
    line(f"{text} the fit's {k} strongest + weak extras, +{its} ML", scan, keep, mix, obj, probe, rho=True)


def coarse(text: str, cache: Path, f: int, its: int) -> None:
    """Coarse to fine: the rule's M-mode fit (its starts screened, its schedule) on the scan at 1/``f`` of the
    resolution (the central n/f of every frame's far field, which holds the pupil; the held-out pixels cropped
    alike, :func:`position_search.crop_far_field`), its modes brought back to n² by zero-padding their far
    fields, then the full scan's M-mode fit (the rule's schedule, or ``its`` ML iterations) from them and a flat
    object. Compared with the rule's fit and the truth."""
    from dataclasses import replace
    from functools import partial

    from hxn_ptycho.position_search import crop_far_field
    scan, mix, K, kept, keep, obj0, p0 = mr.cached_cell(text, cache)
    how = mode_count.RULE
    n = scan.n
    m, o = n // f, (n - n // f) // 2
    crop = partial(crop_far_field, f=f)
    lo = replace(scan, diffamp=crop(scan.diffamp), mask=None if scan.mask is None else crop(scan.mask))
    keep_lo = crop(keep)
    params = mr.count_params()
    over = mode_count.overcomplete_fit(lo, mode_count.kept_only(lo, keep_lo), keep_lo, params, how, len(p0), 2,
                                       lambda msg: None)
    print(f"{text} at 1/{f} resolution ({m}²): start x{over.chosen:g}, fit % "
          + "/".join(f"{100 * x:.1f}" for x in modes.power_fractions(over.probe)), flush=True)
    far = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(over.probe.astype(np.complex128), axes=(-2, -1)), norm="ortho"),
                          axes=(-2, -1))
    padded = np.zeros((len(far), n, n), np.complex128)
    padded[:, o:o + m, o:o + m] = far
    probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(padded, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    sched = over.sched(how.schedule) if its == 0 else mr.ml_params(len(probe), its)
    obj, probe, _e = mode_count.fit(kept, sched, keep, np.ones_like(obj0), probe.astype(np.complex64),
                                    mode_cap=how.mode_cap)
    line(f"{text} the full scan's fit from them and a flat object", scan, keep, mix, obj, probe, rho=True)
    line(f"{text} the rule's fit", scan, keep, mix, obj0, p0)


def modes_only(fit_once: Any) -> Any:
    """ML's first pass with the object's gradient zeroed: its steps move the modes only."""
    def pass_one(self: Any) -> Any:
        nll, err, g_obj, d_obj, g_probe, d_probe = fit_once(self)
        return nll, err, g_obj * 0, d_obj, g_probe, d_probe
    return pass_one


def crossfit(text: str, cache: Path, start: str, M: int, rounds: int, its: int) -> None:
    """Cross-fitting: the kept pixels split at random into halves A and B; ``its`` ML iterations of the object on
    A with the modes held, then ``its`` of the modes on B with the object held, ``rounds`` times; from the truth
    (its K modes, or M with weak extras) or from the cached fit's M strongest modes."""
    from mode_over import truth_start
    scan, mix, K, kept, keep, obj, probe = mr.cached_cell(text, cache)
    M = M or K
    if start == "truth":
        obj, probe = mix.object[None], truth_start(mix, M, 1e-3)
    else:
        probe = probe[:M]
    half = np.random.default_rng(32).uniform(size=keep.shape) < 0.5
    parts = {"object": keep & half, "modes": keep & ~half}
    scans = {k: mode_count.kept_only(scan, v) for k, v in parts.items()}
    line(f"{text} start ({start})", scan, keep, mix, obj, probe)
    once = ml.MLIteration._pass_one
    for r in range(rounds):
        obj = mr.object_fit(scans["object"], parts["object"], obj, probe, its)
        ml.MLIteration._pass_one = modes_only(once)       # type: ignore[method-assign]
        try:
            _o, probe, _e = mode_count.fit(scans["modes"], mr.ml_params(len(probe), its), parts["modes"],
                                           obj.astype(np.complex64), probe.astype(np.complex64),
                                           mode_cap=mode_count.RULE.mode_cap)
        finally:
            ml.MLIteration._pass_one = once               # type: ignore[method-assign]
        line(f"{text} round {r + 1}", scan, keep, mix, obj, probe, rho=r == rounds - 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probe", choices=("trajectory", "modes", "union", "reset", "crossfit", "truncate", "coarse"))
    ap.add_argument("cell")
    ap.add_argument("--cache", default="/tmp/hxn-rho-cache")
    ap.add_argument("--M", type=int, default=0, help="modes: the fit's modes (12); crossfit: modes kept (K); truncate: "
                                                        "modes kept (K); coarse: the resolution's divisor (2)")
    ap.add_argument("--its", type=int, default=0, help="union: continuation (200); crossfit: a half-step (30); "
                                                      "reset: the object's refit (100); truncate: the fit (500)")
    ap.add_argument("--rounds", type=int, default=0, help="reset: joint rounds (4); crossfit: rounds (6)")
    ap.add_argument("--start", choices=("truth", "fit"), default="fit")
    a = ap.parse_args(argv)
    cache = Path(a.cache)
    if a.probe == "trajectory":
        trajectory(a.cell)
    elif a.probe == "modes":
        more_modes(a.cell, a.M or 12)
    elif a.probe == "union":
        union(a.cell, cache, a.its or 200)
    elif a.probe == "reset":
        reset(a.cell, cache, a.its or 100, a.rounds or 4)
    elif a.probe == "coarse":
        coarse(a.cell, cache, a.M or 2, a.its)
    elif a.probe == "truncate":
        truncate(a.cell, cache, a.M or case_scan(a.cell)[2], a.its or 500)
    else:
        crossfit(a.cell, cache, a.start, a.M, a.rounds or 6, a.its or 30)


if __name__ == "__main__":
    main()
