"""The reconstruction as a session (hxn_ptycho.session): the offline run is one append; live chunks
then the final phase equal an offline run started from the saved live state; the canvas grows."""
from __future__ import annotations

import numpy as np
import pytest

from hxn_ptycho.distributed import split_views
from hxn_ptycho.engine import reconstruct
from hxn_ptycho.metrics import illuminated_region, nrmse
from hxn_ptycho.params import ReconParams
from hxn_ptycho.session import CanvasError, Extent, ReconSession, deal, header_of, takes_live_state
from hxn_ptycho.simulate import simulate_scan

QUIET = {"log": lambda msg: None}


def live_session(scan, params, chunk, per_chunk, extent=None, **kw):
    s = ReconSession(header_of(scan), params, extent=extent or Extent.of_points(scan.points), **QUIET, **kw)
    for c in range(0, scan.n_views, chunk):
        s.append_views(scan.points[:, c:c + chunk], scan.diffamp[c:c + chunk])
        s.iterate(per_chunk)
    return s


def test_deal_from_empty_is_the_offline_split_and_stays_even():
    for size in (1, 2, 3, 5):
        for n in (size, 7, 120):
            give = deal([0] * size, n)
            assert give == [s.stop - s.start for s in split_views(n, size)]
    counts = [0, 0, 0]
    for m in (1, 1, 5, 2, 40, 3):
        give = deal(counts, m)
        assert sum(give) == m and min(give) >= 0
        counts = [c + g for c, g in zip(counts, give)]
        assert max(counts) - min(counts) <= 1, counts


