"""The Tiled catalog: where it is (config file or environment), the embedded server, the v1 shim.

A catalog is named by a *spec*, one of

- a Tiled URL, e.g. ``http://127.0.0.1:8000`` (the API key then comes from ``TILED_API_KEY``);
- a config file (YAML or JSON) with ``uri`` and optionally ``api_key_env`` (default
  ``TILED_API_KEY``), ``api_key_file``, ``raw`` and ``processed`` (container names);
- nothing, in which case ``HXN_PTYCHO_CATALOG`` (a URL or config file) is used.

The API key is never put on a command line: it travels in the environment or in a file that only
its owner can read. Runs live in two containers with the ``CatalogOfBlueskyRuns`` spec: ``raw``
(what the RunEngine wrote) and ``processed`` (the reconstructions, one derived run each).

``hxn-ptycho serve`` starts an :class:`EmbeddedServer`: ``tiled serve catalog`` on 127.0.0.1 over
an SQLite catalog and a local data folder. Only that one server process opens the SQLite files
(several processes opening them directly fail with "database is locked"); everybody else talks
HTTP to it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hxn_ptycho.errors import HxnPtychoError
from hxn_ptycho.h5util import atomic_path

log = logging.getLogger(__name__)

ENV_CATALOG = "HXN_PTYCHO_CATALOG"
ENV_API_KEY = "TILED_API_KEY"
RUNS_SPEC = "CatalogOfBlueskyRuns"
RUNS_SPEC_VERSION = "3.0"


class CatalogError(HxnPtychoError, RuntimeError):
    """The catalog is not configured, not reachable, or refused a request; the message says which."""

    exit_status = 2


@dataclass
class CatalogConfig:
    """Where the catalog is and how to authenticate (the key itself is read at connect time)."""

    uri: str
    api_key_env: str = ENV_API_KEY
    api_key_file: str | None = None
    raw: str = "raw"                      # a container path: "raw", or nested as at NSLS-II, "hxn/raw"
    processed: str = "processed"          # e.g. "hxn/processed"
    api_key: str | None = field(default=None, repr=False)   # in-process use only; never written, printed or logged
    readable: list[str] | None = None     # folders the server may read (None: not known, e.g. a remote server)
    create_containers: bool | None = None  # None: only in a catalog we started (an embedded server's)
    streaming: bool | None = None         # the server streams writes to subscribers; None: see streams()

    def owns(self) -> bool:
        """May we create missing containers? Only in a catalog we started — an embedded server's
        folder (its key file beside its log) — unless the config says so explicitly."""
        if self.create_containers is not None:
            return bool(self.create_containers)
        return self.embedded()

    def embedded(self) -> bool:
        """An embedded server's catalog (``hxn-ptycho serve``): its key file beside its log or database."""
        if self.api_key_file:
            folder = Path(self.api_key_file).parent
            return (folder / "server.log").exists() or (folder / "catalog.db").exists()
        return False

    def streams(self) -> bool:
        """Does the server stream writes to subscribers (a Tiled streaming cache), so that a writer
        must close each node's stream? As configured (``streaming``); else not for a catalog we
        started (``tiled serve catalog`` without ``--cache`` has none, tiled/commandline/_serve.py),
        and yes for any other (not known: closed, as bluesky's TiledWriter does)."""
        return self.streaming if self.streaming is not None else not self.embedded()

    def resolve_api_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        key = os.environ.get(self.api_key_env)
        if key:
            return key
        if self.api_key_file:
            try:
                return Path(self.api_key_file).read_text().strip() or None
            except OSError as exc:
                raise CatalogError(f"cannot read the Tiled API key file {self.api_key_file}: {exc}") from None
        return None

    def to_file(self, path: str | os.PathLike) -> None:
        """Write this config (without any literal key) to ``path`` atomically."""
        data = {"uri": self.uri, "api_key_env": self.api_key_env, "raw": self.raw, "processed": self.processed}
        if self.api_key_file:
            data["api_key_file"] = str(self.api_key_file)
        if self.readable is not None:
            data["readable"] = [str(p) for p in self.readable]
        if self.create_containers is not None:
            data["create_containers"] = bool(self.create_containers)
        if self.streaming is not None:
            data["streaming"] = bool(self.streaming)
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    """Write ``text`` to a unique temporary name beside ``path`` and rename it into place."""
    with atomic_path(path, 0o644 if mode is None else mode) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _load_config_file(path: Path) -> CatalogConfig:
    text = path.read_text()
    try:
        if path.suffix in (".yml", ".yaml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - yaml/json errors of any kind
        raise CatalogError(f"catalog config {path} is not valid {path.suffix or 'JSON'}: {exc}") from None
    if not isinstance(data, dict) or "uri" not in data:
        raise CatalogError(f"catalog config {path} must be a mapping with at least a 'uri' entry")
    known = {"uri", "api_key_env", "api_key_file", "raw", "processed", "readable", "create_containers", "streaming"}
    unknown = set(data) - known
    if unknown:
        raise CatalogError(f"catalog config {path}: unknown entries {sorted(unknown)} (known: {sorted(known)})")
    cfg = CatalogConfig(**{k: data[k] for k in known if k in data})
    if cfg.api_key_file and not Path(cfg.api_key_file).is_absolute():
        cfg.api_key_file = str(path.parent / cfg.api_key_file)
    return cfg


def resolve_catalog(spec: str | os.PathLike | CatalogConfig | None = None) -> CatalogConfig:
    """Turn a URL, a config file path, a :class:`CatalogConfig` or None (environment) into a config."""
    if isinstance(spec, CatalogConfig):
        return spec
    if spec is None or str(spec) == "":
        spec = os.environ.get(ENV_CATALOG)
        if not spec:
            raise CatalogError(
                f"no catalog given: pass --catalog URL|CONFIG or set {ENV_CATALOG} "
                "(start a local one with 'hxn-ptycho serve')")
    spec = str(spec)
    if spec.startswith(("http://", "https://")):
        return CatalogConfig(uri=spec.rstrip("/"))
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "catalog.json").exists():
        path = path / "catalog.json"          # an embedded server's folder
    if path.is_file():
        return _load_config_file(path)
    raise CatalogError(f"catalog {spec!r} is neither an http(s) URL nor an existing config file")


