"""The CuPy backend on a real GPU: every kernel against numpy, then whole reconstructions.

Deselected by default (setup.cfg addopts ``-m "not gpu"``); run with ``pytest -m gpu`` on a
machine with CuPy and a CUDA device (``benchmarks/gpu_session.sh`` does it in one call).
"""
from __future__ import annotations

import numpy as np
import pytest

from hxn_ptycho import dm
from hxn_ptycho.backend import NumpyBackend
from hxn_ptycho.gpu import gpu_available

OK, WHY = gpu_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not OK, reason=f"no GPU: {WHY}")]

RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def be():
    from hxn_ptycho.gpu import CupyBackend
    return CupyBackend(0)


@pytest.fixture(scope="module")
def nb():
    return NumpyBackend(1)


def crandn(shape, dtype=np.complex64):
    return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(dtype)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.complex128), np.asarray(b, np.complex128)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


PREC = [(np.complex64, 2e-6), (np.complex128, 1e-12)]


@pytest.mark.parametrize("cdt,tol", PREC)
def test_fft_orthonormal_and_plans_reused(be, cdt, tol):
    a = crandn((5, 3, 48, 48), cdt)
    d = be.asarray(a)
    f = be.fft2(d)
    assert rel(be.asnumpy(f), np.fft.fft2(a, norm="ortho")) < 10 * tol
    g = be.ifft2(f)
    assert rel(be.asnumpy(g), a) < 10 * tol
    plans = len(be._plans)
    be.fft2(be.asarray(a))
    assert len(be._plans) == plans            # same shape: the plan is reused


def _bound(amp):
    return 0.25 * 0.3 ** 2 * float(np.mean(np.asarray(amp, np.float64) ** 2))


@pytest.mark.parametrize("cdt,tol", PREC)
@pytest.mark.parametrize("M", [1, 3, 10])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("relaxed", [False, True])
def test_fourier_projection_matches_numpy(be, nb, cdt, tol, M, masked, relaxed):
    rdt = np.float32 if cdt == np.complex64 else np.float64
    B, n = 9, 40
    w = crandn((B, M, n, n), cdt)
    amp = np.abs(RNG.standard_normal((B, n, n)) * 1.5).astype(rdt)
    mask = (RNG.random((n, n)) > 0.1) if masked else None
    dmask = None if mask is None else be.asarray(mask)
    pbound = _bound(amp) if relaxed else 0.0
    want_err = dm.data_error(nb, w.copy(), amp, mask)
    assert abs(float(be.data_error(be.asarray(w), be.asarray(amp), dmask)) - float(want_err)) <= 10 * tol * float(want_err)
    want = dm.fourier_projection(nb, w.copy(), amp, mask, pbound)
    d = be.asarray(w)
    out = be.fourier_projection(d, be.asarray(amp), dmask, pbound)
    assert out is d
    assert rel(be.asnumpy(d), want) < 50 * tol


@pytest.mark.parametrize("cdt,tol", PREC)
@pytest.mark.parametrize("M", [1, 5, 10])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("relaxed", [False, True])
def test_fourier_update_matches_the_steps(be, nb, cdt, tol, M, masked, relaxed):
    rdt = np.float32 if cdt == np.complex64 else np.float64
    B, n, beta = 7, 36, 0.8
    fpsi, fphi = crandn((B, M, n, n), cdt), crandn((B, M, n, n), cdt)
    amp = np.abs(RNG.standard_normal((B, n, n)) * 2).astype(rdt)
    mask = (RNG.random((n, n)) > 0.1) if masked else None
    pbound = _bound(amp) if relaxed else 0.0
    want_psi = fpsi.copy()
    want_err = dm.data_error(nb, fphi, amp, mask)
    work = dm.reflect(nb, fphi, want_psi, np.empty_like(fpsi))
    work = dm.fourier_projection(nb, work, amp, mask, pbound)
    dm.dm_update(nb, want_psi, fphi, work, beta)
    d = be.asarray(fpsi)
    err = be.fourier_update(d, be.asarray(fphi), be.asarray(amp), None if mask is None else be.asarray(mask),
                            pbound, beta)
    assert rel(be.asnumpy(d), want_psi) < 50 * tol
    assert abs(float(err) - float(want_err)) <= 10 * tol * float(want_err)


