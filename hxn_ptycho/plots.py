"""The summary figure of a reconstruction: object phase and amplitude, probe modes, error curves."""
from __future__ import annotations

import os

import numpy as np

from .resultfile import ResultData


def _lit_window(res: ResultData) -> tuple[slice, slice]:
    """Rows and columns of the object covered by the scan (the unlit border only distracts)."""
    n = res.probe.shape[-1]
    pos = res.positions_px
    if pos.size == 0:
        return slice(None), slice(None)
    r0, c0 = pos.min(axis=0).astype(int) + n // 4
    r1, c1 = pos.max(axis=0).astype(int) + n - n // 4
    return slice(r0, max(r1, r0 + 1)), slice(c0, max(c1, c0 + 1))


def summary_png(res: ResultData, path: str | os.PathLike, title: str = "") -> None:
    """Write the summary figure to ``path`` (PNG, written to a temporary name and renamed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = res.probe.shape[0]
    cols = max(3, k)
    fig, axes = plt.subplots(3, cols, figsize=(3.2 * cols, 9.6), squeeze=False)
    rows, colsl = _lit_window(res)
    obj = res.object[0][rows, colsl]
    ax = axes[0]
    phase = np.angle(obj)
    lo, hi = np.percentile(phase, [1, 99])
    im = ax[0].imshow(phase, cmap="viridis", vmin=lo, vmax=hi)
    ax[0].set_title("object phase (rad)")
    fig.colorbar(im, ax=ax[0], fraction=0.046)
    amp = np.abs(obj)
    lo, hi = np.percentile(amp, [1, 99])
    im = ax[1].imshow(amp, cmap="gray", vmin=lo, vmax=hi)
    ax[1].set_title("object amplitude")
    fig.colorbar(im, ax=ax[1], fraction=0.046)
    it = np.arange(1, res.iterations + 1)
    ax[2].semilogy(it, res.error_data, label="data error")
    for m in range(res.error_probe.shape[1]):
        ax[2].semilogy(it, res.error_probe[:, m], lw=0.8, label=f"ε_P mode {m}")
    ax[2].semilogy(it, res.error_object[:, 0], lw=0.8, label="ε_O")
    ax[2].set_xlabel("iteration")
    ax[2].legend(fontsize=7)
    ax[2].set_title("convergence")
    for a in ax[3:]:
        a.axis("off")
    for m in range(cols):
        for row in (1, 2):
            axes[row][m].axis("off")
        if m < k:
            p = res.probe[m]
            axes[1][m].imshow(np.abs(p), cmap="magma")
            axes[1][m].set_title(f"probe mode {m}: {100 * res.probe_power_fraction[m]:.1f} %")
            axes[2][m].imshow(np.angle(p), cmap="twilight")
            axes[2][m].set_title(f"mode {m} phase")
    cost = res.attrs.get("final_cost")
    fig.suptitle(title or f"hxn-ptycho DM: {res.iterations} iterations, {k} probe mode(s)"
                 + (f", cost {float(cost):.4g}" if cost is not None else ""))
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.part.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
