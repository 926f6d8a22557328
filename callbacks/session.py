"""The beamline session's side of hxn-ptycho: what the IPython profile needs beyond the callback.

``profile_collection/startup`` calls these (its files only wire them up):

- :func:`session_folders` — where this session writes the files the catalog server must read (the
  simulated detector's frames, scan files, results, the job queue);
- :func:`check_session` — refuse at start-up, with the one command that fixes it, what would
  otherwise fail in the middle of a scan (a folder we cannot write, one the server cannot read, a
  catalog that is not reachable or refuses our key);
- :func:`leave_session` — at exit, wait for this session's reconstructions with a countdown; Ctrl-C
  leaves them queued for the next session.

IPython clears the user namespace before Python's ``atexit`` handlers run, so the exit handler is
a function of this module (its own globals), registered with its arguments bound — a function
defined in a startup file lost ``os`` there (``NameError: name 'os' is not defined``).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from hxn_ptycho.errors import BadInput

log = logging.getLogger(__name__)

DEFAULT_EXIT_WAIT_S = 300.0
EXPORT_WAIT_S = 120.0      # leaving waits this long at least for the last scan's export (with its orientation trials)


class SessionRefused(BadInput):
    """The session cannot work as configured; the message gives the command that fixes it (status 2)."""


def local_catalog_folder(catalog: str | os.PathLike) -> Path | None:
    """The folder of a catalog served by ``hxn-ptycho serve --dir DIR`` (or the profile's own), if it is one."""
    text = str(catalog)
    if text.startswith(("http://", "https://")):
        return None
    path = Path(text).expanduser().resolve()
    if path.is_file():
        path = path.parent
    return path if (path / "catalog.json").exists() else None


def session_folders(catalog: str | os.PathLike, profile_dir: str | os.PathLike,
                    env: dict[str, str] | None = None) -> tuple[Path, Path]:
    """(work folder, simulated detector folder) of a session.

    The work folder (scan files, results, the job queue) is ``$HXN_PTYCHO_WORK``, else
    ``C/ptycho_work`` for a local catalog folder ``C`` — which ``hxn-ptycho serve --dir C`` reads —
    else ``PROFILE_DIR/work``. The simulated detector writes under ``WORK/detector``
    (``$HXN_PTYCHO_DETECTOR_DIR`` overrides), so that a catalog started exactly as the README says
    can serve the raw frames too.
    """
    env = dict(os.environ if env is None else env)
    local = local_catalog_folder(catalog)
    work = Path(env.get("HXN_PTYCHO_WORK") or ((local / "ptycho_work") if local else Path(profile_dir) / "work"))
    detector = Path(env.get("HXN_PTYCHO_DETECTOR_DIR") or (work / "detector"))
    return work.expanduser().resolve(), detector.expanduser().resolve()


def check_writable(folder: str | os.PathLike, what: str, fix: str = "") -> Path:
    """Create ``folder`` if needed and prove we can write there (a file created and removed), or refuse."""
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".hxn-ptycho-write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SessionRefused(f"cannot write the {what} {path}: {exc.strerror or exc}"
                             + (f"; {fix}" if fix else "")) from None
    return path.resolve()


def check_server_reads(catalog: Any, folders: dict[str, Path], serve_dir: Path | None) -> None:
    """Refuse folders the catalog's server cannot read, naming the ``serve --read`` that fixes it.

    Known for a catalog started by ``hxn-ptycho serve`` (its ``catalog.json`` lists what it reads);
    for a remote server nothing can be checked here.
    """
    from .catalog import resolve_catalog
    cfg = resolve_catalog(catalog)
    if cfg.readable is None:
        return
    roots = [Path(r).resolve() for r in cfg.readable]
    outside = {what: f for what, f in folders.items()
               if not any(f == r or r in f.parents for r in roots)}
    if not outside:
        return
    reads = " ".join(f"--read {f}" for f in sorted(set(map(str, outside.values()))))
    where = f"--dir {serve_dir}" if serve_dir else "--dir DIR"
    raise SessionRefused(
        f"the catalog server at {cfg.uri} cannot read the {' and the '.join(outside)} "
        f"({', '.join(sorted(set(map(str, outside.values()))))}); it reads {', '.join(map(str, roots))}. "
        f"Stop it and start it as: hxn-ptycho serve {where} {reads}")


def check_catalog(catalog: Any) -> None:
    """The catalog answers, accepts our key and has its ``raw`` and ``processed`` containers."""
    from .catalog import CatalogError, runs
    text = str(catalog)
    folder = Path(text).expanduser()
    if not text.startswith(("http://", "https://")) and folder.is_dir() and not (folder / "catalog.json").exists():
        raise SessionRefused(f"{text} is not a running catalog (no catalog.json there): start it first with "
                             f"'hxn-ptycho serve --dir {text}' and wait for 'Press Ctrl-C to stop'")
    try:
        for which in ("raw", "processed"):
            runs(catalog, which)
    except Exception as exc:  # noqa: BLE001 - unreachable, a 401 or any other refusal: one line
        text = (str(exc).splitlines() or [type(exc).__name__])[0]
        local = local_catalog_folder(catalog)
        if "401" in text or "API key" in text or "api_key" in text:
            where = f"$(cat {local / 'api_key'})" if local else "THE_KEY"
            raise SessionRefused(f"the catalog refuses our API key ({text}): export TILED_API_KEY={where}") from None
        if isinstance(exc, CatalogError):
            raise SessionRefused(f"the catalog cannot be used: {text}") from None
        raise SessionRefused(f"the catalog refuses this session: {type(exc).__name__}: {text}") from None


