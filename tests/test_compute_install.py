"""The compute-node install: ``pip install hxn-ptycho`` (no extras) in a fresh virtual environment
imports the compute stack, runs a 2-rank job under the bundled MPICH, and has none of bluesky,
tiled, prefect or matplotlib; a beamline verb says which extra to install.

Slow (a fresh venv; pip installs from the local wheel cache/index, no network needed here):
``pytest -m slow tests/test_compute_install.py`` — it prints how long the install took.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "hxn_ptycho", "callbacks", "workflows", "cuda")


@pytest.mark.slow
def test_compute_only_install_runs_a_two_rank_job(tmp_path):
    src = tmp_path / "src"                       # a copy: pip's in-tree build leaves the checkout alone
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, exe = venv / "bin" / "python", venv / "bin" / "hxn-ptycho"
    t0 = time.monotonic()
    done = subprocess.run([str(py), "-m", "pip", "install", "-q", str(src)], capture_output=True, text=True,
                          timeout=900)
    install_s = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"compute-only install (pip install hxn-ptycho into a fresh venv): {install_s:.1f} s")
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                            check=True).stdout
    names = {d["name"].lower() for d in json.loads(listed)}
    assert {"numpy", "scipy", "numba", "h5py", "mpi4py", "mpich", "hxn-ptycho"} <= names
    unwanted = names & {"bluesky", "tiled", "prefect", "matplotlib", "ophyd", "databroker", "event-model", "pyzmq"}
    assert not unwanted, f"the compute install pulled in {sorted(unwanted)}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "PMIX_", "HYDRA_", "MPI_", "SLURM_", "HXN_PTYCHO_"))}
    env.update(OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    run = lambda *a: subprocess.run([str(exe), *a], capture_output=True, text=True, timeout=300, cwd=tmp_path,  # noqa: E731
                                    env=env)
    assert run("simulate", "scan.h5", "--size", "32", "--positions", "40").returncode == 0
    done = run("reconstruct", "scan.h5", "--nprocs", "2", "--iterations", "5", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "2 rank(s)" in done.stdout.strip().splitlines()[-1], done.stdout
    assert (tmp_path / "scan_recon.h5").exists()
    done = run("listen", "--zmq", "127.0.0.1:1")
    assert done.returncode == 2 and "needs the 'beamline' extra" in done.stderr, done.stderr
    assert "pip install 'hxn-ptycho[beamline]'" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([str(py), "-c", "import bluesky"], capture_output=True, text=True, env=env)
    assert done.returncode != 0
