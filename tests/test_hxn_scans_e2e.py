"""The three HXN scan types end to end, with no beamline options: RunEngine + TiledWriter →
callback (in process, and ``hxn-ptycho listen`` over a real 0MQ proxy) → scan file → job →
``success`` derived run whose object matches the simulated truth; a lost detector file → ``fail``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import conftest_bluesky
import pytest
from conftest_bluesky import stop_zmq_stack, wait_for
from hxn_sim import make_re

from hxn_ptycho.engine import reconstruct
from hxn_ptycho.metrics import illuminated_region, nrmse
from hxn_ptycho.params import ReconParams

tiled_server = conftest_bluesky.tiled_server      # the fixture (a real Tiled server process)
KINDS = ["fly2dpd", "step", "FlyPlan2D"]
ITERATIONS = 40


def object_nrmse(obj, positions_px, probe, truth) -> float:
    region = illuminated_region(positions_px, probe, obj.shape[1:])
    return nrmse(obj[0], truth.object, region)


def check_result(res, sample, truth, capsys, how: str) -> None:
    assert res.ok, res.reason
    from hxn_ptycho.scanfile import read_scan
    recon = res.start["recon"]
    scan = read_scan(recon["source"]["scan_file"])       # the scan file the job reconstructed
    pixel = scan.pixel_size_m
    assert abs(pixel / sample.scan.pixel_size_m - 1) < 0.01, (pixel, sample.scan.pixel_size_m)
    assert recon["geometry"]["pixel_size_m"] == pytest.approx(pixel, rel=1e-6)
    assert "dcm_th" in recon["geometry"]["provenance"]["energy_kev"]          # the sources reach the run
    stage = sample.orient.in_stage_frame().name       # decided by the data, in the stage frame
    assert recon["geometry"]["orientation"] == stage
    geo = json.loads(scan.attrs["geometry_source"])
    assert geo["distance_m"][0] == pytest.approx(2.05)
    assert scan.attrs["orientation"] == stage and geo["orientation"].startswith("auto (")
    assert res.start["frame"]["rows"] == "+y" and res.start["frame"]["cols"] == "+x" and res.start["frame"]["stage_frame"]
    got = object_nrmse(res.object, res.positions_px, res.probe, truth)
    direct = reconstruct(sample.scan, ReconParams(iterations=ITERATIONS, probe_modes=1), log=lambda _m: None)
    ref = object_nrmse(direct.object, direct.positions_px, direct.probe, truth)
    with capsys.disabled():
        print(f"\n[hxn-ptycho] {how} {sample.detector}: derived-run object NRMSE {got:.4f} "
              f"(direct scan file {ref:.4f}); pixel {pixel * 1e9:.3f} nm (simulation "
              f"{sample.scan.pixel_size_m * 1e9:.3f} nm)")
    assert got <= 1.5 * ref and got < 0.1


@pytest.fixture(scope="module")
def scans():
    from hxn_ptycho.callbacks.sim_beamline import simulated_scan
    return {k: simulated_scan(k, n_positions=49, seed=4) for k in KINDS}


def test_in_process_three_scan_types_and_a_lost_file(tiled_server, scans, tmp_path, monkeypatch, capsys):
    from hxn_ptycho.callbacks.catalog import runs, tiled_writer
    from hxn_ptycho.callbacks.export import ExportConfig
    from hxn_ptycho.callbacks.launcher import JobQueue
    from hxn_ptycho.callbacks.query import results
    from hxn_ptycho.callbacks.router import (
        CallbackConfig,
        PtychoCallback,
    )
    from hxn_ptycho.callbacks.sim_beamline import make_hxn, plan_for

    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    hxn = make_hxn(tiled_server.directory / "det_inproc")
    RE = make_re(hxn)
    RE.subscribe(tiled_writer(tiled_server.uri, "raw", max_array_size=0))
    lost: list[str] = []

    def lose_file(name, doc):            # the detector file vanishes before the export reads it
        if name == "stop" and lost:
            os.remove(lost.pop())
    RE.subscribe(lose_file)
    work = tiled_server.directory / "e2e_inproc"         # results where the server may read them
    jobs = JobQueue(work / "queue", env={"TILED_API_KEY": tiled_server.api_key}).start()
    cb = PtychoCallback(CallbackConfig(work_dir=str(work / "work"), catalog=tiled_server.uri,
                                       params={"iterations": ITERATIONS, "probe_modes": 1}, nprocs=1,
                                       export=ExportConfig(crop=64, frame_wait_s=1.0)), jobs)
    RE.subscribe(cb)
    try:
        uids = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for i, kind in enumerate(KINDS):
                (uids[kind],) = RE(plan_for(kind, hxn, scans[kind][0]), scan_id=500 + i)
            sample = scans["step"][0]

            def remember_file(name, doc):
                if name == "resource" and doc.get("spec") == "TPX_HDF5":
                    lost.append(os.path.join(doc["root"], doc["resource_path"]))
            token = RE.subscribe(remember_file)
            (lost_uid,) = RE(plan_for("step", hxn, sample), scan_id=599)
            RE.unsubscribe(token)
        assert cb.flush(120)
        assert jobs.wait_idle(300), "the jobs did not finish"
        for kind in KINDS:
            check_result(results(tiled_server.uri, raw_uid=uids[kind]), *scans[kind], capsys, "in process")
        fail = results(tiled_server.uri, raw_uid=lost_uid)
        assert fail.exit_status == "fail"
        assert "does not exist" in fail.reason and "eiger1_" in fail.reason and ".h5" in fail.reason
        # the raw runs are readable back through the server (the arrays of these specs)
        raw = runs(tiled_server.uri, "raw")[uids["fly2dpd"]]["primary"]
        assert raw["eiger2_image"].read().shape == (1, 49, 96, 96)
        assert raw["inenc2_val"].read().shape == (1, 490)
    finally:
        jobs.stop()
        cb.close()


def test_three_scan_types_through_the_zmq_listener(tiled_server, scans, tmp_path, monkeypatch, capsys):
    from bluesky.callbacks.zmq import Publisher
    from hxn_ptycho.callbacks.catalog import free_port, tiled_writer
    from hxn_ptycho.callbacks.query import results
    from hxn_ptycho.callbacks.sim_beamline import make_hxn, plan_for
    from test_callbacks_listener import start_listener

    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    port_in, port_out = free_port(), free_port()
    exe = Path(sys.executable).with_name("bluesky-0MQ-proxy")
    proxy = subprocess.Popen([str(exe), str(port_in), str(port_out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    log_path = tmp_path / "listener.log"
    listener = start_listener(tiled_server, port_out, tiled_server.directory / "e2e_listen", log_path,
                              extra=("--iterations", str(ITERATIONS)))
    publisher = None
    try:
        hxn = make_hxn(tiled_server.directory / "det_listen")
        RE = make_re(hxn)
        RE.subscribe(tiled_writer(tiled_server.uri, "raw", max_array_size=0))
        publisher = Publisher(f"127.0.0.1:{port_in}")
        RE.subscribe(publisher)
        time.sleep(1.0)
        uids = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for i, kind in enumerate(KINDS):
                (uids[kind],) = RE(plan_for(kind, hxn, scans[kind][0]), scan_id=600 + i)

        def done():
            try:
                return all(results(tiled_server.uri, raw_uid=u).exit_status for u in uids.values())
            except Exception:  # noqa: BLE001 - not there yet
                return False
        wait_for(done, 300, interval=2.0, what="the three derived runs")
        for kind in KINDS:
            check_result(results(tiled_server.uri, raw_uid=uids[kind]), *scans[kind], capsys, "listen (0MQ)")
    finally:
        stop_zmq_stack(publisher, listener, proxy)
