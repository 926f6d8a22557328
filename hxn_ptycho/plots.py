"""The summary figure of a reconstruction (``reconstruct --png``, ``results --png``, the demo).

Rows: every object mode (phase and amplitude, with a scale bar in nm/µm from the object pixel
size); the convergence curves (ε_D, ε_P per probe mode, ε_O per object mode, probe-mode changes
marked, the legend beside the curves, not over them); every probe mode's amplitude (with its share
of the power) and phase, each with a colour bar and a scale bar. The title names the scan and
gives the one quality number, the final data error ε_D (see :data:`QUALITY_DEFINITION`).
"""
from __future__ import annotations

import json
import math
import os
import re
import textwrap
from typing import Any

import numpy as np

from .resultfile import ResultData
from .spec import find_key

QUALITY_NAME = "final data error ε_D"
QUALITY_DEFINITION = ("ε_D = Σ (|F(P·O)| − √I)² / Σ I over all views and unmasked pixels, of the returned "
                      "model (0 = a perfect fit)")
CURVES_DEFINITION = ("ε_D: data error, Σ(|F(Ψ)| − √I)² / ΣI, Ψ = 2P·O − ψ in a DM iteration (what its projection "
                     "sees), P·O in ML and for the final model (●).   ε_P k, ε_O l: relative change of probe "
                     "mode k, object mode l in that iteration, ‖X_i − X_(i−1)‖ / ‖X_(i−1)‖.")


def quality(res: ResultData) -> float | None:
    """The figure's quality number: the result's one final data error (``ResultData.final_data_error``)."""
    return res.final_data_error


def object_pixel_size_m(res: ResultData, pixel_size_m: float | None = None) -> float | None:
    """The object pixel size: given, or from the result's attributes or parameters (``pixel_size_m``,
    or λ·z / (n·Δ) from ``lambda_nm``, ``z_m``, ``ccd_pixel_um``); None when none of them is there."""
    if pixel_size_m:
        return float(pixel_size_m)
    for source in (res.attrs, res.params):
        for key in ("pixel_size_m", "scan_pixel_size_m", "object_pixel_size_m"):
            v = (source or {}).get(key)
            if v:
                return float(v)
    for source in (res.attrs, res.params):
        source = source or {}
        lam = source.get("lambda_nm", source.get("scan_lambda_nm"))
        z = source.get("z_m", source.get("scan_z_m"))
        pix = source.get("ccd_pixel_um", source.get("scan_ccd_pixel_um"))
        if lam and z and pix:
            return float(lam) * 1e-9 * float(z) / (res.probe.shape[-1] * float(pix) * 1e-6)
    return None


def scale_bar_length(width_m: float) -> tuple[float, str]:
    """A round length (1, 2 or 5 × 10^k m) near a fifth of ``width_m``, and its label in nm or µm."""
    target = width_m / 5
    exp = math.floor(math.log10(target))
    length = min((m * 10.0 ** exp for m in (1, 2, 5, 10)), key=lambda v: abs(math.log(v / target)))
    if length >= 1e-6:
        return length, f"{length * 1e6:g} µm"
    return length, f"{length * 1e9:g} nm"


def mode_changes(log_lines: Any, iterations: int) -> list[tuple[int, str]]:
    """(iteration, label) of each probe-mode change in the result's ``probe_modes_log``."""
    out = []
    if isinstance(log_lines, str):
        try:
            log_lines = json.loads(log_lines)         # a result file keeps the list as JSON
        except ValueError:
            log_lines = [log_lines]
        if isinstance(log_lines, str):
            log_lines = [log_lines]
    for line in log_lines or []:
        m = re.search(r"iteration (\d+)", str(line))
        if not m:
            continue
        it = min(int(m.group(1)) + 1, max(iterations, 1))     # the change follows that iteration
        add = re.search(r"adding mode (\d+)", str(line))
        keep = re.search(r"keeping (\d+) mode", str(line))
        if add:                                              # the log counts modes from 1
            out.append((it, f"+1 → {add.group(1)} modes"))
        elif keep and "<" in str(line):
            out.append((it, f"−1 → {keep.group(1)} mode(s)"))
    return out


