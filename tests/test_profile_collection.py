"""profile_collection/startup: the numbered files, executed in order in one namespace (as IPython
does with ``ipython --profile-dir profile_collection``), run a simulated scan that is reconstructed
and lands in the catalog; ``wait_for_reconstruction()`` returns it; databroker's v1
``db[-1]``/``db[scan_id]``/``db(...)`` work on it (derived runs too). As real sessions (separate
processes): ``scan_id`` continues across sessions, and leaving a session waits for its job or
leaves it queued for the next one."""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
from pathlib import Path

import conftest_bluesky
import numpy as np
import pytest

tiled_server = conftest_bluesky.tiled_server      # the fixture (a real Tiled server process)

STARTUP = Path(__file__).resolve().parents[1] / "profile_collection" / "startup"


def run_startup(namespace: dict) -> list[str]:
    files = sorted(STARTUP.glob("[0-9][0-9]-*.py"))
    for path in files:
        exec(compile(path.read_text(), str(path), "exec"), namespace)  # noqa: S102 - IPython runs startup files the same way
    return [p.name for p in files]


@pytest.fixture
def profile_env(tiled_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    monkeypatch.setenv("HXN_PTYCHO_CATALOG", str(tiled_server.directory))
    monkeypatch.setenv("HXN_PTYCHO_PROFILE_DIR", str(tiled_server.directory / "profile"))
    work = tiled_server.directory / "profile" / f"work_{tmp_path.name}"     # where the server may read
    monkeypatch.setenv("HXN_PTYCHO_WORK", str(work))
    monkeypatch.setenv("HXN_PTYCHO_MD_DIR", str(tmp_path / "md"))
    monkeypatch.setenv("HXN_PTYCHO_SIM_POINTS", "40")
    monkeypatch.setenv("HXN_PTYCHO_ITERATIONS", "5")
    monkeypatch.setenv("HXN_PTYCHO_NPROCS", "2")
    return work


def test_profile_startup_files_in_order(profile_env, tiled_server, monkeypatch):
    monkeypatch.delenv("HXN_PTYCHO_WORK")      # the default: beside the catalog folder, which its server reads
    ns: dict = {"__name__": "__main__"}
    names = run_startup(ns)
    assert names == ["00-base.py", "10-devices.py", "90-ptycho.py"]
    assert ns["WORK_DIR"] == str(tiled_server.directory / "ptycho_work")
    RE, cb, jobs = ns["RE"], ns["ptycho_callback"], ns["ptycho_jobs"]
    try:
        (uid,) = RE(ns["ptycho_scan"](), scan_id=777)
        res = ns["wait_for_reconstruction"](timeout=180)     # no flush / wait_idle needed first
        assert res.ok, res.reason
        from hxn_ptycho.callbacks.query import key_parameters
        assert res.raw_uid == uid and res.scan_id == 777 and key_parameters(res.recon)["ranks"] == 2
        assert res.probe.shape == (1, 64, 64)
        with pytest.raises(LookupError, match="not reconstructed"):
            (other,) = RE(_empty_run())
            ns["wait_for_reconstruction"](other, timeout=5)
        # databroker v1 over the same catalog
        db = ns["db"]
        h = db[-1]
        assert h.start["uid"] == other
        assert db[777].start["uid"] == uid and db[777].stop["exit_status"] == "success"
        found = list(db(plan_name="spiral_fermat", scan_id=777))   # the simulated step scan is a fermat spiral
        assert [hh.start["uid"] for hh in found] == [uid]
        derived = list(db(plan_name="hxn_ptycho_dm", raw_uid=uid))           # the README's query
        assert [hh.start["uid"] for hh in derived] == [res.uid]
        table = db[777].table()
        assert len(table) == 40 and "zpssx" in table
        np.testing.assert_allclose(table["zpssx"].to_numpy(), ns["sim_scan"].points[0])
    finally:
        atexit.unregister(ns["_leave_session"])
        jobs.stop()
        cb.close()


@pytest.mark.slow
def test_profile_reconstructs_a_step_scan_while_it_runs_with_a_live_figure(profile_env, tiled_server, monkeypatch):
    """HXN_PTYCHO_LIVE=1: the live feed and the live figure (a PNG with the Agg backend) are subscribed;
    the scan's one derived run is the live job's, with its live figures; the PNG was drawn during the scan."""
    for k, v in {"HXN_PTYCHO_LIVE": "1", "HXN_PTYCHO_SIM_POINTS": "60", "HXN_PTYCHO_SIM_DWELL": "0.08",
                 "HXN_PTYCHO_LIVE_FIRST": "20", "HXN_PTYCHO_LIVE_CHUNK": "10", "HXN_PTYCHO_NPROCS": "1"}.items():
        monkeypatch.setenv(k, v)
    import matplotlib
    matplotlib.use("Agg")
    ns: dict = {"__name__": "__main__"}
    run_startup(ns)
    RE, cb, jobs, feed, fig = (ns[k] for k in ("RE", "ptycho_callback", "ptycho_jobs", "ptycho_live",
                                                "ptycho_live_figure"))
    try:
        (uid,) = RE(ns["ptycho_scan"]())
        res = ns["wait_for_reconstruction"](timeout=240)
        assert res.ok, res.reason
        assert uid in feed.took and not cb.submitted            # the live job is the result: no post-stop job
        live = res.recon["measured"]["live"]
        assert live["views"] == 60 and live["previews"] >= 1
        assert fig.shown >= 1 and Path(ns["WORK_DIR"], "live.png").exists()
        assert fig.seconds < 0.5                                # the RunEngine's share of the figure
    finally:
        atexit.unregister(ns["_leave_session"])
        fig.close()
        jobs.stop()
        cb.close()


def _empty_run():
    import bluesky.plan_stubs as bps
    yield from bps.open_run()
    yield from bps.close_run()


SESSION = """
import sys
from pathlib import Path
ns = {"__name__": "__main__"}
for path in sorted(Path(sys.argv[1]).glob("[0-9][0-9]-*.py")):
    exec(compile(path.read_text(), str(path), "exec"), ns)
exec(sys.argv[2], ns)
"""


def _session(code: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """One profile session in its own process, as ``ipython --profile-dir profile_collection -c CODE``."""
    proc = subprocess.run([sys.executable, "-c", SESSION, str(STARTUP), code], capture_output=True, text=True,
                          timeout=timeout, check=False, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _uid(proc: subprocess.CompletedProcess) -> str:
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("UID ")]
    return line.split()[1]


def test_sessions_keep_scan_id_and_finish_their_jobs(profile_env, tiled_server):
    from hxn_ptycho.callbacks.query import results

    first = _session("(uid,) = RE(ptycho_scan()); print('UID', uid, RE.md['scan_id'], flush=True)")
    uid = _uid(first)
    scan_id = int(first.stdout.split(uid)[1].split()[0])
    # leaving the session waited for the job: the derived run is there once the process has ended
    assert "waiting for 1 reconstruction(s) before leaving" in first.stdout
    assert "every reconstruction of this session is finished" in first.stdout
    res = results(str(tiled_server.directory), raw_uid=uid)
    assert res.ok and res.scan_id == scan_id

    second = _session("import bluesky.plan_stubs as bps\n"
                      "def empty():\n    yield from bps.open_run()\n    yield from bps.close_run()\n"
                      "(uid,) = RE(empty()); print('UID', uid, db[uid].start['scan_id'], flush=True)")
    assert f"next scan_id {scan_id + 1}" in second.stdout
    assert int(second.stdout.split(_uid(second))[1].split()[0]) == scan_id + 1
    assert "waiting for" not in second.stdout                # nothing to wait for


@pytest.mark.slow   # the same hand-over as a user lives it runs by default: test_profile_terminal.py's Ctrl-C leaving test
def test_leaving_early_hands_the_job_to_the_next_session(profile_env, tiled_server):
    from hxn_ptycho.callbacks.query import NoResult, key_parameters, results

    queue = profile_env / "queue"
    env = {"HXN_PTYCHO_EXIT_WAIT": "0.5", "HXN_PTYCHO_ITERATIONS": "150"}
    first = _session("(uid,) = RE(ptycho_scan()); print('UID', uid, flush=True)", env)
    uid = _uid(first)
    assert "at most 0.5 s" in first.stdout
    assert f"1 reconstruction job(s) not finished; they stay queued in {queue}" in first.stdout, first.stdout
    assert len(list((queue / "pending").glob("*.json"))) == 1 and not list((queue / "running").glob("*.json"))
    with pytest.raises(NoResult):
        results(str(tiled_server.directory), raw_uid=uid)
    # the next session's queue runs it; leaving that session waits for it
    second = _session("print('resumed', flush=True)", {"HXN_PTYCHO_ITERATIONS": "5"})
    assert "waiting for 1 reconstruction(s)" in second.stdout
    res = results(str(tiled_server.directory), raw_uid=uid)
    assert res.ok and key_parameters(res.recon)["iterations"] == 150
