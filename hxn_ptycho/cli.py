"""The ``hxn-ptycho`` command: simulate, reconstruct (one process or ``--nprocs`` MPI ranks), and
the Bluesky verbs (serve, listen, demo, results) added by :mod:`hxn_ptycho.callbacks.commands`.

Bad input exits with status 2 and a one-line message naming the problem.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .backend import BackendError
from .h5util import FileFormatError
from .job import LauncherNotFound
from .params import ParamError, ReconParams
from .errors import BadInput


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
    d = ReconParams()
    p = sub.add_parser("reconstruct", help="reconstruct a scan file with the multi-mode Difference Map",
                       description="Reconstruct an HXN scan file (or a stored scan, with --scan-id and --catalog).")
    p.add_argument("scan", nargs="?", help="HXN scan file (scan_<N>.h5)")
    p.add_argument("-o", "--output", help="result file to write (default: <scan>_recon.h5)")
    p.add_argument("--iterations", type=_positive_int, default=d.iterations)
    p.add_argument("--probe-modes", type=_probe_modes, default=d.probe_modes, help="an integer, or 'auto' (1 %% rule)")
    p.add_argument("--object-modes", type=_positive_int, default=d.object_modes)
    p.add_argument("--beta", type=float, default=d.beta, help="DM relaxation β (default %(default)s)")
    p.add_argument("--precision", choices=("single", "double"), default=d.precision)
    p.add_argument("--init-from", help="previous result file to start from (warm start)")
    p.add_argument("--png", help="write a summary figure")
    p.add_argument("--nprocs", type=_positive_int, default=1, help="MPI ranks (mpiexec -n K); 1 runs in-process")
    p.add_argument("--threads", type=_positive_int, help="FFT threads per rank (default: cores / ranks)")
    p.add_argument("--mode", choices=("sync", "async"), default="sync", help="MPI scheme (default sync)")
    p.add_argument("--backend", choices=("numpy", "cupy", "auto"), default=d.backend)
    p.add_argument("--batch-size", type=_positive_int, help="views per batch (default: from the memory bound)")
    p.add_argument("--max-memory-gb", type=float, default=d.max_memory_gb)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--scan-id", type=int, help="reconstruct a stored scan from --catalog instead of a file")
    p.add_argument("--catalog", help="Tiled catalog URL (with --scan-id, or to publish the derived run)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_reconstruct)


def params_from_args(args: argparse.Namespace) -> ReconParams:
    return ReconParams(iterations=args.iterations, probe_modes=args.probe_modes, object_modes=args.object_modes,
                       beta=args.beta, precision=args.precision, init_from=args.init_from, threads=args.threads,
                       backend=args.backend, batch_size=args.batch_size, max_memory_gb=args.max_memory_gb,
                       seed=args.seed)


def cmd_reconstruct(args: argparse.Namespace) -> int:
    if args.scan_id is not None:
        if not args.catalog:
            raise UsageError("--scan-id needs --catalog (the Tiled catalog that holds the scan)")
        from hxn_ptycho.callbacks.commands import reconstruct_from_catalog
        return reconstruct_from_catalog(args)
    if not args.scan:
        raise UsageError("give a scan file, or --scan-id with --catalog")
    if not os.path.exists(args.scan):
        raise UsageError(f"scan file not found: {args.scan}")
    params = params_from_args(args)
    output = args.output or str(Path(args.scan).with_suffix("")) + "_recon.h5"
    from .distributed import launched_by_mpi
    from .job import job_argv, main as job_main
    nprocs = args.nprocs if not launched_by_mpi() else 1     # a launched job never launches another
    argv = job_argv(args.scan, output, params.to_json(), nprocs=nprocs, mode=args.mode, png=args.png,
                    catalog=args.catalog, quiet=args.quiet)
    if nprocs > 1:
        status = subprocess.run(argv, check=False).returncode
    else:
        status = job_main(argv[3:])
    if status == 0:
        print(f"wrote {output}" + (f" and {args.png}" if args.png else ""))
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, FileFormatError, ParamError, BackendError, LauncherNotFound) as exc:
        print(f"hxn-ptycho {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