def test_one_chunk_is_the_offline_reconstruction(sim1):
    scan, _ = sim1
    p = ReconParams(iterations=8, threads=1)
    a = reconstruct(scan, p, **QUIET)
    s = ReconSession(header_of(scan), p, **QUIET)
    s.append_views(scan.points, scan.diffamp)
    b = s.finish()
    for name in ("object", "probe", "error_data", "positions_px"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("extra", [{}, {"refine_positions": True, "algorithm": "DM:6,ML:2"}, {"probe_modes": "auto"}],
                         ids=["DM", "positions+ML", "auto-modes"])
def test_live_then_final_equals_offline_from_the_live_state(sim1, tmp_path, extra):
    """The final phase is the offline schedule (position refinement, ML, automatic modes) from the live state."""
    scan, _ = sim1
    p = ReconParams(iterations=8, threads=1, **extra)
    s = live_session(scan, p, chunk=40, per_chunk=5)
    assert s.iteration == 15 and s.snapshot().views == 120 and s.live_credit == 10     # kept up: the live state
    state = tmp_path / "live_state.h5"
    live = s.finish(state_path=state)
    assert live.attrs["final_from_live_state"] is True and live.attrs["first_iteration"] > 0
    offline = reconstruct(scan, ReconParams(iterations=8, threads=1, init_from=str(state), **extra), **QUIET)
    for name in ("object", "probe", "error_data", "positions_px", "positions_refined_px"):
        assert np.array_equal(getattr(live, name), getattr(offline, name)), name
    assert live.attrs["live_iterations"] == 15


def test_new_views_start_as_probe_times_object(sim1):
    scan, _ = sim1
    s = live_session(scan.__class__(**{**scan.__dict__, "diffamp": scan.diffamp[:60],
                                      "points": scan.points[:, :60]}),
                     ReconParams(iterations=5, threads=1), chunk=60, per_chunk=4,
                     extent=Extent.of_points(scan.points))
    s.append_views(scan.points[:, 60:90], scan.diffamp[60:90])
    rec = s.rec
    obj, probe = rec.be.asnumpy(rec.obj), rec.be.asnumpy(rec.probe)
    n = scan.n
    for j in (60, 75, 89):
        r, c = rec.geom.corner[j]
        expect = probe[:, :, :] * obj[0, r:r + n, c:c + n]
        assert np.allclose(rec.psi[j, 0], expect, rtol=1e-5, atol=1e-6 * np.abs(expect).max())
    assert len(rec.diffamp) == 90 and rec.store.shape[0] == 90 and rec.batches[-1].stop == 90


def test_a_view_outside_the_extent_grows_the_canvas_or_is_refused(sim1):
    scan, _ = sim1
    p = ReconParams(iterations=4, threads=1)
    inner = Extent((float(np.quantile(scan.points[0], 0.3)), float(scan.points[0].max())),
                   (float(scan.points[1].min()), float(np.quantile(scan.points[1], 0.7))))
    s = ReconSession(header_of(scan), p, extent=inner, **QUIET)
    s.append_views(scan.points[:, :60], scan.diffamp[:60])
    s.iterate(2)
    s.append_views(scan.points[:, 60:], scan.diffamp[60:])
    s.iterate(2)
    assert s.canvas_grown >= 1
    pos = s.rec.geom.positions_all
    H, W = s.rec.obj_shape[1:]
    assert pos.min() >= s.margin and pos[:, 0].max() + scan.n + s.margin <= H and pos[:, 1].max() + scan.n + s.margin <= W
    # the canvas is exactly what an offline run lays out for these views (the extent grew to theirs)
    off = reconstruct(scan, ReconParams(iterations=1, threads=1), **QUIET)
    assert (H, W) == off.object.shape[1:]
    res = s.finish()
    assert np.array_equal(res.positions_px, off.positions_px)
    refuse = ReconSession(header_of(scan), p, extent=inner, grow=False, **QUIET)
    with pytest.raises(CanvasError, match=r"view \d+ at x="):
        refuse.append_views(scan.points, scan.diffamp)
        refuse.iterate(1)


def test_a_canvas_from_a_wider_extent_says_where_its_object_lies_and_warm_starts_an_offline_run(sim1, tmp_path):
    """The start document's extent may be wider than the positions measured: the session's canvas is laid from
    it, and the result's ``frame`` gives where that canvas lies (before, it was computed from the positions'
    own extent, 9–10 pixels off here). An offline run of the same scan with another margin, started from that
    result, lays it by its frame: every view's window starts with what it ended with in the session."""
    import json

    from hxn_ptycho.engine import Reconstruction
    from hxn_ptycho.resultfile import read_result, write_result
    scan, _ = sim1
    pts, pix = scan.points, scan.pixel_size_m * 1e6
    wide = Extent((float(pts[0].min()) - 11 * pix, float(pts[0].max()) + 3 * pix),
                  (float(pts[1].min()) - 9.6 * pix, float(pts[1].max())))
    s = ReconSession(header_of(scan), ReconParams(iterations=2, threads=1), extent=wide, **QUIET)
    s.append_views(pts, scan.diffamp)
    res = s.finish()
    frame = json.loads(res.attrs["frame"])
    half = scan.n // 2
    assert np.abs(res.positions_px[:, 0] - ((pts[1] - frame["origin_um"][1]) / pix - half)).max() <= 0.5
    assert np.abs(res.positions_px[:, 1] - ((pts[0] - frame["origin_um"][0]) / pix - half)).max() <= 0.5
    path = tmp_path / "session.h5"
    write_result(path, res)
    rec = Reconstruction(scan, ReconParams(iterations=1, threads=1, margin=3, init_from=str(path)), **QUIET)
    try:
        assert rec.obj_shape[1:] != res.object.shape[1:]
        obj, n = rec.be.asnumpy(rec.obj), scan.n
        prev = read_result(path).object
        for (r, c), (r2, c2) in zip(np.round(res.positions_px).astype(int), np.round(rec.positions_all).astype(int)):
            np.testing.assert_array_equal(obj[0, r2:r2 + n, c2:c2 + n], prev[0, r:r + n, c:c + n])
    finally:
        rec.close()


@pytest.mark.parametrize("modes", [1, 3])
def test_live_final_is_as_good_as_a_cold_offline_run(sim1, sim3, modes):
    """The default schedule (100 iterations); the live phase keeps up with the scan (60 iterations a
    chunk of half the views: the beamline's case, acquisition slower than reconstruction; the mean
    view takes part in ≥ 90 live iterations), so the final phase runs only the part of the schedule
    the live iterations stand for — and is as good as a cold offline run."""
    scan, truth = sim1 if modes == 1 else sim3
    p = ReconParams(probe_modes=modes, threads=1)
    assert p.iterations == 100 and p.live_final_share == 0.1
    cold = reconstruct(scan, p, **QUIET)
    s = live_session(scan, p, chunk=scan.n_views // 2, per_chunk=60)
    assert s.iteration == 120 and s.live_credit == 90
    live = s.finish()
    assert live.attrs["final_from_live_state"] is True
    assert live.attrs["first_iteration"] == 90 and len(live.error_data) == 10     # the tail only
    region = illuminated_region(truth.positions_px, truth.probe, truth.object.shape)
    e_cold, e_live = nrmse(cold.object[0], truth.object, region), nrmse(live.object[0], truth.object, region)
    d_cold, d_live = float(cold.attrs["final_data_error"]), float(live.attrs["final_data_error"])
    assert d_live <= 1.02 * d_cold, (d_live, d_cold)
    assert e_live <= 1.05 * e_cold, (e_live, e_cold)


def test_a_live_phase_that_fell_behind_finishes_as_the_cold_offline_run(sim3):
    """Views arrive faster than the live phase iterates: it ran 10 iterations on the first 30 views,
    then took the other 120 at once and ran 2 more before the stop (12 live iterations, 4 per view).
    That live state is a worse start than the initial guess (from it, the schedule's last 88
    iterations gave data error 1.023× and object NRMSE 1.067× the cold run's with these 3 modes), so
    the final phase is the cold offline run with the default schedule: no worse (here equal)."""
    scan, truth = sim3
    p = ReconParams(probe_modes=3, threads=1)
    cold = reconstruct(scan, p, **QUIET)
    s = ReconSession(header_of(scan), p, extent=Extent.of_points(scan.points), **QUIET)
    s.append_views(scan.points[:, :30], scan.diffamp[:30])
    s.iterate(10)
    s.append_views(scan.points[:, 30:], scan.diffamp[30:])
    s.iterate(2)
    assert s.iteration == 12 and s.live_credit == pytest.approx(4.0)
    live = s.finish()
    assert live.attrs["final_from_live_state"] is False and live.attrs["live_iterations"] == 12
    region = illuminated_region(truth.positions_px, truth.probe, truth.object.shape)
    e_cold, e_live = nrmse(cold.object[0], truth.object, region), nrmse(live.object[0], truth.object, region)
    d_cold, d_live = float(cold.attrs["final_data_error"]), float(live.attrs["final_data_error"])
    assert d_live <= 1.02 * d_cold, (d_live, d_cold)
    assert e_live <= 1.05 * e_cold, (e_live, e_cold)
    assert len(live.error_data) == 100 and np.array_equal(live.object, cold.object)   # 1 rank: the cold run itself


def test_the_final_phase_resumes_the_schedule_after_the_live_iterations():
    """resume_at: the live iterations count, but the tail, ML and refinement are kept."""
    from hxn_ptycho.session import resume_at
    p = ReconParams(iterations=100)
    assert resume_at(p, 0) == 0 and resume_at(p, 37.9) == 37 and resume_at(p, 500) == 90
    assert resume_at(ReconParams(iterations=100, live_final_share=0.25), 500) == 75
    assert resume_at(ReconParams(iterations=100, live_final_share=1.0), 500) == 0
    assert resume_at(ReconParams(iterations=300, algorithm="DM:200,ML:100"), 500) == 200    # every ML iteration
    assert resume_at(ReconParams(iterations=100, refine_positions=True), 500) == 10         # all of the refinement
    s = ReconSession(header_of(simulate_scan(n=32, n_positions=20, seed=1)[0]), ReconParams(iterations=10, threads=1),
                     **QUIET)
    sc, _ = simulate_scan(n=32, n_positions=20, seed=1)
    s.append_views(sc.points[:, :10], sc.diffamp[:10])
    s.iterate(4)
    s.append_views(sc.points[:, 10:], sc.diffamp[10:])
    s.iterate(2)
    assert s.iteration == 6 and s.live_credit == pytest.approx((10 * 6 + 10 * 2) / 20)
    # the live state is taken when the mean view took part in the live iterations it stands for
    assert takes_live_state(p, 200, 95) and takes_live_state(p, 200, 90) and not takes_live_state(p, 200, 89)
    assert not takes_live_state(p, 12, 4) and not takes_live_state(p, 0, 0)
    assert takes_live_state(ReconParams(iterations=100, refine_positions=True), 30, 10)    # resumes at 10


@pytest.mark.gpu
def test_session_on_the_gpu_equals_offline_from_the_live_state(sim1, tmp_path):
    """CuPy backend (benchmarks/gpu_session.sh): the grown exit-wave store, canvas and batches on the
    device; the final result equals an offline GPU run from the saved live state (to the rounding of
    the atomic scatter-adds)."""
    from hxn_ptycho.gpu import gpu_available
    ok, why = gpu_available()
    if not ok:
        pytest.skip(f"no GPU: {why}")
    scan, _ = sim1
    p = ReconParams(iterations=8, backend="cupy", precision="double")
    inner = Extent((float(np.quantile(scan.points[0], 0.2)), float(scan.points[0].max())),
                   (float(scan.points[1].min()), float(scan.points[1].max())))
    s = live_session(scan, p, chunk=40, per_chunk=5, extent=inner)
    assert s.canvas_grown >= 1
    state = tmp_path / "state.h5"
    live = s.finish(state_path=state)
    off = reconstruct(scan, ReconParams(iterations=8, backend="cupy", precision="double", init_from=str(state)),
                      **QUIET)
    assert np.linalg.norm(live.object - off.object) / np.linalg.norm(off.object) < 1e-9


def test_a_chunk_appended_within_the_room_copies_no_frames_or_exit_waves(sim1):
    """Frames and exit waves grow by an eighth at a time: a chunk that fits the room is written in
    place (no copy of the views so far); the model is still that of the views appended."""
    scan, _ = sim1
    s = ReconSession(header_of(scan), ReconParams(iterations=10, threads=1), extent=Extent.of_points(scan.points),
                     **QUIET)
    s.append_views(scan.points[:, :60], scan.diffamp[:60])
    s.iterate(1)
    s.append_views(scan.points[:, 60:65], scan.diffamp[60:65])      # beyond the first (exact) allocation
    psi, frames = s.rec.store.psi, s._frames_local()
    s.append_views(scan.points[:, 65:70], scan.diffamp[65:70])      # within the room (65 + 65 // 8 = 73)
    assert np.shares_memory(s.rec.store.psi, psi) and np.shares_memory(s._frames_local(), frames)
    assert s.rec.store.psi.shape[0] == 70 and s.rec.diffamp.shape[0] == 70
    assert np.array_equal(s._frames_local(), scan.diffamp[:70])
    s.iterate(1)
    s.append_views(scan.points[:, 70:], scan.diffamp[70:])          # beyond the room: a new allocation
    assert not np.shares_memory(s.rec.store.psi, psi) and s.rec.store.psi.shape[0] == scan.n_views
    assert np.array_equal(s._frames_local(), scan.diffamp)
    s.iterate(1)
    assert np.isfinite(s.errors[-1])
