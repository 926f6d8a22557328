"""The Bluesky/Tiled verbs of ``hxn-ptycho``: ``serve``, ``listen``, ``demo``, ``results``.

``hxn_ptycho/cli.py`` calls :func:`add_commands`; ``hxn-ptycho reconstruct --scan-id N --catalog C``
calls :func:`reconstruct_from_catalog`. ``python -m hxn_ptycho.callbacks.commands VERB`` works too.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hxn_ptycho.errors import BadInput, HxnPtychoError
from hxn_ptycho.params import ReconParams, add_param_options, params_from_namespace
from hxn_ptycho.spec import Execution, JobSpec, add_execution_options, execution_from_namespace

from .catalog import EmbeddedServer, resolve_catalog

log = logging.getLogger("hxn_ptycho.callbacks")


class CommandError(BadInput):
    """A verb cannot do what was asked; the message says why (exit status 2)."""


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "bluesky", "ophyd", "tiled", "numexpr", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _stop_on_signal() -> threading.Event:
    """An Event set by SIGINT or SIGTERM (install it before starting anything a signal must stop)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _wait_for_signal(stop: threading.Event | None = None) -> None:
    stop = stop or _stop_on_signal()
    while not stop.is_set():
        stop.wait(0.5)


# -- serve ----------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a catalog folder; the key in ``DIR/api_key`` is kept across restarts (see EmbeddedServer)."""
    _setup_logging(args.verbose)
    stop = _stop_on_signal()         # a SIGTERM during the start-up still stops the server cleanly
    server = EmbeddedServer(args.dir, port=args.port, database=args.database, readable=tuple(args.read or ()))
    server.start()                   # refused (CatalogInUse, exit 2) when another server holds the folder
    cfg_path = server.directory / "catalog.json"
    print(f"Tiled catalog: {server.uri}  (containers 'raw' and 'processed')\n"
          f"config:        {cfg_path}   (use --catalog {server.directory})\n"
          f"API key file:  {server.key_file}   (kept across restarts; "
          f"or: export TILED_API_KEY=$(cat {server.key_file}))\n"
          f"log:           {server.log_file}\nPress Ctrl-C to stop.", flush=True)
    exported = os.environ.get("TILED_API_KEY")
    if exported and exported != server.api_key:
        log.warning("TILED_API_KEY in this shell is not this catalog's key: clients started here will get "
                    "401; export TILED_API_KEY=$(cat %s)", server.key_file)
    threading.Thread(target=republish_saved, args=(server,), name="hxn-ptycho-republish", daemon=True).start()
    try:
        _wait_for_signal(stop)
    finally:
        server.stop()
    return 0


def _for_server(server: EmbeddedServer) -> Any:
    """Accept saved documents meant for ``server``: its folder, its config file or its URI (or unnamed)."""
    def accept(header: dict) -> bool:
        target = header.get("catalog")
        if not target:
            return True
        if target.startswith(("http://", "https://")):
            return target.rstrip("/") == server.uri
        p = Path(target).expanduser().resolve()
        return p in (server.directory, server.directory / "catalog.json")
    return accept


def republish_saved(server: EmbeddedServer) -> tuple[list[str], list[str]]:
    """``serve`` coming back: send the saved documents of failed publishes found in the folders it
    reads (to a depth of 3: READ/WORK/results/*.docs.jsonl) that were meant for this catalog."""
    from .derived import republish_all
    folders = [r for r in server.readable_folders() if Path(r) != server.directory / "data"]
    sent, errors = republish_all(folders, server.config, accept=_for_server(server))
    if sent or errors:
        log.info("serve: republished %d saved derived run(s)%s", len(sent),
                 f"; {len(errors)} not sent: {'; '.join(errors)}" if errors else "")
    return sent, errors


# -- listen ---------------------------------------------------------------------------------

def make_dispatcher(args: argparse.Namespace) -> Any:
    """A 0MQ ``RemoteDispatcher`` (``--zmq HOST:PORT``) or a Kafka one (``--kafka SERVERS --topic T``)."""
    if args.kafka:
        try:
            from bluesky_kafka import RemoteDispatcher as KafkaDispatcher
        except ImportError:
            raise CommandError("--kafka needs the 'bluesky-kafka' package (pip install bluesky-kafka)") from None
        return KafkaDispatcher(topics=[args.topic], bootstrap_servers=args.kafka, group_id=args.group_id,
                               consumer_config={"auto.offset.reset": "latest"})
    from bluesky.callbacks.zmq import RemoteDispatcher
    return RemoteDispatcher(args.zmq)