def check_session(catalog: Any, work_dir: Path, detector_dir: Path | None) -> None:
    """Every check of the profile's start-up: folders writable, readable by the server, catalog usable."""
    fix = "set HXN_PTYCHO_WORK to a folder you can write (and the catalog server reads)"
    check_writable(work_dir, "work folder (scan files, results, job queue)", fix)
    folders = {"work folder": work_dir}
    if detector_dir is not None:
        check_writable(detector_dir, "simulated detector's folder", fix)
        folders["simulated detector's folder"] = detector_dir
    check_catalog(catalog)
    check_server_reads(catalog, folders, local_catalog_folder(catalog))


def check_ranks_available(nprocs: int, force: bool = False) -> None:
    """Refuse more ranks than this machine runs (``MAX_RANKS_PER_CORE`` per core) unless forced —
    before any scan, not as a ``fail`` record per scan."""
    from hxn_ptycho.backend import available_cores
    from hxn_ptycho.spec import MAX_RANKS_PER_CORE
    if nprocs < 1:
        raise SessionRefused(f"--nprocs {nprocs}: give at least 1 rank")
    cores = available_cores()
    if nprocs > MAX_RANKS_PER_CORE * cores and not force:
        raise SessionRefused(f"--nprocs {nprocs} is more than {MAX_RANKS_PER_CORE} ranks per core on this machine "
                             f"({cores} cores): use at most {MAX_RANKS_PER_CORE * cores}, or --force-nprocs to insist")


def _describe(jobs: Any) -> str:
    """'scan 12 running, scan 13 pending' for the queue's unfinished jobs."""
    parts = []
    for state in ("running", "pending"):
        for job in jobs.jobs(state):
            src = (job.spec or {}).get("source") or {}
            sid = src.get("scan_id")
            parts.append(f"scan {sid if sid is not None else (src.get('raw_uid') or job.id)[:8]} {state}")
    return ", ".join(parts)


def _unfinished(jobs: Any) -> int:
    return len(jobs.jobs("pending")) + len(jobs.jobs("running"))


def leave_session(callback: Any, jobs: Any, limit_s: float | None = None, *, out: TextIO | None = None,
                  clock: Callable[[], float] = time.monotonic, tick_s: float = 1.0) -> int:
    """Wait (at most ``limit_s``, default ``$HXN_PTYCHO_EXIT_WAIT`` or 300 s) for this session's
    reconstructions, saying what it waits for, with a countdown; returns how many are left queued.
    The last scan's export (its scan file and queued job) is awaited even past that limit, up to
    ``EXPORT_WAIT_S``: a scan not yet exported would otherwise be lost, not queued.

    Ctrl-C stops the wait at once: a running job is stopped and queued again, and every unfinished
    job runs when the queue next starts (this profile, or ``hxn-ptycho listen`` with the same work
    folder). Never raises.
    """
    out = out or sys.stdout
    tty = bool(getattr(out, "isatty", lambda: False)())
    if limit_s is None:
        env = os.environ.get("HXN_PTYCHO_EXIT_WAIT")
        limit_s = float(env) if env else DEFAULT_EXIT_WAIT_S
    deadline = clock() + limit_s

    def say(text: str) -> None:
        print(("\r\x1b[K" if tty else "") + text, file=out, flush=True)

    try:
        if not callback.flush(0):               # the last scan's file and job first (seconds, whatever the limit:
            say("hxn-ptycho: exporting the last scan before leaving ...")   # a scan left unexported is lost)
            callback.flush(max(deadline - clock(), EXPORT_WAIT_S))
        if _unfinished(jobs):
            say(f"hxn-ptycho: waiting for {_unfinished(jobs)} reconstruction(s) before leaving "
                f"({_describe(jobs)}), at most {limit_s:g} s; Ctrl-C leaves them queued in {jobs.directory}")
            last_line = 0.0
            while _unfinished(jobs):
                left = deadline - clock()
                if left <= 0:
                    break
                if tty:
                    print(f"\r\x1b[Khxn-ptycho: {left:4.0f} s left ({_describe(jobs)}) ", end="", file=out, flush=True)
                elif clock() - last_line >= 30 or last_line == 0.0:
                    print(f"hxn-ptycho: {left:.0f} s left ({_describe(jobs)})", file=out, flush=True)
                    last_line = clock()
                jobs.wait_idle(min(tick_s, max(left, 0.0)))
            if not _unfinished(jobs):
                say("hxn-ptycho: every reconstruction of this session is finished and in the catalog")
    except KeyboardInterrupt:
        say("hxn-ptycho: Ctrl-C: not waiting")
    except Exception as exc:  # noqa: BLE001 - leaving must never fail
        say(f"hxn-ptycho: while waiting for the reconstructions: {type(exc).__name__}: {exc}")
    left = 0
    try:
        if _unfinished(jobs):
            jobs.stop(kill=True)                # a running job goes back to 'pending'
            left = _unfinished(jobs)
            say(f"hxn-ptycho: {left} reconstruction job(s) not finished; they stay queued in "
                f"{jobs.directory} and run when the queue next starts (this profile, or "
                f"hxn-ptycho listen --work-dir {Path(jobs.directory).parent})")
        else:
            jobs.stop()
    except BaseException as exc:  # noqa: BLE001 - a second Ctrl-C while stopping: the on-disk queue is intact
        say(f"hxn-ptycho: stopping the job queue: {type(exc).__name__}; unfinished jobs stay in {jobs.directory}")
    try:
        callback.close()
    except BaseException:  # noqa: BLE001
        pass
    return left
