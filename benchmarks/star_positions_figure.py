"""The README's figures of position refinement on the measured Siemens star.

    python benchmarks/star_positions_figure.py [--algorithm DM:80,ML:70 --start 80 --end 135] [--out docs/figures]

Reconstructs the star from the file's positions, and from the same positions scaled by 1.02 and
perturbed by 3 px RMS (seed 0) with position refinement (the same chain of algorithms, default
parameters otherwise); writes ``star_positions_objects.png``
(amplitude and phase of both, the second registered on the first, one colour scale per column),
``star_positions_errors.png`` (each view's position error against the file's before and after the
refinement, the mean translation removed) and ``star_positions.json`` (the numbers), and prints
the numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from hxn_ptycho.datasets import perturbed_positions, siemens_star
from hxn_ptycho.engine import reconstruct
from hxn_ptycho.metrics import illuminated_region, shifted_correlation
from hxn_ptycho.params import ReconParams
from hxn_ptycho.positions import affine_terms, fit_affine

ROOT = Path(__file__).resolve().parents[1]
STAR = ROOT.parent / "shared" / "data" / "siemens-star-small" / "siemens-star-small.npz.bz2"


def rms(d: np.ndarray) -> float:
    """RMS length of the rows of ``d`` after removing their mean (a global translation is free)."""
    d = d - d.mean(axis=0)
    return float(np.sqrt(np.mean(np.sum(d ** 2, axis=1))))


def save_png(fig, path: Path) -> None:
    """``fig`` as a PNG with a 256-colour palette (a third of the size; the repository keeps it)."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithm", default="DM:80,ML:70", help="the chain of both reconstructions")
    ap.add_argument("--start", type=int, default=80, help="first iteration of refinement")
    ap.add_argument("--end", type=int, default=135, help="last iteration of refinement")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--star", type=Path, default=STAR)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scan = siemens_star(args.star)
    bad = perturbed_positions(scan, 1.02, 3.0, seed=0)
    file_pos = np.stack([scan.points[1], scan.points[0]], axis=1)      # (row, col) in object pixels
    p = ReconParams(algorithm=args.algorithm, threads=args.threads)
    end = args.end
    t0 = time.perf_counter()
    ref = reconstruct(scan, p, log=lambda m: None)
    t1 = time.perf_counter()
    res = reconstruct(bad, p.replace(refine_positions=True, position_start=args.start, position_end=end),
                      log=lambda m: None)
    t2 = time.perf_counter()
    est, nominal = res.positions_refined_px, res.positions_px
    region = illuminated_region(ref.positions_px, ref.probe, ref.object.shape[1:])
    offset = (est - file_pos).mean(0) - (ref.positions_px - file_pos).mean(0)
    corr, aligned = shifted_correlation(ref.object[0], res.object[0], offset, region)
    numbers = {
        "algorithm": args.algorithm, "refinement": [args.start, end],
        "rms_before_px": rms(nominal - file_pos), "rms_after_px": rms(est - file_pos),
        "rms_after_affine_removed_px": float(np.sqrt(np.mean(np.sum((est - fit_affine(file_pos, est)) ** 2, 1)))),
        "affine_refined_vs_file": affine_terms(file_pos, est).tolist(),
        "correlation": corr, "cost_file_positions": ref.attrs["final_cost"], "cost_refined": res.attrs["final_cost"],
        "seconds": [t1 - t0, t2 - t1],
    }
    for k, v in numbers.items():
        print(f"{k}: {v}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "star_positions.json").write_text(json.dumps(numbers, indent=1) + "\n")

    rows, cols = np.nonzero(region)
    crop = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    a, b = ref.object[0][crop], aligned[crop]
    inside = region[crop]
    amp_lim = np.percentile(np.abs(a[inside]), [1, 99])
    ph0 = np.angle(np.mean(a[inside]))
    pha, phb = np.angle(a * np.exp(-1j * ph0)), np.angle(b * np.exp(-1j * ph0))
    ph_lim = np.percentile(pha[inside], [1, 99])
    fig, ax = plt.subplots(2, 2, figsize=(9, 8.6), constrained_layout=True)
    titles = ("file's positions", f"perturbed + refined (correlation {corr:.3f})")
    for i, (img, ph) in enumerate(((a, pha), (b, phb))):
        im0 = ax[i, 0].imshow(np.abs(img), cmap="gray", vmin=amp_lim[0], vmax=amp_lim[1])
        im1 = ax[i, 1].imshow(ph, cmap="twilight", vmin=ph_lim[0], vmax=ph_lim[1])
        ax[i, 0].set_title(f"amplitude, {titles[i]}", fontsize=9)
        ax[i, 1].set_title(f"phase, {titles[i]}", fontsize=9)
        for x in ax[i]:
            x.set_xticks([])
            x.set_yticks([])
        fig.colorbar(im0, ax=ax[i, 0], shrink=0.8)
        fig.colorbar(im1, ax=ax[i, 1], shrink=0.8, label="rad")
    save_png(fig, args.out / "star_positions_objects.png")
    plt.close(fig)

    before = nominal - file_pos
    before -= before.mean(0)
    after = est - file_pos
    after -= after.mean(0)
    fig, ax = plt.subplots(1, 3, figsize=(13, 4.4), constrained_layout=True)
    for x, d, name in ((ax[0], before, "perturbed (before)"), (ax[1], after, "refined (after)")):
        x.quiver(file_pos[:, 1], file_pos[:, 0], d[:, 1], d[:, 0], angles="xy", scale_units="xy", scale=0.1,
                 width=0.003)
        x.set_aspect("equal")
        x.invert_yaxis()
        x.set_title(f"{name}: {rms(d):.2f} px RMS (arrows ×10)", fontsize=9)
        x.set_xlabel("column (px)")
        x.set_ylabel("row (px)")
    bins = np.linspace(0, max(8.0, float(np.hypot(*before.T).max())), 40)
    ax[2].hist(np.hypot(*before.T), bins, alpha=0.6, label="before")
    ax[2].hist(np.hypot(*after.T), bins, alpha=0.6, label="after")
    ax[2].set_xlabel("|position − file's position| (px)")
    ax[2].set_ylabel("views")
    ax[2].legend()
    save_png(fig, args.out / "star_positions_errors.png")
    plt.close(fig)
    print(f"wrote {args.out}/star_positions_objects.png, star_positions_errors.png, star_positions.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