def build_callback(args: argparse.Namespace, work_dir: str | os.PathLike,
                   base_params: dict | None = None) -> tuple[Any, Any]:
    """The job queue (started) and the callback, from the listen/demo options (parameter options
    over ``base_params``)."""
    from .export import ExportConfig
    from .launcher import JobQueue
    from .router import CallbackConfig, PtychoCallback

    catalog = args.catalog
    if catalog:
        resolve_catalog(catalog).resolve_api_key()     # a bad catalog or key file is refused now, not per job
    export = ExportConfig(crop=args.crop, energy_kev=args.energy_kev, distance_m=args.distance_m,
                          detectors=tuple(args.detectors),
                          position_fields=tuple(args.positions_from) if args.positions_from else None,
                          scaler=args.scaler or None, frame_wait_s=args.frame_wait,
                          orientation=getattr(args, "orientation", None),
                          data_roots=tuple(args.data_roots) if getattr(args, "data_roots", None) else None)
    pools = args.gpu_pools or None
    base = dict(base_params or {})
    if pools:
        base.setdefault("backend", "auto")
    params = params_from_namespace(args, base)
    following = (getattr(args, "live", False) or getattr(args, "streams", False)
                 or getattr(args, "eiger_stream", None) or getattr(args, "panda_stream", None))
    from hxn_ptycho.mode_count import wants_count
    if following and wants_count(params):
        raise CommandError("--probe-modes auto --auto-rule heldout counts the modes of the finished scan before "
                           "reconstructing it, so it cannot follow scans as they run (--live, --streams, "
                           "--eiger-stream): give --probe-modes N or --auto-rule trend, or drop the live option")
    execution = execution_from_namespace(args, gpus=pools[0].split(",") if pools else None)
    if pools and execution.launcher == "slurm":
        raise CommandError("--gpu-pools is for the local launcher; on Slurm give --slurm-gpus-per-task N")
    config = CallbackConfig(work_dir=str(work_dir), catalog=catalog, params=params.to_dict(),
                            nprocs=execution.ranks, mode=execution.mode, gpus=execution.gpus,
                            force_nprocs=execution.force, launcher=execution.launcher, slurm=execution.slurm,
                            export=export)
    # the jobs only compute: the key stays with the runner, which publishes their outcomes
    # saved documents of failed publishes (WORK/results/*.docs.jsonl) are sent at start and retried
    jobs = JobQueue(Path(work_dir) / "queue", slots=args.slots, max_pending=args.max_pending,
                    gpu_pools=pools, outbox=[Path(work_dir) / "results"],
                    retry_s=float(getattr(args, "retry_publish", 10.0)), catalog=catalog,
                    timeout_s=getattr(args, "time_limit", None)).start()
    return jobs, PtychoCallback(config, jobs)


def build_live_feed(args: argparse.Namespace, cb: Any) -> Any:
    """With ``--live``: the :class:`~.livefeed.LiveFeed` beside the callback ``cb`` (its work folder,
    catalog, parameters, ranks and export), added to the callback's ``live`` feeds (a live job that
    succeeds is the run's one derived run; otherwise the post-stop path runs). None without ``--live``."""
    if not getattr(args, "live", False):
        return None
    from .livefeed import LiveFeed, LiveFeedConfig
    c = cb.config
    feed = LiveFeed(LiveFeedConfig(work_dir=str(c.work_dir), catalog=c.catalog, params=dict(c.params),
                                   nprocs=c.nprocs, export=c.export, first_chunk=args.live_first_chunk,
                                   chunk=args.live_chunk, queue=cb.jobs))
    cb.live.append(feed)
    return feed


def check_listen_options(args: argparse.Namespace) -> None:
    """Before accepting any scan: the work folder writable (and readable by the catalog's server),
    the ranks available on this machine, the catalog reachable with our key — each refusal one line,
    exit status 2, instead of a ``fail`` record for every scan."""
    from .session import check_catalog, check_ranks_available, check_server_reads, check_writable, local_catalog_folder
    work = check_writable(args.work_dir, "work folder (--work-dir)", "give --work-dir a folder you can write")
    if getattr(args, "launcher", "local") != "slurm":     # Slurm ranks run on the cluster's nodes, not here
        check_ranks_available(int(args.nprocs), bool(getattr(args, "force_nprocs", False)))
    if args.catalog:
        check_catalog(args.catalog)
        check_server_reads(args.catalog, {"work folder (--work-dir)": work}, local_catalog_folder(args.catalog))


