"""The ptychography callback: a ``RunRouter`` that collects ptychography runs and queues their jobs.

The same :class:`PtychoCallback` works subscribed in-process (``RE.subscribe(cb)``) and inside
``hxn-ptycho listen`` fed by a 0MQ (or Kafka) ``RemoteDispatcher``. On the RunEngine's thread it
only routes documents into per-run :class:`~.collector.RunCollector` objects (appends) and, at a
stop document, puts the collected run on a queue; it catches and logs every exception. A worker
thread does the heavy part: read the frames, write the scan file, submit the job; a broken run
(missing frames or positions) is recorded in the catalog as a ``fail`` derived run instead.

The in-flight journal (``WORK/inflight.<id>.journal``, one JSON line per event: a run of ours started,
stopped, was processed) costs one buffered line write per run start and stop on the RunEngine's
thread. A callback that starts over a journal left by a killed process records every run that had
started but was never processed as a ``fail`` derived run ("listener restarted mid-run"), under
the run's fixed uid (:func:`~.derived.run_uid`), so a run missed in a restart still ends in exactly
one derived run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import threading
import uuid
from collections.abc import Callable
from typing import Any, Protocol
from dataclasses import dataclass, field
from pathlib import Path

from event_model import RunRouter

from hxn_ptycho.errors import HxnPtychoError
from hxn_ptycho.params import ReconParams
from hxn_ptycho.spec import Execution, Geometry, JobSpec, Source, check_ranks

from .collector import CollectedRun, PassThroughFiller, RunCollector
from .derived import PLAN_NAME, PLAN_TYPE
from .export import ExportConfig, ExportError, export_scan, kept_field, why_not_ptycho
from .launcher import Job, JobQueue, QueueFull

log = logging.getLogger(__name__)
# scan-file attributes the derived run publishes in its recon record (values and their sources)


@dataclass
class CallbackConfig:
    """What the callback does with a finished ptychography run."""

    work_dir: str = "hxn_ptycho_work"
    catalog: str | None = None                 # URL or config file; None = no catalog (files only)
    params: dict = field(default_factory=dict)  # ReconParams fields for the job
    nprocs: int = 1
    mode: str = "sync"                          # MPI scheme: sync or async
    gpus: list[str] = field(default_factory=list)   # the GPU ids of a job's pool
    force_nprocs: bool = False
    launcher: str = "local"                     # or "slurm" (sbatch/srun; settings in ``slurm``)
    slurm: dict = field(default_factory=dict)   # hxn_ptycho.slurm.SlurmSettings as a dict
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        ReconParams.from_dict(dict(self.params))        # bad parameters are refused at once
        self.execution()

    def execution(self) -> Execution:
        ex = Execution(ranks=int(self.nprocs), mode=self.mode, gpus=list(self.gpus), force=self.force_nprocs,
                       launcher=self.launcher, slurm=dict(self.slurm))
        ex.validate()
        return ex


def ignore_reason(start: dict, detectors: tuple[str, ...]) -> str | None:
    """Why a run is not ours (None: it is a ptychography run we reconstruct). Detectors are
    looked for at the top level and in ``start['scan']['detectors']`` (fly2dpd)."""
    if start.get("plan_type") == PLAN_TYPE or start.get("plan_name") == PLAN_NAME or start.get("raw_uid"):
        return "it is an analysis (derived) run"
    return why_not_ptycho(start, detectors)


def is_ptycho_run(start: dict, detectors: tuple[str, ...]) -> bool:
    """A run is ours if it names a configured detector, is 2-D and is not an analysis run."""
    return ignore_reason(start, detectors) is None


_SAFE_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def run_stem(run: CollectedRun) -> str:
    """``<scan_id>_<uid>``: a file-name stem unique per run and safe whatever the metadata holds.

    The whole uid is kept when it is a plain name (letters, digits, ``_.-``, not starting with
    ``-`` or ``.``, at most 100 characters); any other uid (``/``, NUL, a leading ``-``, spaces,
    non-ASCII...) is replaced by ``h~`` + 32 hex digits of its SHA-256, which no plain uid can
    equal. A scan id that is not an integer in 0..10¹⁸ becomes ``x``.
    """
    return file_stem(run.scan_id, run.uid)


@dataclass
class LostStart:
    """A stop document whose run's start the callback never saw."""

    stop: dict


def int_scan_id(scan_id: Any) -> int | None:
    """A scan id as recorded in a job spec: an integer (never a bool), else None."""
    return scan_id if isinstance(scan_id, int) and not isinstance(scan_id, bool) else None


