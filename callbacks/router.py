"""The ptychography callback: a ``RunRouter`` that collects ptychography runs and queues their jobs.

The same :class:`PtychoCallback` works subscribed in-process (``RE.subscribe(cb)``) and inside
``hxn-ptycho listen`` fed by a 0MQ (or Kafka) ``RemoteDispatcher``. On the RunEngine's thread it
only routes documents into per-run :class:`~.collector.RunCollector` objects (appends) and, at a
stop document, puts the collected run on a queue; it catches and logs every exception. A worker
thread does the heavy part: read the frames, write the scan file, submit the job; a broken run
(missing frames or positions) is recorded in the catalog as a ``fail`` derived run instead.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from event_model import RunRouter

from .collector import CollectedRun, RunCollector
from .derived import PLAN_NAME, PLAN_TYPE
from .export import ExportConfig, ExportError, export_scan, why_not_ptycho
from .launcher import Job, JobQueue, QueueFull

log = logging.getLogger(__name__)
# scan-file attributes the derived run publishes in its recon record (values and their sources)
EXPORT_RECORD = ("geometry_source", "orientation", "orientation_report", "dropped_frames", "scan_kind", "detector")


@dataclass
class CallbackConfig:
    """What the callback does with a finished ptychography run."""

    work_dir: str = "hxn_ptycho_work"
    catalog: str | None = None                 # URL or config file; None = no catalog (files only)
    params: dict = field(default_factory=dict)  # ReconParams fields for the job
    nprocs: int = 1
    gpus: int = 0
    export: ExportConfig = field(default_factory=ExportConfig)


def ignore_reason(start: dict, detectors: tuple[str, ...]) -> str | None:
    """Why a run is not ours (None: it is a ptychography run we reconstruct). Detectors are
    looked for at the top level and in ``start['scan']['detectors']`` (fly2dpd)."""
    if start.get("plan_type") == PLAN_TYPE or start.get("plan_name") == PLAN_NAME or start.get("raw_uid"):
        return "it is an analysis (derived) run"
    return why_not_ptycho(start, detectors)


def is_ptycho_run(start: dict, detectors: tuple[str, ...]) -> bool:
    """A run is ours if it names a configured detector, is 2-D and is not an analysis run."""
    return ignore_reason(start, detectors) is None


def run_stem(run: CollectedRun) -> str:
    sid = run.scan_id if isinstance(run.scan_id, int) else "x"
    return f"{sid}_{run.uid[:8]}"


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
        self.work_dir = Path(config.work_dir).resolve()
        (self.work_dir / "scans").mkdir(parents=True, exist_ok=True)
        (self.work_dir / "results").mkdir(parents=True, exist_ok=True)
        self._router = RunRouter([self._factory])
        self._pending: queue.Queue[CollectedRun | None] = queue.Queue()
        self._busy = threading.Event()
        self.submitted: list[Job] = []
        self.failed: list[tuple[str, str]] = []          # (raw uid, reason)
        self._worker = threading.Thread(target=self._work, name="hxn-ptycho-export", daemon=True)
        self._worker.start()

    # -- on the RunEngine's thread: cheap, never raises -------------------------------------
    def __call__(self, name: str, doc: dict) -> None:
        try:
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
        return [RunCollector(start, self._pending.put_nowait)], []

    # -- on the worker thread ---------------------------------------------------------------
    def _work(self) -> None:
        while True:
            run = self._pending.get()
            if run is None:
                break
            self._busy.set()
            try:
                self.process(run)
            except Exception as exc:
                log.exception("hxn-ptycho callback: run %s could not be processed", run.uid)
                self._fail(run, f"cannot be reconstructed: {type(exc).__name__}: {exc}")
            finally:
                self._pending.task_done()
                self._busy.clear()

    def process(self, run: CollectedRun) -> Job | None:
        """Export a finished run and submit its job (or record why it cannot be reconstructed)."""
        if run.exit_status != "success":
            log.info("run %s (scan %s) ended with exit_status %r: nothing launched",
                     run.uid, run.scan_id, run.exit_status)
            return None
        scan_path = self.work_dir / "scans" / f"scan_{run_stem(run)}.h5"
        try:
            scan = export_scan(run, self.config.export, scan_path)
        except ExportError as exc:
            self._fail(run, f"cannot build the scan file: {exc}")
            return None
        except Exception as exc:
            log.exception("run %s: unexpected error while building the scan file", run.uid)
            self._fail(run, f"cannot build the scan file: {type(exc).__name__}: {exc}")
            return None
        job = Job(scan_file=str(scan_path),
                  result_file=str(self.work_dir / "results" / f"result_{run_stem(run)}.h5"),
                  params=dict(self.config.params), raw_uid=run.uid, scan_id=run.scan_id,
                  nprocs=self.config.nprocs, catalog=self.config.catalog,
                  recon={"crop": scan.n, "energy_kev": scan.attrs.get("energy_kev"), "distance_m": scan.z_m,
                         "pixel_um": scan.ccd_pixel_um, "ranks": self.config.nprocs, "gpus": self.config.gpus,
                         **{k: scan.attrs[k] for k in EXPORT_RECORD if k in scan.attrs}})
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
        from .derived import publish_failure
        recon = {"params": dict(self.config.params), "ranks": self.config.nprocs, "gpus": self.config.gpus,
                 "scan_id": run.scan_id,
                 "failure_backup": str(self.work_dir / "results" / f"failed_{run_stem(run)}.docs.jsonl")}
        publish_failure(self.config.catalog, run.uid, recon, reason)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every finished run has been exported and submitted (not until jobs end)."""
        import time
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self) -> None:
        self._pending.put(None)
        self._worker.join(timeout=30)


def job_failure_recorder(catalog: str | None) -> Callable[[Job, str], None]:
    """For :class:`JobQueue`: publish a ``fail`` derived run unless the job recorded one itself."""
    def record(job: Job, reason: str) -> None:
        if not catalog:
            return
        from tiled.queries import Comparison, Eq

        from .catalog import runs
        from .derived import publish_failure
        try:
            found = runs(catalog, "processed").search(Eq("raw_uid", job.raw_uid)).search(
                Comparison("ge", "time", float(job.started or job.created)))
            if len(found):
                return                        # the job recorded its own failure
        except Exception as exc:  # noqa: BLE001 - recording a failure must not stop the queue
            log.warning("job %s: could not check the catalog for its failure record (%s)", job.id, exc)
        recon = {**job.recon, "params": job.params, "scan_id": job.scan_id, "job_id": job.id,
                 "failure_backup": str(job.result_file) + ".fail.docs.jsonl"}
        publish_failure(catalog, job.raw_uid, recon, reason)
    return record