def count_note(attrs: dict) -> str:
    """How ``probe_modes=auto`` with ``auto_rule='heldout'`` found the count (its steps' z on held-out
    pixels up to the one that stopped it), for the figure's title; '' for any other count."""
    from .mode_count import heldout_evidence
    auto = heldout_evidence(attrs)
    if auto is None:
        return ""
    if auto.get("count_by") == "sparse":
        chosen = [f for f in auto.get("sparse", []) if f.get("sparsity") == auto.get("sparsity_chosen")]
        shares = chosen[0].get("shares", []) if chosen else []
        return (f" (counted on the sparse fit of sparsity {auto.get('sparsity_chosen')}: shares "
                + "/".join(f"{100 * x:.1f}" for x in shares) + f" %, at least {100 * float(auto.get('share_min', 0.01)):g} %)")
    zs = [c["z"] for c in auto.get("chain", []) if "z" in c][:int(auto.get("found", 0))]   # up to the deciding step
    cap = f"; every step of the {auto.get('fit_modes')}-mode fit kept: a lower bound" if auto.get("at_cap") else ""
    return (" (counted on held-out pixels, steps' z " + ", ".join(f"{z:.1f}" for z in zs)
            + f" against {auto.get('z_min', 2):g}{cap})")


def mode_changes_from_curves(error_probe: np.ndarray) -> list[tuple[int, str]]:
    """Probe modes added during the run, where no log came with the result: a mode's ε_P curve
    starts (is NaN before) at the iteration after it was added."""
    out: list[tuple[int, str]] = []
    ep = np.asarray(error_probe, dtype=float)
    if ep.ndim != 2:
        return out
    for k in range(1, ep.shape[1]):
        finite = np.flatnonzero(np.isfinite(ep[:, k]))
        if finite.size and finite[0] > 0:
            out.append((int(finite[0]), f"+1 → {k + 1} modes"))
        elif not finite.size:
            out.append((ep.shape[0], f"+1 → {k + 1} modes"))
    return sorted(out)



def scan_facts(res: ResultData, facts: dict | None = None) -> dict[str, Any]:
    """What the title block says about the scan: detector, energy, distance, views, object pixel and
    the algorithm chain — from ``facts`` (a job's geometry), the result's parameters (a derived run's
    whole ``recon``) and attributes (the scan file's, prefixed ``scan_``)."""
    sources = [facts or {}, res.params or {}, res.attrs or {}]

    def find(*keys: str) -> Any:
        for src in sources:
            for k in keys:
                v = find_key(src, k)
                if v is None and isinstance(src, dict):
                    v = src.get(f"scan_{k}")
                if v not in (None, ""):
                    return v
        return None
    return {"detector": find("detector"), "energy_kev": find("energy_kev"), "z_m": find("z_m"),
            "views": int(res.positions_px.shape[0]) if res.positions_px.size else find("n_views"),
            "stages": algorithm_stages(res, find("algorithm_stages"), find("algorithm"))}


def algorithm_stages(res: ResultData, stages: Any = None, chain: Any = None) -> list[tuple[str, int]]:
    """[(name, iterations)] of the run: the engine's ``algorithm_stages`` ("DM:150", "ML:50"), else
    the ``algorithm`` parameter with the rest of the iterations given to a stage without a count."""
    if isinstance(stages, str):
        try:
            stages = json.loads(stages)
        except ValueError:
            stages = [stages]
    out: list[tuple[str, int]] = []
    for item in stages or []:
        name, _, count = str(item).partition(":")
        out.append((name.strip(), int(count) if count.strip().isdigit() else 0))
    if out:
        return out
    parts = [c.strip() for c in str(chain or "DM").split(",") if c.strip()]
    counted = [(n.partition(":")[0], int(n.partition(":")[2]) if n.partition(":")[2].isdigit() else None)
               for n in parts]
    rest = max(res.iterations - sum(c for _, c in counted if c), 0)
    return [(n, c if c is not None else rest) for n, c in counted]


def _lit_window(res: ResultData) -> tuple[slice, slice]:
    """Rows and columns of the object covered by the scan (the unlit border only distracts)."""
    n = res.probe.shape[-1]
    pos = res.positions_px
    if pos.size == 0:
        return slice(None), slice(None)
    r0, c0 = pos.min(axis=0).astype(int) + n // 4
    r1, c1 = pos.max(axis=0).astype(int) + n - n // 4
    return slice(r0, max(r1, r0 + 1)), slice(c0, max(c1, c0 + 1))