@pytest.mark.parametrize("cdt,tol", PREC)
def test_fft_exit_waves(be, cdt, tol):
    B, L, K, n = 4, 2, 3, 48
    probe, win = crandn((K, n, n), cdt), crandn((B, L, n, n), cdt)
    out = be.empty((B, L, K, n, n), cdt)
    be.fft_exit_waves(be.asarray(probe), be.asarray(win), out)
    assert rel(be.asnumpy(out), np.fft.fft2(win[:, :, None] * probe[None, None], norm="ortho")) < 10 * tol


@pytest.mark.parametrize("cdt,tol", PREC)
@pytest.mark.parametrize("mode", ["atomic", "sets"])
def test_gather_scatter_match_numpy(be, nb, cdt, tol, mode):
    rdt = np.float32 if cdt == np.complex64 else np.float64
    L, H, W, n, B = 2, 130, 110, 32, 150
    pos = np.stack([RNG.integers(0, H - n + 1, B), RNG.integers(0, W - n + 1, B)], 1).astype(np.int64)
    pos[:4] = [[0, 0], [H - n, W - n], [0, W - n], [H - n, 0]]
    obj = crandn((L, H, W), cdt)
    win = be.gather(be.asarray(obj), pos, n)
    np.testing.assert_array_equal(be.asnumpy(win), nb.gather(obj, pos, n))
    src = crandn((B, L, n, n), cdt)
    acc0 = crandn((L, H, W), cdt)
    want = acc0.copy()
    nb.scatter_add(want, pos, src)
    acc = be.asarray(acc0)
    be.scatter_add(acc, pos, be.asarray(src), mode=mode)
    assert rel(be.asnumpy(acc), want) < 20 * tol
    den0 = RNG.random((1, H, W)).astype(rdt)
    w2 = RNG.random((n, n)).astype(rdt)
    want_den = den0.copy()
    nb.scatter_add(want_den, pos, w2)
    den = be.asarray(den0)
    be.scatter_add(den, pos, be.asarray(w2), mode=mode)
    np.testing.assert_allclose(be.asnumpy(den), want_den, rtol=20 * tol)


@pytest.mark.parametrize("cdt,tol", PREC)
def test_fused_steps_match_generic(be, nb, cdt, tol):
    rdt = np.float32 if cdt == np.complex64 else np.float64
    B, L, K, n = 6, 2, 3, 24
    probe = crandn((K, n, n), cdt)
    win = crandn((B, L, n, n), cdt)
    out = be.empty((B, L, K, n, n), cdt)
    be.exit_waves(be.asarray(probe), be.asarray(win), out)
    assert rel(be.asnumpy(out), win[:, :, None] * probe[None, None]) < 10 * tol
    psi, phi, proj = (crandn((B, L, K, n, n), cdt) for _ in range(3))
    r = be.empty(psi.shape, cdt)
    be.reflect(be.asarray(phi), be.asarray(psi), r)
    assert rel(be.asnumpy(r), 2 * phi - psi) < 10 * tol
    d = be.asarray(psi)
    be.dm_update(d, be.asarray(phi), be.asarray(proj), 0.8)
    assert rel(be.asnumpy(d), psi + 0.8 * (proj - phi)) < 10 * tol
    pc = np.conj(probe)
    o = be.empty((B, L, n, n), cdt)
    be.object_numerator(be.asarray(psi), be.asarray(pc), o)
    assert rel(be.asnumpy(o), (psi * pc[None, None]).sum(2)) < 10 * tol
    num0, den0 = crandn((K, n, n), cdt), RNG.random((n, n)).astype(rdt)
    num_w = num0.copy()
    dm.probe_sums(nb, psi, win.copy(), num_w, np.zeros((n, n), rdt), np.empty_like(psi))   # conjugates the windows
    num = be.asarray(num0)
    be.probe_numerator(be.asarray(psi), be.asarray(win), num, None)
    assert rel(be.asnumpy(num), num_w) < 20 * tol
    num, den = be.asarray(num0), be.asarray(den0)
    be.probe_sums(be.asarray(psi), be.asarray(win), num, den)
    assert rel(be.asnumpy(num), num_w) < 20 * tol
    np.testing.assert_allclose(be.asnumpy(den), den0 + (np.abs(win) ** 2).sum(axis=(0, 1)), rtol=20 * tol)


