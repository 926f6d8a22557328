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


# -- the job spec, the checks before mpiexec, the one error root ---------------------------------

def test_nprocs_beyond_the_views_or_the_cores_is_refused_before_mpiexec(tmp_path, sim_file):
    import time

    from hxn_ptycho.backend import available_cores
    t0 = time.monotonic()
    r = run("reconstruct", str(sim_file), "-o", str(tmp_path / "r.h5"), "--nprocs", "121", "--quiet")
    assert r.returncode == 2 and "--nprocs 121 is more than the scan's 120 views" in r.stderr, r.stderr
    many = 4 * available_cores() + 1
    if many <= 120:
        r = run("reconstruct", str(sim_file), "-o", str(tmp_path / "r.h5"), "--nprocs", str(many), "--quiet")
        assert r.returncode == 2 and "ranks per core" in r.stderr and "--force-nprocs" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 20                   # refused at once: no ranks were started
    assert not (tmp_path / "r.h5").exists() and "Traceback" not in r.stderr


def test_reconstruct_ends_with_one_line_and_the_spec_round_trips(tmp_path, sim_file):
    import json
    import re

    from hxn_ptycho.spec import JobSpec
    out = tmp_path / "r.h5"
    r = run("reconstruct", str(sim_file), "-o", str(out), "--iterations", "3", "--power-bound", "0.5", "--quiet")
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    m = re.match(r"final data error ([0-9.e+-]+), cost ([0-9.e+-]+), time ([0-9.]+) s \(3 iterations, 1 rank\(s\)\)", last)
    assert m, last
    res = read_result(out)
    assert float(m.group(1)) == pytest.approx(res.attrs["final_data_error"], rel=1e-3)
    assert res.params["power_bound"] == 0.5
    # the job started on a spec file: the same parameters, an outcome record beside the spec
    spec = JobSpec.from_dict({"params": {"iterations": 2, "power_bound": 0.5},
                              "source": {"scan_file": str(sim_file), "result_file": str(tmp_path / "s.h5")}})
    path = spec.write(tmp_path / "job.spec.json")
    assert JobSpec.read(path) == spec
    done = subprocess.run([sys.executable, "-m", "hxn_ptycho.job", str(path), "--quiet"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    outcome = json.loads((tmp_path / "job.outcome.json").read_text())
    assert outcome["status"] == "success" and outcome["result_file"] == str(tmp_path / "s.h5")
    assert outcome["measured"]["iterations_done"] == 2 and 0 < outcome["measured"]["startup_s"] < 60
    assert read_result(tmp_path / "s.h5").params["power_bound"] == 0.5


def test_bad_spec_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.spec.json"
    bad.write_text('{"params": {"beta": 9}}')
    done = subprocess.run([sys.executable, "-m", "hxn_ptycho.job", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "beta must lie in" in done.stderr and "Traceback" not in done.stderr
    bad.write_text('{"parameters": {}}')
    done = subprocess.run([sys.executable, "-m", "hxn_ptycho.job", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown top-level field(s): parameters" in done.stderr


def test_every_error_of_the_root_exits_with_its_status(monkeypatch, capsys):
    from hxn_ptycho import cli
    from hxn_ptycho.errors import HxnPtychoError

    class Odd(HxnPtychoError):
        exit_status = 7

    def boom(args):
        raise Odd("something named went wrong")
    parser = cli.build_parser()
    args = parser.parse_args(["simulate", "x.h5"])
    args.func = boom
    monkeypatch.setattr(cli, "build_parser", lambda: type("P", (), {"parse_args": lambda self, a: args})())
    assert cli.main([]) == 7
    assert capsys.readouterr().err.strip() == "hxn-ptycho simulate: error: something named went wrong"


def test_first_ctrl_c_asks_to_stop_the_second_interrupts():
    import os
    import signal
    import threading

    from hxn_ptycho.job import sigint_stops
    stop = threading.Event()
    before = signal.getsignal(signal.SIGINT)       # default_int_handler; SIG_IGN in a background job
    with sigint_stops(stop):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.wait(2)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            threading.Event().wait(2)
    assert signal.getsignal(signal.SIGINT) is before            # restored as it was


def test_options_are_generated_for_every_entry_point():
    import dataclasses

    from hxn_ptycho.params import ReconParams, option_name
    names = [option_name(f.name) for f in dataclasses.fields(ReconParams)]
    for verb in ("reconstruct", "listen", "demo"):
        h = run(verb, "--help").stdout
        missing = [n for n in names + ["--nprocs", "--mode"] if n not in h]
        assert not missing, (verb, missing)


def test_readme_options_table_is_the_generated_one():
    from hxn_ptycho.params import options_markdown
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("<!-- options:begin -->\n", 1)[1].split("<!-- options:end -->", 1)[0]
    assert table == options_markdown()


def test_the_job_imports_no_bluesky_tiled_or_prefect(tmp_path, sim_file):
    """The job only computes: running one imports nothing of the Bluesky layer (a compute node needs
    only numpy, scipy, h5py, mpi4py)."""
    from hxn_ptycho.spec import JobSpec
    spec = JobSpec.from_dict({"params": {"iterations": 2},
                              "source": {"scan_file": str(sim_file), "result_file": str(tmp_path / "r.h5")}})
    path = spec.write(tmp_path / "j.spec.json")
    code = ("import sys; from hxn_ptycho.job import main; rc = main([sys.argv[1], '--quiet']); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('bluesky', 'tiled', 'event_model', 'prefect', 'databroker', 'ophyd', 'zmq') "
            "or m.startswith('hxn_ptycho.callbacks') or m.startswith('hxn_ptycho.workflows')); "
            "print('imported:', bad); sys.exit(rc or bool(bad))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "imported: []" in done.stdout, done.stdout + done.stderr
    assert (tmp_path / "r.h5").exists()


def test_ctrl_c_finishes_the_iteration_and_keeps_the_estimate(tmp_path):
    """One Ctrl-C (SIGINT) during `reconstruct`: the current iteration ends, the result is written
    and marked interrupted, and the last line says so; the run did not go on to its 2000 iterations."""
    import signal
    import time

    scan = tmp_path / "s.h5"
    assert run("simulate", str(scan), "--size", "64", "--positions", "100").returncode == 0
    out = tmp_path / "r.h5"
    proc = subprocess.Popen([*EXE, "reconstruct", str(scan), "-o", str(out), "--iterations", "2000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    seen = ""
    while time.monotonic() < deadline and "it/s" not in seen and "s/it" not in seen:
        seen += proc.stderr.read(64)              # the progress bar: the iterations have started
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]             # interrupted: the documented status, result kept
    res = read_result(out)
    assert res.attrs.get("interrupted") is True or res.attrs.get("interrupted") == 1
    assert 1 <= res.iterations < 2000
    final = [line for line in stdout.splitlines() if line.startswith("final data error")]
    assert final and "interrupted" in final[-1], (stdout, stderr[-1000:])
