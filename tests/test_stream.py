"""Fly scans live from the detector's streams (callbacks/stream.py, issue 20): the wire formats, pairing
by frame id under lost, duplicated and late messages, and the simulated fly2dpd through the RunEngine
whose live scan file equals the post-stop export bit for bit."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from hxn_sim import collect, make_re

from hxn_ptycho.callbacks.export import ExportConfig, build_scan
from hxn_ptycho.callbacks.sim_beamline import fly2dpd, make_hxn, simulated_scan
from hxn_ptycho.callbacks.sim_streams import SimStreamConfig, SimStreams
from hxn_ptycho.callbacks.stream import Pairer, StreamConfig, StreamFeed, StreamFeedConfig, to_file_frame
from hxn_ptycho.callbacks.streamwire import (StreamError, compress, decode_eiger, decode_panda, encoding_header,
                                             panda_data)
from hxn_ptycho.spec import JobSpec, Source


# -- the wire formats -----------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["bs32-lz4<", "lz4<", "raw"])
def test_an_eiger_frame_round_trips_through_its_wire_format(encoding):
    frame = np.random.default_rng(1).poisson(4, (30, 44)).astype(np.uint32)
    parts = [json.dumps({"htype": "dimage-1.0", "series": 7, "frame": 12}).encode(),
             encoding_header(frame.shape, frame.dtype, encoding), compress(frame, encoding)]
    msg = decode_eiger(parts)
    assert (msg.kind, msg.series, msg.frame) == ("frame", 7, 12)
    assert msg.image.dtype == np.uint32 and np.array_equal(msg.image, frame)      # shape [cols, rows] undone
    if encoding != "raw":
        assert len(parts[2]) < frame.nbytes


def test_bad_eiger_and_panda_messages_are_refused_by_name():
    frame = np.zeros((8, 8), np.uint32)
    head = json.dumps({"series": 1, "frame": 0}).encode()
    bad_enc = json.dumps({"htype": "dimage_d-1.0", "shape": [8, 8], "type": "uint32", "encoding": "zstd"}).encode()
    with pytest.raises(StreamError, match="encoding 'zstd' is not supported"):
        decode_eiger([head, bad_enc, compress(frame, "raw")])
    wrong = encoding_header((8, 16), np.uint32, "bs32-lz4<")
    with pytest.raises(StreamError, match="bslz4 Eiger frame says"):
        decode_eiger([head, wrong, compress(frame, "bs32-lz4<")])
    with pytest.raises(StreamError, match="no starting_sample_number"):
        decode_panda({"msg_type": "data", "frame_number": 3, "datasets": {"/INENC2.VAL.Value": {"data": [1.0]}}})
    msg = decode_panda(panda_data(4, {"/INENC2.VAL.Value": (41, np.arange(3.0))}))
    assert msg.kind == "data" and msg.number == 4 and msg.samples["/INENC2.VAL.Value"][0] == 41


def test_the_stream_frame_becomes_the_files_frame():
    sims = SimStreams(SimStreamConfig())
    try:
        frame = np.arange(96 * 80, dtype=np.uint32).reshape(96, 80)
        raw = sims.full_raw(frame)
        assert raw.shape != frame.shape                                  # the full detector, raw orientation
        assert np.array_equal(to_file_frame(raw, "fliplr", sims.roi(frame.shape)), frame)
        assert not np.array_equal(to_file_frame(raw, "identity", sims.roi(frame.shape)), frame)
    finally:
        sims.close()


# -- pairing by id ----------------------------------------------------------------------------------

def _arrivals(n: int, s: int, drop: set[int], seed: int) -> list[tuple[str, object]]:
    """Frame i carries i in every pixel; its PandA samples are 1000·i + k: a view whose frame and
    position disagree is visible. Duplicates and reordering (frames and PandA messages), ``drop`` lost."""
    rng = np.random.default_rng(seed)
    frames = [(float(i), ("f", i)) for i in range(n) if i not in drop]
    frames += [(float(i) + 3, ("f", int(i))) for i in rng.choice([i for i in range(n) if i not in drop], n // 50,
                                                                 replace=False)]          # duplicates, a bit later
    samples = 1000.0 * np.repeat(np.arange(n), s) + np.tile(np.arange(s), n)
    msgs = [(min(a + 41, n * s) / s, ("p", (a, samples[a:a + 41]))) for a in range(0, n * s, 41)]
    msgs += [(t + 5, m) for t, m in (msgs[int(k)] for k in rng.choice(len(msgs), 5, replace=False))]
    out = frames + msgs
    late = np.where(rng.uniform(size=len(out)) < 0.05, rng.uniform(0, 40, len(out)), rng.uniform(0, 1, len(out)))
    order = np.argsort([t for t, _ in out] + late)          # measured order, 5 % of messages late by up to 40 ids
    return [out[k][1] for k in order]


def _views_are_consistent(views, s: int) -> bool:
    return all(int(v.frame[0, 0]) == v.id and np.array_equal(v.samples["x"], 1000.0 * v.id + np.arange(s))
               for v in views)


def test_pairing_by_id_with_drops_duplicates_and_reordering_misses_exactly_the_dropped_ids():
    n, s = 400, 10
    drop = {int(i) for i in np.random.default_rng(3).choice(n, n // 100, replace=False)}    # 1 %
    p = Pairer(["x"], s, reorder_window=64, n_points=n)
    views = []
    for kind, item in _arrivals(n, s, drop, seed=4):
        if kind == "f":
            p.add_frame(item, np.full((4, 4), item, np.uint32), 0.0)
        else:
            a, v = item
            p.add_samples({"x": (a, v)}, 0.0)
        views += p.pop_ready()
    views += p.pop_ready(final=True)
    ids = [v.id for v in views]
    assert sorted(p.missing) == sorted(drop) and len(drop) == 4
    assert ids == sorted(set(range(n)) - drop)                         # in id order, each once
    assert _views_are_consistent(views, s)                             # nothing shifted
    assert p.duplicates >= n // 50 and p.late == 0

    # the same arrivals paired by arrival order (the n-th frame with the n-th position) shift views
    frames_in_order, seen = [], set()
    for kind, item in _arrivals(n, s, drop, seed=4):
        if kind == "f" and item not in seen:
            seen.add(item)
            frames_in_order.append(item)
    from hxn_ptycho.callbacks.stream import View
    by_arrival = [View(i, np.full((4, 4), f, np.uint32), {"x": 1000.0 * i + np.arange(s)}, 0.0)
                  for i, f in enumerate(frames_in_order)]
    assert not _views_are_consistent(by_arrival, s)


def test_a_message_later_than_the_reorder_window_is_refused_not_shifted():
    p = Pairer(["x"], 1, reorder_window=8, n_points=40)
    p.add_samples({"x": (0, np.arange(40.0))}, 0.0)
    for i in range(40):
        if i != 5:
            p.add_frame(i, np.full((2, 2), i, np.uint32), 0.0)
    views = p.pop_ready()
    assert 5 in p.missing and [v.id for v in views][:6] == [0, 1, 2, 3, 4, 6]
    assert not p.add_frame(5, np.full((2, 2), 5, np.uint32), 0.0) and p.late == 1


# -- the simulated fly2dpd, live from its streams ---------------------------------------------------------

def _live_fly2dpd(tmp_path, n: int, *, drop: float = 0.0, orientation: str | None = None, seed: int = 3,
                  process: bool = False):
    sample, _ = simulated_scan("fly2dpd", n_positions=n, seed=seed)
    hxn = make_hxn(tmp_path / "detector")
    RE = make_re(hxn)
    got = collect(RE)
    sims = SimStreams(SimStreamConfig(rate=2000, drop=drop, duplicate=drop, reorder=drop, seed=seed, process=process))
    cfg = ExportConfig(crop=64, data_roots=(str(tmp_path),), orientation=orientation)
    scfg = StreamConfig(eiger=sims.eiger_address, panda=sims.panda_address, roi=sims.roi(hxn.eiger2.frame_shape),
                        scaler_channel=sims.cfg.scaler_channel, first_chunk=64, chunk=32, reorder_window=64)
    feed = StreamFeed(StreamFeedConfig(work_dir=str(tmp_path / "work"), export=cfg, stream=scfg, launch=False)).start()
    RE.subscribe(feed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            RE(fly2dpd(hxn, sample, streams=sims))
        (run,) = feed.runs.values()
        facts = feed.compare(run.uid, 120)
    finally:
        feed.close()
        sims.close()
    return feed, run, facts, got[0], cfg, sims.emitted[-1]


def test_the_live_scan_file_from_the_streams_equals_the_post_stop_export_bit_for_bit(tmp_path):
    """RunEngine fly2dpd whose simulated Eiger and PandA send their streams (bslz4, full raw frames,
    41-sample PandA messages): the growing file equals the export of the run's documents and files,
    and the reconstruction of either file is the same."""
    feed, run, facts, collected, cfg, _sent = _live_fly2dpd(tmp_path, 144)
    assert facts["equal"], facts["differences"]
    assert facts["views_live"] == 144 and facts["missing_ids"] == 0
    post = build_scan(collected, ExportConfig(crop=64, data_roots=(str(tmp_path),),
                                              center=tuple(run.decisions["center"]),
                                              orientation=run.decisions["orientation"]))
    with h5py.File(run.scan_path, "r") as f:
        assert f["complete"][0] == 1
        assert np.array_equal(f["diffamp"][()], post.diffamp) and np.array_equal(f["points"][()], post.points)
        assert np.array_equal(f["mask"][()], post.mask) and f.attrs["decision_source"] == "streams"
    # the decisions the streams made are the ones the plain post-stop export makes from the data
    plain = build_scan(collected, cfg)
    assert [plain.attrs["center_row"], plain.attrs["center_col"]] == run.decisions["center"]
    assert plain.attrs["orientation_as"] == run.decisions["orientation"]
    # same file, same result
    from hxn_ptycho.engine import reconstruct
    from hxn_ptycho.params import ReconParams
    from hxn_ptycho.scanfile import read_scan, write_scan
    write_scan(tmp_path / "post.h5", post)
    params = ReconParams(iterations=4, threads=1)
    a = reconstruct(read_scan(run.scan_path), params)
    b = reconstruct(read_scan(tmp_path / "post.h5"), params)
    assert np.array_equal(a.object, b.object) and np.array_equal(a.probe, b.probe)


def test_lost_duplicated_and_late_stream_messages_miss_exactly_the_lost_views(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="hxn_ptycho.callbacks.stream")
    feed, run, facts, _collected, _cfg, sent = _live_fly2dpd(tmp_path, 289, drop=0.01, orientation="default", seed=5,
                                                                process=True)     # sent by another process
    assert len(sent.dropped) == 3 and sent.duplicated and sent.reordered
    assert run.pairer.missing == sent.dropped                      # exactly the lost ids, nothing shifted
    assert run.written_ids == sorted(set(range(289)) - set(sent.dropped))
    assert facts["duplicates_dropped"] >= len(sent.duplicated) and facts["late_refused"] == 0
    assert facts["received_views_equal"]                           # each received view is the export's view of its id
    assert not facts["equal"]                                      # the lost frames are in the file, not in the stream
    # at the stop the live path fails loudly and leaves the difference for the post-stop job
    assert feed.took_over(run.uid) is False
    assert "LIVE PATH FAILED" in caplog.text
    from hxn_ptycho.job import live_facts_path
    left = json.loads(live_facts_path(tmp_path / "work" / "results" / f"result_{run.stem}.h5").read_text())
    assert left["used"] == "post-stop export" and left["stream"]["missing_ids"] == 3
    status = json.loads(run.status_path.read_text())
    assert status["missing_ids"] == 3 and status["falling_behind"] is False


def test_a_series_with_no_open_run_is_refused_by_name(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="hxn_ptycho.callbacks.stream")
    sims = SimStreams(SimStreamConfig(rate=2000))
    scfg = StreamConfig(eiger=sims.eiger_address, panda=sims.panda_address, tie_wait_s=0.3)
    feed = StreamFeed(StreamFeedConfig(work_dir=str(tmp_path), stream=scfg, launch=False)).start()
    try:
        sims.wait_for_subscribers()
        sims.emit(20, lambda i: np.full((8, 8), i, np.uint32), {"/INENC2.VAL.Value": np.zeros(200)}, 10)
        import time
        deadline = time.time() + 10
        while len(feed.refused) < 2 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        feed.close()
        sims.close()
    assert any("Eiger messages with no open fly2dpd run" in r and "series 1" in r for r in feed.refused), feed.refused
    assert any("PandA messages with no open fly2dpd run" in r for r in feed.refused)


def test_listen_stream_options_are_declared_once_and_checked(tmp_path):
    import argparse

    from hxn_ptycho.callbacks.stream import HXN_EIGER_STREAM, HXN_PANDA_STREAM, add_stream_options, stream_config_from
    ap = argparse.ArgumentParser()
    add_stream_options(ap)
    cfg = stream_config_from(ap.parse_args(["--eiger-stream", HXN_EIGER_STREAM, "--panda-stream", HXN_PANDA_STREAM,
                                            "--stream-roi", "10", "20", "96", "96"]))
    assert cfg.eiger == HXN_EIGER_STREAM and cfg.roi == (10, 20, 96, 96) and cfg.detector_orientation == "fliplr"
    assert stream_config_from(ap.parse_args([])) is None
    with pytest.raises(StreamError, match="give both --eiger-stream and --panda-stream"):
        stream_config_from(ap.parse_args(["--eiger-stream", HXN_EIGER_STREAM]))
    with pytest.raises(StreamError, match="expected a 0MQ address"):
        stream_config_from(ap.parse_args(["--eiger-stream", "host:5559", "--panda-stream", HXN_PANDA_STREAM]))


def test_the_post_stop_job_carries_the_failed_live_paths_difference(tmp_path):
    """A live path that failed leaves ``<result>.live_facts.json``; the post-stop job's outcome (so the
    derived run's ``recon["measured"]["live"]``) holds it."""
    from hxn_ptycho.job import live_facts_path, main, outcome_path, read_outcome
    from hxn_ptycho.params import ReconParams
    from hxn_ptycho.scanfile import write_scan
    from hxn_ptycho.simulate import simulate_scan
    from hxn_ptycho.spec import JobSpec, Source

    scan, _ = simulate_scan(n=32, n_positions=16, seed=2)
    write_scan(tmp_path / "scan.h5", scan)
    result = tmp_path / "results" / "result_1_x.h5"
    spec = JobSpec(params=ReconParams(iterations=2, threads=1),
                   source=Source(scan_file=str(tmp_path / "scan.h5"), result_file=str(result)))
    spec_path = spec.write(tmp_path / "job.spec.json")
    facts = {"stream": {"equal": False, "differences": ["diffamp: 3 frame(s) differ, first [4, 9, 17]"]},
             "used": "post-stop export"}
    result.parent.mkdir(parents=True)
    live_facts_path(result).write_text(json.dumps(facts))
    assert main([str(spec_path), "--quiet"]) == 0
    outcome = read_outcome(outcome_path(spec_path))
    assert outcome["status"] == "success" and outcome["measured"]["live"] == facts
    assert spec.recon(outcome["measured"])["measured"]["live"]["stream"]["differences"] == facts["stream"]["differences"]


