"""The ``hxn-ptycho`` command: simulate, reconstruct (one process or ``--nprocs`` MPI ranks), and
the Bluesky verbs (serve, listen, demo, results) added by :mod:`hxn_ptycho.callbacks.commands`.

Bad input exits with status 2 and a one-line message naming the problem.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import BadInput, HxnPtychoError
from .job import execute, final_line
from .params import add_param_options, params_from_namespace
from .scanfile import scan_info
from .spec import Geometry, JobSpec, Source, add_execution_options, execution_from_namespace


class UsageError(BadInput):
    """Bad command-line input: exit status 2 with the message."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument gives one line naming it (no usage dump), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _probe_modes(text: str) -> int | str:
    """A positive integer, or 'auto'."""
    return "auto" if text == "auto" else _positive_int(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="write a synthetic HXN scan file (with its truth)",
                       description="Simulate a paper-like ptychography scan and write it as an HXN scan file.")
    p.add_argument("output", help="scan file to write (OUT.h5)")
    p.add_argument("--size", type=_positive_int, default=64, help="frame size n (default 64)")
    p.add_argument("--positions", type=_positive_int, default=200, help="number of views (default 200)")
    p.add_argument("--probe-modes", type=_positive_int, default=1,
                   help="K > 1 simulates a fly-scan blur as an incoherent mixture of K modes")
    p.add_argument("--photons", type=float, default=1e6, help="mean photons per frame, Poisson noise (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pattern", choices=("spiral", "raster"), default="spiral")
    p.add_argument("--dead-pixels", type=float, default=0.0, help="fraction of masked detector pixels")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import simulate_scan, write_simulation
    scan, truth = simulate_scan(n=args.size, n_positions=args.positions, probe_modes=args.probe_modes,
                                photons=args.photons or None, seed=args.seed, pattern=args.pattern,
                                dead_pixels=args.dead_pixels)
    write_simulation(args.output, scan, truth)
    print(f"wrote {args.output}: {scan.n_views} views of {scan.n}x{scan.n}, {args.probe_modes} mode(s), "
          f"object pixel {scan.pixel_size_m * 1e9:.2f} nm")
    return 0


def add_reconstruct(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reconstruct", help="reconstruct a scan file, or a stored run of a catalog",
                       description="Reconstruct an HXN scan file, or a stored run (--scan-id N or --uid U with "
                                   "--catalog C), with the multi-mode Difference Map. Every reconstruction "
                                   "parameter is an option; the last line gives the final data error, cost and time.")
    p.add_argument("scan", nargs="?", help="HXN scan file (scan_<N>.h5)")
    p.add_argument("-o", "--output", help="result file to write (default: <scan>_recon.h5; for a stored run "
                                          "result_<scan id>_<uid>.h5 in the catalog's folder)")
    p.add_argument("--png", help="write a summary figure")
    p.add_argument("--scan-id", type=int, help="reconstruct the stored scan N of --catalog instead of a file")
    p.add_argument("--uid", help="reconstruct the stored run with this uid of --catalog")
    p.add_argument("--catalog", help="Tiled catalog (URL, config file or server folder): with --scan-id/--uid, "
                                     "or to publish the derived run of a file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_execution_options(p)
    add_param_options(p)
    p.set_defaults(func=cmd_reconstruct)


def cmd_reconstruct(args: argparse.Namespace) -> int:
    if args.scan_id is not None or args.uid:
        if not args.catalog:
            raise UsageError(f"{'--scan-id' if args.scan_id is not None else '--uid'} needs --catalog "
                             "(the Tiled catalog that holds the scan)")
        if args.scan:
            raise UsageError("give a scan file or a stored run (--scan-id/--uid), not both")
        from hxn_ptycho.callbacks.commands import reconstruct_from_catalog
        return reconstruct_from_catalog(args)
    if not args.scan:
        raise UsageError("give a scan file, or --scan-id N (or --uid U) with --catalog")
    if not os.path.exists(args.scan):
        raise UsageError(f"scan file not found: {args.scan}")
    params = params_from_namespace(args)
    geometry = Geometry.from_scan_file(args.scan)
    output = args.output or str(Path(args.scan).with_suffix("")) + "_recon.h5"
    attrs = scan_info(args.scan)["attrs"]
    raw_uid, scan_id = attrs.get("raw_uid"), attrs.get("scan_id")
    source = Source(scan_file=os.path.abspath(args.scan), result_file=os.path.abspath(output),
                    raw_uid=str(raw_uid) if raw_uid else None,
                    scan_id=int(scan_id) if scan_id is not None and int(scan_id) >= 0 else None,
                    catalog=str(args.catalog) if args.catalog else None,
                    png=os.path.abspath(args.png) if args.png else None)
    spec = JobSpec(params=params, geometry=geometry, execution=execution_from_namespace(args), source=source)
    publish = None
    if args.catalog:
        from hxn_ptycho.callbacks.derived import check_readable, publish_outcome
        check_readable(spec)                         # refused up front if the server could not read the result
        publish = publish_outcome
    status, outcome = execute(spec, quiet=args.quiet)
    if publish is not None:
        uid = publish(spec, outcome)
        print(f"derived run {uid} in {args.catalog}")
    print(final_line(outcome), flush=True)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="hxn-ptycho", description="Multi-mode Difference Map ptychography "
                                     "for the NSLS-II HXN beamline.")
    parser.add_argument("--version", action="version", version=f"hxn-ptycho {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    add_simulate(sub)
    add_reconstruct(sub)
    try:
        from hxn_ptycho.callbacks.commands import add_commands
    except ImportError:
        pass
    else:
        add_commands(sub)
    return parser


#: the verbs of the Bluesky layer (``[beamline]`` extra; see hxn_ptycho/extras.py)
BEAMLINE_VERBS = ("serve", "listen", "demo", "results", "watch")


def check_extras(args: argparse.Namespace) -> None:
    """Refuse up front, naming the extra, a command that this install cannot run."""
    from .extras import require
    if args.verb in BEAMLINE_VERBS:
        require("beamline", f"hxn-ptycho {args.verb}")
    elif args.verb == "reconstruct":
        if getattr(args, "catalog", None) or getattr(args, "scan_id", None) is not None or getattr(args, "uid", None):
            require("beamline", "hxn-ptycho reconstruct --catalog/--scan-id/--uid")
        if getattr(args, "png", None):
            require("plots", "hxn-ptycho reconstruct --png")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_extras(args)
        return int(args.func(args) or 0)
    except HxnPtychoError as exc:                # the one error root: its exit status, one line
        print(f"hxn-ptycho {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