def _reconstruct(scan, backend, **kw):
    from hxn_ptycho.engine import reconstruct
    from hxn_ptycho.params import ReconParams
    params = ReconParams(iterations=20, precision="single", **kw)
    return reconstruct(scan, params, backend=backend)


@pytest.mark.parametrize("modes", [1, 3])
@pytest.mark.parametrize("batch", [None, 7])
def test_reconstruction_matches_numpy(be, modes, batch):
    from hxn_ptycho.simulate import simulate_scan
    scan, _ = simulate_scan(n=64, n_positions=60, probe_modes=modes, photons=1e6, seed=3, dead_pixels=0.02)
    kw = dict(probe_modes=modes, batch_size=batch, max_memory_gb=8.0)
    cpu = _reconstruct(scan, NumpyBackend(1), **kw)
    gpu = _reconstruct(scan, be, **kw)
    assert gpu.attrs["backend"] == "cupy"
    assert rel(gpu.object, cpu.object) <= 1e-4
    assert rel(gpu.probe, cpu.probe) <= 1e-4
    np.testing.assert_allclose(gpu.error_data, cpu.error_data, rtol=1e-4)


def test_scatter_modes_agree_in_a_reconstruction(be):
    from hxn_ptycho.simulate import simulate_scan
    scan, _ = simulate_scan(n=64, n_positions=60, probe_modes=1, photons=None, seed=5)
    be.scatter_mode = "sets"
    try:
        a = _reconstruct(scan, be, probe_modes=1)
    finally:
        be.scatter_mode = "atomic"
    b = _reconstruct(scan, be, probe_modes=1)
    assert rel(a.object, b.object) <= 1e-4


@pytest.mark.parametrize("modes", [1, 3])
def test_ml_and_position_refinement_match_numpy(be, modes):
    """DM then ML with position refinement (the bilinear kernels of cuda/refine.cu) on the GPU."""
    from hxn_ptycho.simulate import simulate_scan
    scan, _ = simulate_scan(n=64, n_positions=60, probe_modes=modes, photons=1e6, seed=3, position_error_px=1.5)
    kw = dict(probe_modes=modes, max_memory_gb=8.0, algorithm="DM:14,ML:6", refine_positions=True,
              position_start=4, position_end=15)
    cpu = _reconstruct(scan, NumpyBackend(1), **kw)
    gpu = _reconstruct(scan, be, **kw)
    assert rel(gpu.object, cpu.object) <= 1e-3
    assert rel(gpu.probe, cpu.probe) <= 1e-3
    np.testing.assert_allclose(gpu.positions_refined_px, cpu.positions_refined_px, atol=1e-2)


# --- the ML and position-refinement kernels (cuda/ml.cu, cuda/positions.cu) ---------------------
def _ml_data(cdt, B, M, n, masked, spread=(0.3, 1.5)):
    rdt = np.float32 if cdt == np.complex64 else np.float64
    f = crandn((B, 1, M, n, n), cdt)
    f[1, :, :, 2, 3] = 0
    mod = np.sqrt((np.abs(f.astype(np.complex128)) ** 2).sum(axis=(1, 2)))
    amp = (mod * RNG.uniform(*spread, mod.shape)).astype(rdt)
    mask = (RNG.random((n, n)) > 0.1) if masked else None
    return f, amp, mask, 0.05 * float(np.mean(mod ** 2))


@pytest.mark.parametrize("cdt,tol", PREC)
@pytest.mark.parametrize("M", [1, 3, 10])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("model", ["poisson", "amplitude"])
def test_ml_steps_match_numpy(be, nb, cdt, tol, M, masked, model):
    from hxn_ptycho import ml
    B, n = 9, 40
    f, amp, mask, floor = _ml_data(cdt, B, M, n, masked)
    dmask = None if mask is None else be.asarray(mask)
    want_out = np.empty_like(f)
    want = ml.ml_gradient(nb, f, amp, amp * amp, mask, floor, model, want_out)
    df, damp = be.asarray(f), be.asarray(amp)
    out = be.empty(f.shape, cdt)
    got = ml.ml_gradient(be, df, damp, damp * damp, dmask, floor, model, out)
    assert got == pytest.approx(want, rel=100 * tol)
    assert rel(be.asnumpy(out), want_out) < 50 * tol
    f1 = (f * (0.5 + 0.1j) + 0.3 * crandn(f.shape, cdt)).astype(cdt)
    f2 = (0.2 * crandn(f.shape, cdt)).astype(cdt)
    want = ml.ml_line_search(nb, f, f1, f2, amp, amp * amp, mask, floor, model)
    got = ml.ml_line_search(be, df, be.asarray(f1), be.asarray(f2), damp, damp * damp, dmask, floor, model)
    assert got == pytest.approx(want, rel=1000 * tol, abs=1000 * tol * max(map(abs, want)))


