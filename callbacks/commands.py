"""The Bluesky/Tiled verbs of ``hxn-ptycho``: ``serve``, ``listen``, ``demo``, ``results``.

``hxn_ptycho/cli.py`` calls :func:`add_commands`; ``hxn-ptycho reconstruct --scan-id N --catalog C``
calls :func:`reconstruct_from_catalog`. ``python -m hxn_ptycho.callbacks.commands VERB`` works too.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .catalog import CatalogError, EmbeddedServer, resolve_catalog

log = logging.getLogger("hxn_ptycho.callbacks")


class CommandError(RuntimeError):
    """A verb cannot do what was asked; the message says why."""


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "bluesky", "ophyd", "tiled", "numexpr", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        stop.wait(0.5)


# -- serve ----------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    server = EmbeddedServer(args.dir, port=args.port, database=args.database, readable=tuple(args.read or ()))
    server.start()
    cfg_path = server.directory / "catalog.json"
    print(f"Tiled catalog: {server.uri}  (containers 'raw' and 'processed')\n"
          f"config:        {cfg_path}   (use --catalog {server.directory})\n"
          f"API key file:  {server.directory / 'api_key'}   (or: export TILED_API_KEY=$(cat {server.directory / 'api_key'}))\n"
          f"log:           {server.log_file}\nPress Ctrl-C to stop.", flush=True)
    try:
        _wait_for_signal()
    finally:
        server.stop()
    return 0


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


def build_callback(args: argparse.Namespace, work_dir: str | os.PathLike) -> tuple[Any, Any]:
    """The job queue (started) and the callback, from the listen/demo options."""
    from .export import ExportConfig
    from .launcher import JobQueue
    from .router import CallbackConfig, PtychoCallback, job_failure_recorder

    catalog = args.catalog
    env = {}
    if catalog:
        key = resolve_catalog(catalog).resolve_api_key()
        if key:
            env["TILED_API_KEY"] = key
    export = ExportConfig(crop=args.crop, energy_kev=args.energy_kev, distance_m=args.distance_m,
                          detectors=tuple(args.detectors),
                          position_fields=tuple(args.positions_from) if args.positions_from else None,
                          scaler=args.scaler or None, frame_wait_s=args.frame_wait,
                          orientation=getattr(args, "orientation", None))
    params = {"iterations": args.iterations, "probe_modes": args.probe_modes}
    pools = args.gpu_pools or None
    jobs = JobQueue(Path(work_dir) / "queue", slots=args.slots, max_pending=args.max_pending, env=env,
                    on_failure=job_failure_recorder(catalog), gpu_pools=pools).start()
    if pools:
        params["backend"] = "auto"
    cb = PtychoCallback(CallbackConfig(work_dir=str(work_dir), catalog=catalog, params=params,
                                       nprocs=args.nprocs, export=export,
                                       gpus=len(pools[0].split(",")) if pools else 0), jobs)
    return jobs, cb


def cmd_listen(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    if not args.zmq and not args.kafka:
        raise CommandError("give the document stream: --zmq HOST:PORT (0MQ proxy output) or --kafka SERVERS")
    jobs, cb = build_callback(args, args.work_dir)
    dispatcher = make_dispatcher(args)
    dispatcher.subscribe(cb)

    def stop(*_: Any) -> None:
        log.info("listener stopping")
        dispatcher.stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("listening on %s; work folder %s; catalog %s", args.zmq or args.kafka,
             Path(args.work_dir).resolve(), args.catalog or "(none)")
    try:
        dispatcher.start()
    finally:
        cb.flush(60)
        jobs.stop(kill=False)
        cb.close()
    return 0


# -- results --------------------------------------------------------------------------------

def cmd_results(args: argparse.Namespace) -> int:
    from .query import NoResult, results, summary_png

    if (args.scan_id is None) == (args.raw_uid is None):
        raise CommandError("give --scan-id N or --raw-uid UID")
    try:
        res = results(args.catalog, scan_id=args.scan_id, raw_uid=args.raw_uid)
    except NoResult as exc:
        print(f"hxn-ptycho results: {exc}", file=sys.stderr)
        return 1
    print(res.summary())
    if args.json:
        print(json.dumps({"uid": res.uid, "raw_uid": res.raw_uid, "scan_id": res.scan_id,
                          "exit_status": res.exit_status, "reason": res.reason, "recon": res.recon}, indent=1))
    if args.png:
        if not res.ok:
            print(f"hxn-ptycho results: no figure, the reconstruction failed: {res.reason}", file=sys.stderr)
            return 1
        print(f"wrote {summary_png(res, args.png)}")
    return 0 if res.ok else 1


# -- reconstruct a stored scan ----------------------------------------------------------------

def collected_from_catalog(raw: Any, detectors: tuple[str, ...] = (), position_fields: tuple[str, ...] = (),
                           scaler: str | None = None) -> tuple[Any, Any]:
    """A stored raw run (Tiled client) → (CollectedRun, None): the run's documents rebuilt from its
    metadata and data sources (frames are read from the files by ``build_scan``, not downloaded).
    The extra arguments are accepted for compatibility and unused (the export's defaults decide)."""
    from .frames import stored_run
    from .query import as_v3
    return stored_run(as_v3(raw)), None


def reconstruct_from_catalog(args: argparse.Namespace) -> int:
    """``hxn-ptycho reconstruct --scan-id N --catalog C``: export the stored run, run the job, publish."""
    from hxn_ptycho.params import ReconParams
    from hxn_ptycho.scanfile import write_scan

    from .catalog import runs
    from .export import ExportConfig, ExportError, build_scan
    from .launcher import mpiexec_path
    from .query import results, summary_png

    _setup_logging(False)
    try:
        cfg = resolve_catalog(args.catalog)
        raw = runs(cfg, "raw")[int(args.scan_id)]
    except KeyError:
        print(f"hxn-ptycho reconstruct: no scan {args.scan_id} in the catalog {args.catalog}", file=sys.stderr)
        return 1
    except CatalogError as exc:
        print(f"hxn-ptycho reconstruct: {exc}", file=sys.stderr)
        return 2
    export = ExportConfig()
    try:
        run, frames = collected_from_catalog(raw, export.detectors, export.position_fields, export.scaler)
        scan = build_scan(run, export, frames=frames)
    except ExportError as exc:
        print(f"hxn-ptycho reconstruct: {exc}", file=sys.stderr)
        return 2
    output = Path(args.output or f"result_{args.scan_id}_{run.uid[:8]}.h5").resolve()
    scan_path = output.with_name(output.stem + "_scan.h5")
    write_scan(scan_path, scan)
    params = ReconParams(iterations=args.iterations, probe_modes=args.probe_modes, object_modes=args.object_modes,
                         beta=args.beta, precision=args.precision)
    argv = [sys.executable, "-m", "hxn_ptycho.job", str(scan_path), "-o", str(output), "--params", params.to_json(),
            "--catalog", str(args.catalog), "--raw-uid", run.uid]
    if getattr(args, "quiet", False):
        argv.append("--quiet")
    if args.nprocs > 1:
        argv = [mpiexec_path(), "-n", str(args.nprocs)] + argv
    env = dict(os.environ)
    key = cfg.resolve_api_key()
    if key:
        env["TILED_API_KEY"] = key
    status = subprocess.run(argv, env=env, check=False).returncode
    if status != 0:
        print(f"hxn-ptycho reconstruct: the job failed (exit status {status}); its failure is recorded "
              f"in the catalog", file=sys.stderr)
        return status
    res = results(cfg, raw_uid=run.uid)
    print(res.summary())
    print(f"wrote {output}")
    if args.png:
        print(f"wrote {summary_png(res, args.png)}")
    return 0


# -- demo -----------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    """Embedded catalog + simulated HXN + RunEngine + callback → a derived run and a summary PNG."""
    _setup_logging(args.verbose)
    from bluesky import RunEngine
    from bluesky.preprocessors import SupplementalData

    from .catalog import tiled_writer
    from .query import results, summary_png
    from .sim_beamline import make_hxn, plan_for, simulated_scan

    base = Path(args.dir).resolve()
    server = EmbeddedServer(base / "catalog", port=args.port, readable=(str(base),)).start()
    os.environ["TILED_API_KEY"] = server.api_key
    try:
        sample, _truth = simulated_scan(args.scan_type, n_positions=args.positions, seed=args.seed,
                                        probe_modes=args.true_modes)
        hxn = make_hxn(server.directory / "detector")
        RE = RunEngine({}, call_returns_result=False)
        RE.preprocessors.append(SupplementalData(baseline=hxn.baseline))
        RE.subscribe(tiled_writer(server.config, "raw", max_array_size=0))
        args.catalog = str(server.directory)
        jobs, cb = build_callback(args, base / "work")
        RE.subscribe(cb)
        t0 = time.monotonic()
        RE(plan_for(args.scan_type, hxn, sample, md={"ptycho_crop": sample.scan.n, "sample": "simulated star"}))
        print(f"scan of {args.positions} points done in {time.monotonic() - t0:.1f} s; reconstructing "
              f"({args.iterations} iterations, {args.nprocs} MPI rank(s))...", flush=True)
        cb.flush(60)
        if not cb.submitted:
            raise CommandError(f"no job was submitted: {cb.failed}")
        raw_uid = cb.submitted[-1].raw_uid
        if not jobs.wait_idle(args.timeout):
            raise CommandError(f"the reconstruction did not finish within {args.timeout} s; see {base / 'work/queue/logs'}")
        jobs.stop()
        cb.close()
        res = results(server.config, raw_uid=raw_uid)
        print(res.summary())
        png = summary_png(res, args.png or base / "summary.png") if res.ok else None
        job = cb.submitted[-1]
        print(f"\ncatalog:      {server.uri} (raw scan {res.scan_id}: {raw_uid}; derived run {res.uid})\n"
              f"scan file:    {job.scan_file}\nresult file:  {job.result_file}\n"
              f"summary PNG:  {png}\njob log:      {base / 'work' / 'queue' / 'logs' / (job.id + '.log')}\n"
              f"query later:  hxn-ptycho serve --dir {server.directory} --read {base}  then  "
              f"hxn-ptycho results --catalog {server.directory} --scan-id {res.scan_id}")
        if args.serve:
            print(f"serving {server.uri}; Ctrl-C to stop", flush=True)
            _wait_for_signal()
        return 0 if res.ok else 1
    finally:
        server.stop()


# -- wiring -----------------------------------------------------------------------------------

def _add_callback_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", default=os.environ.get("HXN_PTYCHO_CATALOG"),
                   help="Tiled URL, config file or embedded server folder (default $HXN_PTYCHO_CATALOG); "
                        "API key from $TILED_API_KEY")
    p.add_argument("--detectors", nargs="+", default=["merlin1", "merlin2", "eiger1", "eiger2", "eiger_mobile"])
    p.add_argument("--positions-from", nargs=2, default=None, metavar=("X", "Y"),
                   help="position fields in µm (default: the scan's motors, or its PandA encoders for fly2dpd)")
    p.add_argument("--scaler", default="auto",
                   help="normalisation field (default auto: sclr1_ch3 for ss* scans, else sclr1_ch4; '' for none)")
    p.add_argument("--orientation", default=None,
                   help="detector orientation, e.g. 'rot90_cw,x-,y-', or 'auto' (default: the detector's own)")
    p.add_argument("--crop", type=int, default=128, help="frame size around the beam centre")
    p.add_argument("--energy-kev", type=float, help="explicit energy (default: from dcm_th in the baseline)")
    p.add_argument("--distance-m", type=float, help="detector distance when the metadata has none")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--probe-modes", default=1, type=lambda s: s if s == "auto" else int(s))
    p.add_argument("--nprocs", type=int, default=1, help="MPI ranks per job")
    p.add_argument("--slots", type=int, default=1, help="jobs at a time (one per GPU pool)")
    p.add_argument("--max-pending", type=int, default=1000, help="bound of the job queue")
    p.add_argument("--gpu-pools", nargs="*", metavar="IDS",
                   help="GPU pools, e.g. 0,1 2,3: one job at a time on each (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--frame-wait", type=float, default=5.0,
                   help="seconds to wait for detector frames still being written (default 5)")
    p.add_argument("-v", "--verbose", action="store_true")


