"""The catalog over SQLite (embedded default) and PostgreSQL (facility-like; CI sets
HXN_PTYCHO_TEST_POSTGRES via .ci/steps/20-postgres.sh): a raw scan written by TiledWriter is
re-run from the catalog with ``hxn-ptycho reconstruct --scan-id N --catalog ...`` (the real CLI,
job and derived run), then queried with ``hxn-ptycho results`` (``--scan-id``, ``--all``, ``--uid``)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hxn_ptycho.callbacks.catalog import EmbeddedServer

POSTGRES = os.environ.get("HXN_PTYCHO_TEST_POSTGRES")


# SQLite, the embedded default, is slow-marked here: its rerun by scan id and its queries run in the default suite
# through tests/test_entry_points.py (test_reconstruct_scan_id, test_reconstruct_file_with_catalog) and the profile's tests
@pytest.fixture(scope="module", params=[pytest.param("sqlite", marks=pytest.mark.slow), "postgresql"])
def server(request, tmp_path_factory):
    if request.param == "postgresql" and not POSTGRES:
        pytest.skip("HXN_PTYCHO_TEST_POSTGRES is not set (CI sets it in .ci/steps/20-postgres.sh)")
    directory = tmp_path_factory.mktemp(f"catalog_{request.param}")
    srv = EmbeddedServer(directory, database=POSTGRES if request.param == "postgresql" else None).start()
    yield srv
    srv.stop()


def test_reconstruct_stored_scan_and_query(server, tmp_path, monkeypatch):
    from bluesky import RunEngine
    from bluesky.preprocessors import SupplementalData
    from hxn_ptycho.callbacks.catalog import runs, tiled_writer
    from hxn_ptycho.callbacks.query import results
    from hxn_ptycho.callbacks.sim_beamline import hxn_sample, make_hxn, step_scan

    from hxn_ptycho.simulate import simulate_scan

    monkeypatch.setenv("TILED_API_KEY", server.api_key)
    scan, _ = simulate_scan(n=64, n_positions=40, seed=5)
    hxn = make_hxn(server.directory / "detector")
    RE = RunEngine({}, call_returns_result=False)
    RE.preprocessors.append(SupplementalData(baseline=hxn.baseline))
    RE.subscribe(tiled_writer(server.config, "raw", max_array_size=0))
    (uid,) = RE(step_scan(hxn, hxn_sample(scan, "eiger1"), md={"ptycho_crop": 64}), scan_id=321)
    assert runs(server.config, "raw")[321].metadata["start"]["uid"] == uid

    out = server.directory / "rerun" / "result_321.h5"
    png = tmp_path / "rerun.png"
    env = dict(os.environ)
    env.pop("TILED_API_KEY")                               # the key comes from the catalog folder's key file
    cmd = [sys.executable, "-m", "hxn_ptycho.cli", "reconstruct", "--scan-id", "321", "--catalog",
           str(server.directory), "--iterations", "4", "--nprocs", "2", "-o", str(out), "--png", str(png), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.exists() and png.stat().st_size > 1000
    res = results(server.config, scan_id=321)
    assert res.ok and res.raw_uid == uid
    assert res.start["recon"]["params"]["iterations"] == 4 and res.start["recon"]["execution"]["ranks"] == 2
    assert res.object.ndim == 3 and res.data_error.shape == (4,)

    q = subprocess.run([sys.executable, "-m", "hxn_ptycho.cli", "results", "--catalog", str(server.directory),
                        "--scan-id", "321"], env=env, capture_output=True, text=True, timeout=120,
                       check=False)
    assert q.returncode == 0, q.stderr
    assert "success" in q.stdout and uid in q.stdout

    listed = subprocess.run([sys.executable, "-m", "hxn_ptycho.cli", "results", "--catalog", str(server.directory),
                             "--scan-id", "321", "--all"], env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert listed.returncode == 0, listed.stderr
    (row,) = listed.stdout.strip().splitlines()[1:]
    assert row.startswith(res.uid) and "success" in row and "iterations=4" in row and "ranks=2" in row
    one = subprocess.run([sys.executable, "-m", "hxn_ptycho.cli", "results", "--catalog", str(server.directory),
                          "--uid", res.uid[:8]], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert one.returncode == 0 and res.uid in one.stdout, one.stderr

    missing = subprocess.run([sys.executable, "-m", "hxn_ptycho.cli", "results", "--catalog",
                              str(server.directory), "--scan-id", "999999"], env=env, capture_output=True,
                             text=True, timeout=120, check=False)
    assert missing.returncode == 1 and "no reconstruction of scan_id=999999" in missing.stderr


def test_derived_runs_published_side_by_side_all_land(server, monkeypatch):
    """A derived run's arrays all live in the job's one file; Tiled inserts a file's asset row when it
    first sees it, so two of its arrays registered at once both insert it and PostgreSQL refuses one
    (a 500 on ``/register``, seen in CI). The publisher registers a file's first array alone: here
    five derived runs, each sent with 8 requests side by side, all land whole."""
    from conftest_bluesky import make_result
    from hxn_ptycho.callbacks import derived
    from hxn_ptycho.callbacks.catalog import runs

    monkeypatch.setenv("TILED_API_KEY", server.api_key)
    monkeypatch.setattr(derived, "PUBLISH_WORKERS", 8)
    folder = str(server.directory)
    for i in range(5):
        result = server.directory / "side" / f"r{i}.h5"
        res = make_result(result, iterations=3)
        uid = derived.write_documents(folder, derived.result_documents(result, f"raw-side-{i}", {}))
        run = runs(folder, "processed")[uid]
        np.testing.assert_array_equal(run["iterations"]["object_error"].read(), res.error_object)
