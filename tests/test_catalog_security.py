"""The embedded catalog under restarts and misuse, with real ``tiled`` / ``hxn-ptycho serve`` processes.

Key kept across restarts (exported or not), the key never in a log, file modes, assets that
escape the readable folders through ``..`` or a symlink, a second server on the same folder.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import conftest_bluesky
import h5py
import numpy as np
import pytest
from conftest_bluesky import make_result, wait_for
from hxn_ptycho.callbacks import derived
from hxn_ptycho.callbacks.catalog import (
    CatalogError,
    CatalogInUse,
    EmbeddedServer,
    free_port,
    runs,
    wait_for_server,
)
from hxn_ptycho.callbacks.tiled_guard import AssetRefused, RedactingStream, check_asset

tiled_server = conftest_bluesky.tiled_server


def start_serve(directory: Path, port: int, log_path: Path, env_key: str | None) -> subprocess.Popen:
    """``hxn-ptycho serve --dir DIR --port P`` as a real process, with or without TILED_API_KEY exported."""
    env = dict(os.environ)
    env.pop("TILED_API_KEY", None)
    if env_key is not None:
        env["TILED_API_KEY"] = env_key
    argv = [sys.executable, "-m", "hxn_ptycho.callbacks.commands", "serve", "--dir", str(directory),
            "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
    wait_for(lambda: "Press Ctrl-C" in log_path.read_text(errors="replace") or proc.poll() is not None,
             90, what="hxn-ptycho serve to start")
    assert proc.poll() is None, log_path.read_text()
    wait_for_server(f"http://127.0.0.1:{port}", 30)
    return proc


def stop_serve(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def publish_one(catalog: str, result: Path, raw_uid: str) -> str:
    uid = derived.publish_result(catalog, str(result), raw_uid, {"scan_id": 3})
    assert runs(catalog, "processed")[uid].metadata["stop"]["exit_status"] == "success"
    return uid


@pytest.mark.slow     # ~20-35 s; the same path runs in the default suite's shorter tests
def test_key_kept_across_serve_restarts_exported_or_not(tmp_path, monkeypatch):
    """Restart ``serve`` with the key exported and without: a client holding the first key publishes after each."""
    cat, log_path = tmp_path / "cat", tmp_path / "serve.out"
    port = free_port()
    result = cat / "results" / "r.h5"
    monkeypatch.delenv("TILED_API_KEY", raising=False)

    proc = start_serve(cat, port, log_path, env_key=None)          # first start: a new key
    key = (cat / "api_key").read_text().strip()
    assert len(key) >= 32
    make_result(result)
    monkeypatch.setenv("TILED_API_KEY", key)                       # a listener that read the key once
    first = publish_one(f"http://127.0.0.1:{port}", result, "raw-1")
    stop_serve(proc)

    proc = start_serve(cat, port, log_path, env_key=key)            # restart in a shell that exported it
    assert (cat / "api_key").read_text().strip() == key
    publish_one(f"http://127.0.0.1:{port}", result, "raw-2")        # the old key still works: no 401
    stop_serve(proc)

    proc = start_serve(cat, port, log_path, env_key=None)           # restart with nothing exported
    assert (cat / "api_key").read_text().strip() == key
    monkeypatch.delenv("TILED_API_KEY")
    publish_one(str(cat), result, "raw-3")                          # the key from the folder's key file
    monkeypatch.setenv("TILED_API_KEY", key)
    publish_one(f"http://127.0.0.1:{port}", result, "raw-4")
    assert first in runs(str(cat), "processed")                     # the data survived the restarts
    # A URL carrying the key is logged by the access log: it must be redacted there too.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/metadata/?api_key={key}", timeout=10) as r:
        assert r.status == 200
    stop_serve(proc)

    server_log = (cat / "server.log").read_text(errors="replace")
    assert "api_key=***" in server_log                              # Tiled did print it; we redacted it
    assert "/api/v1/metadata/?api_key=***" in server_log            # and the access log line
    for name, text in (("server.log", server_log), ("serve output", log_path.read_text(errors="replace"))):
        assert key not in text, f"the API key appears in the {name}"


def test_catalog_files_are_owner_only(tmp_path, monkeypatch):
    """Folder 0700, key/database/log/lock 0600 — also for a catalog made with looser modes before."""
    cat = tmp_path / "cat"
    monkeypatch.delenv("TILED_API_KEY", raising=False)          # the key comes from the folder's key file
    with EmbeddedServer(cat):
        make_result(cat / "results" / "r.h5")
        derived.publish_result(str(cat), str(cat / "results" / "r.h5"), "raw-m", {})
    for f in ("catalog.db", "api_key", "server.log"):
        os.chmod(cat / f, 0o644)                   # as an older version left them
    os.chmod(cat, 0o755)
    with EmbeddedServer(cat):
        derived.publish_result(str(cat), str(cat / "results" / "r.h5"), "raw-m2", {})
        def mode(p):
            return stat.S_IMODE(p.stat().st_mode)
        assert mode(cat) == 0o700 and mode(cat / "data") == 0o700
        for f in ("catalog.db", "api_key", "server.log", "server.lock", "data/tables.sqlite"):
            assert mode(cat / f) == 0o600, f"{f} has mode {mode(cat / f):o}"
        # everything the server itself created (umask 077): nothing readable by group or others — a
        # derived run's arrays are served from the job's files, so an array is written here for the check
        from hxn_ptycho.callbacks.catalog import connect
        connect(str(cat)).write_array(np.arange(6.0), key="umask_check")
        made_by_server = list((cat / "data").rglob("*"))
        assert len(made_by_server) > 3
        loose = [f"{p} {mode(p):o}" for p in made_by_server if mode(p) & 0o077]
        assert not loose, loose


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    base = tmp_path_factory.mktemp("guarded")
    readable, outside = base / "readable", base / "outside"
    readable.mkdir()
    outside.mkdir()
    srv = EmbeddedServer(base / "cat", readable=(str(readable),)).start()
    res = make_result(readable / "r.h5")
    side = derived.write_sidecar(readable / "r.h5", res)
    secret = outside / "secret.h5"
    with h5py.File(side, "r") as src, h5py.File(secret, "w") as dst:
        for k in src:
            dst[k] = np.full_like(src[k][()], 42)
    try:
        yield srv, readable, secret, res
    finally:
        srv.stop()


def publish_with_uri(srv: EmbeddedServer, readable: Path, uri: str, label: str) -> str:
    docs = derived.result_documents(readable / "r.h5", "raw-" + label, {})
    for name, doc in docs:
        if name == "stream_resource":
            doc["uri"] = uri
    cfg = srv.config
    cfg.api_key = srv.api_key
    return derived.write_documents(cfg, docs)


def test_assets_escaping_the_readable_folders_are_refused(guarded):
    """Without our guard tiled 0.2.20 served all three of these escapes (checked by hand, see README)."""
    srv, readable, secret, res = guarded
    (readable / "link.h5").symlink_to(secret)
    cfg = srv.config
    escapes = {"dotdot": f"file://localhost{readable}/../outside/secret.h5",
               "symlink": (readable / "link.h5").as_uri(),
               "key file": (srv.directory / "api_key").as_uri(),
               "database": f"file://localhost{srv.directory}/data/../catalog.db"}
    for label, uri in escapes.items():
        with pytest.raises(CatalogError, match="403: refusing the asset"):
            publish_with_uri(srv, readable, uri, label)
    # a legitimate asset in a readable folder is still served
    uid = publish_with_uri(srv, readable, (Path(str(readable / "r.h5") + ".tiled.h5")).as_uri(), "good")
    from hxn_ptycho.callbacks.query import as_v3
    np.testing.assert_allclose(as_v3(runs(cfg, "processed")[uid])["primary"]["object"].read()[0], res.object,
                               rtol=1e-6)


def test_symlink_retargeted_after_registration_is_not_served(guarded):
    srv, readable, secret, res = guarded
    good = readable / "good.h5"
    os.link(str(readable / "r.h5") + ".tiled.h5", good)
    link = readable / "later.h5"
    link.symlink_to(good)                                            # inside: accepted
    uid = publish_with_uri(srv, readable, link.as_uri(), "later")
    url = f"{srv.uri}/api/v1/array/full/processed/{uid}/primary/positions_px?format=application/json"
    request = urllib.request.Request(url, headers={"Authorization": f"Apikey {srv.api_key}"})
    with urllib.request.urlopen(request, timeout=30) as r:           # served while it points inside
        np.testing.assert_allclose(np.asarray(json.loads(r.read()))[0], res.positions_px)
    link.unlink()
    link.symlink_to(secret)                                          # now it points outside
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 500                                    # the read fails: no bytes
    wait_for(lambda: f"refusing the asset {link.as_uri()}" in (srv.directory / "server.log").read_text(), 10,
             what="the guard's refusal in the server log")


def test_sql_table_asset_outside_the_server_is_refused(guarded, tmp_path):
    """tiled does not path-scope sqlite: assets at all; only the server's own tables database passes."""
    import sqlite3

    import pyarrow as pa
    from hxn_ptycho.callbacks.catalog import connect
    from tiled.structures.data_source import Asset, DataSource, Management
    from tiled.structures.table import TableStructure
    srv = guarded[0]
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as con:
        con.execute("create table t (x integer)")
    cfg = srv.config
    cfg.api_key = srv.api_key
    ds = DataSource(structure_family="table", structure=TableStructure.from_schema(pa.schema([("x", pa.int64())])),
                    mimetype="application/x-tiled-sql-table", management=Management.external,
                    assets=[Asset(data_uri=f"sqlite:///{other}", is_directory=False, parameter="data_uris")],
                    parameters={"table_name": "t", "dataset_id": 1})
    with pytest.raises(Exception, match="403: refusing the asset sqlite:.*only this server's own tabular database"):
        connect(cfg).new("table", [ds], key="not-ours")


