"""Asynchronous mode (the Argonne scheme): split the scan into regions, reconstruct each on its
own rank with no communication during the iterations, then stitch the regions.

1. :func:`split_regions` — K spatial regions on a near-square grid of the scan positions (equal
   view counts), each widened by an overlap margin of about one probe width so that
   neighbouring regions share views.
2. Every rank reads only its region's frames (:func:`~hxn_ptycho.scanfile.read_scan_views`) and
   runs the engine with the identity reducer, in the region's own object frame; its offset in
   the global object frame is known from the global window corners.
3. Rank 0 gathers the regions and :func:`stitch_regions` places them one by one, each next to
   the already stitched ones it overlaps most: sub-pixel registration in the overlap, then the
   complex scale (amplitude and global phase) and the linear phase ramp that best match the
   stitched neighbours, then an illumination-weighted blend (Σ|P|² at the region's positions).

One region (``--mode async`` on one process) is exactly the synchronous reconstruction.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from .engine import LocalReducer, reconstruct
from .metrics import illumination
from .params import ParamError, ReconParams
from .registration import fourier_shift, register
from .resultfile import ResultData
from .scanfile import ScanData, positions_px, read_scan, read_scan_views

OVERLAP_FRACTION = 0.5      # overlap margin of a region, in frame widths (≈ one probe width)
WEIGHT_THRESHOLD = 0.1      # overlap pixels: both illuminations above this fraction of their maxima
MIN_SHIFT_PX = 0.02         # registered shifts smaller than this are not applied
MAX_SHIFT_FRACTION = 0.25   # registered shifts beyond this fraction of a frame are distrusted
SHIFT_PAD = 8               # reflected pixels around a region before a Fourier shift
REFINE_STEPS = 8            # Gauss–Newton steps of the least-squares shift refinement


# --- the split -------------------------------------------------------------------------------
def grid_shape(k: int, extent: tuple[float, float]) -> tuple[int, int]:
    """(rows, cols) with rows·cols = k whose tiles are closest to square for a scan of ``extent``."""
    best, best_cost = (k, 1), np.inf
    for rows in range(1, k + 1):
        if k % rows:
            continue
        cols = k // rows
        cost = abs(np.log((max(extent[0], 1.0) / rows) / (max(extent[1], 1.0) / cols)))
        if cost < best_cost - 1e-12:
            best, best_cost = (rows, cols), cost
    return best


def split_regions(pos: np.ndarray, k: int, overlap: float) -> list[np.ndarray]:
    """K regions of the views at window corners ``pos`` (N, 2): sorted global view indices.

    The views are cut into a near-square grid of tiles holding (almost) equal numbers of views —
    strips by row, each cut by column — and each region takes the views of its tile plus every
    view within ``overlap`` pixels of the tile's bounding box.
    """
    n_views = len(pos)
    if k < 1:
        raise ParamError(f"the number of regions must be positive, got {k}")
    if k > n_views:
        raise ParamError(f"more regions/ranks ({k}) than views ({n_views}): use at most {n_views} processes")
    rows, cols = grid_shape(k, tuple(np.ptp(pos, axis=0)))
    regions: list[Any] = []
    for strip in np.array_split(np.argsort(pos[:, 0], kind="stable"), rows):
        for core in np.array_split(strip[np.argsort(pos[strip, 1], kind="stable")], cols):
            if len(core) == 0:
                raise ParamError(f"region {len(regions)} of {k} holds no views: use fewer processes")
            lo = pos[core].min(axis=0) - overlap
            hi = pos[core].max(axis=0) + overlap
            inside = np.all((pos >= lo) & (pos <= hi), axis=1)
            regions.append(np.flatnonzero(inside))
    return regions


# --- one region --------------------------------------------------------------------------------
@dataclass
class RegionResult:
    """A region's reconstruction and where it lies in the global object frame."""

    index: int
    views: np.ndarray           # global view indices
    offset: tuple[int, int]     # (row, col) of the region's object [0, 0] in the global object
    result: ResultData
    weight: np.ndarray          # (h, w) illumination Σ|P|² at the region's positions, max 1
    intensity: float            # Σ I of the region's frames (for the error average)
    shift: tuple[float, float] = (0.0, 0.0)
    ramp: tuple[float, float] = (0.0, 0.0)
    scale: complex = 1.0 + 0j
    notes: list[str] = field(default_factory=list)


