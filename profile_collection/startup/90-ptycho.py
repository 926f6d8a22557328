# 90-ptycho.py — reconstruct every ptychography scan: subscribe the hxn-ptycho callback.
# ruff: noqa: F821  (RE, sd, CATALOG, PROFILE_DIR, ... come from the earlier startup files)
#
# Scan files, results and the on-disk job queue go to $HXN_PTYCHO_WORK (default: DIR/ptycho_work
# for a local catalog folder DIR, which its server reads, else PROFILE_DIR/work); jobs run
# `mpiexec -n $HXN_PTYCHO_NPROCS python -m hxn_ptycho.job` one at a time; their derived runs go
# to the 'processed' container of the same catalog.
# At the facility, prefer `hxn-ptycho listen --zmq ...` in its own process (same callback).
import atexit
import os

from hxn_ptycho.callbacks.catalog import resolve_catalog
from hxn_ptycho.callbacks.export import ExportConfig
from hxn_ptycho.callbacks.launcher import JobQueue
from hxn_ptycho.callbacks.query import results  # noqa: F401  (for the user: results(CATALOG, scan_id=N))
from hxn_ptycho.callbacks.router import (
                       CallbackConfig,
                       PtychoCallback,
)

from pathlib import Path as _Path

_key = resolve_catalog(CATALOG).resolve_api_key()
# Results must lie where the catalog's server may read them: beside a local catalog folder
# (`hxn-ptycho serve --dir DIR` serves DIR) by default, else in the profile folder.
_local = _Path(CATALOG).expanduser() if not str(CATALOG).startswith(("http://", "https://")) else None
if _local is not None and not _local.is_dir():
    _local = _local.parent                      # a catalog.json
WORK_DIR = os.environ.get("HXN_PTYCHO_WORK") or str(
    (_local / "ptycho_work") if _local is not None and (_local / "catalog.json").exists() else PROFILE_DIR / "work")
print(f"hxn-ptycho: scan files, results and the job queue in {WORK_DIR}")
ptycho_jobs = JobQueue(WORK_DIR + "/queue",
                       slots=int(os.environ.get("HXN_PTYCHO_SLOTS", "1")),
                       env={"TILED_API_KEY": _key} if _key else {}).start()
ptycho_callback = PtychoCallback(
    CallbackConfig(work_dir=WORK_DIR, catalog=CATALOG,
                   params={"iterations": int(os.environ.get("HXN_PTYCHO_ITERATIONS", "50"))},
                   nprocs=int(os.environ.get("HXN_PTYCHO_NPROCS", "1")),
                   export=ExportConfig(distance_m=DETECTOR_DISTANCE_M)),
    ptycho_jobs)
RE.subscribe(ptycho_callback)

_last_start = {}
RE.subscribe(lambda name, doc: _last_start.update(uid=doc["uid"], time=doc["time"]), "start")


def wait_for_reconstruction(uid=None, timeout=600.0):
    """Wait for the reconstruction of run ``uid`` (default: the last run of this session) and return it.

    First waits for the callback to have exported the scan and queued its job (so it never returns
    before the job exists), then for the derived run to be in the catalog; returns the
    ``DerivedResult`` (``res.ok``, ``res.object``, ``res.probe``, ..., or ``res.reason`` if it
    failed). Raises ``LookupError`` for a run that is not reconstructed (not a ptychography run, or
    it did not succeed) and ``TimeoutError`` after ``timeout`` seconds, naming the job's state and log.
    """
    import time

    from hxn_ptycho.callbacks.query import wait_for_derived

    t0 = time.monotonic()
    uid = uid or _last_start.get("uid")
    if uid is None:
        raise LookupError("no run has started in this session: give wait_for_reconstruction(uid=...)")
    if not ptycho_callback.flush(timeout):
        raise TimeoutError(f"the callback did not export run {uid} within {timeout:g} s")
    job = next((j for j in reversed(ptycho_callback.submitted) if j.raw_uid == uid), None)
    failed = next((why for u, why in reversed(ptycho_callback.failed) if u == uid), None)
    if job is None and failed is None:
        raise LookupError(f"run {uid} is not reconstructed: not a ptychography run, or it did not succeed")
    left = None if timeout is None else max(timeout - (time.monotonic() - t0), 1.0)
    try:
        return wait_for_derived(CATALOG, uid, timeout=left)
    except TimeoutError as exc:
        if job is None:
            raise
        state = next((s for s in ("pending", "running", "done", "failed")
                      if any(j.id == job.id for j in ptycho_jobs.jobs(s))), "unknown")
        raise TimeoutError(f"{exc}; its job {job.id} is {state} (log {ptycho_jobs.directory / 'logs' / (job.id + '.log')})") from None


def _leave_session():
    """At exit: reconstruct what this session measured. Waits for the callback to queue the last
    scan's job, then for the job queue ($HXN_PTYCHO_EXIT_WAIT seconds at most, default no limit;
    Ctrl-C stops waiting). What is not
    finished by then stays in the on-disk queue — a running job is stopped and queued again — and
    runs when the queue next starts (this profile, or hxn-ptycho listen with the same work folder)."""
    import time

    limit = os.environ.get("HXN_PTYCHO_EXIT_WAIT")
    limit = float(limit) if limit else None
    t0 = time.monotonic()
    try:
        if not ptycho_callback.flush(0):        # the scan file and the job first (seconds), whatever the limit
            print("hxn-ptycho: exporting the last scan before leaving ...", flush=True)
            ptycho_callback.flush()
        busy = len(ptycho_jobs.jobs("pending")) + len(ptycho_jobs.jobs("running"))
        if busy:
            print(f"hxn-ptycho: waiting for {busy} reconstruction job(s) before leaving"
                  + (f" (at most {limit:g} s)" if limit is not None else "")
                  + "; Ctrl-C leaves them queued in " + str(ptycho_jobs.directory), flush=True)
            left = None if limit is None else max(limit - (time.monotonic() - t0), 0.0)
            if ptycho_jobs.wait_idle(left):
                print("hxn-ptycho: every reconstruction of this session is finished and in the catalog", flush=True)
    except KeyboardInterrupt:
        pass
    if not ptycho_jobs.idle():
        ptycho_jobs.stop(kill=True)             # a running job goes back to 'pending'
        left = len(ptycho_jobs.jobs("pending"))
        print(f"hxn-ptycho: {left} reconstruction job(s) not finished; they stay queued in "
              f"{ptycho_jobs.directory} and run when the queue next starts (this profile, or "
              f"hxn-ptycho listen --work-dir {ptycho_jobs.directory.parent})", flush=True)
    else:
        ptycho_jobs.stop()
    ptycho_callback.close()


atexit.register(_leave_session)                 # runs before 00-base's server stop (atexit is LIFO)
print("hxn-ptycho: every ptychography scan is reconstructed; RE(ptycho_scan()) then "
      "res = wait_for_reconstruction() waits for it; results(CATALOG, scan_id=N) to query")
