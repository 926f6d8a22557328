"""``hxn-ptycho listen`` in its own process, fed through a real 0MQ proxy: 20 scans back to back.

Twelve good scans (step and fly), three aborted/failed in the RunEngine, three with lost detector
frames and two without y positions; malformed documents in between. Expected: exactly one
``success`` derived run per good scan, one ``fail`` derived run with a reason per broken scan,
nothing for the aborted ones, and the RunEngine only ever raised what the plans raised.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import conftest_bluesky
import pytest
from conftest_bluesky import wait_for

tiled_server = conftest_bluesky.tiled_server      # the fixture (a real Tiled server process)
from hxn_ptycho.callbacks.catalog import free_port, runs

def job_of(scan: str, result: str):
    from hxn_ptycho.callbacks.launcher import Job
    from hxn_ptycho.spec import JobSpec, Source
    return Job.of(JobSpec(source=Source(scan_file=scan, result_file=result)))


KINDS = ["ok", "ok", "abort", "ok", "frames", "fly", "fail", "ok", "pos", "ok",
         "ok", "frames", "fly", "abort", "ok", "pos", "ok", "ok", "frames", "ok"]


class PlannedFailure(RuntimeError):
    pass


def interrupted(plan, after, action):
    """Pass ``plan`` through; after ``after`` events pause (then the test aborts) or raise."""
    from bluesky import plan_stubs as bps
    n, ret = 0, None
    while True:
        try:
            msg = plan.send(ret)
        except StopIteration:
            return
        ret = yield msg
        if msg.command == "save":
            n += 1
            if n == after:
                if action == "raise":
                    raise PlannedFailure("the plan failed on purpose")
                yield from bps.pause()


@pytest.fixture
def zmq_proxy(tmp_path):
    port_in, port_out = free_port(), free_port()
    exe = Path(sys.executable).with_name("bluesky-0MQ-proxy")
    proc = subprocess.Popen([str(exe), str(port_in), str(port_out)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "proxy.log", "wb"))  # noqa: SIM115 - the subprocess owns it
    time.sleep(0.5)
    assert proc.poll() is None, (tmp_path / "proxy.log").read_text()
    yield port_in, port_out
    proc.terminate()
    proc.wait(10)


def start_listener(server, port_out, work, log_path, extra=()):
    env = dict(os.environ, TILED_API_KEY=server.api_key, OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "hxn_ptycho.callbacks.commands", "listen", "--zmq", f"127.0.0.1:{port_out}",
            "--catalog", str(server.directory), "--work-dir", str(work), "--crop", "64",
            "--iterations", "5", "--slots", "2", "--frame-wait", "1", *extra]
    proc = subprocess.Popen(argv, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115 - the subprocess owns it
    wait_for(lambda: "listening on" in log_path.read_text(errors="replace") or proc.poll() is not None,
             60, what="the listener to start")
    assert proc.poll() is None, log_path.read_text()
    time.sleep(1.5)                   # 0MQ subscriptions settle (slow joiner)
    return proc


@pytest.mark.slow     # ~20-35 s; the same path runs in the default suite's shorter tests
def test_twenty_scans_through_zmq_listener(tiled_server, zmq_proxy, tmp_path, monkeypatch):
    from bluesky import RunEngine
    from bluesky.callbacks.zmq import Publisher
    from bluesky.preprocessors import SupplementalData
    from bluesky.utils import RunEngineInterrupted
    from hxn_ptycho.callbacks.catalog import tiled_writer
    from hxn_ptycho.callbacks.sim_beamline import (
        flyplan2d,
        hxn_sample,
        make_hxn,
        step_scan,
    )
    from tiled.queries import Eq

    from hxn_ptycho.simulate import simulate_scan

    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    port_in, port_out = zmq_proxy
    work = tiled_server.directory / "listener_work"
    log_path = tmp_path / "listener.log"
    listener = start_listener(tiled_server, port_out, work, log_path)
    publisher = None
    try:
        scan, _ = simulate_scan(n=64, n_positions=30, seed=11)
        hxn = make_hxn(tiled_server.directory / "detector20")
        step_sample, fly_sample = hxn_sample(scan, "eiger1"), hxn_sample(scan, "merlin1")
        RE = RunEngine({}, call_returns_result=False)
        RE.preprocessors.append(SupplementalData(baseline=hxn.baseline))
        RE.subscribe(tiled_writer(tiled_server.uri, "raw", max_array_size=0))
        publisher = Publisher(f"127.0.0.1:{port_in}")
        RE.subscribe(publisher)
        time.sleep(1.0)
        uids, unexpected = {}, []
        md = {"ptycho_crop": 64}
        for i, kind in enumerate(KINDS):
            if i == 7:                                # malformed documents in the stream
                publisher("event", {"descriptor": "nope", "data": None})
                publisher("start", {"detectors": ["merlin1"]})
            hxn.eiger1.drop_points = {3, 4} if kind == "frames" else set()
            if kind == "fly":
                plan = flyplan2d(hxn, fly_sample, md=md)
            else:
                plan = step_scan(hxn, step_sample, read_y=(kind != "pos"), md=md)
            if kind in ("abort", "fail"):
                plan = interrupted(plan, 5, "raise" if kind == "fail" else "pause")
            try:
                RE(plan, scan_id=100 + i)
            except RunEngineInterrupted:
                assert kind == "abort"
                RE.abort("aborted by the test")
            except PlannedFailure:
                assert kind == "fail"
            except Exception as exc:                  # anything else means the callbacks hurt the RE  # noqa: BLE001 - anything else is a test failure
                unexpected.append((i, exc))
            uids[100 + i] = kind
        assert not unexpected, unexpected
        hxn.eiger1.drop_points = set()

        good = [sid for sid, k in uids.items() if k in ("ok", "fly")]
        broken = [sid for sid, k in uids.items() if k in ("frames", "pos")]
        processed = runs(tiled_server.uri, "processed")

        def settled():
            found = processed.search(Eq("plan_name", "hxn_ptycho_dm"))
            ids = [r.metadata["start"].get("scan_id") for r in found.values()
                   if (r.metadata["start"].get("scan_id") or 0) >= 100 and r.metadata.get("stop")]
            return len(ids) >= len(good) + len(broken) and ids
        wait_for(settled, 240, interval=1.0, what="all derived runs")
        time.sleep(2.0)                                # nothing extra arrives late
        by_scan: dict[int, list] = {}
        for r in processed.values():
            s = r.metadata["start"]
            if (s.get("scan_id") or 0) >= 100:
                by_scan.setdefault(s["scan_id"], []).append(r.metadata)
        for sid in good:
            got = by_scan.get(sid, [])
            assert len(got) == 1, f"scan {sid}: {len(got)} derived runs"
            assert got[0]["stop"]["exit_status"] == "success", got[0]["stop"]
        for sid in broken:
            got = by_scan.get(sid, [])
            assert len(got) == 1, f"scan {sid} ({uids[sid]}): {len(got)} derived runs"
            stop = got[0]["stop"]
            assert stop["exit_status"] == "fail"
            want = "missing from" if uids[sid] == "frames" else "position field 'zpssy'"
            assert want in stop["reason"], stop["reason"]
        for sid, kind in uids.items():
            if kind in ("abort", "fail"):
                assert sid not in by_scan, f"aborted scan {sid} got a derived run"
        # each good raw run links to its derived run
        raw = runs(tiled_server.uri, "raw")
        some = good[0]
        assert by_scan[some][0]["start"]["raw_uid"] == raw[some].metadata["start"]["uid"]
        text = log_path.read_text(errors="replace")
        assert "malformed" in text, "the malformed documents were not logged"
    finally:
        if publisher is not None:
            # close the PUB socket now, without lingering: left to the garbage collector, its
            # context's term() blocks forever once the proxy is gone (queued messages, linger -1)
            publisher._context.destroy(linger=0)
        listener.terminate()
        listener.wait(60)


def test_queue_survives_a_restart(tmp_path):
    """Jobs pending (or running) when a listener dies are run by the next one."""
    from hxn_ptycho.callbacks.launcher import JobQueue

    marker = tmp_path / "ran"
    marker.mkdir()

    def command(job):
        return [sys.executable, "-c", f"import pathlib; pathlib.Path({str(marker / job.id)!r}).write_text('x')"]

    q = JobQueue(tmp_path / "q", command=command)          # never started: the "dead" listener
    jobs = [q.submit(job_of(f"s{i}", f"r{i}")) for i in range(3)]
    os.rename(next((tmp_path / "q" / "pending").glob("*.json")),
              tmp_path / "q" / "running" / "crashed.json")   # one was running when it died
    q2 = JobQueue(tmp_path / "q", command=command).start()
    assert q2.wait_idle(60)
    q2.stop()
    assert sorted(p.name for p in marker.iterdir()) == sorted(j.id for j in jobs)
    assert len(q2.jobs("done")) == 3 and not q2.jobs("failed")


def test_queue_is_bounded_and_failures_are_recorded(tmp_path):
    from hxn_ptycho.callbacks.launcher import JobQueue, QueueFull

    failures = []
    q = JobQueue(tmp_path / "q", max_pending=2,
                 command=lambda job: [sys.executable, "-c", "import sys; print('boom: bad scan'); sys.exit(3)"],
                 on_failure=lambda job, reason: failures.append(reason))
    q.submit(job_of("a", "b"))
    q.submit(job_of("a", "b"))
    with pytest.raises(QueueFull, match="already holds 2 pending jobs"):
        q.submit(job_of("a", "b"))
    q.start()
    assert q.wait_idle(60)
    q.stop()
    assert len(failures) == 2 and "exited with status 3" in failures[0] and "boom: bad scan" in failures[0]


def test_gpu_pools_one_job_at_a_time_each(tmp_path):
    """Two pools → two runners; each job sees only its pool's GPUs."""
    from hxn_ptycho.callbacks.launcher import JobQueue

    out = tmp_path / "seen"
    out.mkdir()
    code = ("import os, pathlib, sys, time; time.sleep(0.3); "
            "pathlib.Path(sys.argv[1]).write_text(os.environ['CUDA_VISIBLE_DEVICES'])")
    q = JobQueue(tmp_path / "q", gpu_pools=["0,1", "2,3"],
                 command=lambda job: [sys.executable, "-c", code, str(out / job.id)])
    assert q.slots == 2
    for i in range(4):
        q.submit(job_of(f"s{i}", f"r{i}"))
    q.start()
    assert q.wait_idle(60)
    q.stop()
    seen = sorted(p.read_text() for p in out.iterdir())
    assert len(seen) == 4 and set(seen) <= {"0,1", "2,3"}
    for job in q.jobs("done"):                    # each job's spec names the pool it really ran on
        from hxn_ptycho.spec import JobSpec
        assert ",".join(JobSpec.read(job.spec_file).execution.gpus) == (out / job.id).read_text()


