"""The modes' group penalty of ML (ml.mode_penalty; the held-out count's sparse fit, docs/auto_modes.md "Session 33")."""
from __future__ import annotations

import numpy as np
import pytest

from hxn_ptycho import ml, modes
from hxn_ptycho.backend import NumpyBackend


def modes_and_direction(seed: int = 3, M: int = 4, n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = (rng.normal(size=(M, n, n)) + 1j * rng.normal(size=(M, n, n))) * np.array([3.0, 1.0, 0.3, 0.05])[:, None, None]
    h = rng.normal(size=(M, n, n)) + 1j * rng.normal(size=(M, n, n))
    return p, h


def test_the_penalty_is_the_nuclear_norm_of_orthogonal_modes_and_its_gradient_and_line_terms_agree():
    be = NumpyBackend()
    p, h = modes_and_direction()
    p = modes.orthogonalize(p)[0]
    mu = 2.5
    r, g = ml.mode_penalty(be, p, mu)
    # Σ_k ‖P_k‖ of orthogonal modes = the nuclear norm of their matrix (its singular values' sum)
    sv = np.linalg.svd(p.reshape(len(p), -1), compute_uv=False)
    assert abs(r - mu * sv.sum()) < 1e-6 * r
    # the slope 2 Re⟨∂R/∂P*, h⟩ (ML's gradient convention), the line's slope and curvature, by finite differences
    d1, d2 = ml.mode_penalty_line(be, p, h, mu)
    assert abs(d1 - 2 * np.vdot(g, h).real) < 1e-6 * abs(d1)
    a = 1e-4
    rp, rm = ml.mode_penalty(be, p + a * h, mu)[0], ml.mode_penalty(be, p - a * h, mu)[0]
    assert abs((rp - rm) / (2 * a) - d1) < 1e-5 * abs(d1)
    assert abs((rp - 2 * r + rm) / a ** 2 - d2) < 1e-3 * abs(d2) and d2 > 0
    # a mode at zero: the penalty is smooth there (no division by zero), its gradient vanishes
    q = p.copy()
    q[-1] = 0
    r0, g0 = ml.mode_penalty(be, q, mu)
    assert np.isfinite(r0) and np.all(np.isfinite(g0)) and np.abs(g0[-1]).max() == 0




def test_the_sparse_fit_empties_modes_the_data_do_not_pay_for_and_keeps_a_weak_true_one():
    """A 90/10 fly scan (10⁶ photons, 32² frames, 64 views) fitted from its truth plus two spurious modes (5 % and
    2.5 % of the first's power, orthogonal to it): 150 ML iterations of the kept pixels. The plain fit keeps
    1.5/0.9 % in them (measured), the sparse one (μ 10) empties them and keeps the true 10 % mode (6.4 %)."""
    from mode_mixtures import mixture_scan

    from hxn_ptycho import mode_count
    from hxn_ptycho.params import ReconParams

    n = 32
    scan, mix = mixture_scan("fly", np.array([0.9, 0.1]), 1e6, seed=1, n=n, n_positions=64)
    kept, keep = mode_count.holdout_split(scan, 0.15, 22)
    extra = modes.diverse_modes(mix.probe[0], 2, 0.05, np.random.default_rng(0)).reshape(2, -1).astype(complex)
    q = np.linalg.qr(mix.probe.reshape(2, -1).T.astype(complex))[0]
    extra -= (extra @ q.conj()) @ q.T
    p0 = np.vdot(mix.probe[0], mix.probe[0]).real
    extra *= np.sqrt(p0 * np.array([0.05, 0.025]))[:, None] / np.linalg.norm(extra, axis=1, keepdims=True)
    start = np.concatenate([mix.probe, extra.reshape(2, n, n)]).astype(np.complex64)
    params = ReconParams(iterations=150, algorithm="ML:150", probe_modes=4, detector_gain=1.0, threads=1,
                         backend="numpy")
    shares = {mu: modes.power_fractions(mode_count.fit(kept, params, keep, mix.object[None].astype(np.complex64),
                                                        start, mode_cap=10.0, sparsity=mu)[1]) for mu in (0.0, 10.0)}
    assert shares[0.0][2:].sum() > 0.01, shares           # the plain fit: power left in the spurious modes
    assert shares[10.0][2:].sum() < 0.002, shares         # the sparse fit: none
    assert shares[10.0][1] > 0.04, shares                 # and the weak true mode kept


def test_the_sparse_count_reads_the_shares_of_the_fit_held_out_pixels_choose(monkeypatch):
    """The count with sparse fits (``HeldOutCount.sparsity``), through ``engine.reconstruct`` on a one-mode fly
    scan (10⁶ photons, 32² frames, short fits): one sparse fit a μ from the 4-mode fit, their evidence stored; the
    one with the lower held-out error chosen; the count is its modes above 1 %, and the reconstruction runs with
    it. Bad settings are refused by name."""
    from mode_mixtures import mixture_scan

    from hxn_ptycho import mode_count, plots
    from hxn_ptycho.engine import reconstruct
    from hxn_ptycho.params import ParamError, ReconParams

    how = mode_count.HeldOutCount(fit_modes=4, schedule="DM:20,ML:100", screen="DM:10,ML:20", starts=(1.0,),
                                  sparsity=(0.0, 10.0), sparse_its=150)
    monkeypatch.setattr(mode_count, "RULE", how)
    scan, _mix = mixture_scan("fly", np.array([1.0]), 1e6, seed=1, n=32, n_positions=64)
    res = reconstruct(scan, ReconParams(iterations=5, probe_modes="auto", auto_rule="heldout", detector_gain=1.0,
                                        threads=1), log=lambda m: None)
    ev = res.attrs["probe_modes_auto"]
    fits = {f["sparsity"]: np.array(f["shares"]) for f in ev["sparse"]}
    held = {f["sparsity"]: f["held_out_error"] for f in ev["sparse"]}
    assert set(fits) == {0.0, 10.0} and ev["sparsity_chosen"] == min(held, key=held.get), ev["sparse"]
    chosen = fits[ev["sparsity_chosen"]]
    assert ev["count_by"] == "sparse" and ev["found"] == max(1, int(np.sum(chosen >= 0.01))) == res.probe.shape[0]
    assert "sparsity" in plots.count_note(res.attrs)
    for bad in ({"sparsity": (-1.0,)}, {"share_min": 0.0}, {"sparse_its": 0}):
        with pytest.raises(ParamError, match="sparse fits"):
            mode_count.HeldOutCount(**bad)
