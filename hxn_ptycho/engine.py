"""The reconstruction loop, written once for one process or many: the chain of iteration objects
(DM, :mod:`hxn_ptycho.dm_iteration`; ML, :mod:`hxn_ptycho.ml`) over one Reconstruction's parts.

The loop works on the views this process holds (a rank's slice of the scan). Every sum over
views — the numerators and denominators of the probe and object updates and the error figures —
goes through a *reducer*: the identity for one process, an MPI Allreduce for many
(:mod:`hxn_ptycho.distributed`). So the 1-rank and K-rank reconstructions run the same code.

Within a process, the CPU backend splits the batches of views statically over ``threads``
workers, each with its own buffers and accumulators (summed in a fixed order, so results are
reproducible); the GPU backend uses one worker and large batches.
"""
from __future__ import annotations

import json

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import logging

import numpy as np

from . import __version__, dm, initial, modes
from .backend import check_backend, get_backend
from .dm_iteration import DMIteration
from .geometry import Geometry, spatial_order
from .parts import BatchScheduler, ExitWaveStore
from .probemodes import ProbeModeManager
from .params import ParamError, ReconParams, algorithm_stages
from .resultfile import ResultData, read_result
from .scanfile import ScanData, canvas_origin, positions_px


logger = logging.getLogger(__name__)
RELAX_WARN = 0.05       # a mean relaxation r below this: the power bound is not damping DM


class LocalReducer:
    """The reducer of a single process: sums over ranks are the identity."""

    rank = 0
    size = 1

    def allreduce_sum(self, arrays: list) -> None:
        pass


class MemoryBoundError(ParamError):
    """The reconstruction does not fit in the memory bound."""


@dataclass
class MemoryPlan:
    batch_size: int
    exit_waves_gb: float
    frames_gb: float
    batch_buffers_gb: float
    accumulators_gb: float
    fft_work_gb: float = 0.0
    streaming: bool = False         # exit waves in (pinned) host memory, moved batch by batch

    @property
    def total_gb(self) -> float:
        """Of the working memory (the GPU's, for the GPU backend)."""
        resident = 0.0 if self.streaming else self.exit_waves_gb
        return resident + self.frames_gb + self.batch_buffers_gb + self.accumulators_gb + self.fft_work_gb

    def describe(self) -> str:
        where = " in host memory, streamed" if self.streaming else ""
        return (f"peak memory estimate {self.total_gb:.2f} GB (exit waves {self.exit_waves_gb:.2f}{where}, "
                f"frames {self.frames_gb:.2f}, batch buffers {self.batch_buffers_gb:.2f} for {self.batch_size} views, "
                f"accumulators {self.accumulators_gb:.2f}"
                + (f", FFT work {self.fft_work_gb:.2f}" if self.fft_work_gb else "") + ")")


CACHE_BATCH_BYTES = 2 * 2**20     # CPU: a batch's exit waves fit in cache


