"""An interrupted reconstruction (Ctrl-C in a terminal) is recorded as such: exit status 130 with one
rank and with two (no MPICH assertion messages), the result so far kept, the derived run's status
"interrupted" with the iterations done, and never the default result of its scan while a complete
one exists."""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import conftest_bluesky
import h5py
import pytest

pexpect = pytest.importorskip("pexpect")
tiled_server = conftest_bluesky.tiled_server      # the fixture (a real Tiled server process)
HXN = str(Path(sys.executable).parent / "hxn-ptycho")
NOISE = re.compile(r"Assertion|BAD TERMINATION|Traceback|YOUR APPLICATION TERMINATED")


def _scan(tmp_path: Path, scan_id: int) -> Path:
    from hxn_ptycho.simulate import simulate_scan, write_simulation
    scan, truth = simulate_scan(n=32, n_positions=40, seed=1)
    path = tmp_path / "scan.h5"
    write_simulation(path, scan, truth)
    with h5py.File(path, "a") as f:
        f.attrs["scan_id"] = scan_id
        f.attrs["raw_uid"] = f"raw-interrupted-{scan_id}"
    return path


@pytest.mark.parametrize("ranks", [1, 2])
def test_ctrl_c_in_a_terminal_is_recorded_as_interrupted(tmp_path, tiled_server, ranks):
    from hxn_ptycho.callbacks.query import results
    scan_id = 9100 + ranks
    scan = _scan(tmp_path, scan_id)
    out = tiled_server.directory / "results" / f"interrupted_{ranks}.h5"    # where the server reads
    child = pexpect.spawn(HXN, ["reconstruct", str(scan), "-o", str(out), "--iterations", "100000",
                                "--nprocs", str(ranks), "--catalog", str(tiled_server.directory)],
                          encoding="utf-8", timeout=180, env={**__import__("os").environ,
                                                              "TILED_API_KEY": tiled_server.api_key})
    shown: list[str] = []
    child.logfile_read = type("T", (), {"write": lambda self, s: shown.append(s), "flush": lambda self: None})()
    child.expect(r"data error", timeout=180)
    time.sleep(2)
    child.sendintr()                                  # Ctrl-C, once
    child.expect(pexpect.EOF, timeout=180)
    child.close()
    text = "".join(shown)
    assert child.exitstatus == 130, text[-3000:]
    assert not NOISE.search(text), text[-3000:]
    m = re.search(r"\((\d+) iterations, (\d) rank\(s\), interrupted\) -> ", text)
    assert m and int(m.group(2)) == ranks, text[-3000:]
    done = int(m.group(1))
    assert 0 < done < 100000 and out.exists()
    (row,) = results(str(tiled_server.directory), scan_id=scan_id, all=True)
    assert row.status == "interrupted" and row.parameters["iterations"] == f"{done}/100000"
    assert f"interrupted after {done} of 100000 iterations" in row.reason
    assert f"iterations={done}/100000" in row.line()
    res = results(str(tiled_server.directory), scan_id=scan_id)      # the only one: returned, marked
    assert res.interrupted and not res.ok and res.object is not None


def test_an_interrupted_run_is_never_the_default_when_a_complete_one_exists(tmp_path, tiled_server):
    """Published complete first, then an interrupted re-run (newer): the scan's default result is the
    complete one; the listing shows both, the interrupted one as such."""
    from hxn_ptycho.callbacks.derived import result_documents, write_documents
    from hxn_ptycho.callbacks.query import results
    scan_id, raw = 9200, "raw-default-9200"
    uids = {}
    for name, interrupted in (("complete", False), ("interrupted", True)):
        path = tiled_server.directory / "results" / f"default_{name}.h5"
        path.parent.mkdir(exist_ok=True)
        conftest_bluesky.make_result(path, iterations=5, scan_id=scan_id)
        recon = {"params": {"iterations": 2000 if interrupted else 5}, "source": {"scan_id": scan_id},
                 "measured": {"interrupted": interrupted, "iterations_done": 5}}
        uids[name] = write_documents(tiled_server.config, result_documents(path, raw, recon))
        time.sleep(0.05)
    res = results(tiled_server.config, scan_id=scan_id)
    assert res.uid == uids["complete"] and res.ok and not res.interrupted
    rows = {r.uid: r for r in results(tiled_server.config, scan_id=scan_id, all=True)}
    assert rows[uids["interrupted"]].status == "interrupted" and rows[uids["complete"]].status == "success"
    assert rows[uids["interrupted"]].parameters["iterations"] == "5/2000"
