"""Jobs on a real Slurm (``.ci/steps/40-slurm.sh``: slurmctld + slurmd, one node with 2 CPUs) and
under Open MPI's ``mpirun``: the same results as ``mpiexec``, Slurm's end states in the outcome,
one GPU per rank from the launcher's variables, and the queue's promises (one derived run per raw
run, a restarted listener adopts the Slurm job, ``scancel`` on an abandoned one).

Skipped unless ``HXN_PTYCHO_TEST_SLURM`` names the partition (CI exports it) — and the Open MPI
ones unless ``HXN_PTYCHO_TEST_OPENMPI`` names Open MPI's libmpi. Run: ``pytest tests/test_slurm.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest_bluesky import stop_zmq_stack, wait_for

from hxn_ptycho.resultfile import read_result
from hxn_ptycho.simulate import simulate_scan, write_simulation

PARTITION = os.environ.get("HXN_PTYCHO_TEST_SLURM")
OPENMPI = os.environ.get("HXN_PTYCHO_TEST_OPENMPI")
EXE = [sys.executable, "-m", "hxn_ptycho.cli"]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
TIMEOUT_S = 180

pytestmark = pytest.mark.skipif(not PARTITION, reason="no Slurm here (set HXN_PTYCHO_TEST_SLURM=PARTITION; "
                                                      "CI's .ci/steps/40-slurm.sh starts one)")
needs_openmpi = pytest.mark.skipif(not OPENMPI or not shutil.which("mpirun.openmpi"),
                                   reason="no Open MPI here (set HXN_PTYCHO_TEST_OPENMPI=<its libmpi.so>)")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without an enclosing MPI job's or Slurm job's variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "PMIX_", "HYDRA_", "MPI_", "SLURM_"))}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def scontrol(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def submitted_id(stderr: str) -> str:
    line = next(ln for ln in stderr.splitlines() if ln.startswith("submitted Slurm job"))
    return line.split()[3]


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """32x32 frames, 100 views."""
    path = tmp_path_factory.mktemp("slurm") / "scan_7.h5"
    sim, truth = simulate_scan(n=32, n_positions=100, seed=2, overlap_step=8.0)
    write_simulation(path, sim, truth)
    return path


@pytest.fixture(scope="module")
def mpich_result(scan):
    """The reference: ``hxn-ptycho reconstruct --nprocs 2`` under the bundled MPICH's mpiexec."""
    out = scan.with_name("mpich.h5")
    done = subprocess.run([*EXE, "reconstruct", str(scan), "-o", str(out), "--nprocs", "2", "--precision", "double",
                           "--iterations", "10", "--threads", "1", "--quiet"],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=clean_env())
    assert done.returncode == 0, done.stderr
    return read_result(out)


@pytest.fixture()
def blocker():
    """A job that holds every CPU of the partition, so the next job stays PENDING until it is cancelled."""
    ids: list[str] = []

    def hold() -> str:
        cpus = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%C"], capture_output=True, text=True,
                              check=True).stdout.split("/")[-1].strip()
        job = subprocess.run(["sbatch", "--parsable", "-p", PARTITION, f"--ntasks={cpus}", "-o", "/dev/null",
                              "--wrap", "sleep 600"], capture_output=True, text=True, check=True).stdout.strip()
        ids.append(job)
        wait_for(lambda: scontrol(job)["JobState"] == "RUNNING", 60, what="the blocking job to run")
        return job
    yield hold
    for job in ids:
        subprocess.run(["scancel", job], check=False)


