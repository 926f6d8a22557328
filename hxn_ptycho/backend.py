"""The array backend: a typed contract of whole batch passes, and the numpy reference.

The engine (``engine.py``), the DM iteration (``dm_iteration.py``), ML (``ml.py``) and position
refinement (``positions.py``) call a :class:`Backend` by its methods only: arrays and transfers,
FFTs, windows, and the **passes** — the work on one batch of views that a backend may fuse into as
few sweeps over memory as it can:

- :meth:`Backend.fourier_pass`: exit waves (2), the reflected wave's transform, its data error (7),
  the modulus step (4), the inverse transform and the DM update of ψ (3) in real space;
- :meth:`Backend.object_pass`, :meth:`Backend.probe_pass`: the sums of the object (6) and probe (5)
  updates; :meth:`Backend.error_pass`: the data error of the model (7);
- :meth:`Backend.ml_gradient`, :meth:`Backend.ml_line_search`: the two ML passes' sums;
- :meth:`Backend.normal_equations`, :meth:`Backend.view_errors`, :meth:`Backend.object_gradient`:
  the position-refinement sums.

Every method is abstract: a backend that lacks one cannot be made (``TypeError`` at start-up), and
:func:`check_backend` names what a duck-typed object lacks. There is no dispatch by attribute name
and no fallback: :class:`NumpyBackend` is the reference, written with the step functions of
:mod:`hxn_ptycho.dm`, :mod:`hxn_ptycho.ml` and :mod:`hxn_ptycho.positions` (the equations);
:class:`hxn_ptycho.cpu_kernels.NumbaBackend` fuses the DM passes on the CPU, and
:class:`hxn_ptycho.gpu.CupyBackend` runs them with the CUDA kernels of ``cuda/``.

Array layouts used everywhere:

- object ``(L, H, W)``, probe ``(K, n, n)``, complex
- exit waves of a batch ``(B, L, K, n, n)``, complex, C-contiguous
- ``diffamp`` of a batch ``(B, n, n)`` float, ``mask`` ``(n, n)`` bool (true = good) or None
- window corners ``pos`` ``(B, 2)`` int64 (row, col); sub-pixel corners ``(B, 2)`` float64
"""
from __future__ import annotations

import inspect
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import scipy.fft
from .errors import BadInput


class BackendError(BadInput):
    """The requested backend is not available here (e.g. no CuPy or no GPU), or it lacks a pass."""


class BatchBuffers(Protocol):
    """A worker's scratch for one batch (``engine._Worker``): exit waves ``phi``, ``work`` (B, L, K, n, n),
    windows ``objwin``, ``tmp``, ``onum_src`` (B, L, n, n); the passes slice the first B views."""

    phi: Any
    work: Any
    objwin: Any
    tmp: Any
    onum_src: Any


@dataclass
class ObjectSums:
    """The accumulators of the object update (6) that :meth:`Backend.fourier_pass` may fill from the
    new ψ in the same sweep: ``num[l, window b] += Σ_k probe_conj[k]·ψ[b, l, k]``,
    ``den[0, window b] += probe_intensity`` (what :meth:`Backend.object_pass` adds); ``den`` None:
    the numerator alone (:meth:`Backend.object_update` forms the denominator, ``den_at``)."""

    probe_conj: Any
    probe_intensity: Any
    num: Any
    den: Any


