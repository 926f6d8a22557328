"""``python -m hxn_ptycho.job SCAN.h5 -o RESULT.h5``: what each process of a reconstruction runs.

Started once (one process) or by an MPI launcher (``mpiexec``/``srun``: one per rank). Each
rank reads only its own share of the frames, runs the engine with the MPI reducer, and rank 0
writes the result file (temporary name, then rename) and, when ``--catalog`` is given,
publishes the derived run — or a failed one with the reason.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import traceback
from typing import Any, Sequence

from . import __version__
from .backend import BackendError
from .h5util import FileFormatError
from .params import ParamError, ReconParams
from .errors import BadInput, HxnPtychoError


class JobError(HxnPtychoError):
    """A reconstruction job failed; the message says why (and on which rank)."""


class LauncherNotFound(BadInput, FileNotFoundError):
    """Several processes were asked for, but there is no ``mpiexec``."""


def find_mpiexec() -> str:
    """``mpiexec`` beside this Python (the mpich wheel's), else on PATH; a clear error if none."""
    import shutil
    from pathlib import Path
    here = Path(sys.executable).with_name("mpiexec")
    if here.exists():
        return str(here)
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise LauncherNotFound("several processes need an MPI launcher but no 'mpiexec' was found beside "
                               f"{sys.executable} nor on PATH (pip install mpich, or load your facility's MPI module)")
    return found


def job_argv(scan: str, output: str, params_json: str, *, nprocs: int = 1, mode: str = "sync",
             png: str | None = None, catalog: str | None = None, raw_uid: str | None = None,
             quiet: bool = False, mpiexec: str | None = None) -> list[str]:
    """The job's argument list (never a shell string): ``[mpiexec -n K] python -m hxn_ptycho.job SCAN -o OUT ...``."""
    argv = [sys.executable, "-m", "hxn_ptycho.job", str(scan), "-o", str(output), "--params", params_json,
            "--mode", mode]
    for flag, value in (("--png", png), ("--catalog", catalog), ("--raw-uid", raw_uid)):
        if value:
            argv.append(f"{flag}={value}")      # one word: a value starting with '-' is not read as an option
    if quiet:
        argv.append("--quiet")
    if nprocs > 1:
        argv = [mpiexec or find_mpiexec(), "-n", str(int(nprocs))] + argv
    return argv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hxn_ptycho.job", description=__doc__.splitlines()[0])
    p.add_argument("scan", help="HXN scan file (scan_<N>.h5)")
    p.add_argument("-o", "--output", required=True, help="result file to write")
    p.add_argument("--params", default="{}", help="reconstruction parameters as JSON (ReconParams fields)")
    p.add_argument("--mode", choices=("sync", "async"), default="sync",
                   help="sync: reduce + broadcast every iteration (default); async: regions stitched at the end")
    p.add_argument("--png", help="also write a summary figure")
    p.add_argument("--catalog", help="Tiled catalog (URL) to publish the derived run to; key from $TILED_API_KEY")
    p.add_argument("--raw-uid", help="uid of the raw run this reconstruction derives from")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def recon_summary(params: ReconParams, scan_info: dict[str, Any], size: int, mode: str,
                  result: Any = None) -> dict[str, Any]:
    """Everything about the run that belongs in the derived run's ``recon`` dict."""
    out = dict(params.to_dict())
    attrs = getattr(result, "attrs", {}) or {}
    backend = attrs.get("backend", params.backend)
    out.update({"ranks": size, "mode": mode, "hxn_ptycho_version": __version__, "host": socket.gethostname(),
                "scan_file": os.path.abspath(scan_info.get("path", "")), "n_views": scan_info.get("n_views"),
                "frame_size": scan_info.get("n"), "backend": backend,
                "gpus": size if backend == "cupy" else 0,
                "scan_id": (scan_info.get("attrs") or {}).get("scan_id")})
    if "probe_modes_used" in attrs:
        out["probe_modes_used"] = attrs["probe_modes_used"]
    if "elapsed_s" in attrs:
        out["elapsed_s"] = attrs["elapsed_s"]
    for k in ("lambda_nm", "z_m", "ccd_pixel_um", "pixel_size_m", "energy_kev", "crop"):
        if k in scan_info:
            out[k] = scan_info[k]
    return out


def _test_hooks(rank: int) -> None:
    """TEST HOOK ONLY (tests/test_mpi.py): make one rank fail or die, to test that the job fails whole.

    ``HXN_PTYCHO_TEST_FAIL_RANK=r`` makes rank r raise; ``HXN_PTYCHO_TEST_KILL_RANK=r`` kills it
    with SIGKILL. Unset in production, this does nothing.
    """
    if os.environ.get("HXN_PTYCHO_TEST_FAIL_RANK") == str(rank):
        raise RuntimeError("test hook HXN_PTYCHO_TEST_FAIL_RANK: this rank fails on purpose")
    if os.environ.get("HXN_PTYCHO_TEST_KILL_RANK") == str(rank):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def _world() -> Any:
    """The communicator, or a :class:`JobError` saying why MPI cannot start."""
    from .distributed import world
    try:
        return world()
    except RuntimeError as exc:
        raise JobError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Run the job in this process (one rank of it); returns the exit status."""
    try:
        comm = _world()
    except JobError as exc:
        print(f"hxn-ptycho job failed: {exc}", file=sys.stderr, flush=True)
        return 1
    params_error: str | None = None
    try:
        params = ReconParams.from_dict(json.loads(args.params))
    except (ParamError, json.JSONDecodeError, TypeError) as exc:
        params, params_error = ReconParams(), f"bad --params: {exc}"
    status, message = 0, ""
    try:
        if params_error:
            raise ParamError(params_error)
        _test_hooks(comm.rank)
        from .distributed import run_distributed
        res, info = run_distributed(args.scan, params, comm, mode=args.mode, progress=not args.quiet)
        comm.barrier()              # every rank finished its share before rank 0 writes anything
        if comm.rank == 0:
            from .resultfile import write_result
            write_result(args.output, res)
            if args.png:
                from .plots import summary_png
                summary_png(res, args.png)
            if args.catalog:
                from hxn_ptycho.callbacks.derived import publish_result
                publish_result(args.catalog, os.path.abspath(args.output), args.raw_uid,
                               recon_summary(params, info, comm.size, args.mode, res))
        comm.barrier()              # no rank exits (and so tears the job down) while rank 0 writes
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, then the job exits non-zero
        status = 2 if isinstance(exc, (FileFormatError, ParamError, BackendError)) else 130 if isinstance(exc, KeyboardInterrupt) else 1
        message = f"rank {comm.rank}: {type(exc).__name__}: {exc}"
        if os.environ.get("HXN_PTYCHO_DEBUG"):
            traceback.print_exc()
    if not status:
        return 0
    print(f"hxn-ptycho job failed: {message}", file=sys.stderr, flush=True)
    if comm.rank == 0 and args.catalog:
        try:
            from hxn_ptycho.callbacks.derived import publish_failure
            publish_failure(args.catalog, args.raw_uid,
                            recon_summary(params, {"path": args.scan}, comm.size, args.mode), message)
        except Exception as exc:  # noqa: BLE001
            print(f"hxn-ptycho job: could not record the failure in {args.catalog}: {exc}", file=sys.stderr)
    if comm.size > 1:
        comm.abort(status)          # the other ranks may wait in a collective: end them all
    return status


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
