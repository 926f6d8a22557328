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
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hxn_ptycho.h5util import atomic_path

log = logging.getLogger(__name__)

ENV_CATALOG = "HXN_PTYCHO_CATALOG"
ENV_API_KEY = "TILED_API_KEY"
RUNS_SPEC = "CatalogOfBlueskyRuns"
RUNS_SPEC_VERSION = "3.0"


class CatalogError(RuntimeError):
    """The catalog is not configured, not reachable, or refused a request; the message says which."""


@dataclass
class CatalogConfig:
    """Where the catalog is and how to authenticate (the key itself is read at connect time)."""

    uri: str
    api_key_env: str = ENV_API_KEY
    api_key_file: str | None = None
    raw: str = "raw"                      # a container path: "raw", or nested as at NSLS-II, "hxn/raw"
    processed: str = "processed"          # e.g. "hxn/processed"
    api_key: str | None = None            # only for in-process use; never written to disk by us
    create_containers: bool | None = None  # None: only in a catalog we started (an embedded server's)

    def owns(self) -> bool:
        """May we create missing containers? Only in a catalog we started — an embedded server's
        folder (its key file beside its log) — unless the config says so explicitly."""
        if self.create_containers is not None:
            return bool(self.create_containers)
        if self.api_key_file:
            folder = Path(self.api_key_file).parent
            return (folder / "server.log").exists() or (folder / "catalog.db").exists()
        return False

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
        if self.create_containers is not None:
            data["create_containers"] = bool(self.create_containers)
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
    known = {"uri", "api_key_env", "api_key_file", "raw", "processed", "create_containers"}
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


def connect(spec: str | os.PathLike | CatalogConfig | None = None, *, timeout: float = 30.0) -> Any:
    """A Tiled client for the catalog root, with a clear error when it is unreachable."""
    from tiled.client import from_uri

    cfg = resolve_catalog(spec)
    probe_server(cfg.uri, timeout=min(timeout, 10.0))
    try:
        return from_uri(cfg.uri, api_key=cfg.resolve_api_key(), remember_me=False, timeout=timeout)
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


def _broker_class() -> Any:
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


def broker(spec: str | os.PathLike | CatalogConfig | None = None, which: str = "raw") -> Any:
    """databroker's v1 ``Broker`` over the same client: ``db[-1]``, ``db[scan_id]``, ``db(key=value)``,
    ``h.table()``, ``db.get_table(h, stream_name='baseline')``, ``h.data(field)``; ptycho_gui's
    ``get_table(..., fill=False)`` of external fields and ``db.reg.retrieve`` raise errors naming
    their replacement."""
    return _broker_class()(runs(spec, which))


# --- the embedded server ------------------------------------------------------------------

def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tiled_executable() -> list[str]:
    exe = Path(sys.executable).with_name("tiled")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("tiled")
    if found:
        return [found]
    return [sys.executable, "-m", "tiled"]


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


class EmbeddedServer:
    """``tiled serve catalog`` on 127.0.0.1 over ``DIR/catalog.db`` and ``DIR/data``.

    ``DIR/catalog.json`` (the config others pass as ``--catalog DIR``) and ``DIR/api_key`` (mode
    0600) are written when it starts. ``database`` may instead be a PostgreSQL URI
    (``postgresql://...``) for a facility-like catalog; tabular data then go to ``tables``
    (default: the database ``<name>_tables`` on the same PostgreSQL server).
    """

    def __init__(self, directory: str | os.PathLike, *, port: int | None = None, api_key: str | None = None,
                 database: str | None = None, tables: str | None = None, readable: tuple[str, ...] = (),
                 log_file: str | None = None) -> None:
        self.directory = Path(directory).resolve()
        self.port = port or free_port()
        self.api_key = api_key or secrets.token_hex(16)
        self.database = database
        self.tables = tables
        self.readable = tuple(str(Path(p).resolve()) for p in readable)
        self.log_file = Path(log_file) if log_file else self.directory / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config(self) -> CatalogConfig:
        return CatalogConfig(uri=self.uri, api_key_file=str(self.directory / "api_key"))

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
        cmd = [*_tiled_executable(), "serve", "catalog", db, *init,
               "-w", str(data), "-w", tables, "-r", str(self.directory)]
        for r in self.readable:
            cmd += ["-r", r]
        return cmd + ["--host", "127.0.0.1", "--port", str(self.port)]

    def start(self, timeout: float = 60.0) -> EmbeddedServer:
        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.directory / "api_key", self.api_key + "\n", mode=0o600)
        env = dict(os.environ, TILED_SINGLE_USER_API_KEY=self.api_key)
        logf = open(self.log_file, "ab")  # noqa: SIM115 - handed to Popen, closed below
        try:
            self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        finally:
            logf.close()
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