def test_check_asset_normalises_paths(tmp_path):
    r = tmp_path / "r"
    (r / "sub").mkdir(parents=True)
    check_asset((r / "sub" / "x.h5").as_uri(), [str(r)])
    check_asset("postgresql://u@h/db", [str(r)])                      # not a file: not path-scoped
    for uri in (f"file://{r}/sub/../../x", f"file://{r}/../r2/x", f"file://{tmp_path}/r"):
        with pytest.raises(AssetRefused):
            check_asset(uri, [str(r / "sub") if uri.endswith("/r") else str(r)])
    with pytest.raises(AssetRefused, match="catalog's own files"):
        check_asset(f"file://{r}/sub/../key", [str(r)], secrets=[str(r / "key")])
    check_asset(f"sqlite:///{r}/sub/../t.sqlite", [str(r)], secrets=[str(r / "t.sqlite")], tables=[str(r / "t.sqlite")])
    for uri in (f"sqlite:///{r}/other.sqlite", f"duckdb:///{r}/t.sqlite/../x", f"sqlite+aiosqlite:///{r}/x"):
        with pytest.raises(AssetRefused, match="own tabular database"):
            check_asset(uri, [str(r)], tables=[str(r / "t.sqlite")])


def test_redacting_stream_splits_and_urls():
    import io
    out = io.StringIO()
    s = RedactingStream(out, ["SECRETKEY"])
    s.write("a SECRET")                     # a key split across writes is still caught
    s.write("KEY b\nGET /x?api_key=other&y=1\n")
    s.flush()
    assert out.getvalue() == "a *** b\nGET /x?api_key=***&y=1\n"