def test_a_job_being_started_when_the_queue_is_killed_is_requeued_not_run(tmp_path):
    """stop(kill=True) arriving after a runner has claimed a job but before its process is registered
    (leaving a session early, tests/test_profile_collection.py): the job is not started, and it goes back
    to pending — not run to its end or failed while the queue stops."""
    import threading

    from hxn_ptycho.callbacks.launcher import JobQueue

    marker = tmp_path / "ran"
    claimed, stopped = threading.Event(), threading.Event()
    failures = []

    def command(job):                 # called by the runner after the claim, before the process starts
        claimed.set()
        stopped.wait(10)
        return [sys.executable, "-c", f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')"]
    q = JobQueue(tmp_path / "q", command=command, on_failure=lambda job, reason: failures.append(reason))
    job = q.submit(job_of("a", "b"))
    q.start()
    assert claimed.wait(30)
    stopper = threading.Thread(target=q.stop, kwargs={"kill": True})
    stopper.start()
    wait_for(lambda: q._stop.is_set(), 10, what="the stop")
    stopped.set()
    stopper.join(30)
    assert not marker.exists() and not failures
    pending = [p.name for p in (tmp_path / "q" / "pending").glob("*.json")]
    assert len(pending) == 1 and pending[0].endswith(f"-{job.id}.json"), pending
    assert not any(any((tmp_path / "q" / s).glob("*.json")) for s in ("running", "done", "failed"))
    # the same queue started again runs it to its end (once)
    q.start()
    wait_for(lambda: any((tmp_path / "q" / "done").glob("*.json")), 30, what="the requeued job done")
    q.stop()
    assert marker.exists() and not failures and not any((tmp_path / "q" / "pending").glob("*.json"))


def test_killed_jobs_are_requeued_with_all_their_processes(tmp_path):
    """stop(kill=True) ends the whole process group of a running job and puts the job back."""
    from hxn_ptycho.callbacks.launcher import JobQueue

    pidfile = tmp_path / "child.pid"
    script = ("import os, subprocess, sys, time, pathlib; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"pathlib.Path({str(pidfile)!r}).write_text(str(c.pid)); time.sleep(60)")
    failures = []
    q = JobQueue(tmp_path / "q", command=lambda job: [sys.executable, "-c", script],
                 on_failure=lambda job, reason: failures.append(reason))
    job = q.submit(job_of("a", "b"))
    q.start()
    wait_for(lambda: pidfile.exists() and pidfile.read_text(), 30, what="the job's child process")
    child = int(pidfile.read_text())
    q.stop(kill=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the job's child process survived the kill")
    assert not failures
    pending = [p.name for p in (tmp_path / "q" / "pending").glob("*.json")]
    assert len(pending) == 1 and pending[0].endswith(f"-{job.id}.json"), pending
    assert not list((tmp_path / "q" / "failed").glob("*.json"))