class Backend(ABC):
    """What the engine needs of an array backend; :class:`NumpyBackend` is the reference.

    ``workers``: the threads the engine splits the batches over (the CPU's; 1 on a GPU, which
    takes large batches); ``cache_batches``: batches sized to the CPU cache (else to the memory
    bound); ``on_host``: the arrays are host memory (no staging through pinned buffers).
    """

    name: str = ""
    fft_library: str = ""       # what fft2/ifft2 run: "pocketfft" (scipy.fft), "fftw", "mkl" (HXN_PTYCHO_FFT), "cufft"
    xp: Any = None
    workers: int = 1
    cache_batches: bool = False
    on_host: bool = False

    def warm_up(self, cdtype: Any = np.complex64) -> float:
        """Load or compile what the first iteration would (kernels, FFT plans) for ``cdtype``; returns
        the seconds. Nothing to load for a backend without compiled kernels."""
        return 0.0

    def prepare(self, cdtype: Any = np.complex64) -> None:
        """Called by a reconstruction before it allocates its arrays: load what its passes will
        need for ``cdtype`` and give back what loading left resident (the numba backend's kernels
        and LLVM's start-up pages: issue 24's peak memory). Nothing for a backend without
        compiled kernels."""
        return None

    # --- arrays and transfers -------------------------------------------------------------
    @abstractmethod
    def asarray(self, a: Any, dtype: Any = None) -> Any: ...
    @abstractmethod
    def asnumpy(self, a: Any) -> np.ndarray: ...
    @abstractmethod
    def empty(self, shape: tuple, dtype: Any) -> Any: ...
    @abstractmethod
    def zeros(self, shape: tuple, dtype: Any) -> Any: ...
    @abstractmethod
    def synchronize(self) -> None: ...
    @abstractmethod
    def pinned_empty(self, shape: tuple, dtype: Any) -> np.ndarray:
        """A host array for exit waves streamed batch by batch (page-locked on a GPU)."""
    @abstractmethod
    def to_device(self, host: np.ndarray, out: Any) -> Any: ...
    @abstractmethod
    def to_host(self, dev: Any, out: np.ndarray) -> np.ndarray: ...
    @abstractmethod
    def memory_info(self) -> tuple[int, int] | None:
        """(free, total) bytes of the device's memory, or None for host memory."""
    @abstractmethod
    def fft_work_bytes(self, batch: int, modes: int, n: int, dtype: Any = np.complex64) -> int:
        """Bytes of FFT work area a batch needs beyond its arrays."""

    # --- FFTs (orthonormal, over the last two axes, in place: ``a`` is transformed and returned) --
    @abstractmethod
    def fft2(self, a: Any, workers: int = 1) -> Any: ...
    @abstractmethod
    def ifft2(self, a: Any, workers: int = 1) -> Any: ...

    # --- windows ----------------------------------------------------------------------------
    @abstractmethod
    def gather(self, obj: Any, pos: Any, n: int, out: Any = None) -> Any:
        """``out[b, l] = obj[l, r_b:r_b+n, c_b:c_b+n]``."""
    @abstractmethod
    def scatter_add(self, acc: Any, pos: Any, src: Any) -> None:
        """``acc[l, window b] += src[b, l]`` (``src`` may be ``(n, n)``: the same at every view)."""
    @abstractmethod
    def gather_subpixel(self, obj: Any, pos: Any, n: int, out: Any, tmp: Any = None) -> Any:
        """Bilinear windows at the float corners ``pos`` (``geometry.bilinear_gather``)."""
    @abstractmethod
    def scatter_add_subpixel(self, acc: Any, pos: Any, src: Any) -> None:
        """The adjoint of :meth:`gather_subpixel` (``geometry.bilinear_scatter``)."""

    # --- DM passes (dm.py: the equations) ----------------------------------------------------
    @abstractmethod
    def fourier_pass(self, obj: Any, pos: Any, probe: Any, psi: Any, diffamp: Any, mask: Any,
                     pbound: float, beta: float, floor: float, stats: Any, buf: BatchBuffers,
                     windows: Any = None, sums: ObjectSums | None = None, rows: Any = None) -> Any:
        """The Fourier step of one batch (``dm.dm_step``): Φ = P·O at ``pos`` (2) — from ``windows``
        (B, L, n, n) instead when given (sub-pixel) —, F(2Φ − ψ), its projection Π_F (4) and
        ``psi += β(F⁻¹Π_F(F(2Φ − ψ)) − Φ)`` (3) in place, with ``buf.phi``, ``buf.work`` as the only
        scratch; returns Σ_good (|F(2Φ − ψ)| − √I)² (7) of the reflected wave. ``floor``, ``stats``:
        those of ``dm.fourier_projection``. With ``sums``, also the object sums (6) of the new ψ —
        exactly what :meth:`object_pass` would add at the same corners (sub-pixel when ``windows``
        is given) —, which a backend may fuse into the update's sweep. ``rows`` (B,) int64: the
        batch's frames are ``diffamp[rows]`` (``diffamp`` then holds every view's, in another order
        than ψ's rows: :meth:`hxn_ptycho.engine.Reconstruction.frames`), read where they lie;
        None: ``diffamp`` is the batch's (B, n, n)."""
    @abstractmethod
    def object_pass(self, psi: Any, probe_conj: Any, probe_intensity: Any, pos: Any, obj_num: Any, obj_den: Any,
                    buf: BatchBuffers, subpixel: bool = False) -> None:
        """(6) ``obj_num[l, window b] += Σ_k P_k*·ψ[b, l, k]``, ``obj_den[0, window b] += Σ_k |P_k|²``
        (``pos`` float corners with ``subpixel``)."""
    @abstractmethod
    def object_update(self, nums: Sequence[Any], dens: Sequence[Any] | None, old: Any, reg: float,
                      split: Callable[[Callable[[int, int], None]], None] | None = None,
                      den_at: tuple[Any, Any] | None = None) -> tuple[Any, np.ndarray]:
        """(6) O = (Σ nums + α·O_old) / (Σ dens + α), α = reg·max(Σ dens), from the workers'
        accumulators ``nums`` (L, H, W), ``dens`` (1, H, W) summed in their order, and ε_O of (7)
        against ``old`` per mode: ``dm.object_update``. Returns (the new object, a new array; ε_O,
        numpy (L,)); the accumulators are left zero. ``split(fn)`` runs ``fn(part, parts)`` for every
        part on the engine's workers (a backend may share the object's rows out so). ``den_at`` =
        (probe intensity (n, n), corners (N, 2) of every view): the denominator is Σ_j of the
        probe intensity at the corners, formed here (``dens`` unused: the Fourier pass was given
        ``ObjectSums.den`` None)."""
    @abstractmethod
    def probe_pass(self, psi: Any, obj: Any, pos: Any, num: Any, den: Any, buf: BatchBuffers,
                   windows: Any = None) -> None:
        """(5) ``num[k] += Σ_b,l O_l*(window b)·ψ[b, l, k]``, ``den += Σ_b,l |O_l(window b)|²``
        (the windows from ``windows`` when given)."""
    @abstractmethod
    def error_pass(self, obj: Any, pos: Any, probe: Any, diffamp: Any, mask: Any, buf: BatchBuffers,
                   windows: Any = None) -> Any:
        """(7) Σ_good (|F(P·O)| − √I)² of the model over one batch."""

    # --- ML passes (ml.py) --------------------------------------------------------------------
    @abstractmethod
    def ml_gradient(self, fphi: Any, diffamp: Any, intensity: Any, mask: Any, floor: float, model: str,
                    out: Any) -> tuple[float, float]:
        """ML pass 1: (cost L, data error (7)) of a batch; ``out`` = gradient weight · F(Φ)."""
    @abstractmethod
    def ml_line_search(self, f0: Any, f1: Any, f2: Any, diffamp: Any, intensity: Any, mask: Any, floor: float,
                       model: str) -> tuple[float, float]:
        """ML pass 2: Σ L'(0), Σ L''(0) along the search direction (the Newton step −L'/L'')."""

    # --- position-refinement sums (positions.py) ------------------------------------------------
    @abstractmethod
    def normal_equations(self, gr: Any, gc: Any, q: Any, pint: Any) -> tuple[np.ndarray, ...]:
        """Per-view Gauss-Newton sums (A_rr, A_cc, A_rc, b_r, b_c), numpy ``(B,)`` each."""
    @abstractmethod
    def view_errors(self, fphi: Any, diffamp: Any, mask: Any) -> np.ndarray:
        """Per-view data error Σ_good (|F(Φ)| − √I)², numpy ``(B,)``."""
    @abstractmethod
    def object_gradient(self, obj: Any) -> tuple[Any, Any]:
        """(∂O/∂row, ∂O/∂col) by central differences."""


