"""Concurrent writers on the embedded (SQLite) catalog: the RunEngine's raw TiledWriter and our
derived-run publisher write tables at the same time. Without the guard's busy timeout
(``tiled_guard``, guard 3: one pooled connection, a busy timeout) SQLite refuses the second writer
(``database is locked``): the server answers 500, and a node half-created that way answers the
client's retry with 409 (seen in CI, raised by the raw TiledWriter inside the RunEngine's
``close_run``). A busy timeout alone is not enough: table creation reads, then writes, in one
transaction, which SQLite refuses at once when another connection wrote in between. The same
writers with the files in WAL mode (guard 4, a local disk)."""
from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
from hxn_ptycho.callbacks.catalog import EmbeddedServer, connect

WRITERS, TABLES, APPENDS = 6, 6, 6


def hammer(cfg, w: int, errors: list) -> None:
    try:
        client = connect(cfg)
        node = client.create_container(key=f"writer{w}")
        for t in range(TABLES):
            batch = pa.record_batch({"x": np.arange(50, dtype=np.float64), "w": np.full(50, w)})
            table = node.create_appendable_table(batch.schema, key=f"t{t}")
            for _ in range(APPENDS):
                table.append_partition(0, pa.Table.from_batches([batch]))
    except Exception as exc:  # noqa: BLE001 - collected and asserted below
        errors.append(f"writer {w}: {type(exc).__name__}: {exc}")


def test_concurrent_table_writers_wait_for_the_sqlite_lock(tmp_path):
    server = EmbeddedServer(tmp_path / "cat").start()
    try:
        errors: list[str] = []
        threads = [threading.Thread(target=hammer, args=(server.config, w, errors)) for w in range(WRITERS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
        assert not errors, errors
        client = connect(server.config)
        for w in range(WRITERS):
            for t in range(TABLES):
                assert len(client[f"writer{w}"][f"t{t}"].read()) == 50 * APPENDS
        log = server.log_file.read_text(errors="replace")
        assert "database is locked" not in log, log[-3000:]
        # guard 4: on this local disk both SQLite files keep a write-ahead log (one sync per commit)
        import sqlite3
        for db in (server.directory / "catalog.db", server.directory / "data" / "tables.sqlite"):
            with sqlite3.connect(db) as conn:
                assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal", db
        assert "stays in rollback-journal mode" not in log, log[-3000:]
    finally:
        server.stop()
