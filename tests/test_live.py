"""The growing scan file (SWMR) and the long-lived job that follows it (hxn_ptycho.live)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hxn_ptycho.engine import reconstruct
from hxn_ptycho.errors import BadInput
from hxn_ptycho.job import job_argv, run_spec
from hxn_ptycho.live import FollowError, FollowOptions, follow_distributed, read_preview
from hxn_ptycho.params import ReconParams
from hxn_ptycho.distributed import LocalComm
from hxn_ptycho.resultfile import read_result
from hxn_ptycho.scanfile import GrowingScanReader, GrowingScanWriter, read_scan
from hxn_ptycho.session import header_of
from hxn_ptycho.spec import Execution, JobSpec, Source

QUIET = {"log": lambda msg: None}


def extent(scan):
    p = scan.points
    return (float(p[0].min()), float(p[0].max()), float(p[1].min()), float(p[1].max()))


def feed(path, scan, chunk, pause_s, complete=True):
    """The measuring side: append the scan in chunks (flushed), then mark it complete."""
    w = GrowingScanWriter(path, header_of(scan), extent_um=extent(scan), decisions={"crop": scan.n})
    for c in range(0, scan.n_views, chunk):
        w.append(scan.diffamp[c:c + chunk], scan.points[:, c:c + chunk])
        time.sleep(pause_s)
    if complete:
        w.mark_complete()
    else:
        w.close()


def test_growing_file_reads_only_whole_views_and_ends_as_a_scan_file(sim1, tmp_path):
    scan, _ = sim1
    path = tmp_path / "scan_g.h5"
    w = GrowingScanWriter(path, header_of(scan), extent_um=extent(scan), decisions={"crop": 64, "gain": 1.0})
    w.append(scan.diffamp[:50], scan.points[:, :50])
    r = GrowingScanReader(path)
    assert r.refresh() == (50, False)
    with pytest.raises(ValueError, match="not all written"):
        r.frames(40, 60)
    w.append(scan.diffamp[50:], scan.points[:, 50:])
    assert r.refresh() == (120, False)
    assert np.array_equal(r.frames(100, 120), scan.diffamp[100:120])
    w.mark_complete()
    assert r.refresh() == (120, True)
    assert r.header().attrs["decision_crop"] == 64
    r.close()
    back = read_scan(path)
    assert np.array_equal(back.diffamp, scan.diffamp) and np.array_equal(back.points, scan.points)
    with pytest.raises(FileExistsError):
        GrowingScanWriter(path, header_of(scan))
    bad = GrowingScanWriter(tmp_path / "b.h5", header_of(scan))
    with pytest.raises(BadInput, match="a chunk needs frames"):
        bad.append(scan.diffamp[:3], scan.points[:, :2])
    bad.close()


def test_the_follow_job_previews_and_finishes_as_offline_from_the_live_state(sim1, tmp_path):
    scan, _ = sim1
    path, result = tmp_path / "scan_live.h5", tmp_path / "recon_live.h5"
    params = ReconParams(iterations=10, threads=1)
    writer = threading.Thread(target=feed, args=(path, scan, 20, 0.6))
    writer.start()
    spec = JobSpec(params=params, execution=Execution(ranks=1),
                   source=Source(scan_file=str(path), result_file=str(result)))
    try:
        status, outcome = run_spec(spec, tmp_path / "o.json", progress=False, follow=True)
    finally:
        writer.join()
    assert status == 0, outcome
    live = outcome["measured"]["live"]
    assert live["views"] == 120 and live["live_iterations"] > 0
    assert live["previews"] >= 1 and live["previews_dropped"] >= 0      # (rates and gaps: benchmarks/live.py)
    assert live["final_latency_s"] > 0
    marks = live["timeline"]                        # the job warmed its kernels beside the wait for the file
    assert marks["warm_up_s"] > 0 and marks["job_started_at"] <= marks["file_appeared_at"]
    assert marks["file_appeared_at"] <= marks["first_views_in_at"] <= marks["first_iteration_at"]
    assert marks["first_iteration_at"] < marks["final_phase_from"] <= marks["final_phase_to"]
    recon = spec.recon(outcome["measured"])         # what the derived run's start document carries
    assert recon["measured"]["live"]["previews"] == live["previews"]
    assert recon["measured"]["live"]["first_preview_latency_s"] is not None
    prev = read_preview(tmp_path / "recon_live.preview.h5")
    assert prev["views"] > 0 and prev["object_phase"].ndim == 2 and np.isfinite(prev["data_error"])
    assert prev["final"] == 1 and prev["views"] == 120     # the last preview is the finished result
    assert live["final_preview"]["views"] == 120 and all(p["views"] <= 120 for p in live["preview_log"])
    res = read_result(result)
    assert np.array_equal(prev["object_phase"], np.angle(res.object[0]).astype(np.float32))
    offline = reconstruct(read_scan(path), ReconParams(iterations=10, threads=1,
                                                       init_from=str(tmp_path / "recon_live.live_state.h5")), **QUIET)
    assert np.array_equal(res.object, offline.object) and np.array_equal(res.error_data, offline.error_data)


def test_a_scan_file_that_stops_growing_fails_by_name(sim1, tmp_path):
    scan, _ = sim1
    path = tmp_path / "scan_stall.h5"
    feed(path, scan, 60, 0.0, complete=False)
    with pytest.raises(FollowError, match="has not grown"):
        follow_distributed(str(path), ReconParams(iterations=2, threads=1), LocalComm(),
                           options=FollowOptions(stall_s=0.5))
    with pytest.raises(FollowError, match="did not appear"):
        follow_distributed(str(tmp_path / "never.h5"), ReconParams(iterations=2, threads=1), LocalComm(),
                           options=FollowOptions(appear_s=0.3))


MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}")
def test_two_ranks_follow_and_finish_as_one_process_from_the_live_state(sim1, tmp_path):
    """Real processes: chunks dealt to 2 ranks (each reads its own frames); the final result equals a
    1-process offline run from the saved live state to rounding (the sums run in another order)."""
    scan, _ = sim1
    path, result = tmp_path / "scan_mpi.h5", tmp_path / "recon_mpi.h5"
    params = ReconParams(iterations=10, threads=1, precision="double")
    spec = JobSpec(params=params, execution=Execution(ranks=2),
                   source=Source(scan_file=str(path), result_file=str(result)))
    spec_path = spec.write(tmp_path / "mpi.spec.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "HYDRA_", "MPI_"))}
    job = subprocess.Popen(job_argv(spec_path, nprocs=2, quiet=True, follow=True), env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    w = GrowingScanWriter(path, header_of(scan), extent_um=extent(scan))
    try:                                  # chunks of 25: dealt 13/12, then 12/13, ...; each in >= 12 live
        for c in range(0, scan.n_views, 25):          # iterations (kept up, on a loaded machine too)
            w.append(scan.diffamp[c:c + 25], scan.points[:, c:c + 25])
            seen = _wait_preview(tmp_path / "recon_mpi.preview.h5", 0, job, views=min(c + 25, scan.n_views))
            _wait_preview(tmp_path / "recon_mpi.preview.h5", seen + 12, job)
        w.mark_complete()
    finally:
        w.close()
    out, _ = job.communicate(timeout=180)
    assert job.returncode == 0, out
    res = read_result(result)
    assert res.attrs["processes"] == 2
    ref = reconstruct(read_scan(path), ReconParams(iterations=10, threads=1, precision="double",
                                                   init_from=str(tmp_path / "recon_mpi.live_state.h5")), **QUIET)
    assert np.linalg.norm(res.object - ref.object) / np.linalg.norm(ref.object) <= 1e-6
    np.testing.assert_allclose(res.error_data, ref.error_data, rtol=1e-6)
    assert np.array_equal(res.positions_px, ref.positions_px)


def test_a_stop_request_finishes_with_the_views_so_far(sim1, tmp_path):
    scan, _ = sim1
    path = tmp_path / "scan_stop.h5"
    feed(path, scan, 60, 0.0, complete=False)
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    res, info = follow_distributed(str(path), ReconParams(iterations=5, threads=1), LocalComm(), stop=stop,
                                   options=FollowOptions(stall_s=60))
    assert info["live"]["views"] == 120 and res.positions_px.shape == (120, 2)     # written, never completed
    assert res.attrs["interrupted"] is True


def test_a_live_job_killed_mid_scan_leaves_the_file_to_the_post_stop_job(sim1, tmp_path):
    """Real processes: SIGKILL the following job mid-scan; the scan still completes, no result is
    left half-written, and the offline job on the complete file (the post-stop path) succeeds.
    (The callback's side of this fault — exactly one derived run — is not built yet: docs/live.md.)"""
    scan, _ = sim1
    path, result = tmp_path / "scan_kill.h5", tmp_path / "recon_kill.h5"
    spec = JobSpec(params=ReconParams(iterations=6, threads=1), execution=Execution(ranks=1),
                   source=Source(scan_file=str(path), result_file=str(result)))
    spec_path = spec.write(tmp_path / "kill.spec.json")
    job = subprocess.Popen(job_argv(spec_path, quiet=True, follow=True), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    w = GrowingScanWriter(path, header_of(scan), extent_um=extent(scan))
    w.append(scan.diffamp[:60], scan.points[:, :60])
    preview = tmp_path / "recon_kill.preview.h5"
    deadline = time.time() + 60
    while not preview.exists() and time.time() < deadline:      # the job is iterating on the first views
        time.sleep(0.1)
    assert preview.exists()
    job.kill()
    job.wait(timeout=30)
    w.append(scan.diffamp[60:], scan.points[:, 60:])
    w.mark_complete()
    assert not result.exists() and not list(tmp_path.glob(".recon_kill.h5.*"))
    done = subprocess.run([sys.executable, "-m", "hxn_ptycho.job", str(spec_path), "--quiet"], timeout=180,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert read_result(result).positions_px.shape == (120, 2)


def test_following_an_ordinary_scan_file_is_refused_by_name(sim_file):
    """A finished scan file (no n_written/complete) is not a growing one: refused, naming the field."""
    with pytest.raises(BadInput, match="missing field 'n_written'"):
        follow_distributed(str(sim_file), ReconParams(iterations=2, threads=1), LocalComm(),
                           options=FollowOptions(appear_s=0.3))


def test_follow_refuses_the_async_scheme(tmp_path):
    spec = JobSpec(execution=Execution(mode="async"),
                   source=Source(scan_file=str(tmp_path / "s.h5"), result_file=str(tmp_path / "r.h5")))
    status, outcome = run_spec(spec, None, progress=False, follow=True)
    assert status == 2 and "cannot follow a growing scan file" in outcome["reason"]


def test_the_final_preview_is_written_at_once_not_after_the_interval(tmp_path):
    """A live preview waits for the interval since the last one; the finished result's preview does
    not (it replaces a live one still waiting), so the job's end is not held up by the interval."""
    from hxn_ptycho.live import PreviewWriter
    from hxn_ptycho.session import Snapshot

    def snap(views, it):
        return Snapshot(object=np.ones((1, 8, 8), np.complex64), probe=np.ones((1, 4, 4), np.complex64),
                        views=views, iteration=it, data_error=0.1, positions_px=np.zeros((views, 2)),
                        newest_view=views - 1)
    w = PreviewWriter(tmp_path / "p.preview.h5", interval_s=600.0)
    w.submit(snap(3, 1), 1.0)                         # the first: written at once
    t0 = time.monotonic()
    while not w.log and time.monotonic() - t0 < 60:
        time.sleep(0.01)
    assert len(w.log) == 1
    w.submit(snap(5, 2), 2.0)                         # a live one: held for the interval (600 s)
    w.submit(snap(6, 3), 3.0, final=True)             # the final: now
    w.close()                                         # (joins for at most 30 s)
    assert not w._thread.is_alive()
    assert w.final is not None and w.final["views"] == 6 and len(w.log) == 1
    prev = read_preview(tmp_path / "p.preview.h5")
    assert prev["final"] == 1 and prev["views"] == 6


def test_the_stop_writes_only_what_swmr_allows_and_the_final_attributes_read_back(sim1, tmp_path):
    """At the stop a growing file writes the whole scan's values of the attributes declared final
    (where the frames are, which were dropped) into their datasets — data writes, which SWMR allows
    while a reader has the file open — and creates or changes no attribute; readers see them as
    attributes once written (GrowingScanReader.header, read_scan)."""
    import h5py
    scan, _ = sim1
    path = tmp_path / "scan_g.h5"
    header = header_of(scan)
    header.attrs.update({"frame_source": '["first chunk"]', "dropped_frames": "[]", "detector": "merlin1"})
    w = GrowingScanWriter(path, header, decisions={"crop": 64}, final_attrs=("frame_source", "dropped_frames"))
    w.append(scan.diffamp[:30], scan.points[:, :30])
    r = GrowingScanReader(path)                          # a SWMR reader, open across the stop
    assert r.refresh() == (30, False)
    assert "frame_source" not in r.header().attrs and r.header().attrs["detector"] == "merlin1"
    before = {k: r.f.attrs[k] for k in r.f.attrs}
    assert "frame_source" not in before and "dropped_frames" not in before
    with pytest.raises(BadInput, match="was not declared final"):
        w.mark_complete({"detector": "eiger2"})
    with pytest.raises(BadInput, match="'dropped_frames' must be text"):     # nothing of it written
        w.mark_complete({"frame_source": '["x"]', "dropped_frames": [3, 7]})
    assert r.f["final_attrs/frame_source"].shape == (0,) and r.refresh() == (30, False)
    w.append(scan.diffamp[30:], scan.points[:, 30:])
    w.mark_complete({"frame_source": '["the whole run"]', "dropped_frames": "[3, 7]"})
    assert r.refresh() == (120, True)
    seen = r.header().attrs
    assert seen["frame_source"] == '["the whole run"]' and seen["dropped_frames"] == "[3, 7]"
    r.close()
    with h5py.File(path, "r") as f:
        after = {k: f.attrs[k] for k in f.attrs}
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    back = read_scan(path)
    assert back.attrs["frame_source"] == '["the whole run"]' and back.attrs["dropped_frames"] == "[3, 7]"


def _wait_preview(path, iteration, job, views=0, timeout=300.0):
    """Until the live job's preview shows ``iteration`` live iterations on at least ``views`` views (the
    job still running); returns its iteration."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert job.poll() is None, job.communicate()[0]
        try:
            prev = read_preview(path) if path.exists() else None
        except (OSError, KeyError):
            prev = None                       # being replaced
        if prev is not None and prev["iteration"] >= iteration and prev["views"] >= views:
            return int(prev["iteration"])
        time.sleep(0.05)
    raise TimeoutError(f"no preview with {iteration} iterations on {views} views within {timeout} s")


@pytest.mark.slow
@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}")
@pytest.mark.parametrize("regime", ["fell-behind", "kept-up"])
@pytest.mark.parametrize("modes,ranks", [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_the_live_job_is_as_good_as_a_cold_offline_run(sim1, sim3, tmp_path, modes, ranks, regime):
    """Real processes (``--follow``, ``ranks`` MPI ranks), the default schedule (100 iterations), against
    a cold offline run: data error ≤ 1.02×, object NRMSE to the simulated truth ≤ 1.05×.
    fell-behind: the job iterates on the first 30 views, then the other views arrive at once with the
    stop (views faster than it iterates): the final phase is the cold offline run. kept-up: half the
    views, ≥ 100 live iterations, the other half, ≥ 100 more before the stop (the mean view in ≥ 100):
    the final phase is the schedule's last 10 % from the live state. The result is bit-identical to the
    offline job of the complete file with the same ranks (cold, or from the saved live state)."""
    from hxn_ptycho.metrics import illuminated_region, nrmse
    scan, truth = sim1 if modes == 1 else sim3
    params = ReconParams(probe_modes=modes, threads=1)
    path, result = tmp_path / "scan.h5", tmp_path / "recon.h5"
    spec = JobSpec(params=params, execution=Execution(ranks=ranks),
                   source=Source(scan_file=str(path), result_file=str(result)))
    spec_path = spec.write(tmp_path / "live.spec.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "HYDRA_", "MPI_"))}
    job = subprocess.Popen(job_argv(spec_path, nprocs=ranks, quiet=True, follow=True), env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    preview = tmp_path / "recon.preview.h5"
    w = GrowingScanWriter(path, header_of(scan), extent_um=extent(scan))
    try:
        half = 30 if regime == "fell-behind" else scan.n_views // 2
        w.append(scan.diffamp[:half], scan.points[:, :half])
        _wait_preview(preview, 1 if regime == "fell-behind" else 100, job)
        w.append(scan.diffamp[half:], scan.points[:, half:])
        if regime == "kept-up":                # the second half in >= 100 live iterations too
            _wait_preview(preview, _wait_preview(preview, 0, job, views=scan.n_views) + 100, job)
        w.mark_complete()
        out, _ = job.communicate(timeout=600)
    finally:
        w.close()
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out
    res = read_result(result)
    assert res.attrs["final_from_live_state"] is (regime == "kept-up"), res.attrs["live_iterations"]
    cold = reconstruct(scan, params, **QUIET)
    region = illuminated_region(truth.positions_px, truth.probe, truth.object.shape)
    d = float(res.attrs["final_data_error"]) / float(cold.attrs["final_data_error"])
    e = nrmse(res.object[0], truth.object, region) / nrmse(cold.object[0], truth.object, region)
    print(f"\nlive quality: {modes} mode(s), {ranks} rank(s), {regime}: {res.attrs['live_iterations']} live "
          f"iterations, resumed at {res.attrs.get('first_iteration', 0)}; data error {d:.3f}x, NRMSE {e:.3f}x cold")
    assert d <= 1.02 and e <= 1.05, (d, e)
    # the final result is the offline job of the complete file with the same ranks and threads, from the
    # saved live state (kept up) or cold (fell behind): bit-identical (several ranks: live._final_as_offline)
    state = tmp_path / "recon.live_state.h5"
    assert state.exists() is (regime == "kept-up")
    off_spec = JobSpec(params=ReconParams(probe_modes=modes, threads=1, init_from=str(state) if state.exists() else None),
                       execution=Execution(ranks=ranks),
                       source=Source(scan_file=str(path), result_file=str(tmp_path / "offline.h5")))
    off_path = off_spec.write(tmp_path / "offline.spec.json")
    done = subprocess.run(job_argv(off_path, nprocs=ranks, quiet=True), env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    off = read_result(tmp_path / "offline.h5")
    for name in ("object", "probe", "error_data", "positions_px"):
        assert np.array_equal(getattr(res, name), getattr(off, name)), name