def test_reconstruct_on_slurm_equals_mpiexec(scan, mpich_result):
    """``reconstruct --launcher slurm --nprocs 2`` = ``mpiexec -n 2`` (≤ 1e-6); Slurm lists it COMPLETED, 2 tasks."""
    out = scan.with_name("slurm.h5")
    done = subprocess.run([*EXE, "reconstruct", str(scan), "-o", str(out), "--launcher", "slurm", "--nprocs", "2",
                           "--slurm-partition", PARTITION, "--precision", "double", "--iterations", "10",
                           "--threads", "1", "--quiet"], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=clean_env())
    assert done.returncode == 0, done.stderr
    job = scontrol(submitted_id(done.stderr))
    assert job["JobState"] == "COMPLETED" and job["NumTasks"] == "2", job
    res = read_result(out)
    assert res.attrs.get("ranks", 2) == 2
    d_obj, d_probe = rel_diff(res.object, mpich_result.object), rel_diff(res.probe, mpich_result.probe)
    print(f"slurm vs mpiexec: object {d_obj:.2e}, probe {d_probe:.2e}")
    assert d_obj <= 1e-6 and d_probe <= 1e-6
    assert not list(out.parent.glob(".hxn-ptycho-slurm-*")), "the job's temporary folder was left behind"


def test_a_killed_rank_fails_the_slurm_job_whole(scan):
    """A rank killed mid-run: srun ends the others, Slurm says FAILED, no result (nor a part of it) is left."""
    out = scan.with_name("killed.h5")
    done = subprocess.run([*EXE, "reconstruct", str(scan), "-o", str(out), "--launcher", "slurm", "--nprocs", "2",
                           "--iterations", "10", "--quiet"], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=clean_env(HXN_PTYCHO_TEST_KILL_RANK="1"))
    assert done.returncode == 1, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert "failed: Slurm job" in last and "ended FAILED" in last, last
    assert scontrol(submitted_id(done.stderr))["JobState"] == "FAILED"
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_an_mpi_that_misses_the_launchers_pmi_is_refused(scan):
    """srun --mpi=none: the bundled MPICH sees two worlds of one; the job says so instead of running twice."""
    out = scan.with_name("nopmi.h5")
    done = subprocess.run([*EXE, "reconstruct", str(scan), "-o", str(out), "--launcher", "slurm", "--nprocs", "2",
                           "--slurm-mpi", "none", "--iterations", "5", "--quiet"], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=clean_env())
    assert done.returncode == 1
    assert "started 2 processes but MPI sees a world of 1" in done.stdout + done.stderr
    assert not out.exists()


