"""``python -m hxn_ptycho.callbacks.tiled_guard serve catalog ...``: ``tiled`` with two guards added.

:class:`~.catalog.EmbeddedServer` starts Tiled through this module, which adds what tiled 0.2.x
does not do (checked against a real server in ``tests/test_catalog_security.py``):

1. **The API key never reaches a log.** ``tiled serve catalog`` prints
   ``http://HOST:PORT?api_key=KEY`` to stderr whenever the key did not come from ``--api-key``
   (and a key on the command line would be visible to every user in ``ps``). Here the key comes
   in the environment (``TILED_SINGLE_USER_API_KEY``) and ``sys.stdout``/``sys.stderr`` are
   wrapped so that the key, and any ``api_key=...`` in a logged URL, is replaced by ``***``
   before a line is written.
2. **File assets outside the readable folders are refused, after normalising ``..`` and
   symlinks.** Tiled's check (``CatalogNodeAdapter._ensure_uri_within_readable_storage``,
   tiled/catalog/adapter.py) compares ``os.path.commonpath`` of the *unresolved* paths, so
   ``file://<readable>/../secret`` or a symlink inside a readable folder serves any file the
   server can read. Here every ``file://`` asset is resolved with ``os.path.realpath`` and must lie
   in a readable folder (``HXN_PTYCHO_READABLE``, resolved the same way) and outside the
   catalog's own secrets (``HXN_PTYCHO_SECRETS``: the key file, the database, the log, the lock).
   A ``sqlite:``/``duckdb:`` asset must be the server's own tabular database
   (``HXN_PTYCHO_TABLES``): tiled does not path-scope those at all. The check runs when an asset
   is registered (the write is refused with 403), when it is read, and when its bytes are
   downloaded.

3. **Writers to the SQLite tables take turns instead of failing.** Tiled's embedded SQL storage
   (``tiled/storage.py``, ``EmbeddedSQLStorage``) pools up to 15 ADBC connections to
   ``data/tables.sqlite``, with SQLite's default busy timeout of 0. Two concurrent writes — the
   RunEngine's raw ``TiledWriter`` appending a stream while our publisher writes a derived run —
   then fail with ``database is locked`` (HTTP 500; a node half-created that way answers the
   client's retry with 409, and the raw writer raises in the RunEngine's ``close_run``: seen in
   CI). A busy timeout alone does not cure it: tiled's table creation reads, then writes, in one
   transaction, and SQLite refuses such an upgrade at once when another connection wrote in
   between. Here the pool holds one connection (requests wait for it, as SQLite would serialise
   the writers anyway), and it waits :data:`SQLITE_BUSY_MS` for a lock held by any other process.

4. **The SQLite files keep a write-ahead log where that is safe.** Tiled means its SQLite catalog
   to run in WAL mode (``tiled/catalog/core.py``, ``initialize_database``), but its
   ``PRAGMA journal_mode=WAL`` runs inside a transaction, where SQLite ignores it: the catalog
   stays in rollback-journal mode, and every write request commits with four syncs (the journal
   twice, the database, the folder), an unlink and a copy of every page it changes — most of a
   derived run's publish on a slow disk (docs/quick-answers.md). Here each new connection to
   ``catalog.db`` or the tables' SQLite file switches it to WAL with ``synchronous=FULL`` (one sync
   per commit, the log; as durable as before) — only where the file lies on a local file system
   (:data:`LOCAL_FILE_SYSTEMS`, read from ``/proc/self/mountinfo``): SQLite's WAL needs shared
   memory that network file systems (NFS, CIFS, Lustre, GPFS...) do not give, so a catalog there
   keeps its rollback journal.
5. **FastAPI's dependants are built once** (speed): with Tiled's dependency override FastAPI
   rebuilds every sub-dependency's dependant at every request; the one built for the same
   arguments is reused (:func:`_dependants_once`).

If the Tiled functions patched here are missing (a Tiled version with another layout), the
server refuses to start rather than run unguarded.
"""
from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

ENV_READABLE = "HXN_PTYCHO_READABLE"
ENV_SECRETS = "HXN_PTYCHO_SECRETS"
ENV_TABLES = "HXN_PTYCHO_TABLES"
ENV_KEY = "TILED_SINGLE_USER_API_KEY"
SQLITE_BUSY_MS = 60_000          # how long a write to the SQLite tables waits for the lock
_API_KEY_IN_URL = re.compile(r"(api_key=)[^&\s\"']+")


