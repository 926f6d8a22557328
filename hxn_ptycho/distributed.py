"""MPI: which process runs which views, and the Allreduce reducer the engine sums through.

Synchronous mode (the NSLS-II paper): the views are split almost evenly into contiguous
slices, each rank reads only its slice of frames, and every sum over views in the engine is
one in-place ``Allreduce`` on a reused contiguous buffer — so all ranks hold the same probe
and object after every update, and rank 0 writes the result.

Asynchronous mode (``mode="async"``, the Argonne scheme) lives in :mod:`hxn_ptycho.stitch`: one
spatial region per rank, no communication during the iterations, stitched on rank 0.

mpi4py is imported only when an MPI launcher started this process (world size > 1), so a
single process never initialises MPI and never launches a second launcher.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

import numpy as np

from .backend import available_cores, get_backend
from .engine import LocalReducer, stderr_log
from .errors import HxnPtychoError
from .params import ParamError, ReconParams
from .resultfile import ResultData
from .scanfile import read_scan, scan_info

ABORT_GRACE_S = 1.0     # mpiexec forwards a rank's stderr asynchronously; Abort tears it down at once

_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_NTASKS",
                       "MPI_LOCALNRANKS", "HYDRA_NPROCS")


def launched_by_mpi() -> bool:
    """True when an MPI launcher (mpiexec, mpirun, srun) started this process with several ranks."""
    for var in _LAUNCHER_SIZE_VARS:
        try:
            if int(os.environ.get(var, "1")) > 1:
                return True
        except ValueError:
            continue
    return False


def launcher_size() -> int | None:
    """How many processes the launcher says it started (its PMI, or srun's step), None if it does not say."""
    names = ["PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE"]
    if "SLURM_PROCID" in os.environ:              # a task of srun: the step's task count
        names.append("SLURM_STEP_NUM_TASKS")
    for var in names:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return None


BCAST_IDLE_TAG = 2718      # the point-to-point messages of MPIComm.bcast_idle


class LocalComm:
    """The communicator of a process that was not started by an MPI launcher."""

    rank = 0
    size = 1
    local_size = 1

    def abort(self, status: int) -> None:
        sys.exit(status)

    def barrier(self) -> None:
        pass

    def bcast(self, obj: Any) -> Any:
        return obj

    def bcast_idle(self, obj: Any) -> Any:
        return obj

    def gather(self, obj: Any) -> list[Any]:
        return [obj]


class MPIComm:
    """``MPI.COMM_WORLD`` with the few operations the job needs."""

    def __init__(self) -> None:
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise RuntimeError(f"this job was started by an MPI launcher but mpi4py cannot be imported ({exc}); "
                               "pip install mpi4py mpich, or build mpi4py against your facility's MPI") from None
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        started = launcher_size()
        if started is not None and started != self.size:
            raise RuntimeError(
                f"the launcher started {started} processes but MPI sees a world of {self.size}: this MPI library "
                f"({MPI.Get_library_version().splitlines()[0].strip()}) does not speak the launcher's PMI; "
                "under srun the bundled MPICH needs --mpi=pmi2 (--slurm-mpi pmi2) and Open MPI --mpi=pmix "
                "(see docs/slurm.md)")
        try:
            self.local_size = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
        except Exception:  # noqa: BLE001 - a facility MPI without MPI-3 shared split
            self.local_size = 1

    def abort(self, status: int) -> None:
        """End every rank with ``status``, after giving the launcher time to forward our last words."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(status)

    def barrier(self) -> None:
        self.comm.Barrier()

    def bcast(self, obj: Any) -> Any:
        return self.comm.bcast(obj, root=0)

    def bcast_idle(self, obj: Any, poll_s: float = 0.2) -> Any:
        """Rank 0's ``obj`` on every rank, after a long wait: the other ranks poll for it with a sleep
        rather than spin in a collective (MPI implementations busy-wait there), so while rank 0 works
        alone (the held-out count) they leave the node's cores to it."""
        if self.rank == 0:
            for r in range(1, self.size):
                self.comm.send(obj, dest=r, tag=BCAST_IDLE_TAG)
            return obj
        while not self.comm.iprobe(source=0, tag=BCAST_IDLE_TAG):
            time.sleep(poll_s)
        return self.comm.recv(source=0, tag=BCAST_IDLE_TAG)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (pickled; for the end of a run, not the iterations)."""
        return self.comm.gather(obj, root=0)


def world() -> Any:
    """This process's communicator: MPI's world when launched by MPI, else a one-process stand-in."""
    return MPIComm() if launched_by_mpi() else LocalComm()


class MPIReducer:
    """Sums arrays over all ranks in place with one ``Allreduce`` on a packed, reused buffer."""

    def __init__(self, comm: MPIComm) -> None:
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self._buffers: dict[tuple, np.ndarray] = {}
        self.seconds = 0.0          # time spent in communication (for the benchmark)
        self.calls = 0

    def allreduce_sum(self, arrays: list) -> None:
        """Sum C-contiguous numpy arrays of one precision (real or complex) over all ranks, in place."""
        views = [a.view(a.real.dtype) if a.dtype.kind == "c" else a for a in arrays]
        base = views[0].dtype
        if any(v.dtype != base or not v.flags.c_contiguous for v in views):
            raise TypeError("allreduce_sum needs C-contiguous arrays of one precision")
        key = tuple(v.shape for v in views) + (base.str,)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = np.empty(sum(v.size for v in views), base)
        i = 0
        for v in views:
            buf[i:i + v.size] = v.ravel()
            i += v.size
        t0 = time.perf_counter()
        self.comm.comm.Allreduce(self.comm.MPI.IN_PLACE, buf, op=self.comm.MPI.SUM)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        i = 0
        for v in views:
            v.ravel()[...] = buf[i:i + v.size]
            i += v.size


def split_views(n_views: int, size: int) -> list[slice]:
    """Contiguous, almost equal slices of the views, one per rank."""
    if size > n_views:
        raise ParamError(f"more ranks ({size}) than views ({n_views}): use at most {n_views} processes")
    bounds = np.linspace(0, n_views, size + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def rank_threads(params: ReconParams, comm: Any) -> int:
    """FFT/worker threads of one rank: the user's choice, else the cores shared by the ranks of this node."""
    return params.threads or max(1, available_cores() // max(1, comm.local_size))


def rank_backend(params: ReconParams, comm: Any) -> Any:
    """This rank's array backend: its share of the node's cores, and its GPU (rank mod devices)."""
    device = None
    if params.backend in ("cupy", "auto"):
        try:
            from .gpu import select_device
            device = select_device(comm.rank)           # node-local rank modulo visible GPUs
        except ImportError:
            device = None
    return get_backend(params.backend, rank_threads(params, comm), device=device)


def rank_reducer(host: Any, backend: Any) -> Any:
    """The engine's reducer: ``host`` (MPI Allreduce) on the CPU; on a GPU, NCCL or pinned staging."""
    if host.size <= 1 or backend.on_host:
        return host
    from .gpu import make_reducer
    return make_reducer(host, backend)


def scan_geometry(path: str) -> dict[str, Any]:
    info = scan_info(path)
    info["path"] = path
    return info


def gather_views(views: slice, reducer: Any) -> list[list[int]]:
    """[start, stop) of the frames every rank read, through the reducer (provenance and tests)."""
    table = np.zeros((reducer.size, 2))
    table[reducer.rank] = (views.start, views.stop)
    reducer.allreduce_sum([table])
    return table.astype(int).tolist()


def count_on_rank0(path: str, params: ReconParams, comm: Any, log: Callable[[str], None] | None = None,
                   stop: Any = None) -> tuple[ReconParams, dict[str, Any], Any]:
    """``probe_modes=auto`` with ``auto_rule='heldout'``: rank 0 reads what the count needs of the scan (its
    central views, :func:`hxn_ptycho.mode_count.read_for_count`) and counts its modes; every rank gets the
    params with that count, the evidence and the count's model to start from (None under a user's
    ``init_from``). A count that fails fails every rank with rank 0's reason (none waits in the broadcast)."""
    from .mode_count import counted_params, read_for_count
    out: tuple[str, Any] = ("", None)
    if comm.rank == 0:
        try:
            out = ("ok", counted_params(read_for_count(path), params, log_fn=log or stderr_log, stop=stop))
        except Exception as exc:       # told to every rank, then raised here as it was
            comm.bcast_idle(("error", f"{type(exc).__name__}: {exc}"))
            raise
    out = comm.bcast_idle(out)
    if out[0] == "error":
        raise HxnPtychoError(f"the held-out probe-mode count failed on rank 0: {out[1]}")
    return out[1]


def run_distributed(path: str, params: ReconParams, comm: Any, mode: str = "sync", progress: bool = False,
                    log: Callable[[str], None] | None = None,
                    stop: Any = None) -> tuple[ResultData, dict[str, Any]]:
    """Reconstruct the scan file ``path`` on the ranks of ``comm``; every rank returns the result.

    ``stop`` (a callable or ``threading.Event``, given on every rank) ends the iterations early:
    see :func:`hxn_ptycho.engine.reconstruct`; the result is then marked ``attrs["interrupted"]``.
    """
    info = scan_geometry(path)
    from .mode_count import wants_count
    evidence = start = None
    if wants_count(params):
        params, evidence, start = count_on_rank0(path, params, comm, log, stop)
    if mode == "async":                 # (its regions start from their own guesses, not the count's model)
        from .stitch import run_async
        res = run_async(path, params, comm, progress=progress, log=log, stop=stop)
        if evidence is not None:
            res.attrs["probe_modes_auto"] = evidence
        return res, info
    if mode != "sync":
        raise ParamError(f"mode must be 'sync' or 'async', got {mode!r}")
    split_views(info["n_views"], comm.size)                 # more ranks than views: refused by name
    backend = rank_backend(params, comm)
    host = MPIReducer(comm) if comm.size > 1 else LocalReducer()
    reducer = rank_reducer(host, backend)
    quiet = (lambda msg: None) if comm.rank else log
    # the offline job is a session fed every view at once (hxn_ptycho.session): one engine, not two
    from .session import ReconSession, header_of
    header = header_of(read_scan(path, views=slice(0, 1)))
    session = ReconSession(header, params, backend=backend, reducer=reducer, log=quiet, stop=stop,
                           progress=progress and comm.rank == 0, start=start)
    try:
        scan = read_scan(path, views=session.share(info["n_views"]))     # this rank's frames only
        session.append_views(scan.points, scan.diffamp)
        # the session holds its own copy of the frames: the ones read are freed before the exit waves
        # are allocated (else the rank holds the data twice at its peak: issue 24)
        scan.diffamp = np.empty((0,) + scan.diffamp.shape[1:], np.float32)     # (a view would keep them)
        res = session.finish()
    finally:
        session.close()
    info.update(lambda_nm=scan.lambda_nm, z_m=scan.z_m, ccd_pixel_um=scan.ccd_pixel_um,
                pixel_size_m=scan.pixel_size_m)
    res.attrs["mode"] = "sync"
    if evidence is not None:
        res.attrs["probe_modes_auto"] = evidence
    res.attrs["rank_views"] = gather_views(scan.views, host)
    if comm.size > 1:
        res.attrs["communication_s"] = getattr(reducer, "seconds", float("nan"))
        res.attrs["allreduce_calls"] = getattr(reducer, "calls", -1)
    return res, info
