"""The live job goes through the job queue (issue 19, item 2): the same Job record, spec, runner and
argument list as a post-stop job, started at once by JobQueue.start_now (no slot, not behind pending
jobs), not published by the queue, and never run again by a restarted queue."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from hxn_ptycho.callbacks.launcher import Job, JobQueue, job_command
from hxn_ptycho.spec import JobSpec, Source


def _spec(tmp_path: Path, name: str) -> JobSpec:
    return JobSpec(source=Source(scan_file=str(tmp_path / f"scan_{name}.h5"), result_file=str(tmp_path / f"r_{name}.h5"),
                                 raw_uid=name, catalog="http://catalog.invalid"))


def _until(cond, timeout=20.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)


def test_a_live_job_starts_at_once_through_the_queue_and_the_queue_does_not_publish_it(tmp_path):
    argvs: list[list[str]] = []

    def command(job: Job) -> list[str]:
        argvs.append(job_command(job))           # the one argument list (ranks checked, --follow for a live job)
        return [sys.executable, "-c", "import time; time.sleep(60)"]     # stands for the job's process

    published: list = []
    q = JobQueue(tmp_path / "q", slots=1, command=command,
                 publish=lambda spec, outcome, reason: published.append((spec, reason))).start()
    try:
        busy = q.submit(Job.of(_spec(tmp_path, "a")))              # takes the only slot
        waiting = q.submit(Job.of(_spec(tmp_path, "b")))           # pending behind it
        _until(lambda: any(j.id == busy.id for j in q.jobs("running")) and busy.id in q._procs)
        live = q.start_now(Job(spec=_spec(tmp_path, "c").to_dict(), follow=True),
                           spec_file=tmp_path / "result_c_live.spec.json")
        # the pid is the process's at once, the running record's just after (the queue writes it then)
        _until(lambda: live.pid is not None and any(j.id == live.job.id and j.pid is not None
                                                    for j in q.jobs("running")))
        assert live.poll() is None and [j.id for j in q.jobs("pending")] == [waiting.id]
        assert "--follow" in argvs[-1] and "--follow" not in argvs[0]
        assert argvs[-1][argvs[-1].index("hxn_ptycho.job") + 1] == str(tmp_path / "result_c_live.spec.json")
        assert JobSpec.from_json((tmp_path / "result_c_live.spec.json").read_text()).source.raw_uid == "c"
        running = {j.id: j for j in q.jobs("running")}
        assert running[live.job.id].follow and running[live.job.id].pid == live.pid   # the same pid record
        assert (q.directory / "logs" / f"{live.job.id}.log").exists()
        live.terminate()                                            # the feed gave up: SIGTERM to its group
        assert live.wait(20) != 0
        assert [j.id for j in q.jobs("failed")] == [live.job.id] and published == []   # the callback decides
        from hxn_ptycho.callbacks.router import CallbackConfig, PtychoCallback
        cb = PtychoCallback(CallbackConfig(work_dir=str(tmp_path / "work")), q)
        assert cb._queued("a") and not cb._queued("c")     # a restarted callback still runs c's post-stop path
    finally:
        q.stop(kill=True)


def test_a_live_job_ended_before_it_starts_never_runs_and_a_restart_does_not_rerun_one(tmp_path):
    marker = tmp_path / "ran"

    def command(job: Job) -> list[str]:
        return [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]

    q = JobQueue(tmp_path / "q", command=command, publish=None)
    job = Job(spec=_spec(tmp_path, "d").to_dict(), follow=True)
    q._cancelled[job.id] = 15                                       # terminate() asked before the launch
    live = q.start_now(job)
    live.wait(20)
    assert not marker.exists() and live.poll() == -1 and "before it started" in (live.job.reason or "")
    # a live job left in running/ by a dead listener is ended, not requeued (its feed is gone)
    left = Job(spec=_spec(tmp_path, "e").to_dict(), follow=True, pid=2 ** 22 + 7, phase="started")
    path = q._path("running", left)
    path.write_text(json.dumps(left.__dict__))
    assert q.recover(path) == "ended"
    assert [j.id for j in q.jobs("failed")][-1] == left.id and not q.jobs("pending")
