"""The on-disk job queue and the non-blocking ``mpiexec`` launch (argument lists only).

Jobs are JSON files under ``DIR/pending``, ``DIR/running``, ``DIR/done`` and ``DIR/failed``;
a job moves between them by atomic rename, so a listener that restarts finds what was pending
(and re-runs what was running when it died). ``slots`` runner threads (1 by default; with
``gpu_pools`` such as ``["0,1", "2,3"]`` one per pool, each job seeing only its pool's GPUs) take
the oldest pending job, run it with ``subprocess.Popen`` (never a shell) and wait
for it — on their own threads, never on the RunEngine's. ``max_pending`` bounds the queue.

A job is a :class:`~hxn_ptycho.spec.JobSpec`; the runner writes it as ``DIR/specs/<job>.spec.json``
and starts ``[mpiexec -n K] python -m hxn_ptycho.job SPEC.json`` (ranks checked first). The job only
computes; when it ends the runner reads its outcome record and publishes it — success or failure —
through :func:`~.derived.publish_outcome`, the one publisher. A job that died without an outcome
is recorded as failed with the end of its log as the reason, so no failure is silently lost.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hxn_ptycho.errors import HxnPtychoError
from hxn_ptycho.job import find_mpiexec, launch_argv, outcome_path, read_outcome
from hxn_ptycho.spec import JobSpec

from .catalog import atomic_write_text

log = logging.getLogger(__name__)

STATES = ("pending", "running", "done", "failed")


class QueueFull(RuntimeError):
    """The job queue holds ``max_pending`` jobs already."""


@dataclass
class Job:
    """One reconstruction job: its spec (a :class:`~hxn_ptycho.spec.JobSpec` as a dict) and its life."""

    spec: dict = field(default_factory=lambda: JobSpec().to_dict())
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created: float = field(default_factory=time.time)
    spec_file: str | None = None        # written by JobQueue.submit
    started: float | None = None
    returncode: int | None = None
    reason: str | None = None

    @classmethod
    def of(cls, spec: JobSpec) -> Job:
        return cls(spec=spec.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def job_spec(self) -> JobSpec:
        return JobSpec.from_dict(self.spec)

    @property
    def scan_file(self) -> str:
        return str(self.spec["source"]["scan_file"])

    @property
    def result_file(self) -> str:
        return str(self.spec["source"]["result_file"])

    @property
    def raw_uid(self) -> str | None:
        return self.spec["source"].get("raw_uid")

    @property
    def scan_id(self) -> Any:
        return self.spec["source"].get("scan_id")

    @property
    def nprocs(self) -> int:
        return int(self.spec["execution"]["ranks"])

    @property
    def catalog(self) -> str | None:
        return self.spec["source"].get("catalog")


def mpiexec_path() -> str:
    """``mpiexec`` beside the Python interpreter (the mpich wheel), else on PATH."""
    return find_mpiexec()


def job_command(job: Job, *, mpiexec: str | None = None) -> list[str]:
    """The job's argument list: ``[mpiexec, -n, K,] python -m hxn_ptycho.job SPEC.json`` (ranks checked)."""
    if not job.spec_file:
        raise ValueError(f"job {job.id} has no spec file (submit it to a JobQueue first)")
    return launch_argv(job.job_spec, job.spec_file, quiet=True, mpiexec=mpiexec)


def _publish(spec: JobSpec, outcome: dict | None, reason: str | None) -> Any:
    from .derived import publish_outcome
    return publish_outcome(spec, outcome, reason=reason)


