"""The CuPy backend: the engine's steps on one GPU, with our CUDA C kernels from ``cuda/*.cu``.

:class:`CupyBackend` implements the :class:`hxn_ptycho.backend.Backend` contract on the device
(``xp`` is ``cupy``): its passes are built from the kernel wrappers below — the Fourier pass is
``fft_exit_waves`` (gather, P·O with the 1/n of the orthonormal FFT folded in, raw cuFFT),
``fourier_update`` (data error + reflect + projection + DM update in one kernel, two with the power
bound) and an out-of-place inverse cuFFT from F(ψ) into ψ; the object pass ``object_numerator`` and
a scatter-add; the probe pass ``gather`` and ``probe_sums``; the ML passes ``cuda/ml.cu``; the
position sums ``cuda/positions.cu``. The element wrappers (``fourier_projection``, ``exit_waves``,
``reflect``, ``dm_update``, ...) are tested one by one against :mod:`hxn_ptycho.dm`.

- Kernels: every ``cuda/*.cu`` concatenated into one ``cupy.RawModule`` (NVRTC, extern "C"
  names), compiled once per device and CuPy/NVRTC version into CuPy's kernel cache
  (``$HXN_PTYCHO_KERNEL_CACHE`` or ``$CUPY_CACHE_DIR``, default ``~/.cupy/kernel_cache``).
- FFTs: batched cuFFT plans (``cupy.cuda.cufft.PlanNd``), one per (batch, n, dtype), created
  once and reused; in place.
- Overlap accumulation: ``scatter="atomic"`` (atomicAdd) or ``"sets"`` (views grouped into
  non-overlapping sets, one launch per set, plain adds); ``$HXN_PTYCHO_SCATTER`` picks the default.
- Reducers for MPI (one GPU per rank, :func:`select_device`): :class:`NcclReducer` (NCCL through
  CuPy) when available, else :class:`StagedReducer` (pinned host buffers into the host/MPI reducer).

Nothing here needs CuPy at import time: without it :func:`gpu_available` says why, and the pure
helpers (:func:`kernel_source`, :func:`nonoverlapping_sets`, :func:`select_device`) still work.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .backend import Backend, BackendError, BatchBuffers, ObjectSums
from .cuda import kernel_dir

BLOCK = 256                 # threads per block of every launch (a power of two <= HXN_MAX_BLOCK)
MAX_GRID_Y = 65535
MAX_PLANS = 6               # cuFFT plans kept (a full batch and a last, shorter one, per use)
SCATTER_MODES = ("atomic", "sets")
ML_MODELS = {"poisson": 0, "amplitude": 1}     # the ``model`` argument of cuda/ml.cu

_cupy: Any = None
_cupy_error: str | None = None
_modules: dict[int, Any] = {}


# --- kernel sources (no CuPy needed) -----------------------------------------------------------
def kernel_files() -> list[Path]:
    """The ``cuda/*.cu`` kernel sources, in the order they are concatenated."""
    return sorted(kernel_dir().glob("*.cu"))


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def kernel_source() -> str:
    """All ``cuda/*.cu`` as one translation unit, local ``#include "x.cuh"`` inlined once each.

    This is exactly what NVRTC compiles on the device (and what the nvcc test compiles in CI).
    """
    seen: set[str] = set()

    def expand(path: Path) -> str:
        def inc(m: re.Match) -> str:
            name = m.group(1)
            if name in seen:
                return f"// (already included: {name})"
            seen.add(name)
            return f"// ---- {name}\n" + expand(kernel_dir() / name)
        text = path.read_text()
        text = re.sub(r"^\s*#\s*pragma\s+once\s*$", "", text, flags=re.M)
        return _INCLUDE.sub(inc, text)

    return "\n".join(f"// ==== {p.name}\n" + expand(p) for p in kernel_files())


# --- the non-overlapping sets (no CuPy needed) ------------------------------------------------
def nonoverlapping_sets(pos: np.ndarray, n: int) -> list[np.ndarray]:
    """Split views into sets whose ``n × n`` windows (corners ``pos``) never overlap within a set.

    Windows fall into cells of ``n × n`` pixels (by their corner). Two windows whose cells have the
    same row and column parity but are different cells are at least ``n + 1`` pixels apart in one
    direction, so they cannot overlap; views sharing a cell are split by their rank in the cell.
    Set = (row parity, column parity, rank in cell): about 4·(n/step)² sets for a raster of step.
    Returns int32 view indices per set, largest sets first.
    """
    pos = np.asarray(pos, np.int64).reshape(-1, 2)
    if len(pos) == 0:
        return []
    cell = np.floor_divide(pos, n)
    _, cell_id = np.unique(cell, axis=0, return_inverse=True)
    cell_id = cell_id.ravel()
    order = np.argsort(cell_id, kind="stable")
    sorted_ids = cell_id[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_ids)) + 1]
    counts = np.diff(np.r_[starts, len(order)])
    rank = np.empty(len(pos), np.int64)
    rank[order] = np.arange(len(order)) - np.repeat(starts, counts)
    key = (rank * 2 + (cell[:, 0] & 1)) * 2 + (cell[:, 1] & 1)
    sets = [np.flatnonzero(key == k).astype(np.int32) for k in np.unique(key)]
    sets.sort(key=len, reverse=True)
    return sets


# --- CuPy and the device ------------------------------------------------------------------
@contextlib.contextmanager
def _unshadowed_cuda() -> Iterator[None]:
    """Hide this repository's ``cuda/`` folder from ``import cuda`` while CuPy imports.

    CuPy ≥ 14 imports NVIDIA's ``cuda.pathfinder`` (a namespace package); run from the source
    tree root (``python -m ...``), our ``cuda/`` (a regular package) would shadow it.
    """
    mine = kernel_dir().resolve()
    mod = sys.modules.get("cuda")
    if mod is not None and Path(getattr(mod, "__file__", "") or "/").resolve().parent == mine:
        del sys.modules["cuda"]
    if "cupy" not in sys.modules:
        # an earlier, failed ``import cupy`` (e.g. a pytest plugin's, shadowed by our cuda/) left
        # half-imported submodules behind: drop them so this import starts clean
        for name in [m for m in sys.modules if m.split(".")[0] in ("cupy", "cupy_backends", "cupyx")]:
            del sys.modules[name]
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if (Path(p or os.getcwd()) / "cuda").resolve() != mine]
    try:
        yield
    finally:
        sys.path[:] = saved


def _import_cupy() -> Any:
    """CuPy, or None (the reason in ``_cupy_error``)."""
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        cache = os.environ.get("HXN_PTYCHO_KERNEL_CACHE")
        if cache and "CUPY_CACHE_DIR" not in os.environ:
            os.environ["CUPY_CACHE_DIR"] = cache
        try:
            with _unshadowed_cuda():
                with contextlib.suppress(ImportError):
                    import cuda.pathfinder  # noqa: F401  (CuPy >= 14 needs the real one)
                import cupy
            _cupy = cupy
        except Exception as exc:  # ImportError, or a broken CUDA install raising at import
            _cupy_error = f"{type(exc).__name__}: {exc}".strip()
    return _cupy


def gpu_available() -> tuple[bool, str]:
    """(True, description) when CuPy imports and sees a CUDA device, else (False, the reason)."""
    cp = _import_cupy()
    if cp is None:
        return False, (f"CuPy is not importable ({_cupy_error}); install it with "
                       f"pip install 'hxn-ptycho[gpu]' (cupy-cuda12x: CUDA 12 or 13 drivers) or "
                       f"'hxn-ptycho[gpu-cuda13]' (cupy-cuda13x: CUDA 13 drivers)")
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy {cp.__version__} finds no usable CUDA driver or device ({type(exc).__name__}: {exc})"
    if count < 1:
        return False, (f"CuPy {cp.__version__} sees no CUDA device "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return True, f"{count} CUDA device(s), CuPy {cp.__version__}"


_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
                    "PMI_LOCAL_RANK", "SLURM_LOCALID")


def select_device(rank: int, visible: int | None = None) -> int:
    """The GPU of MPI rank ``rank``: its node-local rank (from the launcher's environment, else the
    global rank) modulo the number of visible devices."""
    if visible is None:
        cp = _import_cupy()
        try:
            visible = cp.cuda.runtime.getDeviceCount() if cp is not None else 0
        except Exception:
            visible = 0
    if visible < 1:
        return 0
    local = rank
    for var in _LOCAL_RANK_VARS:
        if os.environ.get(var, "").isdigit():
            local = int(os.environ[var])
            break
    return int(local) % int(visible)


def _module(device_id: int) -> Any:
    """The RawModule of all kernels for ``device_id`` (compiled on first use, then from the cache)."""
    mod = _modules.get(device_id)
    if mod is None:
        cp = _cupy
        with cp.cuda.Device(device_id):
            mod = cp.RawModule(code=kernel_source(), options=("--std=c++17",))
            mod.compile()
        _modules[device_id] = mod
    return mod


def _grid(per: int, views: int, sm: int) -> tuple[int, int]:
    gx = max(1, min(-(-per // BLOCK), 65535))
    gy = max(1, min(views, MAX_GRID_Y))
    return gx, gy


class CupyBackend(Backend):
    """One GPU: CuPy arrays, cuFFT plans reused, our CUDA kernels for the DM steps."""

    name = "cupy"
    fft_library = "cufft"
    threads = 1
    workers = 1                 # one worker, large batches
    cache_batches = False
    on_host = False

    def __init__(self, device: int | None = None, scatter: str | None = None) -> None:
        ok, why = gpu_available()
        if not ok:
            raise BackendError(f"backend 'cupy' is not available here: {why}")
        cp = _cupy
        self.xp = cp
        self.device_id = int(device) if device is not None else cp.cuda.runtime.getDevice()
        self.device = cp.cuda.Device(self.device_id)
        self.device.use()
        props = cp.cuda.runtime.getDeviceProperties(self.device_id)
        self.device_name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        self.sm_count = int(props["multiProcessorCount"])
        scatter = scatter or os.environ.get("HXN_PTYCHO_SCATTER", "atomic")
        if scatter not in SCATTER_MODES:
            raise BackendError(f"scatter must be one of {SCATTER_MODES}, got {scatter!r}")
        self.scatter_mode = scatter
        from cupy.cuda import cufft
        self._cufft = cufft
        self._mod = _module(self.device_id)
        self._kernels: dict[str, Any] = {}
        self._plans: dict[tuple, Any] = {}
        self._pos: dict[tuple, Any] = {}
        self._sets: dict[tuple, list] = {}
        self._dummy_u8 = cp.zeros(1, cp.uint8)
        self._dummy_i32 = cp.zeros(1, cp.int32)

    # --- arrays -----------------------------------------------------------------------------
    def asarray(self, a: Any, dtype: Any = None) -> Any:
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=dtype))

    def asnumpy(self, a: Any) -> np.ndarray:
        return self.xp.asnumpy(a)

    def empty(self, shape: tuple, dtype: Any) -> Any:
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape: tuple, dtype: Any) -> Any:
        return self.xp.zeros(shape, dtype=dtype)

    def synchronize(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()

    def pinned_empty(self, shape: tuple, dtype: Any) -> np.ndarray:
        """A page-locked host array (fast, asynchronous transfers)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        mem = self.xp.cuda.alloc_pinned_memory(max(1, count * dtype.itemsize))
        return np.frombuffer(mem, dtype, count).reshape(shape)

    def to_device(self, host: np.ndarray, out: Any) -> Any:
        """Copy ``host`` (ideally pinned) into the device array ``out`` on the current stream."""
        out.set(host, stream=self.xp.cuda.get_current_stream())
        return out

    def to_host(self, dev: Any, out: np.ndarray) -> np.ndarray:
        """Copy ``dev`` into the host array ``out`` (ideally pinned); synchronises the stream."""
        dev.get(out=out, stream=self.xp.cuda.get_current_stream())
        self.synchronize()
        return out

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of this device."""
        with self.device:
            return self.xp.cuda.runtime.memGetInfo()

    # --- kernels ------------------------------------------------------------------------------
    def _k(self, name: str) -> Any:
        fn = self._kernels.get(name)
        if fn is None:
            fn = self._kernels[name] = self._mod.get_function(name)
        return fn

    @staticmethod
    def _suffix(dtype: Any) -> tuple[str, Any]:
        dt = np.dtype(dtype)
        if dt == np.complex64 or dt == np.float32:
            return "c64", np.float32
        if dt == np.complex128 or dt == np.float64:
            return "c128", np.float64
        raise TypeError(f"the CUDA kernels take complex64/complex128 (float32/float64), got {dt}")

    def _check(self, *arrays: Any) -> None:
        for a in arrays:
            if not a.flags.c_contiguous:
                raise ValueError("the CUDA kernels need C-contiguous arrays")

    def _dev_pos(self, pos: Any) -> Any:
        cp = self.xp
        if isinstance(pos, cp.ndarray):
            return cp.ascontiguousarray(pos, dtype=cp.int64)
        pos = np.ascontiguousarray(pos, dtype=np.int64)
        key = (pos.ctypes.data, pos.shape, hashlib.blake2b(pos.tobytes(), digest_size=16).digest())
        dev = self._pos.get(key)
        if dev is None:
            if len(self._pos) > 4096:
                self._pos.clear()
            dev = self._pos[key] = cp.asarray(pos)
        return dev

    def _dev_sets(self, pos: Any, n: int) -> list:
        host = self.xp.asnumpy(pos) if isinstance(pos, self.xp.ndarray) else np.asarray(pos, np.int64)
        key = (n, host.shape, hashlib.blake2b(np.ascontiguousarray(host).tobytes(), digest_size=16).digest())
        sets = self._sets.get(key)
        if sets is None:
            if len(self._sets) > 1024:
                self._sets.clear()
            sets = self._sets[key] = [self.xp.asarray(s) for s in nonoverlapping_sets(host, n)]
        return sets

    # --- FFTs (orthonormal, last two axes, in place) ----------------------------------------
    def _plan(self, batch: int, n0: int, n1: int, dtype: Any) -> Any:
        key = (batch, n0, n1, np.dtype(dtype).str)
        plan = self._plans.get(key)
        if plan is None:
            cufft = self._cufft
            kind = cufft.CUFFT_C2C if np.dtype(dtype) == np.complex64 else cufft.CUFFT_Z2Z
            if len(self._plans) >= MAX_PLANS:        # each plan holds a work area: keep few
                self._plans.pop(next(iter(self._plans)))
            with self.device:
                plan = cufft.PlanNd([n0, n1], None, 1, n0 * n1, None, 1, n0 * n1, kind, batch, "C", -1, None)
            self._plans[key] = plan
        return plan

    def clear_plans(self) -> None:
        """Drop the cached cuFFT plans (and their work areas)."""
        self._plans.clear()

    def _raw_fft(self, a: Any, direction: int) -> Any:
        if not a.flags.c_contiguous:
            raise ValueError("fft2/ifft2 need a C-contiguous array (they work in place)")
        n0, n1 = a.shape[-2], a.shape[-1]
        plan = self._plan(a.size // (n0 * n1), n0, n1, a.dtype)
        plan.fft(a, a, direction)
        return a

    def raw_ifft2(self, a: Any, out: Any = None) -> Any:
        """Unnormalised inverse FFT (n·orthonormal for n×n) of ``a`` into ``out`` (default: in place)."""
        if out is None:
            return self._raw_fft(a, self._cufft.CUFFT_INVERSE)
        if not (a.flags.c_contiguous and out.flags.c_contiguous) or out.shape != a.shape or out.dtype != a.dtype:
            raise ValueError("raw_ifft2 needs C-contiguous arrays of one shape and dtype")
        n0, n1 = a.shape[-2], a.shape[-1]
        self._plan(a.size // (n0 * n1), n0, n1, a.dtype).fft(a, out, self._cufft.CUFFT_INVERSE)
        return out

    def fft2(self, a: Any, workers: int = 1) -> Any:
        self._raw_fft(a, self._cufft.CUFFT_FORWARD)
        a *= a.real.dtype.type(1.0 / math.sqrt(a.shape[-1] * a.shape[-2]))
        return a

    def ifft2(self, a: Any, workers: int = 1) -> Any:
        self._raw_fft(a, self._cufft.CUFFT_INVERSE)
        a *= a.real.dtype.type(1.0 / math.sqrt(a.shape[-1] * a.shape[-2]))
        return a

    def fft_work_bytes(self, batch: int, modes: int, n: int, dtype: Any = np.complex64) -> int:
        """Bytes of the cuFFT work area of the batched plan for ``batch`` views of ``modes`` modes."""
        try:
            plan = self._plan(int(batch) * int(modes), int(n), int(n), dtype)
            return int(plan.work_area.mem.size) if plan.work_area is not None else 0
        except Exception:      # the plan itself does not fit: assume a work area as large as the data
            return int(batch) * int(modes) * n * n * np.dtype(dtype).itemsize

    # --- window gather / scatter ------------------------------------------------------------
    def gather(self, obj: Any, pos: Any, n: int, out: Any = None) -> Any:
        cp = self.xp
        L, H, W = obj.shape
        B = len(pos)
        if out is None:
            out = cp.empty((B, L, n, n), dtype=obj.dtype)
        self._check(obj, out)
        suf, _ = self._suffix(obj.dtype)
        if B:
            self._k(f"gather_{suf}")(_grid(L * n * n, B, self.sm_count), (BLOCK,),
                                     (obj, np.int32(L), np.int32(H), np.int32(W), self._dev_pos(pos),
                                      np.int32(B), np.int32(n), out))
        return out

    def _scatter_operands(self, acc: Any, pos: Any, src: Any) -> tuple[Any, Any, Any, int] | None:
        """(acc as (L, H, W), src contiguous in acc's dtype, the real dtype, components per value),
        or None when there is nothing to scatter: what every scatter kernel needs."""
        if acc.ndim == 2:
            acc = acc[None]
        if len(pos) == 0:
            return None
        if src.dtype != acc.dtype:
            src = src.astype(acc.dtype)
        src = self.xp.ascontiguousarray(src)
        self._check(acc)
        complex_ = acc.dtype.kind == "c"
        return acc, src, (acc.real.dtype if complex_ else acc.dtype), 2 if complex_ else 1

    def scatter_add(self, acc: Any, pos: Any, src: Any, mode: str | None = None) -> None:
        mode = mode or self.scatter_mode
        prepared = self._scatter_operands(acc, pos, src)
        if prepared is None:
            return
        acc, src, rdt, ncomp = prepared
        L, H, W = acc.shape
        n, B = src.shape[-1], len(pos)
        rsuf = "f32" if rdt == np.float32 else "f64"
        if src.ndim == 2:
            sb = sl = 0
        else:
            if src.shape[1] != L:
                raise ValueError(f"src has {src.shape[1]} object modes, the accumulator {L}")
            sb, sl = L * n * n, n * n
        accv, srcv = acc.view(rdt), src.view(rdt)
        dpos = self._dev_pos(pos)
        per = L * n * n * ncomp
        args = (np.int32(L), np.int32(H), np.int32(W), dpos)
        tail = (np.int32(n), srcv, np.int64(sb), np.int64(sl), np.int32(ncomp))
        if mode == "atomic":
            self._k(f"scatter_add_atomic_{rsuf}")(_grid(per, B, self.sm_count), (BLOCK,),
                                                  (accv,) + args + (self._dummy_i32, np.int32(0), np.int32(B)) + tail)
        elif mode == "sets":
            kern = self._k(f"scatter_add_sets_{rsuf}")
            for s in self._dev_sets(pos, n):
                kern(_grid(per, len(s), self.sm_count), (BLOCK,),
                     (accv,) + args + (s, np.int32(1), np.int32(len(s))) + tail)
        else:
            raise ValueError(f"scatter mode must be one of {SCATTER_MODES}, got {mode!r}")

    # --- sub-pixel windows (cuda/refine.cu) ---------------------------------------------------
    def gather_subpixel(self, obj: Any, pos: Any, n: int, out: Any, tmp: Any = None) -> Any:
        """Bilinear windows at the (B, 2) float corners ``pos``: one kernel instead of four gathers."""
        cp = self.xp
        L, H, W = obj.shape
        B = len(pos)
        self._check(obj, out)
        suf, _ = self._suffix(obj.dtype)
        if B:
            dpos = cp.asarray(np.ascontiguousarray(pos, dtype=np.float64))
            self._k(f"gather_bilinear_{suf}")(_grid(L * n * n, B, self.sm_count), (BLOCK,),
                                              (obj, np.int32(L), np.int32(H), np.int32(W), dpos,
                                               np.int32(B), np.int32(n), out))
        return out

    def scatter_add_subpixel(self, acc: Any, pos: Any, src: Any) -> None:
        """The adjoint of :meth:`gather_subpixel` (atomics); ``src`` (B, L, n, n), (B, 1, n, n) or (n, n)."""
        cp = self.xp
        prepared = self._scatter_operands(acc, pos, src)
        if prepared is None:
            return
        acc, src, rdt, ncomp = prepared
        L, H, W = acc.shape
        n, B = src.shape[-1], len(pos)
        if src.ndim == 2:
            sb = sl = 0
        else:
            sb = src.shape[1] * n * n
            sl = 0 if src.shape[1] == 1 else n * n
        dpos = cp.asarray(np.ascontiguousarray(pos, dtype=np.float64))
        self._k(f"scatter_bilinear_{'f32' if rdt == np.float32 else 'f64'}")(
            _grid(L * n * n * ncomp, B, self.sm_count), (BLOCK,),
            (acc.view(rdt), np.int32(L), np.int32(H), np.int32(W), dpos, np.int32(B), np.int32(n),
             src.view(rdt), np.int64(sb), np.int64(sl), np.int32(ncomp)))

    # --- the DM passes of the contract, from the kernel wrappers below --------------------------
    def _windows(self, obj: Any, pos: Any, n: int, buf: BatchBuffers, B: int, windows: Any) -> Any:
        return self.gather(obj, pos, n, out=buf.objwin[:B]) if windows is None else windows

    def fourier_pass(self, obj: Any, pos: Any, probe: Any, psi: Any, diffamp: Any, mask: Any,
                     pbound: float, beta: float, floor: float, stats: Any, buf: BatchBuffers,
                     windows: Any = None, sums: ObjectSums | None = None, rows: Any = None) -> Any:
        """``dm.dm_step`` from the kernels: gather + P·O (2), ``reflect`` 2Φ − ψ (3), a raw cuFFT, the
        Fourier kernel's error (7) and projection (4) in one launch (two with the power bound: the
        first measures each view's deviation) with the FFTs' 1/n folded into it, a raw inverse
        cuFFT, ``dm_update`` of ψ (3)."""
        B = len(psi)
        if B == 0:
            return 0.0
        if rows is not None:
            diffamp = diffamp[self.xp.asarray(rows)]
        n0, n1 = probe.shape[-2:]
        scale = 1.0 / math.sqrt(n0 * n1)
        phi = self.exit_waves(probe, self._windows(obj, pos, n0, buf, B, windows), buf.phi[:B])
        work = self._raw_fft(self.reflect(phi, psi, buf.work[:B]), self._cufft.CUFFT_FORWARD)   # n·F(2Φ − ψ)
        relax = None
        if pbound > 0:
            dev = self._fourier(work, diffamp, mask, 0, None, scale, 1.0)
            relax = self._relax(dev, n0 * n1, pbound, floor, stats, self._suffix(work.dtype)[1])
            err = dev.sum()
            self._fourier(work, diffamp, mask, 1, relax, scale, scale)
        else:
            if stats is not None:
                stats.add(None, B)
            err = self._fourier(work, diffamp, mask, 1, None, scale, scale).sum()
        self._raw_fft(work, self._cufft.CUFFT_INVERSE)                                        # F⁻¹Π_F(…)
        self.dm_update(psi, phi, work, beta)
        if sums is not None:                                                                  # (6)
            self.object_pass(psi, sums.probe_conj, sums.probe_intensity, pos, sums.num, sums.den, buf,
                             windows is not None)
        return err

    def object_pass(self, psi: Any, probe_conj: Any, probe_intensity: Any, pos: Any, obj_num: Any, obj_den: Any,
                    buf: BatchBuffers, subpixel: bool = False) -> None:
        """``object_numerator`` kernel, then the scatter-add kernels (bilinear with ``subpixel``)."""
        B = len(psi)
        if B == 0:
            return
        src = self.object_numerator(psi, probe_conj, buf.onum_src[:B])
        if subpixel:
            self.scatter_add_subpixel(obj_num, pos, src)
            self.scatter_add_subpixel(obj_den, pos, probe_intensity)
        else:
            self.scatter_add(obj_num, pos, src)
            self.scatter_add(obj_den, pos, probe_intensity)

    def object_update(self, nums: Sequence[Any], dens: Sequence[Any] | None, old: Any, reg: float,
                      split: Callable[[Callable[[int, int], None]], None] | None = None,
                      den_at: tuple[Any, Any] | None = None) -> tuple[Any, np.ndarray]:
        """The numpy reference's array expressions, on the GPU (one worker: nothing to share out)."""
        from . import dm
        return dm.object_update(self, nums, dens, old, reg, den_at)

    def probe_pass(self, psi: Any, obj: Any, pos: Any, num: Any, den: Any, buf: BatchBuffers,
                   windows: Any = None) -> None:
        """``gather`` and the ``probe_sums`` kernel (one owner per pixel and mode, views in chunks)."""
        B = len(psi)
        if B:
            self.probe_sums(psi, self._windows(obj, pos, psi.shape[-1], buf, B, windows), num, den)

    def error_pass(self, obj: Any, pos: Any, probe: Any, diffamp: Any, mask: Any, buf: BatchBuffers,
                   windows: Any = None) -> Any:
        """gather + P·O + raw cuFFT, then the Fourier kernel's error sum (7)."""
        B = len(diffamp)
        if B == 0:
            return 0.0
        fphi = self.fft_exit_waves(probe, self._windows(obj, pos, probe.shape[-1], buf, B, windows), buf.phi[:B])
        return self.data_error(fphi, diffamp, mask)

    # --- the element kernels (tested against dm.py one by one) --------------------------------
    def _mask_arg(self, mask: Any) -> tuple[Any, int]:
        if mask is None:
            return self._dummy_u8, 0
        cp = self.xp
        return cp.ascontiguousarray(cp.asarray(mask, dtype=cp.bool_)).view(cp.uint8), 1

    def _amp_arg(self, diffamp: Any, rdt: Any) -> Any:
        cp = self.xp
        if not isinstance(diffamp, cp.ndarray) or diffamp.dtype != rdt:
            diffamp = cp.asarray(diffamp, dtype=rdt)
        return cp.ascontiguousarray(diffamp)

    @staticmethod
    def _view_shape(waves: Any) -> tuple[int, int, int]:
        B = waves.shape[0]
        npix = waves.shape[-1] * waves.shape[-2]
        return B, waves.size // (B * npix) if B else 0, npix

    def _fourier(self, waves: Any, diffamp: Any, mask: Any, apply: int, relax: Any = None,
                 in_scale: float = 1.0, out_scale: float = 1.0) -> Any:
        """The fused Fourier-constraint kernel; returns the per-view errors (B,) float64."""
        cp = self.xp
        B, M, npix = self._view_shape(waves)
        suf, rdt = self._suffix(waves.dtype)
        self._check(waves)
        m, use = self._mask_arg(mask)
        err = cp.zeros(B, cp.float64)
        if B:
            rel = self._dummy_real(rdt) if relax is None else cp.ascontiguousarray(relax, dtype=rdt)
            self._k(f"fourier_projection_{suf}")(
                _grid(npix, B, self.sm_count), (BLOCK,),
                (waves, self._amp_arg(diffamp, rdt), m, np.int32(use), np.int32(B), np.int32(M), np.int32(npix),
                 np.int32(apply), rdt(in_scale), rdt(out_scale), rel, np.int32(relax is not None), err))
        return err

    def _dummy_real(self, rdt: Any) -> Any:
        return self.xp.zeros(1, rdt)

    def _relax(self, dev_err: Any, npix: int, pbound: float, floor: float, stats: Any, rdt: Any) -> Any:
        """Per-view factor of the power bound, ``dm.relaxation`` of the mean squared deviation (one
        definition for both backends); its sum goes to ``stats`` (a ``dm.RelaxSum``) when given."""
        from . import dm
        relax = dm.relaxation(self.xp, dev_err / npix, pbound, floor).astype(rdt)
        if stats is not None:
            stats.add(relax, int(relax.shape[0]), dm.relaxation(self.xp, dev_err / npix, pbound) if floor > 0 else None)
        return relax

    def fourier_projection(self, waves_f: Any, diffamp: Any, mask: Any, pbound: float = 0.0, floor: float = 0.0,
                           stats: Any = None) -> Any:
        """(4) in place on orthonormal Fourier-space waves (B, ..., n, n), all modes of a view in one
        pass; with ``pbound`` > 0 the relaxed projection (a first pass measures each view's deviation),
        r never below ``floor``."""
        if pbound > 0:
            _, rdt = self._suffix(waves_f.dtype)
            dev = self._fourier(waves_f, diffamp, mask, 0)
            self._fourier(waves_f, diffamp, mask, 1,
                          self._relax(dev, self._view_shape(waves_f)[2], pbound, floor, stats, rdt))
        else:
            if stats is not None:
                stats.add(None, int(waves_f.shape[0]))
            self._fourier(waves_f, diffamp, mask, 1)
        return waves_f

    def data_error(self, fphi: Any, diffamp: Any, mask: Any) -> Any:
        """(7) Σ_good (|F(P·O)| − √I)² of orthonormal Fourier-space waves (a device scalar)."""
        return self._fourier(fphi, diffamp, mask, 0).sum()

    def fourier_update(self, fpsi: Any, fphi: Any, diffamp: Any, mask: Any, pbound: float, beta: float,
                       floor: float = 0.0, stats: Any = None) -> Any:
        """data_error + reflect + fourier_projection + dm_update of dm.py in one kernel (two with the
        power bound, whose r is never below ``floor``), never storing the reflected waves:
        ``fpsi += β (Π_F(2 fphi − fpsi) − fphi)``; returns Σ_good (|fphi| − √I)² (device scalar)."""
        cp = self.xp
        B, M, npix = self._view_shape(fpsi)
        suf, rdt = self._suffix(fpsi.dtype)
        self._check(fpsi, fphi)
        m, use = self._mask_arg(mask)
        amp = self._amp_arg(diffamp, rdt)
        err = cp.zeros(B, cp.float64)
        if B == 0:
            return err.sum()
        grid = _grid(npix, B, self.sm_count)
        relax = self._dummy_real(rdt)
        if pbound > 0:
            dev = cp.zeros(B, cp.float64)
            self._k(f"reflect_error_{suf}")(grid, (BLOCK,), (fpsi, fphi, amp, m, np.int32(use), np.int32(B),
                                                            np.int32(M), np.int32(npix), dev))
            relax = self._relax(dev, npix, pbound, floor, stats, rdt)
        elif stats is not None:
            stats.add(None, B)
        self._k(f"fourier_update_{suf}")(grid, (BLOCK,), (fpsi, fphi, amp, m, np.int32(use), np.int32(B), np.int32(M),
                                                         np.int32(npix), relax, np.int32(pbound > 0), rdt(beta), err))
        return err.sum()

    def fft_exit_waves(self, probe: Any, obj_windows: Any, out: Any) -> Any:
        """Orthonormal F(P·O) in ``out``: the 1/n scaling is folded into the exit-wave kernel and the
        cuFFT runs raw (no separate scaling pass)."""
        n0, n1 = probe.shape[-2:]
        self.exit_waves(probe, obj_windows, out, scale=1.0 / math.sqrt(n0 * n1))
        return self._raw_fft(out, self._cufft.CUFFT_FORWARD)

    def exit_waves(self, probe: Any, obj_windows: Any, out: Any, scale: float = 1.0) -> Any:
        """(2) out[b, l, k] = scale · obj_windows[b, l] · probe[k]."""
        B, L = obj_windows.shape[:2]
        K, n0, n1 = probe.shape
        npix = n0 * n1
        probe = self.xp.ascontiguousarray(probe, dtype=out.dtype)
        self._check(obj_windows, out)
        suf, rdt = self._suffix(out.dtype)
        self._k(f"exit_waves_{suf}")(_grid(K * npix, B * L, self.sm_count), (BLOCK,),
                                     (probe, obj_windows, out, np.int32(B * L), np.int32(K), np.int32(npix), rdt(scale)))
        return out

    def _flat_grid(self, count: int) -> tuple[int, int]:
        return max(1, min(-(-count // BLOCK), self.sm_count * 16)), 1

    def reflect(self, fphi: Any, fpsi: Any, out: Any) -> Any:
        """(3) out = 2·fphi − fpsi (one pass; dm.reflect's generic code takes two)."""
        self._check(fphi, fpsi, out)
        suf, _ = self._suffix(out.dtype)
        self._k(f"reflect_{suf}")(self._flat_grid(out.size), (BLOCK,), (fphi, fpsi, out, np.int64(out.size)))
        return out

    def dm_update(self, fpsi: Any, fphi: Any, projected: Any, beta: float) -> Any:
        """(3) fpsi += beta · (projected − fphi) (in real or Fourier space: F is linear)."""
        self._check(fpsi, fphi, projected)
        suf, rdt = self._suffix(fpsi.dtype)
        self._k(f"dm_update_{suf}")(self._flat_grid(fpsi.size), (BLOCK,),
                                    (fpsi, fphi, projected, np.int64(fpsi.size), rdt(beta)))
        return fpsi

    def object_numerator(self, psi: Any, probe_conj: Any, out: Any) -> Any:
        """(6) out[b, l] = Σ_k probe_conj[k] · psi[b, l, k]."""
        B, L, K = psi.shape[:3]
        npix = psi.shape[-1] * psi.shape[-2]
        probe_conj = self.xp.ascontiguousarray(probe_conj, dtype=psi.dtype)
        self._check(psi, out)
        suf, _ = self._suffix(psi.dtype)
        self._k(f"object_numerator_{suf}")(_grid(npix, B * L, self.sm_count), (BLOCK,),
                                           (psi, probe_conj, out, np.int32(B * L), np.int32(K), np.int32(npix)))
        return out

    def probe_sums(self, psi: Any, obj_windows: Any, num: Any, den: Any = None, work: Any = None) -> None:
        """(5) num += Σ_{b,l} conj(O_win) · psi[:, :, k] and (unless den is None) den += Σ_{b,l} |O_win|²."""
        B, L, K = psi.shape[:3]
        npix = psi.shape[-1] * psi.shape[-2]
        self._check(psi, obj_windows, num)
        suf, rdt = self._suffix(psi.dtype)
        if den is None:
            den_arg, with_den = self._dummy_real(rdt), 0
        else:
            self._check(den)
            if den.dtype != rdt:
                raise TypeError(f"den must be {np.dtype(rdt)}, got {den.dtype}")
            den_arg, with_den = den, 1
        if B == 0:
            return
        gx = max(1, -(-K * npix // BLOCK))
        gy = max(1, min(B, -(-4 * self.sm_count // gx), MAX_GRID_Y))
        chunk = -(-B // gy)
        gy = -(-B // chunk)
        self._k(f"probe_sums_{suf}")((gx, gy), (BLOCK,),
                                     (psi, obj_windows, num.view(rdt), den_arg, np.int32(with_den), np.int32(B),
                                      np.int32(L), np.int32(K), np.int32(npix), np.int32(chunk)))

    def probe_numerator(self, psi: Any, obj_windows: Any, num: Any, work: Any = None) -> None:
        """(5) num += Σ_{b,l} conj(O_win) · psi[:, :, k] (no atomics contention: one owner per pixel
        and mode, views in a few chunks)."""
        self.probe_sums(psi, obj_windows, num, None)

    # --- the ML passes of the contract (cuda/ml.cu) ----------------------------------------------
    @staticmethod
    def _model_code(model: str) -> int:
        try:
            return ML_MODELS[model]
        except KeyError:
            raise ValueError(f"ML noise model must be one of {tuple(ML_MODELS)}, got {model!r}") from None

    def _ml_sums(self, kernel: str, waves: tuple, diffamp: Any, mask: Any, floor: float,
                 model: str) -> tuple[float, float]:
        """Launch ML kernel ``kernel`` over the batch of ``waves[0]`` (the arrays it takes first) and
        return its two sums over the batch."""
        cp = self.xp
        B, M, npix = self._view_shape(waves[0])
        suf, rdt = self._suffix(waves[0].dtype)
        code = self._model_code(model)
        m, use = self._mask_arg(mask)
        sums = cp.zeros((2, B), cp.float64)
        if B:
            self._k(f"{kernel}_{suf}")(
                _grid(npix, B, self.sm_count), (BLOCK,),
                (*waves, self._amp_arg(diffamp, rdt), m, np.int32(use), np.int32(B), np.int32(M),
                 np.int32(npix), rdt(floor), np.int32(code), sums[0], sums[1]))
        first, second = self.asnumpy(sums.sum(axis=1))
        return float(first), float(second)

    def ml_gradient(self, fphi: Any, diffamp: Any, intensity: Any, mask: Any, floor: float, model: str,
                    out: Any) -> tuple[float, float]:
        """ML pass 1 in one read of F(Φ): (L, data error (7)) of the batch and ``out`` = w·F(Φ)
        (``out`` may be ``fphi``); the kernel squares ``diffamp`` itself (``intensity`` unused)."""
        self._check(fphi, out)
        if out.shape != fphi.shape or out.dtype != fphi.dtype:
            raise ValueError("ml_gradient: out must have the shape and dtype of fphi")
        return self._ml_sums("ml_gradient", (fphi, out), diffamp, mask, floor, model)

    def ml_line_search(self, f0: Any, f1: Any, f2: Any, diffamp: Any, intensity: Any, mask: Any, floor: float,
                       model: str) -> tuple[float, float]:
        """ML pass 2: Σ_good L'(0), Σ_good L''(0) of the batch from F(Φ), F(A1), F(A2) in one pass."""
        self._check(f0, f1, f2)
        if not (f1.shape == f2.shape == f0.shape and f1.dtype == f2.dtype == f0.dtype):
            raise ValueError("ml_line_search: f0, f1, f2 must have one shape and dtype")
        return self._ml_sums("ml_line_search", (f0, f1, f2), diffamp, mask, floor, model)

    # --- the position-refinement sums of the contract (cuda/positions.cu) ------------------------
    def normal_equations(self, gr: Any, gc: Any, q: Any, pint: Any) -> tuple[np.ndarray, ...]:
        """Per-view Gauss-Newton sums (A_rr, A_cc, A_rc, b_r, b_c), numpy (B,) each, one block
        reduction per view over object modes and pixels."""
        cp = self.xp
        B, L = gr.shape[:2]
        npix = gr.shape[-1] * gr.shape[-2]
        suf, rdt = self._suffix(gr.dtype)
        self._check(gr, gc, q)
        if not (gc.shape == q.shape == gr.shape and gc.dtype == q.dtype == gr.dtype):
            raise ValueError("normal_equations: gr, gc, q must have one shape and dtype")
        out = cp.zeros((B, 5), cp.float64)
        if B:
            self._k(f"position_normal_{suf}")(
                _grid(L * npix, B, self.sm_count), (BLOCK,),
                (gr, gc, q, cp.ascontiguousarray(cp.asarray(pint, dtype=rdt)), np.int32(B), np.int32(L),
                 np.int32(npix), out))
        host = self.asnumpy(out)
        return tuple(np.ascontiguousarray(host[:, i]) for i in range(5))

    def view_errors(self, fphi: Any, diffamp: Any, mask: Any) -> np.ndarray:
        """Σ_good (|F(Φ)| − √I)² of each view, numpy (B,); ``diffamp`` (B, n, n) or (1, n, n) for all."""
        cp = self.xp
        B, M, npix = self._view_shape(fphi)
        suf, rdt = self._suffix(fphi.dtype)
        self._check(fphi)
        amp = self._amp_arg(diffamp, rdt)
        if amp.shape[0] not in (1, B) or amp.size != amp.shape[0] * npix:
            raise ValueError(f"view_errors: diffamp {amp.shape} does not match {B} views of {npix} pixels")
        m, use = self._mask_arg(mask)
        err = cp.zeros(B, cp.float64)
        if B:
            self._k(f"view_errors_{suf}")(
                _grid(npix, B, self.sm_count), (BLOCK,),
                (fphi, amp, np.int64(0 if amp.shape[0] == 1 else npix), m, np.int32(use), np.int32(B),
                 np.int32(M), np.int32(npix), err))
        return self.asnumpy(err)

    def object_gradient(self, obj: Any) -> tuple[Any, Any]:
        """(∂O/∂row, ∂O/∂col) of the object (L, H, W) by central differences, one kernel for both."""
        cp = self.xp
        L, H, W = obj.shape
        if H < 2 or W < 2:
            raise ValueError(f"object_gradient needs at least 2 x 2 pixels, got {H} x {W}")
        suf, _ = self._suffix(obj.dtype)
        obj = cp.ascontiguousarray(obj)
        drow, dcol = cp.empty_like(obj), cp.empty_like(obj)
        self._k(f"object_gradient_{suf}")(_grid(H * W, L, self.sm_count), (BLOCK,),
                                          (obj, np.int32(L), np.int32(H), np.int32(W), drow, dcol))
        return drow, dcol


# --- reducers across MPI ranks (one GPU each) ------------------------------------------------
# These run only on GPU machines with several ranks; CI cannot exercise them.
class StagedReducer:
    """Sums device arrays across ranks by staging them through pinned host memory into a host
    reducer (the MPI one of :mod:`hxn_ptycho.distributed`). Host arrays pass straight through."""

    def __init__(self, host: Any, backend: CupyBackend) -> None:
        self.host, self.be = host, backend
        self.rank, self.size = host.rank, host.size
        self._pinned: dict[tuple, np.ndarray] = {}

    def _buf(self, i: int, a: Any) -> np.ndarray:
        key = (i, a.shape, a.dtype.str)
        buf = self._pinned.get(key)
        if buf is None:
            buf = self._pinned[key] = self.be.pinned_empty(a.shape, a.dtype)
        return buf

    def allreduce_sum(self, arrays: list) -> None:
        cp = self.be.xp
        staged = []
        for i, a in enumerate(arrays):
            if isinstance(a, cp.ndarray):
                h = self._buf(i, a)
                cp.ascontiguousarray(a).get(out=h)
                staged.append(h)
            else:
                staged.append(a)
        self.host.allreduce_sum(staged)
        for a, h in zip(arrays, staged):
            if isinstance(a, cp.ndarray):
                a[...] = cp.asarray(h)


class NcclReducer:
    """Sums device arrays across ranks with NCCL (cupy.cuda.nccl), in place on the device.

    UNTESTED in CI (needs several GPUs): the NCCL id is shared with a sum over the host reducer
    (rank 0 contributes it, the others zeros). Host arrays go through the host reducer.
    """

    def __init__(self, host: Any, backend: CupyBackend) -> None:
        from cupy.cuda import nccl
        self.nccl, self.host, self.be = nccl, host, backend
        self.rank, self.size = host.rank, host.size
        uid = np.zeros(128, np.int64)       # NCCL_UNIQUE_ID_BYTES
        if self.rank == 0:
            uid[:] = np.asarray(nccl.get_unique_id(), np.int64)
        host.allreduce_sum([uid])
        with backend.device:
            self.comm = nccl.NcclCommunicator(self.size, tuple(int(x) for x in uid), self.rank)

    def allreduce_sum(self, arrays: list) -> None:
        cp, nccl = self.be.xp, self.nccl
        host = [a for a in arrays if not isinstance(a, cp.ndarray)]
        dev = [a for a in arrays if isinstance(a, cp.ndarray)]
        stream = cp.cuda.get_current_stream().ptr
        nccl.groupStart()
        for a in dev:
            if not a.flags.c_contiguous:
                raise ValueError("NcclReducer needs C-contiguous arrays")
            rdt = a.real.dtype if a.dtype.kind == "c" else a.dtype
            count = a.size * (2 if a.dtype.kind == "c" else 1)
            kind = nccl.NCCL_FLOAT32 if rdt == np.float32 else nccl.NCCL_FLOAT64
            self.comm.allReduce(a.data.ptr, a.data.ptr, count, kind, nccl.NCCL_SUM, stream)
        nccl.groupEnd()
        if host:
            self.host.allreduce_sum(host)


def make_reducer(host: Any, backend: CupyBackend, prefer: str | None = None) -> Any:
    """The device-side reducer for ``host`` (an object with rank, size, allreduce_sum).

    One process: ``host`` itself. Several: NCCL when CuPy has it (``prefer="staged"`` or
    ``$HXN_PTYCHO_REDUCER=staged`` turns it off), else staging through pinned host memory.
    CUDA-aware MPI would go through the host reducer's own comm; not wired (untestable here).
    """
    if getattr(host, "size", 1) <= 1:
        return host
    prefer = prefer or os.environ.get("HXN_PTYCHO_REDUCER", "auto")
    if prefer in ("auto", "nccl"):
        try:
            from cupy.cuda import nccl
            if getattr(nccl, "available", True):
                return NcclReducer(host, backend)
        except Exception as exc:
            if prefer == "nccl":
                raise BackendError(f"NCCL reducer requested but not usable: {exc}") from None
    return StagedReducer(host, backend)