def connect(spec: str | os.PathLike | CatalogConfig | None = None, *, timeout: float = 30.0,
            structure_clients: Any = None) -> Any:
    """A Tiled client for the catalog root, with a clear error when it is unreachable
    (``structure_clients``: Tiled's, e.g. plain ones without the bluesky classes)."""
    from tiled.client import from_uri

    cfg = resolve_catalog(spec)
    probe_server(cfg.uri, timeout=min(timeout, 10.0))
    extra = {} if structure_clients is None else {"structure_clients": structure_clients}
    try:
        return from_uri(cfg.uri, api_key=cfg.resolve_api_key(), remember_me=False, timeout=timeout, **extra)
    except Exception as exc:
        raise CatalogError(f"cannot reach the Tiled catalog at {cfg.uri}: {type(exc).__name__}: {exc}") from exc


def probe_server(uri: str, timeout: float = 10.0) -> None:
    """One quick request to the server's root, so an unreachable catalog fails now, by name."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    root = f"{parts.scheme}://{parts.netloc}/api/v1/"
    try:
        with urllib.request.urlopen(root, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass                                  # it answered; authentication is checked later
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CatalogError(f"cannot reach the Tiled catalog at {uri}: {reason}") from None


def _parts(path: str) -> list[str]:
    parts = [p for p in str(path).strip("/").split("/") if p]
    if not parts:
        raise CatalogError(f"empty container path {path!r}")
    return parts


def container(client: Any, path: str) -> Any:
    """The container at ``path`` (``"raw"`` or nested ``"hxn/raw"``), naming what is missing."""
    node = client
    walked: list[str] = []
    for part in _parts(path):
        keys = list(node.keys())
        if part not in keys:
            where = "/".join(walked) or "the catalog root"
            raise CatalogError(f"the catalog has no container {'/'.join([*walked, part])!r} ({where} holds "
                               f"{sorted(keys)[:20]}); set 'raw'/'processed' in the catalog config to the "
                               "containers it has")
        node = node[part]
        walked.append(part)
    return node


def ensure_containers(client: Any, names: tuple[str, ...] = ("raw", "processed")) -> None:
    """Create the run containers (``CatalogOfBlueskyRuns`` spec; parents of nested paths such as
    ``hxn/raw`` as plain containers) where they are missing."""
    from tiled.structures.core import Spec

    for name in names:
        node = client
        parts = _parts(name)
        for i, part in enumerate(parts):
            if part not in set(node.keys()):
                specs = [Spec(RUNS_SPEC, version=RUNS_SPEC_VERSION)] if i == len(parts) - 1 else []
                try:
                    node.create_container(key=part, specs=specs)
                except Exception as exc:  # a concurrent creator may have won the race
                    if part not in set(node.keys()):
                        raise CatalogError(f"cannot create the container {name!r} in the catalog: {exc}") from exc
            node = node[part]


def runs(spec: str | os.PathLike | CatalogConfig | None = None, which: str = "raw") -> Any:
    """The ``raw`` or ``processed`` container (a ``CatalogOfBlueskyRuns`` client); nested paths
    (``hxn/raw``) as NSLS-II's Tiled has them. Missing containers are created only in a catalog
    we started (:meth:`CatalogConfig.owns`); elsewhere the error names the missing one."""
    cfg = resolve_catalog(spec)
    client = connect(cfg)
    path = cfg.raw if which == "raw" else cfg.processed if which == "processed" else which
    if cfg.owns():
        ensure_containers(client, (cfg.raw, cfg.processed))
    return container(client, path)


def tiled_writer(spec: str | os.PathLike | CatalogConfig | None = None, which: str = "raw", **kwargs: Any) -> Any:
    """A ``TiledWriter`` for the raw (or processed) container — subscribe it to the RunEngine.

    The HXN resource specs get their HDF5 dataset named (``frames.TILED_WRITER_PATCHES``), so the
    server can serve ``eiger2_image``, ``inenc2_val`` and the SIS channels of a fly2dpd run."""
    from bluesky_tiled_plugins import TiledWriter

    from .frames import TILED_WRITER_PATCHES

    patches = {**TILED_WRITER_PATCHES, **(kwargs.pop("patches", None) or {})}
    return TiledWriter(runs(spec, which), patches=patches, **kwargs)


RETRIEVE_GONE = ("db.reg.retrieve(datum_id) does not exist with a Tiled catalog (there are no datum "
                 "ids to resolve): read the arrays with h.data('eiger2_image') or "
                 "db.get_table(h, fields=[...], fill=True), or get the files and frame ranges with "
                 "hxn_ptycho.callbacks.frames.stored_run(catalog, uid) + frames.describe(run, key)")


class RegistryGone(CatalogError, AttributeError):
    """ptycho_gui's ``db.reg.retrieve`` habit on a Tiled catalog; the message names the replacement."""


