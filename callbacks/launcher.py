"""The on-disk job queue and the non-blocking ``mpiexec`` launch (argument lists only).

Jobs are JSON files under ``DIR/pending``, ``DIR/running``, ``DIR/done`` and ``DIR/failed``;
a job moves between them by atomic rename, so a listener that restarts finds what was pending.
A running entry records the job's pid (with the process's start time, so a reused pid is not
taken for it) and its phase (``started`` → ``ended`` → ``published``). A restarted queue
(:meth:`JobQueue.start`) *adopts* a job still alive and ours (it waits for it, then publishes its
outcome); for a dead one it publishes the outcome record the job left, or finds its derived run
already complete in the catalog, and re-runs it only when there is neither. Every publish uses the
job's fixed uid (:func:`~.derived.run_uid`), so there is at most one derived run per (raw uid, job).
Publishes that failed (catalog down) leave their saved documents (``<result>.docs.jsonl``); the
queue retries them every ``retry_s`` seconds from the ``outbox`` folders, and once at start. ``slots`` runner threads (1 by default; with
``gpu_pools`` such as ``["0,1", "2,3"]`` one per pool, each job seeing only its pool's GPUs) take
the oldest pending job, run it with ``subprocess.Popen`` (never a shell) and wait
for it — on their own threads, never on the RunEngine's. ``max_pending`` bounds the queue.

A *live* job (``Job.follow``: ``python -m hxn_ptycho.job SPEC --follow``, the long-lived job of a scan
being measured, :mod:`hxn_ptycho.live`) goes through the same queue, spec, argument list and runner
(:meth:`JobQueue._run`), but is started at once by :meth:`JobQueue.start_now` on a thread of its own
— at the start document, never behind pending post-stop jobs, and holding no slot for the whole
scan. Its outcome is not published by the queue: the callback publishes it at the stop if it
succeeded (:meth:`~.livefeed.LiveFeed.took_over`), else its post-stop path runs, so a run still has
exactly one derived run. A restarted queue does not run a live job again (its feed is gone).
A job's ``Job.nice`` (the detector-stream receiver's live job, which shares the receiver's cores:
:mod:`.stream`) is added to its process's niceness by the runner before the program runs
(:func:`lower_priority`, ``preexec_fn``), so ``mpiexec`` and its ranks inherit it; a launcher that
does not start the process here (Slurm) refuses such a job by name (:func:`nice_refused`).

A job is a :class:`~hxn_ptycho.spec.JobSpec`; the runner writes it as ``DIR/specs/<job>.spec.json``
and starts ``[mpiexec -n K] python -m hxn_ptycho.job SPEC.json`` (ranks checked first). The job only
computes; when it ends the runner reads its outcome record and publishes it — success or failure —
through :func:`~.derived.publish_outcome`, the one publisher. A job that died without an outcome
is recorded as failed with the end of its log as the reason, so no failure is silently lost.
"""
from __future__ import annotations