def stage_extent(res: ResultData, rows: slice, cols: slice) -> list[float] | None:
    """imshow extent [x left, x right, y of the last row, y of the first row] in µm of the stage's
    x and y for object rows/cols (the result's ``frame``: rows +y, columns +x), as HXN's 2-D maps
    (hxn-profile-collection 53-viewer2d.py ``extent=[x_start, x_end, y_end, y_start]``)."""
    frame = res.frame_um
    if frame is None:
        return None
    x0, y0, p = frame
    r0, r1, _ = rows.indices(res.object.shape[-2])
    c0, c1, _ = cols.indices(res.object.shape[-1])
    return [x0 + (c0 - 0.5) * p, x0 + (c1 - 0.5) * p, y0 + (r1 - 0.5) * p, y0 + (r0 - 0.5) * p]


def _image(fig: Any, ax: Any, img: np.ndarray, title: str, cmap: str, unit: str, pixel_m: float | None,
           robust: bool = True, extent: list[float] | None = None) -> None:
    lo, hi = np.percentile(img, [1, 99]) if robust else (float(img.min()), float(img.max()))
    if hi <= lo:
        hi = lo + 1e-12
    im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest", extent=extent)
    ax.set_title(title, fontsize=9)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label(unit, fontsize=8)
    cb.ax.tick_params(labelsize=7)
    if extent is not None:
        ax.set_xlabel("x (µm)", fontsize=8)
        ax.set_ylabel("y (µm)", fontsize=8)
        ax.tick_params(labelsize=7)
        return
    if pixel_m is None:
        ax.set_xlabel("x (pixels)", fontsize=8)
        ax.set_ylabel("y (pixels)", fontsize=8)
        ax.tick_params(labelsize=7)
        return
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    ax.set_xticks([])
    ax.set_yticks([])
    length_m, label = scale_bar_length(img.shape[1] * pixel_m)
    bar = AnchoredSizeBar(ax.transData, length_m / pixel_m, label, "lower left", pad=0.25, borderpad=0.3,
                          sep=2, color="white", frameon=True, size_vertical=max(img.shape[0] / 60, 0.5),
                          fontproperties={"size": 7})
    bar.patch.set_facecolor("black")
    bar.patch.set_alpha(0.55)
    bar.patch.set_edgecolor("none")
    bar.set_gid("scale bar")
    ax.add_artist(bar)


