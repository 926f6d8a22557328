"""``probe_modes="auto"`` with ``auto_rule="heldout"``: the probe-mode count read from detector pixels
that no fit ever sees (issue 18, part 2; docs/auto_modes.md, sessions 22 and 23).

The count runs *before* the reconstruction, on the whole scan (a scan of more than ``max_views`` = 100 views on
its 100 views nearest the centre, :func:`central_views`: the regime the rule was measured in, and a cost that no
longer grows with the views), and the reconstruction then runs with the count found (``engine.reconstruct``; the
job's rank 0 under MPI, :func:`hxn_ptycho.distributed.run_distributed`):

1. **Held-out pixels.** A fixed random 15 % of every frame's pixels (:func:`holdout_split`) are left out of
   every fit below: the fits treat them as masked pixels (:class:`FrameMaskBackend`).
2. **The start.** An over-complete fit (M = 6 modes: no rank-K ridge on its way, session 20) is screened
   from four starts — the default start and its quadratic pupil phase scaled by 0.5, 0.25 and −1
   (:func:`phase_start`: the data's mean amplitude fixes neither the defocus's size nor its sign). A start
   replaces the default only if its per-view held-out error beats the default's with paired z > 2
   (:func:`choose_start`). The chosen start's M-mode fit then runs the full schedule.
3. **The chain.** Its k strongest modes (k = 1 … M) with its object are refitted as k-mode models (ML, 50
   iterations, kept pixels), and mode k + 1 is kept while the per-view gains of the held-out amplitude
   error — the fits' own loss on data they never saw — have a paired z above 2 (:func:`chain_count`).
4. **The reconstruction** then runs with the count found, started from the chain's model of that count
   (:class:`CountedModel`: the over-complete fit's modes reach the true mode subspace where a K-mode fit
   from the engine's start does not, session 21), laid on the reconstruction's own canvas
   (:func:`hxn_ptycho.initial.lay_object`: the whole scan's views, room for position refinement), unless the
   user gave a warm start (``init_from``).

Opt-in (``HeldOutCount.sparsity``, docs/auto_modes.md, "Session 33"), step 3 is instead the **sparse count**: the
M-mode fit continued once a μ with ML's group penalty on the modes (:func:`ml.mode_penalty`; μ 0 a plain fit), the
continuation with the lowest held-out error chosen, the count its modes holding ≥ 1 % (:func:`sparse_count`):
right on every 10⁸ cell of the grid, on 47 of 63 in all (the chain's tie), so not the default.

One knob is principled (the significance level z = 2); the others are the measured schedule of
docs/auto_modes.md. On the 63 cells of its grid the rule finds the true count on 47 (``trend``: 19), and on
four held-out families 3, 4, 4 and 5 of 6 cells (README, "probe_modes=auto"; docs/auto_modes.md, "Session
27"). Its cost is several over-complete fits on the numpy backend (the per-frame mask is in no compiled
kernel): one to two minutes for 100 views of 64² pixels (docs/auto_modes.md, "Session 28": 89–110 s on the central
100 of 400 views, 336–401 s on all 400). The fits that do not depend on each other (the screened starts, the
k-mode refits) run side by side on the process's cores (:func:`in_parallel`, threads): the same count, bit for
bit, 1.1–1.3× faster on 2 cores (docs/auto_modes.md, "Session 29"); the M-mode fit between them is one fit.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import dm, modes
from .backend import NumpyBackend, available_cores
from .errors import HxnPtychoError
from .params import ParamError, ReconParams, parse_algorithm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldOutCount:
    """The held-out count's schedule (docs/auto_modes.md, sessions 22–23; the defaults are the measured rule)."""
    holdout: float = 0.15                   # share of every frame's pixels no fit sees
    seed: int = 22                          # of the held-out pixels' draw
    fit_modes: int = 6                      # M, the over-complete fit (at most ``auto_max_modes``)
    schedule: str = "DM:20,ML:480"          # the chosen start's M-mode fit
    screen: str = "DM:20,ML:80"             # each start's screening fit
    starts: tuple[float, ...] = (1.0, 0.5, 0.25, -1.0)   # factors of the default start's pupil phase
    refit: int = 50                         # ML iterations of each k-mode refit of the chain
    z_min: float = 2.0                      # the chain's (and the start choice's) significance level
    mode_cap: float = 10.0                  # ML's per-mode gradient scaling (MLIteration.mode_precondition_cap)
    extra_mode_power: float = 0.3           # the over-complete start's extra modes
    sparsity: tuple[float, ...] = ()        # μ of the sparse fits (ml.mode_penalty, 0 a plain fit; none: the chain counts)
    sparse_its: int = 500                   # their ML iterations, from the M-mode fit
    share_min: float = 0.01                 # the count: modes of the sparse fit chosen holding at least this share
    max_views: int = 100                    # a larger scan is counted on this many views nearest its centre
    workers: int | None = None              # fits at a time (None: this process's cores): the count is the same

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1:
            raise ParamError(f"held-out share must be in (0, 1), got {self.holdout}")
        if 1.0 not in self.starts:
            raise ParamError("the held-out count's starts must include the default start (1)")
        if self.max_views < 3:
            raise ParamError(f"the held-out count needs at least 3 views to judge a mode on, got max_views {self.max_views}")
        if self.workers is not None and self.workers < 1:
            raise ParamError(f"the held-out count needs at least 1 worker, got {self.workers}")
        if any(not (mu >= 0 and np.isfinite(mu)) for mu in self.sparsity) or not 0 < self.share_min < 1 \
                or self.sparse_its < 1:
            raise ParamError(f"the held-out count's sparse fits need sparsities ≥ 0 (got {self.sparsity}), a share "
                             f"in (0, 1) (got {self.share_min}) and ≥ 1 iteration (got {self.sparse_its})")
        if self.refit < 1 or self.fit_modes < 2:
            raise ParamError("the held-out count needs refits of ≥ 1 iteration and an over-complete fit of ≥ 2 modes")