def _guarded(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (CommandError, CatalogError) as exc:
            print(f"hxn-ptycho {args.verb}: error: {exc}", file=sys.stderr)
            return 2
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
    _add_callback_options(p)
    p.set_defaults(func=_guarded(cmd_listen))

    p = subparsers.add_parser("demo", help="simulated scan → RunEngine → callback → reconstruction → catalog")
    p.add_argument("--dir", default="hxn_ptycho_demo")
    p.add_argument("--port", type=int)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--true-modes", type=int, default=1, help="probe modes of the simulated beam")
    p.add_argument("--scan-type", choices=["fly2dpd", "step", "FlyPlan2D"], default="fly2dpd",
                   help="simulated HXN scan: fly2dpd (eiger2 + PandA + SIS, default), step (eiger1), "
                        "FlyPlan2D (merlin1)")
    p.add_argument("--png", help="summary figure (default DIR/summary.png)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--serve", action="store_true", help="keep the catalog running afterwards")
    _add_callback_options(p)
    p.set_defaults(func=_guarded(cmd_demo), crop=64, iterations=40, nprocs=2)
    p.add_argument("--points", dest="positions", type=int, default=100, help="scan positions")

    p = subparsers.add_parser("results", help="the reconstruction of a stored scan")
    p.add_argument("--catalog", default=os.environ.get("HXN_PTYCHO_CATALOG"))
    p.add_argument("--scan-id", type=int)
    p.add_argument("--raw-uid")
    p.add_argument("--png", help="write a summary figure")
    p.add_argument("--json", action="store_true", help="also print the start metadata as JSON")
    p.set_defaults(func=_guarded(cmd_results))


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
