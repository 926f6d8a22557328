"""Position refinement on heavy-tailed stage errors (issue 18, part 3): the coarse global stage
(``position_search_radius``) and the guard that undoes a refinement which fits the data worse.

The slow ones: ``python -m pytest -m slow tests/test_position_search.py``; the figures come from
``benchmarks/position_search.py`` (docs/position_search.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

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
    26.6 px. Recovered to ≤ 0.5 px RMS (measured 0.31) with the object within 1.2x of the
    true-position reconstruction (0.0160 vs 0.0144). It fails with refinement off (5.38 px, NRMSE
    0.169) and with the gradient refinement alone, today's (2.92 px, 0.0222). NOT the issue's
    target: at ≥ 6 px RMS (more jitter, or a smooth drift) the coarse stage fails too
    (docs/position_search.md)."""
    err, nrmse_ref, exact, truth = _heavy(seed, 32.0)
    ideal = reconstruct(exact, ReconParams(iterations=150), **QUIET)
    e_ideal = object_error(ideal, truth, ideal.positions_px)
    assert err <= 0.5 and nrmse_ref <= 1.2 * e_ideal, (err, nrmse_ref, e_ideal)