RULE = HeldOutCount()      # the rule of record (docs/auto_modes.md); count_and_model's default


class CountInterrupted(HxnPtychoError):
    """The held-out count was stopped on request (Ctrl-C) before it found a count: nothing reconstructed."""

    exit_status = 130

    def __init__(self, message: str = "the held-out probe-mode count was stopped (Ctrl-C) before it found a "
                                      "count: nothing was reconstructed") -> None:
        super().__init__(message)


class FrameMaskBackend(NumpyBackend):
    """The numpy backend with one mask per frame: ``keep`` (views, n, n), True = fitted, in the views'
    given order. Every step that takes the scan's mask (DM's Fourier pass, ML's gradient and line search,
    the error pass) gets the kept pixels of the batch's frames instead, so a held-out pixel is left
    unconstrained exactly as a masked pixel is. The batch is found from the frames' place in ``base`` (the
    reconstruction's ``diffamp``; with ``spatial_order=False`` a batch's frames are a slice of it)."""

    def __init__(self, keep: np.ndarray, threads: int = 1) -> None:
        super().__init__(threads)
        self.keep = np.asarray(keep, bool)
        self.base: np.ndarray | None = None

    def _mask(self, diffamp: Any, rows: Any = None) -> np.ndarray:
        if self.base is None:
            raise RuntimeError("FrameMaskBackend: base (the reconstruction's diffamp) not set")
        if rows is not None:
            return self.keep[np.asarray(rows)]
        base = self.base
        off, rem = divmod(diffamp.__array_interface__["data"][0] - base.__array_interface__["data"][0],
                          base.strides[0])
        if rem or off < 0 or off + len(diffamp) > len(base) or diffamp.strides != base.strides:
            raise RuntimeError("FrameMaskBackend: the frames are not a slice of the reconstruction's diffamp")
        return self.keep[off:off + len(diffamp)]

    def fourier_pass(self, obj: Any, pos: Any, probe: Any, psi: Any, diffamp: Any, mask: Any,
                     *args: Any, **kw: Any) -> Any:
        rows = kw.get("rows", args[7] if len(args) > 7 else None)
        return super().fourier_pass(obj, pos, probe, psi, diffamp, self._mask(diffamp, rows), *args, **kw)

    def error_pass(self, obj: Any, pos: Any, probe: Any, diffamp: Any, mask: Any,
                   *args: Any, **kw: Any) -> Any:
        return super().error_pass(obj, pos, probe, diffamp, self._mask(diffamp), *args, **kw)

    def ml_gradient(self, fphi: Any, diffamp: Any, intensity: Any, mask: Any,
                    *args: Any, **kw: Any) -> tuple[float, float]:
        return super().ml_gradient(fphi, diffamp, intensity, self._mask(diffamp), *args, **kw)

    def ml_line_search(self, f0: Any, f1: Any, f2: Any, diffamp: Any, intensity: Any,
                       mask: Any, *args: Any, **kw: Any) -> tuple[float, float]:
        return super().ml_line_search(f0, f1, f2, diffamp, intensity, self._mask(diffamp), *args, **kw)