# every method of the contract (abstract in Backend)
CONTRACT = tuple(sorted(Backend.__abstractmethods__))
DM_PASSES = ("fourier_pass", "object_pass", "probe_pass", "error_pass")
ML_STEPS = ("ml_gradient", "ml_line_search")                             # the ML passes' sums
POSITION_STEPS = ("normal_equations", "view_errors", "object_gradient")  # the position-refinement sums
PASSES = DM_PASSES + ML_STEPS + POSITION_STEPS


def check_backend(be: Any) -> Any:
    """``be`` if it has every method of :class:`Backend` with the contract's parameters; else a
    :class:`BackendError` naming what is missing (a backend is checked when a reconstruction starts)."""
    missing, wrong = [], []
    for name in CONTRACT:
        fn = getattr(type(be), name, None)
        if fn is None or getattr(fn, "__isabstractmethod__", False):
            fn = be.__dict__.get(name) if hasattr(be, "__dict__") else None
        if fn is None or not callable(fn) or getattr(fn, "__isabstractmethod__", False):
            missing.append(name)
            continue
        want = list(inspect.signature(getattr(Backend, name)).parameters)[1:]
        try:
            params = inspect.signature(getattr(be, name)).parameters
        except (TypeError, ValueError):     # pragma: no cover - builtins
            continue
        have = list(params)
        wrapped = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params.values())   # (*args, **kw)
        if have[:len(want)] != want and not wrapped:
            wrong.append(f"{name}({', '.join(have)}) instead of ({', '.join(want)})")
    if missing or wrong:
        raise BackendError(f"backend {getattr(be, 'name', type(be).__name__)!r} does not implement the backend "
                           f"contract: " + "; ".join(([f"missing {', '.join(missing)}"] if missing else []) + wrong))
    return be


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


