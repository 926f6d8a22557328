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


#: The integration tests: modules that start servers or services (Tiled, 0MQ, Prefect, PostgreSQL,
#: Slurm, a fresh virtual environment). Marked here, in one place, so that each group runs on its
#: own: ``pytest -m integration`` or ``pytest -m "not integration"`` (the unit tests).
INTEGRATION_MODULES = frozenset({
    "test_callbacks_inprocess", "test_callbacks_listener", "test_catalog_concurrency", "test_catalog_derived",
    "test_catalog_layout", "test_catalog_postgres", "test_catalog_security", "test_entry_points", "test_faults",
    "test_hxn_scans_e2e", "test_profile_collection", "test_queries", "test_slurm", "test_compute_install",
})


def pytest_configure(config):
    """``-m integration`` / ``-m "not integration"`` replace the default ``-m "not gpu and not slow"``
    (the last -m wins): keep gpu and slow tests out unless the expression names them."""
    expr = config.option.markexpr or ""
    if "integration" in expr and "slow" not in expr and "gpu" not in expr:
        config.option.markexpr = f"({expr}) and not gpu and not slow"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)
