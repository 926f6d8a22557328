"""The long-lived job: follow a growing scan file, reconstruct while it grows, finish at the stop.

``python -m hxn_ptycho.job SPEC.json --follow`` runs :func:`follow_distributed` on every rank in
place of the offline :func:`hxn_ptycho.distributed.run_distributed`: the scan file
(:class:`hxn_ptycho.scanfile.GrowingScanWriter`) is the only contract with whoever measures. Rank 0
refreshes the file and tells every rank how many views are whole and whether the scan is complete
(one broadcast); each rank reads the positions of the new views and the frames of its own share
(:meth:`hxn_ptycho.session.ReconSession.share`) and the session adds them; between refreshes the
session iterates (DM). Rank 0 hands a snapshot at most once a ``preview_interval_s`` to a
latest-wins writer thread (a newer snapshot replaces one not yet written; the engine never waits
for the disk). Once the file is complete and every view is in, :meth:`ReconSession.finish` runs the
rest of the offline schedule from the live state (saved first as ``<result>.live_state.h5``): the
live iterations count as its first iterations, at least its last ``live_final_share`` runs on the
complete scan (:func:`hxn_ptycho.session.resume_at`) — or, when the live phase fell behind, the cold
offline run (:func:`hxn_ptycho.session.takes_live_state`); then the job writes the result exactly as
an offline job does.

The preview file (``<result>.preview.h5``, replaced atomically) holds the object's amplitude and
phase (first object mode), the probe modes' amplitude and phase, and the attributes ``views``,
``iteration``, ``data_error``, ``newest_readable_at`` (epoch seconds at which the newest view in the
model was first seen whole) and ``written_at``. NSLS2/holoptycho overwrites ``live/`` previews every
10 iterations (its ``ptycho_holo`` writer); here previews go by time, so their rate does not depend
on the scan's size.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .engine import _stop_requested
from .errors import HxnPtychoError
from .h5util import FileFormatError
from .params import ParamError, ReconParams
from .resultfile import ResultData
from .scanfile import GrowingScanReader
from .session import Extent, ReconSession, Snapshot

log = logging.getLogger(__name__)


LOG_CAP = 300          # previews kept in the outcome's log (the first fifth and the last four fifths)


class FollowError(HxnPtychoError):
    """The growing scan file did not appear, or stopped growing before it was marked complete."""


@dataclass
class FollowOptions:
    iterations_per_round: int = 1           # DM iterations between refreshes of the file
    poll_s: float = 0.1                     # sleep when there is nothing to do
    preview_interval_s: float = 1.0         # at most one preview a second
    appear_s: float = 120.0                 # the file must appear within this
    stall_s: float = 600.0                  # no new view and not complete for this long: fail
    preview_path: Path | None = None
    state_path: Path | None = None


def preview_path_for(result_file: str | Path) -> Path:
    p = Path(result_file)
    return p.with_name(p.name.removesuffix(".h5") + ".preview.h5")


def state_path_for(result_file: str | Path) -> Path:
    p = Path(result_file)
    return p.with_name(p.name.removesuffix(".h5") + ".live_state.h5")


def receiver_status(path: Path | None) -> dict[str, Any]:
    """A stream receiver's status beside the growing scan file (``<scan>.receiver.json``, written by
    ``callbacks/stream.py``): its numbers and flags, for the preview's metadata; {} if none."""
    if path is None:
        return {}
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in d.items() if isinstance(v, (int, float, bool))} if isinstance(d, dict) else {}


def write_preview(path: Path, snap: Snapshot, newest_readable_at: float, extra: dict[str, Any] | None = None,
                  final: bool = False) -> float:
    """Write one preview file atomically (``extra``: a stream receiver's status, as ``receiver_<key>``;
    ``final``: the finished result's); returns its time."""
    from .h5util import atomic_h5
    obj, probe = snap.object[0], snap.probe
    with atomic_h5(path) as f:
        f.create_dataset("object_amplitude", data=np.abs(obj).astype(np.float32))
        f.create_dataset("object_phase", data=np.angle(obj).astype(np.float32))
        f.create_dataset("probe_amplitude", data=np.abs(probe).astype(np.float32))
        f.create_dataset("probe_phase", data=np.angle(probe).astype(np.float32))
        f.create_dataset("positions_px", data=snap.positions_px)
        written = time.time()
        for k, v in (("views", snap.views), ("iteration", snap.iteration), ("data_error", snap.data_error),
                     ("newest_readable_at", newest_readable_at), ("written_at", written),
                     ("taken_at", snap.taken_at), ("final", int(final))):
            f.attrs[k] = v
        for k, v in (extra or {}).items():
            f.attrs[f"receiver_{k}"] = v
    return written