FFT_ENV = "HXN_PTYCHO_FFT"      # "fftw": FFTW (pyfftw), "mkl": Intel MKL (mkl_fft); else scipy.fft (pocketfft)


def _import_pyfftw() -> Any:
    """``import pyfftw`` without the dask interface it offers: ``pyfftw.interfaces`` imports
    ``dask.array`` where dask is installed (the Tiled stack brings it), 0.66 s of a rank's start-up
    for an interface the engine never uses. A ``None`` in ``sys.modules`` makes that optional import
    fail as if dask were absent (pyfftw catches it); the entry is removed again, so a later
    ``import dask.array`` works as usual."""
    import sys
    blocked = "dask.array" not in sys.modules
    if blocked:
        sys.modules["dask.array"] = None  # type: ignore[assignment]
    try:
        import pyfftw
    finally:
        if blocked and sys.modules.get("dask.array", 0) is None:
            del sys.modules["dask.array"]
    return pyfftw


class FFTWTransforms:
    """Orthonormal 2-D FFTs over the last two axes, in place, by FFTW through ``pyfftw`` (optional: not
    a dependency; FFTW is GPL-licensed). One plan per thread, shape, strides, dtype, direction,
    alignment and thread count, made once with ``FFTW_ESTIMATE`` (the plan follows from the shape
    alone, not from timings, so runs are reproducible; ``FFTW_MEASURE`` was no faster here) on a
    scratch array (planning is serialised: FFTW's planner is not thread-safe) and run on the caller's
    array; FFTW leaves the transform unnormalised, so the result is scaled by 1/√(n₀n₁) on its real
    view. Arrays not aligned to FFTW's SIMD width get an unaligned plan (correct, about 2 × slower):
    the host backends allocate aligned arrays when FFTW is in use (:meth:`HostBackend.empty`)."""

    ALIGN = 64

    def __init__(self) -> None:
        try:
            pyfftw = _import_pyfftw()
        except ImportError as exc:
            raise BackendError(f"{FFT_ENV}=fftw needs pyfftw (pip install pyfftw): {exc}") from None
        import threading
        self._pyfftw = pyfftw
        self._local = threading.local()
        self._lock = threading.Lock()

    def _plan(self, a: np.ndarray, forward: bool, workers: int) -> Any:
        plans = getattr(self._local, "plans", None)
        if plans is None:
            plans = self._local.plans = {}
        aligned = a.ctypes.data % self._pyfftw.simd_alignment == 0
        key = (a.shape, a.strides, a.dtype.str, forward, aligned, workers)
        plan = plans.get(key)
        if plan is None:
            with self._lock:
                tmp = self._pyfftw.empty_aligned(a.shape, a.dtype)
                flags = ("FFTW_ESTIMATE", "FFTW_DESTROY_INPUT") + (() if aligned else ("FFTW_UNALIGNED",))
                plan = self._pyfftw.FFTW(tmp, tmp, axes=(-2, -1), direction="FFTW_FORWARD" if forward
                                         else "FFTW_BACKWARD", flags=flags, threads=max(1, workers))
            plans[key] = plan
        return plan

    def __call__(self, a: np.ndarray, forward: bool, workers: int = 1) -> np.ndarray:
        if not a.flags.c_contiguous or a.dtype not in (np.complex64, np.complex128):
            f = scipy.fft.fft2 if forward else scipy.fft.ifft2
            return _in_place(a, f(a, norm="ortho", overwrite_x=True, workers=workers))
        plan = self._plan(a, forward, workers)
        plan.update_arrays(a, a)
        plan.execute()
        real = a.view(a.real.dtype)
        real *= real.dtype.type(1.0 / np.sqrt(a.shape[-1] * a.shape[-2]))
        return a


