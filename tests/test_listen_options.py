"""``hxn-ptycho listen`` checks its options before it accepts a scan (each refusal one line, status 2)
and stops on Ctrl-C with one line (status 130), no traceback."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import conftest_bluesky

tiled_server = conftest_bluesky.tiled_server      # the fixture (a real Tiled server process)
HXN = str(Path(sys.executable).parent / "hxn-ptycho")


def _listen(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([HXN, "listen", "--zmq", "127.0.0.1:1", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _one_line_refusal(done: subprocess.CompletedProcess, *words: str) -> None:
    err = done.stderr.strip()
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_listen_refuses_a_work_folder_it_cannot_write(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _one_line_refusal(_listen("--work-dir", str(blocker / "work")), "cannot write the work folder", str(blocker))


def test_listen_refuses_more_ranks_than_the_machine_runs(tmp_path):
    from hxn_ptycho.backend import available_cores
    too_many = 4 * available_cores() + 1
    _one_line_refusal(_listen("--work-dir", str(tmp_path / "w"), "--nprocs", str(too_many)),
                      f"--nprocs {too_many} is more than", "--force-nprocs")


def test_listen_refuses_an_unreachable_catalog(tmp_path):
    _one_line_refusal(_listen("--work-dir", str(tmp_path / "w"), "--catalog", "http://127.0.0.1:1"),
                      "cannot reach the Tiled catalog at http://127.0.0.1:1")


def test_listen_refuses_a_work_folder_the_catalog_cannot_read(tmp_path, tiled_server):
    done = _listen("--work-dir", str(tmp_path / "w"), "--catalog", str(tiled_server.directory),
                   env={"TILED_API_KEY": tiled_server.api_key})
    _one_line_refusal(done, f"hxn-ptycho serve --dir {tiled_server.directory} --read {tmp_path / 'w'}")


def test_listen_refuses_a_wrong_key(tmp_path, tiled_server):
    done = _listen("--work-dir", str(tiled_server.directory / "w_key"), "--catalog", str(tiled_server.directory),
                   env={"TILED_API_KEY": "not-the-key"})
    _one_line_refusal(done, "refuses")


def test_listen_refuses_a_held_out_count_for_scans_followed_as_they_run(tmp_path):
    """auto_rule=heldout counts the modes of the finished scan: with --live (or the detector streams) every
    scan would fail, so it is refused once, before any scan."""
    _one_line_refusal(_listen("--work-dir", str(tmp_path / "w"), "--live", "--probe-modes", "auto",
                              "--auto-rule", "heldout"), "--auto-rule heldout", "cannot follow scans as they run")


def test_listen_stops_on_ctrl_c_with_one_line(tmp_path):
    proc = subprocess.Popen([HXN, "listen", "--zmq", "127.0.0.1:1", "--work-dir", str(tmp_path / "w")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "w" / "queue").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Error" not in err, err
    assert [ln for ln in err.splitlines() if "Ctrl-C" in ln] == [
        f"hxn-ptycho listen: Ctrl-C: stopping; unfinished jobs stay queued in {(tmp_path / 'w' / 'queue').resolve()}"]