def cmd_listen(args: argparse.Namespace) -> int:
    """Listen to a document stream; Ctrl-C stops with one line (status 130), SIGTERM quietly (status 0);
    a running job is stopped and queued again for the next start."""
    import asyncio
    _setup_logging(args.verbose)
    if not args.zmq and not args.kafka:
        raise CommandError("give the document stream: --zmq HOST:PORT (0MQ proxy output) or --kafka SERVERS")
    check_listen_options(args)
    from .stream import stream_config_from
    streams = stream_config_from(args)
    if streams is not None:
        from hxn_ptycho.extras import require
        require("stream", "hxn-ptycho listen --eiger-stream")
    jobs, cb = build_callback(args, args.work_dir)
    dispatcher = make_dispatcher(args)
    dispatcher.subscribe(cb)
    feed = build_live_feed(args, cb)    # the callback asks each of cb.live at the stop
    if feed is not None:                # step scans reconstructed while they run (docs/live.md)
        dispatcher.subscribe(feed)
    if streams is not None:            # fly2dpd live from the detector's streams (docs/streams.md)
        from .stream import StreamFeed, StreamFeedConfig
        c = cb.config
        feed = StreamFeed(StreamFeedConfig(work_dir=c.work_dir, catalog=c.catalog, params=dict(c.params),
                                           nprocs=c.nprocs, export=c.export, stream=streams,
                                           queue=cb.jobs)).start()
        dispatcher.subscribe(feed)
        cb.live.append(feed)
    stopped_by: list[int] = []

    def stop(signum: int, _frame: Any) -> None:
        """Stop reading documents, finish exporting what was collected. Ctrl-C: one line, a running job
        queued again, status 130; SIGTERM (a service manager): the running job finishes, status 0."""
        if stopped_by:
            return
        stopped_by.append(signum)
        if signum == signal.SIGINT:
            print(f"hxn-ptycho listen: Ctrl-C: stopping; unfinished jobs stay queued in {Path(jobs.directory).resolve()}",
                  file=sys.stderr, flush=True)
        else:
            log.info("listener stopping (%s)", signal.Signals(signum).name)
        loop = getattr(dispatcher, "loop", None)       # the 0MQ dispatcher runs an asyncio loop here
        if loop is not None and loop.is_running():
            for task in asyncio.all_tasks(loop):     # through the loop's self-pipe: it wakes up now
                loop.call_soon_threadsafe(task.cancel)
        else:
            dispatcher.stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("listening on %s; work folder %s; catalog %s", args.zmq or args.kafka,
             Path(args.work_dir).resolve(), args.catalog or "(none)")
    try:
        dispatcher.start()
    except BaseException as exc:
        if not (stopped_by and isinstance(exc, (asyncio.CancelledError, RuntimeError, KeyboardInterrupt))):
            raise
        with contextlib.suppress(Exception):
            dispatcher.stop()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # the shutdown below is not interrupted half-way
        cb.flush(60)
        for feed in cb.live:
            if hasattr(feed, "close"):     # the stream feed's receivers
                feed.close()
        jobs.stop(kill=bool(stopped_by and stopped_by[0] == signal.SIGINT))
        cb.close()
    return 130 if stopped_by and stopped_by[0] == signal.SIGINT else 0


# -- results --------------------------------------------------------------------------------