class _Registry:
    """``db.reg`` of :func:`broker`: databroker's registry, with ``retrieve`` explaining its replacement."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def retrieve(self, *_args: Any, **_kwargs: Any) -> Any:
        raise RegistryGone(RETRIEVE_GONE)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _hxn_broker_class() -> Any:
    from databroker.v1 import Broker

    class HxnBroker(Broker):
        """databroker's v1 ``Broker`` with clear errors for the habits Tiled cannot serve."""

        @property
        def reg(self) -> Any:
            return _Registry(super().reg)

        def get_table(self, headers: Any, stream_name: str = "primary", fields: Any = None, fill: bool = False,
                      **kwargs: Any) -> Any:
            try:
                return super().get_table(headers, stream_name=stream_name, fields=fields, fill=fill, **kwargs)
            except ValueError as exc:
                if "externally stored" in str(exc) and not fill:
                    raise CatalogError(f"{exc} With Tiled, a table of datum ids (ptycho_gui's get_table(..., "
                                       f"fill=False) + db.reg.retrieve) is not available: {RETRIEVE_GONE}") from None
                raise
    return HxnBroker


# --- server errors as one line --------------------------------------------------------------

def server_log(spec: str | os.PathLike | CatalogConfig | None) -> Path | None:
    """The log of an embedded server (``DIR/server.log`` beside ``DIR/catalog.json``), if there is one."""
    if spec is None or isinstance(spec, CatalogConfig) or str(spec).startswith(("http://", "https://")):
        return None
    path = Path(spec).expanduser()
    folder = path if path.is_dir() else path.parent
    log_path = folder / "server.log"
    return log_path if log_path.is_file() else None


