"""The array backend: the array module ``xp`` (numpy or cupy), FFTs, and the window gather/scatter.

The engine (``engine.py``) and the DM steps (``dm.py``) are written once against a
:class:`Backend`. :class:`NumpyBackend` runs on the CPU with ``scipy.fft`` (threads split over
views); :mod:`hxn_ptycho.gpu` provides the CuPy backend with our CUDA kernels.

Array layouts used everywhere:

- object ``(L, H, W)``, probe ``(K, n, n)``, complex
- exit waves of a batch ``(B, L, K, n, n)``, complex, C-contiguous
- ``diffamp`` of a batch ``(B, n, n)`` float, ``mask`` ``(n, n)`` bool (true = good) or None
- window corners ``pos`` ``(B, 2)`` int64 (row, col)
"""
from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.fft
from .errors import BadInput


class BackendError(BadInput):
    """The requested backend is not available here (e.g. no CuPy or no GPU)."""


@runtime_checkable
class Backend(Protocol):
    """What the engine needs of an array backend; :class:`NumpyBackend` is the reference.

    Arrays and transfers, orthonormal FFTs over the last two axes (in place), the window gather
    and its adjoint scatter-add. The DM, ML and position-refinement steps are written once in
    :mod:`hxn_ptycho.dm`, :mod:`hxn_ptycho.ml` and :mod:`hxn_ptycho.positions` against ``xp``
    (the numpy reference); a backend may provide fused versions under the same names, declared
    by :class:`FusedSteps`, which those modules then use (``dm._fused``). Optional:
    ``pinned_empty``/``to_device``/``to_host`` (streamed exit waves), ``memory_info`` (memory
    bound), ``fft_work_bytes`` (FFT work area), ``exit_waves_at`` (gather and multiply at once).
    """

    name: str
    xp: Any

    def asarray(self, a: Any, dtype: Any = None) -> Any: ...
    def asnumpy(self, a: Any) -> np.ndarray: ...
    def empty(self, shape: tuple, dtype: Any) -> Any: ...
    def zeros(self, shape: tuple, dtype: Any) -> Any: ...
    def synchronize(self) -> None: ...
    def fft2(self, a: Any, workers: int = 1) -> Any: ...
    def ifft2(self, a: Any, workers: int = 1) -> Any: ...
    def gather(self, obj: Any, pos: Any, n: int, out: Any = None) -> Any: ...
    def scatter_add(self, acc: Any, pos: Any, src: Any) -> None: ...


@runtime_checkable
class FusedSteps(Protocol):
    """The optional fused steps, called by name instead of the generic code of the function of the
    same name (its first argument ``be`` dropped) in ``dm``/``ml``/``positions``, which stays the
    definition. A backend may provide any subset; :class:`~hxn_ptycho.gpu.CupyBackend` has all
    (CUDA kernels in ``cuda/fourier.cu``, ``overlap.cu``, ``ml.cu``, ``positions.cu``)."""

    # --- DM (dm.py) ---
    def exit_waves(self, probe: Any, obj_windows: Any, out: Any) -> Any:
        """(2) ``out[b, l, k] = obj_windows[b, l] · probe[k]``."""
    def reflect(self, fphi: Any, fpsi: Any, out: Any) -> Any:
        """(3) ``out = 2·fphi − fpsi``."""
    def fourier_projection(self, waves_f: Any, diffamp: Any, mask: Any, pbound: float = 0.0, floor: float = 0.0,
                           stats: Any = None) -> Any:
        """(4) the Fourier projection in place, all modes of a view at once, the power bound with pbound > 0
        (r ≥ ``floor``, Σ r into ``stats``: ``dm.relaxation``, ``dm.RelaxSum``)."""
    def dm_update(self, fpsi: Any, fphi: Any, projected: Any, beta: float) -> Any:
        """(3) ``fpsi += β·(projected − fphi)``."""
    def data_error(self, fphi: Any, diffamp: Any, mask: Any) -> Any:
        """(7) Σ_good (|F(P·O)| − √I)² of a batch (a scalar, possibly on the device)."""
    def fourier_update(self, fpsi: Any, fphi: Any, diffamp: Any, mask: Any, pbound: float, beta: float,
                       floor: float = 0.0, stats: Any = None) -> Any:
        """(3), (4), (7) in one pass: ``fpsi += β(Π_F(2 fphi − fpsi) − fphi)``; returns the data error of fphi."""
    def object_numerator(self, psi: Any, probe_conj: Any, out: Any) -> Any:
        """(6) ``out[b, l] = Σ_k probe_conj[k] · psi[b, l, k]``."""
    def probe_sums(self, psi: Any, obj_windows: Any, num: Any, den: Any, work: Any) -> None:
        """(5) ``num += Σ_b,l O* · psi``, ``den += Σ_b,l |O|²`` over a batch."""

    # --- ML (ml.py) ---
    def ml_gradient(self, fphi: Any, diffamp: Any, intensity: Any, mask: Any, floor: float, model: str,
                    out: Any) -> tuple[float, float]:
        """ML pass 1: (cost L, data error (7)) of a batch; ``out`` = gradient weight · F(Φ)."""
    def ml_line_search(self, f0: Any, f1: Any, f2: Any, diffamp: Any, intensity: Any, mask: Any, floor: float,
                       model: str) -> tuple[float, float]:
        """ML pass 2: Σ L'(0), Σ L''(0) along the search direction (the Newton step −L'/L'')."""

    # --- position refinement (positions.py) ---
    def normal_equations(self, gr: Any, gc: Any, q: Any, pint: Any) -> tuple[np.ndarray, ...]:
        """Per-view Gauss-Newton sums (A_rr, A_cc, A_rc, b_r, b_c), numpy ``(B,)`` each."""
    def view_errors(self, fphi: Any, diffamp: Any, mask: Any) -> np.ndarray:
        """Per-view data error Σ_good (|F(Φ)| − √I)², numpy ``(B,)``."""
    def object_gradient(self, obj: Any) -> tuple[Any, Any]:
        """(∂O/∂row, ∂O/∂col) by central differences."""


