"""The job queue's Slurm launcher (``execution.launcher == "slurm"``): the seam of
:class:`~.launcher.JobQueue` calls :func:`run_slurm_job`, :func:`recover_slurm_job` and
:func:`cancel_slurm_jobs`; Slurm's commands themselves are in :mod:`hxn_ptycho.slurm`.

The queue keeps its promises on Slurm:

- the queue entry records the Slurm job id (``Job.slurm_job``) as soon as ``sbatch`` gives it, and
  the job is named ``hxn-ptycho-<job id>``, so a listener that died between ``sbatch`` and that
  record still finds it (``squeue --me -n NAME``);
- a restarted queue *adopts* a job that Slurm still has queued or running (it follows it and
  publishes its outcome) instead of submitting it again; a job that ended while no queue watched
  is published from its outcome record, or as a failure naming Slurm's end state;
- a queue stopped without ``kill`` stops following (the Slurm job goes on; the next start adopts
  it); ``stop(kill=True)`` and a job past the queue's ``timeout_s`` are cancelled (``scancel``);
- the outcome is published once, through the queue's one publisher, under the job's fixed uid:
  exactly one derived run per raw run and job.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from hxn_ptycho.errors import HxnPtychoError
from hxn_ptycho.slurm import SlurmSettings, SlurmState, cancel, failure_reason, find_job, job_state, submit, wait

from .trust import JOB_ENV_DROPPED, job_time_limit

if TYPE_CHECKING:
    from .launcher import Job, JobQueue

log = logging.getLogger(__name__)


def slurm_name(job: Job) -> str:
    """The Slurm job name of a queue job (how a restarted queue finds a job it did not record)."""
    return f"hxn-ptycho-{job.id}"


def run_slurm_job(queue: JobQueue, job: Job, running: Path) -> bool | None:
    """Submit ``job`` with sbatch and follow it; True/False as it succeeded, None when the queue
    stopped following it (``stop()`` without kill: the Slurm job goes on and is adopted later)."""
    from hxn_ptycho.spec import check_ranks
    spec = job.job_spec
    try:
        check_ranks(spec)
        assert job.spec_file, "a queued job has a spec file"
        job.started, job.phase = time.time(), "submitting"
        queue._record(running, job)
        job.slurm_job = submit(spec, job.spec_file, name=slurm_name(job),
                               logfile=queue.directory / "logs" / f"{job.id}.log", env=queue.env,
                               unset=JOB_ENV_DROPPED)
    except HxnPtychoError as exc:
        job.reason = f"not started: {exc}"
        log.error("job %s %s", job.id, job.reason)
        return False
    job.phase = "started"
    queue._record(running, job)
    log.info("job %s: Slurm job %s (%d task(s)) for scan %s", job.id, job.slurm_job, spec.execution.ranks, job.scan_id)
    return _follow(queue, job)


def _follow(queue: JobQueue, job: Job) -> bool | None:
    assert job.slurm_job is not None
    queue._slurm[job.id] = job.slurm_job
    try:
        settings = SlurmSettings.from_dict(job.job_spec.execution.slurm)
        state = wait(job.slurm_job, poll_s=settings.poll_s, timeout_s=job_time_limit(job.job_spec, queue.timeout_s),
                     stop=lambda: queue._stop.is_set() and job.id not in queue._killed)
    finally:
        queue._slurm.pop(job.id, None)
    if state is None:
        log.info("job %s: no longer followed; Slurm job %s goes on (the next start adopts it)", job.id, job.slurm_job)
        return None
    return _judge(queue, job, state)


def _judge(queue: JobQueue, job: Job, state: SlurmState) -> bool:
    """Success only with a success outcome whose result is in place (renamed after every rank's
    final barrier); otherwise a failure naming Slurm's end state."""
    from .launcher import log_tail
    outcome = queue._outcome(job)
    ok = (outcome is not None and outcome.get("status") == "success"
          and bool(outcome.get("result_file")) and Path(str(outcome.get("result_file"))).exists())
    job.returncode = 0 if state.completed else 1
    if ok and not state.completed:
        log.warning("job %s: %s after its result was complete; the result stands", job.id, state.describe())
    if not ok:
        job.reason = failure_reason(state, outcome, log_tail(queue.directory / "logs" / f"{job.id}.log"))
        log.error("job %s failed: %s", job.id, job.reason)
    else:
        log.info("job %s finished on Slurm (job %s, %s)", job.id, job.slurm_job, state.state)
    return ok


def recover_slurm_job(queue: JobQueue, job: Job, running: Path) -> str:
    """A Slurm job left in ``running/`` by a stopped or dead queue: ``"adopted"`` (Slurm still has
    it queued or running), ``"published"`` (it ended: its outcome, or its end state, is published)
    or ``"requeued"`` (it was never submitted)."""
    if job.phase == "published":
        queue._finish(job, running, job.reason is None)
        return "published"
    if job.slurm_job is None and job.phase == "submitting":
        job.slurm_job = find_job(slurm_name(job))          # sbatch answered, the record did not follow
    if job.slurm_job is None:
        log.warning("job queue: requeueing %s (never submitted to Slurm)", running.name)
        job.pid = job.pid_start = job.phase = None
        from .catalog import atomic_write_text
        atomic_write_text(queue.directory / "pending" / running.name, json.dumps(asdict(job), indent=1))
        running.unlink(missing_ok=True)
        return "requeued"
    state = job_state(job.slurm_job)
    if state is not None and state.active:
        log.warning("job queue: adopting job %s (Slurm job %s, %s), queued or running from a previous process",
                    job.id, job.slurm_job, state.state)
        job.phase = "started"
        queue._record(running, job)

        def adopt() -> None:
            ok = _follow(queue, job)
            if ok is not None:
                queue._end(job, running, ok)
        t = threading.Thread(target=adopt, name=f"hxn-ptycho-adopt-{job.id}", daemon=True)
        t.start()
        queue._threads.append(t)
        return "adopted"
    log.warning("job queue: Slurm job %s of job %s ended while no queue watched it; publishing its outcome",
                job.slurm_job, job.id)
    ended = state or SlurmState(job_id=job.slurm_job, state="UNKNOWN", reason="neither scontrol nor sacct knows it")
    queue._end(job, running, _judge(queue, job, ended))
    return "published"


def cancel_slurm_jobs(queue: JobQueue) -> None:
    """``stop(kill=True)``: cancel every Slurm job the queue follows (they are requeued at next start)."""
    for job_id, slurm_id in list(queue._slurm.items()):
        queue._killed.add(job_id)
        log.warning("job %s: scancel %s (the queue was stopped with kill)", job_id, slurm_id)
        cancel(slurm_id)
