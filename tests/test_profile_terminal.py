"""The IPython profile driven as a person drives it: ``ipython --profile-dir profile_collection`` in a
pseudo-terminal, lines typed one by one, left with ``exit``, Ctrl-D or Ctrl-C.

Against a catalog started exactly as the README says (``hxn-ptycho serve --dir ./catalog``, then
``HXN_PTYCHO_CATALOG=./catalog ipython --profile-dir profile_collection``) and against the profile's
own embedded catalog. Each asserts the result, no traceback, and how the session ends.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")
IPYTHON = Path(sys.executable).parent / "ipython"
if not IPYTHON.exists():
    pytest.skip("IPython is not installed in this environment (pip install -e '.[test]')", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profile_collection"
PROMPT = r"In \[(\d+)\]: "
BAD = re.compile(r"Traceback|NameError|Error:|403|Exception ignored")


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HXN_PTYCHO_", "TILED_API_KEY"))}
    env.update({"HOME": str(tmp / "home"), "HXN_PTYCHO_MD_DIR": str(tmp / "md"), "HXN_PTYCHO_SIM_POINTS": "40",
                "HXN_PTYCHO_ITERATIONS": "5", "IPYTHONDIR": str(tmp / "ipythondir"), "TERM": "dumb", **extra})
    (tmp / "home").mkdir(exist_ok=True)
    return env


def _terminal_signals() -> None:
    """The child starts with SIGINT as a terminal gives it (a test run in the background inherits
    SIG_IGN, and Python then installs no KeyboardInterrupt handler: Ctrl-C would be lost)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ipython(tmp: Path, env: dict[str, str]) -> pexpect.spawn:
    child = pexpect.spawn(str(IPYTHON), ["--profile-dir", str(PROFILE), "--no-banner", "--simple-prompt",
                                         "--HistoryManager.hist_file=:memory:",   # the profile folder stays as it is
                                         "--colors=NoColor"],
                          cwd=str(tmp), env=env, encoding="utf-8", timeout=240, dimensions=(40, 200),
                          preexec_fn=_terminal_signals)
    child.logfile_read = _Tee()
    return child