def read_preview(path: str | Path) -> dict[str, Any]:
    """A preview file as a dict of arrays and attributes."""
    from .h5util import read_h5
    with read_h5(path) as f:
        out: dict[str, Any] = {k: f[k][()] for k in f}
        out.update({k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()})
    return out


class PreviewWriter:
    """Latest-wins: :meth:`submit` never waits; a thread writes the newest snapshot, at most once an interval."""

    def __init__(self, path: Path, interval_s: float = 1.0) -> None:
        self.path, self.interval = path, float(interval_s)
        self._slot: tuple[Snapshot, float, bool] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._hurry = threading.Event()            # the final preview, or close: cut the interval's wait short
        self._done = False
        self.log: list[dict[str, Any]] = []        # one entry per live preview written
        self.final: dict[str, Any] | None = None    # the finished result's preview
        self.dropped = 0
        self.last_written = 0.0
        self.status_path: Path | None = None       # a stream receiver's status file, if any
        self._thread = threading.Thread(target=self._run, name="hxn-ptycho-preview", daemon=True)
        self._thread.start()

    def due(self) -> bool:
        """Whether a snapshot is worth taking now (the last one went out at least an interval ago)."""
        return time.time() - self.last_written >= self.interval and self._slot is None

    def submit(self, snap: Snapshot, newest_readable_at: float, final: bool = False) -> None:
        with self._lock:
            if self._slot is not None:
                self.dropped += 1
            self._slot = (snap, newest_readable_at, final)
        if final:
            self._hurry.set()
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                item, self._slot = self._slot, None
            if item is not None:
                wait = self.last_written + self.interval - time.time()
                if wait > 0 and not self._done and not item[2]:     # the final preview waits for nothing
                    self._hurry.wait(wait)
                    with self._lock:                  # a newer snapshot came in meanwhile: it wins
                        if self._slot is not None:
                            item, self._slot = self._slot, None
                snap, readable, final = item
                try:
                    extra = receiver_status(self.status_path)
                    written = write_preview(self.path, snap, readable, extra, final)
                except OSError as exc:              # a preview is never worth failing the job
                    log.warning("hxn-ptycho: preview not written (%s)", exc)
                    continue
                self.last_written = written
                entry = {"written_at": written, "views": snap.views, "iteration": snap.iteration,
                         "data_error": snap.data_error, "newest_readable_at": readable,
                         **({"receiver_falling_behind": extra["falling_behind"]} if "falling_behind" in extra else {})}
                if final:
                    self.final = entry          # the finished result's preview: not a live one
                else:
                    self.log.append(entry)
            if self._done and self._slot is None:
                return

    def close(self) -> None:
        """Write what is pending, then stop the thread."""
        self._done = True
        self._hurry.set()
        self._wake.set()
        self._thread.join(timeout=30)


def warm_up(backend: Any, params: ReconParams) -> float:
    """Load the backend's compiled kernels and the FFT for ``params``' precision (a follow job does
    this while it waits for the scan's first views); returns the seconds."""
    t0 = time.perf_counter()
    cdtype = np.complex128 if params.precision == "double" else np.complex64
    try:
        backend.warm_up(cdtype)
        backend.fft2(backend.asarray(np.ones((1, 8, 8)), cdtype))
    except Exception as exc:  # noqa: BLE001 - a warm-up is never worth failing the job: the first iteration pays
        log.debug("hxn-ptycho: warm-up skipped (%s: %s)", type(exc).__name__, exc)
    return time.perf_counter() - t0


def _agree(comm: Any, value: Any) -> Any:
    return comm.bcast(value) if comm.size > 1 else value