def summary_figure(res: ResultData, title: str = "", pixel_size_m: float | None = None,
                   facts: dict | None = None, truth: np.ndarray | None = None) -> Any:
    """The summary figure (a matplotlib Figure, not yet saved): see the module docstring. ``facts``
    (e.g. a job's geometry) feeds the title block; ``truth`` (a simulation's known object, in the
    result's object frame) is drawn beside the result."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    K, L = res.probe.shape[0], res.object.shape[0]
    T = 0 if truth is None else 1
    cols = max(2 * (L + T), 2 * K, 3)             # probe amplitude and phase side by side: no empty half
    pixel_m = object_pixel_size_m(res, pixel_size_m)
    fig = plt.figure(figsize=(3.1 * cols, 10.0))
    grid = fig.add_gridspec(4, cols, height_ratios=[1.0, 0.9, 0.12, 1.0], hspace=0.45,   # row 2: room for
                            wspace=0.35 if pixel_m else 0.6)                            # the definitions

    rows, colsl = _lit_window(res)
    extent = stage_extent(res, rows, colsl)
    for m in range(L):
        obj = res.object[m][rows, colsl]
        name = "object" if L == 1 else f"object mode {m}"
        _image(fig, fig.add_subplot(grid[0, 2 * m]), np.angle(obj), f"{name}: phase", "viridis", "phase (rad)", pixel_m,
               extent=extent)
        _image(fig, fig.add_subplot(grid[0, 2 * m + 1]), np.abs(obj), f"{name}: amplitude", "gray",
               "amplitude |O|", pixel_m, extent=extent)
    if truth is not None:
        t = np.asarray(truth)
        t = t[0] if t.ndim == 3 else t
        same = t.shape == res.object.shape[1:]
        t = t[rows, colsl] if same else t
        _image(fig, fig.add_subplot(grid[0, 2 * L]), np.angle(t), "known truth: phase", "viridis", "phase (rad)",
               pixel_m, extent=extent if same else None)
        _image(fig, fig.add_subplot(grid[0, 2 * L + 1]), np.abs(t), "known truth: amplitude", "gray",
               "amplitude |O|", pixel_m, extent=extent if same else None)

    span = max(cols - 1, 2)
    ax = fig.add_subplot(grid[1, :span])
    it = np.arange(1, res.iterations + 1)
    ax.semilogy(it, res.error_data, color="k", lw=2, label="ε_D data error (DM: of F(2P·O − ψ))")
    def positive(v: np.ndarray) -> np.ndarray:     # no update (ε = 0, e.g. the probe before it starts):
        v = np.asarray(v, dtype=float)               # not drawn, instead of a plunge to the axis
        return np.where(v > 0, v, np.nan)
    for k in range(res.error_probe.shape[1]):
        ax.semilogy(it, positive(res.error_probe[:, k]), lw=0.9, label=f"ε_P probe mode {k}")
    for m in range(res.error_object.shape[1]):
        ax.semilogy(it, positive(res.error_object[:, m]), lw=0.9, ls="--", label=f"ε_O object mode {m}")
    final = res.final_data_error if hasattr(res, "final_data_error") else None
    if final is not None and res.iterations:          # the returned model's own error: the reported number
        ax.semilogy([it[-1]], [final], "o", color="k", ms=6, label=f"final ε_D of the model {final:.3g}")
    info = scan_facts(res, facts)
    stages = info["stages"]
    at = 0
    for i, ((name, count), (nxt, _)) in enumerate(zip(stages, stages[1:])):
        at += count
        ax.axvline(at + 0.5, color="tab:red", ls="--", lw=1.2, label="algorithm switch" if i == 0 else None)
        ax.annotate(f"{name} → {nxt}", (at + 0.5, 0.02), xycoords=("data", "axes fraction"), xytext=(3, 2),
                    textcoords="offset points", fontsize=8, color="tab:red")
    log = res.attrs.get("probe_modes_log")
    changes = mode_changes(log, res.iterations) if log is not None else mode_changes_from_curves(res.error_probe)
    for i, (x, label) in enumerate(changes):
        ax.axvline(x, color="0.5", ls=":", lw=1, label="probe-mode change" if i == 0 else None)
        ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=7, color="0.35", rotation=90, va="top",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.75, "pad": 0.5})
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("error (log scale)")
    q = quality(res)
    ax.set_title("convergence" + (f" — final data error ε_D = {q:.4g}" if q is not None else ""), fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, borderaxespad=0.0)
    ax.text(0.0, -0.27, textwrap.fill(CURVES_DEFINITION, int(span * 3.1 * 15)), transform=ax.transAxes,
            fontsize=7, va="top", color="0.25")
    ax.grid(True, which="major", alpha=0.3)

    for k in range(K):
        p = res.probe[k]
        share = 100 * float(res.probe_power_fraction[k])
        _image(fig, fig.add_subplot(grid[3, 2 * k]), np.abs(p), f"probe mode {k}: {share:.1f} % of the power",
               "magma", "amplitude |P|", pixel_m, robust=False)
        _image(fig, fig.add_subplot(grid[3, 2 * k + 1]), np.angle(p), f"probe mode {k}: phase", "twilight",
               "phase (rad)", pixel_m, robust=False)

    scan = res.attrs.get("scan_scan_id", res.attrs.get("scan_id"))
    head = title or (f"scan {scan}" if scan is not None else "scan (no scan_id)")
    chain = " → ".join(f"{n}:{c}" for n, c in stages) if stages else "DM"
    detail = f"{res.iterations} iterations, {K} probe mode(s){count_note(res.attrs)}, {L} object mode(s)"
    detail += f", object pixel {pixel_m * 1e9:.3g} nm" if pixel_m else ", object pixel size unknown"

    def num(v: Any, fmt: str) -> str:
        try:
            return format(float(v), fmt)
        except (TypeError, ValueError):
            return "?"
    scan_line = (f"detector {info['detector'] or '?'} · energy {num(info['energy_kev'], '.4g')} keV · "
                 f"distance {num(info['z_m'], '.4g')} m · {info['views'] if info['views'] is not None else '?'} views")
    fig.suptitle(f"{head} — hxn-ptycho {chain}: {detail}\n{scan_line}\n"
                 + (f"{QUALITY_NAME} = {q:.4g}" if q is not None else "no iterations"), fontsize=11)
    return fig


def summary_png(res: ResultData, path: str | os.PathLike, title: str = "", pixel_size_m: float | None = None,
                dpi: int = 90, facts: dict | None = None, truth: np.ndarray | None = None) -> None:
    """Write the summary figure to ``path`` (PNG, written to a temporary name and renamed)."""
    import matplotlib.pyplot as plt

    fig = summary_figure(res, title, pixel_size_m, facts=facts, truth=truth)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.part.png"
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    os.replace(tmp, path)