class AssetRefused(PermissionError):
    """A file asset resolves outside the readable folders, or onto one of the catalog's secrets."""


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def asset_path(uri: str) -> str | None:
    """The local path of a ``file:`` URI (None for other schemes)."""
    parts = urlsplit(uri)
    if parts.scheme != "file":
        return None
    return unquote(parts.path)


def database_path(uri: str) -> str | None:
    """The file of a ``sqlite:``/``duckdb:`` URI (as tiled.utils.path_from_uri reads it), else None."""
    parts = urlsplit(uri)
    if parts.scheme.split("+")[0] not in ("sqlite", "duckdb"):
        return None
    return unquote(parts.path[1:])


def check_asset(uri: str, readable: Iterable[str], secrets: Iterable[str] = (), tables: Iterable[str] = ()) -> None:
    """Raise :class:`AssetRefused` unless the ``file:`` ``uri`` resolves inside ``readable`` and off ``secrets``.

    A ``sqlite:``/``duckdb:`` asset must be one of the server's own tabular databases (``tables``);
    other schemes (PostgreSQL...) are not files and are not checked.
    """
    db = database_path(uri)
    if db is not None:
        if not any(_real(db) == _real(t) for t in tables):
            raise AssetRefused(f"refusing the asset {uri}: only this server's own tabular database may be "
                               "registered as a SQL table")
        return
    path = asset_path(uri)
    if path is None:
        return
    real = _real(path)
    for secret in secrets:
        if _within(real, _real(secret)):
            raise AssetRefused(f"refusing the asset {uri}: it resolves to {real}, one of the catalog's own files")
    roots = [_real(r) for r in readable]
    if not any(_within(real, r) for r in roots):
        raise AssetRefused(f"refusing the asset {uri}: it resolves to {real}, outside the readable storage "
                           f"({', '.join(roots)}); serve the catalog with --read {os.path.dirname(real)}")


def _env_paths(name: str) -> list[str]:
    return [p for p in os.environ.get(name, "").split(os.pathsep) if p]


class RedactingStream(io.TextIOBase):
    """A text stream that writes whole lines to ``target`` with every secret replaced by ``***``."""

    def __init__(self, target: io.TextIOBase, secrets: Iterable[str]) -> None:
        super().__init__()
        self._target = target
        self._secrets = [s for s in secrets if s]
        self._buffer = ""

    def _clean(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return _API_KEY_IN_URL.sub(r"\1***", text)

    def write(self, text: str) -> int:
        self._buffer += text
        if "\n" in self._buffer:
            lines, self._buffer = self._buffer.rsplit("\n", 1)
            self._target.write(self._clean(lines + "\n"))
            self._target.flush()
        return len(text)

    def flush(self) -> None:
        if self._buffer:
            self._target.write(self._clean(self._buffer))
            self._buffer = ""
        self._target.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # some libraries ask; writing to the fd directly would bypass us
        raise io.UnsupportedOperation("fileno")

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", "utf-8")


def install() -> None:
    """Wrap stdout/stderr and patch Tiled's asset checks (see the module docstring)."""
    key = os.environ.get(ENV_KEY, "")
    sys.stdout = RedactingStream(sys.stdout, [key])
    sys.stderr = RedactingStream(sys.stderr, [key])

    readable, secrets, tables = _env_paths(ENV_READABLE), _env_paths(ENV_SECRETS), _env_paths(ENV_TABLES)
    if not readable:
        raise SystemExit(f"tiled_guard: {ENV_READABLE} is empty; refusing to serve without readable folders")

    from fastapi import HTTPException
    from tiled.catalog.adapter import CatalogNodeAdapter
    from tiled.server import router

    missing = [name for name, obj in (("_ensure_uri_within_readable_storage", CatalogNodeAdapter),
                                      ("_put_asset", CatalogNodeAdapter), ("path_from_uri", router))
               if not hasattr(obj, name)]
    if missing:
        raise SystemExit(f"tiled_guard: this Tiled version has no {missing}; refusing to serve unguarded")

    upstream_read_check = CatalogNodeAdapter._ensure_uri_within_readable_storage
    upstream_put_asset = CatalogNodeAdapter._put_asset
    upstream_path_from_uri = router.path_from_uri

    def read_check(self, data_uri):  # type: ignore[no-untyped-def]
        try:
            check_asset(data_uri, readable, secrets, tables)
        except AssetRefused as exc:
            raise RuntimeError(str(exc)) from None       # as upstream: the read fails
        return upstream_read_check(self, data_uri)

    async def put_asset(self, db, asset):  # type: ignore[no-untyped-def]
        try:
            check_asset(asset.data_uri, readable, secrets, tables)
        except AssetRefused as exc:
            raise HTTPException(status_code=403, detail=str(exc)) from None
        return await upstream_put_asset(self, db, asset)

    def path_from_uri(uri):  # type: ignore[no-untyped-def]
        try:
            check_asset(str(uri), readable, secrets, tables)
        except AssetRefused as exc:
            raise HTTPException(status_code=403, detail=str(exc)) from None
        return upstream_path_from_uri(uri)

    CatalogNodeAdapter._ensure_uri_within_readable_storage = read_check
    CatalogNodeAdapter._put_asset = put_asset
    router.path_from_uri = path_from_uri
    _sqlite_writers_wait()
    _catalog_wal()
    _dependants_once()


# file systems on which SQLite's write-ahead log is safe (one host, shared memory): guard 4
LOCAL_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs", "zfs", "bcachefs",
                                "tmpfs", "overlay"})
