# 90-ptycho.py — reconstruct every ptychography scan: subscribe the hxn-ptycho callback.
# ruff: noqa: F821  (RE, sd, CATALOG, PROFILE_DIR, ... come from the earlier startup files)
#
# Scan files, results and the on-disk job queue go to $HXN_PTYCHO_WORK (default
# PROFILE_DIR/work); jobs run `mpiexec -n $HXN_PTYCHO_NPROCS python -m hxn_ptycho.job` one at a
# time and publish their derived runs to the 'processed' container of the same catalog.
# At the facility, prefer `hxn-ptycho listen --zmq ...` in its own process (same callback).
import os

from hxn_ptycho.callbacks.catalog import resolve_catalog
from hxn_ptycho.callbacks.export import ExportConfig
from hxn_ptycho.callbacks.launcher import JobQueue
from hxn_ptycho.callbacks.query import results  # noqa: F401  (for the user: results(CATALOG, scan_id=N))
from hxn_ptycho.callbacks.router import (
                       CallbackConfig,
                       PtychoCallback,
                       job_failure_recorder,
)

_key = resolve_catalog(CATALOG).resolve_api_key()
ptycho_jobs = JobQueue(os.environ.get("HXN_PTYCHO_WORK", str(PROFILE_DIR / "work")) + "/queue",
                       slots=int(os.environ.get("HXN_PTYCHO_SLOTS", "1")),
                       env={"TILED_API_KEY": _key} if _key else {},
                       on_failure=job_failure_recorder(CATALOG)).start()
ptycho_callback = PtychoCallback(
    CallbackConfig(work_dir=os.environ.get("HXN_PTYCHO_WORK", str(PROFILE_DIR / "work")), catalog=CATALOG,
                   params={"iterations": int(os.environ.get("HXN_PTYCHO_ITERATIONS", "50"))},
                   nprocs=int(os.environ.get("HXN_PTYCHO_NPROCS", "1")),
                   export=ExportConfig(distance_m=DETECTOR_DISTANCE_M)),
    ptycho_jobs)
RE.subscribe(ptycho_callback)
print("hxn-ptycho: every ptychography scan is reconstructed; results(CATALOG, scan_id=N) to query")