def server_log_cause(log_path: Path | None, correlation_id: str | None, wait_s: float = 1.0) -> str | None:
    """The exception line that ends the traceback the server logged for one request.

    Tiled prefixes each log record of a request with its correlation ID (``[0123abcd] ERROR: ...``)
    and returns the same ID in the ``x-tiled-request-id`` header of the response. The record may be
    written just after the response was sent, so the log is read again for up to ``wait_s``.
    """
    if log_path is None or not correlation_id:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        cause = _logged_cause(log_path, f"[{correlation_id}]")
        if cause or time.monotonic() >= deadline:
            return cause
        time.sleep(0.1)


def _logged_cause(log_path: Path, tag: str, max_bytes: int = 4 << 20) -> str | None:
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, log_path.stat().st_size - max_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    errors = [i for i, line in enumerate(lines) if tag in line and ("ERROR" in line or "Exception" in line)]
    if not errors:
        return None
    cause = None
    for line in lines[errors[-1] + 1:]:
        if _LOG_RECORD.match(line):
            break                                   # the next log record: the traceback is over
        m = _EXCEPTION_LINE.match(line)
        if m:
            cause = f"{m.group(1)}: {m.group(2)}"   # the last one is the exception that was raised
    return cause


_LOG_RECORD = re.compile(r"^\[[0-9a-f]{8,}\]")
_EXCEPTION_LINE = re.compile(r"^[\s|]*([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Refused|Warning)): (.*)$")


def client_error(exc: BaseException, spec: str | os.PathLike | CatalogConfig | None = None,
                 what: str = "") -> CatalogError:
    """One line for an HTTP failure of the Tiled client: what was asked, the status, and the cause
    (from the embedded server's log when it is at hand, else the correlation ID to look for)."""
    import httpx

    doing = f"{what}: " if what else ""
    if isinstance(exc, httpx.HTTPStatusError):
        resp = exc.response
        req = exc.request
        where = f"{req.url.scheme}://{req.url.netloc.decode()}"
        head = f"{doing}the catalog at {where} answered {resp.status_code} {resp.reason_phrase} to {req.method} {req.url.path}"
        detail = ""
        with contextlib.suppress(Exception):
            if resp.headers.get("content-type", "").startswith("application/json"):
                detail = str(resp.json().get("detail") or "")
        if resp.status_code in (401, 403):
            return CatalogError(f"{head}: the API key was refused (set {ENV_API_KEY} or the config's api_key_file)")
        if resp.status_code < 500:
            return CatalogError(f"{head}" + (f": {detail}" if detail else ""))
        cid = resp.headers.get("x-tiled-request-id")
        cause = server_log_cause(server_log(spec), cid)
        if cause:
            return CatalogError(f"{head}; the server's log says: {cause}")
        return CatalogError(f"{head}; the cause is in the server's log under correlation ID {cid}")
    if isinstance(exc, httpx.HTTPError):
        url = ""
        with contextlib.suppress(Exception):
            url = f" {exc.request.url}"
        return CatalogError(f"{doing}cannot reach the catalog{url}: {type(exc).__name__}: {exc}")
    return CatalogError(f"{doing}{type(exc).__name__}: {exc}")


@contextlib.contextmanager
def catalog_errors(spec: str | os.PathLike | CatalogConfig | None = None, what: str = "") -> Any:
    """Turn the Tiled client's HTTP errors inside the block into one-line :class:`CatalogError`."""
    import httpx

    try:
        yield
    except httpx.HTTPError as exc:
        raise client_error(exc, spec, what) from None


# --- databroker v1 -----------------------------------------------------------------------

def _broker_class() -> type:
    Broker = _hxn_broker_class()

    class CatalogBroker(Broker):  # type: ignore[valid-type,misc]
        """databroker's v1 ``Broker`` over ``raw`` that also finds the derived runs in ``processed``.

        ``db[-1]`` and ``db[scan_id]`` are raw scans (a scan id used by several raw runs warns, naming
        them); ``db[uid]`` looks in ``raw``, then ``processed``; ``db(key=value)`` searches both and
        yields the matching runs oldest first; ``db.processed`` is the plain v1 view of ``processed``.
        """

        def __init__(self, raw: Any, processed: Any) -> None:
            super().__init__(raw)
            self.processed = Broker(processed)

        def __call__(self, text_search: str | None = None, **kwargs: Any) -> Any:
            found = (Broker.__call__(self, text_search, **dict(kwargs)),
                     self.processed(text_search, **dict(kwargs)))
            return _MergedResults(found)

        def __getitem__(self, key: Any) -> Any:
            if isinstance(key, str):
                try:
                    return Broker.__getitem__(self, key)
                except KeyError:
                    return self.processed[key]
            if isinstance(key, int) and key > 0:
                _warn_duplicate_scan_id(self._catalog, key)
            return Broker.__getitem__(self, key)

    return CatalogBroker