class JobQueue:
    """A bounded, on-disk queue of :class:`Job` run ``slots`` at a time by runner threads."""

    def __init__(self, directory: str | os.PathLike, *, slots: int = 1, max_pending: int = 1000,
                 command: Callable[[Job], list[str]] = job_command, env: dict[str, str] | None = None,
                 on_failure: Callable[[Job, str], None] | None = None, timeout_s: float | None = None,
                 gpu_pools: list[str] | None = None,
                 publish: Callable[[JobSpec, dict | None, str | None], Any] | None = _publish) -> None:
        self.directory = Path(directory)
        self.gpu_pools = list(gpu_pools or [])
        self.slots = len(self.gpu_pools) if self.gpu_pools else max(1, int(slots))
        self.max_pending = int(max_pending)
        self.command = command
        self.env = dict(env or {})
        self.on_failure = on_failure
        self.publish = publish
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._procs: dict[str, subprocess.Popen] = {}
        self._killed: set[str] = set()          # jobs ended by stop(kill=True), to be requeued
        for state in STATES:
            (self.directory / state).mkdir(parents=True, exist_ok=True)
        (self.directory / "logs").mkdir(exist_ok=True)
        (self.directory / "specs").mkdir(exist_ok=True)

    # -- the queue on disk ----------------------------------------------------------------
    def _path(self, state: str, job: Job) -> Path:
        return self.directory / state / f"{job.created:017.6f}-{job.id}.json"

    def jobs(self, state: str) -> list[Job]:
        out = []
        for p in sorted((self.directory / state).glob("*.json")):
            try:
                out.append(Job.from_dict(json.loads(p.read_text())))
            except (OSError, ValueError) as exc:
                log.error("job queue: cannot read %s (%s); it is left where it is", p, exc)
        return out

    def submit(self, job: Job) -> Job:
        """Put ``job`` in ``pending`` (atomic write); raise :class:`QueueFull` if the queue is full."""
        if len(list((self.directory / "pending").glob("*.json"))) >= self.max_pending:
            raise QueueFull(f"job queue {self.directory} already holds {self.max_pending} pending jobs")
        spec_file = self.directory / "specs" / f"{job.created:017.6f}-{job.id}.spec.json"
        JobSpec.from_dict(job.spec).write(spec_file)
        job.spec_file = str(spec_file)
        atomic_write_text(self._path("pending", job), json.dumps(asdict(job), indent=1))
        with self._wake:
            self._wake.notify_all()
        log.info("queued job %s for scan %s (%s)", job.id, job.scan_id, job.scan_file)
        return job

    def _claim(self) -> tuple[Job, Path] | None:
        for p in sorted((self.directory / "pending").glob("*.json")):
            target = self.directory / "running" / p.name
            try:
                os.rename(p, target)              # atomic: only one runner wins
            except FileNotFoundError:
                continue
            try:
                return Job.from_dict(json.loads(target.read_text())), target
            except (OSError, ValueError) as exc:
                log.error("job queue: %s is not a valid job (%s); moved to failed", p.name, exc)
                os.replace(target, self.directory / "failed" / p.name)
        return None

    def _finish(self, job: Job, running: Path, ok: bool) -> None:
        state = "done" if ok else "failed"
        atomic_write_text(self.directory / state / running.name, json.dumps(asdict(job), indent=1))
        running.unlink(missing_ok=True)

    # -- runners --------------------------------------------------------------------------
    def start(self) -> JobQueue:
        """Requeue what a previous process left running, then start the runner threads."""
        for p in sorted((self.directory / "running").glob("*.json")):
            log.warning("job queue: requeueing %s, left running by a previous process", p.name)
            os.replace(p, self.directory / "pending" / p.name)
        self._stop.clear()
        for i in range(self.slots):
            t = threading.Thread(target=self._runner, args=(i,), name=f"hxn-ptycho-job-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _runner(self, slot: int = 0) -> None:
        while not self._stop.is_set():
            claimed = self._claim()
            if claimed is None:
                with self._wake:
                    self._wake.wait(0.5)
                continue
            job, running = claimed
            try:
                ok = self._run(job, slot)
            except Exception as exc:              # never let a runner die
                log.exception("job %s could not be run", job.id)
                job.reason, ok = f"the job could not be started: {type(exc).__name__}: {exc}", False
            if job.id in self._killed:            # stopped by stop(kill=True): run again at next start
                os.replace(running, self.directory / "pending" / running.name)
                continue
            self._publish_outcome(job, ok)
            if not ok and self.on_failure is not None:
                try:
                    self.on_failure(job, job.reason or "unknown failure")
                except Exception:
                    log.exception("job %s: recording its failure failed", job.id)
            self._finish(job, running, ok)

    def _publish_outcome(self, job: Job, ok: bool) -> None:
        """The job's outcome (or its failure) → the derived run, through the one publisher."""
        if self.publish is None or not job.catalog:
            return
        outcome = read_outcome(outcome_path(job.spec_file)) if job.spec_file else None
        if outcome is not None and not ok and outcome.get("status") == "success":
            outcome = None                        # it said success, then died: record the failure
        try:
            self.publish(job.job_spec, outcome, job.reason)
        except Exception as exc:  # noqa: BLE001 - a catalog error must not stop the queue
            log.error("job %s: could not publish its outcome: %s", job.id, exc)

    def _run(self, job: Job, slot: int = 0) -> bool:
        if self.gpu_pools and job.spec_file:      # the spec records the pool this job really runs on
            job.spec["execution"]["gpus"] = self.gpu_pools[slot].split(",")
            JobSpec.from_dict(job.spec).write(job.spec_file)
        try:
            argv = self.command(job)
        except HxnPtychoError as exc:             # refused before anything starts (e.g. too many ranks)
            job.reason = f"not started: {exc}"
            log.error("job %s %s", job.id, job.reason)
            return False
        logfile = self.directory / "logs" / f"{job.id}.log"
        env = dict(os.environ, **self.env)
        if self.gpu_pools:                        # one job at a time on each pool of GPUs
            env["CUDA_VISIBLE_DEVICES"] = self.gpu_pools[slot]
        env.setdefault("OMP_NUM_THREADS", "1")
        log.info("job %s: %s", job.id, " ".join(argv))
        job.started = time.time()
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            self._procs[job.id] = proc
            try:
                job.returncode = proc.wait(self.timeout_s)
            except subprocess.TimeoutExpired:
                kill_job(proc)
                job.returncode = proc.wait()
                job.reason = f"the job ran past its {self.timeout_s:.0f} s limit and was killed"
            finally:
                self._procs.pop(job.id, None)
        outcome = read_outcome(outcome_path(job.spec_file)) if job.spec_file else None
        if job.returncode == 0 and (outcome is None or outcome.get("status") == "success"):
            log.info("job %s finished (scan %s)", job.id, job.scan_id)
            return True
        if job.reason is None:
            said = f" ({outcome['reason']})" if outcome and outcome.get("reason") else ""
            job.reason = f"the job exited with status {job.returncode}{said}: {log_tail(logfile)}"
        log.error("job %s failed: %s", job.id, job.reason)
        return False

    def idle(self) -> bool:
        return not any(any((self.directory / s).glob("*.json")) for s in ("pending", "running"))

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.idle():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def stop(self, kill: bool = False) -> None:
        """Stop taking jobs; with ``kill``, terminate running ones (they are requeued at next start)."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if kill:
            for job_id, proc in list(self._procs.items()):
                self._killed.add(job_id)
                kill_job(proc)
        for t in self._threads:
            t.join(timeout=None if not kill else 10)
        self._threads.clear()


def kill_job(proc: subprocess.Popen) -> None:
    """Kill a job with all its processes (mpiexec and its ranks share the session it leads)."""
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def log_tail(path: str | os.PathLike, chars: int = 600) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    tail = " | ".join(lines[-4:])
    return tail[-chars:] if tail else "(empty log)"
