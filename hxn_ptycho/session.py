"""The reconstruction as a session you feed while the scan runs.

``append_views`` (the positions of a chunk of views, and this rank's share of their frames),
``iterate(n)`` (DM iterations on the views so far), ``snapshot()`` (the current object, probe,
view count, iteration and data error) and ``finish()`` (the offline schedule from the live state:
automatic modes, position refinement, the ML stage; the same :class:`~hxn_ptycho.engine.Reconstruction`
and iteration objects as an offline run).

The offline job is the special case "append every view, run the schedule": with one chunk and no
live iterations the session builds exactly the reconstruction :func:`hxn_ptycho.engine.reconstruct`
builds (same canvas, same rank slices, same batches), so its result is bit-identical.

Design points (the streaming service NSLS2/holoptycho grows fixed-size buffers and stops at 8192
views; here the arrays grow with the views, bounded only by memory):

- **The canvas** is sized from the scan's extent (the start document's, or the first chunk's)
  plus the engine's margin. A view whose window leaves the extent *grows* the canvas (the object
  is padded with ones and every corner shifted when it grows up or left); with ``grow=False`` it
  is refused with :class:`CanvasError` naming the view. Nothing is clamped in silence; growths
  are counted (``attrs["live_canvas_grown"]``).
- **New views' exit waves** start as the current probe × object (``ψ = P·O``, equation (2)).
- **Ranks**: each chunk is dealt in contiguous slices, one per rank, so that every rank's count
  follows the even split of the views so far; a rank reads only its own slice of the chunk's
  frames (:meth:`ReconSession.share`). The session's view order is rank-major (rank 0's views, then
  rank 1's, ...); results are returned in the scan file's order.
- **The final phase** (:meth:`ReconSession.finish` after live iterations) restarts the exit waves
  from the live object and probe (ψ = P·O), re-measures the data's power and gain over every view
  and re-plans the batches as an offline run would, then runs the schedule from the iteration
  :func:`resume_at` gives: the live iterations count as the schedule's head, the final phase runs
  the rest, at least the last ``live_final_share`` of it, and every ML iteration and the position
  refinement. So the final result equals an offline run of the complete scan file started
  (``init_from``) from the saved live state (:meth:`save_state`), which records that iteration
  (``resume_iteration``) and which the engine resumes at. That is when the live phase kept up
  (:func:`takes_live_state`); when it fell behind (views arrived faster than it iterated) the live
  state is a worse start than the initial guess, and the final phase is the cold offline run of
  every view (no state saved; ``attrs["final_from_live_state"]`` says which).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .dm_iteration import DMIteration
from .engine import LocalReducer, Reconstruction, estimate_gain, plan_memory
from .errors import BadInput
from .geometry import Geometry
from .params import ReconParams, algorithm_stages
from .probemodes import ProbeModeManager
from .resultfile import ResultData, write_result
from .scanfile import ScanData

log = logging.getLogger(__name__)


class CanvasError(BadInput):
    """A view lies outside the object canvas and the session may not grow it."""


@dataclass
class Extent:
    """The scan area in µm: x (object columns) and y (rows), as the start document announces it."""

    x_um: tuple[float, float]
    y_um: tuple[float, float]

    @classmethod
    def of_points(cls, points: np.ndarray) -> "Extent":
        pts = np.asarray(points, np.float64)
        return cls((float(pts[0].min()), float(pts[0].max())), (float(pts[1].min()), float(pts[1].max())))


@dataclass
class Snapshot:
    """The state of a session at one moment (rank 0's copy; every rank holds the same model)."""

    object: np.ndarray                  # (L, H, W) complex
    probe: np.ndarray                   # (K, n, n) complex
    views: int                          # views in the model
    iteration: int                      # live iterations done
    data_error: float                   # of the last iteration (nan before the first)
    positions_px: np.ndarray            # (views, 2) window corners, scan-file order
    newest_view: int                    # highest scan-file index in the model (-1 before the first)
    canvas_grown: int = 0
    taken_at: float = field(default_factory=time.time)


def resume_at(params: ReconParams, live_iterations: float) -> int:
    """The schedule's iteration at which the final phase starts after ``live_iterations`` live DM
    iterations.

    The live iterations stand for the schedule's head: the final phase runs what remains, but at
    least its last ``live_final_share`` (so every view, the newest too, gets that many iterations
    on the complete scan), and never skips what the live phase does not do: a stage other than
    DM (ML) and position refinement (the final phase then starts at ``position_start``). An
    offline run of the complete scan file from the saved live state starts at the same iteration
    (the state file's ``resume_iteration``; :class:`hxn_ptycho.engine.Reconstruction`).
    """
    stages = algorithm_stages(params)
    total = sum(c for _, c in stages)
    tail = max(1, int(np.ceil(params.live_final_share * total - 1e-9)))
    head = 0
    for name, count in stages:                # the leading DM stages: what the live phase does
        if name != "DM":
            break
        head += count
    at = min(int(np.floor(live_iterations + 1e-9)), total - tail, head)
    if params.refine_positions:
        at = min(at, params.position_start)
    return max(0, at)


def takes_live_state(params: ReconParams, live_iterations: float, live_credit: float) -> bool:
    """Whether the final phase starts from the live state (resuming the schedule at
    :func:`resume_at`) or, like a cold offline run, from the initial guess.

    The live state is taken when the live phase kept up: the mean view took part in at least the
    live iterations the final phase skips (``live_credit >= resume_at(...)``). When it fell behind
    (views arrived faster than it iterated, so it appended big chunks late and ran few live
    iterations on them) the live state is a worse start than the initial guess — measured, even the
    whole schedule from it left the object 3–9 % further from the truth than a cold run with 3
    probe modes (docs/live.md) — so the final phase is then the cold offline run itself.
    """
    return live_iterations > 0 and live_credit + 1e-9 >= resume_at(params, live_iterations)


def deal(counts: list[int], m: int) -> list[int]:
    """How many of ``m`` new views each rank takes so that its total follows the even split.

    ``counts`` are the views each rank holds. From empty, this is exactly the split of
    :func:`hxn_ptycho.distributed.split_views` (so a one-chunk session equals an offline run).
    """
    size = len(counts)
    total = sum(counts) + m
    bounds = np.linspace(0, total, size + 1).round().astype(int)
    want = [int(b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    give = [max(0, w - c) for w, c in zip(want, counts)]
    while sum(give) > m:                  # a rank already past its even share: take back from the largest
        give[int(np.argmax(give))] -= 1
    while sum(give) < m:
        have = [c + g for c, g in zip(counts, give)]
        give[int(np.argmin(have))] += 1
    return give


class _LiveReconstruction(Reconstruction):
    """The engine's reconstruction, laid on the session's canvas."""

    def __init__(self, session: "ReconSession", scan: ScanData, params: ReconParams, **kw: Any) -> None:
        self._session = session
        super().__init__(scan, params, **kw)

    def _layout(self, scan: ScanData, margin: int) -> tuple[np.ndarray, tuple[int, int]]:
        return self._session._lay_out(margin)

    def canvas_origin(self) -> np.ndarray:
        return self._session._canvas_origin()


class ReconSession:
    """A reconstruction fed view by view: see the module's docstring.

    ``header`` carries the scan's geometry (``lambda_nm``, ``z_m``, ``ccd_pixel_um``, ``mask``,
    ``probe_guess``, ``attrs``) and the frame size; its ``diffamp`` may be empty ``(0, n, n)``.
    Every rank calls every method with the same arguments except the frames (its own share).
    """

    def __init__(self, header: ScanData, params: ReconParams, *, extent: Extent | None = None,
                 backend: Any = None, reducer: Any = None, grow: bool = True,
                 log: Callable[[str], None] | None = None, stop: Any = None, progress: bool = False,
                 start: Any = None) -> None:
        params.validate()
        self.header, self.params = header, params
        self.start = start          # a model to start from (the held-out count's): the engine's ``start_model``
        self.n = int(header.diffamp.shape[-1])
        self.extent = extent
        self.backend, self.reducer = backend, reducer or LocalReducer()
        self.rank, self.size = self.reducer.rank, self.reducer.size
        self.grow = grow
        self._log, self.stop, self.progress = log, stop, progress
        self.points = np.zeros((2, 0))                        # every view's position (µm), scan-file order
        self.rank_views: list[list[int]] = [[] for _ in range(self.size)]   # scan-file indices per rank
        self._fbuf = np.zeros((0, self.n, self.n), np.float32)   # this rank's frames, in its order: the
        self._fcount = 0                                         # first _fcount rows (room to grow in place)
        self._joined: list[tuple[int, int]] = []             # (views appended, live iteration then)
        self.rec: _LiveReconstruction | None = None
        self.iteration = 0
        self.errors: list[float] = []
        self.margin: int | None = None
        self._shift = np.zeros(2, np.int64)                   # canvas growth up/left (pixels)
        self._shape: tuple[int, int] | None = None
        self.canvas_grown = 0
        self._dm: DMIteration | None = None

    # --- views -------------------------------------------------------------------------------
    @property
    def n_views(self) -> int:
        return int(self.points.shape[1])

    def share(self, m: int) -> slice:
        """The slice of the next chunk of ``m`` views whose frames this rank reads."""
        give = deal([len(v) for v in self.rank_views], m)
        start = int(sum(give[:self.rank]))
        return slice(start, start + give[self.rank])

    @property
    def live_credit(self) -> float:
        """The mean over the views of the live iterations each one took part in (a view appended late
        counts only the ones after it): reported beside the live iterations (``measured["live"]``)."""
        n = sum(m for m, _ in self._joined)
        return float(sum(m * (self.iteration - at) for m, at in self._joined)) / n if n else 0.0

    @property
    def order(self) -> np.ndarray:
        """Scan-file index of each view in the session's (rank-major) order."""
        return np.array([i for views in self.rank_views for i in views], dtype=np.int64)

    def _local_slice(self) -> slice:
        start = sum(len(v) for v in self.rank_views[:self.rank])
        return slice(start, start + len(self.rank_views[self.rank]))

    def append_views(self, points: np.ndarray, frames: np.ndarray) -> None:
        """Add a chunk: ``points`` (2, m) µm of every new view, ``frames`` (k, n, n) sqrt-intensity of
        this rank's share (:meth:`share`). New views' exit waves start as the current P·O."""
        points = np.asarray(points, np.float64)
        if points.ndim != 2 or points.shape[0] != 2:
            raise BadInput(f"append_views: points must be (2, m), got {points.shape}")
        m = points.shape[1]
        mine = self.share(m)
        frames = np.asarray(frames, np.float32)
        if frames.shape != (mine.stop - mine.start, self.n, self.n):
            raise BadInput(f"append_views: rank {self.rank} must give the frames of views {mine.start}..{mine.stop} "
                           f"of the chunk, shape {(mine.stop - mine.start, self.n, self.n)}, got {frames.shape}")
        if not np.all(np.isfinite(points)) or not np.all(np.isfinite(frames)) or (frames.size and frames.min() < 0):
            raise BadInput("append_views: positions and frames must be finite, frames non-negative (sqrt(intensity))")
        first = self.n_views
        give = deal([len(v) for v in self.rank_views], m)
        at = first
        for r, g in enumerate(give):
            self.rank_views[r].extend(range(at, at + g))
            at += g
        self.points = np.concatenate([self.points, points], axis=1)
        if m:
            self._joined.append((m, self.iteration))
        if frames.shape[0]:
            need = self._fcount + frames.shape[0]
            if need > len(self._fbuf):          # grown by an eighth at a time: a chunk is not a copy of all
                buf = np.empty((_room(need, self._fcount),) + self._fbuf.shape[1:], np.float32)
                buf[:self._fcount] = self._fbuf[:self._fcount]
                self._fbuf = buf
            self._fbuf[self._fcount:need] = frames
            self._fcount = need
        if self.extent is None:
            self.extent = Extent.of_points(points)
        if self.rec is not None:
            self._extend(len(self._frames_local()) - frames.shape[0])

    def _frames_local(self) -> np.ndarray:
        return self._fbuf[:self._fcount]

    # --- the canvas ----------------------------------------------------------------------------
    def _pixel_size_m(self) -> float:
        h = self.header
        return h.lambda_nm * 1e-9 * h.z_m / (self.n * h.ccd_pixel_um * 1e-6)

    def _corners(self) -> np.ndarray:
        """Window corners (row, col) of every view in session order, as :func:`scanfile.positions_px` lays them."""
        assert self.extent is not None and self.margin is not None
        ps = self._pixel_size_m()
        px = self.points[:, self.order] * 1e-6 / ps
        o_col = self.extent.x_um[0] * 1e-6 / ps
        o_row = self.extent.y_um[0] * 1e-6 / ps
        pos = np.stack([np.round(px[1] - o_row), np.round(px[0] - o_col)], axis=1) + self.margin + self._shift
        return pos.astype(np.float64)

    def _canvas_origin(self) -> np.ndarray:
        """Where the canvas's pixel (0, 0) lies (row, col, object pixels of the positions' frame): a view at
        px has its corner at round(px − origin), as :meth:`_corners` lays it (the extent's start less the
        margin and the growth up and left)."""
        assert self.extent is not None and self.margin is not None
        ps = self._pixel_size_m()
        start = np.array([self.extent.y_um[0], self.extent.x_um[0]]) * 1e-6 / ps
        return start - self.margin - self._shift

    def _lay_out(self, margin: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The corners and the canvas (from the extent), grown for views outside it; called by the engine."""
        assert self.extent is not None
        self.margin = margin
        ps = self._pixel_size_m()
        far = np.array([self.extent.y_um[1] * 1e-6 / ps - self.extent.y_um[0] * 1e-6 / ps,
                        self.extent.x_um[1] * 1e-6 / ps - self.extent.x_um[0] * 1e-6 / ps])
        far = np.round(far).astype(int) + margin
        self._shape = (int(far[0]) + self.n + margin, int(far[1]) + self.n + margin)
        self._check_canvas()
        return self._corners(), self._shape

    def _check_canvas(self) -> tuple[int, int, int, int]:
        """Grow the canvas (or refuse) so that every view keeps the margin; returns the growth (up, left, down, right)."""
        assert self._shape is not None and self.margin is not None and self.extent is not None
        pos = self._corners()
        lo = np.maximum(0, self.margin - pos.min(axis=0)).astype(int)
        hi_lim = np.array(self._shape) - self.n - self.margin
        hi = np.maximum(0, pos.max(axis=0) - hi_lim).astype(int)
        if not (lo.any() or hi.any()):
            return 0, 0, 0, 0
        bad = int(self.order[int(np.argmax(np.max(np.maximum(self.margin - pos, pos - hi_lim), axis=1)))])
        where = f"view {bad} at x={self.points[0, bad]:.4g} µm, y={self.points[1, bad]:.4g} µm"
        if not self.grow:
            raise CanvasError(f"{where} lies outside the object canvas (scan extent x {self.extent.x_um}, "
                              f"y {self.extent.y_um} µm, plus margin); the session may not grow it (grow=False)")
        self._shift += lo
        self._shape = (self._shape[0] + int(lo[0] + hi[0]), self._shape[1] + int(lo[1] + hi[1]))
        self.canvas_grown += 1
        msg = (f"hxn-ptycho: {where} lies outside the scan extent: canvas grown by {int(lo[0])} up, "
               f"{int(lo[1])} left, {int(hi[0])} down, {int(hi[1])} right to {self._shape}")
        log.warning(msg)
        return int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1])

    # --- the model ------------------------------------------------------------------------------
    def ready(self) -> bool:
        """Whether every rank holds a view (the model can be built)."""
        return all(self.rank_views)

    def _scan(self) -> ScanData:
        h = self.header
        order = self.order
        return ScanData(diffamp=self._frames_local(), points=self.points[:, order], lambda_nm=h.lambda_nm, z_m=h.z_m,
                        ccd_pixel_um=h.ccd_pixel_um, mask=h.mask, probe_guess=h.probe_guess, attrs=dict(h.attrs),
                        views=self._local_slice())

    def _build(self) -> _LiveReconstruction:
        if not self.ready():
            raise BadInput(f"the session has {self.n_views} view(s): every one of the {self.size} rank(s) needs one")
        kw: dict[str, Any] = {"backend": self.backend, "reducer": self.reducer, "stop": self.stop,
                              "progress": self.progress}
        if self._log is not None:
            kw["log"] = self._log
        if self.start is not None:          # once: a later rebuild (a grown canvas) starts from the live model
            kw["start_model"], self.start = self.start, None
        self.rec = _LiveReconstruction(self, self._scan(), self.params, **kw)
        return self.rec

    def _extend(self, old_local: int) -> None:
        """Grow the built model by the views appended since: canvas, geometry, frames, exit waves, batches."""
        rec = self.rec
        assert rec is not None
        be = rec.be
        up, left, down, right = self._check_canvas()
        if up or left or down or right:
            L, H, W = rec.obj_shape
            obj = be.xp.ones((L, H + up + down, W + left + right), rec.cdtype)
            obj[:, up:up + H, left:left + W] = rec.obj
            rec.obj = obj
            rec.obj_shape = (L, obj.shape[1], obj.shape[2])
            for w in rec.scheduler.workers:
                w.obj_num = be.zeros(rec.obj_shape, rec.cdtype)
                w.obj_den = be.zeros((1,) + rec.obj_shape[1:], rec.rdtype)
        assert self._shape is not None
        pos = self._corners()
        rec.positions_all = pos
        old = rec.geom.order                # the rows held keep their views; the new ones follow in order
        order = None if old is None else np.concatenate([old, np.arange(len(old), len(self._frames_local()))])
        rec.geom = Geometry(pos, self._local_slice(), self.n, self._shape, subpixel=rec.params.refine_positions,
                            order=order)
        frames = self._frames_local()
        new = frames[old_local:]
        rec.diffamp = be.asarray(frames, rec.rdtype)
        rec.scan = self._scan()
        good = np.ones((self.n, self.n), bool) if self.header.mask is None else self.header.mask
        add = np.array([float(np.sum(np.square(new, dtype=np.float64) * good)), float(len(new)) * float(good.sum())])
        rec.reducer.allreduce_sum([add])
        rec.total_intensity += float(add[0])
        rec.good_pixels_total += float(add[1])
        N = len(frames)
        rec.store.grow(N, _room(N, old_local))                   # in place where it has room
        batch = rec.plan.batch_size
        rec.scheduler.rebatch(N, batch)
        w0 = rec.scheduler.workers[0]
        for s in range(old_local, N, batch):                     # ψ = P·O for the new views (2)
            rec._init_psi(w0, slice(s, min(s + batch, N)))

    # --- the live phase ---------------------------------------------------------------------------
    def iterate(self, n: int) -> float:
        """``n`` DM iterations on the views so far; returns the data error of the last (nan if none could run)."""
        if self.rec is None:
            if not self.ready():
                return float("nan")
            self._build()
        rec = self.rec
        assert rec is not None
        if self._dm is None:
            self._dm = DMIteration(rec)
        err = float("nan")
        for _ in range(int(n)):
            err, _ep, _eo = self._dm.iterate(self.iteration)
            if not np.isfinite(err):
                raise FloatingPointError(f"the live reconstruction diverged (non-finite error at iteration "
                                         f"{self.iteration})")
            self.iteration += 1
            self.errors.append(float(err))
        return float(err)

    def snapshot(self) -> Snapshot:
        """The current object and probe (numpy), views, iteration and data error."""
        pos = np.zeros((self.n_views, 2))
        if self.rec is None:
            return Snapshot(object=np.ones((1, self.n, self.n), np.complex64), probe=np.zeros((1, self.n, self.n),
                            np.complex64), views=0, iteration=0, data_error=float("nan"), positions_px=pos,
                            newest_view=self.n_views - 1, canvas_grown=self.canvas_grown)
        rec = self.rec
        pos[self.order] = rec.geom.positions_all
        return Snapshot(object=np.array(rec.be.asnumpy(rec.obj)), probe=np.array(rec.be.asnumpy(rec.probe)),
                        views=self.n_views,
                        iteration=self.iteration, data_error=self.errors[-1] if self.errors else float("nan"),
                        positions_px=pos, newest_view=self.n_views - 1, canvas_grown=self.canvas_grown)

    def save_state(self, path: Any) -> None:
        """The live object and probe as a result file (an ``init_from`` for an offline run, which then
        resumes the schedule at its ``resume_iteration``: :func:`resume_at`)."""
        snap = self.snapshot()
        it = len(self.errors)
        K, L = snap.probe.shape[0], snap.object.shape[0]
        from . import modes
        write_result(path, ResultData(
            object=snap.object, probe=snap.probe, positions_px=snap.positions_px,
            error_data=np.asarray(self.errors, np.float64), error_probe=np.full((it, K), np.nan),
            error_object=np.full((it, L), np.nan), probe_power_fraction=modes.power_fractions(snap.probe),
            params=self.params.to_dict(), attrs={"live_state": True, "live_views": snap.views,
                                                 "live_iterations": snap.iteration,
                                                 "live_credit": self.live_credit,
                                                 "resume_iteration": resume_at(self.params, snap.iteration)}))

    # --- the final phase ----------------------------------------------------------------------------
    def _restart_from_live(self) -> None:
        """As an offline run of the complete scan would start from the live object and probe."""
        rec = self.rec
        assert rec is not None
        p, be = self.params, rec.be
        frames = self._frames_local()
        good = np.ones((self.n, self.n), bool) if self.header.mask is None else self.header.mask
        local = np.array([float(np.sum(np.square(frames, dtype=np.float64) * good)),
                          float(len(frames)) * float(np.sum(good))])
        rec.reducer.allreduce_sum([local])
        rec.total_intensity, rec.good_pixels_total = float(local[0]), float(local[1])
        if not p.detector_gain:
            rec.gain, _how = estimate_gain(frames, self.header.mask, rec.reducer)
            rec.pbound = float(p.power_bound) * rec.gain
        K = rec.probe.shape[0]
        L = rec.obj_shape[0]
        max_k = max(p.auto_max_modes, ProbeModeManager.initial_count(p)) if p.probe_modes == "auto" else K
        plan = plan_memory(len(frames), self.n, L * K, rec.obj_shape, p, be, rec.workers, L * max_k)
        if plan.batch_size != rec.plan.batch_size:
            for w in rec.scheduler.workers:
                w.alloc(plan.batch_size, L, K, self.n, rec.obj_shape, rec.cdtype, rec.rdtype)
        rec.plan = plan
        rec.scheduler.rebatch(len(frames), plan.batch_size)
        rec.overlap_rounds = []
        rec.modes_mgr = ProbeModeManager(rec)
        rec._reorder_views()                # every view in the spatial order, as an offline run lays them
        rec._each(rec._init_psi)
        rec.first_iteration = resume_at(p, self.iteration)

    def final_from_live_state(self) -> bool:
        """Whether the final phase starts from this live state (:func:`takes_live_state`); where the
        live phase fell behind, rank 0 says so (the final phase is then the cold offline run)."""
        live = self.rec is not None and self.iteration > 0
        from_live = live and takes_live_state(self.params, self.iteration, self.live_credit)
        if live and not from_live and self.rank == 0 and self._log is not None:
            self._log(f"hxn-ptycho: the live phase fell behind ({self.iteration} live iterations, "
                      f"{self.live_credit:.1f} per view): the final phase starts from the initial guess")
        return from_live

    def finish(self, state_path: Any = None) -> ResultData:
        """The offline schedule (``params.algorithm``) from the live state, from the iteration
        :func:`resume_at` gives (the live iterations stand for the ones before); the result in
        scan-file order.

        With no live iterations and one chunk this is exactly the offline reconstruction.
        ``state_path``: where to save the live state first (see :meth:`save_state`).
        """
        live = self.rec is not None and self.iteration > 0
        from_live = self.final_from_live_state()
        if state_path is not None and from_live and self.rank == 0:
            self.save_state(state_path)
        if live and not from_live:            # fell behind: the final phase is the cold offline run
            assert self.rec is not None
            self.rec.close()
            self.rec, self._dm = None, None
            self._shift = np.zeros(2, np.int64)     # laid out anew for every view, as one chunk would be
        if self.rec is None:
            self._build()
        elif live:
            self._restart_from_live()
        rec = self.rec
        assert rec is not None
        res = rec.run()
        order = self.order
        pos = np.empty_like(res.positions_px)
        pos[order] = res.positions_px
        res.positions_px = pos
        if res.positions_refined_px is not None:
            ref = np.empty_like(res.positions_refined_px)
            ref[order] = res.positions_refined_px
            res.positions_refined_px = ref
        res.attrs.update({"live_iterations": self.iteration, "live_canvas_grown": self.canvas_grown,
                          "final_from_live_state": bool(from_live)})
        return res

    def close(self) -> None:
        if self.rec is not None:
            self.rec.close()


def _room(need: int, have: int) -> int:
    """Rows to allocate for ``need`` where ``have`` are in use: exactly ``need`` the first time (an
    offline run appends every view at once), else an eighth more, so that appending a chunk copies
    the rows so far only once every eighth of growth, not at every chunk."""
    return need if have == 0 else need + need // 8


def header_of(scan: ScanData) -> ScanData:
    """A scan's geometry without its frames (the header a session starts from)."""
    return ScanData(diffamp=np.zeros((0, scan.n, scan.n), np.float32), points=np.zeros((2, 0)),
                    lambda_nm=scan.lambda_nm, z_m=scan.z_m, ccd_pixel_um=scan.ccd_pixel_um, mask=scan.mask,
                    probe_guess=scan.probe_guess, attrs=dict(scan.attrs))