import contextlib
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
    pid: int | None = None              # the launched process (mpiexec, or the single rank)
    pid_start: int | None = None        # its start time (/proc/PID/stat, clock ticks): a reused pid is not ours
    host: str | None = None
    phase: str | None = None            # started → ended → published
    published_uid: str | None = None
    slurm_job: str | None = None        # the Slurm job id (execution.launcher "slurm": callbacks/slurm.py)
    follow: bool = False                # a live job (--follow): started at once, published by the callback
    nice: int = 0                       # added to the listener's niceness in the job's process before it
                                        # runs (mpiexec and its ranks inherit it); local launcher only

    @classmethod
    def of(cls, spec: JobSpec) -> Job:
        return cls(spec=spec.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def job_spec(self) -> JobSpec:
        """The spec, read (and checked) through :class:`~hxn_ptycho.spec.JobSpec`: the one schema."""
        return JobSpec.from_dict(self.spec)

    @property
    def scan_file(self) -> str:
        return str(self.job_spec.source.scan_file)

    @property
    def result_file(self) -> str:
        return str(self.job_spec.source.result_file)

    @property
    def raw_uid(self) -> str | None:
        return self.job_spec.source.raw_uid

    @property
    def scan_id(self) -> Any:
        return self.job_spec.source.scan_id

    @property
    def nprocs(self) -> int:
        return int(self.job_spec.execution.ranks)

    @property
    def catalog(self) -> str | None:
        return self.job_spec.source.catalog


def mpiexec_path() -> str:
    """``mpiexec`` beside the Python interpreter (the mpich wheel), else on PATH."""
    return find_mpiexec()


def job_command(job: Job, *, mpiexec: str | None = None) -> list[str]:
    """The job's argument list: ``[mpiexec, -n, K,] python -m hxn_ptycho.job SPEC.json`` (ranks checked)."""
    if not job.spec_file:
        raise ValueError(f"job {job.id} has no spec file (submit it to a JobQueue first)")
    return launch_argv(job.job_spec, job.spec_file, quiet=True, mpiexec=mpiexec, follow=job.follow)


def nice_refused(job: Job) -> str | None:
    """Why the launcher cannot give ``job`` its niceness (None: it can). The niceness is applied to the
    process this machine starts, so only by the local launcher; a negative one would need privileges."""
    if not job.nice:
        return None
    if isinstance(job.nice, bool) or not isinstance(job.nice, int) or job.nice < 0:
        return (f"niceness {job.nice!r} is not a whole number >= 0 (the launcher only lowers a job's CPU "
                "priority)")
    if job.job_spec.execution.launcher != "local":
        return (f"niceness {job.nice} is applied only by the local launcher (a process on this machine's "
                f"cores); the {job.job_spec.execution.launcher} launcher does not apply it: give niceness 0 "
                "or launcher 'local'")
    return None


def lower_priority(nice: int) -> Callable[[], None]:
    """The ``preexec_fn`` that adds ``nice`` to the niceness of the job's process before it runs its
    program: ``mpiexec`` and every rank it starts inherit it (never a shell, never ``nice`` by name)."""
    def apply() -> None:
        os.nice(nice)
    return apply


def _publish(spec: JobSpec, outcome: dict | None, reason: str | None) -> Any:
    from .derived import publish_outcome, run_uid
    return publish_outcome(spec, outcome, reason=reason, uid=run_uid(spec))


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, /proc/PID/stat), None if unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def job_alive(job: Job) -> bool:
    """Whether the job's recorded process is still running and is that job (same start time, not a zombie)."""
    import socket
    if not job.pid or (job.host and job.host != socket.gethostname()):
        return False
    try:
        os.kill(job.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False                          # not ours
    try:
        state = Path(f"/proc/{job.pid}/stat").read_text()
        if state[state.rindex(")") + 2] == "Z":
            return False
    except (OSError, ValueError, IndexError):
        pass
    started = process_start(job.pid)
    return job.pid_start is None or started is None or started == job.pid_start


class JobQueue:
    """A bounded, on-disk queue of :class:`Job` run ``slots`` at a time by runner threads."""

    def __init__(self, directory: str | os.PathLike, *, slots: int = 1, max_pending: int = 1000,
                 command: Callable[[Job], list[str]] = job_command, env: dict[str, str] | None = None,
                 on_failure: Callable[[Job, str], None] | None = None, timeout_s: float | None = None,
                 gpu_pools: list[str] | None = None,
                 publish: Callable[[JobSpec, dict | None, str | None], Any] | None = _publish,
                 outbox: list[str | os.PathLike] | None = None, retry_s: float = 10.0,
                 catalog: Any = None) -> None:
        from .trust import private_dir
        self.directory = private_dir(directory)
        self.catalog = catalog                  # saved documents are sent only to this catalog (if given)
        self.gpu_pools = list(gpu_pools or [])
        self.slots = len(self.gpu_pools) if self.gpu_pools else max(1, int(slots))
        self.max_pending = int(max_pending)
        self.command = command
        self.env = dict(env or {})
        self.on_failure = on_failure
        self.publish = publish
        self.timeout_s = timeout_s
        self.outbox = [Path(p) for p in (outbox or [])]
        self.retry_s = float(retry_s)
        self.republished: list[str] = []        # uids of saved runs this queue sent later
        self._republishing = False
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._procs: dict[str, subprocess.Popen] = {}
        self._killed: set[str] = set()          # jobs ended by stop(kill=True), to be requeued
        self._killing = False                   # stop(kill=True) called: a job being started is not started
        self._cancelled: dict[str, int] = {}    # live jobs to end (signal), asked before or after their start
        self._slurm: dict[str, str] = {}        # job id → Slurm job id, while followed (callbacks/slurm.py)
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

    def start_now(self, job: Job, spec_file: str | os.PathLike | None = None) -> LiveJob:
        """Start the live job ``job`` (``job.follow``) at once on a thread of its own, through the same
        runner as a queued job (:meth:`_run`: argument list, environment, log, pid record, time limit,
        outcome); it takes no slot and waits behind no pending job. ``spec_file``: where its spec is
        written (default ``DIR/specs/``); its outcome record lies beside it. Not published here (see
        the module's docstring). Returns a handle that polls, ends and waits for it."""
        if not job.follow:
            raise ValueError(f"job {job.id}: start_now is for a live job (follow); queue the others with submit")
        path = Path(spec_file) if spec_file is not None else \
            self.directory / "specs" / f"{job.created:017.6f}-{job.id}.spec.json"
        JobSpec.from_dict(job.spec).write(path)
        job.spec_file = str(path)
        running = self._path("running", job)
        atomic_write_text(running, json.dumps(asdict(job), indent=1))
        handle = LiveJob(self, job)
        handle._thread = threading.Thread(target=self._run_live, args=(job, running), daemon=True,
                                          name=f"hxn-ptycho-live-job-{job.id}")
        handle._thread.start()
        log.info("started live job %s for scan %s (%s)", job.id, job.scan_id, job.scan_file)
        return handle

    def _run_live(self, job: Job, running: Path) -> None:
        try:
            ok = self._run(job, None, running)
        except Exception as exc:              # never let a runner die
            log.exception("live job %s could not be run", job.id)
            job.reason, ok = f"the job could not be started: {type(exc).__name__}: {exc}", False
        self._end(job, running, bool(ok))

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
        try:
            atomic_write_text(self.directory / state / running.name, json.dumps(asdict(job), indent=1))
        except OSError as exc:                    # a full disk: move the entry as it is
            log.error("job %s: cannot write its final queue entry (%s); moved as it was", job.id, exc)
            os.replace(running, self.directory / state / running.name)
            return
        running.unlink(missing_ok=True)

    # -- runners --------------------------------------------------------------------------
    def start(self) -> JobQueue:
        """Recover what a previous process left running (see :meth:`recover`), then start the runners
        and the republisher of saved documents."""
        self._stop.clear()
        self._killing = False                    # a queue started again runs its jobs
        for p in sorted((self.directory / "running").glob("*.json")):
            try:
                self.recover(p)
            except Exception:                 # one bad entry must not stop the queue
                log.exception("job queue: could not recover %s; it is requeued", p.name)
                if p.exists():
                    os.replace(p, self.directory / "pending" / p.name)
        for i in range(self.slots):
            t = threading.Thread(target=self._runner, args=(i,), name=f"hxn-ptycho-job-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.outbox:
            self._start_republisher()
        return self

    def _start_republisher(self) -> None:
        if self.publish is None or self._republishing or self._stop.is_set():
            return
        self._republishing = True
        t = threading.Thread(target=self._republisher, name="hxn-ptycho-republish", daemon=True)
        t.start()
        self._threads.append(t)

    def recover(self, running: Path) -> str:
        """One job left in ``running/`` by a dead queue: ``"adopted"`` (alive and ours: a thread waits
        for it and publishes its outcome), ``"published"`` (its outcome, or a derived run already
        complete in the catalog, closes it) or ``"requeued"`` (neither: it runs again)."""
        job = Job.from_dict(json.loads(running.read_text()))
        if job.follow:                        # its feed (and the scan) are gone: never run again
            if job_alive(job) and job.pid:
                import signal
                log.warning("job queue: ending live job %s (pid %s): its feed is gone", job.id, job.pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(job.pid, signal.SIGKILL)
            job.reason = job.reason or "a live job left running by a previous process (its feed is gone)"
            self._finish(job, running, False)
            return "ended"
        if job.job_spec.execution.launcher == "slurm":       # adopted by its Slurm job id: callbacks/slurm.py
            from .slurm import recover_slurm_job
            return recover_slurm_job(self, job, running)
        if job_alive(job):
            log.warning("job queue: adopting job %s (pid %s), still running from a previous process", job.id, job.pid)
            t = threading.Thread(target=self._adopt, args=(job, running), name=f"hxn-ptycho-adopt-{job.id}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
            return "adopted"
        outcome = read_outcome(outcome_path(job.spec_file)) if job.spec_file else None
        if job.phase == "published" or outcome is not None:
            ok = outcome is not None and outcome.get("status") == "success"
            if job.phase != "published":
                log.warning("job queue: job %s ended while no queue watched it; publishing its outcome", job.id)
                if not ok and job.reason is None:
                    job.reason = f"the job ended while its listener was down: {outcome and outcome.get('reason')}"
                self._publish_outcome(job, ok)
            self._finish(job, running, ok)
            return "published"
        if job.phase is not None and self._catalog_has_run(job):
            log.warning("job queue: job %s died but its derived run is complete in the catalog", job.id)
            self._finish(job, running, True)
            return "published"
        log.warning("job queue: requeueing %s, left running by a previous process (no outcome, no derived run)",
                    running.name)
        job.pid = job.pid_start = job.phase = None
        atomic_write_text(self.directory / "pending" / running.name, json.dumps(asdict(job), indent=1))
        running.unlink(missing_ok=True)
        return "requeued"

    def _catalog_has_run(self, job: Job) -> bool:
        if not job.catalog or self.publish is not _publish:
            return False
        try:
            from .catalog import resolve_catalog, runs
            from .derived import run_state, run_uid
            return run_state(runs(resolve_catalog(job.catalog), "processed"), run_uid(job.job_spec)) == "complete"
        except Exception as exc:  # noqa: BLE001 - catalog down: the job is run again (its publish is idempotent)
            log.warning("job queue: cannot ask the catalog about job %s (%s)", job.id, exc)
            return False

    def _adopt(self, job: Job, running: Path) -> None:
        from .trust import job_time_limit
        limit = job_time_limit(job.job_spec, self.timeout_s)
        while job_alive(job):
            if job.started is not None and time.time() - job.started > limit and job.pid:
                import signal
                log.error("job %s (pid %s, adopted) ran past its time limit of %.0f s: ending it", job.id, job.pid, limit)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(job.pid, signal.SIGKILL)
                job.reason = f"the job ran past its time limit of {limit:.0f} s and was ended"
            time.sleep(0.5)
        outcome = self._outcome(job)
        ok = outcome is not None and outcome.get("status") == "success"
        if not ok and job.reason is None:
            said = f" ({outcome['reason']})" if outcome and outcome.get("reason") else " without an outcome record"
            job.reason = f"the job (pid {job.pid}, adopted after a restart) ended{said}: " \
                         f"{log_tail(self.directory / 'logs' / f'{job.id}.log')}"
        self._end(job, running, ok)

    def _republisher(self) -> None:
        from .derived import republish_all
        while True:
            try:
                sent, errors = republish_all(list(self.outbox), accept=self._ours)
                self.republished += sent
                for err in errors:
                    log.warning("job queue: saved documents not sent yet (retry in %.0f s): %s", self.retry_s, err)
            except Exception:                 # the retry loop must survive anything
                log.exception("job queue: republishing saved documents failed")
            if self._stop.wait(self.retry_s):
                self._republishing = False
                return

    def _ours(self, header: dict) -> bool:
        from .trust import same_catalog
        if self.catalog is None or same_catalog(header.get("catalog"), self.catalog):
            return True
        log.error("job queue: saved documents for the catalog %r are not sent (this queue publishes to %r)",
                  header.get("catalog"), self.catalog)
        return False

    def _runner(self, slot: int = 0) -> None:
        while not self._stop.is_set():
            claimed = self._claim()
            if claimed is None:
                with self._wake:
                    self._wake.wait(0.5)
                continue
            job, running = claimed
            try:
                ok = self._run(job, slot, running)
            except Exception as exc:              # never let a runner die
                log.exception("job %s could not be run", job.id)
                job.reason, ok = f"the job could not be started: {type(exc).__name__}: {exc}", False
            if ok is None:                        # a Slurm job no longer followed: it goes on, the next start adopts it
                continue
            if job.id in self._killed:            # stopped by stop(kill=True): run again at next start
                self._killed.discard(job.id)      # (once: a queue started again runs it to its end)
                job.pid = job.pid_start = job.phase = None
                self._record(running, job)
                os.replace(running, self.directory / "pending" / running.name)
                continue
            self._end(job, running, ok)

    def _end(self, job: Job, running: Path, ok: bool) -> None:
        job.phase = "ended"
        self._record(running, job)
        if job.follow:                            # the callback publishes it, or its post-stop path runs
            from hxn_ptycho.h5util import remove_parts
            for part in remove_parts(job.result_file):
                log.warning("live job %s: removed %s, left by a process that was killed", job.id, part)
            self._finish(job, running, ok)
            return
        self._publish_outcome(job, ok)
        if not ok and self.on_failure is not None:
            try:
                self.on_failure(job, job.reason or "unknown failure")
            except Exception:
                log.exception("job %s: recording its failure failed", job.id)
        self._finish(job, running, ok)

    def _record(self, running: Path, job: Job) -> None:
        """Rewrite the running entry (pid, phase); a full disk only costs the record, not the job."""
        try:
            atomic_write_text(running, json.dumps(asdict(job), indent=1))
        except OSError as exc:
            log.error("job %s: cannot update its queue entry (%s)", job.id, exc)

    def _publish_outcome(self, job: Job, ok: bool) -> None:
        """The job's outcome (or its failure) → the derived run, through the one publisher."""
        from hxn_ptycho.h5util import remove_parts
        if job.spec_file:                         # what a killed rank 0 left half-written
            for part in remove_parts(job.result_file):
                log.warning("job %s: removed %s, left by a process that was killed", job.id, part)
        if self.publish is None or not job.catalog:
            return
        outcome = read_outcome(outcome_path(job.spec_file)) if job.spec_file else None
        if outcome is not None and not ok and outcome.get("status") == "success":
            outcome = None                        # it said success, then died: record the failure
        try:
            job.published_uid = self.publish(job.job_spec, outcome, job.reason)
        except Exception as exc:  # noqa: BLE001 - a catalog error must not stop the queue
            log.error("job %s: could not publish its outcome (its saved documents are retried): %s", job.id, exc)
            folder = Path(job.result_file).parent
            if job.result_file and folder not in self.outbox:
                self.outbox.append(folder)         # retried by the republisher from now on
                self._start_republisher()
        job.phase = "published"                   # published, or saved for the republisher
    def _run(self, job: Job, slot: int | None = 0, running: Path | None = None) -> bool | None:
        refused = nice_refused(job)
        if refused:
            job.reason = f"not started: {refused}"
            log.error("job %s %s", job.id, job.reason)
            return False
        if job.job_spec.execution.launcher == "slurm" and running is not None:   # sbatch/srun: callbacks/slurm.py
            from .slurm import run_slurm_job
            return run_slurm_job(self, job, running)
        if self.gpu_pools and job.spec_file and slot is not None:   # the spec records the pool it really runs on
            spec = job.job_spec
            spec.execution.gpus = self.gpu_pools[slot].split(",")
            job.spec = spec.to_dict()
            spec.write(job.spec_file)
        try:
            argv = self.command(job)
        except HxnPtychoError as exc:             # refused before anything starts (e.g. too many ranks)
            job.reason = f"not started: {exc}"
            log.error("job %s %s", job.id, job.reason)
            return False
        logfile = self.directory / "logs" / f"{job.id}.log"
        from .trust import job_env, job_time_limit
        env = job_env(self.env)                   # no catalog key: the job only computes
        if self.gpu_pools and slot is not None:   # one job at a time on each pool of GPUs
            env["CUDA_VISIBLE_DEVICES"] = self.gpu_pools[slot]
        if job.id in self._cancelled:             # a live job ended before it started
            job.reason = "ended before it started"
            return False
        if self._killing and slot is not None:    # stop(kill=True) came while it was being claimed: requeued
            self._killed.add(job.id)
            return False
        env.setdefault("OMP_NUM_THREADS", "1")
        log.info("job %s: %s", job.id, " ".join(argv))
        job.started = time.time()
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=lower_priority(job.nice) if job.nice else None)
            self._procs[job.id] = proc
            if self._killing and slot is not None and job.id not in self._killed:
                # stop(kill=True) came between the check above and this registration: it ends here
                self._killed.add(job.id)
                kill_job(proc)
            if job.id in self._cancelled:         # asked to end while it was being started
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, self._cancelled[job.id])
            import socket
            job.pid, job.pid_start, job.host, job.phase = proc.pid, process_start(proc.pid), socket.gethostname(), "started"
            if running is not None:
                self._record(running, job)
            try:
                limit = job_time_limit(job.job_spec, self.timeout_s)
                job.returncode = proc.wait(limit)
            except subprocess.TimeoutExpired:
                kill_job(proc)
                job.returncode = proc.wait()
                spec = job.job_spec
                how = ("set by --time-limit" if self.timeout_s is not None else
                       f"the default for {spec.geometry.n_views or 'an unknown number of'} views × "
                       f"{spec.params.iterations} iterations; set it with --time-limit")
                job.reason = f"the job ran past its time limit of {limit:.0f} s ({how}) and was ended"
            finally:
                self._procs.pop(job.id, None)
        outcome = self._outcome(job)
        if job.returncode == 0 and (outcome is None or outcome.get("status") == "success"):
            log.info("job %s finished (scan %s)", job.id, job.scan_id)
            return True
        if outcome is not None and outcome.get("status") == "success" and outcome.get("result_file") \
                and Path(outcome["result_file"]).exists():
            # the outcome is written only after the final barrier and the rename: every rank had
            # finished its share, so the result is complete although a process ended badly afterwards
            log.warning("job %s: a process ended with status %s after the result was complete (%s); "
                        "the result stands", job.id, job.returncode, log_tail(logfile))
            return True
        if job.reason is None:
            said = f" ({outcome['reason']})" if outcome and outcome.get("reason") else ""
            job.reason = f"the job exited with status {job.returncode}{said}: {log_tail(logfile)}"
        log.error("job %s failed: %s", job.id, job.reason)
        return False

    def _outcome(self, job: Job) -> dict | None:
        """The job's outcome record; for a job killed after it renamed its result into place but before
        rank 0 wrote the record, a success outcome of that result (written, so a restart reads it too):
        the rename follows the final barrier, so every rank had finished its share."""
        outcome = read_outcome(outcome_path(job.spec_file)) if job.spec_file else None
        if outcome is None and job.spec_file and self._renamed_result(job):
            from hxn_ptycho.job import write_outcome
            from hxn_ptycho.h5util import file_sha256_fingerprint
            digest, stat = file_sha256_fingerprint(job.result_file)
            outcome = {"status": "success", "reason": None, "result_file": str(Path(job.result_file).resolve()),
                       "result_sha256": digest, "result_stat": stat,
                       "measured": {"status": "success", "ranks": job.nprocs, "mode": job.job_spec.execution.mode}}
            write_outcome(outcome_path(job.spec_file), outcome)
        return outcome

    def _renamed_result(self, job: Job) -> bool:
        """Whether this run of ``job`` renamed its result into place (the file is newer than its start)."""
        try:
            return job.started is not None and os.stat(job.result_file).st_mtime >= job.started - 1.0
        except OSError:
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
        """Stop taking jobs; with ``kill``, terminate running ones (they are requeued at next start).
        Slurm jobs: without ``kill`` they go on (the next start adopts them); with it, ``scancel``."""
        if kill and self._slurm:
            from .slurm import cancel_slurm_jobs
            cancel_slurm_jobs(self)
        self._killing = self._killing or kill     # before the loop below: a job registered after it kills itself
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


class LiveJob:
    """A live job started by :meth:`JobQueue.start_now`: ``poll``, ``terminate``, ``kill`` and ``wait``
    as on a ``Popen`` (signals go to the job's process group: mpiexec and its ranks)."""

    def __init__(self, queue: JobQueue, job: Job) -> None:
        self.queue, self.job = queue, job
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.job.pid

    def poll(self) -> int | None:
        """None while it runs (or is being started and published), else its exit status (-1: none)."""
        if self._thread is not None and self._thread.is_alive():
            return None
        return self.job.returncode if self.job.returncode is not None else -1

    def wait(self, timeout: float | None = None) -> int:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise subprocess.TimeoutExpired(f"live job {self.job.id}", timeout or 0.0)
        return self.job.returncode if self.job.returncode is not None else -1

    def terminate(self) -> None:
        import signal
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        import signal
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        self.queue._cancelled[self.job.id] = sig
        proc = self.queue._procs.get(self.job.id)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)


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