def _final_as_offline(session: ReconSession, path: str, params: ReconParams, comm: Any, state_path: Path,
                      log_fn: Callable[[str], None] | None, stop: Any) -> ResultData:
    """The final phase on several ranks: the offline job itself (:func:`~hxn_ptycho.distributed.run_distributed`)
    on the complete file, from the saved live state (or cold, when the live phase fell behind:
    :func:`~hxn_ptycho.session.takes_live_state`). The live deal gave each rank a share of every
    chunk; the offline split gives each a contiguous range, so the sums run in another order: re-read
    the offline share instead, and the result is bit-identical to ``hxn-ptycho reconstruct
    --init-from <state>`` with the same ranks (with one rank :meth:`ReconSession.finish` already is)."""
    import dataclasses

    from .distributed import run_distributed
    live_its = session.iteration
    from_live = session.final_from_live_state()
    if from_live and comm.rank == 0:
        session.save_state(state_path)
    canvas_grown = session.canvas_grown
    session.close()
    session.rec = None                   # its memory goes before the offline set-up takes its own
    comm.barrier()                       # the state is on disk before any rank reads it
    final = dataclasses.replace(params, init_from=str(state_path) if from_live else params.init_from)
    res, _info = run_distributed(path, final, comm, log=log_fn, stop=stop)
    res.attrs.update({"live_iterations": live_its, "live_canvas_grown": canvas_grown,
                      "final_from_live_state": bool(from_live)})
    return res


