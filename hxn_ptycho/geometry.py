"""Geometry of a reconstruction: window corners in object pixels and the object shape, computed once.

Corners may be sub-pixel (after position refinement). While positions are refined the windows
are sub-pixel; afterwards (by default) they snap to the nearest pixel (as PtyPy's views are),
because bilinear windows cost accuracy: measured on a simulated 64² scan, all positions moved by
(0.3, 0.3) px gave an object NRMSE of 0.092 against 0.015 on the pixel grid — the interpolation
blurs every window. With sub-pixel windows, a window at corner p = i + f (integer
part i, fraction f in [0, 1)) reads the object by bilinear interpolation,
O(r + p) = Σ_ab w_ab · O(r + i + (a, b)), w_00 = (1−f_r)(1−f_c), w_01 = (1−f_r) f_c, ... — four
integer-corner gathers through the backend, weighted per view (the patch operator of Tike works
the same way). Its adjoint (the scatter-add of the object update) splats with the same weights.
While every corner is whole, the backend's integer gather/scatter (and fused kernels) are used
unchanged, so a reconstruction without refinement costs what it did.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import dm

_OFFSETS = ((0, 0), (0, 1), (1, 0), (1, 1))


def spatial_order(corners: np.ndarray, band: int) -> np.ndarray:
    """An order of views in which consecutive windows overlap: bands of ``band`` rows of corners,
    top to bottom, each walked along its columns, left to right and right to left in turn
    (serpentine). ``order[r]`` is the index in ``corners`` of the view at row ``r``; ties keep
    their given order (a stable sort), so the order is the same on every rank and every run.

    Used for the rows of the exit waves (:class:`Geometry`'s ``order``): on a Fermat spiral
    consecutive views are 137.5° apart, so each view's object, numerator and denominator windows
    come from L3 or memory; in this order most of them are still in cache from the view before
    (docs/performance.md, session 20 and 21)."""
    c = np.asarray(corners, np.float64).reshape(-1, 2)
    if len(c) == 0:
        return np.zeros(0, np.int64)
    rows = np.floor((c[:, 0] - c[:, 0].min()) / max(int(band), 1)).astype(np.int64)
    cols = np.where(rows % 2 == 0, c[:, 1], -c[:, 1])
    return np.lexsort((cols, rows)).astype(np.int64)


class Geometry:
    """Window corners (row, col) of the views of this process, inside an object of ``shape``.

    ``positions_all`` (every view of every rank) is always in the caller's view order; this
    process's views are ``views`` of it. ``order`` (optional): the row of the engine's per-view
    arrays (ψ, batches) of each of this process's views — ``order[r]`` is the local view at row r
    (:func:`spatial_order`) — so :attr:`corner`, :attr:`local` and every method taking a batch
    ``b`` (a slice of rows) follow the rows; None: the rows are the views in the given order."""

    def __init__(self, positions_all: np.ndarray, views: slice, n: int, shape: tuple[int, int],
                 subpixel: bool = False, order: np.ndarray | None = None) -> None:
        self.n = int(n)
        self.subpixel_windows = bool(subpixel)
        self.shape = (int(shape[0]), int(shape[1]))
        self.nominal_all = np.asarray(positions_all, np.float64).copy()   # never changed
        start, stop, _ = views.indices(len(self.nominal_all))
        self.start, self.stop = start, stop
        self.order: np.ndarray | None = None
        if order is not None:
            order = np.asarray(order, np.int64)
            if order.shape != (stop - start,) or not np.array_equal(np.sort(order), np.arange(stop - start)):
                raise ValueError(f"order must be a permutation of the {stop - start} local views")
            if np.any(order != np.arange(len(order))):
                self.order = order
        self.set_positions(self.nominal_all)

    # --- positions ----------------------------------------------------------------------------
    @property
    def limits(self) -> tuple[float, float]:
        """Largest corner (row, col) keeping a bilinear window (n + 1 pixels) inside the object."""
        return float(self.shape[0] - self.n - 1), float(self.shape[1] - self.n - 1)

    def set_positions(self, positions_all: np.ndarray) -> None:
        """New corners for every view (the same array on every rank); this process keeps its slice."""
        pos = np.asarray(positions_all, np.float64).copy()
        lo = 0.0
        hr, hc = self.limits
        whole = np.all(pos == np.round(pos))
        if not whole:                          # bilinear windows reach one pixel further
            pos[:, 0] = np.clip(pos[:, 0], lo, hr)
            pos[:, 1] = np.clip(pos[:, 1], lo, hc)
        self.positions_all = pos
        local = pos[self.start:self.stop]
        if self.order is not None:
            local = local[self.order]
        self._local = local
        if self.subpixel_windows:
            self.corner = np.floor(local).astype(np.int64)
            self.subpixel = bool(np.any(local != self.corner))
        else:                                  # the model's windows: the nearest pixel
            self.corner = np.round(local).astype(np.int64)
            self.subpixel = False

    def use_subpixel(self, on: bool) -> None:
        """Sub-pixel (bilinear) windows on, or windows at the nearest pixel.

        Snapping first moves every corner by the common sub-pixel offset of the grid (the circular
        mean of their fractional parts): a global shift is free (the object follows), and without
        it a scan whose refined positions sit half a pixel off the grid would round half its views
        one way and half the other (measured: 19 of 120 views on the wrong pixel, 0 after).
        """
        self.subpixel_windows = bool(on)
        pos = self.positions_all
        if not on:
            offset = np.angle(np.mean(np.exp(2j * np.pi * pos), axis=0)) / (2 * np.pi)
            pos = pos - offset
        self.set_positions(pos)

    @property
    def model_positions(self) -> np.ndarray:
        """The corners the model's windows use for this process's views (float)."""
        return self.local if self.subpixel else self.corner.astype(np.float64)

    @property
    def local(self) -> np.ndarray:
        """This process's corners (float), in the rows' order."""
        return self._local

    def __len__(self) -> int:
        return self.stop - self.start

    # --- windows through the backend -------------------------------------------------------------
    def gather_at(self, be: Any, obj: Any, pos: np.ndarray, out: Any, tmp: Any) -> Any:
        """Object windows ``(B, L, n, n)`` at the (sub-pixel) corners ``pos``; ``tmp`` is scratch."""
        if np.all(pos == np.round(pos)):
            return be.gather(obj, pos.astype(np.int64), self.n, out=out)
        return be.gather_subpixel(obj, pos, self.n, out, tmp)

    def gather(self, be: Any, obj: Any, b: slice, out: Any, tmp: Any) -> Any:
        """Object windows ``(B, L, n, n)`` of batch ``b`` (``tmp`` is scratch of the same shape)."""
        if not self.subpixel:
            return be.gather(obj, self.corner[b], self.n, out=out)
        return self.gather_at(be, obj, self.local[b], out, tmp)

    def exit_waves(self, be: Any, obj: Any, b: slice, probe: Any, windows: Any, out: Any, tmp: Any) -> Any:
        """(2) ψ = P_k · O_l(r + r_j) for batch ``b``; ``windows`` receives the object windows when sub-pixel."""
        if not self.subpixel:
            return dm.exit_waves(be, probe, be.gather(obj, self.corner[b], self.n, out=windows), out)
        return dm.exit_waves(be, probe, self.gather(be, obj, b, windows, tmp), out)

    def scatter_add(self, be: Any, acc: Any, b: slice, src: Any) -> None:
        """The adjoint of :meth:`gather`: ``acc[l, window j] += src[j, l]`` (``src`` may be ``(n, n)``)."""
        if not self.subpixel:
            be.scatter_add(acc, self.corner[b], src)
        else:
            be.scatter_add_subpixel(acc, self.local[b], src)

    def pass_positions(self, b: slice) -> tuple[np.ndarray, bool]:
        """The corners of batch ``b`` for a backend pass and whether they are sub-pixel (float)."""
        return (self.local[b], True) if self.subpixel else (self.corner[b], False)


# --- the bilinear windows, the numpy definition (Backend.gather_subpixel / scatter_add_subpixel) ----
def _parts(pos: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(integer corners, weights) of the four gathers of bilinear windows at ``pos``, skipping zero weights."""
    corner = np.floor(pos).astype(np.int64)
    f = pos - corner
    fr, fc = f[:, 0], f[:, 1]
    weights = ((1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc)
    return [(corner + np.array(off), w) for off, w in zip(_OFFSETS, weights) if np.any(w != 0)]


# O(r + p) = Σ_ab w_ab · O(r + i + (a, b)): four integer gathers, weighted per view
def bilinear_gather(be: Any, obj: Any, pos: np.ndarray, n: int, out: Any, tmp: Any) -> Any:
    xp = be.xp
    if tmp is None:
        tmp = be.empty(out.shape, out.dtype)
    out[...] = 0
    for corner, w in _parts(np.asarray(pos, np.float64)):
        win = be.gather(obj, corner, n, out=tmp)
        win *= xp.asarray(w.astype(win.real.dtype))[:, None, None, None]
        out += win
    return out


# the adjoint: splat with the same weights
def bilinear_scatter(be: Any, acc: Any, pos: np.ndarray, src: Any) -> None:
    xp = be.xp
    for corner, w in _parts(np.asarray(pos, np.float64)):
        wd = xp.asarray(w.astype(src.real.dtype))
        if src.ndim == 2:
            be.scatter_add(acc, corner, wd[:, None, None, None] * src[None, None])
        else:
            be.scatter_add(acc, corner, wd[:, None, None, None] * src)