def test_second_server_on_a_served_folder_is_refused(tiled_server, tmp_path):
    with pytest.raises(CatalogInUse, match=f"process {tiled_server.proc.pid} at {tiled_server.uri}"):
        EmbeddedServer(tiled_server.directory).start()
    out = subprocess.run([sys.executable, "-m", "hxn_ptycho.callbacks.commands", "serve", "--dir",
                          str(tiled_server.directory)], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"already served by process {tiled_server.proc.pid} at {tiled_server.uri}" in out.stderr
    wait_for_server(tiled_server.uri, 5)                             # the first one is untouched


def test_killed_server_leaves_no_lock_and_an_old_log_is_scrubbed(tmp_path):
    """A log an older version wrote with the key in it is redacted before that key is reused;
    a server killed with SIGKILL leaves its lock file but not the lock."""
    cat = tmp_path / "cat"
    cat.mkdir()
    key = "0123456789abcdef" * 4
    (cat / "api_key").write_text(key + "\n")
    (cat / "server.log").write_text(f"old server: http://127.0.0.1:1?api_key={key}\n")
    srv = EmbeddedServer(cat).start()
    assert srv.api_key == key and key not in (cat / "server.log").read_text()
    os.killpg(srv.proc.pid, signal.SIGKILL)                          # no clean shutdown
    srv.proc.wait(10)
    assert (cat / "server.lock").exists()
    with EmbeddedServer(cat) as again:                               # the kernel dropped the lock
        assert again.api_key == key
    assert key not in (cat / "server.log").read_text()


def test_second_server_on_a_served_postgres_database_is_refused(tmp_path):
    """Another folder, the same PostgreSQL database: refused before anything starts, no password shown."""
    import fcntl
    import json as _json

    from hxn_ptycho.callbacks.catalog import _public_uri, database_lock_path
    db = "postgresql://hxn:s3cret@DB.example:5432/hxn_catalog"
    assert _public_uri(db) == "postgresql://hxn@db.example:5432/hxn_catalog"
    assert database_lock_path(db) == database_lock_path("postgresql+asyncpg://hxn:other@db.example:5432/hxn_catalog")
    path = database_lock_path(db)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)    # as a running server on this host holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _json.dumps({"pid": 4242, "uri": "http://127.0.0.1:9", "directory": "/srv/first"}).encode(), 0)
        with pytest.raises(CatalogInUse) as info:
            EmbeddedServer(tmp_path / "second", database=db).start()
        message = str(info.value)
        assert "the database postgresql://hxn@db.example:5432/hxn_catalog is already served by process 4242 " \
               "at http://127.0.0.1:9 (folder /srv/first)" in message
        assert "s3cret" not in message
        assert not (tmp_path / "second" / "server.log").exists()    # nothing was started
    finally:
        os.close(fd)