class _Tee:
    """Keeps what the terminal showed (for the assertions and for a failing test's report)."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def _shown(child: pexpect.spawn) -> str:
    return child.logfile_read.text


def _type(child: pexpect.spawn, line: str, timeout: float = 240) -> str:
    """Type one line at the prompt and return what it printed before the next prompt."""
    child.sendline(line)
    child.expect(PROMPT, timeout=timeout)
    return child.before


def _serve(tmp: Path) -> subprocess.Popen:
    """``hxn-ptycho serve --dir ./catalog``, as the README writes it, in the folder the user is in."""
    proc = subprocess.Popen([str(Path(sys.executable).parent / "hxn-ptycho"), "serve", "--dir", "./catalog"],
                            cwd=str(tmp), env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + 120
    while "Press Ctrl-C to stop." not in seen:
        line = proc.stdout.readline()
        if not line or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"serve did not start: {seen}")
        seen += line
    return proc


def _stop_serve(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)                 # Ctrl-C
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("serve did not stop on Ctrl-C") from None
    assert proc.returncode == 0


def test_profile_in_a_terminal_with_the_readmes_catalog(tmp_path):
    """README: ``hxn-ptycho serve --dir ./catalog``; ``HXN_PTYCHO_CATALOG=./catalog ipython --profile-dir
    profile_collection``; a scan; ``wait_for_reconstruction()``; ``exit`` — the result, the raw frames
    stored (no 403 from the raw writer), no traceback, and the session gone within a minute."""
    server = _serve(tmp_path)
    try:
        child = _ipython(tmp_path, _env(tmp_path, HXN_PTYCHO_CATALOG="./catalog"))
        child.expect(PROMPT)
        _type(child, "uid, = RE(ptycho_scan())")
        out = _type(child, "res = wait_for_reconstruction(timeout=200); print('RESULT', res.ok, res.scan_id, "
                           "res.raw_uid == uid, res.object.shape)")
        assert re.search(r"RESULT True \d+ True \(1, \d+, \d+\)", out), _shown(child)
        frames = _type(child, "print('FRAMES', db[-1].table(fill=True)['eiger1_image'].iloc[0].shape)")
        assert "FRAMES (" in frames, _shown(child)
        t0 = time.monotonic()
        child.sendline("exit")
        child.expect(pexpect.EOF, timeout=60)
        child.close()
        assert time.monotonic() - t0 < 60
        assert child.exitstatus == 0, _shown(child)
        assert not BAD.search(_shown(child)), _shown(child)
        assert (tmp_path / "catalog" / "ptycho_work" / "detector").is_dir()   # where the server reads
    finally:
        _stop_serve(server)


@pytest.mark.slow   # ~10 s each (pytest -m slow); the same session.check_* refusals run through listen in test_listen_options
def test_profile_refuses_at_start_a_folder_the_server_cannot_read(tmp_path):
    """A work folder the README's server cannot read: one line at start-up with the command that fixes
    it, exit status 2 — not a 403 in the middle of a scan."""
    server = _serve(tmp_path)
    try:
        elsewhere = tmp_path / "elsewhere"
        child = _ipython(tmp_path, _env(tmp_path, HXN_PTYCHO_CATALOG="./catalog", HXN_PTYCHO_WORK=str(elsewhere)))
        child.expect(pexpect.EOF, timeout=120)
        child.close()
        shown = _shown(child)
        assert child.exitstatus == 2, shown
        assert f"hxn-ptycho serve --dir {tmp_path / 'catalog'} --read {elsewhere}" in shown, shown
        assert "Traceback" not in shown and "In [1]" not in shown, shown
    finally:
        _stop_serve(server)


@pytest.mark.slow   # ~10 s each (pytest -m slow); the same session.check_* refusals run through listen in test_listen_options
def test_profile_refuses_too_many_ranks_and_a_catalog_not_started(tmp_path):
    (tmp_path / "catalog").mkdir()                   # `serve` not started yet: a folder with no catalog.json
    child = _ipython(tmp_path, _env(tmp_path, HXN_PTYCHO_CATALOG="./catalog"))
    child.expect(pexpect.EOF, timeout=120)
    child.close()
    assert child.exitstatus == 2 and "start it first with 'hxn-ptycho serve --dir ./catalog'" in _shown(child)
    assert "Traceback" not in _shown(child)
    child = _ipython(tmp_path, _env(tmp_path, HXN_PTYCHO_NPROCS="4096"))
    child.expect(pexpect.EOF, timeout=120)
    child.close()
    assert child.exitstatus == 2 and "--nprocs 4096 is more than" in _shown(child), _shown(child)
    assert "Traceback" not in _shown(child)


def test_leaving_counts_down_and_ctrl_c_leaves_the_job_queued(tmp_path):
    """Ctrl-D right after a scan whose job takes long: the session says what it waits for and counts
    down; Ctrl-C leaves the job queued (no hang, no traceback); the next session runs it."""
    env = _env(tmp_path, HXN_PTYCHO_ITERATIONS="100000", HXN_PTYCHO_EXIT_WAIT="600")
    child = _ipython(tmp_path, env)
    child.expect(PROMPT)
    _type(child, "uid, = RE(ptycho_scan()); print('SCAN', RE.md['scan_id'])")
    child.sendcontrol("d")                           # Ctrl-D (IPython may ask to confirm)
    i = child.expect([r"\(\[y\]/n\)\?", r"waiting for 1 reconstruction\(s\) before leaving"], timeout=60)
    if i == 0:
        child.sendline("y")
        child.expect(r"waiting for 1 reconstruction\(s\) before leaving", timeout=60)
    child.expect(r"scan \d+ (running|pending)")
    child.expect(r"\d+ s left", timeout=30)
    t0 = time.monotonic()
    child.sendintr()                                 # Ctrl-C
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    shown = _shown(child)
    assert time.monotonic() - t0 < 30, shown
    assert child.exitstatus == 0, shown
    assert "1 reconstruction job(s) not finished; they stay queued in" in shown, shown
    assert not BAD.search(shown), shown
    queue = tmp_path / "hxn_ptycho_profile" / "catalog" / "ptycho_work" / "queue"
    assert len(list((queue / "pending").glob("*.json"))) == 1, shown
    assert not list((queue / "running").glob("*.json"))