def file_stem(scan_id: Any, uid: str) -> str:
    """:func:`run_stem` of a scan id and a uid."""
    sid = scan_id if isinstance(scan_id, int) and not isinstance(scan_id, bool) and 0 <= scan_id < 10**18 else "x"
    if not _SAFE_UID.fullmatch(uid):
        uid = "h~" + hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{sid}_{uid}"


class TakesOver(Protocol):
    """A live feed (:class:`~.livefeed.LiveFeed`, :class:`~.stream.StreamFeed`): at a run's stop it
    says whether its live reconstruction is the run's result (then the post-stop path does not run)."""

    def took_over(self, raw_uid: str, timeout: float = 3600.0) -> bool: ...


class PtychoCallback:
    """Subscribe to a RunEngine or a RemoteDispatcher: ``RE.subscribe(PtychoCallback(cfg, jobs))``.

    ``jobs`` is a started :class:`~.launcher.JobQueue` (or None: write scan files only).
    ``on_failure(run_uid, scan_id, reason)`` records runs that cannot be exported; by default a
    ``fail`` derived run in ``config.catalog``.
    """

    def __init__(self, config: CallbackConfig, jobs: JobQueue | None = None,
                 on_failure: Callable[[CollectedRun, str], None] | None = None) -> None:
        self.config = config
        self.jobs = jobs
        self.on_failure = on_failure or self._publish_failure
        from .trust import private_dir
        self.work_dir = private_dir(Path(config.work_dir).resolve())     # 0700: every frame and result
        private_dir(self.work_dir / "scans")
        private_dir(self.work_dir / "results")
        self._starts: dict[str, None] = {}               # uids of the starts seen (bounded), for lost starts
        self._journal_lock = threading.Lock()
        self._journal = None
        self.journal_path: Path | None = None
        self.recovered: list[tuple[str, str]] = []       # (raw uid, reason) of runs a restart missed
        old = self._rotate_journal()
        self._router = RunRouter([self._factory], filler_class=PassThroughFiller)  # no per-row work
        self._pending: queue.Queue[CollectedRun | LostStart | None] = queue.Queue()
        self._busy = threading.Event()
        self.submitted: list[Job] = []
        self.failed: list[tuple[str, str]] = []          # (raw uid, reason)
        # live feeds (callbacks.livefeed.LiveFeed for step scans, callbacks.stream.StreamFeed for fly scans
        # from the detector streams), each asked at the stop: a feed whose live job succeeded publishes the result
        self.live: list[TakesOver] = []
        self._worker = threading.Thread(target=self._work, name="hxn-ptycho-export", daemon=True)
        self._worker.start()
        self._recovery = threading.Thread(target=self._recover, args=(old,), name="hxn-ptycho-recover", daemon=True)
        self._recovery.start()

    # -- the in-flight journal ------------------------------------------------------------------
    def _rotate_journal(self) -> list[Path]:
        """Open this callback's journal (``WORK/inflight.<id>.journal``, held with ``flock`` while it
        lives) and set aside, for :meth:`_recover`, the journals whose owner is gone (their lock is
        free): another live callback on the same work folder keeps its own."""
        import fcntl
        for path in sorted(self.work_dir.glob("inflight.*.journal")):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.replace(path, path.with_name(path.name + ".old"))       # owner dead: ours to recover
            except OSError:
                pass                                                       # alive (locked) or gone
            finally:
                os.close(fd)
        orphans = sorted(self.work_dir.glob("inflight.*.journal.old"))
        path = self.work_dir / f"inflight.{os.getpid()}-{uuid.uuid4().hex[:8]}.journal"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._journal = os.fdopen(fd, "a", buffering=1, encoding="utf-8")
            self.journal_path = path
        except OSError as exc:
            log.error("hxn-ptycho callback: no in-flight journal (%s): runs missed by a restart will not be "
                      "recorded", exc)
        return orphans

    def _note(self, kind: str, uid: str, **extra: object) -> None:
        """One journal line (cheap: a buffered write, no fsync; a killed process loses nothing written)."""
        if self._journal is None:
            return
        try:
            line = json.dumps({"k": kind, "uid": uid, **extra}, default=str) + "\n"
            with self._journal_lock:
                self._journal.write(line)
        except (OSError, ValueError, TypeError) as exc:
            log.error("hxn-ptycho callback: journal write failed (%s)", exc)

    def _stopped(self, run: CollectedRun) -> None:
        self._note("stop", run.uid, exit_status=run.exit_status)
        self._pending.put_nowait(run)

    def _recover(self, journals: list[Path]) -> None:
        """Record the runs an earlier process journaled as started but never processed."""
        for path in journals:
            try:
                started: dict[str, dict] = {}
                for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                    try:
                        e = json.loads(line)
                    except ValueError:
                        continue                    # a line cut by the kill
                    if e.get("k") == "start":
                        started[e["uid"]] = e
                    elif e.get("k") == "stop" and e["uid"] in started:
                        started[e["uid"]]["stop"] = e.get("exit_status")
                    elif e.get("k") == "done":
                        started.pop(e["uid"], None)
                for uid, e in started.items():
                    if e.get("stop") not in (None, "success"):
                        continue                    # aborted or failed in the RunEngine: nothing is owed
                    if e.get("stop") and self._queued(uid):
                        continue                    # it was submitted just before the kill
                    why = ("listener restarted mid-run: the run's documents after its start were lost"
                           if e.get("stop") is None else
                           "listener restarted after the run ended, before it was exported")
                    run = CollectedRun(start={"uid": uid, "scan_id": e.get("scan_id")})
                    self.recovered.append((uid, why))
                    log.error("run %s (scan %s): %s", uid, e.get("scan_id"), why)
                    self._fail(run, why)
                path.unlink()
            except Exception:                 # recovery must never stop the callback
                log.exception("hxn-ptycho callback: could not recover the runs of %s", path)

    def _queued(self, raw_uid: str) -> bool:
        if self.jobs is None:
            return False
        states = ("pending", "running", "done", "failed")
        return any(j.raw_uid == raw_uid and not j.follow          # a live job is not the post-stop path's
                   for state in states for j in self.jobs.jobs(state))

    # -- on the RunEngine's thread: cheap, never raises -------------------------------------
    def __call__(self, name: str, doc: dict) -> None:
        try:
            if name == "start":
                self._starts[str(doc.get("uid"))] = None
                if len(self._starts) > 100_000:
                    del self._starts[next(iter(self._starts))]
            elif name == "stop" and str(doc.get("run_start")) not in self._starts:
                self._pending.put_nowait(LostStart(dict(doc)))     # found from the catalog, off this thread
                return
            self._router(name, doc)
        except Exception as exc:  # noqa: BLE001 - nothing may raise into the RunEngine
            log.error("hxn-ptycho callback: ignored a malformed %r document (%s: %s)",
                      name, type(exc).__name__, exc)

    def _factory(self, name: str, start: dict) -> tuple[list, list]:
        reason = ignore_reason(start, self.config.export.detectors)
        if reason is not None:
            log.info("run %s (scan %s) ignored: %s", start.get("uid"), start.get("scan_id"), reason)
            return [], []
        log.info("ptychography run %s (scan %s) started", start.get("uid"), start.get("scan_id"))
        collector = RunCollector(start, self._stopped, keep=kept_field(start, self.config.export))
        self._note("start", str(start.get("uid")), scan_id=start.get("scan_id"))
        return [collector], []

    # -- on the worker thread ---------------------------------------------------------------
    def _work(self) -> None:
        while True:
            run = self._pending.get()
            if run is None:
                break
            if isinstance(run, LostStart):
                try:
                    self.lost_start(run.stop)
                except Exception:
                    log.exception("hxn-ptycho callback: the stop of run %s (start lost) could not be handled",
                                  run.stop.get("run_start"))
                finally:
                    self._pending.task_done()
                continue
            self._busy.set()
            try:
                self.process(run)
            except Exception as exc:
                log.exception("hxn-ptycho callback: run %s could not be processed", run.uid)
                self._fail(run, f"cannot be reconstructed: {type(exc).__name__}: {exc}")
            finally:
                self._note("done", run.uid)
                self._pending.task_done()
                self._busy.clear()

    def job_spec(self, run: CollectedRun, scan_path: Path | None = None) -> JobSpec:
        """The job spec of ``run``: this callback's parameters and execution, the exported geometry."""
        geometry = (Geometry.from_scan_file(scan_path)
                    if scan_path is not None and scan_path.exists() else Geometry())
        source = Source(scan_file=str(scan_path or ""),
                        result_file=str(self.work_dir / "results" / f"result_{run_stem(run)}.h5"),
                        raw_uid=run.uid, scan_id=int_scan_id(run.scan_id),
                        catalog=self.config.catalog)
        return JobSpec(params=ReconParams.from_dict(dict(self.config.params)), geometry=geometry,
                       execution=self.config.execution(), source=source)

    def process(self, run: CollectedRun) -> Job | None:
        """Export a finished run and submit its job (or record why it cannot be reconstructed)."""
        if run.stop is not None and "exit_status" not in run.stop:
            self._fail(run, "not reconstructed: its stop document has no exit_status, so how the scan ended "
                            "is unknown")
            return None
        if run.exit_status != "success":
            log.info("run %s (scan %s) ended with exit_status %r: nothing launched",
                     run.uid, run.scan_id, run.exit_status)
            return None
        if any(feed.took_over(run.uid) for feed in self.live):  # reconstructed while it ran
            return None
        scan_path = self.work_dir / "scans" / f"scan_{run_stem(run)}.h5"
        try:
            # a live feed's file of this run records the orientation decided on its first views: taken
            live_files = [f(run.uid) for f in (getattr(feed, "live_file", None) for feed in self.live) if f]
            export_scan(run, self.config.export, scan_path,
                        live_file=next((p for p in live_files if p is not None), None))
        except ExportError as exc:
            self._fail(run, f"cannot build the scan file: {exc}")
            return None
        except Exception as exc:
            log.exception("run %s: unexpected error while building the scan file", run.uid)
            self._fail(run, f"cannot build the scan file: {type(exc).__name__}: {exc}")
            return None
        try:
            spec = self.job_spec(run, scan_path)
            check_ranks(spec)
            if spec.source.catalog:
                from .derived import check_readable
                check_readable(spec)
        except HxnPtychoError as exc:
            self._fail(run, f"not reconstructed: {exc}")
            return None
        job = Job.of(spec)
        if self.jobs is None:
            self.submitted.append(job)
            return job
        try:
            self.jobs.submit(job)
        except QueueFull as exc:
            self._fail(run, f"not reconstructed: {exc}")
            return None
        self.submitted.append(job)
        return job

    def lost_start(self, stop: dict) -> None:
        """A stop whose start never reached us (a lost document, or a listener started mid-run): the
        run is looked up in the catalog by the stop's ``run_start`` and, if it is a ptychography run,
        recorded as ``fail`` under its fixed uid (so a later recovery cannot add a second run)."""
        uid = str(stop.get("run_start"))
        start = self._catalog_start(uid)
        if start is None:
            log.error("run %s: its stop arrived without its start document and the catalog has no such run: "
                      "it cannot be told whether it was a ptychography run, so nothing is recorded", uid)
            return
        if ignore_reason(start, self.config.export.detectors) is not None:
            return
        run = CollectedRun(start=start)
        run.stop = stop
        self._fail(run, "not reconstructed: its start document never reached the callback (lost, or the "
                        "listener started mid-run); reconstruct it from the catalog with "
                        f"'hxn-ptycho reconstruct --uid {uid}'")

    def _catalog_start(self, uid: str, wait_s: float = 10.0) -> dict | None:
        """The start document of raw run ``uid`` from the configured catalog (waited for briefly: the
        run may still be being written), or None."""
        import time
        if not self.config.catalog:
            return None
        from .catalog import resolve_catalog, runs
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return dict(runs(resolve_catalog(self.config.catalog), "raw")[uid].metadata["start"])
            except KeyError:
                pass
            except Exception as exc:  # noqa: BLE001 - a catalog error: said, not raised
                log.error("run %s: cannot look it up in the catalog: %s", uid, exc)
                return None
            if time.monotonic() > deadline:
                return None
            time.sleep(0.5)

    def _fail(self, run: CollectedRun, reason: str) -> None:
        log.error("run %s (scan %s): %s", run.uid, run.scan_id, reason)
        self.failed.append((run.uid, reason))
        try:
            self.on_failure(run, reason)
        except Exception as exc:  # noqa: BLE001 - the worker thread must survive any run
            log.error("run %s: could not record the failure in the catalog: %s", run.uid, exc)

    def _publish_failure(self, run: CollectedRun, reason: str) -> None:
        if not self.config.catalog:
            return
        from .derived import publish_outcome, run_uid
        spec = self.job_spec(run)
        publish_outcome(spec, None, reason=reason, uid=run_uid(spec))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every finished run has been exported and submitted (not until jobs end)."""
        import time
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending.unfinished_tasks or self._recovery.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self) -> None:
        self._pending.put(None)
        self._worker.join(timeout=30)
        self._recovery.join(timeout=30)
        if self._journal is not None:
            with self._journal_lock:
                self._journal.close()
                self._journal = None          # left for the next start: it recovers any run not processed
