"""The callback subscribed in-process: documents → scan file → real job (mpiexec) → derived run in Tiled."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import conftest_bluesky
import numpy as np
import pytest

tiled_server = conftest_bluesky.tiled_server      # the fixture (a real Tiled server process)
from hxn_ptycho.callbacks.collector import RunCollector
from hxn_ptycho.callbacks.export import (
    ExportConfig,
    ExportError,
    beam_center,
    bragg_angle_deg,
    bragg_energy_kev,
    build_scan,
)
from hxn_ptycho.callbacks.launcher import Job, JobQueue, job_command, mpiexec_path
from hxn_ptycho.callbacks.router import (
    CallbackConfig,
    PtychoCallback,
    is_ptycho_run,
)
from hxn_ptycho.spec import Execution, Geometry, JobSpec, Source

PARAMS = {"iterations": 8, "probe_modes": 1}


@pytest.fixture(scope="module")
def sim():
    from hxn_ptycho.simulate import simulate_scan
    scan, _truth = simulate_scan(n=64, n_positions=60, seed=3, photons=1e6)
    return scan


def make_re(hxn):
    from bluesky import RunEngine
    from bluesky.preprocessors import SupplementalData
    RE = RunEngine({}, call_returns_result=False)
    RE.preprocessors.append(SupplementalData(baseline=hxn.baseline))
    return RE


# -- unit checks of the pieces ---------------------------------------------------------------

def test_bragg_energy_round_trip():
    assert bragg_energy_kev(bragg_angle_deg(12.0)) == pytest.approx(12.0, rel=1e-12)
    assert bragg_energy_kev(10.0) == pytest.approx(12.39842 / (2 * 3.1355893 * np.sin(np.radians(10.0))))
    with pytest.raises(ExportError, match="dcm_th"):
        bragg_energy_kev(0.0)


def test_beam_center_of_mean_frame():
    f = np.zeros((40, 50))
    f[17, 29] = 10.0
    f[16:19, 28:31] += 1.0
    assert beam_center(f, np.ones_like(f, bool)) == (17, 29)


def test_selection_ignores_analysis_runs_and_other_detectors():
    dets = ("merlin1", "eiger1")
    assert is_ptycho_run({"detectors": ["merlin1", "sclr1"]}, dets)
    assert not is_ptycho_run({"detectors": ["xspress3"]}, dets)
    assert not is_ptycho_run({"detectors": ["merlin1"], "plan_type": "analysis", "plan_name": "hxn_ptycho_dm"}, dets)


def _stream_run(tmp_path, sim, drop_y_at=None):
    """A run whose frames arrive by stream_resource/stream_datum (event-model compose_run)."""
    import h5py
    from event_model import compose_run
    from hxn_ptycho.callbacks.orientation import Orientation
    from hxn_ptycho.callbacks.sim_beamline import SimSample
    frames = SimSample(sim, detector="eiger1", orientation=Orientation("identity"), shape=(80, 80), flagged=())
    path = tmp_path / "eiger.h5"
    stack = np.stack([frames.frame(i) for i in range(frames.n_views)])
    with h5py.File(path, "w") as f:
        f["entry/data/data"] = stack
    b = compose_run(metadata={"detectors": ["eiger1"], "scan_id": 5, "detector_distance_m": sim.z_m,
                              "detector_pixel_um": 55.0, "energy_kev": 12.0, "ptycho_crop": 64,
                              "motors": ["zpssx", "zpssy"], "ptycho_orientation": "identity"})
    got = []
    col = RunCollector(b.start_doc, got.append)
    d = b.compose_descriptor(name="primary", data_keys={
        "eiger1_image": {"source": "sim", "dtype": "array", "shape": [80, 80], "external": "STREAM:"},
        "zpssx": {"source": "sim", "dtype": "number", "shape": []},
        "zpssy": {"source": "sim", "dtype": "number", "shape": []}},
        object_keys={"eiger1": ["eiger1_image"]})
    col("descriptor", d.descriptor_doc)
    sr = b.compose_stream_resource(mimetype="application/x-hdf5", uri=path.as_uri(), data_key="eiger1_image",
                                   parameters={"dataset": "/entry/data/data"})
    col("stream_resource", sr.stream_resource_doc)
    n = sim.points.shape[1]
    half = n // 2
    for lo, hi in ((0, half), (half, n)):
        col("stream_datum", sr.compose_stream_datum(indices={"start": lo, "stop": hi}, descriptor=d.descriptor_doc))
    ys = list(sim.points[1])
    if drop_y_at is not None:
        ys[drop_y_at] = None
    col("event_page", d.compose_event_page(data={"zpssx": list(sim.points[0]), "zpssy": ys},
                                            timestamps={"zpssx": [0.0] * n, "zpssy": [0.0] * n},
                                            seq_num=list(range(1, n + 1)), validate=False))
    col("stop", b.compose_stop(exit_status="success"))
    return got[0]


def test_stream_resource_frames_and_event_pages(tmp_path, sim):
    run = _stream_run(tmp_path, sim)
    scan = build_scan(run, ExportConfig())
    assert scan.diffamp.shape == sim.diffamp.shape
    np.testing.assert_allclose(scan.diffamp, sim.diffamp, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(scan.points, sim.points)
    assert scan.ccd_pixel_um == 55.0 and scan.attrs["detector"] == "eiger1"


def test_missing_position_is_named(tmp_path, sim):
    run = _stream_run(tmp_path, sim, drop_y_at=7)
    with pytest.raises(ExportError, match=r"position field 'zpssy' is missing in 1 event\(s\) \(first: event 8\)"):
        build_scan(run, ExportConfig())


def test_job_command_is_an_argument_list(tmp_path):
    from hxn_ptycho.params import ReconParams
    spec = JobSpec(params=ReconParams(iterations=3), geometry=Geometry(n_views=10),
                   execution=Execution(ranks=2), source=Source(scan_file="/d/scan 1.h5", result_file="/d/r.h5",
                                                               raw_uid="u; rm -rf /", catalog="http://127.0.0.1:1"))
    q = JobQueue(tmp_path / "q")
    job = q.submit(Job.of(spec))
    argv = job_command(job)
    assert argv[:3] == [mpiexec_path(), "-n", "2"]
    assert argv[3:7] == [sys.executable, "-m", "hxn_ptycho.job", job.spec_file]
    written = json.loads(Path(job.spec_file).read_text())        # the one spec file, with everything in it
    assert written["source"]["raw_uid"] == "u; rm -rf /" and written["params"]["iterations"] == 3
    assert written["source"]["scan_file"] == "/d/scan 1.h5"
    one = q.submit(Job.of(JobSpec(source=Source(scan_file="s", result_file="r"))))
    assert job_command(one)[0] == sys.executable


def test_per_event_cost_is_small(tmp_path, capsys):
    """Route 5000 events of a ptychography run through the callback; report the mean cost."""
    from event_model import compose_run
    cb = PtychoCallback(CallbackConfig(work_dir=str(tmp_path)), jobs=None)
    b = compose_run(metadata={"detectors": ["merlin1"], "scan_id": 1})
    cb("start", b.start_doc)
    d = b.compose_descriptor(name="primary", data_keys={
        k: {"source": "s", "dtype": "number", "shape": []} for k in ("zpssx", "zpssy", "sclr1_ch4", "merlin1_image")})
    cb("descriptor", d.descriptor_doc)
    events = [d.compose_event(data={"zpssx": float(i), "zpssy": 0.0, "sclr1_ch4": 1.0, "merlin1_image": f"r/{i}"},
                              timestamps={"zpssx": 0.0, "zpssy": 0.0, "sclr1_ch4": 0.0, "merlin1_image": 0.0})
              for i in range(5000)]
    t0 = time.perf_counter()
    for ev in events:
        cb("event", ev)
    per_event = (time.perf_counter() - t0) / len(events)
    t0 = time.perf_counter()
    cb("stop", b.compose_stop(exit_status="abort"))
    stop_cost = time.perf_counter() - t0
    cb.flush(10)
    cb.close()
    with capsys.disabled():
        print(f"\n[hxn-ptycho] callback cost per event: {per_event * 1e6:.1f} µs; at stop: {stop_cost * 1e3:.2f} ms")
    assert per_event < 200e-6
    assert stop_cost < 0.01


def test_malformed_documents_are_logged_not_raised(tmp_path, caplog):
    cb = PtychoCallback(CallbackConfig(work_dir=str(tmp_path)), jobs=None)
    with caplog.at_level(logging.WARNING):
        cb("event", {"descriptor": "nope", "data": {}})          # no run started
        cb("start", {"no": "uid"})                                # start without uid
        cb("bogus", {})                                           # unknown document name
    cb.close()
    assert "malformed" in caplog.text


# -- end to end, in process --------------------------------------------------------------------

def test_in_process_scan_to_derived_run(tiled_server, tmp_path, sim, monkeypatch):
    """RE.subscribe(callback) + TiledWriter: a step scan becomes a derived run via mpiexec -n 2."""
    from hxn_ptycho.callbacks.catalog import tiled_writer
    from hxn_ptycho.callbacks.query import results
    from hxn_ptycho.callbacks.sim_beamline import hxn_sample, make_hxn, step_scan

    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    data_dir = tiled_server.directory / "detector"
    hxn = make_hxn(data_dir)
    sample = hxn_sample(sim, "eiger1")
    RE = make_re(hxn)
    RE.subscribe(tiled_writer(tiled_server.uri, "raw", max_array_size=0))
    jobs = JobQueue(tiled_server.directory / "queue",
                    env={"TILED_API_KEY": tiled_server.api_key}).start()
    cfg = CallbackConfig(work_dir=str(tiled_server.directory / "work"), catalog=tiled_server.uri,
                         params=dict(PARAMS), nprocs=2, export=ExportConfig(crop=64))
    cb = PtychoCallback(cfg, jobs)
    RE.subscribe(cb)
    t0 = time.perf_counter()
    RE(step_scan(hxn, sample), scan_id=41)
    scan_time = time.perf_counter() - t0
    raw_uid = cb.submitted[-1].raw_uid if cb.flush(30) and cb.submitted else None
    assert raw_uid, f"no job submitted; failures: {cb.failed}"
    assert jobs.wait_idle(180), "the job did not finish"
    jobs.stop()
    cb.close()
    done = jobs.jobs("done")
    assert len(done) == 1, f"job failed: {[j.reason for j in jobs.jobs('failed')]}"
    res = results(tiled_server.uri, raw_uid=raw_uid)
    assert res.ok, res.reason
    assert res.scan_id == 41
    recon = res.start["recon"]
    assert recon["execution"]["ranks"] == 2 and recon["params"]["iterations"] == PARAMS["iterations"]
    assert recon["measured"]["ranks"] == 2 and recon["measured"]["iterations_done"] == PARAMS["iterations"]
    geo = recon["geometry"]
    assert geo["crop"] == 64 and geo["energy_kev"] > 0 and geo["lambda_nm"] == pytest.approx(1.239842 / geo["energy_kev"])
    assert "dcm_th" in geo["provenance"]["energy_kev"] and "pixel table" in geo["provenance"]["ccd_pixel_um"]
    assert JobSpec.from_dict(recon).to_dict() == {k: v for k, v in recon.items() if k != "measured"}
    assert res.object.ndim == 3 and np.iscomplexobj(res.object)
    assert res.probe.shape == (1, 64, 64)
    assert res.positions_px.shape == (60, 2)
    assert res.data_error.shape == (PARAMS["iterations"],)
    assert res.data_error[-1] < res.data_error[0]
    # the raw run is in the catalog too, next to it
    from hxn_ptycho.callbacks.catalog import runs
    raw = runs(tiled_server.uri, "raw")[raw_uid]
    assert raw.metadata["stop"]["exit_status"] == "success"
    assert results(tiled_server.uri, scan_id=41).uid == res.uid
    print(f"\n[hxn-ptycho] 60-point step scan in the RunEngine: {scan_time:.2f} s")


def test_unreachable_catalog_is_logged_and_other_runs_go_on(tmp_path, sim, caplog):
    """A broken run cannot be recorded (catalog down): a clear log line; the next run is still processed."""
    from dataclasses import replace

    from hxn_ptycho.callbacks.catalog import free_port
    from hxn_ptycho.callbacks.sim_beamline import hxn_sample, make_hxn, step_scan

    hxn = make_hxn(tmp_path / "det")
    sample = hxn_sample(replace(sim, diffamp=sim.diffamp[:10], points=sim.points[:, :10]), "eiger1")
    RE = make_re(hxn)
    dead = f"http://127.0.0.1:{free_port()}"
    cb = PtychoCallback(CallbackConfig(work_dir=str(tmp_path / "work"), catalog=dead,
                                       export=ExportConfig(crop=64)), jobs=None)
    RE.subscribe(cb)
    with caplog.at_level(logging.INFO, logger="hxn_ptycho"):
        RE(step_scan(hxn, sample, read_y=False))   # broken: no y
        RE(step_scan(hxn, sample))                 # fine
        assert cb.flush(30)
    cb.close()
    assert len(cb.failed) == 1 and "position field 'zpssy'" in cb.failed[0][1]
    assert "could not record the failure in the catalog" in caplog.text
    assert f"cannot reach the Tiled catalog at {dead}" in caplog.text
    assert len(list((tmp_path / "work" / "results").glob("result_*.h5.docs.jsonl"))) == 1   # kept for republish (one file per job)
    assert len(cb.submitted) == 1
    assert len(list((tmp_path / "work" / "scans").glob("scan_*.h5"))) == 1


def test_too_many_ranks_are_refused_before_any_job(tmp_path, sim):
    """The callback builds the job spec and checks it: 61 ranks for 60 views is a recorded failure."""
    run = _stream_run(tmp_path, sim)
    cb = PtychoCallback(CallbackConfig(work_dir=str(tmp_path / "work"), nprocs=61,
                                       params={"power_bound": 0.5}, mode="async"), jobs=None)
    assert cb.process(run) is None
    assert len(cb.failed) == 1 and "--nprocs 61 is more than the scan's 60 views" in cb.failed[0][1]
    ok = PtychoCallback(CallbackConfig(work_dir=str(tmp_path / "work2"), nprocs=2, params={"power_bound": 0.5},
                                       mode="async"), jobs=None)
    job = ok.process(_stream_run(tmp_path, sim))
    spec = job.job_spec
    assert spec.execution.mode == "async" and spec.params.power_bound == 0.5 and spec.geometry.n_views == 60
    assert spec.geometry.provenance["energy_kev"] == "start['energy_kev']"
    assert spec.geometry.provenance["ccd_pixel_um"] == "start['detector_pixel_um']"
    cb.close()
    ok.close()
    from hxn_ptycho.params import ParamError
    with pytest.raises(ParamError, match="beta must lie in"):
        CallbackConfig(params={"beta": 9})