def holdout_split(scan: Any, frac: float, seed: int = 22) -> tuple[Any, np.ndarray]:
    """``frac`` of every frame's pixels held out (a fixed random mask a frame, ``seed``): a copy of the
    scan whose held-out pixels carry no data, and the mask of the kept pixels (views, n, n)."""
    keep = np.random.default_rng(seed).uniform(size=scan.diffamp.shape) >= frac
    return kept_only(scan, keep), keep


def kept_only(scan: Any, keep: np.ndarray) -> Any:
    """A copy of ``scan`` whose pixels outside ``keep`` carry no data: each is replaced by the mean √I of
    its pixel over the frames that keep it, so that nothing a fit reads (the initial probe's mean
    amplitude, the intensity total) sees a held-out count. The raw scan is not modified."""
    amp = np.asarray(scan.diffamp, np.float64)
    fill = np.sum(amp * keep, axis=0) / np.maximum(keep.sum(axis=0), 1)
    return replace(scan, diffamp=np.where(keep, amp, fill[None]).astype(scan.diffamp.dtype))


def phase_start(rec: Any, factor: float) -> np.ndarray:
    """The default start (the mean measured far-field amplitude, the total power, the extra modes of
    :func:`modes.initial_probe_modes` with the same seed) with its quadratic pupil phase c₀ scaled by
    ``factor``."""
    from . import initial
    p = rec.params
    power, mean_amp = initial.mean_frame_power(rec.scan, rec.total_intensity, rec.reducer)
    c0 = modes.defocus_for_size(mean_amp, 2.5 * initial.median_step(rec.positions_all))
    p0 = modes.pupil_phase_probe(mean_amp, factor * c0)
    p0 = p0 * np.sqrt(power / max(float(np.vdot(p0, p0).real), 1e-300))
    return modes.initial_probe_modes(p0, p.probe_modes, p.extra_mode_power, p.seed)


def fit(scan: Any, params: ReconParams, keep: np.ndarray | None = None, obj: np.ndarray | None = None,
        probe: np.ndarray | None = None, phase: float | None = None, mode_cap: float = 1.0,
        attach: Callable[[Any], None] | None = None, stop: Any = None, sparsity: float = 0.0
        ) -> tuple[np.ndarray, np.ndarray, float]:
    """One fit with ``params`` (its ``probe_modes`` an integer): object, orthogonal modes sorted by power,
    data error. ``keep`` (views, n, n): only those pixels of each frame are fitted (:class:`FrameMaskBackend`).
    From ``obj``/``probe`` when given, else from the default start with its pupil phase scaled by ``phase``
    (:func:`phase_start`; None or 1: the engine's own start). ``attach(rec)`` runs before the iterations;
    ``stop`` (as the engine's) ends the fit early and raises :class:`CountInterrupted`. ``sparsity`` > 0: ML
    minimises the data term plus :func:`ml.mode_penalty` with μ = ``sparsity`` (×√gain)."""
    from .engine import Reconstruction
    if keep is None:
        rec = Reconstruction(scan, params, log=lambda m: None, stop=stop)
    else:
        be = FrameMaskBackend(keep, params.threads or 1)
        rec = Reconstruction(scan, params, backend=be, log=lambda m: None, spatial_order=False, stop=stop)
        if rec.geom.order is not None:
            rec.close()
            raise RuntimeError("FrameMaskBackend needs the views in their given order")
        be.base = rec.diffamp
    try:
        rec.ml_mode_cap = mode_cap
        rec.ml_mode_sparsity = sparsity
        if obj is not None and probe is not None:
            rec.obj = obj.astype(rec.cdtype)
            rec.probe = probe.astype(rec.cdtype)
            rec._each(rec._init_psi)
        elif phase is not None and phase != 1:
            rec.probe = phase_start(rec, phase).astype(rec.cdtype)
            rec._each(rec._init_psi)
        if attach is not None:
            attach(rec)
        res = rec.run()
    finally:
        rec.close()
    if res.attrs.get("interrupted"):
        raise CountInterrupted()
    return (np.asarray(res.object), modes.orthogonalize(np.asarray(res.probe))[0],
            float(res.attrs["final_data_error"]))


