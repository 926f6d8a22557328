"""Live previews in a real Tiled catalog (callbacks/live.py): one node per raw run, replaced in
place (latest-wins, at most once an interval), read by ``live_preview`` and ``results --live``; the
node is no derived run."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import conftest_bluesky
import numpy as np
import pytest
from hxn_ptycho.callbacks import live as cb_live
from hxn_ptycho.callbacks.catalog import runs

from hxn_ptycho import callbacks as hxn_callbacks
from hxn_ptycho.live import write_preview
from hxn_ptycho.session import Snapshot

tiled_server = conftest_bluesky.tiled_server      # the fixture (a real Tiled server process)


def snap(views: int, shape=(40, 44)) -> Snapshot:
    rng = np.random.default_rng(views)
    return Snapshot(object=np.exp(1j * rng.random((1,) + shape)).astype(np.complex64),
                    probe=(rng.random((2, 16, 16)) + 0j).astype(np.complex64), views=views, iteration=views // 10,
                    data_error=1.0 / views, positions_px=np.zeros((views, 2)), newest_view=views - 1)


@pytest.mark.slow          # a Tiled server start: about 40 s on the loaded 2-core machine
def test_previews_reach_the_live_node_latest_wins(tiled_server, tmp_path):
    cat = tiled_server.config
    path = tmp_path / "recon.preview.h5"
    pub = cb_live.LivePublisher(cat, "raw-abc", path, interval_s=0.5, poll_s=0.05).start()
    try:
        for views in (50, 100, 150, 200, 250, 300):
            write_preview(path, snap(views), time.time())
            time.sleep(0.15)                         # faster than the interval: some are never sent
        write_preview(path, snap(400, shape=(48, 50)), time.time())     # the canvas grew
    finally:
        pub.stop()
    assert pub.errors == 0
    assert 2 <= len(pub.published) < 7, pub.published        # replaced, not queued
    gaps = np.diff([p["published_at"] for p in pub.published[:-1]])
    assert gaps.size == 0 or gaps.min() >= 0.45
    prev = hxn_callbacks.live_preview(cat, raw_uid="raw-abc")
    assert prev["views"] == 400 and prev["object_phase"].shape == (48, 50)
    assert np.allclose(prev["object_phase"], np.angle(snap(400, shape=(48, 50)).object[0]), atol=1e-6)
    assert hxn_callbacks.live_preview(cat, raw_uid="other") is None
    processed = runs(cat, "processed")
    assert [k for k in processed if k.startswith("live-")] == ["live-raw-abc"]
    from tiled.queries import Eq
    assert len(processed.search(Eq("plan_name", "hxn_ptycho_dm"))) == 0   # not a derived run
    env = dict(os.environ, HXN_PTYCHO_CATALOG=str(tiled_server.directory))
    out = subprocess.run([sys.executable, "-m", "hxn_ptycho.cli", "results", "--live", "--raw-uid", "raw-abc"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "400 views" in out.stdout
    assert cb_live.newest_live(cat) == "raw-abc"
    png = tmp_path / "live.png"
    said: list[str] = []
    assert cb_live.watch(cat, png=png, interval_s=0.1, idle_exit_s=0.5, say=said.append) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and said == ["raw-abc: 400 views, iteration 40"]
