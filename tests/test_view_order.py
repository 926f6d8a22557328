"""ψ's rows in the views' spatial order (engine.Reconstruction._view_order): the same result as the
given order to float rounding, every per-view output in the given order, appended views kept."""
from __future__ import annotations

import numpy as np
import pytest

from hxn_ptycho.engine import Reconstruction
from hxn_ptycho.geometry import spatial_order
from hxn_ptycho.params import ReconParams

QUIET = {"log": lambda msg: None}


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(float(np.max(np.abs(b))), 1e-300))


def test_spatial_order_is_serpentine_bands():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 200, (300, 2))
    order = spatial_order(corners, 32)
    assert sorted(order.tolist()) == list(range(300))
    band = np.floor((corners[order, 0] - corners[:, 0].min()) / 32).astype(int)
    assert np.all(np.diff(band) >= 0)                         # bands top to bottom
    for k in np.unique(band):
        cols = corners[order, 1][band == k]
        assert np.all(np.diff(cols) >= 0) if k % 2 == 0 else np.all(np.diff(cols) <= 0)   # serpentine
    step = np.hypot(*np.diff(corners[order], axis=0).T).mean()
    assert step < 0.3 * np.hypot(*np.diff(corners, axis=0).T).mean()    # neighbours, not random jumps
    tie = np.array([[0.0, 5.0], [0.0, 5.0], [1.0, 5.0]])
    assert spatial_order(tie, 32).tolist() == [0, 1, 2]         # ties keep their order (stable)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_spatial_order_gives_the_given_orders_result(sim1, backend):
    """DM with the object/probe updates, the probe modes' errors and ML: the result of ψ held in the
    spatial order is the given order's to float rounding; per-view outputs are in the given order."""
    scan, _ = sim1
    out = {}
    for spatial in (False, True):
        p = ReconParams(algorithm="DM:5,ML:2", probe_modes=2, threads=2, precision="double", backend=backend)
        rec = Reconstruction(scan, p, spatial_order=spatial, **QUIET)
        if spatial:
            order = rec.geom.order
            assert order is not None and not np.array_equal(order, np.arange(scan.n_views))
            assert np.array_equal(rec.geom.corner, np.round(rec.positions_all[order]).astype(np.int64))
            given = np.hypot(*np.diff(rec.positions_all, axis=0).T).mean()
            rows = np.hypot(*np.diff(rec.geom.local, axis=0).T).mean()
            assert rows < 0.5 * given, (rows, given)       # consecutive rows are neighbours in the object
        else:
            assert rec.geom.order is None
        out[spatial] = rec.run()
    a, b = out[False], out[True]
    assert np.array_equal(a.positions_px, b.positions_px)
    assert np.array_equal(b.positions_px, Reconstruction(scan, ReconParams(iterations=1), **QUIET).positions_all)
    assert _rel(b.object, a.object) < 1e-9 and _rel(b.probe, a.probe) < 1e-9
    np.testing.assert_allclose(b.error_data, a.error_data, rtol=1e-9)
    assert b.attrs["final_cost"] == pytest.approx(a.attrs["final_cost"], rel=1e-9)


def test_single_precision_spatial_order_matches_to_float_tolerance(sim1):
    scan, _ = sim1
    res = [Reconstruction(scan, ReconParams(iterations=8, threads=2), spatial_order=s, **QUIET).run()
           for s in (False, True)]
    assert _rel(res[1].object, res[0].object) < 1e-3
    assert res[1].attrs["final_cost"] == pytest.approx(res[0].attrs["final_cost"], rel=1e-3)


def test_frames_follow_the_rows(sim1):
    scan, _ = sim1
    rec = Reconstruction(scan, ReconParams(iterations=1, threads=2), **QUIET)
    order = rec.geom.order
    assert order is not None
    assert np.shares_memory(rec.diffamp, scan.diffamp)         # the data as given: not copied
    w = rec.scheduler.workers[0]
    for b in rec.batches[:3] + rec.batches[-1:]:
        assert np.array_equal(rec.frames(w, b), scan.diffamp[order[b]])
    assert np.array_equal(rec.frames_in_rows(), scan.diffamp[order])
    rec.close()


def test_position_refinement_keeps_the_given_order(sim1):
    """Position refinement addresses views by their scan index: no reordering with it."""
    scan, _ = sim1
    rec = Reconstruction(scan, ReconParams(iterations=4, refine_positions=True, position_start=1, threads=1),
                         **QUIET)
    assert rec.geom.order is None
    rec.close()


def test_live_session_keeps_the_rows_of_the_views_held_and_reorders_for_the_final_phase(sim1):
    """Appended views take the rows after those held (ψ of the held ones kept); the final phase lays
    every view out in the spatial order again, as an offline run does."""
    from hxn_ptycho.session import Extent, ReconSession, header_of
    scan, _ = sim1
    s = ReconSession(header_of(scan), ReconParams(iterations=6, threads=2), extent=Extent.of_points(scan.points),
                     **QUIET)
    s.append_views(scan.points[:, :60], scan.diffamp[:60])
    s.iterate(2)
    rec = s.rec
    first = rec.geom.order.copy()
    psi = rec.psi.copy()
    s.append_views(scan.points[:, 60:], scan.diffamp[60:])
    assert np.array_equal(rec.geom.order, np.concatenate([first, np.arange(60, scan.n_views)]))
    assert np.array_equal(rec.psi[:60], psi)                  # the views held keep their rows and ψ
    w = rec.scheduler.workers[0]
    b = rec.batches[-1]
    assert np.array_equal(rec.frames(w, b), scan.diffamp[rec.geom.order[b]])
    s.iterate(2)
    res = s.finish()
    offline = Reconstruction(scan, ReconParams(iterations=6, threads=2), **QUIET)
    assert np.array_equal(s.rec.geom.order, offline.geom.order)   # the final phase: the offline layout
    offline.close()
    assert np.array_equal(res.positions_px, offline.positions_all)
    s.close()


def test_use_given_order_moves_psi_with_the_rows(sim1):
    """``use_given_order`` (for code that indexes views by their row, benchmarks/auto_mode_*.py) moves
    ψ with the rows: DM continued from there is DM in the given order throughout, to rounding."""
    from hxn_ptycho.dm_iteration import DMIteration
    scan, _ = sim1
    p = ReconParams(iterations=6, threads=2, precision="double")
    given = Reconstruction(scan, p, spatial_order=False, **QUIET)
    moved = Reconstruction(scan, p, **QUIET)
    assert moved.geom.order is not None
    dg, dm_ = DMIteration(given), DMIteration(moved)
    for it in range(3):
        dg.iterate(it)
        dm_.iterate(it)
    moved.use_given_order()
    assert moved.geom.order is None and np.array_equal(moved.geom.corner, given.geom.corner)
    assert _rel(moved.psi, given.psi) < 1e-9
    for it in range(3, 6):
        dg.iterate(it)
        dm_.iterate(it)
    assert _rel(moved.obj, given.obj) < 1e-9 and _rel(moved.probe, given.probe) < 1e-9
    given.close()
    moved.close()