def model_amplitude(scan: Any, obj: np.ndarray, probe: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """|F(P·O_j)| summed incoherently over the modes for every view j (the views' given order), the
    measured √I it is compared with, and the scan's mask (None: every pixel good)."""
    from .engine import Reconstruction
    rec = Reconstruction(scan, ReconParams(iterations=1, probe_modes=len(probe), threads=1),
                         log=lambda m: None, spatial_order=False)
    try:
        rec.obj = obj.astype(rec.cdtype)
        rec.probe = probe.astype(rec.cdtype)
        out = np.zeros(rec.diffamp.shape)

        def batch(w: Any, b: slice) -> None:
            be, B = rec.be, b.stop - b.start
            f = be.fft2(rec.geom.exit_waves(be, rec.obj, b, rec.probe, w.objwin[:B], w.phi[:B], w.tmp[:B]))
            out[b] = be.asnumpy(dm._modulus(be, f))
        rec.scheduler.each(batch)
        mask = None if rec.mask is None else np.asarray(rec.be.asnumpy(rec.mask), bool)
        return out, np.asarray(rec.be.asnumpy(rec.diffamp), np.float64), mask
    finally:
        rec.close()


def held_out_errors(scan: Any, obj: np.ndarray, probe: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Σ(|F(P·O_j)| − √I_j)² of each view j over ``pixels`` (views, n, n) of its frame (and the scan's
    good pixels): the fits' own loss on the pixels given."""
    amp, data, mask = model_amplitude(scan, obj, probe)
    sq = np.square(amp - data) * pixels
    if mask is not None:
        sq = sq * mask
    return sq.reshape(len(sq), -1).sum(axis=1)


def paired_z(d: Any) -> float:
    """z = mean(d) / (sd(d)/√N) of per-view gains ``d`` (0 when they do not vary)."""
    d = np.asarray(d, np.float64)
    sd = float(d.std(ddof=1))
    return float(d.mean() / (sd / np.sqrt(len(d)))) if sd > 0 else 0.0


def chain_count(view_gain: list[Any], z_min: float = 2.0) -> tuple[int, list[float]]:
    """The count read from a chain: the first k whose step k → k + 1 has per-view gains with a paired z
    no larger than ``z_min`` (:func:`paired_z`); and every step's z."""
    zs = [paired_z(row) for row in view_gain]
    return next((k + 1 for k, z in enumerate(zs) if z <= z_min), len(zs) + 1), zs


def choose_start(ho: dict[float, np.ndarray], z_min: float = 2.0) -> tuple[float, dict[float, float]]:
    """The start among several (``ho``: factor → its fit's per-view held-out errors; 1 is the default):
    the lowest summed held-out error among those whose per-view gains over the default's have a paired
    z > ``z_min``; the default when none has. Also each start's z against the default."""
    base = np.asarray(ho[1.0], np.float64)
    zs = {f: paired_z(base - np.asarray(e, np.float64)) for f, e in ho.items()}
    better = [f for f in ho if f != 1.0 and zs[f] > z_min]
    return (min(better, key=lambda f: float(np.sum(ho[f]))) if better else 1.0), zs


def schedule_iterations(alg: str) -> int:
    """Iterations of a schedule whose every stage has its count (``"DM:20,ML:480"`` → 500)."""
    return sum(int(c or 0) for _, c in parse_algorithm(alg))


def central_views(points: np.ndarray, most: int) -> np.ndarray | None:
    """The ``most`` views nearest the centre of the positions' extent (``points`` (2, N)), in their given
    order; None when the scan has no more views than that."""
    pts = np.asarray(points, np.float64)
    if pts.shape[1] <= most:
        return None
    centre = (pts.min(axis=1) + pts.max(axis=1)) / 2
    dist = np.hypot(*(pts - centre[:, None]))
    return np.sort(np.argsort(dist, kind="stable")[:most])


def views_of(scan: Any, views: np.ndarray) -> Any:
    """A scan of ``views`` (indices into the whole scan) alone: their frames and positions (copies)."""
    return replace(scan, diffamp=np.asarray(scan.diffamp)[views], points=np.asarray(scan.points)[:, views],
                   views=slice(None))


def read_for_count(path: str, how: HeldOutCount | None = None) -> Any:
    """What the held-out count reads of the scan file ``path``: the frames of its ``max_views`` central views
    only (:func:`central_views`; every view when it has no more), the whole scan's view count in
    ``attrs['views_total']`` (the job's rank 0: a scan of thousands of frames is not read whole for it)."""
    from .scanfile import read_points, read_scan, read_scan_views
    how = how or RULE
    points = read_points(path)
    views = central_views(points, how.max_views)
    scan = read_scan(path) if views is None else read_scan_views(path, views)
    scan.attrs["views_total"] = points.shape[1]
    return scan


@dataclass
class CountedModel:
    """The held-out count's model of the count found (its k-mode refit: object, orthogonal modes), for
    the reconstruction to start from; duck-types the ``object``/``probe``/``attrs`` of a result that
    ``init_from`` reads (:func:`hxn_ptycho.initial.initial_probe`). ``origin``: where its object's pixel
    (0, 0) lies (:meth:`hxn_ptycho.engine.Reconstruction.canvas_origin` of the fit's canvas), so that the
    engine lays it on its own canvas (:func:`hxn_ptycho.initial.lay_object`): another margin, or the whole
    scan when the count saw part of it."""
    object: np.ndarray
    probe: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    origin: np.ndarray | None = None


def in_parallel(fn: Callable[[Any, Callable[[], bool]], Any], items: list[Any], workers: int, stop: Any) -> list[Any]:
    """``fn(item, halt)`` for every item, at most ``workers`` at a time, in threads; the results in the
    items' order. Each fit is the fit it would be alone, bit for bit (its own reconstruction and backend, one
    FFT thread): the count does not depend on ``workers``. Two fits of 64² frames side by side run 1.65× as
    fast as one after the other on 2 cores (numpy and the FFTs release the GIL). ``halt()`` turns true when
    ``stop`` asks (Ctrl-C) or another item failed: the fits under way end at their next iteration, the rest
    do not start."""
    from .engine import _stop_requested
    failed = threading.Event()

    def halt() -> bool:
        return failed.is_set() or _stop_requested(stop)

    def run(item: Any) -> Any:
        if halt():
            raise CountInterrupted()
        try:
            return fn(item, halt)
        except BaseException:
            failed.set()
            raise

    if workers <= 1 or len(items) <= 1:
        return [run(item) for item in items]
    with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="hxn-count") as pool:
        futures = [pool.submit(run, item) for item in items]
        try:
            wait(futures)
        except BaseException:
            failed.set()          # Ctrl-C in this thread: the fits under way stop too
            raise
    errors: list[BaseException] = [e for e in (f.exception() for f in futures) if e is not None]
    if errors:                    # the first failure, not the interruptions it caused in the others
        raise next((e for e in errors if not isinstance(e, CountInterrupted)), errors[0])
    return [f.result() for f in futures]


@dataclass
class OverCompleteFit:
    """The held-out count's M-mode fit on the kept pixels (steps 1–2 of the module's rule): its object, orthogonal
    modes sorted by power and data error; each screened start's held-out error and z; the start chosen; and
    ``sched(alg, k)``, the fits' parameters with schedule ``alg`` and ``k`` modes."""
    obj: np.ndarray
    probe: np.ndarray
    error: float
    starts: list[dict[str, Any]]
    chosen: float
    sched: Callable[..., ReconParams]


def fit_schedules(params: ReconParams, how: HeldOutCount, M: int) -> Callable[..., ReconParams]:
    """``sched(alg, k=M)``: the count's fits' parameters (the user's, on numpy, without refinement or a warm start)
    with schedule ``alg`` and ``k`` modes."""
    base = replace(params, probe_modes=M, extra_mode_power=how.extra_mode_power, refine_positions=False,
                   backend="numpy", init_from=None)

    def sched(alg: str, k: int = M) -> ReconParams:
        return replace(base, probe_modes=k, algorithm=alg, iterations=schedule_iterations(alg))
    return sched


def overcomplete_fit(scan: Any, kept: Any, keep: np.ndarray, params: ReconParams, how: HeldOutCount, M: int,
                     workers: int, say: Callable[[str], None], stop: Any = None) -> OverCompleteFit:
    """Steps 1–2 of the rule: the starts screened on the held-out pixels (``~keep``), then the chosen start's
    ``M``-mode fit of ``kept`` (the scan with its held-out pixels emptied, :func:`holdout_split`)."""
    sched = fit_schedules(params, how, M)

    def screen(f: float, halt: Callable[[], bool]) -> tuple[np.ndarray, float]:
        ts = time.perf_counter()
        o_f, p_f, _e = fit(kept, sched(how.screen), keep, phase=f, mode_cap=how.mode_cap, stop=halt)
        return held_out_errors(scan, o_f, p_f, ~keep), time.perf_counter() - ts

    starts, ho = [], {}
    for f, (ho[f], secs) in zip(how.starts, in_parallel(screen, list(how.starts), workers, stop)):
        starts.append({"factor": f, "held_out_error": float(np.sum(ho[f])), "seconds": round(secs, 1)})
    chosen, zs = choose_start(ho, how.z_min)
    for s in starts:
        s["z_vs_default"] = round(zs[s["factor"]], 2)
    say(f"hxn-ptycho: held-out count: start x{chosen:g} chosen ("
        + ", ".join(f"x{s['factor']:g} {s['held_out_error']:.4g} z {s['z_vs_default']:.1f}" for s in starts) + ")")
    obj, pr, err = fit(kept, sched(how.schedule), keep, phase=chosen, mode_cap=how.mode_cap, stop=stop)
    say(f"hxn-ptycho: held-out count: the {M}-mode fit's shares "
        + "/".join(f"{100 * s:.1f}" for s in modes.power_fractions(pr)) + " %")
    return OverCompleteFit(obj, pr, err, starts, chosen, sched)


def sparse_fit(kept: Any, keep: np.ndarray, over: OverCompleteFit, how: HeldOutCount, mu: float,
               stop: Any = None) -> tuple[np.ndarray, np.ndarray, float]:
    """The M-mode fit continued ``how.sparse_its`` ML iterations of the kept pixels with the modes' group penalty
    (:func:`ml.mode_penalty` with ``mu``; 0: none): modes the data do not pay for go to zero (docs/auto_modes.md,
    "Session 33")."""
    return fit(kept, over.sched(f"ML:{how.sparse_its}"), keep, over.obj, over.probe, mode_cap=how.mode_cap,
               stop=stop, sparsity=mu)


def share_count(shares: Any, share_min: float) -> int:
    """The modes whose power fractions ``shares`` (of orthogonal modes) are at least ``share_min``; at least 1."""
    return max(1, int(np.sum(np.asarray(shares) >= share_min)))


def count_and_model(scan: Any, params: ReconParams, how: HeldOutCount | None = None,
                    log_fn: Callable[[str], None] | None = None, stop: Any = None
                    ) -> tuple[dict[str, Any], CountedModel]:
    """The held-out count of ``scan`` (the whole scan, in this process) under the user's ``params``: the
    evidence as stored in the result (``probe_modes_auto``: the rule, the count found, each start's held-out
    error and z, the chosen start, the M-mode fit's shares, per k-mode refit its held-out error and each
    step's z), and the model of the count found (:class:`CountedModel`). ``stop`` (as the engine's: a
    callable or an Event) ends it with :class:`CountInterrupted`."""
    how = how or RULE
    say = log_fn or log.info
    t0 = time.perf_counter()
    M = max(2, min(how.fit_modes, int(params.auto_max_modes)))
    total = int(scan.attrs.get("views_total", len(scan.diffamp)))      # (read_for_count: the central views read)
    if len(scan.diffamp) < 3:
        raise ParamError("auto_rule='heldout' needs at least 3 views to judge a mode on")
    if len(scan.diffamp) != scan.n_views:
        raise ParamError(f"auto_rule='heldout' counts on the whole scan: this one holds {len(scan.diffamp)} of its "
                         f"{scan.n_views} views")
    views = central_views(scan.points, how.max_views)
    if views is not None:       # the rule's measured regime (scans of 100 views), and a bounded cost
        scan = views_of(scan, views)
    counted = len(scan.diffamp)
    where = "every view" if counted == total else f"the {counted} views nearest the scan's centre (of {total})"
    workers = how.workers or available_cores()
    say(f"hxn-ptycho: counting the probe modes on {100 * how.holdout:.0f} % of the pixels held out of every fit "
        f"(auto_rule=heldout), on {where}: {len(how.starts)} starts screened ({how.screen}), one {M}-mode fit "
        f"({how.schedule}), " + (f"{len(how.sparsity)} sparse fits (ML:{how.sparse_its}, sparsity "
                                  + "/".join(f"{mu:g}" for mu in how.sparsity) + f") and the count's refit "
                                  f"(ML:{how.refit})" if how.sparsity else f"{M} refits (ML:{how.refit})")
        + f", on the numpy backend, up to {workers} fit(s) at a time")
    kept, keep = holdout_split(scan, how.holdout, how.seed)
    over = overcomplete_fit(scan, kept, keep, params, how, M, workers, say, stop)
    obj, pr, err, starts, chosen = over.obj, over.probe, over.error, over.starts, over.chosen
    sched = over.sched
    refit = replace(sched(f"ML:{how.refit}"), extra_mode_power=params.extra_mode_power)
    common = {"rule": "heldout", "holdout": how.holdout, "fit_modes": M, "views_counted": len(scan.diffamp),
              "views_total": total, "workers": workers, "starts": starts, "start_chosen": chosen, "fit_error": err,
              "fit_shares": [round(float(s), 5) for s in modes.power_fractions(pr)]}
    if how.sparsity:
        part, model, why = sparse_count(scan, kept, keep, over, how, params, workers, stop)
        say(f"hxn-ptycho: held-out count: {part['found']} probe mode(s) ({why}; "
            f"{time.perf_counter() - t0:.0f} s)")
        return {**common, **part, "seconds": round(time.perf_counter() - t0, 1)}, model

    def refit_k(k: int, halt: Callable[[], bool]) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray]:
        where: list[np.ndarray] = []
        o_k, p_k, e_k = fit(kept, replace(refit, probe_modes=k), keep, obj, pr[:k], mode_cap=how.mode_cap,
                            attach=lambda rec: where.append(rec.canvas_origin()), stop=halt)
        return o_k, p_k, e_k, where[0], held_out_errors(scan, o_k, p_k, ~keep)

    held, chain, models, origin = [], [], [], []
    ks = list(range(M, 0, -1))                          # the largest (longest) refits first
    for o_k, p_k, e_k, where, h in reversed(in_parallel(refit_k, ks, workers, stop)):
        models.append((o_k, p_k))
        origin.append(where)
        held.append(h)
        chain.append({"modes": len(p_k), "data_error": e_k, "held_out_error": float(np.sum(h)),
                      "shares": [round(float(s), 5) for s in modes.power_fractions(p_k)]})
    found, steps = chain_count([held[k] - held[k + 1] for k in range(M - 1)], how.z_min)
    for k, z in enumerate(steps):
        chain[k + 1]["z"] = round(z, 2)
    say(f"hxn-ptycho: held-out count: {found} probe mode(s) (steps' z "
        + ", ".join(f"{z:.1f}" for z in steps) + f"; {time.perf_counter() - t0:.0f} s)")
    at_cap = found == M
    if at_cap:      # every step kept: the data hold at least M modes' worth of structure (on real data: misfit too)
        (log_fn or log.warning)(
            f"hxn-ptycho: held-out count: every step of the {M}-mode fit kept a held-out gain, so {M} is a lower "
            f"bound, not a count (on measured data, misfit that more modes absorb does this too: "
            f"docs/auto_modes.md, the Siemens star)")
    evidence = {**common, "found": found, "at_cap": at_cap, "z_min": how.z_min, "chain": chain,
                "seconds": round(time.perf_counter() - t0, 1)}
    return evidence, CountedModel(*models[found - 1], origin=origin[found - 1])