def test_a_fly2dpd_live_from_the_streams_is_the_runs_one_result(tmp_path):
    """PtychoCallback + StreamFeed (cb.live): the live job on the stream's file is the result, the
    post-stop path does not run, and the outcome records the stream's figures and the comparison."""
    from hxn_ptycho.callbacks.router import CallbackConfig, PtychoCallback
    from hxn_ptycho.job import read_outcome

    sample, _ = simulated_scan("fly2dpd", n_positions=100, seed=6)
    hxn = make_hxn(tmp_path / "detector")
    RE = make_re(hxn)
    sims = SimStreams(SimStreamConfig(rate=500))
    export = ExportConfig(crop=64, data_roots=(str(tmp_path),), orientation="default")
    work = str(tmp_path / "work")
    params = {"iterations": 4, "threads": 1}
    from hxn_ptycho.callbacks.launcher import JobQueue
    jobs = JobQueue(tmp_path / "queue").start()
    cb = PtychoCallback(CallbackConfig(work_dir=work, params=params, export=export), jobs)
    feed = StreamFeed(StreamFeedConfig(work_dir=work, params=params, export=export, stream=StreamConfig(
        eiger=sims.eiger_address, panda=sims.panda_address, roi=sims.roi(hxn.eiger2.frame_shape),
        scaler_channel=sims.cfg.scaler_channel, first_chunk=32, chunk=16), queue=cb.jobs, job_nice=3)).start()
    cb.live.append(feed)
    RE.subscribe(cb)
    RE.subscribe(feed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            RE(fly2dpd(hxn, sample, streams=sims))
        assert cb.flush(timeout=300)
    finally:
        feed.close()
        sims.close()
        jobs.stop()
    (run,) = feed.runs.values()
    assert cb.submitted == [] and cb.failed == []              # one result: the live one
    (job,) = jobs.jobs("done")                                 # the live job was the queue's, niced
    assert job.follow and job.nice == 3 and job.id == run.job.job.id and not jobs.jobs("failed")
    outcome = read_outcome(run.outcome_path)
    assert outcome["status"] == "success"
    live = outcome["measured"]["live"]
    assert live["views"] == 100 and live["stream"]["equal"] and live["stream"]["missing_ids"] == 0


def _fly_start(uid: str) -> dict:
    return {"uid": uid, "time": 0.0, "scan_id": 1, "plan_name": "fly2dpd", "motors": ["zpssx", "zpssy"],
            "scan": {"type": "2D_FLY_PANDA", "detectors": ["eiger2", "panda1"], "shape": [20, 10],
                     "fast_axis": {"motor_name": "zpssx"}, "slow_axis": {"motor_name": "zpssy"}}}


def test_the_stream_receivers_live_job_is_a_queue_job_run_at_its_niceness(tmp_path):
    """The receiver's live job goes through the callback's queue (one Job record, spec, runner and
    argument list with --follow, started at once beside a busy slot) and runs at the listener's
    niceness + job_nice, read back from the running process; ended, it fails, nothing is published and
    at the stop the post-stop path takes over (its facts left for the post-stop job)."""
    import os
    import sys
    import time

    from hxn_ptycho.callbacks.collector import RunCollector
    from hxn_ptycho.callbacks.launcher import Job, JobQueue, LiveJob, job_command
    from hxn_ptycho.callbacks.stream import StreamRun
    from hxn_ptycho.job import outcome_path

    argvs: list[list[str]] = []

    def command(job: Job) -> list[str]:
        argvs.append(job_command(job))         # the one argument list (ranks checked, --follow)
        return [sys.executable, "-c", "import time; time.sleep(60)"]     # stands for the job's process

    published: list = []
    q = JobQueue(tmp_path / "q", command=command, publish=lambda *a: published.append(a)).start()
    try:
        busy = q.submit(Job(spec=JobSpec(source=Source(scan_file=str(tmp_path / "a.h5"),
                                                       result_file=str(tmp_path / "r_a.h5"))).to_dict()))
        deadline = time.monotonic() + 20
        while busy.id not in q._procs:          # the only slot is taken
            assert time.monotonic() < deadline
            time.sleep(0.02)
        fcfg = StreamFeedConfig(work_dir=str(tmp_path / "work"), job_nice=7, queue=q)
        run = StreamRun(fcfg, RunCollector(_fly_start("u-nice"), lambda r: None))
        run._start_job()
        assert isinstance(run.job, LiveJob) and run.job.job.follow and run.job.job.nice == 7
        while run.job.pid is None or run.job.job.id not in q._procs:
            assert time.monotonic() < deadline and run.job.poll() is None, run.job.job.reason
            time.sleep(0.02)
        want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)
        assert os.getpriority(os.PRIO_PROCESS, run.job.pid) == want
        stat = Path(f"/proc/{run.job.pid}/stat").read_text()
        assert int(stat[stat.rindex(")") + 2:].split()[16]) == want          # field 19: nice
        # the queue writes the running record's pid just after it starts the process: wait for it
        while not [j for j in q.jobs("running") if j.follow and j.pid is not None]:
            assert time.monotonic() < deadline, q.jobs("running")
            time.sleep(0.02)
        (entry,) = [j for j in q.jobs("running") if j.follow]
        assert entry.id == run.job.job.id and entry.nice == 7 and entry.pid == run.job.pid
        assert "--follow" in argvs[-1] and outcome_path(entry.spec_file) == run.outcome_path
        run._end_job()                          # the feed gave up: SIGTERM to its process group
        assert run.job.wait(20) != 0
        assert [j.id for j in q.jobs("failed")] == [entry.id] and published == []
        feed = StreamFeed(fcfg)                 # at the stop: a live file equal to the export, but the job
        feed.runs[run.uid] = run                # ended without an outcome -> the post-stop path takes over
        run.comparison = {"equal": True, "differences": []}
        run.done.set()
        assert feed.took_over(run.uid, timeout=20) is False
        facts = json.loads((tmp_path / "work" / "results" / "result_1_u-nice.live_facts.json").read_text())
        assert facts == {"stream": run.comparison, "used": "post-stop export"}
    finally:
        q.stop(kill=True)