class _MergedResults:
    """Headers of several v1 ``Results``, merged by start time (each is already in time order)."""

    def __init__(self, parts: tuple[Any, ...]) -> None:
        self._parts = parts

    def __iter__(self) -> Any:
        import heapq
        return heapq.merge(*self._parts, key=lambda h: h.start.get("time", 0.0))


def _warn_duplicate_scan_id(raw: Any, scan_id: int) -> list[str]:
    """Warn (and return the uids) when several raw runs carry ``scan_id``."""
    from tiled.queries import Eq

    found = raw.search(Eq("scan_id", int(scan_id)))
    if len(found) < 2:
        return []
    uids = [str(k) for k in found]
    log.warning("scan_id %s names %d raw runs (%s); taking the newest, %s — pick one by uid",
                scan_id, len(uids), ", ".join(uids), uids[-1])
    return uids


def _own_registry(client: Any) -> Any:
    """The same client with a private structure-client registry.

    databroker's v1 objects call ``catalog.v2``, which sets "BlueskyRun" → v2 on a ``copy.copy`` of
    the registry — and a copy of tiled's ``OneShotCachedMap`` shares its dict (``__getstate__``
    returns it), so every other client of the process would hand out v2 runs from then on. A
    private dict keeps that switch inside the broker.
    """
    import copy

    registry = client.structure_clients
    private = copy.copy(registry)
    private.__setstate__(dict(registry.__getstate__()))
    return client.new_variation(structure_clients=private)


def broker(spec: str | os.PathLike | CatalogConfig | None = None, which: str = "raw") -> Any:
    """databroker's v1 ``Broker``: ``db[-1]``, ``db[scan_id]``, ``db[uid]``, ``db(key=value)``.

    ``which="raw"`` (default): the raw scans, and ``db(...)`` also finds the derived runs of the
    ``processed`` container, so ``db(plan_name="hxn_ptycho_dm")`` lists the reconstructions.
    ``which="processed"``: the plain broker over the derived runs only. ``h.table()``,
    ``db.get_table(h, stream_name='baseline')`` and ``h.data(field)`` work; ptycho_gui's
    ``get_table(..., fill=False)`` of external fields and ``db.reg.retrieve`` raise errors naming
    their replacement.
    """
    with catalog_errors(spec, "databroker over the catalog"):
        if which != "raw":
            return _hxn_broker_class()(_own_registry(runs(spec, which)))
        cfg = resolve_catalog(spec)
        return _broker_class()(_own_registry(runs(cfg, "raw")), _own_registry(runs(cfg, "processed")))


# --- the embedded server ------------------------------------------------------------------

def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_server(uri: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``{uri}/api/v1/`` until it answers; raise naming the reason when it does not."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise CatalogError(f"the Tiled server exited with status {proc.returncode} before it answered at {uri}")
        try:
            with urllib.request.urlopen(f"{uri}/api/v1/", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise CatalogError(f"the Tiled server at {uri} did not answer within {timeout:.0f} s ({last})")


def _tables_uri(database: str) -> str:
    """Tabular data of a PostgreSQL catalog go to the database ``<name>_tables`` on the same server."""
    uri = database.replace("postgresql+asyncpg://", "postgresql://")
    head, _, name = uri.rpartition("/")
    name, sep, query = name.partition("?")
    return f"{head}/{name}_tables{sep}{query}"


KEY_FILE = "api_key"
LOCK_FILE = "server.lock"
LOG_FILE = "server.log"
_DB_SUFFIXES = ("", "-journal", "-wal", "-shm")


class CatalogInUse(CatalogError):
    """Another server already serves this catalog folder; the message names its pid and address."""


def read_key_file(path: str | os.PathLike) -> str | None:
    """The key stored in ``path`` (made 0600 if it was not), or None when there is none."""
    path = Path(path)
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CatalogError(f"cannot read the catalog's API key file {path}: {exc}") from None
    mode = path.stat().st_mode & 0o777
    if mode != 0o600:
        log.warning("the API key file %s had mode %o; set to 0600", path, mode)
        path.chmod(0o600)
    return key or None


def _public_uri(database: str) -> str:
    """A database URI without its password (what may be written to a lock file or a message)."""
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(database.replace("postgresql+asyncpg://", "postgresql://"))
    if parts.password is None:
        return urlunsplit(parts)
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc.lower()))


