"""fly2dpd followed live from its documents: the simulated PandA flyer under bluesky's
``collect_while_completing`` sends StreamResources at the first collect and StreamDatums about every
``stream_datum_every_s`` while the motion runs (frames, encoder samples and scaler flushed in SWMR
files first); the step-scan LiveFeed follows it with the one export (docs/live.md)."""
from __future__ import annotations

import time
import warnings

import h5py
import numpy as np
from hxn_sim import collect, make_re

from hxn_ptycho.callbacks.sim_beamline import fly2dpd, make_hxn, simulated_scan

N = 42          # a 7 × 6 raster


def _run(tmp_path, with_callback: bool = False):
    from hxn_ptycho.callbacks.export import ExportConfig
    from hxn_ptycho.callbacks.livefeed import LiveFeed, LiveFeedConfig
    from hxn_ptycho.callbacks.router import CallbackConfig, PtychoCallback

    sample, _ = simulated_scan("fly2dpd", n_positions=N, seed=6)
    hxn = make_hxn(tmp_path / "detector")
    RE = make_re(hxn)
    got = collect(RE)
    export = ExportConfig(crop=64, data_roots=(str(tmp_path),), orientation="default")
    work = str(tmp_path / "work")
    params = {"iterations": 4, "threads": 1}
    feed = LiveFeed(LiveFeedConfig(work_dir=work, params=params, export=export, first_chunk=12, chunk=8))
    cb = None
    if with_callback:
        cb = PtychoCallback(CallbackConfig(work_dir=work, params=params, export=export))
        cb.live.append(feed)
        RE.subscribe(cb)
    RE.subscribe(feed)
    docs: list[tuple[str, dict, int]] = []       # (name, doc, frames readable in the detector file then)

    def watch(name, doc):
        if name == "stream_datum" and doc["seq_nums"]["stop"] > 30:
            t0 = time.monotonic()             # (a loaded machine: the first export may outlast a short scan)
            while next(iter(feed.runs.values())).written == 0 and time.monotonic() - t0 < 120:
                time.sleep(0.05)
        readable = -1
        if name == "stream_datum" and doc["stream_resource"] == eiger_sr[0]:
            with h5py.File(path[0], "r", libver="latest", swmr=True, locking=False) as f:   # as hxntools reads
                readable = f["entry/instrument/detector/data"].shape[0]
        docs.append((name, doc, readable))
    eiger_sr: list[str] = []
    path: list[str] = []

    def eiger(name, doc):
        if name == "stream_resource" and doc["data_key"] == "eiger2_image":
            eiger_sr.append(doc["uid"])
            path.append(doc["uri"][len("file://"):])
    RE.subscribe(eiger)
    RE.subscribe(watch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        RE(fly2dpd(hxn, sample, md={"ptycho_crop": 64}, stream_datum_every_s=0.25, dwell_s=0.05))
    if cb is not None:
        assert cb.flush(timeout=300)
    feed.wait(300)
    return got[0], feed, cb, docs, export


def test_a_fly2dpd_with_live_documents_grows_the_scan_file_equal_to_the_post_stop_export(tmp_path, caplog):
    from hxn_ptycho.callbacks.export import build_scan
    from hxn_ptycho.job import read_outcome

    with caplog.at_level("WARNING", logger="hxn_ptycho.callbacks.livefeed"):
        run, feed, _, docs, export = _run(tmp_path)
    # a fly scan's first export runs in this process by design: no warning of a missing child
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    names = [n for n, _, _ in docs]
    # the order collect_while_completing gives: resources before any datum, datums during the scan, no events
    assert names.index("stream_resource") < names.index("stream_datum") < names.index("stop")
    primary = {d["uid"] for n, d, _ in docs if n == "descriptor" and d["name"] == "primary"}
    assert not [d for n, d, _ in docs if n in ("event", "event_page") and d["descriptor"] in primary]
    eiger = [(d["indices"], r) for n, d, r in docs if n == "stream_datum" and r >= 0]
    assert len(eiger) >= 3 and eiger[-1][0]["stop"] == N
    assert all(r >= ind["stop"] for ind, r in eiger)      # what a StreamDatum names is readable when it is sent
    assert len(run.seq_nums["primary"]) == N and run.problems == []
    (live,) = feed.runs.values()
    assert live.gave_up is None, live.gave_up
    assert 12 <= live.appended_during_scan <= N           # views were in the growing file before the stop
    assert live.incremental.frames_read == N              # each frame read once
    post = build_scan(run, export)                         # the post-stop export of the same run
    with h5py.File(live.scan_path, "r") as f:
        assert f["complete"][0] == 1 and f["n_written"][0] == N
        assert np.array_equal(f["diffamp"][()], post.diffamp) and np.array_equal(f["points"][()], post.points)
        assert np.array_equal(f["mask"][()], post.mask)
        for k in ("lambda_nm", "z_m", "ccd_pixel_um"):
            assert f[k][()] == getattr(post, k)
    outcome = read_outcome(live.outcome_path)
    assert outcome is not None and outcome["status"] == "success", outcome
    assert outcome["measured"]["live"]["views"] == N


def test_a_fly2dpd_followed_from_its_documents_is_the_runs_one_result(tmp_path):
    _, feed, cb, _, _ = _run(tmp_path, with_callback=True)
    (live,) = feed.runs.values()
    assert live.result_path.exists() and live.run.uid in feed.took
    assert cb.submitted == [] and cb.failed == []          # one result: the live one


def test_a_fly2dpd_with_only_its_bulk_documents_is_left_to_the_post_stop_path(tmp_path):
    """The fly2dpd the beamline runs today (everything at the end): the live feed writes nothing and
    the post-stop path makes the run's one derived run."""
    from hxn_ptycho.callbacks.export import ExportConfig
    from hxn_ptycho.callbacks.livefeed import LiveFeed, LiveFeedConfig
    from hxn_ptycho.callbacks.router import CallbackConfig, PtychoCallback

    sample, _ = simulated_scan("fly2dpd", n_positions=36, seed=6)
    hxn = make_hxn(tmp_path / "detector")
    RE = make_re(hxn)
    export = ExportConfig(crop=64, data_roots=(str(tmp_path),), orientation="default")
    work = str(tmp_path / "work")
    params = {"iterations": 2, "threads": 1}
    feed = LiveFeed(LiveFeedConfig(work_dir=work, params=params, export=export, first_chunk=12, chunk=8))
    cb = PtychoCallback(CallbackConfig(work_dir=work, params=params, export=export))
    cb.live.append(feed)
    RE.subscribe(cb)
    RE.subscribe(feed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        RE(fly2dpd(hxn, sample, md={"ptycho_crop": 64}))
    assert cb.flush(timeout=300)
    feed.wait(60)
    (live,) = feed.runs.values()
    assert live.writer is None and "without StreamResource" in (live.gave_up or "")
    assert not live.scan_path.exists() and not live.result_path.exists()
    assert len(cb.submitted) == 1 and cb.failed == []      # exactly one job: the post-stop path's
