"""Exactly once on every way in, and nothing trusted that should not be (issue 22; docs/trust.md).

Real processes throughout: a Tiled server, ``listen`` behind a 0MQ proxy, RunEngine recordings of the
simulated beamline, ``serve``, job subprocesses, the stored-run path of the Prefect flow in two
concurrent processes. Each case ends in exactly one derived run with the right status and a reason
naming the problem, or in a refusal naming it; the planted-file cases reach no server (a recording
HTTP server on 127.0.0.1 sees no request) and publish nothing.
"""
from __future__ import annotations

import http.server
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import conftest_bluesky
import pytest
from conftest_bluesky import make_result, wait_for
import test_faults
from test_faults import Listener, count_derived, one_derived, record, renamed, send

tiled_server = conftest_bluesky.tiled_server
proxy, publisher, small_sim = test_faults.proxy, test_faults.publisher, test_faults.small_sim   # the fixtures


@pytest.fixture(scope="module")
def trust_listener(tiled_server, proxy, tmp_path_factory):
    work = tiled_server.directory / "trust_work"
    lst = Listener(tiled_server, proxy[1], work, tmp_path_factory.mktemp("tlisten") / "listener.log").start()
    yield lst
    lst.stop()


@pytest.fixture(scope="module")
def docs(small_sim, tiled_server):
    """One recorded step scan whose detector files the catalog server may read."""
    return record(small_sim, tiled_server.directory / "det_trust")


