"""The live figure (callbacks.live.LiveFigure): it follows the preview files while the RunEngine
runs, off the RunEngine's thread with a PNG, and with a window only set_data on its thread."""
from __future__ import annotations

import time

import matplotlib
import numpy as np

matplotlib.use("Agg")

from hxn_ptycho.callbacks.live import LiveFigure
from hxn_ptycho.live import write_preview
from hxn_ptycho.session import Snapshot


def _snap(views: int, it: int, err: float, shape=(80, 90)) -> Snapshot:
    rng = np.random.default_rng(views)
    obj = np.exp(1j * rng.normal(size=(1,) + shape)).astype(np.complex64)
    probe = (rng.normal(size=(1, 32, 32)) + 1j).astype(np.complex64)
    pos = rng.integers(0, 40, size=(views, 2)).astype(np.float64)
    return Snapshot(object=obj, probe=probe, views=views, iteration=it, data_error=err, positions_px=pos,
                    newest_view=views - 1)


def _wait(cond, timeout=60.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout
        time.sleep(0.02)


def test_the_live_figure_draws_each_new_preview_to_a_png_off_the_runengine_thread(tmp_path):
    prev, png = tmp_path / "r.preview.h5", tmp_path / "live.png"
    lines: list[str] = []
    fig = LiveFigure(preview_path=prev, png=png, interval_s=0.05, say=lines.append)
    try:
        fig("start", {"uid": "u1"})
        write_preview(prev, _snap(30, 4, 0.2), time.time())
        _wait(lambda: fig.shown == 1 and png.exists())
        first = png.stat().st_mtime_ns
        time.sleep(0.02)
        write_preview(prev, _snap(60, 8, 0.1), time.time())
        _wait(lambda: fig.shown == 2)
        _wait(lambda: png.stat().st_mtime_ns != first)
        for _ in range(1000):                     # the RunEngine's documents: nothing to do with a PNG
            fig("event", {})
        assert fig.seconds < 0.2                  # (a check per document; 1000 documents)
        a = fig._artists
        assert a["views"].get_offsets().shape == (60, 2)               # the views so far over the scan area
        assert list(a["error"].get_xdata()) == [4, 8] and list(a["error"].get_ydata()) == [0.2, 0.1]
        assert np.allclose(a["phase"].get_array(), np.angle(_snap(60, 8, 0.1).object[0]), atol=1e-6)
        _wait(lambda: lines[-1].startswith("live: 60 views, iteration 8"))     # said after the PNG is out
    finally:
        fig.close()


def test_with_a_window_the_runengine_thread_only_moves_the_newest_preview_into_the_artists(tmp_path):
    prev = tmp_path / "r.preview.h5"
    fig = LiveFigure(preview_path=prev, interval_s=3600)        # the reader thread stays asleep: poll by hand
    try:
        write_preview(prev, _snap(10, 2, 0.3), time.time())
        assert fig.poll() and fig.shown == 0 and fig._slot is not None    # loaded, not drawn
        assert not fig.poll()                                             # unchanged file: nothing
        fig("event", {})
        assert fig.shown == 1 and fig._slot is None
        assert fig._artists["views"].get_offsets().shape == (10, 2)
        fig("event", {})
        assert fig.shown == 1                                             # nothing new: no redraw
    finally:
        fig.close()
