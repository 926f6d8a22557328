"""Fly scans live from the detector's own streams: the Eiger and PandA ZeroMQ streams → the growing scan file.

HXN's ``fly2dpd`` shows nothing through documents or files until its last frame (docs/live.md), so
for a live fly scan the frames and positions come from the streams HXN's streaming service,
NSLS2/holoptycho, reads (``holoptycho/datasource.py`` ``EigerZmqRxOp``/``PositionRxOp``,
``holoptycho/preprocess.py`` ``ImageBatchOp``/``PointProcessorOp``, ``AGENTS.md``), as fanned out
by NSLS2/holoscan-proxy (``main.cpp``: every part of every message copied to each receiver).
Wire formats: :mod:`.streamwire`. Options in one place: :class:`StreamConfig`. Design, HXN's
addresses and measurements: docs/streams.md.

- **Receivers** (:class:`Receiver`): one thread per socket (SUB, ``RCVHWM`` as holoptycho sets it,
  CurveZMQ when its three keys are in the environment) putting messages into a **bounded** queue;
  a full queue blocks the receiver (back-pressure to the socket's high-water mark) and the time it
  blocked is counted and reported — never a silent skip here.
- **Tying a stream to its raw run**: the Eiger's series (``series`` of its frame headers) and the
  PandA's start message are tied to the open ``fly2dpd`` run (a start document without a stop)
  that has none yet — the time window of the run. A run whose start metadata names its series
  (``start['eiger_series']`` or ``start['scan']['eiger_series']``) takes only that series. A series
  or PandA start with no such run within ``tie_wait_s`` is **refused by name** (logged, counted),
  as are frame ids at or beyond the run's planned points.
- **Pairing by frame id, never by arrival order** (:class:`Pairer`): Eiger frame id i is view i;
  its position is the mean of PandA samples ``i·s … i·s + s − 1`` (``starting_sample_number``;
  ``s`` = samples per frame, ``PointProcessorOp``'s ``upsample``, HXN's ``position_supersample``).
  A duplicate (same id again) is dropped and counted; a late message is placed by its id while its
  view is not yet decided; an id still without frame or position ``reorder_window`` ids behind the
  newest, or at the end of both streams, is a **missing view** (nothing shifts: each written view
  carries its own position).
- **The same frame as the HDF5 file**: the stream's full frame in the detector's raw orientation is
  turned into the global one (``detector_orientation``, holoptycho's live default ``fliplr``) and
  cut to the file's ROI (``roi``), then goes through the export's own computations
  (:class:`.export.StatsAccumulator`, :func:`.export.beam_center`, :func:`.export.finish_frames`,
  :func:`.orientation.apply_orientation`); counts → µm by hxntools' motor table, averaged per
  frame, the fast axis foreshortened by the rotation (:func:`.export.foreshortening`), exactly as
  the export does. Decisions (centre, orientation, mask, the median for dark frames, ic[0]) are made
  on the first ``first_chunk`` views and recorded in the file.
- **At the stop** (:meth:`StreamFeed.took_over`): the live file is compared with the post-stop
  export of the run's documents made with the same recorded decisions — every frame, position and
  the geometry. Equal: the live job's result is the run's derived run. Different: an ERROR names the
  difference, the live job is stopped, the post-stop path runs as always, and the difference goes
  into its ``recon["measured"]["live"]`` (``<result>.live_facts.json`` beside its result).
- **The live job** goes through the callback's :class:`~.launcher.JobQueue` (``StreamFeedConfig.queue``;
  else one in ``WORK/queue``) as the document-driven live job does (:mod:`.livefeed`): a
  :class:`~.launcher.Job` with ``follow`` started at the first chunk by
  :meth:`~.launcher.JobQueue.start_now`, with ``Job.nice = StreamFeedConfig.job_nice`` applied by the
  queue's local launcher (it shares the receiver's cores; the Slurm launcher refuses a niceness).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import queue
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from event_model import RunRouter

from .collector import CollectedRun, RunCollector
from .export import (ExportConfig, ExportError, Prepared, StatsAccumulator, beam_center, crop_window,
                     find_detector, finish_frames, foreshortening, geometry, kept_field, scan_kind, scan_motors)
from .router import file_stem
from .streamwire import StreamError, decode_eiger, decode_panda, peek_eiger

log = logging.getLogger(__name__)

#: HXN's addresses (NSLS2/holoptycho AGENTS.md, ``start.sh --live``): the fan-out proxy on the Eiger IOC host
HXN_EIGER_STREAM = "tcp://xf03idc-eiger2-ioc.nsls2.bnl.local:5559"
HXN_PANDA_STREAM = "tcp://xf03idc-eiger2-ioc.nsls2.bnl.local:6666"
CURVE_ENV = ("SERVER_PUBLIC_KEY", "CLIENT_PUBLIC_KEY", "CLIENT_SECRET_KEY")


@dataclass
class StreamConfig:
    """Everything the stream path is configured by (``hxn-ptycho listen --eiger-stream … --panda-stream …``)."""

    eiger: str | None = None                    # e.g. HXN_EIGER_STREAM
    panda: str | None = None                    # e.g. HXN_PANDA_STREAM
    samples_per_frame: int = 10                 # PandA samples averaged per frame (HXN position_supersample)
    channels: dict[str, str] | None = None      # motor → PandA channel; None: from the export's motor table
    scaler_channel: str | None = None           # PandA channel of the ion chamber (averaged per frame); None: no scaler
    detector_orientation: str = "fliplr"        # raw → global, before the ROI (holoptycho's live default)
    roi: tuple[int, int, int, int] | None = None   # (row0, col0, rows, cols) the HDF5 file holds; None: the full frame
    queue_size: int = 4096                      # messages a receiver queue holds before it blocks (back-pressure)
    rcvhwm: int = 20000                         # the SUB socket's high-water mark (holoptycho's)
    reorder_window: int = 1024                  # an id this far behind the newest without its data is missing
    tie_wait_s: float = 5.0                     # a stream not tied to a run after this long is refused
    end_wait_s: float = 3.0                     # after the stop document: quiet this long ends the streams
    first_chunk: int = 256                      # views before the first append (decisions made here)
    chunk: int = 64                             # views per later append
    behind_views: int = 2000                    # more undecided views than this: the receiver is behind
    status_interval_s: float = 0.5


# -- the command line: declared once, for listen (and the profile's StreamConfig) ------------------------

def add_stream_options(parser: Any) -> None:
    """``--eiger-stream``/``--panda-stream`` and the few settings of :class:`StreamConfig` a beamline changes."""
    g = parser.add_argument_group("detector streams (live fly scans: fly2dpd from the Eiger and PandA 0MQ streams)")
    g.add_argument("--eiger-stream", metavar="TCP", help=f"the Eiger stream's fan-out proxy, e.g. {HXN_EIGER_STREAM} "
                   "(CurveZMQ: set SERVER_PUBLIC_KEY, CLIENT_PUBLIC_KEY, CLIENT_SECRET_KEY)")
    g.add_argument("--panda-stream", metavar="TCP", help=f"the PandA's 0MQ stream, e.g. {HXN_PANDA_STREAM}")
    g.add_argument("--stream-roi", type=int, nargs=4, metavar=("ROW0", "COL0", "ROWS", "COLS"),
                   help="the window of the (orientation-corrected) full frame the Eiger's HDF5 file holds")
    g.add_argument("--stream-orientation", default=StreamConfig.detector_orientation,
                   choices=["fliplr", "flipud", "rot180", "identity"],
                   help="raw → global frame before the ROI (default fliplr, holoptycho's live setting)")
    g.add_argument("--stream-samples-per-frame", type=int, default=StreamConfig.samples_per_frame,
                   help="PandA samples averaged per frame (fly2dpd's position_supersample; default 10)")
    g.add_argument("--stream-scaler-channel", help="PandA channel carrying the ion chamber (default: none)")


def stream_config_from(args: Any) -> StreamConfig | None:
    """The :class:`StreamConfig` of the options, or None without ``--eiger-stream``/``--panda-stream``;
    one without the other is refused by name."""
    eiger, panda = getattr(args, "eiger_stream", None), getattr(args, "panda_stream", None)
    if not eiger and not panda:
        return None
    if not eiger or not panda:
        raise StreamError("give both --eiger-stream and --panda-stream: frames are paired with positions by frame id")
    for name, url in (("--eiger-stream", eiger), ("--panda-stream", panda)):
        if not str(url).startswith(("tcp://", "ipc://", "inproc://")):
            raise StreamError(f"{name} {url!r}: expected a 0MQ address such as tcp://HOST:PORT")
    return StreamConfig(eiger=eiger, panda=panda, roi=tuple(args.stream_roi) if args.stream_roi else None,
                        detector_orientation=args.stream_orientation,
                        samples_per_frame=int(args.stream_samples_per_frame), scaler_channel=args.stream_scaler_channel)


# -- raw → the file's frame -------------------------------------------------------------------------

def to_file_frame(image: np.ndarray, orientation: str, roi: tuple[int, int, int, int] | None) -> np.ndarray:
    """The stream's full raw frame → the frame the HDF5 file holds: local → global (``fliplr``: a flip
    over the vertical axis; ``flipud``; ``identity``), then the ROI (holoptycho ``ImageBatchOp``:
    correct the whole frame first, then one plain crop)."""
    if orientation == "fliplr":
        image = image[:, ::-1]
    elif orientation == "flipud":
        image = image[::-1]
    elif orientation == "rot180":
        image = image[::-1, ::-1]
    elif orientation != "identity":
        raise StreamError(f"detector_orientation {orientation!r}: use identity, fliplr, flipud or rot180")
    if roi is not None:
        r0, c0, h, w = roi
        if r0 < 0 or c0 < 0 or r0 + h > image.shape[0] or c0 + w > image.shape[1]:
            raise StreamError(f"ROI {roi} does not fit the {image.shape[0]}×{image.shape[1]} stream frame")
        image = image[r0:r0 + h, c0:c0 + w]
    return np.ascontiguousarray(image)


def channel_for(motor: str, cfg: ExportConfig, scfg: StreamConfig) -> str:
    """The PandA channel of a motor: ``inenc2_val`` → ``/INENC2.VAL.Value`` (holoptycho's ch1/ch2 names)."""
    if scfg.channels and motor in scfg.channels:
        return scfg.channels[motor]
    if motor not in cfg.motor_table:
        raise ExportError(f"no encoder is known for motor '{motor}' (motor table: {sorted(cfg.motor_table)})")
    enc = cfg.motor_table[motor][0]
    return "/" + enc.removesuffix("_val").upper() + ".VAL.Value"


# -- pairing by id ------------------------------------------------------------------------------

@dataclass
class View:
    id: int
    frame: np.ndarray                         # the file's frame (after orientation and ROI)
    samples: dict[str, np.ndarray]            # channel → its samples of this frame
    arrived: float                            # when the later of frame and position came


class _Samples:
    """One PandA channel's samples by sample number (a growing array and which are present)."""

    def __init__(self) -> None:
        self.values = np.zeros(0)
        self.have = np.zeros(0, bool)

    def put(self, start: int, values: np.ndarray) -> int:
        """Place the samples; returns how many were already present (duplicates)."""
        end = start + values.size
        if end > self.values.size:
            size = max(end, 2 * self.values.size, 1024)
            self.values = np.resize(self.values, size)
            self.have = np.concatenate([self.have, np.zeros(size - self.have.size, bool)])
        dup = int(self.have[start:end].sum())
        self.values[start:end] = values
        self.have[start:end] = True
        return dup

    def complete(self, a: int, b: int) -> bool:
        return b <= self.have.size and bool(self.have[a:b].all())


class Pairer:
    """Frames and PandA samples → views in id order (see the module docstring)."""

    def __init__(self, channels: list[str], samples_per_frame: int, reorder_window: int = 1024,
                 n_points: int | None = None) -> None:
        self.channels = list(channels)
        self.s = int(samples_per_frame)
        self.window = int(reorder_window)
        self.n_points = n_points
        self.frames: dict[int, tuple[np.ndarray, float]] = {}
        self.samples = {ch: _Samples() for ch in self.channels}
        self.sample_at: dict[int, float] = {}
        self.next_id = 0                          # every id below is decided (written or missing)
        self.newest_frame = -1
        self.newest_position = -1
        self.missing: list[int] = []
        self.duplicates = 0
        self.late = 0                             # came after their view was decided: refused, named in the log
        self.beyond = 0                           # ids at or past the run's points: refused
        self.received = 0
        self._missing_cache: set[int] = set()

    def add_frame(self, fid: int, frame: np.ndarray, now: float) -> bool:
        if self.n_points is not None and fid >= self.n_points:
            self.beyond += 1
            if self.beyond == 1:
                log.warning("stream: frame id %d is beyond the run's %d points: refused", fid, self.n_points)
            return False
        if fid < self.next_id:
            if fid in self._decided_missing_set():
                self.late += 1
                log.warning("stream: frame %d came after its view was declared missing (%d views later): refused",
                            fid, self.window)
            else:
                self.duplicates += 1
            return False
        if fid in self.frames:
            self.duplicates += 1
            return False
        self.frames[fid] = (frame, now)
        self.received += 1
        self.newest_frame = max(self.newest_frame, fid)
        return True

    def _decided_missing_set(self) -> set[int]:
        if len(self._missing_cache) != len(self.missing):
            self._missing_cache = set(self.missing)
        return self._missing_cache

    def add_samples(self, samples: dict[str, tuple[int, np.ndarray]], now: float) -> None:
        dup = 0
        for ch in self.channels:
            if ch not in samples:
                continue
            start, values = samples[ch]
            dup += self.samples[ch].put(start, values)
        if dup:
            self.duplicates += 1
        got = [samples[ch] for ch in self.channels if ch in samples]
        if got:
            last = min(s + v.size for s, v in got) // self.s - 1
            for fid in range(max(0, got[0][0] // self.s), last + 1):
                self.sample_at.setdefault(fid, now)
            self.newest_position = max(self.newest_position, last)

    def _position(self, fid: int) -> dict[str, np.ndarray] | None:
        a, b = fid * self.s, (fid + 1) * self.s
        if all(self.samples[ch].complete(a, b) for ch in self.channels):
            return {ch: self.samples[ch].values[a:b].copy() for ch in self.channels}
        return None

    def pop_ready(self, final: bool = False) -> list[View]:
        """Views decided now, in id order (missing ids recorded in ``missing``)."""
        out: list[View] = []
        end = self.n_points if (final and self.n_points is not None) else None
        if final and end is None:
            end = max(self.newest_frame, self.newest_position) + 1
        while True:
            fid = self.next_id
            if end is not None and fid >= end:
                break
            frame = self.frames.get(fid)
            pos = self._position(fid) if frame is not None else None
            if frame is not None and pos is not None:
                out.append(View(fid, frame[0], pos, max(frame[1], self.sample_at.get(fid, frame[1]))))
                del self.frames[fid]
            elif final or (frame is None and self.newest_frame - fid >= self.window) or \
                    (frame is not None and self.newest_position - fid >= self.window) or \
                    (frame is None and self.newest_position - fid >= 4 * self.window and self.newest_frame > fid):
                self.frames.pop(fid, None)
                self.missing.append(fid)
            else:
                break
            self.next_id += 1
        return out

    @property
    def undecided(self) -> int:
        return max(0, max(self.newest_frame, self.newest_position) + 1 - self.next_id)


# -- receivers ------------------------------------------------------------------------------------

class Receiver:
    """A SUB socket read on its own thread into a bounded queue (blocking put: back-pressure)."""

    def __init__(self, endpoint: str, name: str, cfg: StreamConfig, multipart: bool) -> None:
        import zmq
        self.endpoint, self.name, self.multipart = endpoint, name, multipart
        self.queue: queue.Queue = queue.Queue(maxsize=cfg.queue_size)
        self.blocked_s = 0.0
        self.messages = 0
        self._stop = threading.Event()
        self.ctx = zmq.Context.instance()
        s = self.sock = self.ctx.socket(zmq.SUB)
        keys = {k: os.environ.get(k) for k in CURVE_ENV}
        given = [k for k, v in keys.items() if v]
        if given and len(given) != len(CURVE_ENV):
            raise StreamError(f"CurveZMQ for {name}: set all of {', '.join(CURVE_ENV)} or none "
                              f"(missing: {', '.join(k for k in CURVE_ENV if k not in given)})")
        if given:
            s.setsockopt(zmq.CURVE_SERVERKEY, keys["SERVER_PUBLIC_KEY"].encode("ascii"))   # type: ignore[union-attr]
            s.setsockopt(zmq.CURVE_PUBLICKEY, keys["CLIENT_PUBLIC_KEY"].encode("ascii"))   # type: ignore[union-attr]
            s.setsockopt(zmq.CURVE_SECRETKEY, keys["CLIENT_SECRET_KEY"].encode("ascii"))   # type: ignore[union-attr]
        s.setsockopt(zmq.RCVHWM, cfg.rcvhwm)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        self.thread = threading.Thread(target=self._run, name=f"hxn-ptycho-{name}-rx", daemon=True)

    def start(self) -> Receiver:
        self.thread.start()
        return self

    def _run(self) -> None:
        import zmq
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                msg = self.sock.recv_multipart() if self.multipart else self.sock.recv()
                item = (time.time(), msg)
                self.messages += 1
                t0 = None
                while not self._stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        t0 = t0 or time.time()
                if t0 is not None:
                    self.blocked_s += time.time() - t0
        finally:
            self.sock.close(0)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)


# -- one run ------------------------------------------------------------------------------------

@dataclass
class StreamFeedConfig:
    """The stream feed: where files go, the live job, the export's and the streams' options."""

    work_dir: str = "hxn_ptycho_work"
    catalog: str | None = None
    params: dict = field(default_factory=dict)
    nprocs: int = 1
    export: ExportConfig = field(default_factory=ExportConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    launch: bool = True                         # start the live job (False: the growing file only)
    job_nice: int = 0                           # niceness of the live job where it shares this machine's cores
                                                # (Job.nice: applied by the queue's launcher, local only)
    queue: Any = None                           # the JobQueue the live job is started through (the
                                                # callback's; None: one in WORK/queue)


class StreamRun:
    """One fly2dpd run fed from the streams: pairing, the export's computations, the growing file."""

    def __init__(self, fcfg: StreamFeedConfig, collector: RunCollector) -> None:
        self.fcfg, self.cfg, self.scfg = fcfg, fcfg.export, fcfg.stream
        self.collector = collector
        self.run: CollectedRun = collector.run
        self.uid = str(self.run.uid)
        s = self.run.start
        self.detector = find_detector(s, self.cfg.detectors)
        self.motors = scan_motors(s)
        shape = s.get("shape") or (s.get("scan") or {}).get("shape")
        self.n_points = int(np.prod(shape)) if shape else None
        named = s.get("eiger_series", (s.get("scan") or {}).get("eiger_series"))
        self.wanted_series = int(named) if isinstance(named, int) else None
        self.channels = {m: channel_for(m, self.cfg, self.scfg) for m in self.motors if not m.startswith("ss")}
        chans = list(self.channels.values()) + ([self.scfg.scaler_channel] if self.scfg.scaler_channel else [])
        self.pairer = Pairer(chans, self.scfg.samples_per_frame, self.scfg.reorder_window, self.n_points)
        self.stem = file_stem(self.run.scan_id, self.uid)
        self.scan_path = Path(fcfg.work_dir) / "live" / f"scan_{self.stem}.h5"
        self.status_path = self.scan_path.with_name(self.scan_path.name + ".receiver.json")
        self.result_path = Path(fcfg.work_dir) / "results" / f"result_{self.stem}_live.h5"
        self.opened_at = time.time()
        self.series: int | None | str = "untied"
        self.panda_tied = False
        self.eiger_ended = self.panda_ended = False
        self.stopped_at: float | None = None
        self.last_message = time.time()
        self.done = threading.Event()
        self.writer: Any = None
        self.decisions: dict[str, Any] = {}
        self.pending: list[View] = []
        self.written_ids: list[int] = []
        self.appended_during_scan = 0
        self.gave_up: str | None = None
        self.not_followed: str | None = None      # why no live job was started (live.not_followed)
        self.job: Any = None                      # the live job (launcher.LiveJob: poll, terminate, wait)
        self.spec: Any = None
        self.publisher: Any = None
        self.comparison: dict[str, Any] | None = None
        self.readable_at: list[float] = []
        self.blocked_s = 0.0
        self.max_undecided = 0
        self._status_at = 0.0
        self._deciding: threading.Thread | None = None
        self._decide_error: BaseException | None = None

    # -- messages (the feed's thread) ----------------------------------------------------------
    def eiger(self, msg: Any, arrived: float) -> None:
        self.last_message = arrived
        if msg.kind == "end":
            self.eiger_ended = True
        elif msg.kind == "frame":
            full = decode_eiger(msg.parts, msg).image if msg.image is None else msg.image
            self.pairer.add_frame(int(msg.frame), to_file_frame(full, self.scfg.detector_orientation, self.scfg.roi),
                                  arrived)

    def panda(self, msg: Any, arrived: float) -> None:
        self.last_message = arrived
        if msg.kind == "stop":
            self.panda_ended = True
        elif msg.kind == "data":
            self.pairer.add_samples(msg.samples, arrived)

    def streams_over(self, now: float) -> bool:
        if self.stopped_at is None:
            return False
        quiet = now - max(self.last_message, self.stopped_at) > self.scfg.end_wait_s
        return (self.eiger_ended and self.panda_ended) or quiet

    def step(self, now: float, final: bool = False) -> None:
        """Take the decided views and append whole chunks (everything at the end)."""
        if self.gave_up:
            return
        try:
            self.pending += self.pairer.pop_ready(final)
            if self.writer is None and self._deciding is None and self.pending and \
                    (len(self.pending) >= self.scfg.first_chunk or final):
                self._deciding = threading.Thread(target=self._decide_in_thread, args=(list(self.pending),),
                                                  name=f"hxn-ptycho-stream-decide-{self.stem}", daemon=True)
                self._deciding.start()
            if self._deciding is not None and self.writer is None:
                if final:
                    self._deciding.join()
                if self._deciding.is_alive():
                    return self._status(now, final)
                if self._decide_error is not None:
                    raise self._decide_error
            need = self.scfg.first_chunk if self.writer is None else self.scfg.chunk
            if self.pending and (len(self.pending) >= need or final):
                views, self.pending = self.pending, []
                self._append(views)
            if final:
                self._finish()
        except Exception as exc:  # noqa: BLE001 - the live path never disturbs the scan or the post-stop path
            self.gave_up = f"{type(exc).__name__}: {exc}"
            log.error("stream feed of run %s stopped: %s (the post-stop path will publish the run)", self.uid,
                      self.gave_up)
            if self.writer is not None:
                self.writer.close()
            self._end_job()
        self._status(now, final)

    def _status(self, now: float, final: bool) -> None:
        if now - self._status_at >= self.scfg.status_interval_s or final:
            self._status_at = now
            self.write_status(now)

    # -- the export's computations on a chunk ----------------------------------------------------------
    def _positions(self, views: list[View]) -> tuple[np.ndarray, np.ndarray | None]:
        ids = np.array([v.id for v in views])
        s = self.scfg.samples_per_frame
        out = []
        for axis, motor in enumerate(self.motors[:2]):
            if motor.startswith("ss"):
                from .export import _scan_input_positions
                out.append(_scan_input_positions(self.run.start, axis, self.n_points or 0)[ids])
                continue
            scale = self.cfg.motor_table[motor][1]
            counts = np.concatenate([v.samples[self.channels[motor]] for v in views])
            out.append((counts * scale).reshape(len(views), s).mean(axis=1))     # export.positions' arithmetic
        pts = np.stack(out)
        _angle, _src, factor = foreshortening(self.run, self.cfg, self.motors)
        if _angle:
            pts = pts.copy()
            pts[0] *= factor
        ic = None
        if self.scfg.scaler_channel:
            ic = np.concatenate([v.samples[self.scfg.scaler_channel] for v in views]).reshape(len(views), s).mean(axis=1)
            from .export import ensure_positive
            ensure_positive(ic)
        return pts, ic

    def _decide(self, views: list[View]) -> None:
        """The decisions of the first chunk (its own thread: the receiver goes on pairing meanwhile):
        masks, beam centre, crop, geometry, ic[0], the median total for dark frames, the orientation."""
        from .orientation import decide, orientation_for
        if len(self.motors) < 2 or self.detector is None:
            raise ExportError(f"run {self.uid}: no detector or no two scan axes in its start document")
        frames = np.stack([v.frame for v in views])
        pts, ic = self._positions(views)
        acc = StatsAccumulator(frames.shape[1:], frames.dtype)
        acc.add(frames)
        bad = [tuple(p) for p in self.run.start.get("ptycho_bad_pixels", self.cfg.bad_pixels)]
        stats = acc.result(self.cfg, bad)
        center = self.run.start.get("ptycho_center", self.cfg.center)
        center = tuple(center) if center is not None else beam_center(stats.mean, stats.good)
        crop = int(self.run.start.get("ptycho_crop", self.cfg.crop))
        self.region = crop_window(stats.shape, center, crop)
        self.good = stats.good[self.region]
        self.ic0 = float(ic[0]) if ic is not None else None
        self.stats, self.center = stats, center
        self.geo, self.geo_src = geometry(self.run, self.cfg, self.detector)
        raw = frames[(slice(None), *self.region)].astype(np.float64)
        inten, mask, keep, _dark, self.median = finish_frames(raw, self.good, ic, self.ic0, self.cfg.dark_fraction)
        wanted = self.run.start.get("ptycho_orientation", self.cfg.orientation)
        if isinstance(wanted, dict):
            wanted = wanted.get(self.detector)
        if wanted in (None, "", "auto"):
            prep = Prepared(intensity=inten, mask=mask, points=pts[:, keep], geometry=self.geo, sources={}, attrs={})
            self.orient = decide(prep, self.detector).orientation
        else:
            self.orient = orientation_for(self.detector, wanted)
        self.decisions = {"center": [int(center[0]), int(center[1])], "orientation": self.orient.name, "crop": crop,
                          "first_chunk_views": len(views), "source": "streams", "eiger_series": self.series,
                          "dark_median_total": self.median, "ic0": self.ic0}

    def _decide_in_thread(self, views: list[View]) -> None:
        try:
            self._decide(views)
        except Exception as exc:  # noqa: BLE001 - handed to the worker, which gives up naming it
            self._decide_error = exc

    def _append(self, views: list[View]) -> None:
        from hxn_ptycho.scanfile import GrowingScanWriter
        from hxn_ptycho.session import header_of

        from .orientation import apply_orientation
        frames = np.stack([v.frame for v in views])
        pts, ic = self._positions(views)
        first = self.writer is None
        raw = frames[(slice(None), *self.region)].astype(np.float64)
        inten, mask, keep, dark, _ = finish_frames(raw, self.good, ic, self.ic0, self.cfg.dark_fraction, self.median)
        ids = [views[i].id for i in keep]
        angle, angle_src, _ = foreshortening(self.run, self.cfg, self.motors)
        attrs = {"scan_id": int(self.run.scan_id) if isinstance(self.run.scan_id, (int, np.integer)) else -1,
                 "raw_uid": self.uid, "detector": self.detector, "energy_kev": self.geo["energy_kev"],
                 "scan_kind": "fly2dpd", "center_row": int(self.center[0]), "center_col": int(self.center[1]),
                 "angle_deg": angle, "masked_saturated": self.stats.saturated, "masked_hot": self.stats.hot,
                 "frame_source": json.dumps({"stream": "eiger", "series": self.series})}
        prep = Prepared(intensity=inten, mask=mask, points=pts[:, keep], geometry=self.geo,
                        sources={**self.geo_src, "angle": angle_src, "positions": "PandA stream",
                                 "frames": "Eiger stream"}, attrs=attrs)
        scan = apply_orientation(prep, self.orient)
        scan.attrs["orientation"] = self.orient.in_stage_frame().name
        scan.attrs["orientation_as"] = self.orient.name
        if first:
            si = (self.run.start.get("scan") or {}).get("scan_input")
            extent = (si[0], si[1], si[3], si[4]) if isinstance(si, list) and len(si) >= 6 else None
            if extent is not None and angle:
                extent = (extent[0] * _factor(angle), extent[1] * _factor(angle), extent[2], extent[3])
            self.scan_path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = GrowingScanWriter(self.scan_path, header_of(scan), decisions=self.decisions,
                                            extent_um=None if extent is None else tuple(sorted(extent[:2])) + tuple(sorted(extent[2:])))
        if scan.n_views:
            self.writer.append(scan.diffamp, scan.points)
            self.written_ids += ids
            now = time.time()
            self.readable_at += [now] * len(ids)
            if self.stopped_at is None:
                self.appended_during_scan = len(self.written_ids)
        if first:
            self._start_job()                   # on a file that already holds the first chunk

    def _finish(self) -> None:
        if self.writer is not None and not self.gave_up:
            self.writer.mark_complete()
        self.done.set()

    # -- the live job ------------------------------------------------------------------------------
    def _start_job(self) -> None:
        if not self.fcfg.launch:
            return
        from .live import not_followed, start_live_job
        self.not_followed = not_followed(self.fcfg.params)
        if self.not_followed is not None:
            log.info("run %s: %s", self.uid, self.not_followed)
            return
        self.spec, self.job, self.publisher = start_live_job(
            params=self.fcfg.params, nprocs=self.fcfg.nprocs, catalog=self.fcfg.catalog, work_dir=self.fcfg.work_dir,
            queue=self.fcfg.queue, scan_path=self.scan_path, result_path=self.result_path, raw_uid=self.uid,
            scan_id=self.run.scan_id, nice=self.fcfg.job_nice)

    def _end_job(self) -> None:
        if self.job is not None and self.job.poll() is None:
            self.job.terminate()

    @property
    def outcome_path(self) -> Path:
        return self.result_path.with_name(f"result_{self.stem}_live.outcome.json")

    # -- what the receiver says about itself ---------------------------------------------------------
    def status(self, now: float | None = None) -> dict[str, Any]:
        p = self.pairer
        behind = p.undecided + len(self.pending)
        self.max_undecided = max(self.max_undecided, behind)
        return {"series": self.series, "frames_received": p.received, "views_written": len(self.written_ids),
                "missing_ids": len(p.missing), "duplicates_dropped": p.duplicates, "late_refused": p.late,
                "beyond_points_refused": p.beyond, "undecided_views": behind,
                "receiver_blocked_s": round(self.blocked_s, 3),
                "falling_behind": bool(behind > self.scfg.behind_views or self.blocked_s > 0),
                "at": now or time.time()}

    def write_status(self, now: float) -> None:
        self.status_path.parent.mkdir(parents=True, exist_ok=True)    # before the file: behind while deciding too
        tmp = self.status_path.with_name(self.status_path.name + ".part")
        tmp.write_text(json.dumps(self.status(now)))
        os.replace(tmp, self.status_path)


def _factor(angle: float) -> float:
    import math
    return abs(math.cos(math.radians(angle))) if abs(angle) <= 45 else abs(math.sin(math.radians(angle)))


# -- comparing with the post-stop export -----------------------------------------------------------------

def compare_with_export(live_path: str | os.PathLike, post: Any, written_ids: list[int] | None = None) -> dict[str, Any]:
    """Every frame, position and the geometry of the live file against the post-stop export ``post``
    (a ScanData). ``equal`` only if everything is bit for bit the same; else ``differences`` names
    each, with the first differing view ids."""
    from hxn_ptycho.h5util import read_h5
    diffs: list[str] = []
    with read_h5(live_path) as f:
        d, p = f["diffamp"][()], f["points"][()]
        if d.shape != post.diffamp.shape:
            diffs.append(f"diffamp: {d.shape[0]} views live against {post.diffamp.shape[0]} in the export")
        else:
            bad = np.nonzero(~np.all(d == post.diffamp, axis=(1, 2)))[0]
            if bad.size:
                diffs.append(f"diffamp: {bad.size} frame(s) differ, first {bad[:5].tolist()}")
        if p.shape != post.points.shape:
            diffs.append(f"points: {p.shape} live against {post.points.shape}")
        elif not np.array_equal(p, post.points):
            bad = np.nonzero(~np.all(p == post.points, axis=0))[0]
            diffs.append(f"points: {bad.size} position(s) differ, first {bad[:5].tolist()}, "
                         f"largest by {float(np.abs(p - post.points).max()):.3g} µm")
        live_mask = f["mask"][()] if "mask" in f else None
        if (live_mask is None) != (post.mask is None) or (live_mask is not None and not np.array_equal(live_mask, post.mask)):
            diffs.append("mask differs")
        for k in ("lambda_nm", "z_m", "ccd_pixel_um"):
            if float(f[k][()]) != float(getattr(post, k)):
                diffs.append(f"{k}: {float(f[k][()])} live against {float(getattr(post, k))}")
    out: dict[str, Any] = {"equal": not diffs, "differences": diffs, "views_live": int(d.shape[0]),
                           "views_export": int(post.n_views)}
    if written_ids is not None and len(written_ids) == d.shape[0] and post.n_views and \
            max(written_ids, default=-1) < post.n_views and d.shape[1:] == post.diffamp.shape[1:]:
        ids = np.asarray(written_ids)                 # the views received, against the export's views of those ids
        out["received_views_equal"] = bool(np.array_equal(d, post.diffamp[ids]) and np.array_equal(p, post.points[:, ids]))
    return out


# -- the feed --------------------------------------------------------------------------------------

class StreamFeed:
    """Subscribe to the documents (RunEngine or a listener's dispatcher): fly2dpd runs live from the streams.

    Give the :class:`~.router.PtychoCallback` the feed (``cb.live.append(feed)``): at the stop it asks
    :meth:`took_over`. :meth:`start` connects the receivers; :meth:`close` ends them.
    """

    def __init__(self, config: StreamFeedConfig | None = None) -> None:
        self.config = config or StreamFeedConfig()
        self.runs: dict[str, StreamRun] = {}
        self.open: list[StreamRun] = []
        self.refused: list[str] = []
        self._router = RunRouter([self._factory])
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._untied_eiger: collections.deque = collections.deque(maxlen=self.config.stream.queue_size)
        self._untied_panda: collections.deque = collections.deque(maxlen=self.config.stream.queue_size)
        self.receivers: list[Receiver] = []
        self._thread = threading.Thread(target=self._work, name="hxn-ptycho-streamfeed", daemon=True)

    def start(self) -> StreamFeed:
        s = self.config.stream
        if not s.eiger or not s.panda:
            raise StreamError("the stream feed needs both --eiger-stream and --panda-stream (e.g. "
                              f"{HXN_EIGER_STREAM} and {HXN_PANDA_STREAM})")
        # what the first chunk needs, imported now: not while the first frames queue up
        import hxn_ptycho.job
        import hxn_ptycho.scanfile
        import hxn_ptycho.session  # noqa: F401

        from . import orientation  # noqa: F401
        self.eiger_rx = Receiver(s.eiger, "eiger", s, multipart=True).start()
        self.panda_rx = Receiver(s.panda, "panda", s, multipart=False).start()
        self.receivers = [self.eiger_rx, self.panda_rx]
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        for r in self.receivers:
            r.stop()

    # -- documents (the RunEngine's thread: cheap) ------------------------------------------------
    def __call__(self, name: str, doc: dict) -> None:
        try:
            with self._lock:
                self._router(name, doc)
                if name == "stop":
                    run = self.runs.get(str(doc.get("run_start")))
                    if run is not None:
                        run.stopped_at = time.time()
        except Exception as exc:  # noqa: BLE001 - nothing may raise into the RunEngine
            log.error("hxn-ptycho stream feed: ignored a malformed %r document (%s: %s)", name, type(exc).__name__, exc)

    def _factory(self, name: str, start: dict) -> tuple[list, list]:
        from .router import ignore_reason
        if ignore_reason(start, self.config.export.detectors) is not None or scan_kind(start) != "fly2dpd":
            return [], []
        collector = RunCollector(start, lambda run: None, keep=kept_field(start, self.config.export))
        try:
            run = StreamRun(self.config, collector)
        except ExportError as exc:
            log.error("stream feed: run %s cannot be fed from the streams: %s", start.get("uid"), exc)
            return [collector], []
        self.runs[run.uid] = run
        self.open.append(run)
        return [collector], []

    # -- the worker: tie, pair, append ------------------------------------------------------------
    def _tie_eiger(self, series: Any, now: float) -> StreamRun | None:
        for run in self.open:
            if run.series == series and not run.eiger_ended:
                return run
        for run in self.open:
            if run.series == "untied" and run.stopped_at is None and \
                    (run.wanted_series is None or run.wanted_series == series):
                run.series = series
                log.info("stream feed: Eiger series %s tied to run %s (scan %s)", series, run.uid, run.run.scan_id)
                return run
        return None

    def _tie_panda(self, now: float, kind: str) -> StreamRun | None:
        for run in self.open:
            if run.panda_tied and not run.panda_ended:
                return run
        if kind != "start":
            return None
        for run in self.open:
            if not run.panda_tied and run.stopped_at is None:
                run.panda_tied = True
                log.info("stream feed: PandA stream tied to run %s (scan %s)", run.uid, run.run.scan_id)
                return run
        return None

    def _refuse(self, what: str) -> None:
        if what not in self.refused:
            self.refused.append(what)
            log.warning("stream feed: %s", what)

    def _work(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            got = 0
            for rx, untied in ((self.eiger_rx, self._untied_eiger), (self.panda_rx, self._untied_panda)):
                if untied and self._tie_ready(rx):           # a run opened: the messages that waited for it
                    waiting = list(untied)
                    untied.clear()
                    for item in waiting:
                        self._dispatch(rx, item, untied)
                for _ in range(512):
                    try:
                        item = rx.queue.get_nowait()
                    except queue.Empty:
                        break
                    got += 1
                    self._dispatch(rx, item, untied)
            with self._lock:
                runs = list(self.open)
                for untied, what in ((self._untied_eiger, "Eiger"), (self._untied_panda, "PandA")):
                    while untied and now - untied[0][0] >= self.config.stream.tie_wait_s:
                        _arrived, msg = untied.popleft()
                        self._refuse(f"{what} messages with no open fly2dpd run to tie them to within "
                                     f"{self.config.stream.tie_wait_s:g} s (series {getattr(msg, 'series', None)}): refused")
            for run in runs:                                  # outside the lock: the RunEngine never waits for this
                run.blocked_s = sum(r.blocked_s for r in self.receivers)
                final = run.streams_over(now)
                run.step(now, final=final)
                if final:
                    with self._lock:
                        self.open.remove(run)
                    self._after(run)
            if not got:
                time.sleep(0.005)

    def _tie_ready(self, rx: Receiver) -> bool:
        return any(r.stopped_at is None and (r.series == "untied" if rx.multipart else not r.panda_tied)
                   for r in self.open)

    def _dispatch(self, rx: Receiver, item: tuple[float, Any], untied: collections.deque) -> None:
        arrived, raw = item
        try:
            with self._lock:
                if rx.multipart:
                    msg = raw if hasattr(raw, "kind") else peek_eiger(raw)
                    if not hasattr(raw, "kind"):
                        msg.parts = raw      # decompressed once tied (frames of refused series never are)
                        msg.image = None
                    run = self._tie_eiger(msg.series, arrived)
                    if run is None:
                        untied.append((arrived, msg))
                        return
                    run.eiger(msg, arrived)
                else:
                    msg = raw if hasattr(raw, "kind") else decode_panda(raw)
                    run = self._tie_panda(arrived, msg.kind)
                    if run is None:
                        if msg.kind in ("start", "data"):
                            untied.append((arrived, msg))
                        return
                    run.panda(msg, arrived)
        except StreamError as exc:
            self._refuse(f"{rx.name} message refused: {exc}")

    def _after(self, run: StreamRun) -> None:
        if run.publisher is not None:
            threading.Thread(target=run.publisher.stop, daemon=True).start()

    # -- at the stop (the PtychoCallback's worker thread) ---------------------------------------------------
    def compare(self, raw_uid: str, timeout: float = 600.0) -> dict[str, Any] | None:
        """Wait for the run's streams to end; compare its live file with the post-stop export (same decisions)."""
        from .export import build_scan
        run = self.runs.get(raw_uid)
        if run is None:
            return None
        run.done.wait(timeout)
        if run.comparison is not None:
            return run.comparison
        facts: dict[str, Any] = {"source": "streams", **run.status(), "missing_id_list": run.pairer.missing[:1000],
                                 "appended_during_scan": run.appended_during_scan, "refused": list(self.refused)}
        if run.writer is None or run.gave_up:
            facts.update(equal=False, differences=[run.gave_up or "no live scan file was written"])
        else:
            cfg = dataclasses.replace(self.config.export, center=tuple(run.decisions["center"]),
                                      orientation=run.decisions["orientation"])
            try:
                post = build_scan(run.run, cfg)
                facts.update(compare_with_export(run.scan_path, post, run.written_ids))
            except ExportError as exc:
                facts.update(equal=False, differences=[f"the post-stop export failed: {exc}"])
        run.comparison = facts
        return facts

    def took_over(self, raw_uid: str, timeout: float = 3600.0) -> bool:
        """True if the live result is the run's derived run; False (after saying why, loudly where the
        live file differs from the export) if the post-stop path must run."""
        run = self.runs.get(raw_uid)
        if run is None:
            return False
        facts = self.compare(raw_uid, timeout) or {}
        if not facts.get("equal"):
            log.error("run %s: LIVE PATH FAILED — the live scan file from the streams differs from the post-stop "
                      "export: %s. The post-stop export is used.", raw_uid, "; ".join(facts.get("differences", [])))
            run._end_job()
            self._leave_facts(run, facts)
            return False
        if run.job is None or run.spec is None:
            if run.not_followed is not None:
                log.info("run %s: reconstructed at the stop (%s)", raw_uid, run.not_followed)
            self._leave_facts(run, facts)
            return False
        try:
            run.job.wait(timeout)
        except subprocess.TimeoutExpired:
            run._end_job()
        from hxn_ptycho.job import read_outcome, write_outcome
        outcome = read_outcome(run.outcome_path)
        if outcome is None or outcome.get("status") != "success":
            log.warning("run %s: the live job did not succeed (%s): the post-stop path takes over", raw_uid,
                        (outcome or {}).get("reason") or getattr(getattr(run.job, "job", None), "reason", None))
            self._leave_facts(run, facts)
            return False
        live = dict((outcome.get("measured") or {}).get("live") or {})
        live["stream"] = facts
        outcome.setdefault("measured", {})["live"] = live
        write_outcome(run.outcome_path, outcome)
        if run.spec.source.catalog:
            from .derived import publish_outcome, run_uid
            publish_outcome(run.spec, outcome, uid=run_uid(run.spec))
        return True

    def _leave_facts(self, run: StreamRun, facts: dict[str, Any]) -> None:
        """For the post-stop job's ``recon["measured"]["live"]``: ``results/result_<stem>.live_facts.json``."""
        from hxn_ptycho.job import live_facts_path
        path = live_facts_path(Path(self.config.work_dir) / "results" / f"result_{run.stem}.h5")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"stream": facts, "used": "post-stop export"}, default=str))

    def wait(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        for run in list(self.runs.values()):
            run.done.wait(max(0.0, deadline - time.monotonic()))