class Recorder:
    """An HTTP server on 127.0.0.1 that records every request it gets (and answers 500)."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        seen = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                seen.append(f"{self.command} {self.path} {dict(self.headers)}")
                self.send_response(500)
                self.end_headers()
            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

            def log_message(self, *a) -> None:
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def recorder():
    r = Recorder()
    yield r
    r.close()


def _status(catalog, raw_uid: str) -> dict:
    md = one_derived(catalog, raw_uid, settle=0.5)
    return md["stop"]


# -- 2. positions and lost events -----------------------------------------------------------------

def test_one_position_field_and_a_lost_tail_without_num_events_each_fail_by_name(tiled_server, trust_listener,
                                                                                 publisher, docs):
    one_field = renamed(docs, ptycho_position_fields=["zpssx"])
    tail = renamed(docs)
    primary = next(d["uid"] for n, d in tail if n == "descriptor" and d.get("name") == "primary")
    tail = [(n, d) for n, d in tail if not (n == "event" and d["descriptor"] == primary and d["seq_num"] > 9)]
    tail[-1][1].pop("num_events")
    assert tail[0][1]["num_points"] == 12
    send(publisher, one_field)
    send(publisher, tail)
    stop = _status(tiled_server.config, one_field[0][1]["uid"])
    assert stop["exit_status"] == "fail"
    assert "ptycho_position_fields ['zpssx'] must name one x and one y field" in stop["reason"], stop
    stop = _status(tiled_server.config, tail[0][1]["uid"])
    assert stop["exit_status"] == "fail"
    assert "3 event(s) missing (seq_num 10, 11, 12)" in stop["reason"] and "num_points is 12" in stop["reason"], stop


# -- 3. truncated detector files --------------------------------------------------------------------

def _with_file(docs, path: Path):
    run = renamed(docs)
    for n, d in run:
        if n == "resource":
            d["root"], d["resource_path"] = str(path.parent), path.name
    return run


def _detector_file(docs) -> Path:
    res = next(d for n, d in docs if n == "resource")
    return Path(res["root"]) / res["resource_path"].lstrip("/")


@pytest.mark.parametrize("cut", [0.03, 0.5])
def test_truncated_detector_file_is_a_fail_naming_it(tiled_server, trust_listener, publisher, docs, tmp_path, cut):
    import shutil
    src = _detector_file(docs)
    copy = tmp_path / f"cut{int(cut * 100)}.h5"
    shutil.copy(src, copy)
    os.truncate(copy, int(copy.stat().st_size * (1 - cut)))
    run = _with_file(docs, copy)
    send(publisher, run)
    stop = _status(tiled_server.config, run[0][1]["uid"])
    assert stop["exit_status"] == "fail"
    assert f"detector file {copy} is truncated" in stop["reason"], stop


def test_truncated_file_reads_as_truncated_but_a_live_swmr_file_is_read(tmp_path):
    """The reader: a short file is refused by name; a file a SWMR writer holds open is read live."""
    import h5py
    import numpy as np

    from hxn_ptycho.callbacks import frames as fr
    whole = tmp_path / "whole.h5"
    with h5py.File(whole, "w") as f:
        f.create_dataset("d", data=np.ones((16, 48, 48), np.uint32))
    short = tmp_path / "short.h5"
    short.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.97)])
    src = fr.Source("k", [fr.Chunk(str(short), "d", 0, 16)])
    with pytest.raises(fr.Truncated, match="short.h5 is truncated: it holds"):
        fr.read(src, wait_s=0.3)
    assert fr.read(fr.Source("k", [fr.Chunk(str(whole), "d", 0, 16)]), wait_s=0).sum() == 16 * 48 * 48
    live = tmp_path / "live.h5"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import h5py, numpy as np, sys, time\n"
        f"f = h5py.File({str(live)!r}, 'w', libver='latest')\n"
        "d = f.create_dataset('d', shape=(0, 4, 4), maxshape=(None, 4, 4), chunks=(1, 4, 4), dtype='u4')\n"
        "f.swmr_mode = True\n"
        "d.resize((3, 4, 4)); d[:] = 2; f.flush(); print('ready', flush=True); time.sleep(30)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        assert fr.read(fr.Source("k", [fr.Chunk(str(live), "d", 0, 3)]), wait_s=0).sum() == 3 * 16 * 2
    finally:
        writer.kill()
        writer.wait()


# -- 5. paths from documents ------------------------------------------------------------------------

def test_a_document_naming_etc_passwd_is_refused_by_name(tiled_server, trust_listener, publisher, docs):
    run = renamed(docs)
    for n, d in run:
        if n == "resource":
            d["root"], d["resource_path"] = "/etc", "passwd"
    escape = renamed(docs)
    for n, d in escape:
        if n == "resource":
            d["resource_path"] = "../../../../../../../../etc/passwd"
    send(publisher, run)
    send(publisher, escape)
    stop = _status(tiled_server.config, run[0][1]["uid"])
    assert stop["exit_status"] == "fail"
    assert "the detector file /etc/passwd resolves to /etc/passwd, outside the data roots" in stop["reason"], stop
    stop = _status(tiled_server.config, escape[0][1]["uid"])
    assert stop["exit_status"] == "fail" and "outside its resource's root" in stop["reason"], stop


def test_data_roots_default_and_setting():
    from hxn_ptycho.callbacks.trust import data_roots, refuse_data_file
    roots = data_roots(["/data"])
    assert refuse_data_file("/data/2024/x.h5", roots) is None
    assert "outside the data roots" in refuse_data_file("/etc/passwd", roots)
    assert "outside its resource's root" in refuse_data_file("/data/a/../b/x.h5", roots, own_root="/data/a")
    assert "not a regular file" in refuse_data_file("/dev/zero", data_roots(["/dev"]))
    assert Path("/nsls2/data") in data_roots(None)


# -- 4. planted saved documents ------------------------------------------------------------------

def _planted(folder: Path, catalog: str, raw_uid: str, *, secret: bytes | None = None) -> Path:
    """A saved-documents file as someone without our publish secret would write it."""
    import hashlib
    import hmac

    from hxn_ptycho.callbacks import derived
    docs = derived.failure_documents(raw_uid, {}, "planted", uid=str(uuid.uuid4()))
    head = {"catalog": catalog, "uid": docs[0][1]["uid"], "saved": time.time()}
    lines = "".join(json.dumps([n, d]) + "\n" for n, d in docs)
    key = secret if secret is not None else os.urandom(32).hex().encode()
    head["hmac"] = hmac.new(key, derived._signed_text(head, lines).encode(), hashlib.sha256).hexdigest()
    path = folder / f"planted_{raw_uid}.docs.jsonl"
    path.write_text(json.dumps([derived.SAVED_HEADER, head]) + "\n" + lines)
    return path


def test_planted_saved_documents_reach_no_server_and_publish_nothing(tiled_server, trust_listener, recorder,
                                                                    tmp_path):
    """In the listener's own outbox: a file naming a recording server, one naming a planted config
    file (whose key file is a one-line secret) and one naming our catalog, each signed with a key that
    is not ours; the listener retries its outbox every second: nothing is sent, nothing published."""
    results = trust_listener.work / "results"
    secret_file = tmp_path / "one_line_secret"
    secret_file.write_text("s3cret-value-of-the-user\n")
    cfg = tmp_path / "planted_catalog.json"
    cfg.write_text(json.dumps({"uri": recorder.uri, "api_key_file": str(secret_file)}))
    planted = [_planted(results, recorder.uri, "planted-url"), _planted(results, str(cfg), "planted-cfg"),
               _planted(results, str(tiled_server.directory), "planted-ours")]
    wait_for(lambda: trust_listener.text().count("refusing saved documents") >= 9, 60,
             what="three rounds of refusals in the listener's log")
    assert recorder.requests == []
    for raw in ("planted-url", "planted-cfg", "planted-ours"):
        assert count_derived(tiled_server.config, raw) == []
    assert "their signature does not match the publish secret" in trust_listener.text()
    assert all(p.exists() for p in planted)                 # left for a person to look at
    for p in planted:
        p.unlink()


def test_serve_republishes_only_what_we_signed(tmp_path, monkeypatch, recorder):
    """``serve --read DIR``: a planted file without a secret of ours, one with a planted world-readable
    secret, and a genuine saved run (our secret): only the genuine one is published."""
    from hxn_ptycho.callbacks import derived
    from hxn_ptycho.callbacks.catalog import CatalogError, read_key_file
    from hxn_ptycho.spec import JobSpec, Source
    from test_faults import _serve

    cat, shared, log = tmp_path / "cat", tmp_path / "shared", tmp_path / "serve.log"
    (shared / "drop").mkdir(parents=True)
    (shared / "open").mkdir(parents=True)
    (shared / "work" / "results").mkdir(parents=True)
    proc = _serve(cat, shared, log, key=None)
    key = read_key_file(cat / "api_key")
    monkeypatch.setenv("TILED_API_KEY", key)
    proc.terminate()
    assert proc.wait(30) == 0
    spec = JobSpec(source=Source(scan_file="s.h5", result_file=str(shared / "work" / "results" / "r.h5"),
                                 raw_uid="raw-genuine", catalog=str(cat)))
    with pytest.raises(CatalogError, match="saved in"):
        derived.publish_outcome(spec, None, reason="genuine", uid=derived.run_uid(spec))
    secret = shared / "work" / "results" / ".hxn_ptycho_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    _planted(shared / "drop", str(cat), "planted-nosecret")
    open_secret = shared / "open" / ".hxn_ptycho_secret"
    open_secret.write_bytes(os.urandom(32).hex().encode())
    os.chmod(open_secret, 0o644)
    _planted(shared / "open", str(cat), "planted-open", secret=open_secret.read_bytes())
    _planted(shared / "work" / "results", recorder.uri, "planted-url")
    proc = _serve(cat, shared, log, key=key)
    try:
        md = one_derived(str(cat), "raw-genuine")
        assert md["stop"]["reason"] == "genuine"
        wait_for(lambda: "not sent" in log.read_text(), 30, what="serve to log its refusals")
        text = log.read_text()
        assert "no publish secret" in text and "readable or writable by others (mode 644)" in text, text[-3000:]
        for raw in ("planted-nosecret", "planted-open", "planted-url"):
            assert count_derived(str(cat), raw) == []
        assert recorder.requests == []
    finally:
        proc.terminate()
        proc.wait(30)


# -- 7. tampered results ---------------------------------------------------------------------------

def _job(tmp_path: Path, name: str, catalog: str, raw_uid: str):
    """Run a real one-rank job (``python -m hxn_ptycho.job SPEC``): (spec, outcome)."""
    from hxn_ptycho.job import outcome_path, read_outcome
    from hxn_ptycho.simulate import simulate_scan, write_simulation
    from hxn_ptycho.spec import Geometry, JobSpec, Source
    scan = tmp_path / f"{name}_scan.h5"
    write_simulation(scan, *simulate_scan(n=32, n_positions=12, seed=3))
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    spec = JobSpec(source=Source(scan_file=str(scan), result_file=str(results / f"{name}.h5"), raw_uid=raw_uid,
                                 catalog=catalog), geometry=Geometry.from_scan_file(scan))
    spec.params.iterations = 2
    spec_file = spec.write(tmp_path / f"{name}.spec.json")
    env = {k: v for k, v in os.environ.items() if k != "TILED_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "hxn_ptycho.job", str(spec_file)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return spec, read_outcome(outcome_path(spec_file))


def test_a_result_or_outcome_swapped_after_the_job_is_not_published(tiled_server, tmp_path, monkeypatch):
    from hxn_ptycho.callbacks import derived
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    cat = str(tiled_server.directory)
    work = tiled_server.directory / "trust_tamper"
    work.mkdir()
    a, out_a = _job(work, "a", cat, "tamper-result")
    b, out_b = _job(work, "b", cat, "tamper-outcome")
    assert out_a["result_sha256"] and out_a["status"] == "success"
    # the result swapped for another valid result file
    make_result(a.source.result_file, iterations=3)
    uid = derived.publish_outcome(a, out_a, uid=derived.run_uid(a))
    stop = one_derived(tiled_server.config, "tamper-result", settle=0)["stop"]
    assert stop["exit_status"] == "fail" and "changed after the job wrote it" in stop["reason"], stop
    assert uid == derived.run_uid(a)
    # job b's outcome record swapped for job a's (a success, with a true digest of a's file)
    make_result(a.source.result_file, iterations=3)
    forged = dict(out_a, result_sha256=__import__("hxn_ptycho.h5util", fromlist=["x"]).file_sha256(
        a.source.result_file))
    derived.publish_outcome(b, forged, uid=derived.run_uid(b))
    stop = one_derived(tiled_server.config, "tamper-outcome", settle=0)["stop"]
    assert stop["exit_status"] == "fail" and f"not this job's result {b.source.result_file}" in stop["reason"], stop


def test_the_result_is_hashed_once_and_rewritten_results_are_still_refused(tmp_path, monkeypatch):
    """The publisher does not read a result the job hashed (its fingerprint still matches); a result
    rewritten in place (same size, same name) or swapped afterwards is hashed again and refused."""
    from hxn_ptycho import h5util
    from hxn_ptycho.callbacks.trust import Untrusted, check_result
    path = tmp_path / "r.h5"
    make_result(path, iterations=4)
    digest, stat_ = h5util.file_sha256_fingerprint(path)
    assert stat_ is not None and digest == h5util.file_sha256(path)
    outcome = {"status": "success", "result_file": str(path), "result_sha256": digest, "result_stat": stat_}
    reads = []
    real = h5util.file_sha256
    monkeypatch.setattr(h5util, "file_sha256", lambda p: reads.append(p) or real(p))
    check_result(path, outcome)
    assert reads == []                                     # hashed once: by the job
    check_result(path, {k: v for k, v in outcome.items() if k != "result_stat"})
    assert len(reads) == 1                                 # an outcome without a fingerprint: hashed, accepted
    time.sleep(0.05)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    with open(path, "r+b") as f:                           # in place: same inode, same size
        f.write(data)
    with pytest.raises(Untrusted, match="changed after the job wrote it"):
        check_result(path, outcome)
    assert len(reads) == 2
    make_result(path, iterations=4)                         # swapped for an equal file: new inode, same bytes
    check_result(path, outcome)                             # hashed, and its digest is the job's
    assert len(reads) == 3


# -- 8. runs with no record ----------------------------------------------------------------------

def test_lost_start_stop_without_status_and_bool_scan_id_are_each_recorded_once(tiled_server, trust_listener,
                                                                                 publisher, docs, monkeypatch):
    from hxn_ptycho.callbacks.catalog import tiled_writer
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    lost = renamed(docs)
    writer = tiled_writer(tiled_server.config, "raw", max_array_size=0)
    for n, d in lost:                                  # the catalog got the whole run...
        writer(n, d)
    send(publisher, lost[1:])                          # ...the listener all but its start
    no_status = renamed(docs)
    no_status[-1][1].pop("exit_status")
    boolean = renamed(docs, scan_id=True)
    send(publisher, no_status)
    send(publisher, boolean)
    stop = _status(tiled_server.config, lost[0][1]["uid"])
    assert stop["exit_status"] == "fail" and "its start document never reached the callback" in stop["reason"]
    stop = _status(tiled_server.config, no_status[0][1]["uid"])
    assert stop["exit_status"] == "fail" and "its stop document has no exit_status" in stop["reason"], stop
    md = one_derived(tiled_server.config, boolean[0][1]["uid"])
    assert md["stop"]["exit_status"] == "success", md["stop"]
    assert md["start"]["recon"]["source"]["scan_id"] is None


# -- 1. the stored-run path of the Prefect flow, delivered twice at once ----------------------------

ONCE = r"""
import json, sys
from hxn_ptycho.callbacks.commands import reconstruct_stored_once
from hxn_ptycho.params import ReconParams
status, outcome, uid = reconstruct_stored_once(sys.argv[1], sys.argv[2], params=ReconParams(iterations=2))
print(json.dumps({"status": status, "uid": uid, "reason": outcome.get("reason")}))
"""


def _deliver_twice(server, uid: str) -> list[dict]:
    env = dict(os.environ, TILED_API_KEY=server.api_key, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", ONCE, str(server.directory), uid], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    out = []
    for p in procs:
        o, e = p.communicate(timeout=300)
        assert o.strip(), e[-3000:]
        out.append(json.loads(o.strip().splitlines()[-1]))
    return out


def test_stored_run_delivered_twice_at_once_gets_one_derived_run(tiled_server, docs, monkeypatch):
    from hxn_ptycho.callbacks.catalog import tiled_writer
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    good = renamed(docs, ptycho_crop=32)
    bad = renamed(docs, ptycho_center=[5])             # cannot be exported
    writer = tiled_writer(tiled_server.config, "raw", max_array_size=0)
    for run in (good, bad):
        for n, d in run:
            writer(n, d)
    for run, status in ((good, "success"), (bad, "fail")):
        uid = run[0][1]["uid"]
        got = _deliver_twice(tiled_server, uid)
        assert got[0]["uid"] == got[1]["uid"], got
        md = one_derived(tiled_server.config, uid)
        assert md["stop"]["exit_status"] == status, md["stop"]
        assert md["start"]["uid"] == got[0]["uid"]
        if status == "fail":
            assert md["stop"]["reason"].startswith(("cannot be reconstructed: ", "cannot build the scan file: ")), \
                md["stop"]
        again = _deliver_twice(tiled_server, uid)          # a third and fourth delivery: found complete
        assert {g["uid"] for g in again} == {got[0]["uid"]}
        assert len(count_derived(tiled_server.config, uid)) == 1


# -- 6 and 10. the job's limits and leftovers; SIGTERM -------------------------------------------------

def test_hung_job_is_ended_at_its_time_limit_and_recorded(tiled_server, docs, tmp_path):
    from bluesky.callbacks.zmq import Publisher

    from hxn_ptycho.callbacks.catalog import free_port
    port_in, port_out = free_port(), free_port()           # a proxy of its own: no other listener hears it
    relay = subprocess.Popen([str(Path(sys.executable).with_name("bluesky-0MQ-proxy")), str(port_in), str(port_out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pub = Publisher(f"127.0.0.1:{port_in}")
    lst = Listener(tiled_server, port_out, tiled_server.directory / "trust_hung", tmp_path / "hung.log",
                   extra=["--time-limit", "2", "--iterations", "100000"]).start()
    try:
        run = renamed(docs)
        send(pub, run)
        stop = one_derived(tiled_server.config, run[0][1]["uid"], timeout=120)["stop"]
        assert stop["exit_status"] == "fail"
        assert "the job ran past its time limit of 2 s (set by --time-limit) and was ended" in stop["reason"], stop
        assert stat.S_IMODE(lst.work.stat().st_mode) == 0o700
        assert stat.S_IMODE((lst.work / "results").stat().st_mode) == 0o700
    finally:
        lst.proc.send_signal(signal.SIGTERM)               # SIGTERM ends listen as Ctrl-C does
        assert lst.proc.wait(60) == 0, lst.text()[-3000:]
        pub._context.destroy(linger=0)
        relay.terminate()
        relay.wait(10)
    assert "Traceback" not in lst.text() and "listener stopping (SIGTERM)" in lst.text()


def test_default_time_limit_grows_with_the_scan():
    from hxn_ptycho.callbacks.trust import job_time_limit
    from hxn_ptycho.spec import Geometry, JobSpec
    small, big = JobSpec(geometry=Geometry(n_views=100)), JobSpec(geometry=Geometry(n_views=10_000))
    small.params.iterations = big.params.iterations = 200
    assert job_time_limit(small) == 900 + 0.05 * 100 * 200
    assert job_time_limit(big) == 900 + 0.05 * 10_000 * 200
    assert job_time_limit(big, 60) == 60


KILLED_RANK0 = r"""
import os, pathlib, signal, sys
result = pathlib.Path(sys.argv[1])
(result.parent / f".{result.name}.abc123.part").write_bytes(b"half a result")
open(sys.argv[2], "w").write("\n".join(sorted(os.environ)))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_rank0_killed_leaves_no_part_file_and_jobs_get_no_api_key(tmp_path, monkeypatch):
    from hxn_ptycho.callbacks.launcher import Job, JobQueue
    from hxn_ptycho.spec import JobSpec, Source
    monkeypatch.setenv("TILED_API_KEY", "the-catalog-key")
    result = tmp_path / "results" / "r.h5"
    result.parent.mkdir()
    env_dump = tmp_path / "env.txt"
    failures: list[str] = []
    q = JobQueue(tmp_path / "queue", command=lambda job: [sys.executable, "-c", KILLED_RANK0, str(result),
                                                          str(env_dump)],
                 publish=None, on_failure=lambda job, why: failures.append(why)).start()
    try:
        q.submit(Job.of(JobSpec(source=Source(scan_file="s.h5", result_file=str(result), raw_uid="r"))))
        assert q.wait_idle(60)
    finally:
        q.stop()
    assert failures and "exited with status -9" in failures[0], failures
    assert not list(result.parent.glob("*.part"))
    names = env_dump.read_text().split()
    assert "PATH" in names and "TILED_API_KEY" not in names
    assert stat.S_IMODE((tmp_path / "queue").stat().st_mode) == 0o700


def test_cli_reconstruct_of_a_run_it_cannot_export_records_one_fail(tiled_server, docs, monkeypatch):
    """``hxn-ptycho reconstruct --uid U``: exit status 2 naming the problem, and one ``fail`` derived run."""
    from hxn_ptycho.callbacks.catalog import tiled_writer
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    bad = renamed(docs, ptycho_position_fields=["zpssx"])
    writer = tiled_writer(tiled_server.config, "raw", max_array_size=0)
    for n, d in bad:
        writer(n, d)
    uid = bad[0][1]["uid"]
    done = subprocess.run([sys.executable, "-m", "hxn_ptycho.cli", "reconstruct", "--uid", uid, "--catalog",
                           str(tiled_server.directory), "--iterations", "2"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TILED_API_KEY=tiled_server.api_key), check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "must name one x and one y field" in done.stderr and "recorded as the fail derived run" in done.stderr
    stop = one_derived(tiled_server.config, uid)["stop"]
    assert stop["exit_status"] == "fail" and "must name one x and one y field" in stop["reason"], stop
