"""The simulated beamline's step scan as a live source: every frame is in the detector file (and
readable) when its event is emitted; a dwell time per point."""
from __future__ import annotations

import time
import warnings

import h5py
import pytest
from hxn_sim import make_re

from hxn_ptycho.callbacks.sim_beamline import make_hxn, simulated_scan, step_scan


def _hold_at(seq_num, ready, timeout=120.0):
    """A RunEngine subscriber that holds the scan at event ``seq_num`` until ``ready()`` (or
    ``timeout`` s): what a loaded machine needs for a short simulated scan to meet a live step."""
    def hold(name, doc):
        if name == "event" and doc["seq_num"] == seq_num:
            t0 = time.monotonic()
            while not ready() and time.monotonic() - t0 < timeout:
                time.sleep(0.05)
    return hold


def test_step_scan_frames_are_readable_at_their_event_and_each_point_dwells(tmp_path):
    sample, _ = simulated_scan("step", n_positions=6, seed=3)
    hxn = make_hxn(tmp_path / "detector")
    RE = make_re(hxn)
    sleeps: list[float] = []
    RE.msg_hook = lambda msg: sleeps.append(msg.args[0]) if msg.command == "sleep" else None
    files: dict[str, str] = {}
    readable: list[tuple[int, int]] = []

    def on_doc(name, doc):
        if name == "resource":
            files[doc["uid"]] = doc["resource_path"] if "resource_path" in doc else doc.get("uri", "")
        if name == "event" and "eiger1_image" in doc["data"] and files:
            path = next(iter(files.values()))
            path = path if path.startswith("/") else str(tmp_path / "detector" / path)
            with h5py.File(path, "r", libver="latest", swmr=True, locking=False) as f:   # as hxntools reads, mid-scan
                readable.append((doc["seq_num"], f["entry/instrument/detector/data"].shape[0]))
    RE.subscribe(on_doc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        RE(step_scan(hxn, sample, dwell_s=0.01))
    assert sleeps == [0.01] * 6
    assert readable == [(i, i) for i in range(1, 7)], readable


def test_live_feed_grows_the_scan_file_during_a_step_scan_equal_to_the_post_stop_export(tmp_path):
    """RunEngine + simulated step scan + LiveFeed: the growing scan file gets views before the stop,
    is complete after it, equals the post-stop export of the same run dataset by dataset, and the
    live job started on it succeeds."""
    import json

    import numpy as np
    from hxn_sim import collect

    from hxn_ptycho.callbacks.export import ExportConfig, build_scan
    from hxn_ptycho.callbacks.livefeed import LiveFeed, LiveFeedConfig
    from hxn_ptycho.job import read_outcome

    sample, _ = simulated_scan("step", n_positions=48, seed=4)
    hxn = make_hxn(tmp_path / "detector")
    RE = make_re(hxn)
    got = collect(RE)
    cfg = ExportConfig(crop=64)
    feed = LiveFeed(LiveFeedConfig(work_dir=str(tmp_path / "work"), params={"iterations": 6, "threads": 1},
                                   export=cfg, first_chunk=16, chunk=8))
    RE.subscribe(feed)

    # (a loaded machine: the first export may outlast a short scan)
    RE.subscribe(_hold_at(32, lambda: next(iter(feed.runs.values())).written > 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        RE(step_scan(hxn, sample, dwell_s=0.05))
    feed.wait(300)
    (live,) = feed.runs.values()
    assert live.gave_up is None
    assert 16 <= live.appended_during_scan <= 48         # views were in the file before the stop
    assert len(live.export_s) >= 3 and live.incremental.frames_read == 48   # incremental: each frame read once
    post = build_scan(got[0], cfg)                        # the post-stop export of the same run
    with h5py.File(live.scan_path, "r") as f:
        assert f["complete"][0] == 1 and f["n_written"][0] == 48
        assert np.array_equal(f["diffamp"][()], post.diffamp) and np.array_equal(f["points"][()], post.points)
        assert np.array_equal(f["mask"][()], post.mask)
        for k in ("lambda_nm", "z_m", "ccd_pixel_um"):
            assert f[k][()] == getattr(post, k)
        assert json.loads(f.attrs["decision_center"]) == [post.attrs["center_row"], post.attrs["center_col"]]
    outcome = read_outcome(live.result_path.with_name(live.result_path.name[:-3] + ".outcome.json"))
    assert outcome is not None and outcome["status"] == "success", outcome
    assert outcome["measured"]["live"]["views"] == 48


def _scan_with_callbacks(tmp_path, kill_at: int | None = None, live_params: dict | None = None):
    from hxn_ptycho.callbacks.export import ExportConfig
    from hxn_ptycho.callbacks.livefeed import LiveFeed, LiveFeedConfig
    from hxn_ptycho.callbacks.router import CallbackConfig, PtychoCallback

    sample, _ = simulated_scan("step", n_positions=40, seed=5)
    hxn = make_hxn(tmp_path / "detector")
    RE = make_re(hxn)
    export = ExportConfig(crop=64)
    work = str(tmp_path / "work")
    cb = PtychoCallback(CallbackConfig(work_dir=work, params={"iterations": 4, "threads": 1}, export=export))
    feed = LiveFeed(LiveFeedConfig(work_dir=work, params=live_params or {"iterations": 4, "threads": 1},
                                   export=export, first_chunk=12, chunk=8))
    cb.live.append(feed)
    RE.subscribe(cb)
    RE.subscribe(feed)
    if kill_at is not None:                 # the live job dies mid-scan (a real process, SIGKILL)
        def killer(name, doc):
            if name == "event" and doc["seq_num"] == kill_at:
                live = next(iter(feed.runs.values()))
                if live.job is not None:
                    live.job.kill()
        RE.subscribe(killer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        RE(step_scan(hxn, sample, dwell_s=0.05))
    assert cb.flush(timeout=300)
    return cb, feed


def test_the_live_job_is_the_result_and_the_post_stop_path_does_not_run(tmp_path):
    cb, feed = _scan_with_callbacks(tmp_path)
    (live,) = feed.runs.values()
    assert live.result_path.exists()
    assert cb.submitted == [] and cb.failed == []          # one result: the live one


def test_a_live_job_killed_mid_scan_hands_the_run_to_the_post_stop_path(tmp_path):
    cb, feed = _scan_with_callbacks(tmp_path, kill_at=30)
    (live,) = feed.runs.values()
    assert not live.result_path.exists()
    assert len(cb.submitted) == 1 and cb.failed == []      # exactly one job: the post-stop path's


def test_a_held_out_count_is_not_followed_live_and_the_post_stop_path_reconstructs_the_scan(tmp_path):
    """The profile's live feed with ``auto_rule='heldout'`` (set in the session, where no start-up check sees
    it): the growing file is written, no live job is started (the count needs the finished scan), and the
    post-stop path reconstructs the run — one job, no failure."""
    cb, feed = _scan_with_callbacks(tmp_path, live_params={"iterations": 4, "threads": 1, "probe_modes": "auto",
                                                           "auto_rule": "heldout"})
    (live,) = feed.runs.values()
    assert live.job is None and live.spec is None and "finished scan" in live.not_followed
    assert live.writer is not None and live.scan_path.exists() and not live.result_path.exists()
    assert len(cb.submitted) == 1 and cb.failed == []


def test_listen_live_puts_a_live_feed_beside_the_callback_with_its_settings(tmp_path):
    """``listen --live`` (and ``demo --live``): the feed takes the callback's work folder, catalog,
    parameters, ranks and export, and becomes the callback's ``live`` (the post-stop path stands by)."""
    from hxn_ptycho.callbacks.commands import build_live_feed
    from hxn_ptycho.callbacks.router import CallbackConfig, PtychoCallback
    from hxn_ptycho.cli import build_parser

    args = build_parser().parse_args(["listen", "--zmq", "127.0.0.1:1", "--live", "--live-chunk", "8",
                                      "--live-first-chunk", "40", "--work-dir", str(tmp_path)])
    from hxn_ptycho.callbacks.launcher import JobQueue
    queue = JobQueue(tmp_path / "queue")
    cb = PtychoCallback(CallbackConfig(work_dir=str(tmp_path), params={"iterations": 7}, nprocs=2), queue)
    try:
        feed = build_live_feed(args, cb)
        assert cb.live == [feed]
        c = feed.config
        assert c.queue is queue                              # the live job goes through the callback's queue
        assert (c.first_chunk, c.chunk, c.nprocs, c.params["iterations"]) == (40, 8, 2, 7)
        assert c.export is cb.config.export and c.work_dir == str(cb.config.work_dir)
        off = build_parser().parse_args(["listen", "--zmq", "127.0.0.1:1", "--work-dir", str(tmp_path)])
        assert build_live_feed(off, cb) is None              # opt-in
    finally:
        cb.close()


def _step_scan_decided_early(tmp_path):
    """A 40-point simulated step scan through the RunEngine and a live feed (no job launched) that
    decides the orientation on the first 12 views, the first chunk at 24: the run's documents, the
    export config and the feed's live run."""
    from hxn_sim import collect

    from hxn_ptycho.callbacks.export import ExportConfig
    from hxn_ptycho.callbacks.livefeed import LiveFeed, LiveFeedConfig

    sample, _ = simulated_scan("step", n_positions=40, seed=4)
    hxn = make_hxn(tmp_path / "detector")
    RE = make_re(hxn)
    got = collect(RE)
    cfg = ExportConfig(crop=64)
    feed = LiveFeed(LiveFeedConfig(work_dir=str(tmp_path / "work"), params={"iterations": 4, "threads": 1},
                                   export=cfg, first_chunk=24, chunk=8, decide_views=12, launch=False))
    RE.subscribe(feed)

    # (a loaded machine: let the decision start before the first chunk)
    RE.subscribe(_hold_at(20, lambda: next(iter(feed.runs.values()))._decision is not None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        RE(step_scan(hxn, sample, dwell_s=0.02))
    feed.wait(300)
    (live,) = feed.runs.values()
    return got, cfg, live


def test_the_orientation_is_decided_on_the_first_views_recorded_and_taken_by_the_first_chunk(tmp_path):
    """The feed decides the orientation once, on its first ``decide_views`` events (in its warm
    child, before the first chunk is in); the first chunk's export takes that decision instead of
    deciding again, the file records it (and on how many views), and its views equal the post-stop
    export of the same run with that orientation."""
    import dataclasses
    import json

    import numpy as np

    from hxn_ptycho.callbacks.export import build_scan

    got, cfg, live = _step_scan_decided_early(tmp_path)
    assert live.gave_up is None
    assert live.marks.get("decided_early") == 1.0 and "decision_from" in live.marks
    assert live.marks.get("first_incremental_ahead") == 1.0   # made beside the child's export, and equal to it
    assert live.marks.get("child_warm_s", 0) > 0        # the child was started and warmed at the start document
    assert live.marks["start_document_at"] < live.marks["decision_from"] < live.marks["first_export_from"]
    with h5py.File(live.scan_path, "r") as f:
        report = json.loads(f.attrs["orientation_report"])
        assert 12 <= report["decided_on_views"] < 24             # decided on the first views, not the chunk
        assert f.attrs["decision_orientation_decided_on_views"] == report["decided_on_views"]
        orientation = str(f.attrs["decision_orientation"])
        assert orientation == report["chosen"]                   # the decision the first chunk took
        post = build_scan(got[0], dataclasses.replace(cfg, orientation=orientation))
        assert f["complete"][0] == 1 and f["n_written"][0] == 40
        assert np.array_equal(f["diffamp"][()], post.diffamp) and np.array_equal(f["points"][()], post.points)


def test_the_live_scan_file_equals_the_post_stop_export_of_the_same_run_in_every_dataset_and_attribute(tmp_path):
    """Issue 19's proof: the live feed decides the orientation on its first views; the post-stop
    export of the same run takes that recorded decision (:func:`~hxn_ptycho.callbacks.export.
    recorded_decision`), so the scan file it writes equals the live file in every dataset and
    attribute, both ways (the growing file's bookkeeping included)."""

    from hxn_ptycho.callbacks.export import export_scan

    got, cfg, live = _step_scan_decided_early(tmp_path)
    assert live.gave_up is None and live.marks.get("decided_early") == 1.0
    post = tmp_path / "post.h5"
    export_scan(got[0], cfg, post, live_file=live.scan_path)      # the post-stop path of the same run
    from hxn_ptycho.h5util import h5_differences
    datasets, attrs = h5_differences(live.scan_path, post)
    assert datasets == [] and attrs == [], (datasets, attrs)
    # a live file whose recorded beam centre is not the export's: its decision is not taken
    import json
    import shutil
    other = tmp_path / "other_live.h5"
    shutil.copy(live.scan_path, other)
    with h5py.File(other, "r+") as f:
        f.attrs["decision_center"] = json.dumps([int(f.attrs["center_row"]) + 3, int(f.attrs["center_col"])])
    export_scan(got[0], cfg, tmp_path / "post2.h5", live_file=other)
    with h5py.File(tmp_path / "post2.h5", "r") as f:
        assert "decided_on_views" not in json.loads(f.attrs["orientation_report"])   # decided on all frames
        assert not [k for k in f.attrs if k.startswith("decision_")] and "complete" not in f


@pytest.mark.parametrize("bad, named", [({"decide_views": -1}, "decide_views"), ({"first_chunk": 0}, "first_chunk"),
                                        ({"chunk": 0}, "chunk"), ({"nprocs": 0}, "nprocs")])
def test_a_live_feed_config_out_of_range_is_refused_by_name(bad, named):
    from hxn_ptycho.callbacks.livefeed import LiveFeedConfig
    from hxn_ptycho.errors import BadInput

    with pytest.raises(BadInput, match=rf"LiveFeedConfig\.{named} must be"):
        LiveFeedConfig(**bad)
    LiveFeedConfig(decide_views=0)                      # 0: decide on the whole first chunk
