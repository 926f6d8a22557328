# 90-ptycho.py — reconstruct every ptychography scan: subscribe the hxn-ptycho callback.
# ruff: noqa: F821  (RE, sd, CATALOG, PROFILE_DIR, ... come from the earlier startup files)
#
# Scan files, results and the on-disk job queue go to WORK_DIR (00-base: $HXN_PTYCHO_WORK, default
# DIR/ptycho_work for a local catalog folder DIR, which its server reads, else PROFILE_DIR/work); jobs run
# `mpiexec -n $HXN_PTYCHO_NPROCS python -m hxn_ptycho.job` one at a time; their derived runs go
# to the 'processed' container of the same catalog.
# At the facility, prefer `hxn-ptycho listen --zmq ...` in its own process (same callback).
import atexit
import functools
import os

from hxn_ptycho.callbacks.catalog import resolve_catalog
from hxn_ptycho.callbacks.export import ExportConfig
from hxn_ptycho.callbacks.launcher import JobQueue
from hxn_ptycho.callbacks.query import results  # noqa: F401  (for the user: results(CATALOG, scan_id=N))
from hxn_ptycho.callbacks.session import leave_session
from hxn_ptycho.callbacks.trust import data_roots
from hxn_ptycho.callbacks.router import (
                       CallbackConfig,
                       PtychoCallback,
)

_key = resolve_catalog(CATALOG).resolve_api_key()
# detector files are read only under the data roots (/data, /nsls2/data, $HXN_PTYCHO_DATA_ROOTS);
# the simulated detector writes under DETECTOR_DIR (00-base), so that is one of them here
_data_roots = (*map(str, data_roots()), str(DETECTOR_DIR)) if SIMULATED else None
print(f"hxn-ptycho: scan files, results and the job queue in {WORK_DIR}")
ptycho_jobs = JobQueue(WORK_DIR + "/queue",
                       slots=int(os.environ.get("HXN_PTYCHO_SLOTS", "1")),
                       env={"TILED_API_KEY": _key} if _key else {}).start()
# The jobs' parameters: one dict, shared with the live feeds below, so that a change in the session, e.g.
# ptycho_callback.config.params.update(probe_modes="auto", auto_rule="heldout"), holds for every later scan
# (a held-out count needs the finished scan: no live job then, the scan is reconstructed at its stop).
ptycho_callback = PtychoCallback(
    CallbackConfig(work_dir=WORK_DIR, catalog=CATALOG,
                   params={"iterations": int(os.environ.get("HXN_PTYCHO_ITERATIONS", "50"))},
                   nprocs=int(os.environ.get("HXN_PTYCHO_NPROCS", "1")),
                   export=ExportConfig(distance_m=DETECTOR_DISTANCE_M, data_roots=_data_roots)),
    ptycho_jobs)
RE.subscribe(ptycho_callback)

# fly2dpd live from the detector's own streams (docs/streams.md): opt in with both addresses, at HXN
# HXN_PTYCHO_EIGER_STREAM=tcp://xf03idc-eiger2-ioc.nsls2.bnl.local:5559 and
# HXN_PTYCHO_PANDA_STREAM=tcp://xf03idc-eiger2-ioc.nsls2.bnl.local:6666 (options: StreamConfig)
ptycho_streams = None
if os.environ.get("HXN_PTYCHO_EIGER_STREAM") or os.environ.get("HXN_PTYCHO_PANDA_STREAM"):
    from hxn_ptycho.callbacks.stream import StreamConfig, StreamFeed, StreamFeedConfig
    _c = ptycho_callback.config
    ptycho_streams = StreamFeed(StreamFeedConfig(
        work_dir=_c.work_dir, catalog=_c.catalog, params=_c.params, nprocs=_c.nprocs, export=_c.export,
        stream=StreamConfig(eiger=os.environ.get("HXN_PTYCHO_EIGER_STREAM"),
                            panda=os.environ.get("HXN_PTYCHO_PANDA_STREAM")), queue=ptycho_jobs)).start()
    RE.subscribe(ptycho_streams)
    ptycho_callback.live.append(ptycho_streams)
    atexit.register(ptycho_streams.close)

# Reconstruct step scans while they run (HXN_PTYCHO_LIVE=1; docs/live.md): a live job per scan follows
# a growing scan file; its result is the run's derived run (the post-stop path takes over if it fails).
# The live figure (object phase, probe, the views so far, the data error) follows its previews: a
# window with an interactive matplotlib backend, else WORK_DIR/live.png ($HXN_PTYCHO_LIVE_PNG).
ptycho_live = ptycho_live_figure = None
if os.environ.get("HXN_PTYCHO_LIVE", "0") not in ("", "0", "no", "false"):
    from hxn_ptycho.callbacks.live import LiveFigure
    from hxn_ptycho.callbacks.livefeed import LiveFeed, LiveFeedConfig

    _c = ptycho_callback.config
    ptycho_live = LiveFeed(LiveFeedConfig(work_dir=str(ptycho_callback.work_dir), catalog=_c.catalog,
                                          params=_c.params, nprocs=_c.nprocs, export=_c.export,
                                          first_chunk=int(os.environ.get("HXN_PTYCHO_LIVE_FIRST", "256")),
                                          chunk=int(os.environ.get("HXN_PTYCHO_LIVE_CHUNK", "32")), queue=ptycho_jobs))
    ptycho_callback.live.insert(0, ptycho_live)     # asked first at the stop, as by hxn-ptycho listen
    RE.subscribe(ptycho_live)
    import matplotlib

    _png = os.environ.get("HXN_PTYCHO_LIVE_PNG") or (
        None if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo", "template")
        else WORK_DIR + "/live.png")
    ptycho_live_figure = LiveFigure(ptycho_live, png=_png)
    RE.subscribe(ptycho_live_figure)
    print("hxn-ptycho: step scans are reconstructed while they run; the live figure "
          + (f"is {_png}" if _png else "opens in a window"))

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
    took = ptycho_live is not None and uid in ptycho_live.took      # reconstructed while it ran
    if job is None and failed is None and not took:
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


# At exit: wait for this session's reconstructions, with a countdown ($HXN_PTYCHO_EXIT_WAIT seconds
# at most, default 300; Ctrl-C stops waiting and leaves them queued for the next session). A
# function of hxn_ptycho.callbacks.session with its arguments bound: IPython empties this namespace
# before atexit runs.
_leave_session = functools.partial(leave_session, ptycho_callback, ptycho_jobs)
atexit.register(_leave_session)                 # runs before 00-base's server stop (atexit is LIFO)
print("hxn-ptycho: every ptychography scan is reconstructed; RE(ptycho_scan()) then "
      "res = wait_for_reconstruction() waits for it; results(CATALOG, scan_id=N) to query")
