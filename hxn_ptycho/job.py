"""``python -m hxn_ptycho.job SPEC.json``: what each process of a reconstruction runs.

Started once (one process) or by an MPI launcher (``mpiexec``/``srun``: one per rank) on a
:class:`~hxn_ptycho.spec.JobSpec` file. Each rank reads only its own share of the frames and runs
the engine with the MPI reducer. The job only computes: rank 0 writes the result file to a
temporary name, renames it into place after the final barrier (every rank finished), and writes a
small outcome record (JSON: status, reason, result path, measured facts) beside the spec. It
publishes nothing — whoever launched it publishes the outcome
(``hxn_ptycho.callbacks.derived.publish_outcome``).

``python -m hxn_ptycho.job SCAN.h5 -o RESULT.h5 --params JSON [--mode async]`` still works: it
builds the spec from the scan file.

Ctrl-C (SIGINT) asks the engine to stop after the current iteration when the engine offers a stop
hook; the result is then kept and marked ``interrupted``. A second Ctrl-C interrupts at once.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from .errors import BadInput, HxnPtychoError
from .spec import JobSpec, Source, SpecError, versions

log = logging.getLogger(__name__)
_IMPORTED_AT = time.time()


class JobError(HxnPtychoError):
    """A reconstruction job failed; the message says why (and on which rank)."""


class LauncherNotFound(BadInput, FileNotFoundError):
    """Several processes were asked for, but there is no ``mpiexec``."""


def find_mpiexec() -> str:
    """``mpiexec`` beside this Python (the mpich wheel's), else on PATH; a clear error if none."""
    import shutil
    here = Path(sys.executable).with_name("mpiexec")
    if here.exists():
        return str(here)
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise LauncherNotFound("several processes need an MPI launcher but no 'mpiexec' was found beside "
                               f"{sys.executable} nor on PATH (pip install mpich, or load your facility's MPI module)")
    return found


def outcome_path(spec_path: str | os.PathLike) -> Path:
    """Where the job started on ``spec_path`` writes its outcome: ``X.spec.json`` → ``X.outcome.json``."""
    p = Path(spec_path)
    stem = p.name[:-len(".spec.json")] if p.name.endswith(".spec.json") else p.stem
    return p.with_name(stem + ".outcome.json")


def job_argv(spec_path: str | os.PathLike, *, nprocs: int = 1, quiet: bool = False,
             mpiexec: str | None = None, launched_at: float | None = None, follow: bool = False) -> list[str]:
    """The job's argument list (never a shell string): ``[mpiexec -n K] python -m hxn_ptycho.job SPEC.json``."""
    argv = [sys.executable, "-m", "hxn_ptycho.job", str(spec_path)] + (["--follow"] if follow else [])
    if quiet:
        argv.append("--quiet")
    if launched_at is not None:
        argv += ["--launched-at", repr(float(launched_at))]
    if nprocs > 1:
        argv = [mpiexec or find_mpiexec(), "-n", str(int(nprocs))] + argv
    return argv


def launch_argv(spec: JobSpec, spec_path: str | os.PathLike, *, quiet: bool = True,
                mpiexec: str | None = None, follow: bool = False) -> list[str]:
    """Check the spec (ranks vs views and cores) and return its argument list; nothing is started here.
    ``follow``: the long-lived job of a scan being measured (``--follow``, :mod:`hxn_ptycho.live`)."""
    from .spec import check_ranks
    check_ranks(spec)
    return job_argv(spec_path, nprocs=spec.execution.ranks, quiet=quiet, mpiexec=mpiexec, launched_at=time.time(),
                    follow=follow)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hxn_ptycho.job", description=(__doc__ or "").splitlines()[0])
    p.add_argument("spec", help="job spec (SPEC.json), or an HXN scan file with -o (legacy form)")
    p.add_argument("-o", "--output", help="legacy form: result file to write")
    p.add_argument("--params", default="{}", help="legacy form: reconstruction parameters as JSON")
    p.add_argument("--mode", choices=("sync", "async"), default="sync", help="legacy form: MPI scheme")
    p.add_argument("--png", help="legacy form: also write a summary figure")
    p.add_argument("--outcome", help="outcome record to write (default: beside the spec, X.outcome.json)")
    p.add_argument("--launched-at", type=float, help="epoch seconds of the launch (to measure the start-up)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--follow", action="store_true", help="the scan file is growing (a scan being measured): "
                   "reconstruct while it grows, write previews, finish when it is complete (hxn_ptycho.live)")
    return p


def spec_from_args(args: argparse.Namespace) -> tuple[JobSpec, Path]:
    """The spec and the outcome path from the job's arguments (a spec file, or the legacy form)."""
    if str(args.spec).endswith(".json"):
        spec = JobSpec.read(args.spec)
        return spec, Path(args.outcome) if args.outcome else outcome_path(args.spec)
    if not args.output:
        raise SpecError("give a job spec (SPEC.json), or a scan file with -o RESULT.h5")
    from .params import ReconParams
    from .spec import Execution, Geometry
    geometry = Geometry.from_scan_file(args.spec)
    spec = JobSpec(params=ReconParams.from_json(args.params), geometry=geometry,
                   execution=Execution(ranks=1, mode=args.mode),
                   source=Source(scan_file=os.path.abspath(args.spec), result_file=os.path.abspath(args.output),
                                 png=args.png))
    return spec, Path(args.outcome) if args.outcome else Path(str(args.output) + ".outcome.json")


def _test_hooks(rank: int) -> None:
    """TEST HOOK ONLY (tests/test_mpi.py): make one rank fail or die, to test that the job fails whole.

    ``HXN_PTYCHO_TEST_FAIL_RANK=r`` makes rank r raise; ``HXN_PTYCHO_TEST_KILL_RANK=r`` kills it
    with SIGKILL. Unset in production, this does nothing.
    """
    if os.environ.get("HXN_PTYCHO_TEST_FAIL_RANK") == str(rank):
        raise RuntimeError("test hook HXN_PTYCHO_TEST_FAIL_RANK: this rank fails on purpose")
    if os.environ.get("HXN_PTYCHO_TEST_KILL_RANK") == str(rank):
        os.kill(os.getpid(), signal.SIGKILL)


def _world() -> Any:
    """The communicator, or a :class:`JobError` saying why MPI cannot start."""
    from .distributed import world
    try:
        return world()
    except RuntimeError as exc:
        raise JobError(str(exc)) from None


def write_outcome(path: str | os.PathLike, outcome: dict[str, Any]) -> None:
    from .h5util import atomic_path
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(outcome, indent=1, sort_keys=True, default=str))