def test_cancelled_while_pending_names_the_state(scan, blocker):
    """scancel on a queued job: the outcome names CANCELLED; nothing is written."""
    hold = blocker()
    out = scan.with_name("cancelled.h5")
    proc = subprocess.Popen([*EXE, "reconstruct", str(scan), "-o", str(out), "--launcher", "slurm", "--nprocs", "2",
                             "--iterations", "5", "--quiet", "--slurm-poll-s", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        job = wait_for(lambda: next((j for j in subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True,
                                                                 text=True).stdout.split("\n")
                                     if j.endswith("PENDING")), None), 60, what="a pending job").split()[0]
        assert job != hold
        subprocess.run(["scancel", job], check=True)
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == 1, stderr
    assert f"Slurm job {job} ended CANCELLED" in stdout
    assert not out.exists()


def test_one_gpu_per_rank_under_srun_and_mpirun(tmp_path):
    """Each rank's GPU comes from its launcher's node-local rank (SLURM_LOCALID, OMPI_COMM_WORLD_LOCAL_RANK, MPICH's).
    Each rank writes "rank device" to a file of its own (the launchers' stdout forwarding may split lines)."""
    code = ("import os, sys; from hxn_ptycho.distributed import world; from hxn_ptycho.gpu import select_device; "
            "c = world(); open(os.path.join(sys.argv[1], f'rank{c.rank}'), 'w').write(f'{c.rank} {select_device(c.rank, visible=2)}')")
    runs = {"srun": ["srun", "-p", PARTITION, "-n", "2", sys.executable, "-c", code],
            "mpiexec": [str(MPIEXEC), "-n", "2", sys.executable, "-c", code]}
    if OPENMPI and shutil.which("mpirun.openmpi"):
        runs["mpirun"] = ["mpirun.openmpi", "--allow-run-as-root", "--oversubscribe", "-n", "2", "-x",
                          f"MPI4PY_LIBMPI={OPENMPI}", sys.executable, "-c", code]
    for name, argv in runs.items():
        out = tmp_path / name
        out.mkdir()
        done = subprocess.run([*argv, str(out)], capture_output=True, text=True, timeout=120, env=clean_env())
        assert done.returncode == 0, (name, done.stderr)
        pairs = sorted(tuple(map(int, f.read_text().split())) for f in out.iterdir())
        assert pairs == [(0, 0), (1, 1)], (name, pairs)


@needs_openmpi
def test_open_mpi_mpirun_and_srun_pmix_equal_mpich(scan, mpich_result):
    """The same job under Open MPI (the mpi4py wheel's Open MPI build, MPI4PY_LIBMPI): ``mpirun -n 2``
    and ``srun --mpi=pmix`` give MPICH's result (≤ 1e-6)."""
    from hxn_ptycho.params import ReconParams
    from hxn_ptycho.spec import Execution, Geometry, JobSpec, Source
    env = clean_env(MPI4PY_LIBMPI=OPENMPI)
    lib = subprocess.run(["mpirun.openmpi", "--allow-run-as-root", "-n", "1", "-x", "MPI4PY_LIBMPI", sys.executable,
                          "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert "Open MPI" in lib.stdout, lib.stdout + lib.stderr
    out = scan.with_name("openmpi.h5")
    spec = JobSpec(params=ReconParams(iterations=10, precision="double", threads=1),
                   geometry=Geometry.from_scan_file(scan), execution=Execution(ranks=2),
                   source=Source(scan_file=str(scan), result_file=str(out)))
    spec_path = spec.write(scan.with_name("openmpi.spec.json"))
    done = subprocess.run(["mpirun.openmpi", "--allow-run-as-root", "--oversubscribe", "-n", "2", "-x", "MPI4PY_LIBMPI",
                           sys.executable, "-m", "hxn_ptycho.job", str(spec_path), "--quiet"],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(scan.with_name("openmpi.outcome.json").read_text())["measured"]["ranks"] == 2
    d = rel_diff(read_result(out).object, mpich_result.object)
    out2 = scan.with_name("openmpi_srun.h5")
    done = subprocess.run([*EXE, "reconstruct", str(scan), "-o", str(out2), "--launcher", "slurm", "--nprocs", "2",
                           "--slurm-mpi", "pmix", "--precision", "double", "--iterations", "10", "--threads", "1",
                           "--quiet"], capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stderr
    d2 = rel_diff(read_result(out2).object, mpich_result.object)
    print(f"Open MPI vs MPICH: mpirun {d:.2e}, srun --mpi=pmix {d2:.2e}")
    assert d <= 1e-6 and d2 <= 1e-6


def test_queue_kill_cancels_the_slurm_job_and_requeues_it(tmp_path, scan):
    """stop(kill=True) on a queue following a Slurm job: scancel, the entry goes back to pending."""
    from hxn_ptycho.callbacks.launcher import Job, JobQueue
    from hxn_ptycho.params import ReconParams
    from hxn_ptycho.spec import Execution, Geometry, JobSpec, Source
    spec = JobSpec(params=ReconParams(iterations=2000, threads=1), geometry=Geometry.from_scan_file(scan),
                   execution=Execution(ranks=2, launcher="slurm", slurm={"poll_s": 0.5}),
                   source=Source(scan_file=str(scan), result_file=str(tmp_path / "r.h5")))
    q = JobQueue(tmp_path / "q", publish=None, env={"OMP_NUM_THREADS": "1"})
    job = q.submit(Job.of(spec))
    q.start()
    entry = lambda: Job.from_dict(json.loads(next((tmp_path / "q" / "running").glob("*.json")).read_text()))  # noqa: E731
    slurm_id = wait_for(lambda: any((tmp_path / "q" / "running").glob("*.json")) and entry().slurm_job, 60,
                        what="the Slurm job id in the queue entry")
    wait_for(lambda: scontrol(slurm_id)["JobState"] == "RUNNING", 60, what="the Slurm job to run")
    q.stop(kill=True)
    wait_for(lambda: scontrol(slurm_id)["JobState"] == "CANCELLED", 60, what="scancel")
    pending = list((tmp_path / "q" / "pending").glob("*.json"))
    assert len(pending) == 1 and pending[0].name.endswith(f"-{job.id}.json")
    assert not (tmp_path / "r.h5").exists()


def test_queue_time_limit_cancels_the_slurm_job(tmp_path, scan):
    """A Slurm job past the queue's time limit is cancelled (scancel) and recorded as failed, saying so."""
    from hxn_ptycho.callbacks.launcher import Job, JobQueue
    from hxn_ptycho.params import ReconParams
    from hxn_ptycho.spec import Execution, Geometry, JobSpec, Source
    spec = JobSpec(params=ReconParams(iterations=5000, threads=1), geometry=Geometry.from_scan_file(scan),
                   execution=Execution(ranks=2, launcher="slurm", slurm={"poll_s": 0.5}),
                   source=Source(scan_file=str(scan), result_file=str(tmp_path / "r.h5")))
    failures: list[str] = []
    q = JobQueue(tmp_path / "q", publish=None, timeout_s=4.0, on_failure=lambda job, reason: failures.append(reason))
    job = q.submit(Job.of(spec))
    q.start()
    assert q.wait_idle(120)
    q.stop()
    done = q.jobs("failed")
    assert [j.id for j in done] == [job.id] and failures, failures
    assert f"Slurm job {done[0].slurm_job} ended CANCELLED" in failures[0]
    assert "ran past the 4 s limit and was cancelled" in failures[0]
    assert scontrol(done[0].slurm_job)["JobState"] == "CANCELLED"
    assert not (tmp_path / "r.h5").exists()


# -- through `hxn-ptycho listen --launcher slurm`, a real Tiled catalog and a 0MQ proxy ---------------

@pytest.mark.slow
def test_listener_on_slurm_one_derived_run_each(tmp_path, blocker, monkeypatch):
    """Four scans through ``listen --launcher slurm --nprocs 2``: a plain one (success); one cancelled
    while queued (one fail naming CANCELLED); one whose listener is killed (SIGKILL) while its job is
    queued and another stopped (SIGTERM) while its job runs — each adopted by the restarted listener,
    not submitted again: exactly one derived run per raw run, and one Slurm job each."""
    from bluesky import RunEngine
    from bluesky.callbacks.zmq import Publisher
    from bluesky.preprocessors import SupplementalData
    from test_callbacks_listener import start_listener

    from hxn_ptycho.callbacks.catalog import EmbeddedServer, free_port, runs, tiled_writer
    from hxn_ptycho.callbacks.sim_beamline import hxn_sample, make_hxn, step_scan

    server = EmbeddedServer(tmp_path / "catalog").start()
    port_in, port_out = free_port(), free_port()
    proxy = subprocess.Popen([str(Path(sys.executable).with_name("bluesky-0MQ-proxy")), str(port_in), str(port_out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    monkeypatch.setenv("TILED_API_KEY", server.api_key)
    work, log_path = server.directory / "work", tmp_path / "listener.log"
    opts = ("--launcher", "slurm", "--nprocs", "2", "--slurm-partition", PARTITION, "--slurm-poll-s", "0.5")
    listener = start_listener(server, port_out, work, log_path, extra=opts)
    publisher = None
    try:
        sim, _ = simulate_scan(n=64, n_positions=30, seed=11)
        hxn = make_hxn(server.directory / "detector")
        sample = hxn_sample(sim, "eiger1")
        RE = RunEngine({}, call_returns_result=False)
        RE.preprocessors.append(SupplementalData(baseline=hxn.baseline))
        RE.subscribe(tiled_writer(server.uri, "raw", max_array_size=0))
        publisher = Publisher(f"127.0.0.1:{port_in}")
        RE.subscribe(publisher)
        time.sleep(1.0)
        processed = runs(server.uri, "processed")

        def derived(scan_id: int) -> list[dict]:
            return [r.metadata for r in processed.values()
                    if r.metadata["start"].get("scan_id") == scan_id and r.metadata.get("stop")]

        def slurm_job_of(scan_id: int) -> str:
            for state in ("running", "done", "failed"):
                for p in (work / "queue" / state).glob("*.json"):
                    entry = json.loads(p.read_text())
                    if entry["spec"]["source"]["scan_id"] == scan_id and entry.get("slurm_job"):
                        return entry["slurm_job"]
            return ""

        # 1. a plain scan: one success
        RE(step_scan(hxn, sample, md={"ptycho_crop": 64}), scan_id=201)
        wait_for(lambda: derived(201), 180, interval=1.0, what="scan 201's derived run")
        # 2. cancelled while queued: one fail naming Slurm's state
        hold = blocker()
        RE(step_scan(hxn, sample, md={"ptycho_crop": 64}), scan_id=202)
        job202 = wait_for(lambda: slurm_job_of(202), 60, what="scan 202's Slurm job")
        assert scontrol(job202)["JobState"] == "PENDING"
        subprocess.run(["scancel", job202], check=True)
        wait_for(lambda: derived(202), 120, interval=1.0, what="scan 202's fail run")
        # 3. the listener dies (SIGKILL) while the job is queued; the next one adopts it
        RE(step_scan(hxn, sample, md={"ptycho_crop": 64}), scan_id=203)
        job203 = wait_for(lambda: slurm_job_of(203), 60, what="scan 203's Slurm job")
        listener.kill()
        listener.wait(30)
        assert scontrol(job203)["JobState"] == "PENDING"
        listener = start_listener(server, port_out, work, log_path, extra=opts)
        wait_for(lambda: f"(Slurm job {job203}, PENDING)" in log_path.read_text(), 60,
                 what="the adoption of the pending job")
        subprocess.run(["scancel", hold], check=True)
        wait_for(lambda: derived(203), 180, interval=1.0, what="scan 203's derived run")
        # 4. the listener stops (SIGTERM) while the job runs; it is suspended across the restart so
        #    that the restart cannot race its end, and the next listener adopts it
        RE(step_scan(hxn, sample, md={"ptycho_crop": 64}), scan_id=204)
        job204 = wait_for(lambda: slurm_job_of(204), 60, what="scan 204's Slurm job")
        wait_for(lambda: scontrol(job204)["JobState"] == "RUNNING", 60, what="scan 204's job to run")
        subprocess.run(["scontrol", "suspend", job204], check=True)
        listener.send_signal(signal.SIGTERM)
        listener.wait(60)
        assert scontrol(job204)["JobState"] == "SUSPENDED"
        listener = start_listener(server, port_out, work, log_path, extra=opts)
        wait_for(lambda: f"(Slurm job {job204}, SUSPENDED)" in log_path.read_text(), 60,
                 what="the adoption of the running job")
        subprocess.run(["scontrol", "resume", job204], check=True)
        wait_for(lambda: derived(204), 180, interval=1.0, what="scan 204's derived run")
        time.sleep(3.0)                                   # nothing extra arrives late
        got = {sid: derived(sid) for sid in (201, 202, 203, 204)}
        assert {sid: len(v) for sid, v in got.items()} == {201: 1, 202: 1, 203: 1, 204: 1}, got
        for sid in (201, 203, 204):
            assert got[sid][0]["stop"]["exit_status"] == "success", got[sid][0]["stop"]
        stop = got[202][0]["stop"]
        assert stop["exit_status"] == "fail" and f"Slurm job {job202} ended CANCELLED" in stop["reason"], stop
        text = log_path.read_text()
        assert text.count("--parsable") == 4, "a job was submitted again"
        for job in (job203, job204):
            assert scontrol(job)["JobState"] == "COMPLETED"
    finally:
        stop_zmq_stack(publisher, listener, proxy)
        server.stop()
