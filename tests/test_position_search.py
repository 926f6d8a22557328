"""Position refinement on heavy-tailed stage errors (issue 18, part 3): the coarse global stage
(``position_search_radius``) and the guard that undoes a refinement which fits the data worse.

The slow ones: ``python -m pytest -m slow tests/test_position_search.py``; the figures come from
``benchmarks/position_search.py`` (docs/position_search.md).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hxn_ptycho import positions
from hxn_ptycho.engine import reconstruct
from hxn_ptycho.metrics import object_error, position_rms
from hxn_ptycho.params import ParamError, ReconParams
from hxn_ptycho.positions import disc_grid, global_prediction
from hxn_ptycho.simulate import heavy_tailed_errors, simulate_scan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from position_search import heavy_scan

QUIET = {"log": lambda msg: None}


def test_heavy_tailed_errors_are_heavy_tailed():
    e = heavy_tailed_errors(100, seed=3, drift_px=0.001, jitter_px=2.5, outliers=0.06)
    d = np.hypot(e[:, 0], e[:, 1])
    assert np.sqrt(np.mean(e ** 2)) >= 6.0 and d.max() >= 25 and d.max() <= 30 + 1e-9
    assert np.median(d) < 0.5 * np.sqrt(np.mean(d ** 2))                # a heavy tail, not a Gaussian


def test_disc_grid_and_global_prediction():
    g = disc_grid(3.0, 1.0)
    assert (g[0] == 0).all() and len(g) == 29 and np.hypot(*g.T).max() <= 3
    rng = np.random.default_rng(0)
    cur = rng.uniform(0, 100, (60, 2))
    true = cur @ np.array([[1.01, 0.02], [-0.02, 0.99]]).T + np.array([3.0, -2.0])
    found = true.copy()
    found[::10] += 25.0                                                 # outliers of the search
    pred = global_prediction(cur, found, np.ones(60, bool))
    assert np.abs(pred - true).max() < 0.5                              # the affine map, outliers trimmed


def test_search_radius_is_refused_by_name_when_negative():
    with pytest.raises(ParamError, match="position_search_radius"):
        ReconParams(position_search_radius=-1.0)


def test_guard_undoes_a_refinement_that_fits_worse(monkeypatch):
    """A refinement step that throws a quarter of the views 6 px off near its end (a broken step)
    is undone view by view at the end of refinement. Measured: final cost 0.659 with the guard (16
    views sent back), 2.37 without, 0.267 not refining — the guard limits the damage, it does not
    bring the run back to the unrefined one (docs/position_search.md)."""
    scan, _ = simulate_scan(n=64, n_positions=50, photons=1e6, seed=4)
    base = ReconParams(iterations=40, position_start=5, position_end=20)
    real = positions.PositionRefiner.refine

    def broken(self):
        move = real(self)
        if self.count == 12:
            pos = self.rec.geom.positions_all.copy()
            pos[::4] += 6.0
            self.rec.geom.set_positions(pos)
        return move
    monkeypatch.setattr(positions.PositionRefiner, "refine", broken)
    guarded = reconstruct(scan, base.replace(refine_positions=True), **QUIET)
    assert guarded.attrs["position_reverted"] >= 10
    monkeypatch.setattr(positions.PositionRefiner, "guard", lambda self: 0)
    unguarded = reconstruct(scan, base.replace(refine_positions=True), **QUIET)
    assert guarded.attrs["final_cost"] < 0.5 * unguarded.attrs["final_cost"], (
        guarded.attrs["final_cost"], unguarded.attrs["final_cost"])


def _heavy(seed: int, radius: float, refine: bool = True):
    scan, exact, truth, _ = heavy_scan(seed, 100, drift=0.001, jitter=1.5, outliers=0.04)
    p = ReconParams(iterations=150, refine_positions=refine, position_start=20, position_end=105,
                    position_max_shift=32.0, position_search_radius=radius)
    res = reconstruct(scan, p, **QUIET)
    pos = res.positions_refined_px if refine else res.positions_px
    return position_rms(pos, truth.positions_px), object_error(res, truth, pos), exact, truth


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1])
def test_heavy_tailed_jitter_and_slipped_views_recovered(seed):
    """Heavy-tailed jitter and slipped views, no drift: 3.8 px RMS a axis (5.4 px 2-D), the worst
    26.6 px. Recovered to ≤ 0.5 px RMS (measured 0.24 px with the growth in scan order, 0.12 without)
    with the object within 1.2x of the true-position reconstruction (0.0147 vs 0.0144). It fails with
    refinement off (5.38 px, NRMSE 0.170) and with the gradient refinement alone (3.18 px, 0.042)."""
    err, nrmse_ref, exact, truth = _heavy(seed, 32.0)
    ideal = reconstruct(exact, ReconParams(iterations=150), **QUIET)
    e_ideal = object_error(ideal, truth, ideal.positions_px)
    assert err <= 0.5 and nrmse_ref <= 1.2 * e_ideal, (err, nrmse_ref, e_ideal)


def test_growth_in_scan_order_recovers_a_drift_with_a_known_probe():
    """The registration of each view against the object grown from the views before it
    (position_search.grow), with the true probe: a smooth drift plus heavy-tailed jitter and slipped
    views (≥ 6 px RMS a axis, the worst 28 px) come back to within 1.5 px for ≥ 90 % of the views
    (measured 98 %, 0.75 px 2-D RMS; 4 % of the nominal ones; about 6 s of CPU, 100 views of
    64², the drift model of benchmarks/position_search.py, seed 1). Most nominal positions are
    further off: a broken registration (or none) fails."""
    from hxn_ptycho.position_search import Grower, grow
    scan, _, truth, err = heavy_scan(1, 100)
    assert np.sqrt(np.mean(err ** 2)) >= 6.0 and np.hypot(*err.T).max() >= 25
    pad = 32
    true = truth.positions_px + pad
    nominal = true + err
    shape = (1, truth.object.shape[0] + 2 * pad, truth.object.shape[1] + 2 * pad)
    amps = scan.diffamp.astype(np.float64)
    level = np.sqrt(np.mean(np.sum(amps ** 2, axis=(1, 2))) / np.sum(np.abs(truth.probe) ** 2))   # Parseval
    g = Grower(np.full(shape, level, complex), truth.probe, amps, None)
    found, _ = grow(g, nominal, 32.0, local_radius=10.0)

    def within(pos):
        d = pos - true
        d -= np.median(d, axis=0)
        return float(np.mean(np.hypot(d[:, 0], d[:, 1]) <= 1.5))
    assert within(nominal) < 0.3
    assert within(found) >= 0.9 and position_rms(found, true) < 1.5, (within(found), position_rms(found, true))


def _drift(seed: int, refine: bool = True, grow: bool = True):
    scan, exact, truth, err = heavy_scan(seed, 100)                   # drift 4 px + jitter 2 + 5 % slipped
    p = ReconParams(iterations=150, refine_positions=refine, position_start=20, position_end=105,
                    position_max_shift=32.0, position_search_radius=32.0, position_grow=grow)
    res = reconstruct(scan, p, **QUIET)
    pos = res.positions_refined_px if refine else res.positions_px
    return position_rms(pos, truth.positions_px), object_error(res, truth, pos), exact, truth, err


@pytest.mark.slow
def test_drift_jitter_and_slipped_views_recovered():
    """A smooth drift (4 px RMS) plus heavy-tailed jitter and 5 % slipped views: 6.07 px RMS a axis,
    the worst 28 px. With the coarse stage (the probe's defocus chosen, the object grown in scan
    order, then again with the refined probe) recovered to ≤ 0.5 px RMS (measured 0.208 px; 0.28
    without the defocus choice) with the object within 1.2x of the true-position reconstruction
    (0.0154 vs 0.0144). Fails with refinement off and with the previous
    refinement (test_drift_not_recovered_without_growth)."""
    err, nrmse_ref, exact, truth, e = _drift(1)
    assert np.sqrt(np.mean(e ** 2)) >= 6.0 and np.hypot(*e.T).max() >= 25
    ideal = reconstruct(exact, ReconParams(iterations=150), **QUIET)
    e_ideal = object_error(ideal, truth, ideal.positions_px)
    assert err <= 0.5 and nrmse_ref <= 1.2 * e_ideal, (err, nrmse_ref, e_ideal)


@pytest.mark.slow
@pytest.mark.parametrize("refine,grow", [(False, False), (True, False)], ids=["off", "no-growth"])
def test_drift_not_recovered_without_growth(refine, grow):
    """The same scan without refinement (measured 8.03 px, NRMSE 0.233) and with the coarse stage of
    session 16 (leave-one-out grid searches, no growth: measured 23 px, 0.27) misses the target the
    test above asserts: it discriminates."""
    err, nrmse_ref, *_ = _drift(1, refine, grow)
    assert err > 0.5 and nrmse_ref > 1.2 * 0.0144, (err, nrmse_ref)


def test_growth_misfit_tells_the_probe_defocus():
    """position_probe_defocus's criterion: the data error of the first views grown in scan order
    (drift + jitter + slipped views, seed 2) with the mean-amplitude probe at the simulator's
    defocus (c = 36, correlation 0.98 with the true probe) is lower than with the engine's range
    (c = 0) and with the twin (c = -36); at the nominal corners the three are not told apart
    (docs/position_search.md). A broken family or a broken growth fails. About 7 s of CPU."""
    from hxn_ptycho.position_search import defocus_family, growth_misfit
    scan, _, truth, err = heavy_scan(2, 100)
    pad = 32
    nominal = truth.positions_px + pad + err
    shape = (1, truth.object.shape[0] + 2 * pad, truth.object.shape[1] + 2 * pad)
    amps = scan.diffamp.astype(np.float64)
    power = float(np.mean(np.sum(amps ** 2, axis=(1, 2))))
    fam = defocus_family(np.sqrt(np.mean(amps ** 2, axis=0)), power, np.array([36.0, 0.0, -36.0]))
    t = np.asarray(truth.probe).reshape(-1, 64, 64)[0]
    corr = np.abs(np.fft.ifft2(np.fft.fft2(fam[0]) * np.conj(np.fft.fft2(t)))).max() / (
        np.linalg.norm(fam[0]) * np.linalg.norm(t))
    assert corr > 0.95
    e = [growth_misfit(p[None], np.ones(1), shape, amps, None, nominal, 32.0, 10.0, 24) for p in fam]
    assert e[0] < 0.9 * min(e[1], e[2]), e


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3])
def test_probe_defocus_recovers_the_drift_seeds_the_growth_alone_misses(seed):
    """Seeds 2 and 3 of the drift model (drift 4 px + jitter 2 px + 5 % slipped: 7.14 and 6.85 px
    RMS a axis, the worst 26.6 and 28 px), which the growth alone leaves at 11.7 px (its probe never
    becomes good): with the probe's defocus chosen by the growth (position_probe_defocus, on by
    default since session 19) recovered to ≤ 0.5 px with the object within 1.2x of the
    true-position reconstruction (measured 0.136 and 0.144 px, 1.03x and 1.01x). Fails with
    position_probe_defocus=False (11.7 px) and with the nominal scale held after the late growth
    (0.81 px, 8.6x)."""
    scan, exact, truth, err = heavy_scan(seed, 100)
    assert np.sqrt(np.mean(err ** 2)) >= 6.0 and np.hypot(*err.T).max() >= 25
    p = ReconParams(iterations=150, refine_positions=True, position_start=20, position_end=105,
                    position_max_shift=32.0, position_search_radius=32.0)
    res = reconstruct(scan, p, **QUIET)
    pos = res.positions_refined_px
    err_px, nrmse_ref = position_rms(pos, truth.positions_px), object_error(res, truth, pos)
    ideal = reconstruct(exact, ReconParams(iterations=150), **QUIET)
    e_ideal = object_error(ideal, truth, ideal.positions_px)
    assert res.attrs["position_probe_defocus"] is not None
    assert err_px <= 0.5 and nrmse_ref <= 1.2 * e_ideal, (err_px, nrmse_ref, e_ideal)


def _true_run_nrmse(family: str, seed: int = 1) -> float:
    """The object NRMSE of the reconstruction from the true positions (refinement off, 150 iterations)."""
    from position_search import mixture_heavy_scan
    _, exact, truth, _ = mixture_heavy_scan(family, seed, 100)
    res = reconstruct(exact, ReconParams(iterations=150), **QUIET)
    return object_error(res, truth, res.positions_px)


def _heavy_mixture_run(family: str, seed: int, monkeypatch: Any = None, **refiner: Any) -> tuple:
    """A mixture family's probe and object with the drift model's heavy-tailed errors (seed), every
    option at its default with the coarse stage (radius and max shift 32, refinement 20-105 of 150
    iterations); ``refiner``: PositionRefiner attributes set after its construction. Returns the
    result, its positions' RMS error (px), its object NRMSE and the true-position run's."""
    from position_search import mixture_heavy_scan
    if refiner:
        init = positions.PositionRefiner.__init__

        def with_settings(self, rec):
            init(self, rec)
            for k, v in refiner.items():
                setattr(self, k, v)
        monkeypatch.setattr(positions.PositionRefiner, "__init__", with_settings)
    scan, _, truth, err = mixture_heavy_scan(family, seed, 100)
    assert np.sqrt(np.mean(err ** 2)) >= 6.0 and np.hypot(*err.T).max() >= 25
    p = ReconParams(iterations=150, refine_positions=True, position_start=20, position_end=105,
                    position_max_shift=32.0, position_search_radius=32.0)
    res = reconstruct(scan, p, **QUIET)
    return (res, position_rms(res.positions_refined_px, truth.positions_px),
            object_error(res, truth, res.positions_refined_px), _true_run_nrmse(family, seed))


@pytest.mark.slow
@pytest.mark.parametrize("scale", [True, False], ids=["scale-search", "no-scale-search"])
def test_another_probe_and_object_recovered_with_the_layout_scale(scale, monkeypatch):
    """Another probe and object (tests/mode_mixtures.py's 'defocus' family, first mode: an annular
    lens at c = 16, a quarter of the simulator's defocus, on an object of disks and a filtered-noise
    phase) with the drift model's errors (6.07 px RMS a axis, the worst 28 px), every option at its
    default with the coarse stage: the defocus choice takes c = 18; one slipped view left 34 px off
    by the coarse stage is found again by the guard (judging each view without its own exit wave);
    the layout scale's choice then takes rows 1.01 (the gradient stage left the layout 1.5 % small
    along the rows): 0.22 px and object NRMSE 0.0169 against the true-position run's 0.0167
    (1.01x, with the fresh start at the final corners; 0.0189 before it; measured). Without the
    scale's choice (``scale-search`` off) 0.433 px and 0.056 (3.3x): that case asserts the object
    misses, so the test tells the choice matters
    (docs/position_search.md, session 20). About 40 s each."""
    monkeypatch.setattr(positions.PositionRefiner, "choose_scale",
                        positions.PositionRefiner.choose_scale if scale else lambda self, it: False)
    res, err_px, nrmse, true_nrmse = _heavy_mixture_run("defocus", 1)
    assert res.attrs["position_rescued_at_end"] >= 1
    assert err_px <= 0.5, err_px
    if scale:
        assert res.attrs["position_scale"][0] > 1.005, res.attrs["position_scale"]
        assert nrmse <= 1.2 * true_nrmse, (nrmse, true_nrmse)
    else:
        assert nrmse > 2 * true_nrmse, (nrmse, true_nrmse)


@pytest.mark.slow
@pytest.mark.parametrize("second", [True, False], ids=["second-search", "no-second-search"])
def test_annular_lens_seed_2_recovered_with_the_second_layout_search(second, monkeypatch):
    """The annular lens ('defocus' family, as above) with drift seed 2: the gradient stage leaves
    the layout 1.8 % small along the rows and sheared (linear map [[0.982, -0.010], [-0.006,
    0.994]] against the truth) and the refined probe holds that map, so the first search (from the
    current probe) takes only columns 1.0117: 0.555 px, object 0.052 against the true run's 0.0167
    (3.1x). The second search (from the defocus choice's isotropic probe, with the off-diagonal
    terms, steps down to 0.25 px) finds [[1.0175, 0.0058], [0.0058, 1.0175]], which the long re-fits
    from the engine's first probe prefer (0.264 against 0.293): 0.257 px, object 0.0169 (1.01x;
    measured, docs/position_search.md "session 20, second draw"). ``no-second-search`` asserted
    until session 21 that the object misses without it (3.1x); since the object update is shared
    out by rows (session 21: other rounding of the same sums), the first search alone takes rows
    1.023 and columns 1.012 there and the fresh start and the pixel check finish it (0.256 px,
    0.0164 against 0.0167, measured), so that case now asserts the criterion is met without the
    second search as well — seed 2 no longer shows that the second search is needed. About 45 s each."""
    res, err_px, nrmse, true_nrmse = _heavy_mixture_run("defocus", 2, monkeypatch,
                                                        **({} if second else {"scale_second": False}))
    if second:
        judged = res.attrs["position_scale_judged"]
        assert judged[1] <= 0.98 * judged[0], judged
        assert err_px <= 0.5, err_px
        assert nrmse <= 1.2 * true_nrmse, (nrmse, true_nrmse)
    else:
        assert "position_scale_judged" not in res.attrs
        assert err_px <= 0.5, err_px
        assert nrmse <= 1.2 * true_nrmse, (nrmse, true_nrmse)


@pytest.mark.slow
@pytest.mark.parametrize("restart", [True, False], ids=["fresh-start", "no-fresh-start"])
def test_astigmatic_plate_seed_2_met_by_the_fresh_start_at_the_final_corners(restart, monkeypatch):
    """The astigmatic zone plate ('zernike' family) with drift seed 2: no astigmatism found, the
    layout choice takes an uneven row/column scale, and the model refined along ends at 0.0235
    against the true run's 0.0192 (1.22x). A fresh start at the final corners (150 DM iterations
    from the engine's first probe, ``scale_restart``) fits 0.268 against the model's 0.424 and is
    taken: 0.226 px, object 0.0172 (0.89x; measured, docs/position_search.md "session 20, second
    draw"). ``no-fresh-start`` asserts the object misses without it. About 40 s each."""
    res, err_px, nrmse, true_nrmse = _heavy_mixture_run("zernike", 2, monkeypatch,
                                                        **({} if restart else {"scale_restart": False}))
    assert err_px <= 0.5, err_px
    if restart:
        e_model, e_fresh = res.attrs["position_scale_restarted"]
        assert e_fresh <= 0.98 * e_model, (e_model, e_fresh)
        assert nrmse <= 1.2 * true_nrmse, (nrmse, true_nrmse)
    else:
        assert "position_scale_restarted" not in res.attrs
        assert nrmse > 1.2 * true_nrmse, (nrmse, true_nrmse)


@pytest.mark.slow
def test_astigmatic_probe_recovered_with_the_astigmatism_search_and_the_layout_scale():
    """An astigmatic annular zone plate (tests/mode_mixtures.py's 'zernike' family, first mode; its
    own object) with the drift model's errors (6.07 px RMS a axis, the worst 28 px), every option
    at its default with the coarse stage: the defocus choice then the astigmatism search take rows
    30, columns 36 (true 30.4 and 34.4); the gradient stage leaves the layout 2.4 % small along the
    rows and 1 % large along the columns (0.60 px, object 0.060: 3.1x the true-position run), and
    the layout scale's choice takes rows 1.023, columns 0.989: 0.127 px, NRMSE 0.0175 against the
    true run's 0.0194 (0.90x with the fresh start at the final corners, 1.03x before; measured). With the defocus alone 1.63 px and 0.110
    (docs/position_search.md, "Session 19, astigmatism" and session 20). About 40 s."""
    res, err_px, nrmse, true_nrmse = _heavy_mixture_run("zernike", 1)
    assert res.attrs["position_probe_astigmatism"] > 0, res.attrs["position_probe_astigmatism"]
    assert err_px <= 0.5, err_px
    assert nrmse <= 1.2 * true_nrmse, (nrmse, true_nrmse)


@pytest.mark.slow
@pytest.mark.parametrize("check", [True, False], ids=["pixel-check", "no-pixel-check"])
def test_annular_lens_seed_4_met_by_the_pixel_check(check, monkeypatch):
    """The annular lens ('defocus' family) with drift seed 4: the layout's choice leaves it right to
    0.3 px but three views on the neighbouring pixel (their refined positions 0.50-0.60 px from
    the truth, across the rounding boundary), and the model at those corners — refined or a fresh
    start — paints them in: 0.305 px, object 0.0205 against the true run's 0.0164 (1.25x). The
    pixel check (each view's leave-one-out error at the 8 pixels around it; ambiguous views moved
    where a fresh start fits >= 2 % better) moves two of them back: 0.263 against 0.272, object
    0.0173 (1.06x; measured on the pixel check's branch, docs/position_search.md "Session 21").
    Since the object update is shared out by rows (session 21, merged after it: the same sums in
    another order), the run without the check ends at 0.0175 (1.07x) and the check's one proposal is
    not taken (0.2593 against 0.2630, 1.4 %), so both cases now assert the criterion, and what the
    check does is shown by test_pixel_check_moves_views_snapped_to_a_neighbouring_pixel_back.
    About 25-40 s each."""
    res, err_px, nrmse, true_nrmse = _heavy_mixture_run("defocus", 4, monkeypatch,
                                                        **({} if check else {"pixel_check": False}))
    assert err_px <= 0.5, err_px
    assert nrmse <= 1.2 * true_nrmse, (nrmse, true_nrmse)
    if check:
        assert isinstance(res.attrs["position_pixel_judged"], list)
    else:
        assert "position_pixel_moved" not in res.attrs


def test_pixel_check_moves_views_snapped_to_a_neighbouring_pixel_back():
    """:meth:`PositionRefiner.check_pixels` on the annular lens's scan (tests/mode_mixtures.py
    'defocus', 100 views, the true probe as the first guess): the true corners with two views one
    pixel off (a row and a column), 40 DM iterations there, then the check, judged by fresh starts of
    60 DM iterations from the flat object. It moves exactly those two views back to their true
    pixels (measured: exactly those two proposed, the fresh start 0.259 against 0.270), and on the
    true layout it proposes none; there, with half the views proposed (``pixel_ambiguous`` 1), the
    fresh start fits worse and nothing moves. A check that proposes nothing, moves the wrong views,
    or whose judge takes a worse layout fails. About 5 s."""
    import dataclasses

    from mode_mixtures import mixture_scan

    from hxn_ptycho.dm_iteration import DMIteration
    from hxn_ptycho.engine import Reconstruction
    from hxn_ptycho.initial import initial_object
    exact, mix = mixture_scan("defocus", (1.0,), 1e6, seed=1, n_positions=100)
    exact = dataclasses.replace(exact, probe_guess=mix.probe)
    off = {30: (1.0, 0.0), 61: (0.0, -1.0)}
    for wrong, ambiguous in ((off, None), ({}, None), ({}, 1.0)):
        rec = Reconstruction(exact, ReconParams(iterations=60, refine_positions=True, position_search_radius=8.0),
                             **QUIET)
        try:
            geom = rec.geom
            geom.use_subpixel(False)
            truth = geom.positions_all.copy()
            start = truth.copy()
            for j, d in wrong.items():
                start[j] += d
            geom.set_positions(start)
            first = rec.be.asarray(np.array(rec.be.asnumpy(rec.probe)), rec.cdtype)   # the true probe
            flat = rec.be.asarray(initial_object(rec.obj_shape, rec.params), rec.cdtype)
            rec._each(rec._init_psi)
            stage = DMIteration(rec)
            for it in range(40):
                stage.iterate(it)
            rec._each(rec._init_psi)
            refiner = positions.PositionRefiner(rec)
            if ambiguous is not None:        # half the views proposed: the judge must refuse them
                refiner.pixel_ambiguous = ambiguous

            def fresh(rec=rec, flat=flat, first=first):
                rec.obj, rec.probe = flat.copy(), first.copy()
                rec._each(rec._init_psi)
                fit = DMIteration(rec)
                for _ in range(60):
                    fit.iterate(40)
                return rec.model_cost()[0], rec.obj, rec.probe
            moved = refiner.check_pixels(fresh)
            if ambiguous is not None:
                assert refiner.pixel_judged[0][2] >= 40 and refiner.pixel_judged[0][1] > refiner.pixel_judged[0][0]
            assert sorted(refiner.pixel_moved) == sorted(wrong), refiner.pixel_judged
            assert moved == len(wrong)
            diff = np.round(geom.positions_all) - np.round(truth)
            assert not diff.any(), (np.nonzero(diff.any(axis=1))[0], diff[diff.any(axis=1)], refiner.pixel_judged)
        finally:
            rec.close()


def test_layout_scale_choice_undoes_a_scaled_layout_and_keeps_the_true_one():
    """:meth:`PositionRefiner.choose_scale` on the annular lens's scan (tests/mode_mixtures.py
    'defocus', 100 views, the true probe as the first guess): 40 DM iterations with the views at the
    true corners scaled by 0.98 along the rows (sub-pixel, as refinement leaves them), then on the
    pixel grid, then the choice. It takes a row scale of 1.02-1.03 (measured 1.0233: the layout
    back to 1.003 of the truth) and no column scale; on the true layout it keeps the scale (every
    candidate's re-fit fits worse; measured 0.2937 against 0.2945 and more). A choice that never
    moves, or that moves the true layout, fails. About 10 s."""
    import dataclasses

    from mode_mixtures import mixture_scan

    from hxn_ptycho.dm_iteration import DMIteration
    from hxn_ptycho.engine import Reconstruction
    exact, mix = mixture_scan("defocus", (1.0,), 1e6, seed=1, n_positions=100)
    exact = dataclasses.replace(exact, probe_guess=mix.probe)
    for rows, expect in ((0.98, True), (1.0, False)):
        rec = Reconstruction(exact, ReconParams(iterations=60, refine_positions=True, position_search_radius=8.0),
                             **QUIET)
        try:
            geom = rec.geom
            truth = geom.positions_all.copy()
            c = truth.mean(axis=0)
            geom.set_positions(c + (truth - c) * np.array([rows, 1.0]))
            rec._each(rec._init_psi)
            stage = DMIteration(rec)
            for it in range(40):
                stage.iterate(it)
            geom.use_subpixel(False)
            rec._each(rec._init_psi)
            refiner = positions.PositionRefiner(rec)
            moved = refiner.choose_scale(40)
            m = refiner.scale_chosen
            assert moved == expect, refiner.scale_scores
            if expect:
                assert 1.015 <= m[0] <= 1.03 and m[3] == 1.0 and m[1] == m[2] == 0.0, refiner.scale_scores
                got = geom.positions_all - geom.positions_all.mean(axis=0)
                assert abs(np.sum(got[:, 0] * (truth[:, 0] - c[0])) / np.sum((truth[:, 0] - c[0]) ** 2) - 1) < 0.008
            else:
                assert m == (1.0, 0.0, 0.0, 1.0)
                assert np.allclose(geom.positions_all - geom.positions_all.mean(axis=0), truth - c)
        finally:
            rec.close()


def _choice_inputs(seed: int):
    scan, _, truth, err = heavy_scan(seed, 100)
    pad = 32
    nominal = truth.positions_px + pad + err
    shape = (1, truth.object.shape[0] + 2 * pad, truth.object.shape[1] + 2 * pad)
    amps = scan.diffamp.astype(np.float64)
    return truth, nominal, shape, amps


def _chooser(views: int = 48):
    """A stand-in for the refiner's state that PositionRefiner._choose_defocus reads and writes."""
    from types import SimpleNamespace
    rec = SimpleNamespace(n=64, log=lambda msg: None)
    me = SimpleNamespace(rec=rec, radius=32.0, local_radius=10.0, defocus_views=views, defocus_chosen=None,
                         hold_after_grow=True, defocus_scores={}, probe_astigmatism=True, defocus_astigmatism=0.0)
    me._choose_astigmatism = lambda *a: positions.PositionRefiner._choose_astigmatism(me, *a)
    return me


def test_defocus_choice_is_cheap_and_finds_the_defocus(monkeypatch):
    """The coarse-to-fine defocus choice (on by default with the coarse stage; its growths at half
    resolution) on the drift model's seed 1: handed the true probe it keeps it after its coarse pass
    alone (9 members and the current probe: exactly 10 growths); handed the engine's range (c = 0)
    it takes c within 4 of the simulator's 36 (measured 36) after 16 growths, then the search for an
    astigmatism (at most 12 growths) takes none (the simulator's zone
    plate has none). A choice that always takes or never takes a member, a wrong family or a broken
    half-resolution scan fails. About 15 s of CPU."""
    from hxn_ptycho import position_search
    from hxn_ptycho.position_search import defocus_family
    truth, nominal, shape, amps = _choice_inputs(1)
    calls: list[int] = []
    real = position_search.growth_misfit

    def counted(*a, **k):
        calls.append(a[8])          # the views grown
        return real(*a, **k)
    monkeypatch.setattr(position_search, "growth_misfit", counted)
    probe = np.asarray(truth.probe, complex)
    level = np.array([np.sqrt(np.mean(np.sum(amps ** 2, axis=(1, 2))) / np.sum(np.abs(probe) ** 2))])  # Parseval
    me = _chooser()
    out = positions.PositionRefiner._choose_defocus(me, probe, level, shape, amps, None, nominal)
    assert out is probe and me.defocus_chosen is None and me.hold_after_grow
    assert calls == [48] * 10, calls
    calls.clear()
    flat = defocus_family(np.sqrt(np.mean(amps ** 2, axis=0)), float(np.sum(np.abs(probe) ** 2)), np.zeros(1))
    me = _chooser()
    out = positions.PositionRefiner._choose_defocus(me, flat, level, shape, amps, None, nominal)
    assert me.defocus_chosen is not None and abs(me.defocus_chosen - 36) <= 4, me.defocus_scores
    assert not me.hold_after_grow and out is not flat and 16 < len(calls) <= 28, calls
    assert me.defocus_astigmatism == 0.0, me.defocus_scores


def test_astigmatism_choice_finds_an_astigmatic_zone_plate():
    """tests/mode_mixtures.py's 'zernike' probe (an annular zone plate, defocus c = 32.4, astigmatism
    along the detector's axes: rows 30.4, columns 34.4 in the family's units) with the drift model's
    errors, handed the engine's range (c = 0): the defocus alone takes c = 30; the astigmatism search
    then takes rows 30, columns 36 (a = +3; misfit 0.71x the defocus alone's). Without it the growth
    trades the missing astigmatism for a 7 % stretch of the columns (docs/position_search.md). A
    search that never takes an astigmatism, or takes one of the wrong sign, fails. About 15 s."""
    from position_search import mixture_heavy_scan

    from hxn_ptycho.position_search import defocus_family
    scan, _, truth, err = mixture_heavy_scan("zernike", 1, 100)
    pad = 32
    nominal = truth.positions_px + pad + err
    shape = (1, truth.object.shape[0] + 2 * pad, truth.object.shape[1] + 2 * pad)
    amps = scan.diffamp.astype(np.float64)
    probe = np.asarray(truth.probe, complex)[:1]
    level = np.array([np.sqrt(np.mean(np.sum(amps ** 2, axis=(1, 2))) / np.sum(np.abs(probe) ** 2))])
    flat = defocus_family(np.sqrt(np.mean(amps ** 2, axis=0)), float(np.sum(np.abs(probe) ** 2)), np.zeros(1))
    me = _chooser()
    positions.PositionRefiner._choose_defocus(me, flat, level, shape, amps, None, nominal)
    assert me.defocus_chosen is not None and 1.0 <= me.defocus_astigmatism <= 5.0, me.defocus_scores
    assert abs(me.defocus_chosen - 32.4) <= 4, me.defocus_scores