def read_outcome(path: str | os.PathLike) -> dict[str, Any] | None:
    """The outcome record a job wrote, or None if it wrote none (it died first)."""
    try:
        return dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError):
        return None


def live_facts_path(result_file: str | os.PathLike) -> Path:
    """Where a live path that failed leaves its facts for the post-stop job's ``measured["live"]``:
    ``<result>.live_facts.json`` (written by ``callbacks/stream.py`` before the post-stop job)."""
    p = Path(result_file)
    return p.with_name(p.name.removesuffix(".h5") + ".live_facts.json")


def failure_outcome(spec: JobSpec, reason: str, **measured: Any) -> dict[str, Any]:
    """The outcome of a job that failed (or could not start) with ``reason``."""
    facts = {"status": "fail", "host": socket.gethostname(), "ranks": spec.execution.ranks,
             "mode": spec.execution.mode, **measured}
    return {"status": "fail", "reason": str(reason), "result_file": None, "measured": facts}


def measured_facts(res: Any, spec: JobSpec, comm: Any, startup_s: float | None) -> dict[str, Any]:
    import numpy as np
    attrs = res.attrs
    err = np.asarray(res.error_data, dtype=float)
    return {"status": "success", "elapsed_s": attrs.get("elapsed_s"), "startup_s": startup_s,
            "iterations_done": int(np.isfinite(err).sum()), "probe_modes_used": attrs.get("probe_modes_used"),
            "probe_modes_auto": attrs.get("probe_modes_auto"),
            "final_data_error": attrs.get("final_data_error"), "final_cost": attrs.get("final_cost"),
            "interrupted": bool(attrs.get("interrupted", False)), "host": socket.gethostname(),
            "versions": versions(), "backend": attrs.get("backend", spec.params.backend), "ranks": comm.size,
            "mode": spec.execution.mode}


