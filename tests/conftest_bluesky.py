"""Fixtures and helpers for the Bluesky/Tiled tests (imported explicitly by those test files)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pytest
from hxn_ptycho.callbacks.catalog import EmbeddedServer

if TYPE_CHECKING:
    from hxn_ptycho.resultfile import ResultData


@pytest.fixture(scope="module")
def tiled_server(tmp_path_factory):
    """A real ``tiled serve catalog`` subprocess over SQLite in a temporary folder."""
    directory = tmp_path_factory.mktemp("catalog")
    server = EmbeddedServer(directory).start()
    try:
        yield server
    finally:
        server.stop()


def make_result(path: str | os.PathLike, iterations: int = 5, modes: int = 2, n: int = 16, scan_id: int = 7) -> ResultData:
    """A small, valid result file (no reconstruction needed)."""
    from hxn_ptycho.resultfile import ResultData, write_result

    rng = np.random.default_rng(0)
    res = ResultData(
        object=(rng.random((1, 40, 44)) * np.exp(1j * rng.random((1, 40, 44)))).astype(np.complex64),
        probe=(rng.random((modes, n, n)) + 1j * rng.random((modes, n, n))).astype(np.complex64),
        positions_px=np.array([[0.0, 0.0], [10.0, 12.0], [20.0, 24.0]]),
        error_data=np.linspace(1, 0.1, iterations), error_probe=np.full((iterations, modes), 0.01),
        error_object=np.full((iterations, 1), 0.02), probe_power_fraction=np.array([0.9, 0.1][:modes]),
        params={"iterations": iterations, "probe_modes": modes}, attrs={"scan_scan_id": scan_id})
    write_result(path, res)
    return res


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stop_zmq_stack(publisher, listener, proxy) -> None:
    """Tear down a 0MQ test set-up: the RunEngine's publisher (if made), the ``listen`` process and
    the ``bluesky-0MQ-proxy`` process."""
    if publisher is not None:
        publisher._context.destroy(linger=0)
    listener.terminate()
    listener.wait(60)
    proxy.terminate()
    proxy.wait(10)