def global_corners(scan: ScanData, margin: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Integer window corners of every view in the global object frame, and its shape."""
    pos, shape = positions_px(scan.points, scan.pixel_size_m, scan.n, margin)
    return pos.astype(np.int64), shape


def region_scan(path: str, views: np.ndarray, corners: np.ndarray) -> ScanData:
    """The frames of ``views`` only, with positions snapped to the global pixel grid.

    Snapping makes the engine's region-local corners exactly the global corners minus one
    offset, so the region drops back into the global frame without rounding differences.
    """
    scan = read_scan_views(path, views)
    um_per_px = scan.pixel_size_m * 1e6
    snapped = np.stack([corners[views, 1], corners[views, 0]]).astype(np.float64) * um_per_px
    return dataclasses.replace(scan, points=snapped)


def frame_intensity(scan: ScanData) -> float:
    good = 1.0 if scan.mask is None else scan.mask
    return float(np.sum(np.square(scan.diffamp, dtype=np.float64) * good))


def reconstruct_region(path: str, index: int, views: np.ndarray, corners: np.ndarray, params: ReconParams,
                       backend: Any, progress: bool, log: Callable[[str], None] | None,
                       stop: Any = None) -> RegionResult:
    """Read and reconstruct one region with no communication; return it with its global offset."""
    scan = region_scan(path, views, corners)
    res = reconstruct(scan, params, backend=backend, reducer=LocalReducer(), progress=progress, log=log, stop=stop)
    offset = corners[views].min(axis=0) - int(res.attrs.get("object_margin_px", params.margin))
    local = res.positions_px.astype(np.int64)
    if not np.array_equal(local + offset, corners[views]):
        raise RuntimeError(f"region {index}: the engine placed its views off the global pixel grid")
    weight = illumination(res.positions_px, res.probe, res.object.shape[1:])
    weight /= max(float(weight.max()), 1e-300)
    return RegionResult(index=index, views=np.asarray(views), offset=(int(offset[0]), int(offset[1])),
                        result=res, weight=weight, intensity=frame_intensity(scan))


# --- stitching --------------------------------------------------------------------------------
def _box(region: RegionResult) -> tuple[slice, slice]:
    h, w = region.weight.shape
    r, c = region.offset
    return slice(r, r + h), slice(c, c + w)


def stitch_order(regions: list[RegionResult], shape: tuple[int, int]) -> list[int]:
    """The region with most views first, then always the one overlapping the placed ones most."""
    placed = np.zeros(shape)
    order = [int(np.argmax([len(r.views) for r in regions]))]
    placed[_box(regions[order[0]])] += regions[order[0]].weight
    while len(order) < len(regions):
        rest = [i for i in range(len(regions)) if i not in order]
        scores = [float(np.minimum(placed[_box(regions[i])], regions[i].weight).sum()) for i in rest]
        nxt = rest[int(np.argmax(scores))]
        order.append(nxt)
        placed[_box(regions[nxt])] += regions[nxt].weight
    return order


def fit_phase_ramp(ref: np.ndarray, img: np.ndarray, weight: np.ndarray) -> tuple[complex, float, float]:
    """Complex scale c and ramp (a, b) so that c·exp(i(a·row + b·col))·img ≈ ref where ``weight`` > 0.

    Row and column are pixel indices of the arrays given; the phase of c is taken at (0, 0).
    """
    rows, cols = np.nonzero(weight > 0)
    w = weight[rows, cols]
    z = ref[rows, cols] * np.conj(img[rows, cols])
    c0 = np.sum(w * z)
    phase = np.angle(z * np.conj(c0))                # relative to the mean phase: no wrapping
    r0, k0 = rows.mean(), cols.mean()
    A = np.stack([rows - r0, cols - k0, np.ones(len(rows))], axis=1)
    sw = np.sqrt(w * np.abs(z))
    (a, b, c), *_ = np.linalg.lstsq(A * sw[:, None], phase * sw, rcond=None)
    mag_img = np.abs(img[rows, cols])
    amp = np.sum(w * np.abs(ref[rows, cols]) * mag_img) / max(float(np.sum(w * mag_img ** 2)), 1e-300)
    phi0 = np.angle(c0) + c - a * r0 - b * k0
    return complex(amp * np.exp(1j * phi0)), float(a), float(b)


def _ramp(shape: tuple[int, int], scale: complex, a: float, b: float) -> np.ndarray:
    rr, cc = np.mgrid[:shape[0], :shape[1]]
    return scale * np.exp(1j * (a * rr + b * cc))


def _register_overlap(ref: np.ndarray, img: np.ndarray, apod: np.ndarray) -> tuple[float, float]:
    """Coarse sub-pixel shift of ``img`` onto ``ref`` by cross-correlation over the window ``apod``.

    The window is shared by both images, which pulls the peak towards zero shift; the
    least-squares refinement in :func:`align_region` removes that bias.
    """
    r_sl, c_sl = (slice(int(ix.min()), int(ix.max()) + 1) for ix in np.nonzero(apod))

    def centred(x: np.ndarray) -> np.ndarray:
        sub, a = x[r_sl, c_sl], apod[r_sl, c_sl]
        return (sub - np.sum(a * sub) / np.sum(a)) * a
    shift, _ = register(centred(ref), centred(img), upsample=20)
    return shift


def _shift(img: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """``img`` moved by a sub-pixel shift, padded by reflection so the periodic Fourier shift does
    not wrap one edge onto the other."""
    pad = int(np.ceil(np.max(np.abs(shift)))) + SHIFT_PAD
    padded = np.pad(img, pad, mode="reflect")
    return fourier_shift(padded, shift)[pad:-pad, pad:-pad]


def _matched(ref: np.ndarray, obj: np.ndarray, weight: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, tuple]:
    """``obj`` (modes, h, w) moved by ``shift`` and multiplied by the scale and ramp that best match ``ref``."""
    moved = np.stack([_shift(o, tuple(shift)) for o in obj]) if np.any(shift) else obj
    scale, a, b = fit_phase_ramp(ref, moved[0], weight)
    return moved * _ramp(moved.shape[1:], scale, a, b)[None], (scale, a, b)


def _refine_shift(ref: np.ndarray, obj: np.ndarray, weight: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Gauss–Newton steps on Σ weight·|ref − c·ramp·shifted(obj)|² over the shift."""
    rows, cols = np.nonzero(weight > 0)
    w = weight[rows, cols]
    for _ in range(REFINE_STEPS):
        model, _ = _matched(ref, obj[:1], weight, shift)
        grad_r, grad_c = np.gradient(model[0])
        J = -np.stack([grad_r[rows, cols], grad_c[rows, cols]], axis=1)      # ∂model/∂shift
        resid = ref[rows, cols] - model[0][rows, cols]
        A = np.real(J.conj().T @ (w[:, None] * J))
        step = np.linalg.solve(A + 1e-12 * np.trace(A) * np.eye(2), np.real(J.conj().T @ (w * resid)))
        shift = shift + step
        if np.max(np.abs(step)) < 1e-3:
            break
    return shift


def align_region(ref: np.ndarray, ref_weight: np.ndarray, region: RegionResult, n: int) -> RegionResult:
    """Register ``region`` onto the stitched image ``ref`` (cropped to the region's box), in place:
    sub-pixel shift, complex scale (amplitude, global phase) and linear phase ramp in the overlap."""
    obj, w = region.result.object, region.weight
    overlap = (ref_weight > WEIGHT_THRESHOLD) & (w > WEIGHT_THRESHOLD)
    if overlap.sum() < n:
        region.notes.append(f"region {region.index}: overlap of {int(overlap.sum())} pixels is too small to "
                            "register; placed by its scan positions only")
        shift = np.zeros(2)
    else:
        weight = np.where(overlap, ref_weight * w, 0.0)
        first, _ = _matched(ref, obj[:1], weight, np.zeros(2))
        shift = np.array(_register_overlap(ref, first[0], np.where(overlap, np.sqrt(ref_weight * w), 0.0)))
        shift = _refine_shift(ref, obj, weight, shift)
        if np.max(np.abs(shift)) > MAX_SHIFT_FRACTION * n:
            region.notes.append(f"region {region.index}: registered shift {tuple(shift)} is implausible; "
                                "placed by its scan positions only")
            shift = np.zeros(2)
        elif np.max(np.abs(shift)) < MIN_SHIFT_PX:
            shift = np.zeros(2)
    if np.any(shift):
        w = np.clip(_shift(w, (float(shift[0]), float(shift[1]))), 0.0, None)
    region.result.object, (region.scale, a, b) = _matched(ref, obj, np.where(overlap, ref_weight * w, 0.0), shift)
    region.weight, region.shift, region.ramp = w, (float(shift[0]), float(shift[1])), (a, b)
    return region


def blend(regions: list[RegionResult], order: list[int], shape: tuple[int, int], n: int) -> np.ndarray:
    """Place the regions in ``order``, each aligned to those before it; the weighted blend."""
    modes = regions[order[0]].result.object.shape[0]
    num = np.zeros((modes,) + shape, np.complex128)
    den = np.zeros(shape)
    for k, i in enumerate(order):
        region = regions[i]
        box = _box(region)
        if k:
            ref = num[0][box] / np.maximum(den[box], 1e-300)
            align_region(ref, den[box] / max(float(den[box].max()), 1e-300), region, n)
        w = region.weight + 1e-6         # a value, if a faint one, wherever a region lies
        num[(slice(None),) + box] += w * region.result.object[:modes]
        den[box] += w
    covered = den > 0
    obj = np.ones((modes,) + shape, np.complex128)
    obj[:, covered] = num[:, covered] / den[covered]
    return obj


def _weighted(values: Sequence[Any], weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=float)
    return np.tensordot(w / w.sum(), np.stack(values), axes=1)


def stitch_regions(regions: list[RegionResult], corners: np.ndarray, shape: tuple[int, int]) -> ResultData:
    """One result from the region results: the stitched object, the reference region's probe."""
    t0 = time.perf_counter()
    n = regions[0].result.probe.shape[-1]
    order = stitch_order(regions, shape)
    obj = blend(regions, order, shape, n)
    ref = regions[order[0]].result
    results = [r.result for r in regions]
    views = [len(r.views) for r in regions]
    intensity = [r.intensity for r in regions]
    attrs = dict(ref.attrs)
    attrs.update({
        "mode": "async", "processes": len(regions), "regions": len(regions),
        "region_views": views, "region_offsets": [list(r.offset) for r in regions],
        "stitch_order": order, "stitch_shifts": [list(r.shift) for r in regions],
        "stitch_ramps": [list(r.ramp) for r in regions],
        "stitch_notes": [note for r in regions for note in r.notes],
        "final_cost": float(_weighted([np.float64(r.attrs["final_cost"]) for r in results], views)),
        "final_data_error": float(_weighted([np.float64(r.attrs["final_data_error"]) for r in results], intensity)),
        "region_elapsed_s": [float(r.attrs["elapsed_s"]) for r in results],
        "stitch_s": time.perf_counter() - t0,
    })
    attrs["elapsed_s"] = max(attrs["region_elapsed_s"]) + attrs["stitch_s"]
    return ResultData(object=obj.astype(ref.object.dtype), probe=ref.probe, positions_px=corners.astype(np.float64),
                      error_data=_weighted([r.error_data for r in results], intensity),
                      error_probe=ref.error_probe,
                      error_object=_weighted([r.error_object[:, :obj.shape[0]] for r in results], views),
                      probe_power_fraction=ref.probe_power_fraction, params=ref.params, attrs=attrs)


# --- the run -------------------------------------------------------------------------------------
def run_async(path: str, params: ReconParams, comm: Any, progress: bool = False,
              log: Callable[[str], None] | None = None, overlap: float | None = None,
              stop: Any = None) -> ResultData:
    """Reconstruct ``path`` as ``comm.size`` regions, one per rank, stitched on rank 0; every rank
    returns the stitched result. ``overlap`` is the region margin in pixels (default half a frame);
    ``stop`` is the engine's stop hook (each region stops on its own, then they are stitched)."""
    from .distributed import rank_backend
    if params.init_from and comm.size > 1:
        raise ParamError("init_from (a warm start) is not supported in async mode with several processes: "
                         "use --mode sync, or one process")
    geometry = read_scan(path, views=slice(0, 0))          # positions and geometry, no frames
    corners, shape = global_corners(geometry, params.margin)
    regions = split_regions(corners.astype(np.float64), comm.size,
                            OVERLAP_FRACTION * geometry.n if overlap is None else overlap)
    quiet = (lambda msg: None) if comm.rank else log
    mine = reconstruct_region(path, comm.rank, regions[comm.rank], corners, params, rank_backend(params, comm),
                              progress and comm.rank == 0, quiet, stop)
    if comm.size == 1:
        mine.result.attrs.update({"mode": "async", "regions": 1, "region_views": [len(mine.views)]})
        return mine.result
    t0 = time.perf_counter()
    gathered = comm.gather(mine)
    stitched = stitch_regions(gathered, corners, shape) if comm.rank == 0 else None
    stitched = comm.bcast(stitched)
    stitched.attrs["communication_s"] = time.perf_counter() - t0 - stitched.attrs["stitch_s"]
    return stitched