STOP_FILE_ENV = "HXN_PTYCHO_STOP_FILE"


def _stop_hook(stop: threading.Event) -> Any:
    """The engine's stop hook: Ctrl-C in this process (``stop``), or the launcher's stop file
    (``$HXN_PTYCHO_STOP_FILE``: how ``execute`` asks the ranks of an MPI job, which it keeps out of
    the terminal's reach, to stop after the current iteration). Every rank agrees through the reducer."""
    path = os.environ.get(STOP_FILE_ENV)
    if not path:
        return stop
    return lambda: stop.is_set() or os.path.exists(path)


def interrupted(outcome: dict[str, Any]) -> bool:
    """A complete result of a run stopped early on request (Ctrl-C): kept, but not all its iterations."""
    return outcome.get("status") == "success" and bool((outcome.get("measured") or {}).get("interrupted"))


def _accepts_stop() -> bool:
    """Whether the engine offers the stop hook (a ``stop`` keyword of ``run_distributed``)."""
    from .distributed import run_distributed
    return "stop" in inspect.signature(run_distributed).parameters


@contextlib.contextmanager
def sigint_stops(stop: threading.Event) -> Any:
    """First Ctrl-C sets ``stop`` (the engine ends after the current iteration); the second interrupts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nhxn-ptycho: stopping after the current iteration (Ctrl-C again to abort)", file=sys.stderr,
              flush=True)
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_spec(spec: JobSpec, outcome_file: str | os.PathLike | None = None, *, progress: bool = True,
             launched_at: float | None = None, follow: bool = False) -> tuple[int, dict[str, Any]]:
    """Run the job in this process (one rank of it); returns (exit status, outcome).

    Rank 0 writes the result (renamed into place after the final barrier) and the outcome record.
    """
    launched = launched_at if launched_at is not None else _IMPORTED_AT
    try:
        comm = _world()
    except JobError as exc:
        print(f"hxn-ptycho job failed: {exc}", file=sys.stderr, flush=True)
        failed = failure_outcome(spec, str(exc))
        if outcome_file:
            write_outcome(outcome_file, failed)
        return 1, failed
    src = spec.source
    result = Path(src.result_file)
    tmp: Path | None = None
    status, message = 0, ""
    outcome: dict[str, Any] = {}
    stop = threading.Event()
    try:
        _test_hooks(comm.rank)
        from .distributed import run_distributed
        extra: dict[str, Any] = {"stop": _stop_hook(stop)} if _accepts_stop() else {}
        with sigint_stops(stop) if extra else contextlib.nullcontext():
            if follow:              # a growing scan file: the live session (hxn_ptycho.live)
                if spec.execution.mode != "sync":
                    raise SpecError(f"--follow runs the synchronous scheme; mode {spec.execution.mode!r} cannot "
                                    "follow a growing scan file")
                from .live import follow_distributed
                res, _info = follow_distributed(src.scan_file, spec.params, comm, result_file=src.result_file,
                                                progress=progress, **extra)
            else:
                res, _info = run_distributed(src.scan_file, spec.params, comm, mode=spec.execution.mode,
                                             progress=progress, **extra)
        # the first iteration: before the reconstruction's time, and before a held-out probe-mode count's
        first_iteration = time.time() - float(res.attrs.get("elapsed_s") or 0.0) - count_seconds(res.attrs)
        starts = comm.gather(first_iteration)
        comm.barrier()              # every rank finished its share before rank 0 writes anything
        if comm.rank == 0:
            from .resultfile import write_result
            result.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{result.name}.", suffix=".part", dir=result.parent)
            os.close(fd)
            tmp = Path(name)
            write_result(tmp, res)
        comm.barrier()              # the final barrier: every rank is done; only now is the result renamed
        if comm.rank == 0:
            assert tmp is not None
            os.replace(tmp, result)
            os.chmod(result, 0o644)
            tmp = None
            if src.png:
                from .plots import summary_png
                summary_png(res, src.png, title=f"scan {src.scan_id}" if src.scan_id is not None else "",
                            pixel_size_m=spec.geometry.pixel_size_m or _info.get("pixel_size_m"),
                            facts=spec.to_dict().get("geometry"))
            startup = max(starts) - launched if starts else None
            from .h5util import file_sha256_fingerprint
            digest, stat = file_sha256_fingerprint(result)      # the publisher checks the stat, not the bytes
            outcome = {"status": "success", "reason": None, "result_file": str(result.resolve()),
                       "result_sha256": digest, "result_stat": stat,
                       "measured": measured_facts(res, spec, comm, startup)}
            facts = live_facts_path(result)
            if "live" not in _info and facts.exists():   # a live path that failed (callbacks/stream.py): why
                try:
                    outcome["measured"]["live"] = json.loads(facts.read_text())
                except (OSError, ValueError) as exc:
                    log.warning("live facts %s not read (%s)", facts, exc)
            if "live" in _info:     # of the live phase: previews, lags, the final latency after the stop
                live = dict(_info["live"], final_latency_s=time.time() - _info["live"]["complete_seen_at"])
                outcome["measured"]["live"] = live
            if outcome_file:
                write_outcome(outcome_file, outcome)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, then the job exits non-zero
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        status = (exc.exit_status if isinstance(exc, HxnPtychoError)
                  else 130 if isinstance(exc, KeyboardInterrupt) else 1)
        message = f"rank {comm.rank}: {type(exc).__name__}: {exc}"
        if os.environ.get("HXN_PTYCHO_DEBUG"):
            traceback.print_exc()
    if not status:
        # interrupted on request: the result is kept and the process says so with 130 — except as one
        # of several MPI ranks, which end 0 so that the MPI launcher ends cleanly (execute() and the
        # outcome record say "interrupted")
        return (130 if comm.size == 1 and interrupted(outcome) else 0), outcome
    print(f"hxn-ptycho job failed: {message}", file=sys.stderr, flush=True)
    outcome = failure_outcome(spec, message, exit_code=status)
    if comm.rank == 0 and outcome_file:
        with contextlib.suppress(OSError):
            write_outcome(outcome_file, outcome)
    if comm.size > 1:
        comm.abort(status)          # the other ranks may wait in a collective: end them all
    return status, outcome


def execute(spec: JobSpec, *, quiet: bool = False, env: dict[str, str] | None = None,
            workdir: str | os.PathLike | None = None, unset: Sequence[str] = ()) -> tuple[int, dict[str, Any]]:
    """Run the job of ``spec`` to its end, here (one rank), under ``mpiexec`` (several) or on Slurm
    (``execution.launcher == "slurm"``: :func:`~hxn_ptycho.slurm.execute_slurm`); return
    (exit status, outcome). The ranks are checked first; the spec and outcome files of an MPI run
    live in ``workdir`` (default: a temporary folder, removed afterwards)."""
    from .distributed import launched_by_mpi
    from .spec import check_ranks
    check_ranks(spec)
    if spec.execution.launcher == "slurm":                  # sbatch/srun: see hxn_ptycho/slurm.py
        from .slurm import execute_slurm
        return execute_slurm(spec, quiet=quiet, env=env, workdir=workdir, unset=unset)
    if spec.execution.ranks <= 1 or launched_by_mpi():      # a launched job never launches another
        return run_spec(spec, None, progress=not quiet, launched_at=time.time())
    with tempfile.TemporaryDirectory(prefix="hxn-ptycho-job-", dir=workdir) as tmp:
        spec_path = spec.write(Path(tmp) / "job.spec.json")
        argv = launch_argv(spec, spec_path, quiet=quiet)
        stop_file = Path(tmp) / "stop"
        full = {k: v for k, v in dict(os.environ, **(env or {})).items() if k not in unset}
        status = _run_ranks(argv, {**full, STOP_FILE_ENV: str(stop_file)}, stop_file)
        from .h5util import remove_parts
        remove_parts(spec.source.result_file)              # what a killed rank 0 left half-written
        outcome = read_outcome(outcome_path(spec_path))
    if outcome is None:
        outcome = failure_outcome(spec, f"the job exited with status {status} without an outcome record "
                                        "(a rank died; see the messages above)" if status != 130 else
                                        "interrupted (Ctrl-C twice): no result", exit_code=status)
    if status == 0 and outcome.get("status") != "success":
        status = 1
    if status == 0 and interrupted(outcome):
        status = 130                                    # as one process: interrupted, result kept
    return status, outcome


def _run_ranks(argv: list[str], env: dict[str, str], stop_file: Path) -> int:
    """Run ``mpiexec`` in a session of its own, out of the terminal's reach: Ctrl-C here writes the
    stop file (every rank stops after the current iteration and the result is kept); a second Ctrl-C
    kills the job's session (no result). MPICH never sees a SIGINT, so it prints no assertions."""
    import subprocess
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    presses = 0

    def handler(signum: int, frame: Any) -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            stop_file.touch()
            print("\nhxn-ptycho: stopping after the current iteration (Ctrl-C again to abort)", file=sys.stderr,
                  flush=True)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            print("hxn-ptycho: aborted", file=sys.stderr, flush=True)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, handler) if main else None
    try:
        rc = proc.wait()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    return 130 if presses > 1 else rc