def database_lock_path(database: str) -> Path:
    """This host's lock of a PostgreSQL database (per user, in a 0700 folder of the temp dir)."""
    import hashlib
    import tempfile
    folder = Path(tempfile.gettempdir()) / f"hxn-ptycho-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if not folder.is_dir() or folder.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise CatalogError(f"the lock folder {folder} is not a private folder of this user; remove it")
    return folder / f"db-{hashlib.sha256(_public_uri(database).encode()).hexdigest()[:24]}.lock"


def _lock_holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class EmbeddedServer:
    """``tiled serve catalog`` on 127.0.0.1 over ``DIR/catalog.db`` and ``DIR/data``.

    ``DIR/catalog.json`` (the config others pass as ``--catalog DIR``) is written when it starts.
    The API key lives in ``DIR/api_key`` (0600) and is *reused* at every start, so listeners,
    jobs and shells that exported it keep working across restarts; a new key is made only for a
    new folder (or when ``api_key`` is given). Tiled runs through :mod:`.tiled_guard`, which keeps
    the key out of ``DIR/server.log`` and refuses file assets that resolve (``..``, symlinks)
    outside the readable folders or onto the catalog's own files. The server process is started
    with umask 077 and the folder is 0700, so the database, the data, the log and the key are
    readable by their owner only. ``DIR/server.lock`` is held (``flock``) by the running server:
    a second server on the same folder is refused with :class:`CatalogInUse`, naming the first.

    ``database`` may instead be a PostgreSQL URI (``postgresql://...``) for a facility-like
    catalog; tabular data then go to ``tables`` (default: the database ``<name>_tables`` on the
    same PostgreSQL server). A second server on that database *from this host* is refused as well
    (a lock per database in a private folder of the temp dir); other hosts are not seen.
    """

    def __init__(self, directory: str | os.PathLike, *, port: int | None = None, api_key: str | None = None,
                 database: str | None = None, tables: str | None = None, readable: tuple[str, ...] = (),
                 log_file: str | None = None) -> None:
        self.directory = Path(directory).resolve()
        self.port = port or free_port()
        self.key_file = self.directory / KEY_FILE
        self.api_key = api_key or read_key_file(self.key_file) or secrets.token_hex(32)
        self.database = database
        self.tables = tables
        self.readable = tuple(str(Path(p).resolve()) for p in readable)
        self.log_file = Path(log_file) if log_file else self.directory / LOG_FILE
        self.lock_file = self.directory / LOCK_FILE
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config(self) -> CatalogConfig:
        return CatalogConfig(uri=self.uri, api_key_file=str(self.key_file), api_key=self.api_key,
                             readable=[str(self.directory), *self.readable])

    def readable_folders(self) -> list[str]:
        """What the server may read: the catalog folder (less :meth:`secret_files`), its data, ``readable``."""
        return [str(self.directory), str(self.directory / "data"), *self.readable]

    def secret_files(self) -> list[str]:
        """The catalog's own files that no asset may point at (key, lock, log, SQLite databases)."""
        out = [str(self.key_file), str(self.lock_file), str(self.log_file)]
        if not self.database:
            for base in (self.directory / "catalog.db", self.directory / "data" / "tables.sqlite"):
                out += [str(base) + suffix for suffix in _DB_SUFFIXES]
        return out

    def _table_files(self) -> list[str]:
        """The SQLite/DuckDB file of this server's tabular storage, if it is one (the guard allows only it)."""
        from .tiled_guard import database_path
        if self.database:
            uri = self.tables or _tables_uri(self.database)
        else:
            uri = f"sqlite:///{self.directory / 'data' / 'tables.sqlite'}"
        path = database_path(uri)
        return [path] if path else []

    def command(self) -> list[str]:
        data = self.directory / "data"
        if self.database:
            db = self.database
            if db.startswith("postgresql://"):
                db = "postgresql+asyncpg://" + db[len("postgresql://"):]
            tables = self.tables or _tables_uri(self.database)
            init = ["--init"]                   # creates the schema only where it does not exist
        else:
            db_path = self.directory / "catalog.db"
            db = str(db_path)
            tables = f"sqlite:///{data / 'tables.sqlite'}"
            init = [] if db_path.exists() else ["--init"]
        cmd = [sys.executable, "-m", "hxn_ptycho.callbacks.tiled_guard", "serve", "catalog", db, *init,
               "-w", str(data), "-w", tables, "-r", str(self.directory)]
        for r in self.readable:
            cmd += ["-r", r]
        return cmd + ["--host", "127.0.0.1", "--port", str(self.port)]

    # -- start: lock, secure the folder, keep the key, start Tiled behind the guard -------------
    def lock_files(self) -> list[Path]:
        """``DIR/server.lock``, and for PostgreSQL this host's lock of the database too."""
        return [self.lock_file] + ([database_lock_path(self.database)] if self.database else [])

    def _acquire_locks(self) -> list[int]:
        import fcntl
        fds: list[int] = []
        try:
            for path in self.lock_files():
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                fds.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    held = _lock_holder(path)
                    what = f"the catalog {self.directory}" if path == self.lock_file else \
                        f"the database {_public_uri(self.database or '')}"
                    raise CatalogInUse(
                        f"{what} is already served by process {held.get('pid', '?')} at {held.get('uri', '?')} "
                        f"(folder {held.get('directory', '?')}); use it with --catalog {held.get('directory', '?')}, "
                        "or stop that server first") from None
                os.fchmod(fd, 0o600)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def _write_lock(self, fd: int, pid: int) -> None:
        text = json.dumps({"pid": pid, "uri": self.uri, "directory": str(self.directory),
                           "database": _public_uri(self.database) if self.database else str(self.directory / "catalog.db"),
                           "started": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)

    def _secure_folder(self) -> None:
        """Folder and data 0700; every existing secret or database file 0600 (older catalogs included)."""
        for d in (self.directory, self.directory / "data"):
            d.chmod(0o700)
        for name in self.secret_files():
            with contextlib.suppress(FileNotFoundError):
                os.chmod(name, 0o600)

    def _store_key(self) -> None:
        if read_key_file(self.key_file) != self.api_key:
            atomic_write_text(self.key_file, self.api_key + "\n", mode=0o600)

    def _scrub_log(self) -> None:
        """A log written by an older version may hold the key: redact it before the key is reused."""
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return
        if self.api_key in text:
            log.warning("the API key appeared in %s (an older server printed it); redacted", self.log_file)
            atomic_write_text(self.log_file, text.replace(self.api_key, "***"), mode=0o600)

    def start(self, timeout: float = 60.0) -> EmbeddedServer:
        from .tiled_guard import ENV_READABLE, ENV_SECRETS, ENV_TABLES
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.directory / "data").mkdir(exist_ok=True, mode=0o700)
        lock_fds = self._acquire_locks()
        try:
            self._secure_folder()
            self._store_key()
            self._scrub_log()
            env = dict(os.environ, TILED_SINGLE_USER_API_KEY=self.api_key,
                       **{ENV_READABLE: os.pathsep.join(self.readable_folders()),
                          ENV_SECRETS: os.pathsep.join(self.secret_files()),
                          ENV_TABLES: os.pathsep.join(self._table_files())})
            log_fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.fchmod(log_fd, 0o600)
                self.proc = subprocess.Popen(self.command(), stdout=log_fd, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True, umask=0o077, pass_fds=tuple(lock_fds))
            finally:
                os.close(log_fd)
            for fd in lock_fds:
                self._write_lock(fd, self.proc.pid)
        finally:
            for fd in lock_fds:
                os.close(fd)           # the server process holds the locks now (inherited descriptors)
        try:
            wait_for_server(self.uri, timeout, self.proc)
            cfg = self.config
            ensure_containers(connect(cfg), (cfg.raw, cfg.processed))
        except Exception:  # noqa: BLE001 - any start failure: stop and report
            tail = self.log_tail()
            self.stop()
            raise CatalogError(f"the embedded Tiled server did not start; its log ({self.log_file}) ends:\n{tail}")
        self.config.to_file(self.directory / "catalog.json")
        log.info("Tiled catalog at %s (config %s)", self.uri, self.directory / "catalog.json")
        return self

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def __enter__(self) -> EmbeddedServer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