DM_STEPS = ("exit_waves", "reflect", "fourier_projection", "dm_update", "data_error", "fourier_update",
            "object_numerator", "probe_sums")
ML_STEPS = ("ml_gradient", "ml_line_search")
POSITION_STEPS = ("normal_equations", "view_errors", "object_gradient")
# every name the steps dispatch on (exit_waves_at: NumpyBackend's gather-and-multiply)
FUSED_STEPS = DM_STEPS + ML_STEPS + POSITION_STEPS + ("exit_waves_at",)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _in_place(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``a`` holding ``out`` (scipy transforms contiguous complex input in place; copy otherwise)."""
    if out.__array_interface__["data"][0] != a.__array_interface__["data"][0]:
        a[...] = out
    return a


class NumpyBackend:
    """CPU backend: numpy arrays, ``scipy.fft`` and views split across ``threads`` workers."""

    name = "numpy"
    xp = np

    def __init__(self, threads: int | None = None) -> None:
        self.threads = max(1, int(threads or available_cores()))

    # --- arrays ---------------------------------------------------------------------------
    def asarray(self, a: Any, dtype: Any = None) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=dtype)

    def asnumpy(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def empty(self, shape: tuple, dtype: Any) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def zeros(self, shape: tuple, dtype: Any) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def synchronize(self) -> None:
        pass

    # --- FFTs (orthonormal, over the last two axes, in place: ``a`` is transformed and returned) --
    def fft2(self, a: np.ndarray, workers: int = 1) -> np.ndarray:
        return _in_place(a, scipy.fft.fft2(a, norm="ortho", overwrite_x=True, workers=workers))

    def ifft2(self, a: np.ndarray, workers: int = 1) -> np.ndarray:
        return _in_place(a, scipy.fft.ifft2(a, norm="ortho", overwrite_x=True, workers=workers))

    # --- windows ----------------------------------------------------------------------------
    def gather(self, obj: np.ndarray, pos: np.ndarray, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """``out[b, l] = obj[l, r_b:r_b+n, c_b:c_b+n]`` for every view b of the batch."""
        if out is None:
            out = np.empty((len(pos), obj.shape[0], n, n), dtype=obj.dtype)
        for b, (r, c) in enumerate(pos):
            out[b] = obj[:, r:r + n, c:c + n]
        return out

    def exit_waves_at(self, obj: np.ndarray, pos: np.ndarray, probe: np.ndarray, out: np.ndarray) -> np.ndarray:
        """(2) ``out[b, l, k] = obj[l, window b] · probe[k]``, straight from the object (no gathered copy)."""
        n = probe.shape[-1]
        pr = probe[None]
        for b, (r, c) in enumerate(pos):
            np.multiply(obj[:, None, r:r + n, c:c + n], pr, out=out[b])
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


def get_backend(name: str = "numpy", threads: int | None = None, device: int | None = None) -> Any:
    """The backend called ``name``: "numpy", "cupy" (GPU; clear error without one) or "auto"."""
    if name == "numpy":
        return NumpyBackend(threads)
    if name in ("cupy", "auto"):
        try:
            from .gpu import CupyBackend, gpu_available
        except ImportError as exc:  # pragma: no cover - depends on the machine
            if name == "auto":
                return NumpyBackend(threads)
            raise BackendError(f"backend 'cupy' needs CuPy and a CUDA GPU: {exc}") from None
        ok, why = gpu_available()
        if ok:
            return CupyBackend(device=device)
        if name == "auto":
            return NumpyBackend(threads)
        raise BackendError(f"backend 'cupy' is not available here: {why}")
    raise BackendError(f"unknown backend {name!r} (choose numpy, cupy or auto)")