_MOUNT_ESCAPE = re.compile(r"\\([0-7]{3})")


def file_system_type(path: str, mountinfo: str | None = None) -> str | None:
    """The type of the file system that holds ``path`` (its deepest mount point in
    ``/proc/self/mountinfo``, or the text ``mountinfo``); None where it cannot be told."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo") as f:
                mountinfo = f.read()
        except OSError:
            return None
    real, best, kind = _real(path), None, None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        mount = _MOUNT_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        if _within(real, mount) and (best is None or len(mount) >= len(best)):
            best, kind = mount, right.split()[0]
    return kind


def wal_is_safe(path: str) -> bool:
    """Whether the SQLite file ``path`` may keep a write-ahead log: it lies on a local file system."""
    return file_system_type(path) in LOCAL_FILE_SYSTEMS


def _sqlite_wal(cur: object, path: str | None) -> None:
    """Switch the SQLite database of cursor ``cur`` (file ``path``; no transaction open) to WAL,
    ``synchronous=FULL``, where :func:`wal_is_safe`; a switch that cannot be made now (another
    connection holds the file) is left to the next connection."""
    if not path or path == ":memory:" or not wal_is_safe(path):
        return
    try:
        for pragma in ("journal_mode = WAL", "synchronous = FULL"):
            cur.execute(f"PRAGMA {pragma}")  # type: ignore[attr-defined]
            cur.fetchall()  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - a busy file: rollback journal until the next connection
        print(f"tiled_guard: {path} stays in rollback-journal mode for now ({exc})", file=sys.stderr)


def _file_wal(path: str | None) -> None:
    """Switch the SQLite file ``path`` to WAL (a setting kept in the file) before a connection that
    cannot switch it opens it: ADBC's connections are always inside a transaction."""
    if not path or path == ":memory:" or not wal_is_safe(path):
        return
    import sqlite3
    conn = sqlite3.connect(path, timeout=SQLITE_BUSY_MS / 1000, isolation_level=None)
    try:
        _sqlite_wal(conn.cursor(), path)
    finally:
        conn.close()


def _catalog_wal() -> None:
    """Guard 4 for the catalog database: each new SQLite connection of Tiled's pool (after Tiled's
    own ``PRAGMA foreign_keys``) switches its file to WAL where :func:`wal_is_safe`."""
    from tiled.server import connection_pool
    upstream = getattr(connection_pool, "_set_sqlite_pragma", None)
    if upstream is None:
        raise SystemExit("tiled_guard: this Tiled version has no connection_pool._set_sqlite_pragma; "
                         "refusing to serve a SQLite catalog without a known journal mode")

    def set_sqlite_pragma(conn, record):  # type: ignore[no-untyped-def]
        upstream(conn, record)
        cur = conn.cursor()
        try:
            cur.execute("PRAGMA database_list")
            path = next((row[2] for row in cur.fetchall() if row[1] == "main"), None)
            _sqlite_wal(cur, path)
        finally:
            cur.close()

    connection_pool._set_sqlite_pragma = set_sqlite_pragma