class MKLTransforms:
    """Orthonormal 2-D FFTs over the last two axes, in place, by Intel MKL's DFTI through ``mkl_fft``
    (optional, ``pip install -e ".[mkl]"``: mkl_fft is BSD-licensed, MKL itself under Intel's
    Simplified Software License — permissive, unlike FFTW's GPL — but a 1 GB install, hence not a
    dependency). Each 2-D slice ``a[..., :, :]`` is one call of ``mkl_fft``'s ``_direct_fftnd`` on
    that slice in place (its descriptors are cached per thread by mkl_fft), with the forward scale
    1/√(n₀n₁), which DFTI applies in both directions (orthonormal). ``mkl_fft.fft2(a, axes=...)``
    runs the same slice loop with more Python around it, and with ``norm="ortho"`` scales by the
    whole array's size rather than the transformed axes' (mkl_fft 2.3), so it is not used.

    Threads: MKL would start its own threads (OpenMP) inside every call, on the cores the engine's
    workers already use — each worker thread runs its own batches. So the FFT domain is set to one
    thread when the transforms are made (``MKL_Domain_Set_Num_Threads(1, MKL_DOMAIN_FFT)``, the
    call mkl-service's ``domain_set_num_threads`` makes; the BLAS and other domains are left alone),
    and a call asking for ``workers`` > 1 sets that many for its own thread only
    (``MKL_Set_Num_Threads_Local``) and restores it after."""

    ALIGN = 64          # MKL's recommended alignment (the host backends allocate so with it)
    MKL_DOMAIN_FFT = 2  # mkl_service.h

    def __init__(self) -> None:
        try:
            from mkl_fft._pydfti import _direct_fftnd
        except ImportError as exc:
            raise BackendError(f"{FFT_ENV}=mkl needs mkl_fft (pip install mkl_fft): {exc}") from None
        self._direct = _direct_fftnd
        self._rt = _mkl_runtime()
        self._rt.MKL_Domain_Set_Num_Threads(1, self.MKL_DOMAIN_FFT)
        self._check()

    def _check(self) -> None:
        """``_direct_fftnd`` is mkl_fft's private function: refuse it, naming the problem, unless it gives
        ``scipy.fft.fft2``'s orthonormal transform and its inverse, in place, on a small batch here."""
        a = (np.arange(24.0) + 1j * np.arange(24.0)[::-1]).reshape(2, 3, 4).astype(np.complex64)
        want = scipy.fft.fft2(a, norm="ortho")
        try:
            got = self(a.copy(), True)
            back = self(got.copy(), False)
        except (TypeError, ValueError, RuntimeError) as exc:     # another mkl_fft's signature
            raise BackendError(f"{FFT_ENV}=mkl: this mkl_fft's transforms could not be called: {exc}") from None
        if not (np.allclose(got, want, atol=1e-5) and np.allclose(back, a, atol=1e-5)):
            raise BackendError(f"{FFT_ENV}=mkl: this mkl_fft's transforms differ from scipy.fft's orthonormal "
                               "FFT; use HXN_PTYCHO_FFT=pocketfft")

    @property
    def fft_threads(self) -> int:
        """The threads MKL may use inside one FFT call of this thread (1 unless a call asks for more)."""
        return int(self._rt.MKL_Domain_Get_Max_Threads(self.MKL_DOMAIN_FFT))

    def __call__(self, a: np.ndarray, forward: bool, workers: int = 1) -> np.ndarray:
        if not a.flags.c_contiguous or a.dtype not in (np.complex64, np.complex128) or a.ndim < 2:
            f = scipy.fft.fft2 if forward else scipy.fft.ifft2
            return _in_place(a, f(a, norm="ortho", overwrite_x=True, workers=workers))
        n0, n1 = a.shape[-2:]
        fsc = 1.0 / float(np.sqrt(n0 * n1))
        direction = 1 if forward else -1
        direct = self._direct
        before = self._rt.MKL_Set_Num_Threads_Local(int(workers)) if workers > 1 else None
        try:
            if a.ndim == 2:
                direct(a, direction=direction, fsc=fsc, out=a)
            else:
                for s in a.reshape(-1, n0, n1):
                    direct(s, direction=direction, fsc=fsc, out=s)
        finally:
            if before is not None:
                self._rt.MKL_Set_Num_Threads_Local(before)
        return a


def _mkl_runtime() -> Any:
    """MKL's single dynamic library (``libmkl_rt``), the one ``mkl_fft`` is linked with and has loaded."""
    import ctypes
    from mkl_fft import _pydfti
    errors = []
    for name in ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so", "mkl_rt.2.dll", "mkl_rt.dll", "libmkl_rt.dylib"):
        try:
            rt = ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
            continue
        for fn in ("MKL_Domain_Set_Num_Threads", "MKL_Domain_Get_Max_Threads", "MKL_Set_Num_Threads_Local"):
            getattr(rt, fn).restype = ctypes.c_int
            getattr(rt, fn).argtypes = [ctypes.c_int] * (2 if fn == "MKL_Domain_Set_Num_Threads" else 1)
        return rt
    raise BackendError(f"{FFT_ENV}=mkl: MKL's runtime library (libmkl_rt) beside {_pydfti.__file__} "
                       f"could not be loaded: {'; '.join(errors)}")


