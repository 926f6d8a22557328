"""profile_collection/startup: the numbered files, executed in order in one namespace (as IPython
does with ``ipython --profile-dir profile_collection``), run a simulated scan that is reconstructed
and lands in the catalog; databroker's v1 ``db[-1]``/``db[scan_id]``/``db(...)`` work on it."""
from __future__ import annotations

from pathlib import Path

import conftest_bluesky
import numpy as np

tiled_server = conftest_bluesky.tiled_server      # the fixture (a real Tiled server process)

STARTUP = Path(__file__).resolve().parents[1] / "profile_collection" / "startup"


def run_startup(namespace: dict) -> list[str]:
    files = sorted(STARTUP.glob("[0-9][0-9]-*.py"))
    for path in files:
        exec(compile(path.read_text(), str(path), "exec"), namespace)  # noqa: S102 - IPython runs startup files the same way
    return [p.name for p in files]


def test_profile_startup_files_in_order(tiled_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    monkeypatch.setenv("HXN_PTYCHO_CATALOG", str(tiled_server.directory))
    monkeypatch.setenv("HXN_PTYCHO_PROFILE_DIR", str(tiled_server.directory / "profile"))
    monkeypatch.setenv("HXN_PTYCHO_SIM_POINTS", "40")
    monkeypatch.setenv("HXN_PTYCHO_ITERATIONS", "5")
    monkeypatch.setenv("HXN_PTYCHO_NPROCS", "2")
    ns: dict = {"__name__": "__main__"}
    names = run_startup(ns)
    assert names == ["00-base.py", "10-devices.py", "90-ptycho.py"]
    RE, cb, jobs = ns["RE"], ns["ptycho_callback"], ns["ptycho_jobs"]
    try:
        (uid,) = RE(ns["ptycho_scan"](), scan_id=777)
        assert cb.flush(60) and cb.submitted, cb.failed
        assert jobs.wait_idle(180), "the job did not finish"
        res = ns["results"](ns["CATALOG"], raw_uid=uid)
        assert res.ok, res.reason
        assert res.scan_id == 777 and res.start["recon"]["execution"]["ranks"] == 2
        assert res.probe.shape == (1, 64, 64)
        # databroker v1 over the same catalog
        db = ns["db"]
        h = db[-1]
        assert h.start["uid"] == uid and h.stop["exit_status"] == "success"
        assert db[777].start["uid"] == uid
        found = list(db(plan_name="list_scan", scan_id=777))
        assert [hh.start["uid"] for hh in found] == [uid]
        table = h.table()
        assert len(table) == 40 and "zpssx" in table
        np.testing.assert_allclose(table["zpssx"].to_numpy(), ns["sim_scan"].points[0])
    finally:
        jobs.stop()
        cb.close()
