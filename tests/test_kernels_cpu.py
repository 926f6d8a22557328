"""The CUDA kernels of cuda/*.cu, compiled as host C++ with tests/cuda_emu/emu.h and run on the CPU.

The real kernel sources are built with g++ into a shared library (one launcher per
``extern "C" __global__`` kernel, found by preprocessing the sources) and compared with numpy on
random data: masked pixels, several modes (more than the register cache holds), overlapping
windows at the edges of the object, grid-stride loops over views and pixels, block reductions,
atomics and the non-overlapping-sets scatter.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hxn_ptycho.cuda import kernel_dir
from hxn_ptycho.gpu import kernel_files, nonoverlapping_sets

EMU = Path(__file__).resolve().parent / "cuda_emu" / "emu.h"
SIG = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)
CTYPES = {"int": ctypes.c_int, "long long": ctypes.c_longlong, "float": ctypes.c_float,
          "double": ctypes.c_double, "unsigned": ctypes.c_uint}


def _params(text: str) -> list[tuple[str, str]]:
    out = []
    for p in text.split(","):
        p = " ".join(p.replace("__restrict__", " ").replace("const ", " ").split())
        m = re.match(r"(.*?)(\*?)\s*(\w+)$", p.replace(" *", "*"))
        assert m, p
        typ, star, name = m.group(1).strip(), m.group(2), m.group(3)
        out.append((typ + star, name))
    return out


def _signatures(gxx: str, src: Path) -> dict[str, list[tuple[str, str]]]:
    pre = subprocess.run([gxx, "-E", "-P", "-x", "c++", "-I", str(kernel_dir()), str(src)],
                         check=True, capture_output=True, text=True).stdout
    return {m.group(1): _params(m.group(2)) for m in SIG.finditer(pre)}


class EmuKernels:
    """``k.NAME(grid, block, *args)`` runs kernel NAME of cuda/*.cu on the CPU (arrays by pointer)."""

    def __init__(self, lib: ctypes.CDLL, sigs: dict[str, list[tuple[str, str]]]):
        self.lib, self.sigs = lib, sigs

    def __getattr__(self, name: str):
        params = self.sigs[name]
        fn = getattr(self.lib, "emu_" + name)
        fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_void_p if t.endswith("*") else CTYPES[t] for t, _ in params]
        fn.restype = None

        def call(grid, block, *args):
            assert len(args) == len(params), (name, len(args), len(params))
            conv = []
            for (t, pname), a in zip(params, args):
                if t.endswith("*"):
                    if a is None:
                        conv.append(None)
                    else:
                        assert isinstance(a, np.ndarray) and a.flags.c_contiguous, pname
                        conv.append(a.ctypes.data)
                else:
                    conv.append(a)
            g = tuple(grid) + (1,) * (3 - len(grid))
            b = tuple(block) + (1,) * (3 - len(block))
            fn(*g, *b, *conv)
        return call


@pytest.fixture(scope="module")
def k(tmp_path_factory) -> EmuKernels:
    gxx = shutil.which("g++")
    if gxx is None:
        if os.environ.get("CI"):
            pytest.fail("g++ is needed to emulate the CUDA kernels on the CPU")
        pytest.skip("g++ not found: cannot emulate the CUDA kernels on the CPU")
    d = tmp_path_factory.mktemp("cuda_emu")
    sigs: dict[str, list[tuple[str, str]]] = {}
    lines = [f'#include "{EMU}"']
    for src in kernel_files():
        lines.append(f'#include "{src}"')
        sigs.update(_signatures(gxx, src))
    assert sigs, "no extern \"C\" __global__ kernels found in cuda/*.cu"
    for name, params in sigs.items():
        decl = ", ".join(f"{t} {n}" for t, n in params)
        args = ", ".join(n for _, n in params)
        lines.append(f'extern "C" void emu_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
                     f'unsigned bz, {decl}) {{ emu::launch(dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}, '
                     f'[&] {{ {name}({args}); }}); }}')
    (d / "emu_kernels.cpp").write_text("\n".join(lines) + "\n")
    lib = d / "libemu_kernels.so"
    subprocess.run([gxx, "-std=c++20", "-O1", "-g0", "-shared", "-fPIC", "-pthread", "-Wall", "-Wno-unknown-pragmas",
                    "-I", str(kernel_dir()), str(d / "emu_kernels.cpp"), "-o", str(lib)], check=True)
    return EmuKernels(ctypes.CDLL(str(lib)), sigs)


RNG = np.random.default_rng(1234)
PRECISIONS = [("c64", np.complex64, np.float32, 2e-6), ("c128", np.complex128, np.float64, 1e-12)]


def crandn(shape, dtype):
    return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(dtype)


def ref_fourier(w, amp, mask, relax=None):
    """numpy reference of the Fourier constraint on (B, M, n, n) waves (float64 throughout)."""
    w64 = w.astype(np.complex128)
    mod = np.sqrt((np.abs(w64) ** 2).sum(axis=1))
    good = np.ones(mod.shape[1:], bool) if mask is None else mask.astype(bool)
    d = (mod - amp) * good
    err = (d ** 2).sum(axis=(1, 2))
    target = amp if relax is None else amp + (mod - amp) * relax[:, None, None]
    f = np.where(good, target / np.maximum(mod, 1e-30), 1.0)
    return w64 * f[:, None], err


def ref_relax(dev_err, npix, pbound):
    """The power bound of dm.fourier_projection: per-view factor on the modulus deviation."""
    per_view = dev_err / npix
    return np.where(per_view > pbound, np.sqrt(pbound / np.maximum(per_view, 1e-30)), 1.0)


@pytest.mark.parametrize("suf,cdt,rdt,tol", PRECISIONS)
@pytest.mark.parametrize("M", [1, 3, 10])
@pytest.mark.parametrize("masked", [False, True])
def test_fourier_projection(k, suf, cdt, rdt, tol, M, masked):
    B, n = 5, 12
    w = crandn((B, M, n, n), cdt)
    w[1, :, 2, 3] = 0                               # zero modulus: the tiny floor
    amp = np.abs(RNG.standard_normal((B, n, n))).astype(rdt)
    amp[0, 0, :4] = 0
    mask = (RNG.random((n, n)) > 0.2).astype(np.uint8) if masked else None
    want_w, want_err = ref_fourier(w, amp.astype(np.float64), mask)
    err = np.zeros(B, np.float64)
    got = w.copy()
    # grid smaller than the work: grid-stride loops over pixels (144 > 2*32) and views (5 > 2)
    getattr(k, f"fourier_projection_{suf}")((2, 2), (32,), got, amp, mask if masked else None, int(masked),
                                           B, M, n * n, 1, 1.0, 1.0, None, 0, err)
    np.testing.assert_allclose(got, want_w, rtol=tol * 10, atol=tol * 10)
    np.testing.assert_allclose(err, want_err, rtol=tol * 10)
    if masked:       # masked pixels untouched, bit for bit
        np.testing.assert_array_equal(got[:, :, mask == 0], w[:, :, mask == 0])
    # apply = 0: only the error
    err2 = np.zeros(B, np.float64)
    same = w.copy()
    getattr(k, f"fourier_projection_{suf}")((3, 1), (64,), same, amp, mask if masked else None, int(masked),
                                           B, M, n * n, 0, 1.0, 1.0, None, 0, err2)
    np.testing.assert_array_equal(same, w)
    np.testing.assert_allclose(err2, want_err, rtol=tol * 10)
    # raw (unnormalised) waves: in_scale recovers the orthonormal ones, out_scale pre-scales the output
    raw, s_in, s_out = w * 4, 0.25, 0.5
    err3 = np.zeros(B, np.float64)
    getattr(k, f"fourier_projection_{suf}")((2, 3), (32,), raw, amp, mask if masked else None, int(masked),
                                           B, M, n * n, 1, s_in, s_out, None, 0, err3)
    np.testing.assert_allclose(raw, want_w * s_out, rtol=tol * 10, atol=tol * 10)
    np.testing.assert_allclose(err3, want_err, rtol=tol * 10)


@pytest.mark.parametrize("suf,cdt,rdt,tol", PRECISIONS)
@pytest.mark.parametrize("M", [2, 9])
def test_fourier_projection_power_bound(k, suf, cdt, rdt, tol, M):
    B, n = 4, 10
    w = crandn((B, M, n, n), cdt)
    amp = np.abs(RNG.standard_normal((B, n, n)) * 2).astype(rdt)
    mask = (RNG.random((n, n)) > 0.25).astype(np.uint8)
    _, dev = ref_fourier(w, amp.astype(np.float64), mask)
    pbound = float(np.median(dev / (n * n)))          # some views inside the bound, some outside
    relax = ref_relax(dev, n * n, pbound)
    assert (relax < 1).any() and (relax == 1).any()
    want_w, want_err = ref_fourier(w, amp.astype(np.float64), mask, relax)
    got, err = w.copy(), np.zeros(B)
    getattr(k, f"fourier_projection_{suf}")((2, 3), (32,), got, amp, mask, 1, B, M, n * n, 1, 1.0, 1.0,
                                           relax.astype(rdt), 1, err)
    np.testing.assert_allclose(got, want_w, rtol=tol * 50, atol=tol * 50)
    np.testing.assert_allclose(err, want_err, rtol=tol * 10)


@pytest.mark.parametrize("suf,cdt,rdt,tol", PRECISIONS)
@pytest.mark.parametrize("M", [1, 3, 10])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("bound", [False, True])
def test_fourier_update(k, suf, cdt, rdt, tol, M, masked, bound):
    """Fused reflect + projection + DM update + model error against the step-by-step numpy."""
    B, n, beta = 5, 11, 0.8
    fpsi, fphi = crandn((B, M, n, n), cdt), crandn((B, M, n, n), cdt)
    amp = np.abs(RNG.standard_normal((B, n, n)) * 2).astype(rdt)
    mask = (RNG.random((n, n)) > 0.25).astype(np.uint8) if masked else None
    a64 = amp.astype(np.float64)
    w = 2 * fphi.astype(np.complex128) - fpsi
    _, dev = ref_fourier(w, a64, mask)
    dev_got = np.zeros(B)
    getattr(k, f"reflect_error_{suf}")((2, 2), (32,), fpsi, fphi, amp, mask, int(masked), B, M, n * n, dev_got)
    np.testing.assert_allclose(dev_got, dev, rtol=tol * 10)
    relax = ref_relax(dev, n * n, float(np.median(dev / (n * n)))) if bound else None
    proj, _ = ref_fourier(w, a64, mask, relax)
    want = fpsi + beta * (proj - fphi)
    _, want_err = ref_fourier(fphi, a64, mask)
    got, err = fpsi.copy(), np.zeros(B)
    getattr(k, f"fourier_update_{suf}")((2, 3), (32,), got, fphi, amp, mask, int(masked), B, M, n * n,
                                       None if relax is None else relax.astype(rdt), int(bound), beta, err)
    np.testing.assert_allclose(got, want, rtol=tol * 50, atol=tol * 50)
    np.testing.assert_allclose(err, want_err, rtol=tol * 10)


@pytest.mark.parametrize("suf,cdt,rdt,tol", PRECISIONS)
def test_elementwise(k, suf, cdt, rdt, tol):
    B, L, K, n = 3, 2, 3, 8
    probe = crandn((K, n, n), cdt)
    win = crandn((B, L, n, n), cdt)
    out = np.zeros((B, L, K, n, n), cdt)
    getattr(k, f"exit_waves_{suf}")((2, 4), (32,), probe, win, out, B * L, K, n * n, 1.0)
    np.testing.assert_allclose(out, win[:, :, None] * probe[None, None], rtol=tol, atol=tol)
    getattr(k, f"exit_waves_{suf}")((3, 2), (32,), probe, win, out, B * L, K, n * n, 0.125)
    np.testing.assert_allclose(out, 0.125 * win[:, :, None] * probe[None, None], rtol=tol, atol=tol)

    psi, phi, proj = (crandn((B, L, K, n, n), cdt) for _ in range(3))
    want = psi + 0.7 * (proj - phi)
    getattr(k, f"dm_update_{suf}")((3, 2), (32,), psi, phi, proj, psi.size, 0.7)
    np.testing.assert_allclose(psi, want, rtol=10 * tol, atol=10 * tol)

    r = np.empty_like(psi)
    getattr(k, f"reflect_{suf}")((2, 1), (64,), phi, psi, r, psi.size)
    np.testing.assert_allclose(r, 2 * phi - psi, rtol=tol, atol=tol)


def edge_positions(B, n, H, W):
    """Window corners that overlap heavily and touch every edge of the object."""
    pos = np.stack([RNG.integers(0, H - n + 1, B), RNG.integers(0, W - n + 1, B)], axis=1)
    pos[:4] = [[0, 0], [H - n, W - n], [0, W - n], [H - n, 0]]
    pos[4:8] = pos[0] + np.array([[0, 1], [1, 0], [1, 1], [0, 0]])     # near-duplicates and a duplicate
    return pos.astype(np.int64)


@pytest.mark.parametrize("suf,cdt,rdt,tol", PRECISIONS)
def test_gather(k, suf, cdt, rdt, tol):
    L, H, W, n, B = 2, 23, 19, 7, 11
    obj = crandn((L, H, W), cdt)
    pos = edge_positions(B, n, H, W)
    pos[-1] = [H - 3, -2]                       # partly outside: reads zeros there
    out = np.full((B, L, n, n), 99, cdt)
    getattr(k, f"gather_{suf}")((2, 3), (32,), obj, L, H, W, pos, B, n, out)
    pad = np.zeros((L, H + 2 * n, W + 2 * n), cdt)
    pad[:, n:n + H, n:n + W] = obj
    want = np.stack([pad[:, r + n:r + 2 * n, c + n:c + 2 * n] for r, c in pos])
    np.testing.assert_array_equal(out, want)


def ref_scatter(acc, pos, src):
    acc = acc.copy()
    L, H, W = acc.shape
    n = src.shape[-1]
    for b, (r, c) in enumerate(pos):
        s = src if src.ndim == 2 else src[b]
        for i in range(n):
            for j in range(n):
                if 0 <= r + i < H and 0 <= c + j < W:
                    acc[:, r + i, c + j] += s[..., i, j]
    return acc


@pytest.mark.parametrize("suf,cdt,rdt,tol", PRECISIONS)
@pytest.mark.parametrize("mode", ["atomic", "sets"])
def test_scatter_add(k, suf, cdt, rdt, tol, mode):
    L, H, W, n, B = 2, 26, 21, 8, 24
    pos = edge_positions(B, n, H, W)
    rsuf = "f32" if rdt == np.float32 else "f64"
    kern = getattr(k, f"scatter_add_{'atomic' if mode == 'atomic' else 'sets'}_{rsuf}")
    cases = [
        (crandn((L, H, W), cdt), crandn((B, L, n, n), cdt), 2, L * n * n, n * n),     # complex (B, L, n, n)
        (RNG.random((1, H, W)).astype(rdt), RNG.random((n, n)).astype(rdt), 1, 0, 0),  # real window, broadcast
        (RNG.random((L, H, W)).astype(rdt), RNG.random((n, n)).astype(rdt), 1, 0, 0),  # broadcast to L modes
    ]
    for acc, src, ncomp, sb, sl in cases:
        Lacc = acc.shape[0]
        want = ref_scatter(acc.astype(np.complex128 if ncomp == 2 else np.float64), pos, src)
        got = acc.copy()
        if mode == "atomic":
            kern((3, 5), (32,), got.view(rdt), Lacc, H, W, pos, None, 0, B, n, src.view(rdt), sb, sl, ncomp)
        else:
            sets = nonoverlapping_sets(pos, n)
            for s in sets:
                kern((2, 3), (32,), got.view(rdt), Lacc, H, W, pos, s, 1, len(s), n, src.view(rdt), sb, sl, ncomp)
        np.testing.assert_allclose(got, want, rtol=20 * tol, atol=20 * tol)


def test_nonoverlapping_sets():
    n = 10
    pos = np.concatenate([edge_positions(200, n, 90, 70),
                          np.array([[-3, 5], [-13, -12], [0, 0], [0, 0]])]).astype(np.int64)
    sets = nonoverlapping_sets(pos, n)
    allv = np.sort(np.concatenate(sets))
    np.testing.assert_array_equal(allv, np.arange(len(pos)))
    for s in sets:
        assert s.dtype == np.int32
        p = pos[s]
        dr = np.abs(p[:, None, 0] - p[None, :, 0])
        dc = np.abs(p[:, None, 1] - p[None, :, 1])
        overlap = (dr < n) & (dc < n)
        np.fill_diagonal(overlap, False)
        assert not overlap.any()
    assert len(sets) < len(pos) / 4       # sets, not one view each


@pytest.mark.parametrize("suf,cdt,rdt,tol", PRECISIONS)
def test_object_numerator(k, suf, cdt, rdt, tol):
    for K in (1, 4):
        B, L, n = 3, 2, 9
        psi = crandn((B, L, K, n, n), cdt)
        pc = crandn((K, n, n), cdt)
        out = np.zeros((B, L, n, n), cdt)
        getattr(k, f"object_numerator_{suf}")((2, 4), (32,), psi, pc, out, B * L, K, n * n)
        np.testing.assert_allclose(out, (psi * pc[None, None]).sum(axis=2), rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("suf,cdt,rdt,tol", PRECISIONS)
@pytest.mark.parametrize("chunk,gy", [(100, 1), (2, 2), (3, 7)])
def test_probe_sums(k, suf, cdt, rdt, tol, chunk, gy):
    B, L, K, n = 7, 2, 3, 6
    psi = crandn((B, L, K, n, n), cdt)
    win = crandn((B, L, n, n), cdt)
    num0 = crandn((K, n, n), cdt)
    den0 = RNG.random((n, n)).astype(rdt)
    num, den = num0.copy(), den0.copy()
    getattr(k, f"probe_sums_{suf}")((2, gy), (32,), psi, win, num.view(rdt), den, 1, B, L, K, n * n, chunk)
    want_num = num0 + (np.conj(win)[:, :, None] * psi).sum(axis=(0, 1))
    want_den = den0 + (np.abs(win) ** 2).sum(axis=(0, 1))
    np.testing.assert_allclose(num, want_num, rtol=20 * tol, atol=20 * tol)
    np.testing.assert_allclose(den, want_den, rtol=20 * tol, atol=20 * tol)
    num2, den2 = num0.copy(), den0.copy()           # numerator only: den untouched
    getattr(k, f"probe_sums_{suf}")((3, gy), (32,), psi, win, num2.view(rdt), den2, 0, B, L, K, n * n, chunk)
    np.testing.assert_allclose(num2, want_num, rtol=20 * tol, atol=20 * tol)
    np.testing.assert_array_equal(den2, den0)


def test_cupy_backend_without_gpu_fails_clearly():
    from hxn_ptycho.backend import BackendError, get_backend
    from hxn_ptycho.gpu import gpu_available
    ok, why = gpu_available()
    if ok:
        pytest.skip("a GPU is visible here")
    assert why and ("CuPy" in why)
    with pytest.raises(BackendError, match="backend 'cupy' is not available here: .*CuPy"):
        get_backend("cupy")
    assert get_backend("auto", threads=1).name == "numba"


def test_kernel_source_is_one_translation_unit(k, tmp_path):
    """What NVRTC compiles on the device holds every kernel the emulation tests exercise."""
    from hxn_ptycho.gpu import kernel_source
    src = kernel_source()
    assert "#include" not in src and src.count("hxn_block_sum_add(double v") == 1
    one = tmp_path / "all.cu"
    one.write_text(src)
    names = set(_signatures(shutil.which("g++"), one))
    assert names == set(k.sigs)
    for fam in ("fourier_projection", "exit_waves", "reflect", "dm_update", "gather", "object_numerator",
                "probe_sums", "fourier_update", "reflect_error"):
        assert {f"{fam}_c64", f"{fam}_c128"} <= names
    for fam in ("scatter_add_atomic", "scatter_add_sets"):
        assert {f"{fam}_f32", f"{fam}_f64"} <= names


# --- the real CupyBackend host code on the emulated kernels ------------------------------------
# CupyBackend with numpy standing in for cupy, numpy FFTs standing in for cuFFT plans and the
# emulated kernels for the RawModule: checks every launch's argument list against the kernels'
# signatures, the host-side logic (strides, sets, power bound) and a whole reconstruction.
class _FakeCupy:
    ndarray = np.ndarray

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def asnumpy(a):
        return np.asarray(a)

    class cuda:  # noqa: N801 - mimics cupy.cuda
        @staticmethod
        def get_current_stream():
            return type("S", (), {"synchronize": staticmethod(lambda: None), "ptr": 0})()

        @staticmethod
        def alloc_pinned_memory(nbytes):
            return bytearray(nbytes)


class _FakePlan:
    """cuFFT semantics: unnormalised in both directions, in or out of place."""

    def __init__(self):
        self.work_area = None

    def fft(self, a, out, direction):
        n = a.shape[-1] * a.shape[-2]
        out[...] = np.fft.fft2(a) if direction == -1 else np.fft.ifft2(a) * n


def _emulated_backend(k):
    import contextlib
    from types import SimpleNamespace

    from hxn_ptycho import gpu

    class _Mod:
        def get_function(self, name):
            fn = getattr(k, name)
            return lambda grid, block, args: fn(grid, block, *args)

    be = object.__new__(gpu.CupyBackend)
    be.xp = _FakeCupy()
    # host <-> device copies (cupy's ndarray.set/get) as plain copies
    be.to_device = lambda host, out: (np.copyto(out, host), out)[1]
    be.to_host = lambda dev, out: (np.copyto(out, dev), out)[1]
    be.device_id, be.device, be.device_name, be.sm_count = 0, contextlib.nullcontext(), "CPU emulation", 2
    be.scatter_mode = "atomic"
    be._cufft = SimpleNamespace(CUFFT_FORWARD=-1, CUFFT_INVERSE=1)
    be._mod, be._kernels, be._plans, be._pos, be._sets = _Mod(), {}, {}, {}, {}
    be._dummy_u8, be._dummy_i32 = np.zeros(1, np.uint8), np.zeros(1, np.int32)
    be._plan = lambda batch, n0, n1, dtype: _FakePlan()
    return be


@pytest.fixture(scope="module")
def ebe(k):
    return _emulated_backend(k)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.complex128) - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("relaxed", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_backend_fourier_steps_match_dm(ebe, relaxed, masked):
    from hxn_ptycho import dm
    from hxn_ptycho.backend import NumpyBackend
    nb = NumpyBackend(1)
    B, L, K, n = 3, 1, 3, 8
    fpsi, fphi = crandn((B, L, K, n, n), np.complex64), crandn((B, L, K, n, n), np.complex64)
    amp = np.abs(RNG.standard_normal((B, n, n)) * 2).astype(np.float32)
    mask = (RNG.random((n, n)) > 0.2) if masked else None
    pbound = 0.25 * 0.3 ** 2 * float(np.mean(amp.astype(np.float64) ** 2)) if relaxed else 0.0
    assert abs(float(ebe.data_error(fphi, amp, mask)) / float(dm.data_error(nb, fphi, amp, mask)) - 1) < 1e-5
    want = dm.fourier_projection(nb, fphi.copy(), amp, mask, pbound)
    got = fphi.copy()
    assert ebe.fourier_projection(got, amp, mask, pbound) is got
    assert _rel(got, want) < 1e-5
    want_psi = fpsi.copy()
    want_err = dm.data_error(nb, fphi, amp, mask)
    work = dm.fourier_projection(nb, dm.reflect(nb, fphi, want_psi, np.empty_like(fpsi)), amp, mask, pbound)
    dm.dm_update(nb, want_psi, fphi, work, 0.8)
    got_psi = fpsi.copy()
    err = ebe.fourier_update(got_psi, fphi, amp, mask, pbound, 0.8)
    assert _rel(got_psi, want_psi) < 1e-5
    assert abs(float(err) / float(want_err) - 1) < 1e-5
    out = np.empty_like(fphi)
    probe, win = fphi[0, 0].copy(), fpsi[:, :, 0].copy()         # (K, n, n), (B, L, n, n)
    ebe.fft_exit_waves(probe, win, out)
    assert _rel(out, np.fft.fft2(win[:, :, None] * probe[None, None], norm="ortho")) < 1e-5


@pytest.mark.parametrize("masked", [False, True])
def test_backend_relaxation_floor_matches_dm(ebe, masked):
    """The floor of the power bound's relaxation (dm_relax_floor) and the mean r reported: the CUDA
    path (gpu.py's relaxation + the fourier_projection/fourier_update kernels) against dm.py, with
    views far outside the bound (√(bound/dev) ≪ floor), some just outside and one inside."""
    from hxn_ptycho import dm
    from hxn_ptycho.backend import NumpyBackend
    nb = NumpyBackend(1)
    B, L, K, n = 4, 1, 3, 8
    fpsi, fphi = crandn((B, L, K, n, n), np.complex64), crandn((B, L, K, n, n), np.complex64)
    amp = np.abs(RNG.standard_normal((B, n, n)) * 2).astype(np.float32)
    mask = (RNG.random((n, n)) > 0.2) if masked else None
    dev = np.mean((np.sqrt((np.abs(fphi) ** 2).sum(axis=(1, 2))) - amp) ** 2, axis=(1, 2))
    pbound = float(np.sort(dev)[1]) * 0.999               # views 2, 3 outside the bound at the edge, 0 inside
    fphi[3] *= 30                                           # view 3 far outside: the floor binds
    floor = 0.15
    want_stats, got_stats = dm.RelaxSum(), dm.RelaxSum()
    want = dm.fourier_projection(nb, fphi.copy(), amp, mask, pbound, floor, want_stats)
    got = fphi.copy()
    ebe.fourier_projection(got, amp, mask, pbound, floor, got_stats)
    assert _rel(got, want) < 1e-5
    assert got_stats.views == want_stats.views == B
    assert abs(float(got_stats.total) - float(want_stats.total)) < 1e-5
    np.testing.assert_allclose(dm.relaxation(np, np.array([1e6, 2.0, 0.5]), 1.0, floor), [floor, np.sqrt(0.5), 1.0])
    # the floor changed the far view (without it r = √(bound/dev) ≪ 0.15)
    assert _rel(dm.fourier_projection(nb, fphi.copy(), amp, mask, pbound), want) > 1e-3
    want_psi, got_psi = fpsi.copy(), fpsi.copy()
    ws, gs = dm.RelaxSum(), dm.RelaxSum()
    want_err = dm.fourier_update(nb, want_psi, fphi, amp, mask, pbound, 1.0, floor, ws, np.empty_like(fpsi))
    err = ebe.fourier_update(got_psi, fphi, amp, mask, pbound, 1.0, floor, gs)
    assert _rel(got_psi, want_psi) < 1e-5
    assert abs(float(err) / float(want_err) - 1) < 1e-5
    assert gs.views == ws.views == B and abs(float(gs.total) - float(ws.total)) < 1e-5
    assert float(ws.total) / B < 1.0                        # some views relaxed


@pytest.mark.parametrize("mode", ["atomic", "sets"])
def test_backend_window_steps_match_numpy(ebe, mode):
    from hxn_ptycho import dm
    from hxn_ptycho.backend import NumpyBackend
    nb = NumpyBackend(1)
    L, H, W, n, B, K = 2, 30, 27, 8, 12, 2
    pos = edge_positions(B, n, H, W)
    obj = crandn((L, H, W), np.complex64)
    win = ebe.gather(obj, pos, n)
    np.testing.assert_array_equal(win, nb.gather(obj, pos, n))
    src = crandn((B, L, n, n), np.complex64)
    acc, want = np.zeros((L, H, W), np.complex64), np.zeros((L, H, W), np.complex64)
    ebe.scatter_add(acc, pos, src, mode=mode)
    nb.scatter_add(want, pos, src)
    assert _rel(acc, want) < 1e-5
    den, want_den = np.zeros((1, H, W), np.float32), np.zeros((1, H, W), np.float32)
    w2 = RNG.random((n, n)).astype(np.float32)
    ebe.scatter_add(den, pos, w2, mode=mode)
    nb.scatter_add(want_den, pos, w2)
    np.testing.assert_allclose(den, want_den, rtol=1e-5)
    probe, psi = crandn((K, n, n), np.complex64), crandn((B, L, K, n, n), np.complex64)
    out = np.empty((B, L, K, n, n), np.complex64)
    np.testing.assert_allclose(ebe.exit_waves(probe, win, out), win[:, :, None] * probe[None, None], rtol=1e-5)
    onum = np.empty((B, L, n, n), np.complex64)
    assert _rel(ebe.object_numerator(psi, np.conj(probe), onum), (psi * np.conj(probe)).sum(2)) < 1e-5
    num, num_w = np.zeros((K, n, n), np.complex64), np.zeros((K, n, n), np.complex64)
    den, den_w = np.zeros((n, n), np.float32), np.zeros((n, n), np.float32)
    ebe.probe_sums(psi, win.copy(), num, den, None)
    dm.probe_sums(nb, psi, win.copy(), num_w, den_w, np.empty_like(psi))   # it conjugates the windows in place
    assert _rel(num, num_w) < 1e-5
    np.testing.assert_allclose(den, den_w, rtol=1e-5)
    np.testing.assert_allclose(den, (np.abs(win) ** 2).sum(axis=(0, 1)), rtol=1e-5)
    num = np.zeros((K, n, n), np.complex64)
    ebe.probe_numerator(psi, win, num, None)
    assert _rel(num, num_w) < 1e-5


@pytest.mark.parametrize("modes, on_host", [(1, False), (3, False), (3, True)])
def test_reconstruction_with_emulated_gpu_backend_matches_numpy(ebe, modes, on_host):
    """The engine on CupyBackend's host code + emulated kernels against the numpy backend."""
    from hxn_ptycho.backend import NumpyBackend
    from hxn_ptycho.engine import reconstruct
    from hxn_ptycho.params import ReconParams
    from hxn_ptycho.simulate import simulate_scan
    scan, _ = simulate_scan(n=16, n_positions=12, probe_modes=modes, photons=1e5, seed=2, dead_pixels=0.05)
    params = ReconParams(iterations=4, probe_modes=modes, precision="single", batch_size=5,
                         probe_update_start=1, max_memory_gb=1.0, exit_waves_on_host=on_host)
    cpu = reconstruct(scan, params, backend=NumpyBackend(1))
    emu = reconstruct(scan, params, backend=ebe)
    assert emu.attrs["backend"] == "cupy"
    assert _rel(emu.object, cpu.object) < 1e-4
    assert _rel(emu.probe, cpu.probe) < 1e-4
    np.testing.assert_allclose(emu.error_data, cpu.error_data, rtol=1e-4)


def test_gpu_benchmark_pipeline_runs_on_emulated_backend(ebe):
    """benchmarks/gpu_bench.py's synthetic scan and fused iteration, at toy size (catches script bugs)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    scan, corners, _, _ = bench.synthetic_scan(ebe, 9, 16, 2)
    scan.validate()
    assert scan.diffamp.shape == (9, 16, 16) and np.isfinite(scan.diffamp).all() and scan.diffamp.max() > 0
    st = bench.FusedState(ebe, scan, corners, 2, 4)
    bench.fused_iteration(st)
    bench.fused_iteration(st)
    assert np.isfinite(st.obj).all() and np.isfinite(st.probe).all()
    assert len(ebe._dev_sets(corners, 16)) >= 1


def _counting(calls, name, fn):
    """``fn`` counting its calls in ``calls[name]``."""
    def spy(*a, **kw):
        calls[name] += 1
        return fn(*a, **kw)
    return spy


# one mode is slow-marked: the two-mode case takes every path it takes (and the mode loops)
@pytest.mark.parametrize("modes", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_ml_and_position_refinement_with_emulated_gpu_backend_match_numpy(ebe, modes, monkeypatch):
    """ML after DM and position refinement (sub-pixel windows) run on CupyBackend's host code and
    kernels exactly as on numpy, through its fused ML and position steps (counted)."""
    from collections import Counter

    from hxn_ptycho.backend import ML_STEPS, POSITION_STEPS, NumpyBackend
    from hxn_ptycho.engine import reconstruct
    from hxn_ptycho.params import ReconParams
    from hxn_ptycho.simulate import simulate_scan
    scan, _ = simulate_scan(n=16, n_positions=12, probe_modes=modes, photons=1e5, seed=2,
                            position_error_px=1.0)
    params = ReconParams(algorithm="DM:5,ML:3", probe_modes=modes, precision="single", batch_size=5,
                         probe_update_start=1, max_memory_gb=1.0, refine_positions=True, position_start=1,
                         position_end=6)
    calls: Counter = Counter()
    for name in ML_STEPS + POSITION_STEPS:
        monkeypatch.setattr(ebe, name, _counting(calls, name, getattr(ebe, name)), raising=False)
    cpu = reconstruct(scan, params, backend=NumpyBackend(1))
    emu = reconstruct(scan, params, backend=ebe)
    assert set(ML_STEPS + POSITION_STEPS) <= {n for n, c in calls.items() if c > 0}, calls
    assert _rel(emu.object, cpu.object) < 1e-3
    assert _rel(emu.probe, cpu.probe) < 1e-3
    np.testing.assert_allclose(emu.positions_refined_px, cpu.positions_refined_px, atol=1e-3)
    assert np.abs(cpu.positions_refined_px - cpu.positions_px).max() > 1e-3


@pytest.mark.parametrize("suf,cdt,rdt,tol", PRECISIONS)
def test_bilinear_gather_and_scatter_match_the_geometry(k, suf, cdt, rdt, tol):
    """cuda/refine.cu against hxn_ptycho.geometry's four-gather numpy reference (sub-pixel windows)."""
    from hxn_ptycho.backend import NumpyBackend
    from hxn_ptycho.geometry import Geometry
    L, H, W, n, B = 2, 23, 19, 7, 9
    obj = crandn((L, H, W), cdt)
    pos = RNG.uniform(0, [H - n - 1, W - n - 1], (B, 2))
    pos[0] = [0.0, 0.0]
    pos[1] = [3.0, 2.5]                      # whole along one axis only
    nb = NumpyBackend(1)
    geom = Geometry(pos, slice(None), n, (H, W), subpixel=True)
    want = geom.gather_at(nb, obj, pos, np.empty((B, L, n, n), cdt), np.empty((B, L, n, n), cdt))
    out = np.full((B, L, n, n), 99, cdt)
    getattr(k, f"gather_bilinear_{suf}")((2, 3), (32,), obj, L, H, W, np.ascontiguousarray(pos), B, n, out)
    assert np.abs(out - want).max() <= 10 * tol * np.abs(want).max()
    src = crandn((B, L, n, n), cdt)
    acc_want = np.zeros((L, H, W), cdt)
    geom.scatter_add(nb, acc_want, slice(None), src)
    acc = np.zeros((L, H, W), cdt)
    rs = "f32" if rdt == np.float32 else "f64"
    getattr(k, f"scatter_bilinear_{rs}")((2, 3), (32,), acc.view(rdt), L, H, W, np.ascontiguousarray(pos), B, n,
                                        src.view(rdt), L * n * n, n * n, 2)
    assert np.abs(acc - acc_want).max() <= 10 * tol * np.abs(acc_want).max()
    den = rng_den = RNG.random((n, n)).astype(rdt)
    d_want = np.zeros((1, H, W), rdt)
    geom.scatter_add(nb, d_want, slice(None), rng_den)
    d = np.zeros((1, H, W), rdt)
    getattr(k, f"scatter_bilinear_{rs}")((2, 3), (32,), d, 1, H, W, np.ascontiguousarray(pos), B, n, den, 0, 0, 1)
    np.testing.assert_allclose(d, d_want, rtol=10 * tol, atol=10 * tol)


# --- ML and position-refinement kernels (cuda/ml.cu, cuda/positions.cu) against ml.py / positions.py ---
MODELS = [(0, "poisson"), (1, "amplitude")]


def _ml_data(cdt, rdt, B, M, n, masked, spread=(0.3, 1.5)):
    """Fourier waves (B, M, n, n), measured amplitudes around the model's, a mask, a floor that clamps
    some pixels (one all-zero pixel, one zero-amplitude patch)."""
    f = crandn((B, M, n, n), cdt)
    f[1, :, 2, 3] = 0
    mod = np.sqrt((np.abs(f.astype(np.complex128)) ** 2).sum(axis=1))
    amp = (mod * RNG.uniform(*spread, mod.shape)).astype(rdt)
    amp[0, 0, :3] = 0
    mask = (RNG.random((n, n)) > 0.2) if masked else None
    floor = 0.05 * float(np.mean(mod ** 2))
    return f, amp, mask, floor


def _u8(mask):
    return None if mask is None else mask.astype(np.uint8)


@pytest.mark.parametrize("suf,cdt,rdt,tol", PRECISIONS)
@pytest.mark.parametrize("M", [1, 3, 10])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("code,model", MODELS)
def test_ml_gradient_kernel(k, suf, cdt, rdt, tol, M, masked, code, model):
    """Cost, data error (7) and weight·F(Φ) of every view against ml.poisson_terms / amplitude_terms
    and dm.data_error (float64 numpy on the same inputs); grid-stride over views (5 > 2) and pixels."""
    from hxn_ptycho import dm, ml
    from hxn_ptycho.backend import NumpyBackend
    nb = NumpyBackend(1)
    B, n = 5, 12
    f, amp, mask, floor = _ml_data(cdt, rdt, B, M, n, masked)
    f64, a64 = f.astype(np.complex128), amp.astype(np.float64)
    want_cost, want_err, scale, want_out = np.zeros(B), np.zeros(B), np.zeros(B), np.empty_like(f64)
    floor_r = float(rdt(floor))
    for b in range(B):
        v, a = f64[b:b + 1], a64[b:b + 1]
        if model == "poisson":
            want_cost[b], weight, mdl = ml.poisson_terms(nb, v, a * a, mask, floor_r)
            good = np.ones((n, n)) if mask is None else mask
            scale[b] = float(np.sum((mdl + a * a * np.abs(np.log(mdl))) * good))
        else:
            want_cost[b], weight, _ = ml.amplitude_terms(nb, v, a, mask, floor_r)
            scale[b] = want_cost[b]
        want_err[b] = dm.data_error(nb, v, a, mask)
        want_out[b] = v[0] * weight[0][None]
    assert ((np.abs(f64) ** 2).sum(1) < floor_r).any()         # the floor is hit (I_m, or A = √I_m)
    kern = getattr(k, f"ml_gradient_{suf}")
    for in_place in (False, True):
        out = f.copy() if in_place else np.full_like(f, 7)
        src = out if in_place else f.copy()
        cost, err = np.zeros(B), np.zeros(B)
        kern((2, 2), (32,), src, out, amp, _u8(mask), int(masked), B, M, n * n, floor, code, cost, err)
        np.testing.assert_allclose(cost, want_cost, rtol=0, atol=tol * 20 * scale.max())
        np.testing.assert_allclose(err, want_err, rtol=tol * 20)
        np.testing.assert_allclose(out, want_out, rtol=tol * 20, atol=tol * 20)
        if masked:       # masked pixels: zero weight, no gradient
            assert not out[:, :, ~mask].any()


@pytest.mark.parametrize("suf,cdt,rdt,tol", PRECISIONS)
@pytest.mark.parametrize("M", [1, 3, 10])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("code,model", MODELS)
def test_ml_line_search_kernel(k, suf, cdt, rdt, tol, M, masked, code, model):
    """Σ L'(0), Σ L''(0) of every view against ml.ml_line_search's numpy code (float64, same inputs)."""
    from hxn_ptycho import ml
    from hxn_ptycho.backend import NumpyBackend
    nb = NumpyBackend(1)
    B, n = 5, 10
    f0, amp, mask, floor = _ml_data(cdt, rdt, B, M, n, masked, spread=(0.2, 0.7))
    f1 = (f0 * (0.5 + 0.1j) + 0.3 * crandn(f0.shape, cdt)).astype(cdt)     # a descent-like direction
    f2 = (0.2 * crandn(f0.shape, cdt)).astype(cdt)
    floor_r = float(rdt(floor))
    want = np.zeros((2, B))
    for b in range(B):
        g0, g1, g2 = (x[b:b + 1, None].astype(np.complex128) for x in (f0, f1, f2))   # (1, 1, M, n, n)
        a = amp[b:b + 1].astype(np.float64)
        want[:, b] = ml.ml_line_search(nb, g0, g1, g2, a, a * a, mask, floor_r, model)
    d1, d2 = np.zeros(B), np.zeros(B)
    getattr(k, f"ml_line_search_{suf}")((2, 2), (32,), f0, f1, f2, amp, _u8(mask), int(masked), B, M, n * n,
                                        floor, code, d1, d2)
    np.testing.assert_allclose(d1, want[0], rtol=tol * 100, atol=tol * 100 * np.abs(want[0]).max())
    np.testing.assert_allclose(d2, want[1], rtol=tol * 100, atol=tol * 100 * np.abs(want[1]).max())


@pytest.mark.parametrize("suf,cdt,rdt,tol", PRECISIONS)
@pytest.mark.parametrize("L", [1, 2])
def test_position_normal_kernel(k, suf, cdt, rdt, tol, L):
    """The per-view Gauss-Newton sums against positions.normal_equations (grid-stride: 7 views, 3 rows)."""
    from hxn_ptycho import positions
    from hxn_ptycho.backend import NumpyBackend
    nb = NumpyBackend(1)
    B, n = 7, 11
    gr, gc, q = (crandn((B, L, n, n), cdt) for _ in range(3))
    pint = RNG.random((n, n)).astype(rdt)
    want = np.stack(positions.normal_equations(nb, *(x.astype(np.complex128) for x in (gr, gc, q)),
                                               pint.astype(np.float64)), axis=1)
    out = np.zeros((B, 5))
    getattr(k, f"position_normal_{suf}")((2, 3), (32,), gr, gc, q, pint, B, L, n * n, out)
    np.testing.assert_allclose(out, want, rtol=tol * 20, atol=tol * 20 * np.abs(want).max())


@pytest.mark.parametrize("suf,cdt,rdt,tol", PRECISIONS)
@pytest.mark.parametrize("M", [1, 3, 10])
@pytest.mark.parametrize("masked", [False, True])
def test_view_errors_kernel(k, suf, cdt, rdt, tol, M, masked):
    """Per-view data error against positions.view_errors, one amplitude per view or one for all (stride 0)."""
    from hxn_ptycho import positions
    from hxn_ptycho.backend import NumpyBackend
    nb = NumpyBackend(1)
    B, n = 6, 9
    f, amp, mask, _ = _ml_data(cdt, rdt, B, M, n, masked)
    kern = getattr(k, f"view_errors_{suf}")
    for a, stride in ((amp, n * n), (amp[2:3], 0)):
        want = positions.view_errors(nb, f.astype(np.complex128), a.astype(np.float64), mask)
        err = np.zeros(B)
        kern((2, 4), (32,), f, np.ascontiguousarray(a), stride, _u8(mask), int(masked), B, M, n * n, err)
        np.testing.assert_allclose(err, want, rtol=tol * 20)


@pytest.mark.parametrize("suf,cdt,rdt,tol", PRECISIONS)
def test_object_gradient_kernel(k, suf, cdt, rdt, tol):
    """Central differences (one-sided at the edges) against positions.object_gradient; 3 modes, 2 rows."""
    from hxn_ptycho import positions
    from hxn_ptycho.backend import NumpyBackend
    L, H, W = 3, 13, 9
    obj = crandn((L, H, W), cdt)
    want_r, want_c = positions.object_gradient(NumpyBackend(1), obj)
    dr, dc = np.full_like(obj, 9), np.full_like(obj, 9)
    getattr(k, f"object_gradient_{suf}")((2, 2), (32,), obj, L, H, W, dr, dc)
    np.testing.assert_allclose(dr, want_r, rtol=tol, atol=tol)
    np.testing.assert_allclose(dc, want_c, rtol=tol, atol=tol)


@pytest.mark.parametrize("model", ["poisson", "amplitude"])
@pytest.mark.parametrize("masked", [False, True])
def test_backend_ml_and_position_steps_match_the_reference(ebe, model, masked):
    """CupyBackend's wrappers (host code + emulated kernels) equal the numpy reference functions of
    ml.py and positions.py called with the numpy backend, and those functions dispatch to them."""
    from hxn_ptycho import ml, positions
    from hxn_ptycho.backend import NumpyBackend
    nb = NumpyBackend(1)
    B, L, K, n = 4, 1, 3, 8
    f, amp, mask, floor = _ml_data(np.complex64, np.float32, B, L * K, n, masked)
    f = f.reshape(B, L, K, n, n)
    out_w, out_g = np.empty_like(f), np.empty_like(f)
    want = ml.ml_gradient(nb, f, amp, amp * amp, mask, floor, model, out_w)
    got = ml.ml_gradient(ebe, f, amp, amp * amp, mask, floor, model, out_g)
    assert got == pytest.approx(want, rel=1e-5)
    assert _rel(out_g, out_w) < 1e-5
    f1, f2 = crandn(f.shape, np.complex64), crandn(f.shape, np.complex64)
    want = ml.ml_line_search(nb, f, f1, f2, amp, amp * amp, mask, floor, model)
    got = ml.ml_line_search(ebe, f, f1, f2, amp, amp * amp, mask, floor, model)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5 * max(map(abs, want)))
    with pytest.raises(ValueError, match="noise model"):
        ebe.ml_gradient(f, amp, None, mask, floor, "gaussian", out_g)
    want_e = positions.view_errors(nb, f, amp, mask)
    np.testing.assert_allclose(positions.view_errors(ebe, f, amp, mask), want_e, rtol=1e-5)
    np.testing.assert_allclose(positions.view_errors(ebe, f, amp[1][None], mask),
                               positions.view_errors(nb, f, amp[1][None], mask), rtol=1e-5)
    gr, gc, q = (crandn((B, 2, n, n), np.complex64) for _ in range(3))
    pint = RNG.random((n, n)).astype(np.float32)
    for w, g in zip(positions.normal_equations(nb, gr, gc, q, pint), positions.normal_equations(ebe, gr, gc, q, pint)):
        assert g.shape == (B,)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    obj = crandn((2, 15, 12), np.complex64)
    for w, g in zip(positions.object_gradient(nb, obj), positions.object_gradient(ebe, obj)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_the_cuda_wrappers_of_the_ml_and_position_sums_launch_kernels_that_exist(k):
    """The contract's ML passes and position sums are CupyBackend methods with the contract's
    parameters, and the kernels they launch are in cuda/."""
    import inspect

    from hxn_ptycho.backend import ML_STEPS, POSITION_STEPS, Backend
    from hxn_ptycho.gpu import CupyBackend
    for name in ML_STEPS + POSITION_STEPS:
        want = list(inspect.signature(getattr(Backend, name)).parameters)
        assert list(inspect.signature(getattr(CupyBackend, name)).parameters)[:len(want)] == want, name
    for fam in ("ml_gradient", "ml_line_search", "position_normal", "view_errors", "object_gradient"):
        assert {f"{fam}_c64", f"{fam}_c128"} <= set(k.sigs)


@pytest.mark.parametrize("modes,masked,bound,subpixel", [(1, False, False, False), (3, True, True, False),
                                                         (2, True, False, True)])
def test_emulated_cupy_passes_match_the_numpy_reference(ebe, modes, masked, bound, subpixel):
    """CupyBackend's passes of the contract (host code + emulated cuda/ kernels) against NumpyBackend's."""
    from hxn_ptycho.backend import NumpyBackend
    from contract_cases import check_passes_match
    check_passes_match(ebe, NumpyBackend(1), np.complex64, modes, masked, bound, subpixel, tol=2e-5)


@pytest.mark.parametrize("method,model", [("search", "poisson"), ("gradient", "amplitude")])
def test_ml_and_position_code_paths_use_the_cuda_wrappers(ebe, monkeypatch, method, model):
    """DM, ML and position refinement on CupyBackend's host code call its fused ML and position
    steps (cuda/ml.cu, cuda/positions.cu) and still give the numpy backend's result (the search
    method with the Poisson model, the gradient method with the amplitude model, which skips F(A2))."""
    from collections import Counter

    from hxn_ptycho.backend import ML_STEPS, POSITION_STEPS, NumpyBackend
    from hxn_ptycho.engine import reconstruct
    from hxn_ptycho.params import ReconParams
    from hxn_ptycho.simulate import simulate_scan
    calls: Counter = Counter()
    for name in ML_STEPS + POSITION_STEPS:
        monkeypatch.setattr(ebe, name, _counting(calls, name, getattr(ebe, name)), raising=False)
    scan, _ = simulate_scan(n=16, n_positions=12, probe_modes=2, photons=1e5, seed=4, position_error_px=1.0,
                            dead_pixels=0.05)
    params = ReconParams(algorithm="DM:3,ML:3", probe_modes=2, precision="single", batch_size=5,
                         probe_update_start=1, max_memory_gb=1.0, refine_positions=True, position_start=1,
                         position_end=4, position_method=method, ml_noise_model=model)
    cpu = reconstruct(scan, params, backend=NumpyBackend(1))
    emu = reconstruct(scan, params, backend=ebe)
    expected = {"ml_gradient", "ml_line_search", "view_errors"}
    if method == "gradient":
        expected |= {"normal_equations", "object_gradient"}
    assert expected <= {n for n, c in calls.items() if c > 0}, calls
    assert _rel(emu.object, cpu.object) < 1e-3
    assert _rel(emu.probe, cpu.probe) < 1e-3
    np.testing.assert_allclose(emu.positions_refined_px, cpu.positions_refined_px, atol=1e-3)
    np.testing.assert_allclose(emu.error_data, cpu.error_data, rtol=1e-3)