def follow_distributed(path: str, params: ReconParams, comm: Any, *, result_file: str | None = None,
                       options: FollowOptions | None = None, progress: bool = False,
                       log_fn: Callable[[str], None] | None = None,
                       stop: Any = None) -> tuple[ResultData, dict[str, Any]]:
    """Follow the growing scan file ``path`` to its completion on the ranks of ``comm``; every rank
    returns the final result (see the module's docstring) and facts about the live phase."""
    from .distributed import LocalReducer, MPIReducer, rank_backend, rank_reducer
    from .mode_count import wants_count
    if wants_count(params):
        raise ParamError("probe_modes=auto with auto_rule='heldout' counts the modes of the finished scan "
                         "before reconstructing it, so it cannot follow a growing scan: follow it with a "
                         "number of probe modes (or auto_rule='trend'), or reconstruct the finished scan")
    opt = options or FollowOptions()
    if result_file is not None:
        opt.preview_path = opt.preview_path or preview_path_for(result_file)
        opt.state_path = opt.state_path or state_path_for(result_file)
    started = time.time()
    # paid while the scan's first views arrive, not after them: the backend, its compiled kernels, the FFT
    backend = rank_backend(params, comm)
    warmed: dict[str, float] = {}
    warming = threading.Thread(target=lambda: warmed.update(warm_up_s=warm_up(backend, params)),
                               name="hxn-ptycho-warm-up", daemon=True)
    warming.start()                  # beside the wait: views that come first are not held up by it
    reader: GrowingScanReader | None = None
    while reader is None:
        try:
            reader = GrowingScanReader(path) if Path(path).exists() else None
        except FileFormatError:
            if time.time() - started > opt.appear_s:     # there, but not a growing scan file: say why
                raise
        if reader is None:
            if time.time() - started > opt.appear_s:
                raise FollowError(f"the growing scan file {path} did not appear within {opt.appear_s:.0f} s")
            time.sleep(opt.poll_s)
    appeared = time.time()
    host = MPIReducer(comm) if comm.size > 1 else LocalReducer()
    reducer = rank_reducer(host, backend)
    quiet = (lambda msg: None) if comm.rank else log_fn
    e = reader.extent_um()
    extent = Extent((e[0], e[1]), (e[2], e[3])) if e is not None else None
    header = reader.header()
    session = ReconSession(header, params, extent=extent, backend=backend, reducer=reducer, log=quiet, stop=stop,
                           progress=progress and comm.rank == 0)
    previews = PreviewWriter(opt.preview_path, opt.preview_interval_s) \
        if comm.rank == 0 and opt.preview_path is not None else None
    if previews is not None:
        previews.status_path = Path(f"{path}.receiver.json")
    readable_at: list[float] = []               # rank 0: when each view was first seen whole
    marks: dict[str, float] = {"job_started_at": started, "file_appeared_at": appeared}
    in_model = 0
    last_growth = time.time()
    complete_seen: float | None = None
    halted = False
    try:
        while True:
            ready, complete = reader.refresh() if comm.rank == 0 else (0, False)
            now = time.time()
            if comm.rank == 0 and ready > len(readable_at):
                readable_at += [now] * (ready - len(readable_at))
            halt = comm.rank == 0 and _stop_requested(stop)
            ready, complete, halt = _agree(comm, (ready, complete, halt))
            if halt and session.ready():     # Ctrl-C: finish with the views so far (marked interrupted)
                log.warning("hxn-ptycho: stop requested while following %s: finishing with %d views", path, in_model)
                halted = True
                break
            if complete and complete_seen is None:
                complete_seen = now
            if ready > in_model:
                last_growth = now
                if comm.rank:
                    reader.refresh()
                    reader.ready = max(reader.ready, ready)
                pts = reader.points(in_model, ready)
                mine = session.share(ready - in_model)
                frames = reader.frames(in_model + mine.start, in_model + mine.stop)
                session.append_views(pts, frames)
                in_model = ready
                marks.setdefault("first_views_in_at", time.time())
            if complete and in_model == ready:
                break
            if not complete and time.time() - last_growth > opt.stall_s:
                raise FollowError(f"the scan file {path} has not grown for {opt.stall_s:.0f} s and is not "
                                  f"complete ({in_model} views)")
            if session.ready():
                for _ in range(opt.iterations_per_round):    # a preview may go out after any iteration
                    session.iterate(1)
                    if "first_iteration_at" not in marks:
                        marks["first_iteration_at"], marks["cpu_s_to_first_iteration"] = time.time(), time.process_time()
                    if previews is not None and previews.due():
                        previews.submit(session.snapshot(), readable_at[in_model - 1])
            else:
                time.sleep(opt.poll_s)
        if complete_seen is None:
            complete_seen = time.time()
        warming.join()
        marks.update(warmed)
        marks["final_phase_from"], cpu0 = time.time(), time.process_time()
        if comm.size > 1 and not halted and opt.state_path is not None:
            reader.close()
            res = _final_as_offline(session, path, params, comm, opt.state_path, quiet, stop)
        else:
            res = session.finish(state_path=opt.state_path)
        marks["final_phase_to"], marks["final_phase_cpu_s"] = time.time(), time.process_time() - cpu0
        if halted:                          # the scan file was never complete: so is this result
            res.attrs["interrupted"] = True
        if previews is not None and in_model:    # the last preview is the finished result
            previews.submit(Snapshot(object=res.object, probe=res.probe, views=in_model,
                                     iteration=session.iteration + len(res.error_data),
                                     data_error=float(res.attrs.get("final_data_error", float("nan"))),
                                     positions_px=res.positions_px, newest_view=in_model - 1),
                            readable_at[in_model - 1] if readable_at else time.time(), final=True)
    finally:
        session.close()
        reader.close()
        if previews is not None:
            previews.close()
    facts: dict[str, Any] = {"views": in_model, "live_iterations": session.iteration,
                             "live_credit": session.live_credit,
                             "resumed_at_iteration": int(res.attrs.get("first_iteration", 0)),
                             "final_from_live_state": bool(res.attrs.get("final_from_live_state", False)),
                             "final_phase_s": float(res.attrs.get("elapsed_s") or 0.0),
                             "complete_seen_at": complete_seen, "finished_at": time.time(),
                             "canvas_grown": session.canvas_grown, "timeline": marks}
    if previews is not None:
        plog = previews.log
        lags = [p["written_at"] - p["newest_readable_at"] for p in plog]
        gaps = np.diff([p["written_at"] for p in plog])
        first_at = readable_at[0] if readable_at else started
        facts.update({"previews": len(plog), "previews_dropped": previews.dropped,
                      "final_preview": previews.final,
                      "first_preview_latency_s": (plog[0]["written_at"] - first_at) if plog else None,
                      "largest_lag_s": max(lags) if lags else None,
                      "max_preview_gap_s": float(gaps.max()) if gaps.size else None,
                      "preview_log": plog if len(plog) <= LOG_CAP else plog[:LOG_CAP // 5] + plog[-LOG_CAP * 4 // 5:],
                      "first_readable_at": first_at,
                      "readable_256_at": readable_at[min(256, len(readable_at)) - 1] if readable_at else None})
    info = {"path": path, "n_views": in_model, "pixel_size_m": header.lambda_nm * 1e-9 * header.z_m /
            (header.n * header.ccd_pixel_um * 1e-6), "live": facts}
    res.attrs["mode"] = "sync"
    return res, info
