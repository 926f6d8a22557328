"""The embedded server's guards that need no server: where SQLite may keep a write-ahead log
(guard 4), and FastAPI's dependants built once per form instead of at every request (guard 5)."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest
from hxn_ptycho.callbacks import tiled_guard

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:50 / /nsls2/data rw,relatime - nfs4 server:/export rw,vers=4.2
41 40 0:51 / /nsls2/data/hxn/local\\040disk rw,relatime - xfs /dev/sdb rw
42 27 0:52 / /gpfs rw,relatime - gpfs gpfs0 rw
"""


@pytest.mark.parametrize("path, kind, safe", [
    ("/tmp/catalog/catalog.db", "ext4", True),
    ("/nsls2/data/hxn/proposals/catalog.db", "nfs4", False),
    ("/nsls2/data/hxn/local disk/catalog.db", "xfs", True),             # an escaped mount point, deeper
    ("/nsls2/data/hxn/local disk2/catalog.db", "nfs4", False),          # a name that only begins the same
    ("/gpfs/hxn/catalog.db", "gpfs", False),
])
def test_file_system_type_and_where_wal_is_safe(path, kind, safe, monkeypatch):
    monkeypatch.setattr(tiled_guard, "_real", lambda p: p)
    assert tiled_guard.file_system_type(path, MOUNTINFO) == kind
    assert (kind in tiled_guard.LOCAL_FILE_SYSTEMS) is safe


def test_a_sqlite_file_switches_to_wal_only_where_it_is_safe(tmp_path, monkeypatch):
    def mode(path):
        with sqlite3.connect(path) as conn:
            return conn.execute("PRAGMA journal_mode").fetchone()[0]
    remote, local = tmp_path / "remote.sqlite", tmp_path / "local.sqlite"
    monkeypatch.setattr(tiled_guard, "wal_is_safe", lambda p: p == str(local))
    for path in (remote, local):
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE t (x INTEGER)")
        conn.close()
        tiled_guard._file_wal(str(path))
    assert mode(remote) == "delete" and mode(local) == "wal"
    assert tiled_guard.wal_is_safe(str(tmp_path)) in (True, False)       # this machine's answer, whatever it is


def test_dependants_are_built_once_and_overrides_still_apply():
    """In a fresh process (the guard patches FastAPI): an app with an overridden dependency, as
    Tiled has; after the first request the sub-dependants come from the cache, and every request
    still gets the override's value and its own parameters."""
    code = textwrap.dedent("""
        from fastapi import Depends, FastAPI
        from fastapi.testclient import TestClient
        from fastapi.dependencies import utils
        from hxn_ptycho.callbacks import tiled_guard

        tiled_guard._dependants_once()

        def settings():
            return "default"

        def user(token: str = "anon", s: str = Depends(settings)):
            return f"{token}@{s}"

        app = FastAPI()

        @app.get("/hello/{name}")
        def hello(name: str, who: str = Depends(user)):
            return {"name": name, "who": who}

        app.dependency_overrides[settings] = lambda: "override"
        client = TestClient(app)
        cache = utils.get_dependant.hxn_ptycho_cache
        assert client.get("/hello/a", params={"token": "t1"}).json() == {"name": "a", "who": "t1@override"}
        size = len(cache)
        assert size >= 1, cache
        for i in range(5):
            assert client.get(f"/hello/b{i}", params={"token": f"t{i}"}).json() == {"name": f"b{i}", "who": f"t{i}@override"}
        assert len(cache) == size                                   # nothing built again
        print("ok", size)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stdout + done.stderr
