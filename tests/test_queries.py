"""Queries against a real Tiled server: a derived run the server cannot read (its file deleted, or
outside the folders it may read) is skipped with a one-line cause, quickly, and the next newest
readable one is taken; ``--all`` lists a scan's reconstructions, ``--uid`` picks one, duplicate raw
scan ids warn; databroker's ``db(plan_name="hxn_ptycho_dm")`` finds derived runs; a server error
is one line with the cause from the server's log."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import conftest_bluesky
import pytest
from conftest_bluesky import make_result
from hxn_ptycho.callbacks import derived
from hxn_ptycho.callbacks.catalog import CatalogError, broker, client_error, runs

from hxn_ptycho import callbacks as hxn_callbacks

tiled_server = conftest_bluesky.tiled_server      # the fixture (a real Tiled server process)

SCAN = 5


def _raw_run(catalog, scan_id: int) -> str:
    """A minimal raw run (start + stop) written by TiledWriter, as the RunEngine's would be."""
    from bluesky_tiled_plugins import TiledWriter
    from event_model import compose_run

    bundle = compose_run(metadata={"scan_id": scan_id, "plan_name": "list_scan"})
    writer = TiledWriter(runs(catalog, "raw"))
    writer("start", bundle.start_doc)
    writer("stop", bundle.compose_stop(exit_status="success"))
    return bundle.start_doc["uid"]