def _dependants_once() -> None:
    """Guard 5 (speed): the dependants of a request built once, not at every request.

    Tiled overrides one FastAPI dependency (``get_settings``). With any override set, FastAPI's
    ``solve_dependencies`` builds the dependant of *every* sub-dependency again at every request
    (``get_dependant(path=, call=, name=, parent_oauth_scopes=, scope=)``, which inspects each
    callable's signature, its string annotations evaluated): about half of the server's CPU time
    for a small request (docs/quick-answers.md). Those arguments determine the dependant, so the one
    built for them is kept and reused, as FastAPI reuses its dependants when nothing is overridden.
    Only calls of exactly that form are remembered (the dependants a route is built from, which
    FastAPI changes afterwards, are never shared), and only callables that can be hashed."""
    from fastapi.dependencies import utils
    upstream = getattr(utils, "get_dependant", None)
    if upstream is None or getattr(upstream, "hxn_ptycho_cache", None) is not None:
        return                                  # another FastAPI layout, or already installed
    form = {"path", "call", "name", "parent_oauth_scopes", "scope"}
    cache: dict[tuple, object] = {}

    def get_dependant(**kwargs):  # type: ignore[no-untyped-def]
        if kwargs.keys() != form:
            return upstream(**kwargs)
        scopes = kwargs["parent_oauth_scopes"]
        key = (kwargs["path"], kwargs["call"], kwargs["name"], None if scopes is None else tuple(scopes),
               kwargs["scope"])
        try:
            return cache[key]
        except KeyError:
            pass
        except TypeError:                       # a callable that cannot be hashed
            return upstream(**kwargs)
        dependant = upstream(**kwargs)
        if len(cache) < 4096:                   # routes x dependencies: a few hundred
            cache[key] = dependant
        return dependant

    get_dependant.hxn_ptycho_cache = cache  # type: ignore[attr-defined]
    utils.get_dependant = get_dependant


def _busy_wait(conn: object) -> object:
    """``conn`` (an ADBC SQLite connection) with its busy timeout set to :data:`SQLITE_BUSY_MS`."""
    cur = conn.cursor()  # type: ignore[attr-defined]
    try:
        cur.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_MS)}")
        cur.fetchall()
    finally:
        cur.close()
    return conn


class _WaitingConnection:
    """Tiled's persistent ADBC connection, whose clones (the pool's connections) wait for the lock."""

    def __init__(self, conn: object) -> None:
        self._conn = _busy_wait(conn)

    def adbc_clone(self) -> object:
        return _busy_wait(self._conn.adbc_clone())  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


def _sqlite_writers_wait() -> None:
    """Guard 3: one pooled connection to the SQLite tables, with a busy timeout."""
    from tiled import storage
    cls = getattr(storage, "EmbeddedSQLStorage", None)
    if cls is None or not hasattr(cls, "create_adbc_connection") or not hasattr(cls, "__post_init__"):
        raise SystemExit("tiled_guard: this Tiled version has no EmbeddedSQLStorage.create_adbc_connection; "
                         "refusing to serve SQLite tables whose writers fail on a lock")
    upstream = cls.create_adbc_connection
    upstream_post_init = cls.__post_init__

    def post_init(self):  # type: ignore[no-untyped-def]
        upstream_post_init(self)
        if str(self.uri).startswith("sqlite:"):          # one connection: the writers take turns
            object.__setattr__(self, "pool_size", 1)
            object.__setattr__(self, "max_overflow", 0)

    def create_adbc_connection(self):  # type: ignore[no-untyped-def]
        sqlite = str(self.uri).startswith("sqlite:")
        if sqlite:
            _file_wal(database_path(str(self.uri)))          # guard 4
        conn = upstream(self)
        return _WaitingConnection(conn) if sqlite else conn

    cls.__post_init__ = post_init
    cls.create_adbc_connection = create_adbc_connection


def main(argv: list[str] | None = None) -> int:
    install()
    from tiled.commandline.main import main as tiled_main
    sys.argv = ["tiled", *(sys.argv[1:] if argv is None else argv)]
    result = tiled_main()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
