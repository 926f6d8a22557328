"""Step scans reconstructed while they run: the callback side of the growing scan file.

A :class:`LiveFeed` is subscribed beside the :class:`~.router.PtychoCallback` (``RE.subscribe``).
For a ptychography *step* scan (one event per point; each frame is in the detector's HDF5 file
before its event — hxntools' ``TPX_HDF5`` step mode, the simulated ``step_scan``) it:

- on the RunEngine's thread, only routes documents into a :class:`~.collector.RunCollector`
  (appends) and wakes its worker — never blocks, never raises;
- on its worker thread, once ``first_chunk`` events are in, exports them with the one export
  (:func:`.export.build_scan`), fixes the decisions of that first export (beam centre,
  orientation, mask) and records them in a growing scan file
  (:class:`hxn_ptycho.scanfile.GrowingScanWriter`), starts the live job
  (``python -m hxn_ptycho.job SPEC --follow``) and a :class:`~.live.LivePublisher` for the run's
  ``live`` node; then every ``chunk`` events it exports only the new frames
  (:class:`_Incremental`: each frame is read once; the mask and the dark frames are re-checked
  against the running statistics of the whole scan so far) and appends the new views; at the stop
  it appends the rest and marks the file complete.

A *fly2dpd* that sends StreamResource/StreamDatum documents during the scan (bluesky's
``collect_while_completing``; the simulated ``fly2dpd(stream_datum_every_s=...)``) is followed the
same way: the collector counts its points from the StreamDatums, a snapshot cuts them at n points,
and the same reader and export read the partial documents. A fly2dpd that sends none before its
stop is left to the post-stop path.

Nothing wrong is ever written: if a later chunk disagrees with what is already in the file (a
frame without beam dropped, a pixel newly masked), the feed stops appending and leaves the file
incomplete (the live job is then terminated); the post-stop path of the
:class:`~.router.PtychoCallback` (whose ``live`` is this feed) then runs as without it, so there is
still exactly one derived run.

The live job goes through the :class:`~.launcher.JobQueue` of the post-stop jobs (the callback's,
``LiveFeedConfig.queue``; else one in ``WORK/queue``): the same :class:`~.launcher.Job` record and
:class:`~hxn_ptycho.spec.JobSpec`, the same runner and argument list
(:func:`~.launcher.job_command`, ``mpiexec`` ranks checked, ``--follow``), log, pid record and time
limit, the same outcome record and publisher (:func:`.derived.publish_outcome` under the job's
fixed uid, at the stop: :meth:`LiveFeed.took_over`). It is started at the start document by
:meth:`~.launcher.JobQueue.start_now` — on its own thread, not behind pending post-stop jobs and
holding no slot for the whole scan (docs/live.md).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from event_model import RunRouter

from hxn_ptycho.errors import BadInput
from hxn_ptycho.spec import JobSpec

from .collector import CollectedRun, PassThroughFiller, RunCollector
from .export import ExportConfig, build_scan, decide_orientation, kept_field, scan_kind
from .router import file_stem, ignore_reason

log = logging.getLogger(__name__)


@dataclass
class LiveFeedConfig:
    work_dir: str = "hxn_ptycho_work"
    catalog: str | None = None                  # where the previews go (None: preview files only)
    params: dict = field(default_factory=dict)  # ReconParams fields of the live job
    nprocs: int = 1
    export: ExportConfig = field(default_factory=ExportConfig)
    first_chunk: int = 256                      # events before the first export (decisions made here)
    chunk: int = 32                             # events between later exports
    launch: bool = True                         # start the live job (False: the growing file only)
    first_export_process: bool = True           # the first export (orientation trials) in a child process
    decide_views: int | None = None             # events before the orientation is decided (in that child,
                                                # while the first chunk is measured); 0: on the first chunk;
                                                # None: half the first chunk where that is >= 48 views
    queue: Any = None                           # the JobQueue the live job is started through (the
                                                # callback's; None: one in WORK/queue)

    def __post_init__(self) -> None:
        for name in ("first_chunk", "chunk", "nprocs"):
            if int(getattr(self, name)) < 1:
                raise BadInput(f"LiveFeedConfig.{name} must be at least 1, got {getattr(self, name)!r}")
        if self.decide_views is not None and int(self.decide_views) < 0:
            raise BadInput(f"LiveFeedConfig.decide_views must be None, 0 (decide on the first chunk) or a number of "
                           f"events, got {self.decide_views!r}")


def _snapshot(run: CollectedRun, n: int, stream: str) -> CollectedRun:
    """The run as it was after its first ``n`` events of ``stream`` (copied; the RunEngine goes on),
    as if it had stopped there: its stop counts ``n`` events, so the export's completeness check
    (lost or out-of-order events) applies to the views so far."""
    cols = {s: {k: list(v[:n]) if s == stream else list(v) for k, v in c.items()} for s, c in run.columns.items()}
    seq = {s: list(v[:n]) if s == stream else list(v) for s, v in run.seq_nums.items()}
    return dataclasses.replace(run, columns=cols, seq_nums=seq, descriptors=dict(run.descriptors),
                               resources=dict(run.resources), datums=dict(run.datums),
                               stream_resources=dict(run.stream_resources),
                               stream_datums=_stream_datums_upto(run, n, stream),
                               stop={"exit_status": "success", "num_events": {stream: n}},
                               problems=list(run.problems))


def _stream_datums_upto(run: CollectedRun, n: int, stream: str) -> list[dict]:
    """The StreamDatums of ``stream`` cut to its first ``n`` points (``seq_nums`` 1..n; a datum
    across the cut is clipped, its ``indices`` with it); those of other streams as they are."""
    names = {uid: d.get("name") for uid, d in run.descriptors.items()}
    out = []
    for sd in list(run.stream_datums):
        seq = sd.get("seq_nums") or {}
        if names.get(sd.get("descriptor")) != stream or not seq.get("stop"):
            out.append(sd)
            continue
        first, stop = int(seq.get("start", 1)), int(seq["stop"])
        if first > n:
            continue
        if stop > n + 1:
            ind = dict(sd.get("indices") or {})
            ind["stop"] = int(ind.get("start", 0)) + (n + 1 - first)
            sd = {**sd, "seq_nums": {"start": first, "stop": n + 1}, "indices": ind}
        out.append(sd)
    return out


def _sub_source(source: Any, a: int, b: int, wait_s: float) -> Any:
    """Frames ``a:b`` of ``source`` (its chunks cut to that range; open-ended chunks measured)."""
    from . import frames as fr
    out, at = [], 0
    for c in source.chunks:
        stop = c.stop
        if stop is None:
            def length(c: Any = c) -> int:
                with fr.open_h5(c.file) as f:
                    return int(fr._dataset(f, c).shape[0])
            stop = fr._with_wait(length, wait_s)
        size = stop - c.start
        lo, hi = max(a, at), min(b, at + size)
        if lo < hi:
            out.append(fr.Chunk(c.file, c.dataset, c.start + lo - at, c.start + hi - at, c.spec))
        at += size
        if at >= b:
            break
    if at < b:
        raise fr.NotReady(f"{source.key}: frames {at}..{b - 1} are not described yet")
    return fr.Source(source.key, out)


# the attributes of the first chunk's export that describe the whole run only at the stop
# (_Incremental.final_attrs): the growing file writes them then, into datasets (SWMR; scanfile.py)
FINAL_ATTR_NAMES = ("frame_source", "dropped_frames", "geometry_source")


class _Incremental:
    """The export of a growing run, chunk by chunk, reading only the new frames.

    It repeats :func:`.export.prepare` per frame, so the views it appends are exactly those of the
    post-stop export of the whole run: one pass over each new raw frame feeds the running
    statistics of :func:`.export.raw_statistics` (sum, minimum, maximum, flagged pixels), from which
    the mask is made as there; the crop of the same frames (in memory, not read again) is
    normalised by the scaler (ic[0]/ic), dark frames are found against the median crop total of
    every frame so far, and the fixed orientation is applied. What the whole scan decides (the
    mask, which frames are dark) is re-checked at every chunk: if it changes what is already
    written, :meth:`chunk` raises :class:`_Diverged` (the feed then stops; the post-stop path
    publishes the run).
    """

    def __init__(self, cfg: ExportConfig, first: Any) -> None:
        self.cfg = cfg
        self.first = first                       # the first chunk's ScanData (attributes, decisions)
        self.det = str(first.attrs["detector"])
        self.center = (int(first.attrs["center_row"]), int(first.attrs["center_col"]))
        self.read = 0                            # raw frames read so far
        self.totals: list[float] = []            # crop total of every raw frame read (before the scaler)
        self.kept: list[int] = []                # raw indices written, in order
        self.acc: np.ndarray | None = None
        self.lo = self.hi = self.flagged = None
        self.sat: float | None = None
        self.mask: np.ndarray | None = None      # the written mask (engine layout)
        self.seconds = 0.0                        # reading and processing (for the measurements)
        self.frames_read = 0                      # raw frames read (each once)

    def _stats(self, raw: np.ndarray) -> None:
        from .export import saturation_value
        if self.acc is None:
            shape = raw.shape[1:]
            self.acc, self.lo, self.hi = np.zeros(shape), np.full(shape, np.inf), np.full(shape, -np.inf)
            self.flagged = np.zeros(shape, bool)
            self.sat = saturation_value(raw.dtype)
        b = raw.astype(np.float64)
        if self.sat is not None:
            self.flagged |= np.any(raw >= self.sat, axis=0)
        self.flagged |= ~np.all(np.isfinite(b), axis=0) | np.any(b < 0, axis=0)
        b = np.where(np.isfinite(b), b, 0.0)
        self.acc += b.sum(axis=0)
        self.lo = np.minimum(self.lo, b.min(axis=0))
        self.hi = np.maximum(self.hi, b.max(axis=0))

    def _good(self, run: CollectedRun) -> np.ndarray:
        """The good-pixel mask of the raw frames so far, as :func:`.export.raw_statistics` makes it."""
        assert self.acc is not None and self.flagged is not None
        good = ~self.flagged
        shape = good.shape
        for r, c in [tuple(p) for p in run.start.get("ptycho_bad_pixels", self.cfg.bad_pixels)]:
            if 0 <= r < shape[0] and 0 <= c < shape[1]:
                good[r, c] = False
        mean = self.acc / self.read
        if self.cfg.hot_pixels and self.read > 1:
            med = float(np.median(mean[good])) if good.any() else 0.0
            good &= ~((self.hi == self.lo) & (mean > 10 * max(med, 1.0)) & good)
        return good

    def _new_frames(self, snap: CollectedRun, key: str, n: int) -> Any:
        """Where the frames of events ``read..n`` are: their datums only (one chunk per event, files
        checked against the data roots), or — for stream datums or whole-dataset resources — the
        whole source cut to that range."""
        from . import frames as fr
        cfg = self.cfg
        refs = snap.columns.get(cfg.stream, {}).get(key)
        if refs is not None and len(refs) >= n:
            chunks = [fr._datum_chunk(snap, refs[i], i, key, cfg.path_remap) for i in range(self.read, n)]
            if all(c.stop is not None for c in chunks):
                return fr.check_paths(snap, fr.Source(key, chunks), cfg.path_remap, cfg.data_roots)
        source = fr.describe(snap, key, cfg.stream, cfg.path_remap, cfg.data_roots)
        return _sub_source(source, self.read, n, cfg.frame_wait_s)

    def final_attrs(self, snap: CollectedRun, header: dict[str, Any]) -> dict[str, Any]:
        """The attributes of the whole run that the header (``header``: the first chunk's export)
        records for its first chunk only, as the post-stop export of the whole run makes them
        (:func:`.export.prepare`): where the frames are (``frame_source`` and the ``frames`` entry
        of ``geometry_source``) and which were dropped (``dropped_frames``)."""
        from . import frames as fr
        from .export import frame_key
        cfg = self.cfg
        key = frame_key(snap, self.det, cfg.stream)
        source = fr.describe(snap, key, cfg.stream, cfg.path_remap, cfg.data_roots)
        ranges = source.describe()
        out: dict[str, Any] = {"frame_source": json.dumps(ranges[:50]),
                               "dropped_frames": json.dumps(sorted(set(range(self.read)) - set(self.kept)))}
        if "geometry_source" in header:
            geo = json.loads(str(header["geometry_source"]))
            geo["frames"] = f"{key}: {len(ranges)} frame range(s) in {len(source.files)} file(s)"
            out["geometry_source"] = json.dumps(geo)
        return out

    def chunk(self, snap: CollectedRun, n: int) -> Any:
        """The new views of the first ``n`` events (a ScanData of them; empty if none are new)."""
        from . import frames as fr
        from .export import Prepared, check_complete, crop_window, frame_key, geometry, positions, scaler_values
        from .orientation import apply_orientation, orientation_for
        t0 = time.perf_counter()
        check_complete(snap)
        cfg = self.cfg
        key = frame_key(snap, self.det, cfg.stream)
        raw = fr.read(self._new_frames(snap, key, n), cfg.frame_wait_s)
        self.frames_read += int(raw.shape[0]) if raw.ndim == 3 else 0
        if raw.ndim != 3 or raw.shape[0] != n - self.read:
            raise _Diverged(f"{key}: {raw.shape[0]} frames read for events {self.read + 1}..{n}")
        a = self.read
        self._stats(raw)
        self.read = n
        good_raw = self._good(snap)
        region = crop_window(good_raw.shape, self.center, int(self.first.n))
        good = good_raw[region]
        mask = np.fft.ifftshift(good)
        if self.mask is None:
            self.mask = mask
        elif not np.array_equal(mask, self.mask):
            raise _Diverged("a later chunk changed the mask (a pixel newly saturated, flagged or stuck)")
        crop = raw[(slice(None),) + region].astype(np.float64)
        crop = np.where(np.isfinite(crop) & good, crop, 0.0)
        self.totals += [float(t) for t in crop.sum(axis=(1, 2))]
        totals = np.asarray(self.totals)
        dark = totals <= cfg.dark_fraction * max(float(np.median(totals)), 1e-300)
        if dark[self.kept].any():
            raise _Diverged("a frame already written is without beam against the median of the frames so far")
        points, pinfo = positions(snap, cfg)
        ic, _ = scaler_values(snap, cfg, pinfo["motors"], n)
        if ic is not None:
            crop = crop * (ic[0] / ic[a:n])[:, None, None]
        new = [i for i in range(a, n) if not dark[i]]
        crop = crop[[i - a for i in new]]
        inten = np.fft.ifftshift(np.where(good, np.maximum(crop, 0.0), 0.0), axes=(-2, -1))
        geo, src = geometry(snap, cfg, self.det)
        prep = Prepared(intensity=inten, mask=mask, points=points[:, new], geometry=geo, sources=src, attrs={})
        scan = apply_orientation(prep, orientation_for(self.det, self.cfg.orientation))
        self.kept += new
        self.seconds += time.perf_counter() - t0
        return scan


def warm_child(cfg: ExportConfig) -> float:
    """Run in the first export's child process at the start document: its imports and the trials'
    compiled kernels are paid while the first chunk is measured, not after it; returns the seconds."""
    t0 = time.perf_counter()
    from hxn_ptycho.backend import get_backend
    from hxn_ptycho.live import warm_up
    from hxn_ptycho.params import ReconParams

    from . import frames, orientation  # noqa: F401 - imported for their cost
    p = ReconParams()                                   # the orientation trials' parameters (threads 1)
    warm_up(get_backend(p.backend, 1), p)
    return time.perf_counter() - t0


@dataclass
class _First:
    """What :class:`_Incremental` takes from the first chunk's export: detector, beam centre, crop."""

    attrs: dict
    n: int


def _fixed(cfg: ExportConfig, center: tuple[int, int], orientation: str) -> ExportConfig:
    """The export's configuration with the first chunk's decisions fixed."""
    return dataclasses.replace(cfg, center=(int(center[0]), int(center[1])), orientation=orientation)


class _Diverged(RuntimeError):
    """A later chunk disagrees with what is already written."""


class _LiveRun:
    """One step scan's feed: a worker thread exporting chunks into the growing scan file."""

    def __init__(self, cfg: LiveFeedConfig, collector: RunCollector) -> None:
        self.cfg, self.collector = cfg, collector
        self.run = collector.run
        self.stem = file_stem(self.run.scan_id, self.run.uid)
        self.fly = scan_kind(self.run.start) == "fly2dpd"   # followed from its StreamDatums, if it sends any
        folder = Path(cfg.work_dir) / "live"
        self.scan_path = folder / f"scan_{self.stem}.h5"
        self.result_path = Path(cfg.work_dir) / "results" / f"result_{self.stem}_live.h5"
        self.writer: Any = None
        self.written = 0
        self.export_cfg: ExportConfig | None = None
        self.mask: np.ndarray | None = None
        self.job: Any = None                      # the live job (launcher.LiveJob: poll, terminate, wait)
        self.spec: JobSpec | None = None
        self.publisher: Any = None
        self.stopped = False
        self.gave_up: str | None = None
        self.not_followed: str | None = None      # why no live job was started (live.not_followed)
        self.appended_during_scan = 0             # views appended before the stop document
        self.incremental: _Incremental | None = None
        self.header_attrs: dict[str, Any] | None = None   # the first chunk's attributes (the file's header)
        self.export_s: list[tuple[int, float]] = []   # (events, seconds) of each export
        self.marks: dict[str, float] = {}            # when each step of the first chunk's path happened
        self._pool: Any = None                       # the first export's child process, started early
        self._warm: Any = None
        self._decision: Any = None                   # the orientation decided on the first views (a future)
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._work, name=f"hxn-ptycho-livefeed-{self.stem}", daemon=True)
        self._thread.start()

    # -- RunEngine thread: cheap ----------------------------------------------------------------
    def poke(self, name: str, doc: dict) -> None:
        if name == "stop":
            self.stopped = True
        self._wake.set()

    # -- worker thread ------------------------------------------------------------------------------
    def _events(self) -> int:
        return len(self.run.seq_nums.get(self.cfg.export.stream, []))

    def _work(self) -> None:
        try:
            self.marks["start_document_at"] = time.time()
            self._start_job()          # now: its start-up overlaps the first chunk (it waits for the file)
            self._start_child()        # and so do the first export's child's imports and kernels
            while True:
                self._wake.wait(0.5)
                self._wake.clear()
                stopped = self.stopped
                n = self._events()
                need = self.cfg.first_chunk if self.incremental is None else self.incremental.read + self.cfg.chunk
                if self.fly and not self.run.stream_resources:
                    if stopped:                   # fly2dpd's bulk documents at the end: nothing to follow
                        self.gave_up = "a fly2dpd without StreamResource/StreamDatum during the scan"
                        log.info("live feed of run %s: %s (the post-stop path exports it)", self.run.uid,
                                 self.gave_up)
                        break
                    continue
                if self.incremental is None and not stopped:
                    self._decide_early(n)
                if n and (n >= need or stopped) and not self.gave_up:
                    self._export(n)
                if stopped and self._events() == n:
                    break
            if self.writer is not None and not self.gave_up:
                final = None            # the whole run's provenance, as the post-stop export records it
                if self.incremental is not None and self.header_attrs is not None:
                    final = self.incremental.final_attrs(_snapshot(self.run, self.incremental.read,
                                                                   self.cfg.export.stream), self.header_attrs)
                self.writer.mark_complete(final)
            elif self.writer is not None:
                self.writer.close()
        except Exception as exc:  # noqa: BLE001 - a live feed never disturbs the scan or the post-stop path
            self.gave_up = f"{type(exc).__name__}: {exc}"
            log.warning("live feed of run %s stopped: %s", self.run.uid, self.gave_up)
            if self.writer is not None:
                self.writer.close()
        finally:
            if (self.gave_up or self.writer is None) and self.job is not None and self.job.poll() is None:
                self.job.terminate()              # its file will never be complete: the post-stop path takes over
            if self.job is not None:             # the job ends at the file's completion
                try:
                    self.job.wait(timeout=3600)
                except subprocess.TimeoutExpired:
                    log.warning("live job of run %s still running after an hour", self.run.uid)
            if self.publisher is not None:
                self.publisher.stop()
            self._end_child()

    def _start_child(self) -> None:
        """The spawned child of the first export, started now and warmed (:func:`warm_child`)."""
        if not self.cfg.first_export_process or self.fly:
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        try:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            self._warm = self._pool.submit(warm_child, self.cfg.export)
            self._warm.add_done_callback(self._warmed)
        except OSError as exc:
            log.warning("live feed of run %s: no child for the first export (%s)", self.run.uid, exc)
            self._pool = None

    def _warmed(self, fut: Any) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.marks["child_warm_s"] = float(fut.result())
            self.marks["child_warm_at"] = time.time()

    def _decide_early(self, n: int) -> None:
        """Once ``decide_views`` events are in (fewer than the first chunk), decide the orientation on
        them in the warm child, while the first chunk is still being measured (docs/live.md)."""
        at = self.cfg.decide_views
        if at is None:
            at = self.cfg.first_chunk // 2 if self.cfg.first_chunk // 2 >= 48 else 0
        if self._decision is not None or self._pool is None or at <= 0 or at >= self.cfg.first_chunk or n < at:
            return
        self.marks["decision_from"] = time.time()
        self._decision = self._pool.submit(decide_orientation, _snapshot(self.run, n, self.cfg.export.stream),
                                           self.cfg.export)
        self._decision.add_done_callback(lambda _f: self.marks.setdefault("decision_to", time.time()))

    def _taken_decision(self) -> Any:
        """The early decision and its beam centre, or None (none made, nothing to decide, or it failed)."""
        if self._decision is None:
            return None
        try:
            return self._decision.result()
        except Exception as exc:  # noqa: BLE001 - the first chunk's export decides instead
            log.warning("live feed of run %s: the early orientation decision failed (%s: %s); the first chunk "
                        "decides", self.run.uid, type(exc).__name__, exc)
            return None

    def _end_child(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _export(self, n: int) -> None:
        """Append the views of events ``written_events..n``: the first time, the one export of the
        first chunk (its decisions fixed from now on); then only the new frames are read
        (:class:`_Incremental`)."""
        from hxn_ptycho.scanfile import GrowingScanWriter
        from hxn_ptycho.session import header_of
        if self.incremental is not None and n <= self.incremental.read:
            return
        t0 = time.perf_counter()
        snap = _snapshot(self.run, n, self.cfg.export.stream)
        if self.writer is None:                 # the decisions of the first chunk, fixed from now on
            self.marks["first_export_from"] = time.time()
            scan, ahead = self._first_export(snap, n)
            self.marks["first_export_to"] = time.time()
            self.export_cfg = _fixed(self.cfg.export, (int(scan.attrs["center_row"]), int(scan.attrs["center_col"])),
                                     str(scan.attrs["orientation"]))
            self.mask = None if scan.mask is None else np.array(scan.mask)
            decisions = {"center": [int(scan.attrs["center_row"]), int(scan.attrs["center_col"])],
                         "orientation": str(scan.attrs["orientation"]), "crop": int(scan.n),
                         "first_chunk_views": int(scan.n_views)}
            if "orientation_report" in scan.attrs:     # decided by the data: on how many of the first views
                rep = json.loads(str(scan.attrs["orientation_report"]))
                decisions["orientation_decided_on_views"] = int(rep.get("decided_on_views", scan.n_views))
            if ahead is not None and ahead[0].cfg == self.export_cfg:   # made beside the one export, same decisions
                self.incremental, new = ahead
                self.marks["first_incremental_ahead"] = 1.0
            else:
                self.incremental = _Incremental(self.export_cfg, scan)
                new = self.incremental.chunk(snap, n)      # the same views, through the incremental path
            if not (np.array_equal(new.diffamp, scan.diffamp) and np.array_equal(new.points, scan.points)):
                raise _Diverged("the incremental export of the first chunk differs from its one export")
            self.marks["first_incremental_to"] = time.time()
            self.header_attrs = dict(scan.attrs)
            self.writer = GrowingScanWriter(self.scan_path, header_of(scan), decisions=decisions,
                                            final_attrs=[k for k in FINAL_ATTR_NAMES if k in scan.attrs])
        else:
            try:
                new = self.incremental.chunk(snap, n)
            except _Diverged as exc:
                self.gave_up = str(exc)
                log.warning("live feed of run %s stopped: %s", self.run.uid, self.gave_up)
                return
        if new.n_views:
            self.written = self.writer.append(new.diffamp, new.points)
            self.marks.setdefault("first_views_written_at", time.time())
            if not self.stopped:
                self.appended_during_scan = self.written
        self.export_s.append((n, time.perf_counter() - t0))

    def _ahead(self, early: Any, snap: CollectedRun, n: int) -> Any:
        """The first chunk's incremental export with the early decisions (beam centre, orientation),
        made here while the child makes the one export; (incremental, views) or None."""
        if early is None:
            return None
        d, center, det, crop = early
        first = _First(attrs={"detector": det, "center_row": center[0], "center_col": center[1]}, n=crop)
        inc = _Incremental(_fixed(self.cfg.export, center, d.orientation.in_stage_frame().name), first)
        try:
            return inc, inc.chunk(snap, n)
        except Exception as exc:  # noqa: BLE001 - made again after the one export, which then says why
            log.debug("live feed of run %s: the first chunk's incremental export waits for the one export (%s)",
                      self.run.uid, exc)
            return None

    def _first_export(self, snap: CollectedRun, n: int) -> tuple[Any, Any]:
        """The first chunk's export (orientation trials: seconds of Python), in a child process when
        ``first_export_process``: there it holds no GIL of the RunEngine's process. With the
        orientation decided early, the incremental export of the same views is made here meanwhile
        (the second member: (incremental, views), or None)."""
        if not self.cfg.first_export_process or self.fly:   # no child by design (see _start_child)
            return build_scan(snap, self.cfg.export), None
        import pickle
        from concurrent.futures.process import BrokenProcessPool
        if self._pool is None:
            self._start_child()
        try:
            if self._pool is None:
                raise OSError("no child process")
            early = self._taken_decision()
            fut = self._pool.submit(build_scan, snap, self.cfg.export, early[0] if early else None)
            ahead = self._ahead(early, snap, n)
            scan = fut.result()
            if early is not None and early[1] != (int(scan.attrs["center_row"]), int(scan.attrs["center_col"])):
                log.info("live feed of run %s: the beam centre of the first chunk %s is not the early "
                         "decision's %s: the first chunk decides the orientation", self.run.uid,
                         (scan.attrs["center_row"], scan.attrs["center_col"]), early[1])
                scan = self._pool.submit(build_scan, snap, self.cfg.export).result()
            self.marks["decided_early"] = float(early is not None and "decided_on_views" in
                                                str(scan.attrs.get("orientation_report", "")))
            self._end_child()
            return scan, ahead
        except (BrokenProcessPool, pickle.PicklingError, OSError) as exc:
            log.warning("live feed of run %s: the first export runs in this process (%s: %s)", self.run.uid,
                        type(exc).__name__, exc)
            self._end_child()
            return build_scan(snap, self.cfg.export), None

    def _start_job(self) -> None:
        if not self.cfg.launch:
            return
        from .live import not_followed, start_live_job
        self.not_followed = not_followed(self.cfg.params)
        if self.not_followed is not None:
            log.info("run %s: %s", self.run.uid, self.not_followed)
            return
        self.spec, self.job, self.publisher = start_live_job(
            params=self.cfg.params, nprocs=self.cfg.nprocs, catalog=self.cfg.catalog, work_dir=self.cfg.work_dir,
            queue=self.cfg.queue, scan_path=self.scan_path, result_path=self.result_path, raw_uid=self.run.uid,
            scan_id=self.run.scan_id)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def outcome_path(self) -> Path:
        return self.result_path.with_name(f"result_{self.stem}_live.outcome.json")


class LiveFeed:
    """Subscribe to the RunEngine beside the PtychoCallback: live growing scan files for step scans."""

    def __init__(self, config: LiveFeedConfig | None = None) -> None:
        self.config = config or LiveFeedConfig()
        self.runs: dict[str, _LiveRun] = {}
        self._router = RunRouter([self._factory], filler_class=PassThroughFiller)   # no per-row work
        self.seconds = 0.0          # time spent on the RunEngine's thread (the cost per document)
        self.documents = 0
        self.took: set[str] = set()    # raw uids whose live job became the derived run

    def __call__(self, name: str, doc: dict) -> None:
        t0 = time.perf_counter()
        try:
            self._router(name, doc)
        except Exception as exc:  # noqa: BLE001 - nothing may raise into the RunEngine
            log.error("hxn-ptycho live feed: ignored a malformed %r document (%s: %s)", name, type(exc).__name__, exc)
        self.seconds += time.perf_counter() - t0
        self.documents += 1

    def _factory(self, name: str, start: dict) -> tuple[list, list]:
        if ignore_reason(start, self.config.export.detectors) is not None or \
                scan_kind(start) not in ("step", "fly2dpd"):
            return [], []
        collector = RunCollector(start, lambda run: None, keep=kept_field(start, self.config.export))
        live = _LiveRun(self.config, collector)
        self.runs[str(start.get("uid"))] = live
        return [collector, live.poke], []

    def live_file(self, raw_uid: str) -> Path | None:
        """The live scan file of ``raw_uid`` (made at its first chunk, with the decisions of its first
        views), or None: the post-stop export of the run takes its recorded decisions
        (:func:`.export.export_scan` ``live_file=``), so both files are equal."""
        live = self.runs.get(raw_uid)
        if live is None or live.writer is None or not live.scan_path.exists():
            return None
        return live.scan_path

    def took_over(self, raw_uid: str, timeout: float = 3600.0) -> bool:
        """At the stop (the PtychoCallback's worker thread): wait for the live job of ``raw_uid``; if
        it succeeded, publish its outcome as the run's one derived run (the job's fixed uid) and say
        so; if it failed, was killed or never started, return False: the post-stop path takes over."""
        live = self.runs.get(raw_uid)
        if live is None:
            return False
        live.join(timeout)
        from hxn_ptycho.job import read_outcome
        outcome = read_outcome(live.outcome_path) if live.spec is not None else None
        if live.spec is None or outcome is None or outcome.get("status") != "success":
            if live.not_followed is not None:
                log.info("run %s: reconstructed at the stop (%s)", raw_uid, live.not_followed)
                return False
            why = live.gave_up or (outcome or {}).get("reason") or "the live job ended without an outcome"
            log.warning("run %s: the live reconstruction did not finish (%s): the post-stop path takes over",
                        raw_uid, why)
            return False
        if live.spec.source.catalog:
            from .derived import publish_outcome, run_uid
            publish_outcome(live.spec, outcome, uid=run_uid(live.spec))
        log.info("run %s: the live reconstruction is the result (%s)", raw_uid, outcome.get("result_file"))
        self.took.add(raw_uid)
        return True

    def wait(self, timeout: float = 600.0) -> None:
        """Wait for every feed to finish (tests, the demo)."""
        deadline = time.monotonic() + timeout
        for live in list(self.runs.values()):
            live.join(max(0.0, deadline - time.monotonic()))