@pytest.fixture(scope="module")
def published(tiled_server, tmp_path_factory):
    """Raw scans 1 and 2 both with scan_id 5; derived runs, oldest first: readable (of raw 1),
    outside the server's folders (raw 1), file deleted (raw 2)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TILED_API_KEY", tiled_server.api_key)          # undone after this module
    folder = str(tiled_server.directory)
    raw1, raw2 = _raw_run(folder, SCAN), _raw_run(folder, SCAN)
    inside = tiled_server.directory / "results"
    outside = tmp_path_factory.mktemp("not_served")
    make_result(inside / "good.h5", iterations=6, scan_id=SCAN)
    good = derived.publish_result(folder, str(inside / "good.h5"), raw1, {"params": {"iterations": 6}, "ranks": 2})
    # the server refuses to register an asset outside its folders (callbacks/tiled_guard.py), so the
    # run that cannot be read is one whose file was moved out after it was published, leaving a link
    make_result(inside / "far.h5", scan_id=SCAN)
    far = derived.publish_result(folder, str(inside / "far.h5"), raw1, {"params": {"iterations": 5}})
    side = str(inside / "far.h5") + derived.SIDE_SUFFIX
    moved = outside / os.path.basename(side)
    os.replace(side, moved)
    os.symlink(moved, side)
    make_result(inside / "gone.h5", scan_id=SCAN)
    gone = derived.publish_result(folder, str(inside / "gone.h5"), raw2, {"params": {"iterations": 5}})
    os.unlink(str(inside / "gone.h5") + derived.SIDE_SUFFIX)
    yield {"folder": folder, "raw": (raw1, raw2), "good": good, "far": far, "gone": gone, "outside": str(outside)}
    mp.undo()


def _cli(*args: str, catalog: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hxn_ptycho.cli", "results", "--catalog", catalog, *args],
                          capture_output=True, text=True, timeout=120, check=False, env=dict(os.environ))


def test_results_skips_unreadable_runs_quickly(published):
    t0 = time.monotonic()
    res = hxn_callbacks.results(published["folder"], scan_id=SCAN)
    elapsed = time.monotonic() - t0
    assert res.ok and res.uid == published["good"]
    assert res.data_error.shape == (6,)
    skipped = dict(res.skipped)
    assert list(skipped) == [published["gone"], published["far"]]          # newest first
    assert "does not exist" in skipped[published["gone"]]
    assert f"--read {published['outside']}" in skipped[published["far"]]
    assert any("newest readable" in n for n in res.notes)
    # the client's own retries of a 500 take ≥ 24 s per run (measured: 24.2 s), so ≥ 48 s for these
    # two; one probe each does not (measured 3.7 s on an idle 2-core machine, 11.6 s on a loaded one)
    assert elapsed < 30, f"{elapsed:.1f} s"


def test_results_cli_one_line_per_problem(published):
    proc = _cli("--scan-id", str(SCAN), catalog=published["folder"])
    assert proc.returncode == 0, proc.stderr
    assert published["good"] in proc.stdout and "success" in proc.stdout
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and "Retrying" not in proc.stderr
    assert all(line.startswith("hxn-ptycho results: warning: ") for line in err), err
    assert any(published["far"] in line and "outside the folders it may read" in line for line in err)
    assert any(published["gone"] in line and "does not exist" in line for line in err)
    # the duplicate raw scan id is named
    dup = [line for line in err if "names 2 raw scans" in line]
    assert dup and all(u in dup[0] for u in published["raw"])


def test_results_all_lists_reconstructions(published):
    proc = _cli("--scan-id", str(SCAN), "--all", catalog=published["folder"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["uid", "time", "status", "data"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == [published["gone"], published["far"], published["good"]]
    assert "success" in rows[published["good"]] and "iterations=6" in rows[published["good"]]
    assert "ranks=2" in rows[published["good"]]
    assert "unreadable" in rows[published["far"]] and "unreadable" in rows[published["gone"]]
    assert "0.1" in rows[published["good"]]                               # the final data error
    as_json = _cli("--scan-id", str(SCAN), "--all", "--json", catalog=published["folder"])
    table = json.loads(as_json.stdout[as_json.stdout.index("["):])
    assert [r["uid"] for r in table] == list(rows) and table[2]["parameters"]["iterations"] == 6
    listed = hxn_callbacks.results(published["folder"], scan_id=SCAN, all=True)
    assert [r.uid for r in listed] == list(rows)
    assert listed[2].final_data_error == pytest.approx(0.1) and listed[2].unreadable is None


def test_uid_picks_one_derived_run(published):
    res = hxn_callbacks.results(published["folder"], uid=published["good"][:8])
    assert res.uid == published["good"] and res.ok
    proc = _cli("--uid", published["far"], catalog=published["folder"])
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"hxn-ptycho results: derived run {published['far']}") and "--read" in line
    missing = _cli("--uid", "ffffffff", catalog=published["folder"])
    assert missing.returncode == 1 and "no derived run ffffffff" in missing.stderr


def test_broker_finds_derived_runs(published, caplog):
    db = broker(published["folder"])
    found = [h.start["uid"] for h in db(plan_name="hxn_ptycho_dm")]
    assert sorted(found) == sorted([published["good"], published["far"], published["gone"]])
    both = [h.start["uid"] for h in db(scan_id=SCAN)]
    assert set(published["raw"]) <= set(both) and published["good"] in both
    times = [h.start["time"] for h in db(scan_id=SCAN)]
    assert times == sorted(times)
    assert db[published["good"]].stop["exit_status"] == "success"          # a derived uid
    with caplog.at_level("WARNING", logger="hxn_ptycho.callbacks.catalog"):
        assert db[SCAN].start["uid"] == published["raw"][1]                 # the newest raw scan
    assert "names 2 raw runs" in caplog.text and published["raw"][0] in caplog.text


def test_server_error_is_one_line_with_its_cause(published):
    """A 500 (here: a file outside the readable folders, read without retries) becomes one line that
    names the request and quotes the exception the server logged for it."""
    from tiled.client.utils import handle_error

    run = runs(published["folder"], "processed")[published["far"]]
    arr = run.v3["primary"]["object"]
    resp = arr.context.http_client.get(arr.item["links"]["full"], headers={"Connection": "close"})
    with pytest.raises(Exception) as info:
        handle_error(resp)
    err = client_error(info.value, published["folder"], "reading the object")
    assert isinstance(err, CatalogError)
    text = str(err)
    assert "\n" not in text and "500 Internal Server Error" in text
    assert "refusing the asset" in text and "outside the readable storage" in text and "far.h5" in text
    # without the server's log at hand (a URL), the correlation ID to look for
    assert "correlation ID" in str(client_error(info.value, run.uri))


def test_broker_leaves_other_clients_v3(published):
    """Using db[...] must not turn the runs other code reads from the catalog into v2 runs."""
    db = broker(published["folder"])
    assert db[published["good"]].start["uid"] == published["good"]
    list(db(plan_name="hxn_ptycho_dm"))
    run = runs(published["folder"], "processed")[published["good"]]
    assert type(run).__name__ == "BlueskyRunV3"
    assert run["primary"]["probe"].read().shape[0] == 1


def test_unreachable_catalog_is_one_line(tmp_path):
    from hxn_ptycho.callbacks.catalog import free_port

    t0 = time.monotonic()
    proc = _cli("--scan-id", "1", catalog=f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 2 and time.monotonic() - t0 < 30
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("hxn-ptycho results: error: cannot reach the Tiled catalog at http://127.0.0.1:")
    bad = _cli("--scan-id", "1", "--uid", "abcdef", catalog="http://127.0.0.1:1")
    assert bad.returncode == 2 and "give one of --scan-id N, --raw-uid UID or --uid" in bad.stderr