def test_a_niceness_the_launcher_cannot_apply_is_refused_by_name(tmp_path):
    """A niceness on a Slurm job (not a process of this machine) or below 0: not started, the reason says why."""
    from hxn_ptycho.callbacks.launcher import Job, JobQueue
    from hxn_ptycho.spec import Execution

    ran = tmp_path / "ran"
    q = JobQueue(tmp_path / "q", command=lambda job: ["touch", str(ran)], publish=None)
    src = Source(scan_file=str(tmp_path / "s.h5"), result_file=str(tmp_path / "r.h5"))
    slurm = q.start_now(Job(spec=JobSpec(execution=Execution(launcher="slurm"), source=src).to_dict(),
                            follow=True, nice=5))
    below = q.start_now(Job(spec=JobSpec(source=src).to_dict(), follow=True, nice=-3))
    slurm.wait(20), below.wait(20)
    assert "niceness 5 is applied only by the local launcher" in slurm.job.reason
    assert "the slurm launcher does not apply it" in slurm.job.reason and slurm.job.slurm_job is None
    assert "niceness -3 is not a whole number >= 0" in below.job.reason
    assert not ran.exists() and len(q.jobs("failed")) == 2


def test_a_receiver_that_falls_behind_says_so_in_the_preview(tmp_path):
    """Frames without their positions pile up: the receiver's status says it is behind, and the live
    job's preview (so the catalog's live node) carries it instead of a silent skip."""
    from hxn_ptycho.callbacks.collector import RunCollector
    from hxn_ptycho.callbacks.stream import StreamRun
    from hxn_ptycho.live import read_preview, receiver_status, write_preview
    from hxn_ptycho.session import Snapshot

    start = {"uid": "u-behind", "time": 0.0, "scan_id": 1, "plan_name": "fly2dpd", "motors": ["zpssx", "zpssy"],
             "scan": {"type": "2D_FLY_PANDA", "detectors": ["eiger2", "panda1"], "shape": [20, 10],
                      "fast_axis": {"motor_name": "zpssx"}, "slow_axis": {"motor_name": "zpssy"}}}
    run = StreamRun(StreamFeedConfig(work_dir=str(tmp_path), stream=StreamConfig(behind_views=50), launch=False),
                    RunCollector(start, lambda r: None))
    for i in range(40):
        run.pairer.add_frame(i, np.zeros((4, 4), np.uint32), 0.0)
    run.write_status(1.0)
    assert receiver_status(run.status_path)["falling_behind"] is False
    for i in range(40, 120):                     # the PandA stream is silent: 120 views undecided
        run.pairer.add_frame(i, np.zeros((4, 4), np.uint32), 0.0)
    run.write_status(2.0)
    status = receiver_status(run.status_path)
    assert status["falling_behind"] is True and status["undecided_views"] == 120
    snap = Snapshot(object=np.ones((1, 8, 8), complex), probe=np.ones((1, 4, 4), complex), views=0, iteration=0,
                    data_error=float("nan"), positions_px=np.zeros((0, 2)), newest_view=-1)
    write_preview(tmp_path / "p.h5", snap, 0.0, status)
    prev = read_preview(tmp_path / "p.h5")
    assert prev["receiver_falling_behind"] and prev["receiver_undecided_views"] == 120