def _pocketfft_c2c() -> Any:
    """``scipy.fft``'s own in-place pocketfft call, ``c2c(a, axes, forward, inorm, out, workers)``, or
    None. ``scipy.fft.fft2`` costs about 13 µs a call before it reaches this function (argument
    checks and the uarray backend dispatch), twice a batch and with the GIL held, where the call
    itself costs 1 µs; it is the transform ``scipy.fft.fft2(a, norm="ortho", overwrite_x=True)``
    runs on a C-contiguous complex array. The module is scipy's private one, so it is used only when
    it exists and gives ``scipy.fft.fft2``'s result on a small array here (else ``scipy.fft``)."""
    try:
        from scipy.fft._pocketfft import pypocketfft
        c2c = pypocketfft.c2c
        a = (np.arange(24.0) + 1j * np.arange(24.0)[::-1]).reshape(2, 3, 4).astype(np.complex64)
        want = scipy.fft.fft2(a, norm="ortho")
        got = c2c(a.copy(), (-2, -1), True, 1, None, 1)
        back = c2c(got.copy(), (-2, -1), False, 1, None, 1)
        if got.dtype == want.dtype and np.allclose(got, want, atol=1e-5) and np.allclose(back, a, atol=1e-5):
            return c2c
    except (ImportError, AttributeError, TypeError, ValueError, RuntimeError):   # pragma: no cover - another scipy
        pass
    return None     # pragma: no cover


_C2C = _pocketfft_c2c()
_C2C_TYPES = (np.dtype(np.complex64), np.dtype(np.complex128))     # native byte order (others: scipy.fft)


def _fft_transforms() -> FFTWTransforms | MKLTransforms | None:
    """The FFTW transforms when ``HXN_PTYCHO_FFT=fftw``, MKL's with ``mkl``; None: ``scipy.fft``."""
    choice = os.environ.get(FFT_ENV, "").strip().lower()
    if choice in ("", "pocketfft", "scipy"):
        return None
    if choice == "fftw":
        return FFTWTransforms()
    if choice == "mkl":
        return MKLTransforms()
    raise BackendError(f"{FFT_ENV}={choice!r}: choose fftw, mkl or pocketfft")


ALIGN = 64          # bytes: the host backends' arrays start on a cache line (HostBackend.empty)


def _aligned_empty(shape: tuple, dtype: Any, align: int, zero: bool = False) -> np.ndarray:
    """``np.empty(shape, dtype)`` whose data start at a multiple of ``align`` bytes (``zero``: as
    ``np.zeros``, whose pages stay untouched, not resident, until written)."""
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = (np.zeros if zero else np.empty)(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes].view(dt).reshape(shape)