@pytest.mark.parametrize("cdt,tol", PREC)
@pytest.mark.parametrize("masked", [False, True])
def test_position_steps_match_numpy(be, nb, cdt, tol, masked):
    from hxn_ptycho import positions
    rdt = np.float32 if cdt == np.complex64 else np.float64
    B, L, n = 70, 2, 48
    gr, gc, q = (crandn((B, L, n, n), cdt) for _ in range(3))
    pint = RNG.random((n, n)).astype(rdt)
    want = positions.normal_equations(nb, gr, gc, q, pint)
    got = positions.normal_equations(be, be.asarray(gr), be.asarray(gc), be.asarray(q), be.asarray(pint))
    for w, g in zip(want, got):
        assert isinstance(g, np.ndarray) and g.shape == (B,)
        np.testing.assert_allclose(g, w, rtol=100 * tol, atol=100 * tol * np.abs(w).max())
    f, amp, mask, _ = _ml_data(cdt, B, 3, n, masked)
    dmask = None if mask is None else be.asarray(mask)
    for a in (amp, amp[4][None]):
        np.testing.assert_allclose(positions.view_errors(be, be.asarray(f), be.asarray(a), dmask),
                                   positions.view_errors(nb, f, a, mask), rtol=100 * tol)
    obj = crandn((L, 130, 97), cdt)
    for w, g in zip(positions.object_gradient(nb, obj), positions.object_gradient(be, be.asarray(obj))):
        assert rel(be.asnumpy(g), w) < 10 * tol


def _counting(calls, name, fn):
    """``fn`` counting its calls in ``calls[name]``."""
    def spy(*a, **kw):
        calls[name] += 1
        return fn(*a, **kw)
    return spy


@pytest.mark.parametrize("method,model", [("gradient", "amplitude"), ("search", "poisson")])
def test_ml_and_position_paths_call_the_kernels(be, monkeypatch, method, model):
    """The engine's ML and position refinement reach CupyBackend's fused steps and match numpy."""
    from collections import Counter

    from hxn_ptycho.backend import ML_STEPS, POSITION_STEPS
    from hxn_ptycho.simulate import simulate_scan
    calls: Counter = Counter()
    for name in ML_STEPS + POSITION_STEPS:
        monkeypatch.setattr(be, name, _counting(calls, name, getattr(be, name)), raising=False)
    scan, _ = simulate_scan(n=64, n_positions=60, probe_modes=2, photons=1e6, seed=4, position_error_px=1.5)
    kw = dict(probe_modes=2, max_memory_gb=8.0, algorithm="DM:10,ML:6", refine_positions=True, position_start=3,
              position_end=12, position_method=method, ml_noise_model=model)
    cpu = _reconstruct(scan, NumpyBackend(1), **kw)
    gpu = _reconstruct(scan, be, **kw)
    expected = {"ml_gradient", "ml_line_search", "view_errors"}
    if method == "gradient":
        expected |= {"normal_equations", "object_gradient"}
    assert expected <= {n for n, c in calls.items() if c > 0}, calls
    assert rel(gpu.object, cpu.object) <= 1e-3
    assert rel(gpu.probe, cpu.probe) <= 1e-3
    np.testing.assert_allclose(gpu.positions_refined_px, cpu.positions_refined_px, atol=1e-2)


@pytest.mark.parametrize("cdt,tol", [(np.complex64, 2e-5), (np.complex128, 1e-11)])
@pytest.mark.parametrize("modes,masked,bound,subpixel", [(1, False, False, False), (3, True, True, False),
                                                         (2, True, False, True)])
def test_contract_passes_match_numpy(be, nb, cdt, tol, modes, masked, bound, subpixel):
    """CupyBackend's passes of the backend contract on the GPU against the numpy reference's."""
    from contract_cases import check_passes_match
    check_passes_match(be, nb, cdt, modes, masked, bound, subpixel, tol)