# -- hxn-ptycho demo --streams / --live: what it refuses, before any catalog or scan ------------------

def _demo_refused(tmp_path, capsys, *options: str) -> str:
    """Run ``hxn-ptycho demo --dir DIR OPTIONS`` in this process: refused with exit status 2 and one line,
    before anything is made (no demo folder: no catalog server, job queue or scan)."""
    from hxn_ptycho.cli import main
    demo = tmp_path / "demo"
    rc = main(["demo", "--dir", str(demo), *options])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not demo.exists(), sorted(p.name for p in demo.iterdir())
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hxn-ptycho demo: error: "), err
    return lines[0]


def test_demo_refuses_live_with_streams(tmp_path, capsys):
    line = _demo_refused(tmp_path, capsys, "--live", "--streams")
    assert "give --live" in line and "or --streams" in line and "not both" in line


@pytest.mark.parametrize("scan_type", ["step", "FlyPlan2D"])
def test_demo_refuses_streams_for_a_scan_other_than_fly2dpd(tmp_path, capsys, scan_type):
    line = _demo_refused(tmp_path, capsys, "--streams", "--scan-type", scan_type)
    assert "--streams is for --scan-type fly2dpd" in line


def test_demo_refuses_live_for_a_flyplan2d(tmp_path, capsys):
    line = _demo_refused(tmp_path, capsys, "--live", "--scan-type", "FlyPlan2D")
    assert "--live follows step scans" in line and "give --scan-type step or fly2dpd" in line


@pytest.mark.slow
def test_ten_thousand_views_at_a_thousand_frames_a_second_lose_nothing_in_the_receiver():
    """The proof's scale (benchmarks/live_stream.py without the live job): 10 000 views of 64² after the
    crop at 1000 frames a second with 1 % of the ids lost, as many duplicated and late: the receiver
    drops none, exactly the lost ids are missing, every received view is the export's view of its id.
    The timings (lags, first preview) are the benchmark's figures, not asserted here."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import live_stream
    r = live_stream.run_once(10000, 1000.0, 0.01, launch=False)
    assert r["views_dropped_by_receiver"] == 0 and r["injected_drops"] == 100
    assert r["missing_ids_match_injected"] and r["views_received"] == 9900
    assert r["received_views_equal"]
