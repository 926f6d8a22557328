"""The ``hxn-ptycho`` command as a user types it: simulate, reconstruct, summary figure, bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hxn_ptycho.metrics import illuminated_region, nrmse
from hxn_ptycho.resultfile import read_result
from hxn_ptycho.simulate import read_truth

EXE = [sys.executable, "-m", "hxn_ptycho.cli"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_simulate_then_reconstruct_with_summary(tmp_path):
    scan = tmp_path / "scan_7.h5"
    r = run("simulate", str(scan), "--size", "64", "--positions", "100", "--seed", "7")
    assert r.returncode == 0, r.stderr
    out, png = tmp_path / "r.h5", tmp_path / "r.png"
    r = run("reconstruct", str(scan), "-o", str(out), "--iterations", "60", "--png", str(png))
    assert r.returncode == 0, r.stderr
    assert "peak memory estimate" in r.stderr and "data error" in r.stderr      # estimate and progress bar
    res = read_result(out)
    truth = read_truth(scan)
    region = illuminated_region(truth.positions_px, truth.probe, truth.object.shape)
    assert nrmse(res.object[0], truth.object, region) < 0.1
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert res.params["iterations"] == 60 and res.attrs["scan_scan_id"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5", "r.png", "scan_7.h5"]   # no temporaries


def test_auto_modes_and_double_precision_from_the_command_line(tmp_path):
    scan = tmp_path / "s.h5"
    assert run("simulate", str(scan), "--size", "32", "--positions", "40", "--probe-modes", "2").returncode == 0
    r = run("reconstruct", str(scan), "-o", str(tmp_path / "r.h5"), "--iterations", "12", "--probe-modes", "auto",
            "--precision", "double", "--quiet")
    assert r.returncode == 0, r.stderr
    res = read_result(tmp_path / "r.h5")
    assert res.object.dtype == np.complex128 and res.params["probe_modes"] == "auto"


@pytest.mark.parametrize("args, words", [
    (["reconstruct", "missing.h5"], "scan file not found: missing.h5"),
    (["reconstruct", "notes.h5"], "not a readable HDF5 file"),
    (["reconstruct", "empty.h5"], "missing field 'diffamp'"),
    (["reconstruct", "--scan-id", "3"], "--scan-id needs --catalog"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, words):
    (tmp_path / "notes.h5").write_text("not hdf5")
    import h5py
    h5py.File(tmp_path / "empty.h5", "w").close()
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_gpu_backend_without_a_gpu_is_a_clear_error(tmp_path, sim_file):
    r = run("reconstruct", str(sim_file), "-o", str(tmp_path / "r.h5"), "--backend", "cupy", "--iterations", "2")
    if r.returncode == 0:
        pytest.skip("a GPU with CuPy is available here")
    assert r.returncode == 2 and "backend 'cupy'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r.h5").exists()


@pytest.mark.parametrize("args", [["--probe-modes", "0"], ["--iterations", "-3"], ["--beta", "7"]])
def test_bad_parameters_exit_2(tmp_path, sim_file, args):
    r = run("reconstruct", str(sim_file), "-o", str(tmp_path / "r.h5"), *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and args[0].lstrip("-").replace("-", "_").split("_")[0] in lines[0], r.stderr
    assert not (tmp_path / "r.h5").exists()


def test_every_verb_has_help():
    r = run("--help")
    assert r.returncode == 0
    verbs = ["simulate", "reconstruct"]
    for verb in verbs:
        h = run(verb, "--help")
        assert h.returncode == 0 and "usage" in h.stdout.lower(), verb