def cmd_results(args: argparse.Namespace) -> int:
    """``hxn-ptycho results``: the newest readable reconstruction of a scan (``--uid`` one derived run,
    ``--all`` the list of them); server errors and unreadable runs are one line, never a traceback."""
    from .query import TABLE_HEAD, NoResult, results, summary_png

    if getattr(args, "live", False):
        return _results_live(args)
    chosen = [n for n, v in (("--scan-id", args.scan_id), ("--raw-uid", args.raw_uid), ("--uid", args.uid))
              if v is not None]
    if len(chosen) != 1:
        raise CommandError("give one of --scan-id N, --raw-uid UID or --uid DERIVED_UID"
                           + (f" (got {' and '.join(chosen)})" if chosen else ""))
    if args.all and args.uid is not None:
        raise CommandError("--all lists the reconstructions of a scan: use it with --scan-id or --raw-uid")
    if args.all and args.png:
        raise CommandError("--png draws one reconstruction: pick it with --uid instead of --all")
    qlog = logging.getLogger("hxn_ptycho.callbacks")
    if not qlog.handlers:                       # warnings of the query, one line each on stderr
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("hxn-ptycho results: warning: %(message)s"))
        qlog.addHandler(handler)
        qlog.setLevel(logging.WARNING)
        qlog.propagate = False
    for noisy in ("httpx", "httpcore", "tiled"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        if args.all:
            rows = results(args.catalog, scan_id=args.scan_id, raw_uid=args.raw_uid, all=True)
            if not rows:
                raise NoResult(f"no reconstruction of "
                               f"{'scan_id=' + str(args.scan_id) if args.scan_id is not None else 'raw_uid=' + args.raw_uid}"
                               " in the catalog")
            print(TABLE_HEAD)
            for row in rows:
                print(row.line())
            if args.json:
                print(json.dumps([vars(r) for r in rows], indent=1, default=str))
            return 0
        res = results(args.catalog, scan_id=args.scan_id, raw_uid=args.raw_uid, uid=args.uid)
    except NoResult as exc:
        print(f"hxn-ptycho results: {exc}", file=sys.stderr)
        return 1
    print(res.summary())
    if args.json:
        print(json.dumps({"uid": res.uid, "raw_uid": res.raw_uid, "scan_id": res.scan_id,
                          "exit_status": res.exit_status, "reason": res.reason, "recon": res.recon,
                          "skipped": res.skipped}, indent=1))
    if args.png:
        if not res.ok and not res.interrupted:
            print(f"hxn-ptycho results: no figure, the reconstruction failed: {res.reason}", file=sys.stderr)
            return 1
        print(f"wrote {summary_png(res, args.png)}")
    return 0 if res.ok or res.interrupted else 1


def _results_live(args: argparse.Namespace) -> int:
    """``hxn-ptycho results --live --raw-uid UID``: the live preview of a scan (callbacks/live.py)."""
    from .live import live_preview
    if args.raw_uid is None:
        raise CommandError("--live needs --raw-uid UID (the raw run whose live preview to show)")
    prev = live_preview(args.catalog, raw_uid=args.raw_uid)
    if prev is None:
        print(f"hxn-ptycho results: no live preview of raw_uid={args.raw_uid} in the catalog", file=sys.stderr)
        return 1
    age = time.time() - float(prev.get("written_at") or time.time())
    print(f"live preview of {args.raw_uid}: {int(prev.get('views') or 0)} views, iteration "
          f"{int(prev.get('iteration') or 0)}, data error {float(prev.get('data_error') or float('nan')):.4g}, "
          f"written {age:.1f} s ago")
    if args.json:
        print(json.dumps({k: v for k, v in prev.items() if not hasattr(v, "shape")}, indent=1, default=str))
    if args.png:
        from .live import write_png
        print(f"wrote {write_png(prev, args.png)}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """``hxn-ptycho watch --catalog C``: the live preview on a second screen (callbacks/live.py)."""
    from .live import watch
    return watch(args.catalog, raw_uid=args.raw_uid, png=args.png, interval_s=args.interval,
                 idle_exit_s=args.idle_exit)


# -- reconstruct a stored run ("run uid U of catalog C") -------------------------------------------

def find_stored_run(catalog: Any, *, uid: str | None = None, scan_id: int | None = None) -> Any:
    """The raw run ``uid`` (or scan ``scan_id``) of the catalog, or a :class:`CommandError` naming it."""
    from .catalog import runs
    raw = runs(catalog, "raw")
    key: Any = uid if uid else int(scan_id) if scan_id is not None else None
    if key is None:
        raise CommandError("give the stored run's uid or scan id")
    try:
        return raw[key]
    except KeyError:
        what = f"run {uid}" if uid else f"scan {scan_id}"
        raise CommandError(f"no {what} in the catalog {catalog}") from None


def export_stored_run(raw: Any, export: Any, scan_path: str | os.PathLike) -> Any:
    """THE one read of a stored run: raw run (Tiled client) → scan file at ``scan_path``; returns the
    CollectedRun. Every stored-run path (CLI, Prefect flow) goes through here: the run's documents
    are rebuilt from the catalog's metadata and data sources (:func:`.frames.stored_run`) and its
    frames read from their files by the same export as a live run's, not downloaded."""
    from hxn_ptycho.h5util import FileFormatError
    from hxn_ptycho.scanfile import write_scan

    from .export import ExportError, build_scan
    from .frames import stored_run
    from .query import as_v3
    try:
        run = stored_run(as_v3(raw))
        scan = build_scan(run, export)
        write_scan(scan_path, scan)
    except (ExportError, FileFormatError) as exc:
        raise CommandError(f"cannot build the scan file: {exc}") from None
    return run


def default_result_dir(catalog: Any) -> Path:
    """Where a stored run's result goes without -o: a folder the catalog server reads, when known."""
    cfg = resolve_catalog(catalog)
    if cfg.readable:
        return Path(cfg.readable[0]) / "results"
    return Path.cwd()


def _stored_source(catalog: Any, *, uid: str | None, scan_id: int | None, params: ReconParams | None,
                   execution: Execution | None, output: str | os.PathLike | None, png: str | None,
                   stable: bool = False) -> tuple[Any, JobSpec]:
    """(raw run, job spec without geometry) of run ``uid`` (or scan ``scan_id``) of ``catalog``.

    ``stable`` names the result after the run alone (``result_<scan>_<uid>.h5``): every delivery of
    the same run gets the same result file, hence the same derived-run uid (:func:`.derived.run_uid`);
    otherwise the name carries the time, so a deliberate re-run is a new reconstruction."""
    from hxn_ptycho.spec import Source

    from .catalog import ENV_CATALOG
    from .router import file_stem, int_scan_id
    catalog = catalog if catalog not in (None, "") else os.environ.get(ENV_CATALOG)
    if not catalog:
        raise CommandError(f"no catalog given: pass the catalog or set {ENV_CATALOG}")
    raw = find_stored_run(catalog, uid=uid, scan_id=scan_id)
    start = dict(raw.metadata["start"])
    sid = start.get("scan_id")
    stem = file_stem(sid, str(start["uid"]))
    if not stable:
        stem = f"{stem}_{time.strftime('%Y%m%dT%H%M%S')}_{os.urandom(2).hex()}"
    result = Path(output) if output else default_result_dir(catalog) / f"result_{stem}.h5"
    result = result.resolve()
    spec = JobSpec(params=params or ReconParams(), execution=execution or Execution(),
                   source=Source(scan_file=str(result.with_name(result.stem + "_scan.h5")), result_file=str(result),
                                 raw_uid=start["uid"], scan_id=int_scan_id(sid),
                                 catalog=str(catalog), png=str(Path(png).resolve()) if png else None))
    return raw, spec


def _export_into(raw: Any, spec: JobSpec) -> JobSpec:
    """Refuse an unreadable result folder, write the scan file, take its geometry into ``spec``."""
    from hxn_ptycho.spec import Geometry

    from .derived import check_readable
    from .export import ExportConfig
    check_readable(spec)                                # before any work
    export_stored_run(raw, ExportConfig(), spec.source.scan_file)
    spec.geometry = Geometry.from_scan_file(spec.source.scan_file)
    return spec


def stored_run_spec(catalog: Any, *, uid: str | None = None, scan_id: int | None = None,
                    params: ReconParams | None = None, execution: Execution | None = None,
                    output: str | os.PathLike | None = None, png: str | None = None) -> JobSpec:
    """Read run ``uid`` (or scan ``scan_id``) of ``catalog``, write its scan file, and return the
    job spec — refused up front when the catalog server could not read the result."""
    raw, spec = _stored_source(catalog, uid=uid, scan_id=scan_id, params=params, execution=execution,
                               output=output, png=png)
    return _export_into(raw, spec)


def reconstruct_stored_once(catalog: Any, uid: str, *, params: ReconParams | None = None,
                            execution: Execution | None = None, output: str | os.PathLike | None = None,
                            png: str | None = None, refuse: str | None = None,
                            quiet: bool = True) -> tuple[int, dict, str | None]:
    """Run ``uid`` of ``catalog`` → exactly one derived run, however often it is delivered (the
    Prefect end-of-run flow; Kafka and Prefect both redeliver): (exit status, outcome, derived uid).

    The result file is named after the run (:func:`_stored_source` ``stable``), so every delivery
    publishes under the same uid; deliveries are serialised by an exclusive lock on
    ``<result>.lock``; a run already complete in the catalog is returned as it is, not recomputed.
    A run that cannot be exported (or ``refuse``, a reason not to run it) is recorded as ``fail``.
    """
    import fcntl

    from hxn_ptycho.job import failure_outcome

    from .catalog import runs
    from .derived import publish_outcome, run_state, run_uid
    raw, spec = _stored_source(catalog, uid=uid, scan_id=None, params=params, execution=execution,
                               output=output, png=png, stable=True)
    derived = run_uid(spec)
    lock_path = Path(spec.source.result_file + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:               # a second delivery waits here for the first
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        processed = runs(resolve_catalog(spec.source.catalog), "processed")
        if run_state(processed, derived) == "complete":
            stop = dict(processed[derived].metadata.get("stop") or {})
            ok = stop.get("exit_status") == "success"
            log.info("raw run %s: its derived run %s is already complete (%s): not run again", uid, derived,
                     stop.get("exit_status"))
            outcome = {"status": "success" if ok else "fail", "reason": stop.get("reason"),
                       "result_file": spec.source.result_file if ok else None, "measured": {}}
            return (0 if ok else 1), outcome, derived
        reason = refuse
        if reason is None:
            try:
                _export_into(raw, spec)
            except HxnPtychoError as exc:
                reason = f"cannot be reconstructed: {exc}"
            except Exception as exc:
                log.exception("raw run %s: unexpected error while building the scan file", uid)
                reason = f"cannot build the scan file: {type(exc).__name__}: {exc}"
        if reason is not None:
            outcome = failure_outcome(spec, reason)
            return 1, outcome, publish_outcome(spec, outcome, uid=derived)
        status, outcome, published = reconstruct_stored(spec, quiet=quiet, uid=derived)
        return status, outcome, published


def reconstruct_stored(spec: JobSpec, *, quiet: bool = True, uid: str | None = None) -> tuple[int, dict, str | None]:
    """Run the job of a stored run's spec and publish its outcome (under ``uid`` if given);
    (exit status, outcome, derived uid)."""
    from hxn_ptycho.job import execute

    from .derived import publish_outcome
    from .trust import JOB_ENV_DROPPED
    status, outcome = execute(spec, quiet=quiet, unset=JOB_ENV_DROPPED)   # the job only computes: no catalog key
    derived_uid = publish_outcome(spec, outcome, uid=uid)
    return status, outcome, derived_uid


def reconstruct_from_catalog(args: argparse.Namespace) -> int:
    """``hxn-ptycho reconstruct --scan-id N | --uid U --catalog C``: the stored run → job → derived run."""
    from hxn_ptycho.job import final_line

    from .derived import UnreadableResult, publish_outcome, run_uid

    _setup_logging(False)
    raw, spec = _stored_source(args.catalog, uid=args.uid, scan_id=args.scan_id, params=params_from_namespace(args),
                               execution=execution_from_namespace(args), output=args.output, png=args.png)
    try:
        _export_into(raw, spec)
    except UnreadableResult:
        raise                                        # refused before any work: nothing to record
    except HxnPtychoError as exc:                    # the run cannot be exported: recorded as fail, then said
        derived = publish_outcome(spec, None, reason=f"cannot be reconstructed: {exc}", uid=run_uid(spec))
        raise CommandError(f"{exc} (recorded as the fail derived run {derived})") from None
    status, outcome, derived_uid = reconstruct_stored(spec, quiet=bool(getattr(args, "quiet", False)))
    print(f"derived run {derived_uid} of raw run {spec.source.raw_uid} in {args.catalog}")
    print(final_line(outcome), flush=True)
    return status


# -- demo -----------------------------------------------------------------------------------

def check_demo_options(args: argparse.Namespace) -> None:
    """Before any catalog, job queue or scan: ``--live`` and ``--streams`` each follow one kind of scan,
    and not together (a :class:`CommandError`, exit status 2)."""
    streams, live = bool(getattr(args, "streams", False)), bool(getattr(args, "live", False))
    if streams and live:
        raise CommandError("give --live (a step scan followed through its documents) or --streams (a fly2dpd "
                           "followed through the detector streams), not both")
    if streams and args.scan_type != "fly2dpd":
        raise CommandError("--streams is for --scan-type fly2dpd (the detector streams of a fly scan)")
    if live and args.scan_type not in ("step", "fly2dpd"):
        raise CommandError("--live follows step scans (one event per point) and fly2dpd scans (StreamDatums "
                           "during the scan): give --scan-type step or fly2dpd")


def cmd_demo(args: argparse.Namespace) -> int:
    """Embedded catalog + simulated HXN + RunEngine + callback → a derived run and a summary PNG."""
    _setup_logging(args.verbose)
    check_demo_options(args)
    from bluesky import RunEngine
    from bluesky.preprocessors import SupplementalData

    from .catalog import tiled_writer
    from .query import results, summary_png
    from .sim_beamline import make_hxn, plan_for, simulated_scan

    base = Path(args.dir).resolve()
    server: EmbeddedServer | None = None
    if args.catalog:                           # use the given catalog; start none of our own
        cfg = resolve_catalog(args.catalog)
        key = cfg.resolve_api_key()
        if key:
            os.environ["TILED_API_KEY"] = key
        catalog_cfg: Any = cfg
        det_root = base / "detector"
        if cfg.readable is not None and not any(base == Path(r).resolve() or Path(r).resolve() in base.parents
                                                for r in cfg.readable):
            raise CommandError(f"the catalog server at {cfg.uri} cannot read the demo folder {base}: restart it "
                               f"with 'hxn-ptycho serve --dir DIR --read {base}', or pass --dir inside "
                               f"{', '.join(cfg.readable)}")
    else:
        server = EmbeddedServer(base / "catalog", port=args.port, readable=(str(base),)).start()
        os.environ["TILED_API_KEY"] = server.api_key
        catalog_cfg = server.config
        args.catalog = str(server.directory)
        det_root = server.directory / "detector"
    try:
        if args.data_roots is None:            # the simulated detector writes under the demo folder
            from .trust import data_roots
            args.data_roots = [*map(str, data_roots()), str(det_root)]
        sample, _truth = simulated_scan(args.scan_type, n_positions=args.positions, seed=args.sim_seed,
                                        probe_modes=args.true_modes)
        hxn = make_hxn(det_root)
        from bluesky.utils import PersistentDict
        # RE.md (so scan_id) kept in the demo folder: a second demo there continues the numbering
        RE = RunEngine(PersistentDict(str(base / "md")), call_returns_result=False)
        RE.preprocessors.append(SupplementalData(baseline=hxn.baseline))
        RE.subscribe(tiled_writer(catalog_cfg, "raw", max_array_size=0))
        jobs, cb = build_callback(args, base / "work", base_params={"iterations": 40})
        RE.subscribe(cb)
        md = {"ptycho_crop": sample.scan.n, "sample": "simulated star"}
        plan = plan_for(args.scan_type, hxn, sample, md=md)
        feed: Any = None
        sims = figure = live_png = None
        if getattr(args, "streams", False):    # fly2dpd live from the simulated Eiger and PandA streams
            from .sim_beamline import fly2dpd
            from .sim_streams import SimStreamConfig, SimStreams
            from .stream import StreamConfig, StreamFeed, StreamFeedConfig
            sims = SimStreams(SimStreamConfig(rate=args.stream_rate))
            c = cb.config
            feed = StreamFeed(StreamFeedConfig(
                work_dir=c.work_dir, catalog=c.catalog, params=dict(c.params), nprocs=c.nprocs, export=c.export,
                stream=StreamConfig(eiger=sims.eiger_address, panda=sims.panda_address,
                                    roi=sims.roi(hxn.eiger2.frame_shape), scaler_channel=sims.cfg.scaler_channel,
                                    first_chunk=min(256, max(16, args.positions // 4)), chunk=16),
                queue=cb.jobs)).start()
            RE.subscribe(feed)
            cb.live.append(feed)
            plan = fly2dpd(hxn, sample, md=md, streams=sims)
        elif (feed := build_live_feed(args, cb)) is not None:   # reconstructed while it runs: previews, a live figure
            from .live import LiveFigure
            from .sim_beamline import fly2dpd, step_scan
            RE.subscribe(feed)
            live_png = Path(args.live_png or base / "live.png")
            figure = LiveFigure(feed, png=live_png, say=lambda line: print(line, flush=True))
            RE.subscribe(figure)
            if args.scan_type == "fly2dpd":     # StreamResource/StreamDatum every second (collect_while_completing)
                plan = fly2dpd(hxn, sample, md=md, stream_datum_every_s=args.stream_datum_every,
                               dwell_s=args.dwell)
            else:
                plan = step_scan(hxn, sample, md=md, dwell_s=args.dwell)
            print(f"live: previews drawn to {live_png} (replaced in place) while the scan runs"
                  + (f"; hxn-ptycho watch --catalog {args.catalog} shows them in a window" if args.catalog else ""),
                  flush=True)
        t0 = time.monotonic()
        RE(plan)
        print(f"scan of {args.positions} points done in {time.monotonic() - t0:.1f} s; reconstructing "
              f"({cb.config.params['iterations']} iterations, {args.nprocs} MPI rank(s))...", flush=True)
        cb.flush(args.timeout if feed is not None else 60)
        live_scan = live_result = None          # the live job's files where it is the result
        if sims is not None:
            feed.close()
            sims.close()
            live_uid = next(iter(feed.runs), None)
            facts = feed.runs[live_uid].comparison if live_uid else None
            keys = ("views_written", "missing_ids", "equal", "differences")
            print(f"live from the streams: {json.dumps({k: (facts or {}).get(k) for k in keys})}")
            if not cb.submitted and live_uid is not None:
                raw_uid = live_uid
                live_scan = f"{feed.runs[live_uid].scan_path} (live, from the streams)"
                live_result = str(feed.runs[live_uid].result_path)
        elif feed is not None:
            live_run = next(iter(feed.runs.values()), None)
            if figure is not None:
                figure.close()
            if live_run is not None and live_run.run.uid in feed.took:
                raw_uid = live_run.run.uid
                live_scan = f"{live_run.scan_path} (grown while the scan ran)"
                live_result = f"{live_run.result_path} (the live job's)"
        if live_scan is None:
            if not cb.submitted:
                raise CommandError(f"no job was submitted: {cb.failed}")
            raw_uid = cb.submitted[-1].raw_uid
        if not jobs.wait_idle(args.timeout):
            raise CommandError(f"the reconstruction did not finish within {args.timeout} s; see {base / 'work/queue/logs'}")
        jobs.stop()
        cb.close()
        res = results(catalog_cfg, raw_uid=raw_uid)
        print(res.summary())
        png = summary_png(res, args.png or base / "summary.png", truth=_truth.object) if res.ok else None
        later = (f"hxn-ptycho serve --dir {server.directory} --read {base}  then  " if server else "") + \
            f"hxn-ptycho results --catalog {args.catalog} --scan-id {res.scan_id}"
        if live_scan is not None:               # the live job is the result
            files = (f"scan file:    {live_scan}\nresult file:  {live_result}\n"
                     + (f"live figure:  {live_png}\n" if live_png else ""))
        else:
            job = cb.submitted[-1]
            files = (f"scan file:    {job.scan_file}\nresult file:  {job.result_file}\n"
                     f"job log:      {base / 'work' / 'queue' / 'logs' / (job.id + '.log')}\n")
        print(f"\ncatalog:      {catalog_cfg.uri} (raw scan {res.scan_id}: {raw_uid}; derived run {res.uid})\n"
              f"{files}summary PNG:  {png}\nquery later:  {later}")
        if args.serve and server is not None:
            print(f"serving {server.uri}; Ctrl-C to stop", flush=True)
            _wait_for_signal()
        return 0 if res.ok else 1
    finally:
        if server is not None:
            server.stop()


# -- wiring -----------------------------------------------------------------------------------

def _add_callback_options(p: argparse.ArgumentParser, *, nprocs: int = 1) -> None:
    p.add_argument("--catalog", default=os.environ.get("HXN_PTYCHO_CATALOG"),
                   help="Tiled URL, config file or embedded server folder (default $HXN_PTYCHO_CATALOG); "
                        "API key from $TILED_API_KEY")
    p.add_argument("--detectors", nargs="+", default=["merlin1", "merlin2", "eiger1", "eiger2", "eiger_mobile"])
    p.add_argument("--positions-from", nargs=2, default=None, metavar=("X", "Y"),
                   help="position fields in µm (default: the scan's motors, or its PandA encoders for fly2dpd)")
    p.add_argument("--scaler", default="auto",
                   help="normalisation field (default auto: sclr1_ch3 for ss* scans, else sclr1_ch4; '' for none)")
    p.add_argument("--orientation", default=None,
                   help="detector frame symmetry: 'auto' (the default: decided by the data, the detector's "
                        "documented convention first), 'default' (that convention, no trials), or one forced, "
                        "e.g. 'flipud,x+,y-' ([y, x] indexing) or 'beamline:rot90_cw,x+,y-' (as ptycho_gui names it)")
    p.add_argument("--crop", type=int, default=128, help="frame size around the beam centre")
    p.add_argument("--energy-kev", type=float, help="explicit energy (default: from dcm_th in the baseline)")
    p.add_argument("--distance-m", type=float, help="detector distance when the metadata has none")
    p.add_argument("--slots", type=int, default=1, help="jobs at a time (one per GPU pool)")
    p.add_argument("--max-pending", type=int, default=1000, help="bound of the job queue")
    p.add_argument("--gpu-pools", nargs="*", metavar="IDS",
                   help="GPU pools, e.g. 0,1 2,3: one job at a time on each (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--frame-wait", type=float, default=5.0,
                   help="seconds to wait for detector frames still being written (default 5)")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="end a job after S seconds and record it as failed (default: 900 s + 0.05 s per view "
                        "and iteration)")
    p.add_argument("--data-roots", nargs="+", default=None, metavar="DIR",
                   help="read detector files only under these folders (default: /data, /nsls2/data and "
                        "$HXN_PTYCHO_DATA_ROOTS)")
    p.add_argument("--live", action="store_true",
                   help="reconstruct step scans (and fly2dpd scans that send StreamDatums) while they run: a live "
                        "job per scan follows a growing scan file "
                        "and publishes previews; its result is the run's derived run (docs/live.md)")
    p.add_argument("--live-first-chunk", type=int, default=256, metavar="N",
                   help="--live: events before the first export, whose decisions (centre, orientation) are kept")
    p.add_argument("--live-chunk", type=int, default=32, metavar="N", help="--live: events between later exports")
    p.add_argument("-v", "--verbose", action="store_true")
    add_execution_options(p, nprocs=nprocs)
    add_param_options(p)


def _guarded(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except HxnPtychoError as exc:
            print(f"hxn-ptycho {args.verb}: error: {exc}", file=sys.stderr)
            return exc.exit_status
    return run


def add_commands(subparsers: Any) -> None:
    """Add ``serve``, ``listen``, ``demo`` and ``results`` to the ``hxn-ptycho`` command."""
    p = subparsers.add_parser("serve", help="run a local Tiled catalog (SQLite) on 127.0.0.1")
    p.add_argument("--dir", default="hxn_ptycho_catalog", help="catalog folder (database, data, key, config)")
    p.add_argument("--port", type=int, help="port (default: a free one)")
    p.add_argument("--database", help="a PostgreSQL URI instead of the folder's SQLite file")
    p.add_argument("--read", nargs="*", help="further folders the server may read (detector files)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_guarded(cmd_serve))

    p = subparsers.add_parser("listen", help="reconstruct every ptychography scan from a 0MQ/Kafka document stream")
    p.add_argument("--zmq", help="0MQ proxy output, HOST:PORT")
    p.add_argument("--kafka", help="Kafka bootstrap servers (needs bluesky-kafka)")
    p.add_argument("--topic", default="hxn.bluesky.runengine.documents")
    p.add_argument("--group-id", default="hxn-ptycho")
    p.add_argument("--work-dir", default="hxn_ptycho_work", help="scan files, results, the job queue")
    p.add_argument("--retry-publish", type=float, default=10.0, metavar="S",
                   help="seconds between retries of derived runs the catalog could not take (default 10)")
    _add_callback_options(p)
    from .stream import add_stream_options
    add_stream_options(p)
    p.set_defaults(func=_guarded(cmd_listen))

    p = subparsers.add_parser("demo", help="simulated scan → RunEngine → callback → reconstruction → catalog")
    p.add_argument("--dir", default="hxn_ptycho_demo")
    p.add_argument("--port", type=int)
    p.add_argument("--sim-seed", type=int, default=1, help="seed of the simulated sample and noise")
    p.add_argument("--true-modes", type=int, default=1, help="probe modes of the simulated beam")
    p.add_argument("--scan-type", choices=["fly2dpd", "step", "FlyPlan2D"], default="fly2dpd",
                   help="simulated HXN scan: fly2dpd (eiger2 + PandA + SIS, default), step (eiger1), "
                        "FlyPlan2D (merlin1)")
    p.add_argument("--png", help="summary figure (default DIR/summary.png)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--serve", action="store_true", help="keep the catalog running afterwards")
    _add_callback_options(p, nprocs=2)
    p.set_defaults(func=_guarded(cmd_demo), crop=64)
    p.add_argument("--points", dest="positions", type=int, default=100, help="scan positions")
    p.add_argument("--streams", action="store_true", help="fly2dpd live: the simulated Eiger and PandA also send "
                   "their 0MQ streams, which the stream feed reconstructs while the scan runs (docs/streams.md)")
    p.add_argument("--stream-rate", type=float, default=200.0, help="frames a second on the streams (default 200)")
    p.add_argument("--dwell", type=float, default=0.05, help="--live: seconds at each point of the scan")
    p.add_argument("--stream-datum-every", type=float, default=1.0, metavar="S",
                   help="--live --scan-type fly2dpd: seconds between the flyer's StreamDatum documents (default 1)")
    p.add_argument("--live-png", help="--live: the live figure, replaced in place (default DIR/live.png)")

    p = subparsers.add_parser("results", help="the reconstruction(s) of a stored scan",
                              description="The newest readable reconstruction of a scan (a derived run the "
                                          "server cannot read is skipped, saying why), one derived run "
                                          "(--uid), or the list of them (--all).")
    p.add_argument("--catalog", default=os.environ.get("HXN_PTYCHO_CATALOG"),
                   help="Tiled URL, config file or embedded server folder (default $HXN_PTYCHO_CATALOG)")
    p.add_argument("--scan-id", type=int, help="the raw scan's scan_id (a duplicate warns, naming the uids)")
    p.add_argument("--raw-uid", help="the raw scan's uid")
    p.add_argument("--uid", help="one derived run (full uid or its first ≥ 5 characters)")
    p.add_argument("--all", action="store_true",
                   help="list every reconstruction of the scan: uid, time, status, data error, key parameters")
    p.add_argument("--png", help="write the summary figure of that reconstruction")
    p.add_argument("--json", action="store_true", help="also print the start metadata (or the list) as JSON")
    p.add_argument("--live", action="store_true", help="the live preview of a scan being reconstructed "
                   "(with --raw-uid): views, iteration, data error, age; --png draws it")
    p.set_defaults(func=_guarded(cmd_results))

    p = subparsers.add_parser("watch", help="the live preview of a scan being reconstructed (a window, or --png)",
                              description="Redraw the live preview (object phase, probe, views, data error) "
                                          "of a scan whenever it changes: in a window, or a PNG replaced in place.")
    p.add_argument("--catalog", default=os.environ.get("HXN_PTYCHO_CATALOG"),
                   help="Tiled URL, config file or embedded server folder (default $HXN_PTYCHO_CATALOG)")
    p.add_argument("--raw-uid", help="the raw scan's uid (default: the newest live preview)")
    p.add_argument("--png", help="write this PNG (replaced in place) instead of opening a window")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between looks at the catalog")
    p.add_argument("--idle-exit", type=float, help="end after this many seconds without a new preview")
    p.set_defaults(func=_guarded(cmd_watch))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hxn_ptycho.callbacks.commands")
    sub = parser.add_subparsers(dest="verb", required=True)
    add_commands(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
