"""Jobs on Slurm: submit a job spec with ``sbatch`` (its ranks started by ``srun``), follow it,
cancel it, and map Slurm's end state onto the job's outcome record.

Only Slurm's own commands are used (``sbatch --parsable``, ``scontrol show job -o``, ``sacct``,
``squeue``, ``scancel``), each as an argument list, never a shell string: the batch script is a
fixed text (``exec srun --kill-on-bad-exit=1 "$@"``) and the job's argument list reaches ``srun``
as the script's arguments, so no metadata is ever read by a shell.

The settings live in :class:`SlurmSettings` (one place: partition, account, GPUs per rank, time
limit, the ``srun --mpi`` plugin, extra ``sbatch`` options as a list); a job spec carries them in
``execution.slurm`` when ``execution.launcher`` is ``"slurm"``. Site defaults may also come from
sbatch's own input variables (``SBATCH_PARTITION``, ``SBATCH_ACCOUNT``, ``SBATCH_TIMELIMIT``...).

The job itself is the same one ``mpiexec`` starts (:mod:`hxn_ptycho.job`): rank 0 renames the
result into place only after the final barrier and writes the outcome record; ``srun
--kill-on-bad-exit=1`` ends every rank when one dies. Slurm's end states
(:data:`END_STATES`) become the failure reason of a job that left no success outcome.

Followed: the Slurm documentation of sbatch/srun/scontrol/scancel (slurm.schedmd.com), and
NSLS-II's practice of running the HXN streaming service on a Slurm GPU node.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

from .errors import HxnPtychoError
from .spec import SpecError

if TYPE_CHECKING:
    from .spec import JobSpec

log = logging.getLogger(__name__)

#: the launchers a job spec may name (``execution.launcher``)
LAUNCHERS = ("local", "slurm")

#: Slurm's job states that are still alive (queued, starting, running, ending)
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                           "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
                           "RESV_DEL_HOLD", "SPECIAL_EXIT"})
#: Slurm's end states and what each means for the outcome record (COMPLETED alone is a success)
END_STATES = {
    "COMPLETED": "completed",
    "FAILED": "failed: a rank exited with a non-zero status",
    "CANCELLED": "was cancelled (scancel, or by an administrator)",
    "TIMEOUT": "reached its time limit (--slurm-time)",
    "NODE_FAIL": "lost a node (NODE_FAIL)",
    "OUT_OF_MEMORY": "ran out of memory (OUT_OF_MEMORY)",
    "PREEMPTED": "was preempted by a higher-priority job",
    "BOOT_FAIL": "could not boot its node (BOOT_FAIL)",
    "DEADLINE": "missed its deadline",
    "REVOKED": "was revoked (federation)",
}

#: the batch script: fixed text; the job's argument list arrives as "$@" (no metadata in this text)
BATCH_SCRIPT = """#!/bin/sh
# hxn-ptycho: start the job's ranks with srun. Its argument list (srun options, then the
# python command) arrives as "$@": nothing here is built from metadata.
exec srun --kill-on-bad-exit=1 "$@"
"""


class SlurmError(HxnPtychoError):
    """Slurm refused or lost a job, or its commands are missing; the message says which."""


class SlurmSettingsError(SpecError):
    """A Slurm setting is malformed; the message names it."""


@dataclass
class SlurmSettings:
    """The ``[slurm]`` settings of a job, declared once (CLI options, Prefect options, job spec)."""

    partition: str | None = field(default=None, metadata={"help": "partition (sbatch --partition)"})
    account: str | None = field(default=None, metadata={"help": "account to charge (sbatch --account)"})
    gpus_per_task: int | None = field(default=None, metadata={
        "help": "GPUs per rank (sbatch --gpus-per-task; Slurm sets each rank's CUDA_VISIBLE_DEVICES)"})
    gres: str | None = field(default=None, metadata={
        "help": "generic resources per node instead, e.g. gpu:2 (sbatch --gres), for sites without --gpus-per-task"})
    time_limit: str | None = field(default=None, metadata={
        "help": "time limit, e.g. 30 or 1:00:00 (sbatch --time); Slurm ends the job as TIMEOUT"})
    mpi: str | None = field(default=None, metadata={
        "help": "srun's PMI plugin, e.g. pmi2 or pmix (srun --mpi; default the site's MpiDefault)"})
    sbatch_options: list[str] = field(default_factory=list, metadata={
        "help": "further sbatch options, one argument each, e.g. --slurm-option=--qos=high (repeatable)"})
    poll_s: float = field(default=2.0, metadata={"help": "seconds between looks at the job's state"})

    def validate(self) -> SlurmSettings:
        for name in ("partition", "account", "gres", "time_limit", "mpi"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip() or "\n" in value):
                raise SlurmSettingsError(f"slurm setting {name} must be a non-empty one-line string, got {value!r}")
        if self.gpus_per_task is not None and (isinstance(self.gpus_per_task, bool)
                                               or not isinstance(self.gpus_per_task, int) or self.gpus_per_task < 1):
            raise SlurmSettingsError(f"slurm setting gpus_per_task must be a positive integer, got {self.gpus_per_task!r}")
        if not isinstance(self.sbatch_options, list) or not all(
                isinstance(o, str) and o.startswith("-") and "\n" not in o for o in self.sbatch_options):
            raise SlurmSettingsError("slurm setting sbatch_options must be a list of sbatch options, each one "
                                     f"argument starting with '-', got {self.sbatch_options!r}")
        if not isinstance(self.poll_s, (int, float)) or isinstance(self.poll_s, bool) or not 0 < self.poll_s <= 600:
            raise SlurmSettingsError(f"slurm setting poll_s must be in (0, 600] seconds, got {self.poll_s!r}")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SlurmSettings:
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SlurmSettingsError(f"unknown slurm setting(s): {', '.join(sorted(unknown))} "
                                     f"(known: {', '.join(f.name for f in dataclasses.fields(cls))})")
        return cls(**d).validate()

    def to_dict(self) -> dict[str, Any]:
        """The settings that differ from the defaults (what a job spec records)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != SlurmSettings.__dataclass_fields__[f.name].default
                and not (f.name == "sbatch_options" and not self.sbatch_options)}

    # -- the argument lists ------------------------------------------------------------------------
    def sbatch_argv(self, *, name: str, ntasks: int, output: str | os.PathLike, chdir: str | os.PathLike,
                    script: str | os.PathLike, command: list[str]) -> list[str]:
        """``sbatch --parsable ... SCRIPT [srun options] COMMAND...`` (an argument list)."""
        argv = [_command("sbatch"), "--parsable", f"--job-name={name}", f"--ntasks={int(ntasks)}",
                "--cpus-per-task=1", f"--output={output}", "--open-mode=append", f"--chdir={chdir}"]
        for opt, value in (("--partition", self.partition), ("--account", self.account),
                           ("--gpus-per-task", self.gpus_per_task), ("--gres", self.gres),
                           ("--time", self.time_limit)):
            if value is not None:
                argv.append(f"{opt}={value}")
        argv += list(self.sbatch_options)
        argv.append(str(script))
        if self.mpi:
            argv.append(f"--mpi={self.mpi}")
        return argv + list(command)