def _in_place(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``a`` holding ``out`` (scipy transforms contiguous complex input in place; copy otherwise)."""
    if out.__array_interface__["data"][0] != a.__array_interface__["data"][0]:
        a[...] = out
    return a


class HostBackend(Backend, ABC):
    """What every CPU backend shares: numpy arrays in host memory, ``scipy.fft``, views split across
    ``threads`` workers. The passes stay abstract: each CPU backend states its own."""

    xp = np
    cache_batches = True
    on_host = True

    def __init__(self, threads: int | None = None) -> None:
        self.threads = max(1, int(threads or available_cores()))
        self.workers = self.threads
        self._fftw = _fft_transforms()
        self.fft_library = ("pocketfft" if self._fftw is None else
                            "mkl" if isinstance(self._fftw, MKLTransforms) else "fftw")
        self._align = ALIGN if self._fftw is None else max(ALIGN, self._fftw.ALIGN)

    # --- arrays ---------------------------------------------------------------------------
    def asarray(self, a: Any, dtype: Any = None) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=dtype)

    def asnumpy(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def empty(self, shape: tuple, dtype: Any) -> np.ndarray:
        """Aligned to ``ALIGN`` bytes (a cache line; FFTW's SIMD plans and MKL need it too): numpy's
        own large arrays start 16 bytes into a line, so that every AVX-512 load of the kernels'
        rows would straddle two lines."""
        return _aligned_empty(shape, dtype, self._align)

    def zeros(self, shape: tuple, dtype: Any) -> np.ndarray:
        return _aligned_empty(shape, dtype, self._align, zero=True)

    def synchronize(self) -> None:
        pass

    def pinned_empty(self, shape: tuple, dtype: Any) -> np.ndarray:
        return self.empty(shape, dtype)

    def to_device(self, host: np.ndarray, out: Any) -> Any:
        out[...] = host
        return out

    def to_host(self, dev: Any, out: np.ndarray) -> np.ndarray:
        out[...] = dev
        return out

    def memory_info(self) -> tuple[int, int] | None:
        return None

    def fft_work_bytes(self, batch: int, modes: int, n: int, dtype: Any = np.complex64) -> int:
        return 0

    # --- FFTs --------------------------------------------------------------------------------
    def fft2(self, a: np.ndarray, workers: int = 1) -> np.ndarray:
        if self._fftw is not None:
            return self._fftw(a, True, workers)
        if _C2C is not None and a.dtype in _C2C_TYPES and a.flags.c_contiguous and a.ndim >= 2:
            return _C2C(a, (-2, -1), True, 1, a, workers)        # orthonormal, in place
        return _in_place(a, scipy.fft.fft2(a, norm="ortho", overwrite_x=True, workers=workers))

    def ifft2(self, a: np.ndarray, workers: int = 1) -> np.ndarray:
        if self._fftw is not None:
            return self._fftw(a, False, workers)
        if _C2C is not None and a.dtype in _C2C_TYPES and a.flags.c_contiguous and a.ndim >= 2:
            return _C2C(a, (-2, -1), False, 1, a, workers)
        return _in_place(a, scipy.fft.ifft2(a, norm="ortho", overwrite_x=True, workers=workers))

    # --- windows ----------------------------------------------------------------------------
    def gather(self, obj: np.ndarray, pos: np.ndarray, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """``out[b, l] = obj[l, r_b:r_b+n, c_b:c_b+n]`` for every view b of the batch."""
        if out is None:
            out = np.empty((len(pos), obj.shape[0], n, n), dtype=obj.dtype)
        for b, (r, c) in enumerate(pos):
            out[b] = obj[:, r:r + n, c:c + n]
        return out

    def scatter_add(self, acc: np.ndarray, pos: np.ndarray, src: np.ndarray) -> None:
        """``acc[l, r_b:r_b+n, c_b:c_b+n] += src[b, l]`` (overlapping windows add up).

        One vectorised add per view (never per pixel); ``src`` may be ``(n, n)`` to add the same
        window at every position (the denominators of equation (6)).
        """
        n = src.shape[-1]
        if src.ndim == 2:
            for r, c in pos:
                acc[:, r:r + n, c:c + n] += src
        else:
            for b, (r, c) in enumerate(pos):
                acc[:, r:r + n, c:c + n] += src[b]

    def gather_subpixel(self, obj: Any, pos: Any, n: int, out: Any, tmp: Any = None) -> Any:
        from .geometry import bilinear_gather
        return bilinear_gather(self, obj, pos, n, out, tmp)

    def scatter_add_subpixel(self, acc: Any, pos: Any, src: Any) -> None:
        from .geometry import bilinear_scatter
        bilinear_scatter(self, acc, pos, src)

    # --- ML and position sums: the numpy definitions (no CPU kernels of their own) ------------
    def ml_gradient(self, fphi: Any, diffamp: Any, intensity: Any, mask: Any, floor: float, model: str,
                    out: Any) -> tuple[float, float]:
        from . import ml
        return ml.ml_gradient(self, fphi, diffamp, intensity, mask, floor, model, out)

    def ml_line_search(self, f0: Any, f1: Any, f2: Any, diffamp: Any, intensity: Any, mask: Any, floor: float,
                       model: str) -> tuple[float, float]:
        from . import ml
        return ml.ml_line_search(self, f0, f1, f2, diffamp, intensity, mask, floor, model)

    def normal_equations(self, gr: Any, gc: Any, q: Any, pint: Any) -> tuple[np.ndarray, ...]:
        from . import positions
        return positions.normal_equations(self, gr, gc, q, pint)

    def view_errors(self, fphi: Any, diffamp: Any, mask: Any) -> np.ndarray:
        from . import positions
        return positions.view_errors(self, fphi, diffamp, mask)

    def object_gradient(self, obj: Any) -> tuple[Any, Any]:
        from . import positions
        return positions.object_gradient(self, obj)


class NumpyBackend(HostBackend):
    """The reference: the DM passes as the step functions of :mod:`hxn_ptycho.dm`, one numpy
    expression per equation (several sweeps over each batch, temporaries of a batch)."""

    name = "numpy"

    def exit_waves_at(self, obj: np.ndarray, pos: np.ndarray, probe: np.ndarray, out: np.ndarray) -> np.ndarray:
        """(2) ``out[b, l, k] = obj[l, window b] · probe[k]``, straight from the object (no gathered copy)."""
        n = probe.shape[-1]
        pr = probe[None]
        for b, (r, c) in enumerate(pos):
            np.multiply(obj[:, None, r:r + n, c:c + n], pr, out=out[b])
        return out

    def _phi(self, obj: Any, pos: Any, probe: Any, buf: BatchBuffers, B: int, windows: Any) -> Any:
        from . import dm
        if windows is None:
            return self.exit_waves_at(obj, pos, probe, buf.phi[:B])
        return dm.exit_waves(self, probe, windows, buf.phi[:B])

    def fourier_pass(self, obj: Any, pos: Any, probe: Any, psi: Any, diffamp: Any, mask: Any,
                     pbound: float, beta: float, floor: float, stats: Any, buf: BatchBuffers,
                     windows: Any = None, sums: ObjectSums | None = None, rows: Any = None) -> Any:
        from . import dm
        B = len(psi)
        if rows is not None:
            diffamp = diffamp[rows]
        phi = self._phi(obj, pos, probe, buf, B, windows)                                # P·O
        err = dm.dm_step(self, psi, phi, diffamp, mask, pbound, beta, floor, stats, buf.work[:B])
        if sums is not None and sums.den is None:                                        # (6)'s numerator
            src = dm.object_numerator(self, psi, sums.probe_conj, buf.onum_src[:B])
            (self.scatter_add_subpixel if windows is not None else self.scatter_add)(sums.num, pos, src)
        elif sums is not None:                                                           # (6)
            self.object_pass(psi, sums.probe_conj, sums.probe_intensity, pos, sums.num, sums.den, buf,
                             windows is not None)
        return err

    def object_pass(self, psi: Any, probe_conj: Any, probe_intensity: Any, pos: Any, obj_num: Any, obj_den: Any,
                    buf: BatchBuffers, subpixel: bool = False) -> None:
        from . import dm
        src = dm.object_numerator(self, psi, probe_conj, buf.onum_src[:len(psi)])
        scatter = self.scatter_add_subpixel if subpixel else self.scatter_add
        scatter(obj_num, pos, src)
        scatter(obj_den, pos, probe_intensity)

    def object_update(self, nums: Sequence[Any], dens: Sequence[Any] | None, old: Any, reg: float,
                      split: Callable[[Callable[[int, int], None]], None] | None = None,
                      den_at: tuple[Any, Any] | None = None) -> tuple[Any, np.ndarray]:
        from . import dm
        return dm.object_update(self, nums, dens, old, reg, den_at)

    def probe_pass(self, psi: Any, obj: Any, pos: Any, num: Any, den: Any, buf: BatchBuffers,
                   windows: Any = None) -> None:
        from . import dm
        B = len(psi)
        ow = self.gather(obj, pos, psi.shape[-1], out=buf.objwin[:B]) if windows is None else windows
        dm.probe_sums(self, psi, ow, num, den, buf.phi[:B])

    def error_pass(self, obj: Any, pos: Any, probe: Any, diffamp: Any, mask: Any, buf: BatchBuffers,
                   windows: Any = None) -> Any:
        from . import dm
        return dm.data_error(self, self.fft2(self._phi(obj, pos, probe, buf, len(diffamp), windows)), diffamp, mask)


BACKENDS = ("numba", "numpy", "cupy", "auto")


def get_backend(name: str = "numba", threads: int | None = None, device: int | None = None) -> Backend:
    """The backend called ``name``: "numba" (the fused CPU kernels), "numpy" (the reference),
    "cupy" (GPU; clear error without one) or "auto" (the GPU when one is visible, else numba)."""
    if name == "numpy":
        return NumpyBackend(threads)
    if name == "numba":
        from .cpu_kernels import NumbaBackend
        return NumbaBackend(threads)
    if name in ("cupy", "auto"):
        try:
            from .gpu import CupyBackend, gpu_available
        except ImportError as exc:  # pragma: no cover - depends on the machine
            if name == "auto":
                return get_backend("numba", threads)
            raise BackendError(f"backend 'cupy' needs CuPy and a CUDA GPU: {exc}") from None
        ok, why = gpu_available()
        if ok:
            return CupyBackend(device=device)
        if name == "auto":
            return get_backend("numba", threads)
        raise BackendError(f"backend 'cupy' is not available here: {why}")
    raise BackendError(f"unknown backend {name!r} (choose one of {', '.join(BACKENDS)})")
