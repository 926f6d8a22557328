"""Unit tests of the launchers' pieces (no Slurm needed): the Slurm settings and argument lists,
the end-state mapping, the launcher option on every entry point, one GPU per rank from the
launcher's variables, and the error naming the extra on a compute-only install."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from hxn_ptycho.slurm import END_STATES, SlurmSettings, SlurmSettingsError, SlurmState, failure_reason
from hxn_ptycho.spec import Execution, JobSpec, SpecError, add_execution_options, execution_from_namespace, parts_from_options


def test_sbatch_argv_is_an_argument_list_with_every_setting():
    s = SlurmSettings(partition="gpu", account="hxn", gpus_per_task=1, time_limit="1:00:00", mpi="pmi2",
                      sbatch_options=["--qos=high", "--exclusive"])
    argv = s.sbatch_argv(name="hxn-ptycho-x", ntasks=4, output="/w/log", chdir="/w", script="/w/s.sh",
                         command=["/py", "-m", "hxn_ptycho.job", "/w/a b; rm -rf ~.spec.json"])
    assert argv[1:3] == ["--parsable", "--job-name=hxn-ptycho-x"]
    for opt in ("--ntasks=4", "--partition=gpu", "--account=hxn", "--gpus-per-task=1", "--time=1:00:00",
                "--qos=high", "--exclusive"):
        assert opt in argv
    i = argv.index("/w/s.sh")
    assert argv[i + 1:] == ["--mpi=pmi2", "/py", "-m", "hxn_ptycho.job", "/w/a b; rm -rf ~.spec.json"]
    assert all(a.startswith("-") for a in argv[1:i])          # only options before the script


@pytest.mark.parametrize("bad, word", [({"gpus_per_task": 0}, "gpus_per_task"), ({"partition": ""}, "partition"),
                                       ({"sbatch_options": "--qos=high"}, "sbatch_options"),
                                       ({"sbatch_options": ["qos"]}, "sbatch_options"),
                                       ({"nodes": 2}, "unknown slurm setting"), ({"poll_s": 0}, "poll_s")])
def test_bad_slurm_settings_are_refused_by_name(bad, word):
    with pytest.raises(SlurmSettingsError, match=word):
        SlurmSettings.from_dict(bad)
    with pytest.raises(SpecError, match=word):                # through the one schema too
        JobSpec.from_dict({"execution": {"launcher": "slurm", "slurm": bad}})


def test_launcher_is_part_of_the_spec_and_round_trips():
    with pytest.raises(SpecError, match="launcher must be one of local, slurm"):
        Execution(launcher="pbs").validate()
    spec = JobSpec(execution=Execution(ranks=2, launcher="slurm", slurm={"partition": "gpu", "gpus_per_task": 1}))
    back = JobSpec.from_json(spec.to_json())
    assert back.execution.launcher == "slurm" and back.execution.slurm == {"partition": "gpu", "gpus_per_task": 1}


def test_launcher_options_on_the_command_line_and_in_keyword_options():
    p = argparse.ArgumentParser()
    add_execution_options(p)
    ex = execution_from_namespace(p.parse_args(["--nprocs", "2", "--launcher", "slurm", "--slurm-partition", "gpu",
                                                "--slurm-gpus-per-task", "1", "--slurm-option=--qos=high",
                                                "--slurm-option=--exclusive"]))
    assert (ex.ranks, ex.launcher) == (2, "slurm")
    assert ex.slurm == {"partition": "gpu", "gpus_per_task": 1, "sbatch_options": ["--qos=high", "--exclusive"]}
    with pytest.raises(SpecError, match="need --launcher slurm"):
        execution_from_namespace(p.parse_args(["--slurm-partition", "gpu"]))
    _, ex2, _ = parts_from_options({"nprocs": 2, "launcher": "slurm", "slurm_partition": "gpu", "slurm_time_limit": "10"})
    assert ex2.launcher == "slurm" and ex2.slurm == {"partition": "gpu", "time_limit": "10"}


def test_slurm_launcher_skips_the_local_core_limit_but_not_the_views():
    from hxn_ptycho.spec import check_ranks
    spec = JobSpec(execution=Execution(ranks=64, launcher="slurm"))
    spec.geometry.n_views = 100
    check_ranks(spec, cores=2)                                # Slurm places the ranks, not this machine
    with pytest.raises(SpecError, match="per core"):
        check_ranks(JobSpec(execution=Execution(ranks=64)), cores=2)
    spec.geometry.n_views = 10
    with pytest.raises(SpecError, match="more than the scan's 10 views"):
        check_ranks(spec, cores=2)


@pytest.mark.parametrize("state", sorted(set(END_STATES) - {"COMPLETED"}))
def test_every_slurm_end_state_names_itself_in_the_failure(state):
    reason = failure_reason(SlurmState(job_id="42", state=state, exit_code="0:9"), {"reason": "rank 1: boom"}, "tail")
    assert f"Slurm job 42 ended {state}" in reason and "rank 1: boom" in reason and "exit code 0:9" in reason
    assert not SlurmState(job_id="1", state=state).active


def test_slurm_state_parsing_of_scontrol(monkeypatch):
    import hxn_ptycho.slurm as slurm
    line = ("JobId=7 JobName=hxn-ptycho-a UserId=root(0) JobState=CANCELLED Reason=None Dependency=(null) "
            "ExitCode=0:15 NumNodes=1 NumCPUs=2 NumTasks=2 CPUs/Task=1")
    monkeypatch.setattr(slurm, "_command", lambda name: name)
    monkeypatch.setattr(slurm, "_run", lambda argv, timeout=60.0: subprocess.CompletedProcess(argv, 0, line, ""))
    st = slurm.job_state("7")
    assert (st.state, st.exit_code, st.num_tasks, st.active) == ("CANCELLED", "0:15", 2, False)


@pytest.mark.parametrize("var", ["SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"])
def test_one_gpu_per_rank_from_the_launchers_local_rank(monkeypatch, var):
    from hxn_ptycho.gpu import _LOCAL_RANK_VARS, select_device
    for v in _LOCAL_RANK_VARS:
        monkeypatch.delenv(v, raising=False)
    assert select_device(5, visible=4) == 1                   # no launcher variable: the global rank
    monkeypatch.setenv(var, "2")
    assert select_device(5, visible=4) == 2                   # the node-local rank wins
    assert select_device(5, visible=1) == 0                   # Slurm's --gpus-per-task=1: each rank sees one


def test_launcher_size_check(monkeypatch):
    from hxn_ptycho.distributed import launcher_size
    for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert launcher_size() is None                            # not a task of srun
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert launcher_size() == 4
    monkeypatch.setenv("PMI_SIZE", "2")
    assert launcher_size() == 2


def test_beamline_verbs_name_the_missing_extra(tmp_path):
    """A compute-only install (simulated: bluesky and tiled hidden) gets one line naming the extra."""
    code = ("import sys, importlib.util as u; real = u.find_spec; "
            "u.find_spec = lambda n, *a: None if n.split('.')[0] in ('bluesky', 'tiled', 'matplotlib') else real(n, *a); "
            "from hxn_ptycho.cli import main; sys.exit(main(sys.argv[1:]))")
    for argv, extra in ((["listen", "--zmq", "x:1"], "beamline"), (["serve"], "beamline"),
                        (["results", "--scan-id", "1"], "beamline"),
                        (["reconstruct", "--scan-id", "1", "--catalog", "c"], "beamline"),
                        (["reconstruct", str(tmp_path / "s.h5"), "--png", "x.png"], "plots")):
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (argv, done.stderr)
        assert f"needs the '{extra}' extra" in done.stderr and f"pip install 'hxn-ptycho[{extra}]'" in done.stderr
        assert "Traceback" not in done.stderr


def test_gpu_pools_are_refused_with_the_slurm_launcher(tmp_path, capsys):
    pytest.importorskip("bluesky")
    from hxn_ptycho.cli import main
    assert main(["listen", "--zmq", "127.0.0.1:1", "--work-dir", str(tmp_path), "--launcher", "slurm",
                 "--gpu-pools", "0,1"]) == 2
    assert "--gpu-pools is for the local launcher" in capsys.readouterr().err