def count_seconds(facts: dict[str, Any]) -> float:
    """Seconds the held-out probe-mode count took before the reconstruction (``auto_rule='heldout'``), else 0."""
    from .mode_count import heldout_evidence
    ev = heldout_evidence(facts)
    return float(ev.get("seconds") or 0.0) if ev else 0.0


def final_line(outcome: dict[str, Any]) -> str:
    """The one line a reconstruction ends with: final data error, cost, time (or why it failed)."""
    m = outcome.get("measured") or {}
    if outcome.get("status") != "success":
        return f"failed: {outcome.get('reason')}"

    def num(v: Any, fmt: str) -> str:
        return "?" if v is None else format(float(v), fmt)
    note = ", interrupted" if m.get("interrupted") else ""
    from .mode_count import heldout_evidence
    ev = heldout_evidence(m)
    found = f"at least {ev.get('found')}" if ev and ev.get("at_cap") else (ev or {}).get("found")
    count = f" after {count_seconds(m):.1f} s counting {found} probe mode(s)" if ev else ""
    return (f"final data error {num(m.get('final_data_error'), '.4g')}, cost {num(m.get('final_cost'), '.4g')}, "
            f"time {num(m.get('elapsed_s'), '.1f')} s{count} ({m.get('iterations_done')} iterations, "
            f"{m.get('ranks')} rank(s){note}) -> {outcome.get('result_file')}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec, outcome = spec_from_args(args)
    except HxnPtychoError as exc:
        print(f"hxn-ptycho job failed: {exc}", file=sys.stderr, flush=True)
        return exc.exit_status
    return run_spec(spec, outcome, progress=not args.quiet, launched_at=args.launched_at, follow=args.follow)[0]


if __name__ == "__main__":
    sys.exit(main())