# -- command-line and keyword options, from the fields above ------------------------------------------

def add_slurm_options(group: Any) -> None:
    """``--slurm-partition``, ``--slurm-account``, ... (one per :class:`SlurmSettings` field)."""
    for f in dataclasses.fields(SlurmSettings):
        flag = {"sbatch_options": "--slurm-option", "time_limit": "--slurm-time"}.get(
            f.name, "--slurm-" + f.name.replace("_", "-"))
        kind: Any = {"gpus_per_task": int, "poll_s": float}.get(f.name, str)
        if f.name == "sbatch_options":
            group.add_argument(flag, dest="slurm_sbatch_options", action="append", default=None, metavar="OPT",
                               help=f.metadata["help"])
        else:
            group.add_argument(flag, dest="slurm_" + f.name, type=kind, default=None, help=f.metadata["help"])


def settings_from_namespace(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--slurm-*`` options given (as a dict for ``execution.slurm``)."""
    given = {f.name: getattr(args, "slurm_" + f.name, None) for f in dataclasses.fields(SlurmSettings)}
    return SlurmSettings.from_dict({k: v for k, v in given.items() if v is not None}).to_dict()


# -- Slurm's commands -----------------------------------------------------------------------------------

def _command(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise SlurmError(f"--launcher slurm needs Slurm's '{name}' command, which is not on PATH "
                         "(run on a Slurm submit host, or load the site's slurm module)")
    return found


def _run(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


@dataclass
class SlurmState:
    """What Slurm says about a job: its state (first word: ``CANCELLED by 0`` → ``CANCELLED``)."""

    job_id: str
    state: str
    exit_code: str | None = None
    num_tasks: int | None = None
    reason: str | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def completed(self) -> bool:
        return self.state == "COMPLETED"

    def describe(self) -> str:
        meaning = END_STATES.get(self.state, self.state.lower())
        code = f", exit code {self.exit_code}" if self.exit_code and self.exit_code != "0:0" else ""
        why = f", reason {self.reason}" if self.reason and self.reason not in ("None", "") else ""
        return f"Slurm job {self.job_id} ended {self.state} ({meaning}{code}{why})"


def _scontrol_state(job_id: str) -> SlurmState | None:
    done = _run([_command("scontrol"), "show", "job", "-o", str(job_id)])
    if done.returncode != 0 or "JobState=" not in done.stdout:
        return None
    fields: dict[str, str] = {}
    for token in done.stdout.split():
        key, sep, value = token.partition("=")
        if sep:
            fields.setdefault(key, value)
    tasks = fields.get("NumTasks")
    return SlurmState(job_id=str(job_id), state=fields["JobState"].split()[0].rstrip("+"),
                      exit_code=fields.get("ExitCode"), num_tasks=int(tasks) if tasks and tasks.isdigit() else None,
                      reason=fields.get("Reason"))


def _sacct_state(job_id: str) -> SlurmState | None:
    if not shutil.which("sacct"):
        return None
    done = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State,ExitCode,NTasks"])
    line = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else ""
    if not line:
        return None
    state, _, rest = line.partition("|")
    exit_code, _, tasks = rest.partition("|")
    return SlurmState(job_id=str(job_id), state=state.split()[0].rstrip("+"), exit_code=exit_code or None,
                      num_tasks=int(tasks) if tasks.strip().isdigit() else None)


def job_state(job_id: str) -> SlurmState | None:
    """The job's state from the controller (``scontrol``), or from accounting (``sacct``) once the
    controller forgot it (after MinJobAge); None when neither knows the job."""
    return _scontrol_state(job_id) or _sacct_state(job_id)


def find_job(name: str) -> str | None:
    """The id of our queued or running job named ``name`` (a job submitted just before a crash)."""
    done = _run([_command("squeue"), "-h", "--me", "-n", name, "-o", "%i"])
    ids = done.stdout.split() if done.returncode == 0 else []
    return ids[-1] if ids else None


def cancel(job_id: str) -> None:
    """``scancel JOB``: Slurm signals every rank (TERM, then KILL after KillWait)."""
    done = _run([_command("scancel"), str(job_id)])
    if done.returncode != 0:
        log.warning("scancel %s: %s", job_id, done.stderr.strip())


def submit(spec: JobSpec, spec_path: str | os.PathLike, *, name: str, logfile: str | os.PathLike,
           env: dict[str, str] | None = None, quiet: bool = True, unset: Sequence[str] = ()) -> str:
    """Submit the job of ``spec`` (written at ``spec_path``) with ``sbatch``; return Slurm's job id.
    ``unset`` names variables the job must not inherit (sbatch exports the caller's environment)."""
    from .job import job_argv
    settings = SlurmSettings.from_dict(spec.execution.slurm)
    folder = Path(spec_path).resolve().parent
    script = folder / "hxn-ptycho-srun.sh"
    if not script.exists():
        script.write_text(BATCH_SCRIPT)
    command = job_argv(spec_path, nprocs=1, quiet=quiet, launched_at=time.time())   # one rank's argv; srun starts K
    argv = settings.sbatch_argv(name=name, ntasks=spec.execution.ranks, output=logfile, chdir=folder,
                                script=script, command=command)
    run_env = {k: v for k, v in dict(os.environ, **(env or {})).items() if k not in unset}
    run_env.setdefault("OMP_NUM_THREADS", "1")
    log.info("slurm: %s", " ".join(argv))
    done = subprocess.run(argv, capture_output=True, text=True, env=run_env, timeout=120, check=False,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {done.stderr.strip() or done.stdout.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch gave no job id: {done.stdout.strip()!r}")
    return job_id


def wait(job_id: str, *, poll_s: float = 2.0, timeout_s: float | None = None,
         stop: Callable[[], bool] | None = None) -> SlurmState | None:
    """Follow the job until it ends; return its end state. Returns None when ``stop()`` says to stop
    following (the job goes on). Past ``timeout_s`` of running (time queued does not count) the job is
    cancelled, and its end state returned with that reason."""
    started: float | None = None               # the time limit counts running time, not time in Slurm's queue
    unknown_since: float | None = None
    timed_out: str | None = None
    while True:
        state = job_state(job_id)
        if state is None:                       # not yet visible, or forgotten: give it a little while
            unknown_since = unknown_since or time.monotonic()
            if time.monotonic() - unknown_since > max(30.0, 5 * poll_s):
                return SlurmState(job_id=str(job_id), state="UNKNOWN",
                                  reason=timed_out or "neither scontrol nor sacct knows the job")
        elif not state.active:
            if timed_out:
                state.reason = timed_out
            return state
        else:
            unknown_since = None
            if started is None and state.state == "RUNNING":
                started = time.monotonic()
        if timeout_s is not None and started is not None and time.monotonic() - started > timeout_s:
            timed_out = f"it ran past the {timeout_s:.0f} s limit and was cancelled"
            log.warning("slurm job %s: %s", job_id, timed_out)
            cancel(job_id)
            stop = None
            timeout_s = None
        if stop is not None and stop():
            return None
        time.sleep(poll_s)


def failure_reason(state: SlurmState | None, outcome: dict[str, Any] | None, log_tail: str = "") -> str:
    """Why a Slurm job failed: its end state first, then what the job said."""
    said = f" ({outcome['reason']})" if outcome and outcome.get("reason") else ""
    what = state.describe() if state is not None else "the Slurm job ended in an unknown state"
    return f"{what}{said}" + (f": {log_tail}" if log_tail else "")


def tail(path: str | os.PathLike, chars: int = 600) -> str:
    try:
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-4:])[-chars:]


def execute_slurm(spec: JobSpec, *, quiet: bool = False, env: dict[str, str] | None = None,
                  workdir: str | os.PathLike | None = None, unset: Sequence[str] = ()) -> tuple[int, dict[str, Any]]:
    """``hxn-ptycho reconstruct --launcher slurm``: submit, follow to the end, return (status, outcome).

    The spec, the batch script and the Slurm log live in a temporary folder beside the result (a
    filesystem the compute nodes share), removed afterwards; Ctrl-C cancels the job (``scancel``)."""
    from .job import failure_outcome, outcome_path, read_outcome
    settings = SlurmSettings.from_dict(spec.execution.slurm)
    folder = Path(workdir) if workdir is not None else Path(spec.source.result_file).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".hxn-ptycho-slurm-", dir=folder) as tmp:
        spec_path = spec.write(Path(tmp) / "job.spec.json")
        logfile = Path(tmp) / "slurm.log"
        job_id = submit(spec, spec_path, name=f"hxn-ptycho-{Path(tmp).name.rsplit('-', 1)[-1]}",
                        logfile=logfile, env=env, quiet=quiet, unset=unset)
        print(f"submitted Slurm job {job_id} ({spec.execution.ranks} task(s))", file=sys.stderr, flush=True)
        try:
            state = wait(job_id, poll_s=settings.poll_s)
        except BaseException:
            cancel(job_id)                       # abandoned (Ctrl-C): the job is not left running
            raise
        outcome = read_outcome(outcome_path(spec_path))
        text = logfile.read_text(errors="replace") if logfile.exists() else ""
    ok = outcome is not None and outcome.get("status") == "success"
    if state is not None and not state.completed and ok and not Path(str(outcome and outcome.get("result_file"))).exists():
        ok = False
    if text and (not quiet or not ok):
        sys.stderr.write(text if text.endswith("\n") else text + "\n")
    if ok:
        assert outcome is not None
        if state is not None and not state.completed:
            log.warning("%s after its result was complete; the result stands", state.describe())
        return 0, outcome
    reason = failure_reason(state, outcome, " | ".join([ln for ln in text.splitlines() if ln.strip()][-4:])[-600:])
    return 1, failure_outcome(spec, reason, slurm_job=job_id, slurm_state=state.state if state else None)