def cache_batch(view_bytes: int, n_views: int) -> int:
    """CPU: the views per batch whose exit waves (``view_bytes`` each) fit in the cache."""
    return max(1, min(CACHE_BATCH_BYTES // view_bytes, n_views))


def default_memory_bound_gb(backend: Any) -> float:
    """Without a user bound: 90 % of the GPU's memory, or 75 % of the host's physical memory."""
    info = backend.memory_info()
    if info is not None:
        return 0.9 * info[1] / 2**30
    try:
        return 0.75 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4.0


def plan_memory(n_local: int, n: int, modes_total: int, obj_shape: tuple[int, int, int], params: ReconParams,
                backend: Any, workers: int, max_modes: int | None = None) -> MemoryPlan:
    """Choose the batch size and estimate the peak memory of one process; raise when over the bound."""
    itemsize = 16 if params.precision == "double" else 8
    m = max_modes or modes_total
    view_bytes = m * n * n * itemsize
    gb = 1 / 2**30
    psi = n_local * view_bytes * gb              # ψ alone (dm.dm_step keeps no F(ψ))
    frames = n_local * n * n * itemsize / 2 * gb
    acc = workers * (obj_shape[0] * obj_shape[1] * obj_shape[2] * itemsize * 1.5 + 2 * m * n * n * itemsize) * gb
    bound = params.max_memory_gb or default_memory_bound_gb(backend)

    def make(stream: bool) -> MemoryPlan:
        per_view = (5 if stream else 4) * view_bytes + obj_shape[0] * n * n * itemsize
        if params.batch_size:
            batch = params.batch_size
        elif backend.cache_batches:
            batch = cache_batch(view_bytes, n_local)
        else:
            free = bound / gb - ((0 if stream else psi) + frames + acc) / gb
            batch = max(1, int(free * 0.5 // (per_view * workers)))
        batch = max(1, min(batch, n_local))
        cdtype = np.complex128 if params.precision == "double" else np.complex64
        fft_work = float(backend.fft_work_bytes(batch, m, n, cdtype)) * gb
        return MemoryPlan(batch, psi, frames, workers * batch * per_view * gb, acc, fft_work, stream)

    stream = params.exit_waves_on_host
    plan = make(bool(stream))
    if stream is None and plan.total_gb > bound and not backend.on_host:
        plan = make(True)           # the scan does not fit on the GPU: keep the exit waves on the host
    if plan.total_gb > bound:
        raise MemoryBoundError(
            f"the reconstruction needs about {plan.total_gb:.2f} GB per process ({plan.describe()}), more than "
            f"the memory bound of {bound:.2f} GB (max_memory_gb); use more MPI ranks, fewer modes or a larger "
            f"max_memory_gb")
    return plan


def estimate_gain(diffamp: np.ndarray, mask: np.ndarray | None, reducer: Any,
                  sample: int = 2_000_000) -> tuple[float, str]:
    """The data's units per photon, from the quantum of the counts, agreed over the ranks.

    Counting detectors give intensities k·g (k photons, g units per photon): the low values are
    whole multiples of g: so are the steps between the distinct low values, the smallest one g.
    Unquantised data (an integrating detector, a normalised scan) give 1: the power bound then
    stays in data units.
    """
    frames = np.asarray(diffamp).reshape(len(diffamp), -1)
    per_frame = frames.shape[1] if mask is None else int(np.count_nonzero(mask))
    frames = frames[::max(1, frames.shape[0] * per_frame // sample)]    # about `sample` values, no full copy
    flat = (frames if mask is None else frames[:, np.asarray(mask).ravel()]).ravel()
    nonzero = flat > 0
    nonzero |= flat < 0                 # √I ≠ 0 ⇔ I > 0 (NaN excluded, as I > 0 does)
    pos = np.square(flat[nonzero], dtype=np.float64)    # the positive intensities, no float64 copy of the rest
    del flat, nonzero
    gain, ok = 1.0, 0.0
    if pos.size >= 1000:
        # the lowest distinct values (float rounding merged): at high counts the fewest photons a
        # pixel sees may be thousands, but neighbouring counts still occur, so the steps between
        # them are whole multiples of g, the smallest one g itself (or a small multiple)
        count = min(pos.size, 20_000)
        distinct = _distinct(np.sort(np.partition(pos, count - 1)[:count]))
        if distinct.size < 300:             # few low values (low counts): the values of a subsample
            distinct = _distinct(np.unique(pos[::max(1, pos.size // 200_000)]))
        distinct = distinct[:300]
        steps = np.diff(distinct)
        for m in range(1, 9) if steps.size >= 8 else ():
            q = float(steps.min()) / m
            k = np.round(steps / q)
            if np.mean(np.abs(steps / q - k) < 0.05) > 0.9:
                g = float(np.median(steps / k))
                span = float(distinct[-1] - distinct[0])           # many quanta: g to rounding
                gain, ok = span / max(round(span / g), 1), 1.0
                break
    buf = np.array([gain * ok, ok, 1.0])
    reducer.allreduce_sum([buf])
    if buf[1] == buf[2]:            # every rank found the same kind of data
        return float(buf[0] / buf[1]), "the quantum of the counts"
    return 1.0, "counts not quantised: data units"


def _sum_intensity(diffamp: np.ndarray, good: np.ndarray, chunk: int = 64) -> float:
    """Σ √I² over the good pixels, ``chunk`` frames at a time (no float64 copy of all the data)."""
    total = 0.0
    for i in range(0, len(diffamp), chunk):
        total += float(np.sum(np.square(diffamp[i:i + chunk], dtype=np.float64) * good))
    return total


def _distinct(values: np.ndarray) -> np.ndarray:
    """The distinct values of sorted ``values``, those within float rounding (10⁻⁴) merged."""
    return values[np.concatenate([[True], np.diff(values) > 1e-4 * values[1:]])]


class _Worker:
    """Buffers and accumulators of one worker thread (one static share of the batches)."""

    def __init__(self, be: Any, batch: int, L: int, K: int, n: int, obj_shape: tuple, cdtype: Any, rdtype: Any,
                 streaming: bool = False):
        self.be = be
        self.streaming = streaming
        self.alloc(batch, L, K, n, obj_shape, cdtype, rdtype)

    def alloc(self, batch: int, L: int, K: int, n: int, obj_shape: tuple, cdtype: Any, rdtype: Any) -> None:
        be = self.be
        if self.streaming:            # device copies of one batch of the host-resident exit waves
            self.psi = be.empty((batch, L, K, n, n), cdtype)
        self.phi = be.empty((batch, L, K, n, n), cdtype)
        self.work = be.empty((batch, L, K, n, n), cdtype)
        self.objwin = be.empty((batch, L, n, n), cdtype)
        self.tmp = be.empty((batch, L, n, n), cdtype)         # scratch of sub-pixel windows
        self.onum_src = be.empty((batch, L, n, n), cdtype)
        self.obj_num = be.zeros(obj_shape, cdtype)
        self.obj_den = be.zeros((1,) + obj_shape[1:], rdtype)
        self.probe_num = be.zeros((K, n, n), cdtype)
        self.probe_den = be.zeros((n, n), rdtype)
        self.err = 0.0
        self.relax = dm.RelaxSum()                            # Σ r of the relaxed projections of a DM pass
        self.dm_sums: Any = None                              # the object sums (6) the DM Fourier pass fills
        self.nll = self.d1 = self.d2 = 0.0                   # sums of the ML passes


def stderr_log(msg: str) -> None:
    """The engine's log when none is given: one line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def _stop_requested(stop: Any) -> bool:
    """``stop`` is None, a callable returning true to stop, or an object with ``is_set()`` (an Event)."""
    if stop is None:
        return False
    if hasattr(stop, "is_set"):
        return bool(stop.is_set())
    return bool(stop())


class Reconstruction:
    """One multi-mode DM reconstruction of the views this process holds."""

    def __init__(self, scan: ScanData, params: ReconParams, *, backend: Any = None, reducer: Any = None,
                 progress: bool = False, log: Callable[[str], None] | None = None, stop: Any = None,
                 spatial_order: bool = True, start_model: Any = None) -> None:
        params.validate()
        self.spatial_order = bool(spatial_order)   # ψ's rows in the views' spatial order (_view_order)
        scan.validate()
        self.stages = algorithm_stages(params)
        self.iterations = sum(c for _, c in self.stages)
        self.stop = stop
        self.scan, self.params = scan, params
        self.ml_mode_cap = 1.0          # ML's per-mode probe-gradient scaling (hxn_ptycho.mode_count's fits)
        self.ml_mode_sparsity = 0.0     # ML's penalty on the modes' norms, ml.mode_penalty (mode_count's fits)
        self.reducer = reducer or LocalReducer()
        self.be = check_backend(backend or get_backend(params.backend, params.threads))
        self.progress = progress and self.reducer.rank == 0
        self.log = log or stderr_log
        self.cdtype = np.complex128 if params.precision == "double" else np.complex64
        self.rdtype = np.float64 if params.precision == "double" else np.float32
        self.overlap_rounds: list[int] = []        # probe updates of each DM iteration
        self.refining_positions = False            # no relaxation floor (dm_relax_floor) while true
        self.first_iteration = 0                   # the schedule starts here (a live state resumes it)
        self.start_model = start_model             # a model to start from, once (the held-out count's)
        self._setup()

    @property
    def pos(self) -> np.ndarray:
        """Integer window corners of this process's views (the sub-pixel ones are in ``geom``)."""
        return self.geom.corner

    # --- set-up ------------------------------------------------------------------------------
    def _layout(self, scan: ScanData, margin: int) -> tuple[np.ndarray, tuple[int, int]]:
        """Window corners of every view and the object shape; a live session
        (:mod:`hxn_ptycho.session`) lays them on a canvas sized from the scan's extent instead."""
        return positions_px(scan.points, scan.pixel_size_m, scan.n, margin)

    def _setup(self) -> None:
        scan, p, be = self.scan, self.params, self.be
        be.prepare(self.cdtype)     # kernels loaded before ψ is allocated; their loading's leftovers given back
        n = scan.n
        # refined windows may move outwards: room for the largest correction and a bilinear pixel
        reach = max(p.position_max_shift, p.position_search_radius)
        self.margin = p.margin + (int(np.ceil(reach)) + 1 if p.refine_positions else 0)
        pos_all, shape = self._layout(scan, self.margin)
        self.positions_all = pos_all
        self.n = n
        start, stop, _ = scan.views.indices(len(pos_all))
        self.geom = Geometry(pos_all, scan.views, n, shape, subpixel=p.refine_positions,
                             order=self._view_order(pos_all[start:stop]))
        if len(self.geom) == 0:
            raise ParamError(f"process {self.reducer.rank} holds no views of the scan (more ranks than views?)")
        L = p.object_modes
        K = ProbeModeManager.initial_count(p)
        self.obj_shape = (L, shape[0], shape[1])
        self.workers = be.workers
        max_k = max(p.auto_max_modes, K) if p.probe_modes == "auto" else K
        self.plan = plan_memory(len(self.pos), n, L * K, self.obj_shape, p, be, self.workers, L * max_k)
        if self.reducer.rank == 0:
            self.log(f"hxn-ptycho: {scan.n_views} views of {n}x{n}, object {shape[0]}x{shape[1]}, "
                     f"{K} probe mode(s){' (auto)' if p.probe_modes == 'auto' else ''}, {L} object mode(s), "
                     f"{self.reducer.size} process(es) x {self.workers} worker(s), backend {be.name}; "
                     f"{self.plan.describe()}")
        self.diffamp = be.asarray(scan.diffamp, self.rdtype)
        self.mask = None if scan.mask is None or scan.mask.all() else be.asarray(scan.mask, bool)
        good = np.ones((n, n), bool) if scan.mask is None else scan.mask
        local = np.array([_sum_intensity(scan.diffamp, good), float(len(self.pos)) * float(np.sum(good))])
        self.reducer.allreduce_sum([local])
        self.total_intensity, self.good_pixels_total = float(local[0]), float(local[1])
        # of the relaxed Fourier projection, per pixel: photon units × the detector's units per photon
        self.gain, how = (float(p.detector_gain), "given") if p.detector_gain else \
            estimate_gain(scan.diffamp, scan.mask, self.reducer)
        self.pbound = float(p.power_bound) * self.gain
        if self.reducer.rank == 0 and p.power_bound and abs(self.gain - 1) > 1e-3:
            self.log(f"hxn-ptycho: detector gain {self.gain:.4g} per photon ({how}): power bound "
                     f"{self.pbound:.4g} in the data's units")
        # the model to start from: ``start_model`` (the held-out count's model, hxn_ptycho.mode_count), else a
        # previous result file (init_from), else the starting guesses of hxn_ptycho.initial
        previous = self.start_model if self.start_model is not None else \
            read_result(p.init_from) if p.init_from else None
        self.start_model = None
        if previous is not None and previous.attrs.get("live_state"):    # hxn_ptycho.session.resume_at
            self.first_iteration = int(previous.attrs.get("resume_iteration", 0))
        # laid on this canvas by where each one's pixel (0, 0) lies, where the previous model says so
        self.obj = be.asarray(initial.initial_object(self.obj_shape, p, previous, self.canvas_origin(),
                                                     scan.pixel_size_m * 1e6), self.cdtype)
        power, mean_amp = initial.mean_frame_power(scan, self.total_intensity, self.reducer)
        self.probe = be.asarray(initial.initial_probe(scan, p, K, power, mean_amp, self.positions_all, previous),
                                self.cdtype)
        batch = self.plan.batch_size
        self.streaming = self.plan.streaming
        self.store = ExitWaveStore(be, (len(self.pos), L, K, n, n), self.cdtype, self.streaming)
        self.scheduler = BatchScheduler(len(self.pos), batch, [
            _Worker(be, batch, L, K, n, self.obj_shape, self.cdtype, self.rdtype, self.streaming)
            for _ in range(self.workers)])
        self.modes_mgr = ProbeModeManager(self)
        try:
            self._each(self._init_psi)
        except BaseException:
            self.close()
            raise

    def canvas_origin(self) -> np.ndarray:
        """Where the object canvas's pixel (0, 0) lies in the scan's own frame, in object pixels (row, col):
        a view at px (its position over the pixel size) has its window's corner at round(px − origin)
        (:func:`hxn_ptycho.scanfile.canvas_origin`; a live session's canvas from the scan's extent, grown as
        views arrive, answers for itself). Any canvas of the same scan (another margin, a subset of its views,
        a live session's) differs from this one by the difference of their origins
        (:func:`hxn_ptycho.initial.lay_object`), and the result's ``frame`` is this origin in µm."""
        return canvas_origin(self.scan.points, self.scan.pixel_size_m, self.margin)

    # --- the views' order ----------------------------------------------------------------------
    def _view_order(self, local: np.ndarray) -> np.ndarray | None:
        """The row of ψ (and of every batch) of each of this process's views (``local``: their corners
        in the given order): :func:`geometry.spatial_order` in bands of n/4 rows, so that the object,
        numerator and denominator windows of consecutive views stay in the CPU's cache (−14 µs a view
        of 128², docs/performance.md, session 21). None (the given order) on a GPU (no such cache
        effect; its batches are large), with ``spatial_order=False``, and while positions are refined
        (:mod:`hxn_ptycho.positions` addresses views by their index in the scan)."""
        if not self.spatial_order or self.params.refine_positions or not self.be.cache_batches:
            return None
        return spatial_order(local, max(1, self.n // 4))

    def _reorder_views(self) -> None:
        """Lay the rows out again in :meth:`_view_order` of the current corners (after a live
        session's appends, before ψ is started again from the model: the rows' contents are lost)."""
        g = self.geom
        order = self._view_order(g.positions_all[g.start:g.stop])
        if order is None and g.order is None:
            return
        self.geom = Geometry(g.nominal_all, slice(g.start, g.stop), self.n, g.shape,
                             subpixel=self.params.refine_positions, order=order)

    def use_given_order(self) -> None:
        """ψ's rows in the views' given order from now on, ψ moved with them (exact: for code that
        addresses a view's row by its index, as the experiments of ``benchmarks/auto_mode_*.py`` do)."""
        g = self.geom
        if g.order is None:
            return
        psi = self.store.psi
        psi[g.order] = psi.copy()           # row r holds view order[r]: it goes to row order[r]
        self.geom = Geometry(g.nominal_all, slice(g.start, g.stop), self.n, g.shape,
                             subpixel=self.params.refine_positions)
        self.geom.set_positions(g.positions_all)

    @property
    def rows(self) -> np.ndarray | None:
        """The index in ``diffamp`` (the views as given) of each row of ψ; None: the same order."""
        return self.geom.order

    def frames(self, w: Any, b: slice) -> Any:
        """√I of the views at rows ``b`` (``diffamp`` is kept in the given order, not copied: in
        the spatial order the batch's frames are gathered into the worker's buffer)."""
        rows = self.geom.order
        if rows is None:
            return self.diffamp[b]
        B = b.stop - b.start
        buf = getattr(w, "amp", None)
        if buf is None or len(buf) < B:
            buf = w.amp = self.be.empty((max(B, self.plan.batch_size),) + self.diffamp.shape[1:], self.diffamp.dtype)
        return np.take(self.diffamp, rows[b], axis=0, out=buf[:B], mode="clip")   # (unbuffered)

    def batch_frames(self, b: slice) -> tuple[Any, Any]:
        """(frames, rows) for :meth:`Backend.fourier_pass`: the batch's frames, or all frames and the
        indices of the batch's in them (read where they lie, no gathered copy)."""
        rows = self.geom.order
        return (self.diffamp[b], None) if rows is None else (self.diffamp, rows[b])

    def frames_in_rows(self) -> Any:
        """All of ``diffamp`` in the rows' order (a copy when the order is not the given one)."""
        rows = self.geom.order
        return self.diffamp if rows is None else np.take(self.diffamp, rows, axis=0)

    # --- the parts: exit-wave store and batch scheduler (hxn_ptycho.parts) ----------------------
    @property
    def psi(self) -> Any:
        return self.store.psi

    @property
    def batches(self) -> list[slice]:
        return self.scheduler.batches

    @property
    def _workers(self) -> list:
        return self.scheduler.workers

    def _load(self, w: "_Worker", name: str, b: slice) -> Any:
        return self.store.load(w, name, b)

    def _store(self, w: "_Worker", name: str, b: slice, dev: Any) -> None:
        self.store.store(w, name, b, dev)

    def _each(self, fn: Callable[[_Worker, slice], None]) -> None:
        self.scheduler.each(fn)

    def _sum_workers(self, name: str, fresh: bool = False) -> Any:
        return self.scheduler.sum(name, fresh)

    def _reset(self, *names: str) -> None:
        self.scheduler.reset(*names)

    def _init_psi(self, w: _Worker, b: slice) -> None:
        B = b.stop - b.start
        psi = self._load(w, "psi", b)
        self.geom.exit_waves(self.be, self.obj, b, self.probe, w.objwin[:B], psi, w.tmp[:B])   # ψ = P·O (2)
        self._store(w, "psi", b, psi)

    def _model_error_batch(self, w: _Worker, b: slice) -> None:
        be, B = self.be, b.stop - b.start
        pos, sub = self.geom.pass_positions(b)
        windows = self.geom.gather(be, self.obj, b, w.objwin[:B], w.tmp[:B]) if sub else None
        w.err += be.error_pass(self.obj, pos, self.probe, self.frames(w, b), self.mask, w, windows)     # (7)

    # --- shared by the iterations (DM in hxn_ptycho.dm_iteration, ML in hxn_ptycho.ml) ---------
    def _probe_terms(self) -> None:
        xp = self.be.xp
        self._probe_conj = xp.conj(self.probe)
        self._probe_intensity = (xp.square(self.probe.real) + xp.square(self.probe.imag)).sum(axis=0)

    def _reduce_relax(self) -> tuple[float, float]:
        """Means over all views of the relaxation r of the last DM Fourier step (dm.relaxation), with
        the floor and without it."""
        acc = np.array([float(sum(float(w.relax.total) for w in self._workers)),
                        float(sum(float(w.relax.raw) for w in self._workers)),
                        float(sum(w.relax.views for w in self._workers))])
        self.reducer.allreduce_sum([acc])
        return (float(acc[0] / acc[2]), float(acc[1] / acc[2])) if acc[2] else (float("nan"), float("nan"))

    def _reduce_err(self) -> float:
        err = np.array([float(sum(float(w.err) for w in self._workers))])
        self.reducer.allreduce_sum([err])
        return float(err[0])

    # --- the run --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker threads (the run is over)."""
        if getattr(self, "scheduler", None) is not None:
            self.scheduler.close()

    def model_cost(self) -> tuple[float, float]:
        """Of the current model: mean over frames and good pixels of (|F(P·O)| − √I)², and that sum / ΣI."""
        self._reset("err")
        self._each(self._model_error_batch)
        total = self._reduce_err()
        return total / max(self.good_pixels_total, 1.0), total / max(self.total_intensity, 1e-300)

    def run(self) -> ResultData:
        """Iterate, then orthogonalise the modes and measure the final cost; the threads stop either way."""
        try:
            return self._run()
        finally:
            self.close()

    def _stage_at(self) -> list[str]:
        """The algorithm of every iteration, from the chain (``DM:200,ML:100``)."""
        names: list[str] = []
        for name, count in self.stages:
            names += [name] * count
        return names

    def _should_stop(self) -> bool:
        """The stop hook, agreed by every rank (any rank asking stops them all)."""
        if self.stop is None:
            return False
        flag = np.array([1.0 if _stop_requested(self.stop) else 0.0])
        if self.reducer.size > 1:
            self.reducer.allreduce_sum([flag])
        return bool(flag[0] > 0)

    def _run(self) -> ResultData:
        p = self.params
        t0 = time.perf_counter()
        iters = self.iterations
        schedule = self._stage_at()
        err_data = np.full(iters, np.nan)
        err_probe: list[np.ndarray] = []
        err_obj = np.full((iters, self.obj_shape[0]), np.nan)
        err_relax = np.full(iters, np.nan)
        relax_warned = False
        stage_start = 0
        start = min(max(0, int(self.first_iteration)), iters - 1)   # > 0: resumed from a live state
        done = start
        refiner = None
        if p.refine_positions:
            from .positions import PositionRefiner
            refiner = PositionRefiner(self)
            self.refining_positions = start <= refiner.end
        stage: Any = None
        stage_name = None
        interrupted = False
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=iters - start, desc=schedule[start], unit="it", file=sys.stderr)
        try:
            for it in range(start, iters):
                if it > start and not np.isfinite(err_data[it - 1]):
                    raise FloatingPointError(f"the reconstruction diverged (non-finite error at iteration {it - 1})")
                if schedule[it] != stage_name:
                    stage_name = schedule[it]
                    stage = self._enter_stage(stage_name, it)
                    stage_start = it
                    if bar is not None:
                        bar.set_description(stage_name)
                d, ep, eo = stage.iterate(it)
                err_data[it], err_obj[it] = d, eo
                err_probe.append(ep)
                err_relax[it] = getattr(stage, "mean_relax", np.nan)
                if stage_name == "DM" and self.pbound > 0:
                    logger.debug("iteration %d: data error %.4g, mean relaxation r %.3f", it, d, err_relax[it])
                    # (the floor engages from a stage's second iteration: its first measures the bound)
                    if (err_relax[it] < RELAX_WARN and it > stage_start and not relax_warned
                            and self.reducer.rank == 0):
                        relax_warned = True
                        self.log(f"hxn-ptycho: warning: mean relaxation r {err_relax[it]:.3f} < {RELAX_WARN} at "
                                 f"iteration {it}: the power bound is not damping DM (dm_relax_floor "
                                 f"{p.dm_relax_floor}; docs/dm_damping.md)")
                done = it + 1
                last = it + 1 == iters
                if refiner is not None and not last:
                    if refiner.coarse_due(it) and refiner.coarse() and stage_name == "DM":
                        self._each(self._init_psi)           # exit waves from the model at the new corners
                    if refiner.due(it):
                        refiner.refine()
                    if it == refiner.end:
                        self.refining_positions = False          # DM's relaxation floor from here on
                        if refiner.guard() and stage_name == "DM":
                            self._each(self._init_psi)
                    if it >= refiner.end and self.geom.subpixel_windows and not p.position_subpixel_windows:
                        self.geom.use_subpixel(False)        # refinement over: windows on the pixel grid
                        if stage_name == "DM":
                            self._each(self._init_psi)
                    if refiner.scale_search and it == refiner.end and stage_name == "DM":
                        refiner.choose_scale(it)                  # re-initialises the exit waves
                self.modes_mgr.after_iteration(it, d, stage_name == "DM", last)
                if bar is not None:
                    bar.set_postfix_str(f"data error {d:.4g}")
                    bar.update(1)
                if not last and self._should_stop():
                    interrupted = True
                    break
        finally:
            if bar is not None:
                bar.close()
        if interrupted and self.reducer.rank == 0:
            self.log(f"hxn-ptycho: stopped on request after iteration {done} of {iters}")
        err_data, err_obj, err_relax = err_data[start:done], err_obj[start:done], err_relax[start:done]
        if not np.isfinite(err_data[-1]):
            raise FloatingPointError("the reconstruction diverged (non-finite data error)")
        self.modes_mgr.finish(iters, interrupted)
        cost, model_err = self.model_cost()
        elapsed = time.perf_counter() - t0
        probe = self.be.asnumpy(self.probe)
        K = probe.shape[0]
        ep = np.full((done - start, K), np.nan)
        for i, e in enumerate(err_probe[:done - start]):
            m = min(K, len(e))
            ep[i, :m] = e[:m]
        attrs = {"elapsed_s": elapsed, "final_cost": cost, "final_data_error": model_err,
                 "probe_modes_log": list(self.modes_mgr.log), "probe_modes_used": K, "version": __version__,
                 "backend": self.be.name, "processes": self.reducer.size, "workers": self.workers,
                 "algorithm_stages": [f"{a}:{c}" for a, c in self.stages], "interrupted": interrupted,
                 "iterations_done": done, "object_margin_px": self.margin}
        if start:
            attrs["first_iteration"] = start        # resumed: iterations before it were the live phase's
        auto = self.modes_mgr.record()
        if auto is not None:
            attrs["probe_modes_auto"] = auto      # the evidence of probe_modes=auto (shares, trends, actions)
        refined = None
        if refiner is not None:
            refined = self.geom.positions_all.copy()
            attrs["position_refinements"] = refiner.count
            attrs["position_coarse_moved"] = list(refiner.coarse_moved)
            if refiner.probe_defocus:
                attrs["position_probe_defocus"] = refiner.defocus_chosen
                attrs["position_probe_astigmatism"] = refiner.defocus_astigmatism
                attrs["position_probe_defocus_seconds"] = round(refiner.defocus_seconds, 2)
            if refiner.scale_chosen is not None:
                attrs["position_scale"] = list(refiner.scale_chosen)
                attrs["position_scale_seconds"] = round(refiner.scale_seconds, 2)
                if refiner.scale_restarted is not None:   # (the model's, a fresh start's) data error at the final corners
                    attrs["position_scale_restarted"] = list(refiner.scale_restarted)
                if refiner.scale_judged is not None:      # the second search's map and the long re-fits judging it
                    attrs["position_scale_second"] = list(refiner.scale_second_map or ())
                    attrs["position_scale_judged"] = list(refiner.scale_judged)
                if refiner.pixel_check:        # each view's pixel: the views moved, (model, fresh start moved, proposed) a round
                    attrs["position_pixel_moved"] = list(refiner.pixel_moved)
                    attrs["position_pixel_judged"] = [list(j) for j in refiner.pixel_judged]
                    attrs["position_pixel_seconds"] = round(refiner.pixel_seconds, 2)
            attrs["position_reverted"] = refiner.reverted
            attrs["position_rescued_at_end"] = refiner.rescued_at_end
            from .positions import affine_terms
            attrs["position_affine_matrix"] = affine_terms(self.geom.nominal_all, refined).tolist()
        attrs.update({f"scan_{k}": v for k, v in self.scan.attrs.items()})
        attrs["frame"] = json.dumps(result_frame(self.scan, self.canvas_origin()))
        return ResultData(object=self.be.asnumpy(self.obj), probe=probe,
                          positions_px=self.positions_all.astype(np.float64),
                          error_data=err_data, error_probe=ep, error_object=err_obj, error_relax=err_relax,
                          probe_power_fraction=modes.power_fractions(probe),
                          params=p.to_dict(), attrs=attrs, positions_refined_px=refined)

    def _enter_stage(self, name: str, it: int) -> Any:
        """The iteration object of algorithm ``name`` over this reconstruction's parts."""
        if name == "ML":
            self.modes_mgr.settle(it)    # probe_modes=auto decides before ML starts; orthogonal modes
            from .ml import MLIteration
            return MLIteration(self)
        if it > 0:                   # DM after another algorithm: exit waves from the current model
            self._each(self._init_psi)
        return DMIteration(self)


def result_frame(scan: ScanData, origin: np.ndarray) -> dict[str, Any]:
    """Where the object lies: rows along +y (``points[1]``), columns along +x (``points[0]``), and the
    (x, y) in µm of object pixel [0, 0] — the beam (probe pixel n/2) sits on each view's position, the
    window corners laid from the canvas's ``origin`` (:meth:`Reconstruction.canvas_origin`). In the stage
    frame when the scan file holds the recorded stage positions (its ``frame`` attribute, written by the
    export)."""
    pix_um = scan.pixel_size_m * 1e6
    y0, x0 = ((float(o) - scan.n // 2) * pix_um for o in origin)
    declared = scan.attrs.get("frame")
    positions = "the scan file's points (their frame is not stated)"
    if declared:
        try:
            positions = str(json.loads(declared).get("positions", positions))
        except (TypeError, ValueError, AttributeError):
            pass
    return {"rows": "+y", "cols": "+x", "origin_um": [x0, y0], "pixel_um": pix_um, "positions": positions,
            "stage_frame": bool(declared)}


def reconstruct(scan: ScanData, params: ReconParams | None = None, *, backend: Any = None, reducer: Any = None,
                progress: bool = False, log: Callable[[str], None] | None = None, stop: Any = None,
                spatial_order: bool = True) -> ResultData:
    """Reconstruct ``scan`` (this process's views of it) with the chain of ``params.algorithm``.

    ``stop`` (a callable returning true, or a ``threading.Event``) is checked after every
    iteration: when set, the loop ends after the current iteration and the result is marked
    ``attrs["interrupted"] = True`` (with the iterations done so far). Under MPI every rank
    passes its own; any rank asking stops them all. ``spatial_order``: hold the exit waves in the
    views' spatial order (faster on a CPU; the result is that of the given order to float rounding,
    every per-view output in the given order: :meth:`Reconstruction._view_order`).
    """
    params = params or ReconParams()
    evidence = start = None
    from .mode_count import counted_params, wants_count
    if wants_count(params):
        # probe_modes=auto, auto_rule='heldout': the count of the whole scan first (hxn_ptycho.mode_count)
        if reducer is not None and getattr(reducer, "size", 1) > 1:
            raise ParamError("auto_rule='heldout' counts the modes of the whole scan in one process: run it "
                             "through the job (rank 0 counts), not engine.reconstruct on each rank's views")
        params, evidence, start = counted_params(
            scan, params, log_fn=log or stderr_log, stop=stop)
    res = Reconstruction(scan, params, backend=backend, reducer=reducer, progress=progress,
                         log=log, stop=stop, spatial_order=spatial_order, start_model=start).run()
    if evidence is not None:
        res.attrs["probe_modes_auto"] = evidence
    return res