def sparse_count(scan: Any, kept: Any, keep: np.ndarray, over: OverCompleteFit, how: HeldOutCount,
                 params: ReconParams, workers: int, stop: Any = None) -> tuple[dict[str, Any], CountedModel, str]:
    """Step 3 with sparse fits (``how.sparsity``): one :func:`sparse_fit` a μ, the one with the lowest held-out
    error chosen; the count is the number of its modes holding at least ``how.share_min`` of its power, and the
    model those modes refitted (ML:``how.refit``, no penalty). Returns the count's part of the evidence, the
    model, and why (a phrase for the log)."""
    def one(mu: float, halt: Callable[[], bool]) -> tuple[np.ndarray, np.ndarray, float, float]:
        o, p, e = sparse_fit(kept, keep, over, how, mu, halt)
        return o, p, e, float(np.sum(held_out_errors(scan, o, p, ~keep)))

    fits = in_parallel(one, list(how.sparsity), workers, stop)
    shares = [modes.power_fractions(f[1]) for f in fits]
    best = int(np.argmin([f[3] for f in fits]))
    o_s, p_s = fits[best][:2]
    found = share_count(shares[best], how.share_min)
    refit = replace(over.sched(f"ML:{how.refit}", found), extra_mode_power=params.extra_mode_power)
    where: list[np.ndarray] = []
    o_k, p_k, _e = fit(kept, refit, keep, o_s, p_s[:found], mode_cap=how.mode_cap,
                       attach=lambda rec: where.append(rec.canvas_origin()), stop=stop)
    why = (f"the sparse fit of sparsity {how.sparsity[best]:g} chosen on held-out pixels ("
           + ", ".join(f"{mu:g} {f[3]:.6g}" for mu, f in zip(how.sparsity, fits)) + "), its shares "
           + "/".join(f"{100 * x:.1f}" for x in shares[best]) + f" %, at least {100 * how.share_min:g} %")
    part = {"found": found, "at_cap": found == len(p_s), "count_by": "sparse", "share_min": how.share_min,
            "sparse": [{"sparsity": mu, "iterations": how.sparse_its, "data_error": f[2], "held_out_error": f[3],
                        "shares": [round(float(x), 5) for x in sh]}
                       for mu, f, sh in zip(how.sparsity, fits, shares)],
            "sparsity_chosen": how.sparsity[best]}
    return part, CountedModel(o_k, p_k, origin=where[0]), why


def heldout_evidence(facts: dict[str, Any]) -> dict[str, Any] | None:
    """The held-out count's evidence in a result's attributes or a job's measured facts (stored as it is,
    or as JSON in a result file); None for any other count."""
    auto = facts.get("probe_modes_auto")
    if isinstance(auto, str):
        try:
            auto = json.loads(auto)
        except ValueError:
            return None
    return auto if isinstance(auto, dict) and auto.get("rule") == "heldout" else None


def wants_count(params: ReconParams) -> bool:
    """Whether ``params`` ask for the held-out count before the reconstruction."""
    return params.probe_modes == "auto" and params.auto_rule == "heldout"


def counted_params(scan: Any, params: ReconParams, log_fn: Callable[[str], None] | None = None,
                   stop: Any = None) -> tuple[ReconParams, dict[str, Any], CountedModel | None]:
    """``params`` with ``probe_modes`` the held-out count of ``scan``, the count's evidence, and its model
    of that count for the reconstruction to start from (None where the user gave ``init_from``: their
    warm start wins)."""
    evidence, model = count_and_model(scan, params, log_fn=log_fn, stop=stop)
    return (replace(params, probe_modes=int(evidence["found"])), evidence,
            None if params.init_from else model)
