"""The backend contract (hxn_ptycho.backend.Backend): every backend has every pass, a backend that
lacks one cannot start, nothing dispatches by attribute name, and the fused CPU kernels (numba)
equal the numpy reference pass by pass and over whole reconstructions."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest

from contract_cases import check_passes_match, rel
from hxn_ptycho.backend import CONTRACT, PASSES, Backend, BackendError, NumpyBackend, check_backend
from hxn_ptycho.cpu_kernels import NumbaBackend

PKG = Path(__file__).resolve().parents[1] / "hxn_ptycho"


def test_the_contract_has_every_pass_and_every_backend_implements_it():
    from hxn_ptycho.gpu import CupyBackend
    assert set(PASSES) <= set(CONTRACT)
    for cls in (NumpyBackend, NumbaBackend, CupyBackend):
        assert not getattr(cls, "__abstractmethods__", None), (cls, cls.__abstractmethods__)
        for name in CONTRACT:
            want = list(inspect.signature(getattr(Backend, name)).parameters)
            have = list(inspect.signature(getattr(cls, name)).parameters)
            assert have[:len(want)] == want, (cls.__name__, name, have, want)
    check_backend(NumpyBackend(1))
    check_backend(NumbaBackend(1))


@pytest.mark.parametrize("missing", ["fourier_pass", "probe_pass", "ml_line_search", "view_errors"])
def test_a_backend_without_a_pass_cannot_start(missing):
    """A backend class lacking a pass cannot be made; an object lacking one (not a Backend subclass,
    or with the method removed) is refused when a reconstruction starts, the pass named."""
    from hxn_ptycho.engine import Reconstruction
    from hxn_ptycho.params import ReconParams
    from hxn_ptycho.simulate import simulate_scan
    body = {name: getattr(NumpyBackend, name) for name in CONTRACT if name != missing}
    Partial = type("Partial", (Backend,), {"name": "partial", **body})
    with pytest.raises(TypeError, match=missing):
        Partial()

    class Duck:                     # everything but one pass, not derived from Backend
        name = "duck"

        def __init__(self):
            self._be = NumpyBackend(1)

        def __getattr__(self, item):
            if item == missing:
                raise AttributeError(item)
            return getattr(self._be, item)
    with pytest.raises(BackendError, match=f"missing .*{missing}"):
        check_backend(Duck())
    scan, _ = simulate_scan(n=16, n_positions=6, probe_modes=1, photons=1e4, seed=1)
    with pytest.raises(BackendError, match=missing):
        Reconstruction(scan, ReconParams(iterations=1), backend=Duck(), log=lambda m: None)


def test_wrong_parameters_are_refused():
    class Odd(NumpyBackend):
        def probe_pass(self, psi, obj, corners, num, den, buf, windows=None):
            return super().probe_pass(psi, obj, corners, num, den, buf, windows)
    with pytest.raises(BackendError, match="probe_pass"):
        check_backend(Odd(1))


def test_nothing_dispatches_on_the_backend_by_attribute_name_or_by_its_name():
    """No getattr/hasattr on a backend and no test of its name in the library (the contract's
    methods are called; the name is only reported)."""
    bad = re.compile(r"(getattr|hasattr)\((self\.)?(rec\.)?(be|backend)\b|\b(be|backend)\.name\s*[!=]=")
    hits = [f"{p.name}:{i}: {line.strip()}" for p in PKG.glob("*.py") if p.name != "backend.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert not hits, hits


@pytest.mark.parametrize("cdt,tol", [(np.complex64, 2e-5), (np.complex128, 1e-11)])
@pytest.mark.parametrize("modes,masked,bound,subpixel", [
    (1, False, False, False), (3, False, False, False), (1, True, True, False), (3, True, True, False),
    (2, False, False, True), (3, True, True, True)])
def test_numba_passes_equal_the_numpy_reference(cdt, tol, modes, masked, bound, subpixel):
    check_passes_match(NumbaBackend(1), NumpyBackend(1), cdt, modes, masked, bound, subpixel, tol)


@pytest.mark.parametrize("modes,extra", [(1, {}), (3, {"power_bound": 1.0, "object_modes": 2}),
                                         (2, {"algorithm": "DM:3,ML:3"}),
                                         (1, {"refine_positions": True, "position_start": 1, "position_end": 5,
                                              "position_subpixel_windows": True})])
def test_numba_reconstruction_equals_numpy(modes, extra):
    """Whole reconstructions with 2 worker threads: the same object, probe and errors to float
    tolerance — in double precision, where DM's growth of rounding differences over the iterations
    (about 8× an iteration on this small scan, equally for two numpy runs that round differently)
    stays far below the tolerance; and in single precision over two iterations."""
    from hxn_ptycho.engine import reconstruct
    from hxn_ptycho.params import ReconParams
    from hxn_ptycho.simulate import simulate_scan
    scan, _ = simulate_scan(n=32, n_positions=30, probe_modes=modes, photons=1e5, seed=2, dead_pixels=0.05,
                            position_error_px=0.7 if extra.get("refine_positions") else 0.0)
    for precision, its, tol in (("double", 6, 1e-9), ("single", 2, 1e-4)):
        params = ReconParams(iterations=its, probe_modes=modes, probe_update_start=1, precision=precision,
                             **({**extra, "algorithm": "DM:1,ML:1"} if "algorithm" in extra and its == 2 else extra))
        ref = reconstruct(scan, params, backend=NumpyBackend(2), log=lambda m: None)
        got = reconstruct(scan, params, backend=NumbaBackend(2), log=lambda m: None)
        assert got.attrs["backend"] == "numba" and ref.attrs["backend"] == "numpy"
        assert rel(got.object, ref.object) < tol, (precision, rel(got.object, ref.object))
        assert rel(got.probe, ref.probe) < tol, (precision, rel(got.probe, ref.probe))
        np.testing.assert_allclose(got.error_data, ref.error_data, rtol=tol)
        assert abs(got.attrs["final_cost"] / ref.attrs["final_cost"] - 1) < tol


def test_a_numba_kernel_that_drops_the_update_is_caught(monkeypatch):
    """The equality check fails for a broken kernel (here: β ignored, the DM update not applied)."""
    from hxn_ptycho import cpu_kernels
    real = cpu_kernels.dm_update_at_k

    def no_update(psi, obj, pos, probe, proj, beta, relax, one):
        return real(psi, obj, pos, probe, proj, beta * 0, relax, one)
    monkeypatch.setattr(cpu_kernels, "dm_update_at_k", no_update)
    with pytest.raises(AssertionError):
        check_passes_match(NumbaBackend(1), NumpyBackend(1), np.complex64, 1, False, False, False, 2e-5)


def test_numba_is_the_default_cpu_backend_and_warm_start_is_quick():
    from hxn_ptycho.backend import get_backend
    from hxn_ptycho.params import ReconParams
    be = get_backend(ReconParams().backend, 1)
    assert isinstance(be, NumbaBackend) and be.workers == 1
    be.warm_up()
    assert be.warm_up() < 0.5           # loaded: a second warm-up costs nothing


# --- HXN_PTYCHO_FFT=fftw: the CPU backends' FFTs by FFTW (optional pyfftw) ---------------------------
def test_an_unknown_fft_library_is_refused(monkeypatch):
    monkeypatch.setenv("HXN_PTYCHO_FFT", "fastest")
    with pytest.raises(BackendError, match="HXN_PTYCHO_FFT"):
        NumbaBackend(1)
    monkeypatch.setenv("HXN_PTYCHO_FFT", "pocketfft")
    assert NumbaBackend(1).fft_library == NumpyBackend(1).fft_library == "pocketfft"


@pytest.mark.parametrize("cdt", [np.complex64, np.complex128])
def test_default_transforms_are_scipy_fft_bit_for_bit_in_place(monkeypatch, cdt):
    """The default FFTs call scipy's pocketfft directly (without scipy.fft's dispatch): the same
    values as ``scipy.fft.fft2``/``ifft2(norm="ortho")`` to the bit, in place on contiguous batches;
    a non-contiguous array still goes through ``scipy.fft``."""
    import scipy.fft

    from hxn_ptycho import backend as bk
    monkeypatch.delenv("HXN_PTYCHO_FFT", raising=False)
    assert bk._C2C is not None                        # the direct call is in use with this scipy
    rng = np.random.default_rng(4)
    for be in (NumbaBackend(1), NumpyBackend(1)):
        assert be.fft_library == "pocketfft"
        a = (rng.standard_normal((3, 2, 1, 16, 20)) + 1j * rng.standard_normal((3, 2, 1, 16, 20))).astype(cdt)
        b = a.copy()
        assert be.fft2(b) is b and b.dtype == cdt
        assert np.array_equal(b, scipy.fft.fft2(a, norm="ortho"))
        f = b.copy()
        assert be.ifft2(b) is b
        assert np.array_equal(b, scipy.fft.ifft2(f, norm="ortho"))
        c = a[:, :, :, :, ::2]                        # a strided view: scipy.fft, result written back
        want = scipy.fft.fft2(c, norm="ortho")
        assert be.fft2(c) is c and np.array_equal(c, want)
        swapped = a.astype(a.dtype.newbyteorder())    # not native: scipy.fft too
        assert np.allclose(be.fft2(swapped), scipy.fft.fft2(a, norm="ortho"), rtol=1e-5, atol=1e-5)


def _in_place_round_trips(be, cdt, shapes) -> tuple[list[float], list]:
    """fft2 then ifft2 in place on a random batch of each shape, 64-byte aligned and one element off,
    each shape on its own thread at once: the relative errors against scipy.fft (forward, then back to
    the batch) and the transforms' own thread count seen after each call (None where they keep none).
    The backend's own arrays are checked to start on a 64-byte line first."""
    import threading

    import scipy.fft
    assert all(be.empty(s, cdt).ctypes.data % 64 == 0 for s in ((3, 5, 7), (1000,), (2, 1, 1, 16, 16)))
    rng = np.random.default_rng(1)
    batches = {s: (rng.standard_normal(s) + 1j * rng.standard_normal(s)).astype(cdt) for s in shapes}
    errors: list[float] = []
    threads_seen: list = []

    def check(shape):
        a = batches[shape]
        ref = scipy.fft.fft2(a, norm="ortho")
        for offset in (0, 1):                       # an element off: not 64-byte aligned
            buf = np.empty(a.size + offset, cdt)
            b = buf[offset:].reshape(shape)
            b[...] = a
            assert be.fft2(b) is b
            errors.append(rel(b, ref))
            assert be.ifft2(b) is b
            errors.append(rel(b, a))
            threads_seen.append(getattr(be._fftw, "fft_threads", None))
    threads = [threading.Thread(target=check, args=(s,)) for s in shapes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors, threads_seen


@pytest.mark.parametrize("cdt,tol", [(np.complex64, 1e-6), (np.complex128, 1e-14)])
def test_fftw_transforms_equal_scipy_in_place(monkeypatch, cdt, tol):
    """Orthonormal, in place, on aligned and misaligned batches, from two threads at once."""
    pytest.importorskip("pyfftw")
    monkeypatch.setenv("HXN_PTYCHO_FFT", "fftw")
    be = NumbaBackend(2)
    assert be.fft_library == "fftw"
    errors, _ = _in_place_round_trips(be, cdt, ((6, 1, 2, 32, 32), (3, 2, 1, 17, 20)))
    assert len(errors) == 8 and max(errors) < tol, errors


@pytest.mark.parametrize("library,module", [("fftw", "pyfftw"), ("mkl", "mkl_fft")])
@pytest.mark.parametrize("modes,masked,bound,subpixel", [(1, False, False, False), (3, True, True, False),
                                                         (2, False, False, True)])
def test_numba_passes_with_another_fft_library_equal_the_numpy_reference(monkeypatch, library, module, modes,
                                                                          masked, bound, subpixel):
    """Every numba pass with FFTW's or MKL's transforms (optional; skipped without them) equals the
    numpy reference on scipy.fft."""
    pytest.importorskip(module)
    monkeypatch.setenv("HXN_PTYCHO_FFT", library)
    fast = NumbaBackend(1)
    monkeypatch.delenv("HXN_PTYCHO_FFT")
    check_passes_match(fast, NumpyBackend(1), np.complex64, modes, masked, bound, subpixel, 2e-5)
    check_passes_match(fast, NumpyBackend(1), np.complex128, modes, masked, bound, subpixel, 1e-11)


def test_fftw_start_up_does_not_import_dask_and_leaves_it_importable():
    """pyfftw's optional dask interface (0.66 s where dask is installed) is kept out of a rank's start."""
    pytest.importorskip("pyfftw")
    pytest.importorskip("dask")
    import subprocess
    import sys
    code = ("import sys; from hxn_ptycho.backend import FFTWTransforms; FFTWTransforms(); "
            "print('dask.array' in sys.modules); import dask.array; print(dask.array.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "dask.array"], out


# --- HXN_PTYCHO_FFT=mkl: the CPU backends' FFTs by Intel MKL (optional mkl_fft) -----------------------
@pytest.mark.parametrize("cdt,tol", [(np.complex64, 1e-6), (np.complex128, 1e-14)])
def test_mkl_transforms_equal_scipy_in_place(monkeypatch, cdt, tol):
    """Orthonormal over the last two axes (not the batch's), in place, on aligned and misaligned
    batches, 2-D to 5-D, from two threads at once; MKL starts no threads of its own in a call."""
    pytest.importorskip("mkl_fft")
    import scipy.fft
    monkeypatch.setenv("HXN_PTYCHO_FFT", "mkl")
    be = NumbaBackend(2)
    assert be.fft_library == "mkl" and NumpyBackend(1).fft_library == "mkl"
    assert be._fftw.fft_threads == 1
    errors, threads_seen = _in_place_round_trips(be, cdt, ((6, 1, 2, 32, 32), (3, 2, 1, 17, 20), (24, 40)))
    assert len(errors) == 12 and max(errors) < tol, errors
    assert threads_seen == [1] * 6
    rng = np.random.default_rng(2)
    c = (rng.standard_normal((4, 16, 32)) + 1j * rng.standard_normal((4, 16, 32))).astype(cdt)[:, :, ::2]
    want = scipy.fft.fft2(c, norm="ortho")                   # a strided view: scipy.fft, written back
    assert be.fft2(c) is c and rel(c, want) < tol
    d = (rng.standard_normal((5, 16, 16)) + 1j * rng.standard_normal((5, 16, 16))).astype(cdt)
    e = d.copy()
    be.fft2(e, workers=2)                                    # more threads for one call only
    assert rel(e, scipy.fft.fft2(d, norm="ortho")) < tol and be._fftw.fft_threads == 1


def test_mkl_without_mkl_fft_is_a_clear_error(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_mkl(name, *args, **kw):
        if name.startswith("mkl_fft"):
            raise ImportError("No module named 'mkl_fft'")
        return real(name, *args, **kw)
    monkeypatch.setattr(builtins, "__import__", no_mkl)
    monkeypatch.setenv("HXN_PTYCHO_FFT", "mkl")
    with pytest.raises(BackendError, match="mkl_fft"):
        NumbaBackend(1)


def test_mkl_transforms_that_differ_from_scipy_are_refused():
    """mkl_fft's ``_direct_fftnd`` is private: a version whose transform is not scipy's orthonormal one
    (here: unscaled) or takes other arguments is refused at start-up, naming the problem."""
    import scipy.fft

    from hxn_ptycho.backend import MKLTransforms

    class Runtime:                                  # MKL's thread calls, not needed by the check
        def MKL_Set_Num_Threads_Local(self, n):
            return 1

    def unscaled(a, direction, fsc, out):           # the transform without the 1/sqrt(n0 n1)
        out[...] = scipy.fft.fft2(a) if direction == 1 else scipy.fft.ifft2(a) * a.size
        return out

    def orthonormal(a, direction, fsc, out):
        out[...] = (scipy.fft.fft2 if direction == 1 else scipy.fft.ifft2)(a, norm="ortho")
        return out

    t = MKLTransforms.__new__(MKLTransforms)
    t._rt = Runtime()
    t._direct = orthonormal
    t._check()                                      # the right transform passes
    t._direct = unscaled
    with pytest.raises(BackendError, match="differ from scipy.fft"):
        t._check()
    t._direct = lambda a, direction: a              # another signature
    with pytest.raises(BackendError, match="could not be called"):
        t._check()


@pytest.mark.parametrize("cdt,tol", [(np.complex64, 1e-5), (np.complex128, 1e-12)])
@pytest.mark.parametrize("workers,parts", [(1, 1), (2, 2), (3, 2)])
@pytest.mark.parametrize("apart", [False, True])
def test_numba_object_update_equals_the_reference(cdt, tol, workers, parts, apart):
    """Backend.object_update (6)+(7): the numba sweeps shared out by rows equal dm.object_update — the
    object, ε_O, the accumulators left zero — from the workers' denominators or (``den_at``) from the
    probe intensity at the corners; a broken α (the regulariser dropped) is caught."""
    from hxn_ptycho import dm
    from hxn_ptycho.parts import BatchScheduler
    rng = np.random.default_rng(7)
    rdt = np.float32 if cdt == np.complex64 else np.float64
    L, H, W, n, N = 2, 41, 37, 8, 30
    corners = np.stack([rng.integers(0, H - n, N), rng.integers(0, W - n, N)], axis=1).astype(np.int64)
    pint = rng.random((n, n)).astype(rdt)
    old = (rng.standard_normal((L, H, W)) + 1j * rng.standard_normal((L, H, W))).astype(cdt)
    nums0 = [(rng.standard_normal((L, H, W)) + 1j * rng.standard_normal((L, H, W))).astype(cdt) for _ in range(workers)]
    dens0 = [np.zeros((1, H, W), rdt) for _ in range(workers)]
    for i, (r, c) in enumerate(corners):
        dens0[i % workers][0, r:r + n, c:c + n] += pint
    split = BatchScheduler(1, 1, [object()] * parts).split
    nb, ref = NumbaBackend(parts), NumpyBackend(1)
    out = {}
    for name, be in (("numba", nb), ("numpy", ref)):
        nums, dens = [a.copy() for a in nums0], [a.copy() for a in dens0]
        new, eps = be.object_update(nums, None if apart else dens, old, 1e-3, split if name == "numba" else None,
                                    (pint, corners) if apart else None)
        assert new.dtype == cdt and eps.shape == (L,)
        assert all(not a.any() for a in nums) and (apart or all(not a.any() for a in dens))
        out[name] = (new, eps)
    assert rel(out["numba"][0], out["numpy"][0]) < tol
    np.testing.assert_allclose(out["numba"][1], out["numpy"][1], rtol=tol)
    want = dm.regularised_ratio(ref, sum(nums0), sum(dens0), old, 1e-3)
    assert rel(out["numba"][0], want) < tol                       # from the sums, however they were formed
    assert rel(dm.regularised_ratio(ref, sum(nums0), sum(dens0), old, 0.0), want) > 10 * tol


@pytest.mark.parametrize("backend", [NumpyBackend, NumbaBackend])
def test_host_arrays_start_on_a_cache_line(backend):
    """The CPU backends' arrays (ψ, the batch buffers, the accumulators) start on a 64-byte line (numpy's
    own large arrays start 16 bytes into one: every AVX-512 row load of the kernels would straddle
    two lines), and the fused pass reads the probe from such a copy, whatever array it is given."""
    from hxn_ptycho.backend import ALIGN
    be = backend(1)
    for shape, dtype in (((2000, 1, 1, 32, 32), np.complex64), ((3, 7), np.float32), ((5,), np.complex128)):
        a, z = be.empty(shape, dtype), be.zeros(shape, dtype)
        for x in (a, z):
            assert x.ctypes.data % ALIGN == 0 and x.shape == shape and x.dtype == dtype and x.flags.c_contiguous
        assert not z.any()
    if backend is NumbaBackend:
        raw = np.empty(16 * 16 + 2, np.complex64)
        probe = raw[2:].reshape(1, 16, 16) if raw[2:].ctypes.data % ALIGN else raw[1:-1].reshape(1, 16, 16)
        probe[...] = np.arange(probe.size).reshape(probe.shape)
        assert probe.ctypes.data % ALIGN != 0
        got = be._aligned(probe)
        assert got.ctypes.data % ALIGN == 0 and np.array_equal(got, probe) and be._aligned(probe) is got
