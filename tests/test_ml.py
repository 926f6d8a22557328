"""ML refinement after DM, the algorithm chain parameter, and the engine's stop hook."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from hxn_ptycho.datasets import siemens_star
from hxn_ptycho.engine import reconstruct
from hxn_ptycho.params import ParamError, ReconParams, algorithm_stages
from test_siemens import angular_spectrum, peer_spoke_harmonic

QUIET = {"log": lambda msg: None}


def spokes(res) -> tuple[int, float]:
    phase = np.angle(res.object[0])
    spec = angular_spectrum(phase, (phase.shape[0] // 2, phase.shape[1] // 2), range(80, 160, 4))
    h = int(np.argmax(spec[5:]) + 5)
    return h, float(spec[h])


def test_dm_then_ml_lowers_the_star_cost(star_path):
    scan = siemens_star(star_path)
    dm_only = reconstruct(scan, ReconParams(algorithm="DM:40"), **QUIET)
    chained = reconstruct(scan, ReconParams(algorithm="DM:30,ML:10"), **QUIET)
    assert chained.attrs["algorithm_stages"] == ["DM:30", "ML:10"]
    assert chained.error_data.shape == (40,)
    c_dm, c_ml = dm_only.attrs["final_cost"], chained.attrs["final_cost"]
    assert c_ml < 0.95 * c_dm, (c_ml, c_dm)             # measured 0.369 vs 0.426 (DM:40,ML:20 0.333 vs DM:60 0.391)
    h_dm, p_dm = spokes(dm_only)
    h_ml, p_ml = spokes(chained)
    assert h_ml == h_dm == peer_spoke_harmonic(star_path.parent / "peer_rpie64_object.png")
    assert p_ml >= 0.9 * p_dm, (p_ml, p_dm)             # the spokes keep their contrast


def test_ml_lowers_its_own_likelihood(sim1):
    scan, _ = sim1
    res = reconstruct(scan, ReconParams(algorithm="DM:20,ML:15", ml_noise_model="poisson"), **QUIET)
    assert np.all(np.isfinite(res.error_data))
    assert res.error_data[-1] <= res.error_data[19] * 1.02


def test_algorithm_chain_is_validated():
    assert algorithm_stages(ReconParams(algorithm="DM:200,ML:100")) == [("DM", 200), ("ML", 100)]
    assert algorithm_stages(ReconParams(iterations=50, algorithm="DM,ML:10")) == [("DM", 40), ("ML", 10)]
    for bad, word in [("DM:200,XX:3", "unknown algorithm"), ("DM:abc", "integer"), ("DM:0", "at least 1"),
                      ("DM,ML", "at most one")]:
        with pytest.raises(ParamError, match=word):
            ReconParams(algorithm=bad)
    with pytest.raises(ParamError, match="leaving none"):
        algorithm_stages(ReconParams(iterations=10, algorithm="DM:10,ML"))


def test_stop_ends_after_the_current_iteration(sim1):
    scan, _ = sim1
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) >= 3
    res = reconstruct(scan, ReconParams(iterations=50), stop=stop, **QUIET)
    assert res.attrs["interrupted"] is True and res.iterations == 3
    assert np.all(np.isfinite(res.error_data)) and np.isfinite(res.attrs["final_cost"])
    ev = threading.Event()
    ev.set()
    res = reconstruct(scan, ReconParams(iterations=50), stop=ev, **QUIET)
    assert res.attrs["interrupted"] is True and res.iterations == 1
    res = reconstruct(scan, ReconParams(iterations=4), stop=threading.Event(), **QUIET)
    assert res.attrs["interrupted"] is False and res.iterations == 4


def test_stop_through_the_distributed_entry_point(sim_file):
    """run_distributed (what the job calls on every rank) passes the stop hook to the engine."""
    from hxn_ptycho.distributed import LocalComm, run_distributed
    ev = threading.Event()
    ev.set()
    for mode in ("sync", "async"):
        res, _ = run_distributed(str(sim_file), ReconParams(iterations=30), LocalComm(), mode=mode,
                                 log=lambda m: None, stop=ev)
        assert res.attrs["interrupted"] is True and res.iterations == 1, mode


def test_amplitude_ml_moves_after_a_short_dm():
    """Issue 18's colleague's case: one mode of the fly-scan-like mixture (64² frames, 100 views of a
    jittered raster, 1e6 photons), DM:20 then ML:20 with the default amplitude noise model. With the
    exact curvature Σ L''(0) < 0 along every direction, α was 0 and the data error stayed at
    0.0018754 through all 20 ML iterations (ratio 0.968 to DM's last, all of it the first ML
    iteration's own DM-state error); the Gauss–Newton curvature gives 0.0011150 (ratio 0.575;
    the Poisson model 0.0012020)."""
    from mode_mixtures import mixture_scan
    scan, _ = mixture_scan("fly", (1.0,), 1e6, seed=1)
    res = reconstruct(scan, ReconParams(algorithm="DM:20,ML:20", threads=1), **QUIET)
    assert res.attrs["algorithm_stages"] == ["DM:20", "ML:20"]
    e = res.error_data
    assert np.all(np.isfinite(e))
    assert e[-1] < 0.75 * e[19], (e[19], e[20], e[-1])          # ML lowers the data error by > 25 %
    assert e[-1] < 0.9 * e[21], (e[21], e[-1])                  # and keeps moving after its first steps
    print(f"\n[hxn-ptycho] amplitude ML after DM:20 on the fly mixture: data error {e[19]:.7f} -> {e[-1]:.7f}")


def test_amplitude_line_search_curvature_is_never_negative():
    """Where the model is far below the data (a ≪ √I) the exact curvature of (a − √I)² along a
    direction is negative; the line search's Gauss–Newton sum 2Σ a'² is not, and it is > 0 along
    any direction with a slope."""
    from hxn_ptycho import ml
    from hxn_ptycho.backend import NumpyBackend
    rng = np.random.default_rng(3)
    shape = (4, 1, 2, 16, 16)
    f0, f1, f2 = ((rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) for _ in range(3))
    amp = 10 * np.sqrt((np.abs(f0) ** 2).sum(axis=(1, 2)))                  # data 10× the model
    d1, d2 = ml.ml_line_search(NumpyBackend(1), f0, f1, f2, amp, amp * amp, None, 1e-12, "amplitude")
    a = np.sqrt((np.abs(f0) ** 2).sum(axis=(1, 2)))
    c1 = 2 * (f0.conj() * f1).real.sum(axis=(1, 2))
    c2 = (np.abs(f1) ** 2 + 2 * (f0.conj() * f2).real).sum(axis=(1, 2))
    exact = np.sum(2 * ((c1 / (2 * a)) ** 2 + (a - amp) * (c2 / a - c1 ** 2 / (4 * a ** 3))))
    assert exact < 0                                                        # the old formula's sum
    assert d2 > 0 and d2 == pytest.approx(np.sum(2 * (c1 / (2 * a)) ** 2), rel=1e-10)
    assert d1 == pytest.approx(np.sum(2 * (a - amp) * c1 / (2 * a)), rel=1e-10)


def test_ml_step_never_stalls_on_a_descent_direction():
    """α = −L'/L'' where L'' > 0; with L'' ≤ 0 along a descent direction the last positive step
    (backed off by the next iteration's overshoot test), never 0 once a step was taken."""
    from hxn_ptycho.ml import ml_step
    assert ml_step(-2.0, 4.0, 0.0) == 0.5
    assert ml_step(1.0, 4.0, 0.3) == 0.0 and ml_step(0.0, 4.0, 0.3) == 0.0   # no descent: no step
    assert ml_step(-2.0, -1.0, 0.3) == 0.3 and ml_step(-2.0, 0.0, 0.3) == 0.3
    assert ml_step(-2.0, -1.0, 0.0) == 0.0                                    # none yet: restart along −g


def _poisson_ml_run(monkeypatch, family, shares, photons, cap, backtrack=True, step_factor=1.0):
    """DM:20 then ML:30 with the Poisson model on a 49-view mixture scan (64² frames, seed 1); the
    probe gradient of mode k × min(cap, P_1/P_k). Returns the result (or the exception), the ML
    stage and the likelihood L of every iteration's point."""
    from mode_mixtures import mixture_scan

    from hxn_ptycho import ml
    from hxn_ptycho.engine import Reconstruction
    init, iterate, step = ml.MLIteration.__init__, ml.MLIteration.iterate, ml.ml_step
    stages, nll = [], []

    def with_cap(self, rec):
        init(self, rec)
        self.mode_precondition_cap = cap
        self.backtrack = backtrack
        stages.append(self)

    def traced(self, it):
        out = iterate(self, it)
        nll.append(self.last_nll)
        return out
    monkeypatch.setattr(ml.MLIteration, "__init__", with_cap)
    monkeypatch.setattr(ml.MLIteration, "iterate", traced)
    if step_factor != 1.0:                          # a step too long, as from a curvature too small
        monkeypatch.setattr(ml, "ml_step", lambda d1, d2, a: step_factor * step(d1, d2, a))
    scan, _ = mixture_scan(family, shares, photons, seed=1, n_positions=49)
    rec = Reconstruction(scan, ReconParams(iterations=50, probe_modes=len(shares), threads=1,
                                           algorithm="DM:20,ML:30", ml_noise_model="poisson"), **QUIET)
    try:
        res = rec.run()
    except FloatingPointError as exc:
        res = exc
    finally:
        rec.close()
        monkeypatch.undo()
    return res, stages[-1], np.asarray(nll)


def test_poisson_ml_with_the_per_mode_step_moves_and_its_likelihood_falls(monkeypatch):
    """Two modes (gsm 70/30, 1e6 photons), the per-mode probe step (cap 10), Poisson ML after DM:20.
    The exact line-search curvature is negative along the first directions: the unchecked step took
    no step in any of the 30 iterations (data error 0.002520 throughout). The checked step tries
    one and keeps it only where L falls (Armijo): measured 30 steps accepted, none rejected, the
    data error 0.002520 → 0.001729, every accepted L below the last."""
    res, ml_stage, _ = _poisson_ml_run(monkeypatch, "gsm", (0.7, 0.3), 1e6, cap=10.0)
    assert not isinstance(res, Exception), res
    acc = np.asarray(ml_stage.accepted_nll)
    assert len(acc) >= 25, (len(acc), ml_stage.backtracks)              # it moves (the old step: 0)
    assert np.all(np.diff(acc) < 0), np.diff(acc)
    e = res.error_data
    assert e[-1] < 0.8 * e[20], (e[20], e[-1])                           # measured 0.69
    assert np.isclose(res.attrs["final_data_error"], e[-1], rtol=1e-6)   # the stage ends on an accepted point


def test_poisson_ml_step_cannot_diverge(monkeypatch):
    """Every Newton step 10× too long (a line-search curvature 10× too small, as the Gauss–Newton one
    is where most pixels are dark): the unchecked step (halve back after a rise, then accept) ran
    away — L up by 10⁶ within 10 iterations, data error 0.0105 → 0.377 (× 30: 10²⁸) on this one-mode
    fly scan at 1e5 photons. The checked step rejects the long trials and shortens them: every
    accepted L below the last, the data error 0.0105 → 0.0069."""
    res, ml_stage, nll = _poisson_ml_run(monkeypatch, "fly", (1.0,), 1e5, cap=1.0, step_factor=10.0)
    assert not isinstance(res, Exception), res
    acc = np.asarray(ml_stage.accepted_nll)
    assert np.all(np.isfinite(acc)) and np.all(np.diff(acc) < 0), np.diff(acc)
    assert ml_stage.backtracks > 0 and len(acc) > 10, (ml_stage.backtracks, len(acc))
    assert acc[-1] < acc[0] - 5e4, acc[-1] - acc[0]                      # measured −8.4e4
    assert res.error_data[-1] < 0.8 * res.error_data[19], (res.error_data[19], res.error_data[-1])
    # the control: the same steps unchecked end far above where they started
    old, _, nll_old = _poisson_ml_run(monkeypatch, "fly", (1.0,), 1e5, cap=1.0, backtrack=False, step_factor=10.0)
    assert isinstance(old, Exception) or not nll_old[-1] < nll_old[0], (nll_old[0], nll_old[-1])
