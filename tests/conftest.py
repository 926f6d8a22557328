"""Shared fixtures: small simulated scans (made once per session) and the shared data folder."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from hxn_ptycho.simulate import simulate_scan, write_simulation

SHARED = Path(__file__).resolve().parents[2] / "shared"
STAR = SHARED / "data" / "siemens-star-small" / "siemens-star-small.npz.bz2"
# the simulated beamline writes its detector files in temporary folders: let the tests (and the
# listeners they start) read them as data roots (callbacks/trust.py; /data and /nsls2/data are default)
os.environ.setdefault("HXN_PTYCHO_DATA_ROOTS", os.pathsep.join([tempfile.gettempdir(), str(SHARED)]))


@pytest.fixture(scope="session")
def sim1():
    """One probe mode, 1e6 photons a frame, 64x64 frames, 120 views."""
    return simulate_scan(n=64, n_positions=120, probe_modes=1, photons=1e6, seed=11)


@pytest.fixture(scope="session")
def sim3():
    """A fly-scan blur: three incoherent probe modes, 1e6 photons a frame."""
    return simulate_scan(n=64, n_positions=150, probe_modes=3, photons=1e6, seed=2, blur_px=2.5)


@pytest.fixture(scope="session")
def sim_file(tmp_path_factory, sim1):
    path = tmp_path_factory.mktemp("sim") / "scan_11.h5"
    write_simulation(path, *sim1)
    return path


@pytest.fixture()
def star_path():
    if not STAR.exists():
        pytest.skip(f"the shared Siemens star is not at {STAR}")
    return STAR
