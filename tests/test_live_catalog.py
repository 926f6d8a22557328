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


@pytest.mark.slow          # a Tiled server start and a RunEngine scan: about a minute on the loaded machine
def test_a_live_run_gives_exactly_one_derived_run_with_its_live_figures(tiled_server):
    import warnings

    from hxn_sim import make_re
    from tiled.queries import Eq

    from hxn_ptycho.callbacks.export import ExportConfig
    from hxn_ptycho.callbacks.livefeed import LiveFeed, LiveFeedConfig
    from hxn_ptycho.callbacks.router import CallbackConfig, PtychoCallback
    from hxn_ptycho.callbacks.sim_beamline import make_hxn, simulated_scan, step_scan

    cat = tiled_server.config
    work = str(tiled_server.directory)                    # a folder the server may read
    sample, _ = simulated_scan("step", n_positions=40, seed=6)
    hxn = make_hxn(tiled_server.directory / "detector")
    RE = make_re(hxn)
    export = ExportConfig(crop=64)
    cb = PtychoCallback(CallbackConfig(work_dir=work, catalog=cat, params={"iterations": 4, "threads": 1},
                                       export=export))
    feed = LiveFeed(LiveFeedConfig(work_dir=work, catalog=cat, params={"iterations": 4, "threads": 1},
                                   export=export, first_chunk=12, chunk=8))
    cb.live.append(feed)
    RE.subscribe(cb)
    RE.subscribe(feed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        RE(step_scan(hxn, sample, dwell_s=0.05))
    assert cb.flush(timeout=300)
    (uid,) = feed.runs
    assert cb.submitted == []
    processed = runs(cat, "processed")
    derived = list(processed.search(Eq("raw_uid", uid)).values())
    assert len(derived) == 1
    live = derived[0].metadata["start"]["recon"]["measured"]["live"]
    assert live["views"] == 40 and live["final_latency_s"] is not None
    assert hxn_callbacks.live_preview(cat, raw_uid=uid) is not None


@pytest.mark.slow
def test_the_demo_reconstructs_a_step_scan_while_it_runs(tmp_path):
    """``hxn-ptycho demo --scan-type step --live``: live lines and a live figure while the scan runs;
    the one derived run is the live job's, with its live figures."""
    hxn = os.path.join(os.path.dirname(sys.executable), "hxn-ptycho")
    done = subprocess.run([hxn, "demo", "--dir", str(tmp_path / "demo"), "--scan-type", "step", "--live",
                           "--points", "90", "--dwell", "0.08", "--live-first-chunk", "24", "--live-chunk", "12",
                           "--iterations", "6", "--nprocs", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "live: " in done.stdout and "views, iteration" in done.stdout
    assert "(grown while the scan ran)" in done.stdout and (tmp_path / "demo" / "live.png").exists()
