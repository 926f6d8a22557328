"""Query helpers: the reconstructions of a scan, as arrays and parameters.

``hxn_ptycho.callbacks.results(catalog, scan_id=N)`` (or ``raw_uid=UID``) returns the newest *readable*
derived run of that raw scan as a :class:`DerivedResult` (a failed one too, with its reason and no
arrays): a run whose external files the server cannot read is skipped with a warning naming the
cause, and the next newest is taken (``res.skipped`` lists what was skipped). ``uid=U`` picks one
derived run; ``all=True`` lists every reconstruction of the scan as :class:`RunSummary` rows
(uid, time, status, key parameters, final data error), newest first. A scan id used by several
raw runs warns, naming their uids. ``catalog`` is a URL, a config file, an embedded server's
folder, or a Tiled client of the ``processed`` container.

Server errors become one-line :class:`~hxn_ptycho.callbacks.catalog.CatalogError`; a run that
cannot be read is found with one request (no retries) and reported as :class:`UnreadableRun`.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from hxn_ptycho.errors import HxnPtychoError
from hxn_ptycho.spec import find_key

from .catalog import catalog_errors, server_log, server_log_cause

log = logging.getLogger(__name__)

PLAN_NAME = "hxn_ptycho_dm"
KEY_PARAMETERS = ("iterations", "probe_modes", "object_modes", "beta", "mode", "ranks", "backend", "precision")


class NoResult(HxnPtychoError, LookupError):
    """No derived run matches the query."""


class UnreadableRun(NoResult):
    """The catalog lists this derived run but its server cannot read its data; the message says why."""


@dataclass
class DerivedResult:
    uid: str
    raw_uid: str | None
    scan_id: Any
    exit_status: str | None
    reason: str | None
    recon: dict = field(default_factory=dict)
    start: dict = field(default_factory=dict)
    object: np.ndarray | None = None               # (M_O, H, W) complex
    probe: np.ndarray | None = None                # (M_P, n, n) complex
    positions_px: np.ndarray | None = None         # (N, 2)
    positions_refined_px: np.ndarray | None = None  # (N, 2), with --refine-positions
    probe_power_fraction: np.ndarray | None = None
    final_data_error: float | None = None
    data_error: np.ndarray | None = None           # per iteration
    probe_error: np.ndarray | None = None
    object_error: np.ndarray | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (uid, why) of newer unreadable runs
    notes: list[str] = field(default_factory=list)                 # warnings of the query

    @property
    def ok(self) -> bool:
        """A complete reconstruction (every iteration run)."""
        return self.exit_status == "success"

    @property
    def interrupted(self) -> bool:
        """Stopped early on request: its arrays are there, but not all its iterations were run."""
        return is_interrupted(self.exit_status, self.recon)

    @property
    def time(self) -> float | None:
        return self.start.get("time")

    def summary(self) -> str:
        status = "interrupted" if self.interrupted else self.exit_status
        head = f"derived run {self.uid} of scan {self.scan_id} (raw {self.raw_uid}): {status}"
        if not self.ok and not self.interrupted:
            return f"{head} — {self.reason}"
        if self.interrupted:
            head = f"{head} ({self.reason})"
        return (f"{head}; object {tuple(self.object.shape)}, probe {tuple(self.probe.shape)}, "
                f"probe power {np.round(self.probe_power_fraction, 3).tolist()}, "
                f"final data error {self.final_data_error:.4g}")


@dataclass
class RunSummary:
    """One reconstruction of a scan, as listed by ``results(..., all=True)``."""

    uid: str
    raw_uid: str | None
    scan_id: Any
    time: float | None
    exit_status: str | None
    reason: str | None
    parameters: dict = field(default_factory=dict)     # the KEY_PARAMETERS found in ``recon``
    final_data_error: float | None = None
    unreadable: str | None = None                      # why the server cannot read it, if it cannot

    interrupted: bool = False                          # stopped early on request (Ctrl-C)

    @property
    def status(self) -> str:
        if self.unreadable:
            return "unreadable"
        if self.interrupted:
            return "interrupted"
        return self.exit_status or "running"

    def line(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time)) if self.time else "?"
        params = " ".join(f"{k}={v}" for k, v in self.parameters.items())
        err = f"{self.final_data_error:.4g}" if self.final_data_error is not None else "-"
        tail = f"  ({self.unreadable or self.reason})" if (self.unreadable or self.reason) else ""
        return f"{self.uid}  {when}  {self.status:<10}  {err:>10}  {params}{tail}"


TABLE_HEAD = f"{'uid':<36}  {'time':<19}  {'status':<10}  {'data error':>10}  parameters"


# --- finding runs -------------------------------------------------------------------------

_CLIENTS: dict[tuple[str, str], Any] = {}


class QuickArray:
    """A minimal read-only client for Tiled's ``array`` structure family: ``shape``, ``dtype``,
    ``read()`` (one request for the raw bytes) and ``data_sources()``. Tiled's own ``ArrayClient``
    imports dask at import time (seconds on a loaded machine); a query needs none of it."""

    def __init__(self, context: Any, *, item: dict, structure_clients: Any = None, structure: Any = None,
                 include_data_sources: bool = False, **_: Any) -> None:
        self.context, self.item = context, item
        struct = item["attributes"]["structure"]
        self.shape = tuple(struct["shape"])
        dt = struct["data_type"]
        order = {"little": "<", "big": ">"}.get(dt.get("endianness"), "|")
        self.dtype = np.dtype(f"{order}{dt['kind']}{dt['itemsize']}")
        self.uri = item["links"]["self"]

    @property
    def metadata(self) -> dict:
        return dict(self.item["attributes"].get("metadata") or {})

    def read(self) -> np.ndarray:
        resp = self.context.http_client.get(self.item["links"]["full"], headers={"Accept": "application/octet-stream"})
        resp.raise_for_status()
        return np.frombuffer(resp.content, dtype=self.dtype).reshape(self.shape).copy()

    def data_sources(self) -> list[Any]:
        from types import SimpleNamespace
        resp = self.context.http_client.get(self.item["links"]["self"], params={"include_data_sources": True})
        resp.raise_for_status()
        sources = resp.json()["data"]["attributes"].get("data_sources") or []
        return [SimpleNamespace(assets=[SimpleNamespace(data_uri=a["data_uri"]) for a in ds.get("assets", [])])
                for ds in sources]


def _plain_structure_clients() -> Any:
    """Tiled's own clients for each structure family, without the spec-named ones of
    ``bluesky_tiled_plugins`` (BlueskyRun, …): importing those pulls in dask, xarray, pandas and
    numba — seconds — and a query needs only metadata, searches and arrays."""
    from tiled.client.container import DEFAULT_STRUCTURE_CLIENT_DISPATCH
    from tiled.utils import OneShotCachedMap
    base = DEFAULT_STRUCTURE_CLIENT_DISPATCH["numpy"]
    families = ("container", "composite", "array", "table", "sparse", "awkward", "xarray_dataset")
    clients = {k: (lambda k=k: base[k]) for k in families if k in base}
    clients["array"] = lambda: QuickArray
    return OneShotCachedMap(clients)


def query_container(catalog: Any, which: str) -> Any:
    """The ``raw`` or ``processed`` container for reading: one connection per catalog and process,
    plain Tiled clients (see :func:`_plain_structure_clients`), nothing created — a query is quick."""
    from tiled.client import from_uri

    from .catalog import CatalogError, container, probe_server, resolve_catalog
    cfg = resolve_catalog(catalog)
    key = (cfg.uri, cfg.raw if which == "raw" else cfg.processed)
    if key not in _CLIENTS:
        root = _CLIENTS.get((cfg.uri, ""))
        if root is None:
            probe_server(cfg.uri)                   # an unreachable catalog: one line now, no client retries
            try:
                root = from_uri(cfg.uri, structure_clients=_plain_structure_clients(), api_key=cfg.resolve_api_key(),
                                remember_me=False, timeout=30)
            except CatalogError:
                raise
            except Exception as exc:  # noqa: BLE001 - unreachable, refused key, ...: one line naming the catalog
                raise CatalogError(f"cannot reach the Tiled catalog at {cfg.uri}: {type(exc).__name__}: "
                                   f"{(str(exc).splitlines() or [''])[0]}") from None
            _CLIENTS[(cfg.uri, "")] = root
        _CLIENTS[key] = container(root, key[1])
    return _CLIENTS[key]


def _processed(catalog: Any) -> Any:
    if hasattr(catalog, "search"):
        return catalog
    return query_container(catalog, "processed")


def _raw(catalog: Any) -> Any | None:
    if hasattr(catalog, "search"):
        return None                       # a bare processed client: its raw container is unknown here
    return query_container(catalog, "raw")


def find_derived_runs(catalog: Any, *, scan_id: int | None = None, raw_uid: str | None = None,
                      only_success: bool = False) -> list[Any]:
    """The derived runs (Tiled clients) of ``scan_id`` or ``raw_uid``, newest first."""
    from tiled.queries import Eq

    if (scan_id is None) == (raw_uid is None):
        raise NoResult("give exactly one of scan_id= or raw_uid=")
    with catalog_errors(catalog, "searching the derived runs"):
        found = _processed(catalog).search(Eq("start.plan_name", PLAN_NAME))
        found = found.search(Eq("start.raw_uid", raw_uid)) if raw_uid is not None else found.search(
            Eq("start.scan_id", int(scan_id)))
        if only_success:
            found = found.search(Eq("stop.exit_status", "success"))
        runs = list(found.values())
    runs.sort(key=lambda r: r.metadata.get("start", {}).get("time", 0.0), reverse=True)
    return runs


def find_derived(catalog: Any, *, scan_id: int | None = None, raw_uid: str | None = None,
                 only_success: bool = False) -> Any:
    """The newest derived run (a Tiled client) for ``scan_id`` or ``raw_uid``."""
    found = find_derived_runs(catalog, scan_id=scan_id, raw_uid=raw_uid, only_success=only_success)
    if not found:
        raise NoResult(f"no reconstruction of {_what(scan_id, raw_uid)} in the catalog")
    return found[0]


def derived_run(catalog: Any, uid: str) -> Any:
    """The derived run ``uid`` (full or partial, ≥ 5 characters) of the ``processed`` container."""
    with catalog_errors(catalog, f"looking up derived run {uid}"):
        processed = _processed(catalog)
        try:
            run = processed[uid]
        except (KeyError, ValueError) as exc:
            run = None
            if len(uid) >= 5:                       # a partial uid (a plain Tiled container has no such lookup)
                from tiled.queries import Like
                hits = list(processed.search(Like("start.uid", f"{uid}%")).items())
                if len(hits) > 1:
                    raise NoResult(f"{uid} is the start of {len(hits)} derived runs' uids: give more of it") from None
                run = hits[0][1] if hits else None
            if run is None:
                raise NoResult(f"no derived run {uid} in the catalog ({exc})") from None
    if run.metadata.get("start", {}).get("plan_name") != PLAN_NAME:
        raise NoResult(f"run {uid} is not a reconstruction (plan_name "
                       f"{run.metadata.get('start', {}).get('plan_name')!r}, not {PLAN_NAME!r})")
    return run


def _what(scan_id: Any, raw_uid: Any) -> str:
    return f"raw_uid={raw_uid}" if raw_uid is not None else f"scan_id={scan_id}"


def duplicate_scan_ids(catalog: Any, scan_id: int, derived: list[Any] = ()) -> str | None:
    """A warning when ``scan_id`` names several raw scans (in ``raw``, or among the derived runs'
    ``raw_uid``), naming their uids; None when it is unique."""
    from tiled.queries import Eq

    uids: list[str] = []
    raw = _raw(catalog)
    if raw is not None:
        with catalog_errors(catalog, "searching the raw scans"):
            uids = [str(k) for k in raw.search(Eq("start.scan_id", int(scan_id)))]
    for run in derived:
        u = run.metadata.get("start", {}).get("raw_uid")
        if u and u not in uids:
            uids.append(u)
    if len(uids) < 2:
        return None
    return (f"scan_id {scan_id} names {len(uids)} raw scans ({', '.join(uids)}); this is the newest "
            f"reconstruction of any of them — pick one with raw_uid= (--raw-uid) or uid= (--uid)")


# --- readability ---------------------------------------------------------------------------

def _external_arrays(run: Any) -> list[tuple[str, Any]]:
    """The arrays of the ``primary`` stream that live in external files (StreamResource)."""
    out = []
    if "primary" not in run:
        return out
    stream = run["primary"]
    keys = stream.metadata.get("data_keys", {}) if hasattr(stream, "metadata") else {}
    for key, spec in (keys or {}).items():
        if spec.get("external") and key in stream:
            out.append((key, stream[key]))
    return out


def _asset_paths(array: Any) -> list[str]:
    paths = []
    for ds in array.data_sources() or []:
        for asset in ds.assets:
            uri = urlparse(asset.data_uri)
            paths.append(unquote(uri.path) if uri.scheme in ("file", "") else asset.data_uri)
    return paths


def check_readable(run: Any, catalog: Any = None) -> str | None:
    """None when the server can read every external array of ``run``; else why it cannot.

    One small request per array (a single element), without the client's retries, so a run the
    server cannot read is known at once instead of after half a minute of retrying a 500.
    """
    import httpx

    run = as_v3(run)
    for key, array in _external_arrays(run):
        url = array.item["links"]["full"]
        params = {"expected_shape": ",".join("1" for _ in array.shape) or "scalar",
                  "slice": ",".join("0:1" for _ in array.shape)}
        try:
            # "Connection: close": the server drops a connection after a 500; the next request
            # must not find it in the pool (the client would retry it and print "Retrying…")
            resp = array.context.http_client.get(url, params=params,
                                                 headers={"Accept": "application/octet-stream", "Connection": "close"})
        except httpx.HTTPError as exc:
            return f"its '{key}' could not be requested: {type(exc).__name__}: {exc}"
        if resp.status_code < 400:
            continue
        return _unreadable_cause(key, array, resp, catalog)
    return None


def _unreadable_cause(key: str, array: Any, resp: Any, catalog: Any) -> str:
    paths = []
    try:
        paths = _asset_paths(array)
    except Exception as exc:  # noqa: BLE001 - the cause is only a better message
        log.debug("data sources of %s: %s", key, exc)
    head = f"the server answered {resp.status_code} {resp.reason_phrase} for its '{key}'"
    cause = server_log_cause(server_log(catalog) if isinstance(catalog, (str, os.PathLike)) else None,
                             resp.headers.get("x-tiled-request-id"))
    where = paths[0] if paths else "its file"
    if cause and "outside the readable storage" in cause:
        return (f"the server refuses to read {where}: it is outside the folders it may read "
                f"(serve the catalog with --read {Path(os.path.realpath(where)).parent}, or re-run the scan "
                f"with -o inside them)")
    missing = [p for p in paths if p.startswith("/") and not os.path.exists(p)]
    if missing:
        return f"{head}: its file {missing[0]} does not exist (deleted or moved)"
    if cause:
        return f"{head}: {cause}"
    return (f"{head} ({where}); the cause is in the server's log under correlation ID "
            f"{resp.headers.get('x-tiled-request-id')}")


# --- reading -------------------------------------------------------------------------------

def _read(stream: Any, key: str, required: bool = True) -> np.ndarray | None:
    try:
        return np.asarray(stream[key].read())
    except KeyError:
        if required:
            raise NoResult(f"derived run {stream.uri}: stream has no '{key}'") from None
        return None


def as_v3(run: Any) -> Any:
    """The v3 view of a run. databroker's v1/v2 accessors switch the *shared* structure-client
    registry to v2 (``copy.copy`` of tiled's ``OneShotCachedMap`` shares its dict), so a client
    may hand out v2 runs after ``db[...]`` was used; v3 gives streams as containers of arrays."""
    return run.v3 if hasattr(run, "v3") else run


def load_result(run: Any, catalog: Any = None) -> DerivedResult:
    """Arrays and parameters of one derived run; :class:`UnreadableRun` if the server cannot read it."""
    run = as_v3(run)
    md = run.metadata
    start, stop = dict(md.get("start", {})), dict(md.get("stop") or {})
    out = DerivedResult(uid=start.get("uid"), raw_uid=start.get("raw_uid"), scan_id=start.get("scan_id"),
                        exit_status=stop.get("exit_status"), reason=stop.get("reason"),
                        recon=dict(start.get("recon", {})), start=start)
    if out.exit_status != "success" and not out.interrupted:
        return out
    with catalog_errors(catalog, f"reading derived run {out.uid}"):
        if not isinstance(run, (QuickRun, QuickArray)) and not _is_plain(run):
            why = check_readable(run, catalog)       # a client of bluesky_tiled_plugins: ask first
            if why:
                raise UnreadableRun(f"derived run {out.uid} of scan {out.scan_id} cannot be read: {why}")
            reader: Any = _ClientReader(run)
        else:
            reader = QuickRun(run, catalog, out)
        out.object = reader.read("primary", "object")[0]
        out.probe = reader.read("primary", "probe")[0]
        out.positions_px = reader.read("primary", "positions_px")[0]
        refine = find_key(out.recon.get("params") or {}, "refine_positions")
        refined = reader.read("primary", "positions_refined_px", required=False) if refine in (None, True) else None
        out.positions_refined_px = None if refined is None else refined[0]
        out.probe_power_fraction = reader.read("primary", "probe_power_fraction")[0]
        out.final_data_error = float(reader.read("primary", "final_data_error")[0])
        out.data_error, out.probe_error, out.object_error = (reader.read("iterations", k, required=False)
                                                             for k in ("data_error", "probe_error", "object_error"))
    return out


def _is_plain(run: Any) -> bool:
    return type(run).__module__.startswith("tiled.")


class _ClientReader:
    """Reads through the run's own (bluesky_tiled_plugins) client."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def read(self, stream: str, key: str, required: bool = True) -> np.ndarray | None:
        if stream not in self.run:
            if required:
                raise NoResult(f"derived run {self.run.uri}: no stream '{stream}'")
            return None
        return _read(self.run[stream], key, required)


# arrays addressed directly (external, or zarr in runs written by TiledWriter); the rest are table columns
_EXTERNAL_KEYS = {"object", "probe", "positions_px", "positions_refined_px", "probe_power_fraction",
                  "final_probe_error", "final_object_error", "probe_error", "object_error"}


class QuickRun:
    """Reads a derived run's arrays with two requests each (the node, its bytes), addressed by path —
    a composite stream's own lookup costs two searches per key. A file the server cannot read is
    found by that one read (no retries) and explained as :func:`check_readable` does."""

    def __init__(self, run: Any, catalog: Any, out: DerivedResult) -> None:
        self.run, self.catalog, self.out = run, catalog, out
        self.base = run.item["links"]["self"].rstrip("/")

    def _node(self, stream: str, key: str) -> QuickArray | None:
        http = self.run.context.http_client
        direct, internal = f"{self.base}/{stream}/{key}", f"{self.base}/{stream}/internal/{key}"
        for path in ((direct, internal) if key in _EXTERNAL_KEYS else (internal, direct)):
            resp = http.get(path)
            if resp.status_code == 404:
                continue
            resp.raise_for_status()
            return QuickArray(self.run.context, item=resp.json()["data"])
        return None

    def read(self, stream: str, key: str, required: bool = True) -> np.ndarray | None:
        node = self._node(stream, key)
        if node is None:
            if required:
                raise NoResult(f"derived run {self.out.uid}: stream '{stream}' has no '{key}'")
            return None
        resp = node.context.http_client.get(node.item["links"]["full"],
                                            headers={"Accept": "application/octet-stream", "Connection": "close"})
        if resp.status_code >= 400:
            why = _unreadable_cause(key, node, resp, self.catalog)
            raise UnreadableRun(f"derived run {self.out.uid} of scan {self.out.scan_id} cannot be read: {why}")
        return np.frombuffer(resp.content, dtype=node.dtype).reshape(node.shape).copy()


def is_interrupted(exit_status: str | None, recon: dict) -> bool:
    """A derived run stopped early on request: stop "abort" and ``recon.measured.interrupted``."""
    return exit_status == "abort" and bool((recon.get("measured") or {}).get("interrupted"))


def _run_interrupted(run: Any) -> bool:
    md = as_v3(run).metadata
    return is_interrupted((md.get("stop") or {}).get("exit_status"), dict(md.get("start", {}).get("recon", {})))



def key_parameters(recon: dict) -> dict:
    """The parameters that tell reconstructions of one scan apart, wherever ``recon`` nests them."""
    out = {}
    for k in KEY_PARAMETERS:
        v = find_key(recon, k)
        if v is not None:
            out[k] = v
    return out


def summarize(run: Any, catalog: Any = None, check: bool = True) -> RunSummary:
    """One row of the listing of a scan's reconstructions."""
    run = as_v3(run)
    md = run.metadata
    start, stop = dict(md.get("start", {})), dict(md.get("stop") or {})
    row = RunSummary(uid=start.get("uid"), raw_uid=start.get("raw_uid"), scan_id=start.get("scan_id"),
                     time=start.get("time"), exit_status=stop.get("exit_status"), reason=stop.get("reason"),
                     parameters=key_parameters(dict(start.get("recon", {}))))
    recon = dict(start.get("recon", {}))
    row.interrupted = is_interrupted(row.exit_status, recon)
    done = (recon.get("measured") or {}).get("iterations_done")
    if done is not None and row.parameters.get("iterations") not in (None, done):
        row.parameters["iterations"] = f"{done}/{row.parameters['iterations']}"   # e.g. 173/2000
    if row.exit_status == "success" or row.interrupted:
        with catalog_errors(catalog, f"reading derived run {row.uid}"):
            if "primary" in run and "final_data_error" in run["primary"]:
                row.final_data_error = float(np.asarray(run["primary"]["final_data_error"].read()).ravel()[0])
            if check:
                row.unreadable = check_readable(run, catalog)
    return row


def results(catalog: Any = None, *, scan_id: int | None = None, raw_uid: str | None = None,
            uid: str | None = None, all: bool = False,  # the documented keyword (shadows the builtin here only)
            only_success: bool = False) -> DerivedResult | list[RunSummary]:
    """The newest readable reconstruction of a raw scan: arrays, parameters, status (and reason if it
    failed). ``uid=`` picks one derived run; ``all=True`` lists them all (newest first)."""
    if uid is not None:
        if scan_id is not None or raw_uid is not None or all:
            raise NoResult("uid= picks one derived run: give it alone")
        return load_result(derived_run(catalog, uid), catalog)
    found = find_derived_runs(catalog, scan_id=scan_id, raw_uid=raw_uid, only_success=only_success)
    notes = []
    if scan_id is not None:
        dup = duplicate_scan_ids(catalog, scan_id, found)
        if dup:
            log.warning("%s", dup)
            notes.append(dup)
    if all:
        return [summarize(run, catalog) for run in found]
    if not found:
        raise NoResult(f"no reconstruction of {_what(scan_id, raw_uid)} in the catalog")
    # an interrupted run is the answer only when no other one is (newest first within each group)
    found.sort(key=lambda r: _run_interrupted(r))
    skipped: list[tuple[str, str]] = []
    for run in found:
        try:
            res = load_result(run, catalog)
        except UnreadableRun as exc:
            log.warning("%s; trying the next newest", exc)
            skipped.append((run.metadata["start"]["uid"], str(exc)))
            continue
        res.skipped, res.notes = skipped, notes
        if skipped:
            note = (f"showing derived run {res.uid}, the newest readable one of {_what(scan_id, raw_uid)}: "
                    f"{len(skipped)} newer one(s) cannot be read ({', '.join(u for u, _ in skipped)})")
            log.warning("%s", note)
            res.notes.append(note)
        return res
    raise UnreadableRun(f"none of the {len(found)} reconstruction(s) of {_what(scan_id, raw_uid)} can be read; "
                        f"the newest: {skipped[0][1]}")


def wait_for_derived(catalog: Any, raw_uid: str, timeout: float | None = 600.0, poll_s: float = 1.0,
                     newer_than: float | None = None) -> DerivedResult:
    """Wait until a finished derived run of ``raw_uid`` is in the catalog and return it (the newest
    readable one, as :func:`results`); a failed reconstruction is returned too (``res.ok`` False).

    Only runs that have a stop document count, and with ``newer_than`` (a Unix time) only those
    started after it. Raises :class:`TimeoutError` after ``timeout`` seconds (None: no limit).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        found = [r for r in find_derived_runs(catalog, raw_uid=raw_uid)
                 if r.metadata.get("stop") and (newer_than is None
                                                or r.metadata.get("start", {}).get("time", 0.0) >= newer_than)]
        if found:
            return results(catalog, raw_uid=raw_uid)
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no finished reconstruction of raw run {raw_uid} in the catalog after {timeout:g} s")
        time.sleep(poll_s)


def as_result_data(res: DerivedResult) -> Any:
    """The derived run's arrays as a :class:`hxn_ptycho.resultfile.ResultData` (for the figure), with
    the scan id, the object pixel size and the probe-mode log found in ``recon``."""
    from hxn_ptycho.resultfile import ResultData

    if not res.ok and not res.interrupted:
        raise NoResult(f"derived run {res.uid} failed ({res.reason}); there is nothing to plot")

    def curves(values: np.ndarray | None, width: int) -> np.ndarray:
        if values is None:
            return np.full((iters, width), np.nan)
        return np.asarray(values, dtype=float).reshape(iters, -1)

    iters = 0 if res.data_error is None else len(res.data_error)
    attrs = {k: v for k in ("probe_modes_log", "final_cost", "pixel_size_m", "lambda_nm", "z_m", "ccd_pixel_um")
             if (v := find_key(res.recon, k)) is not None}
    attrs["scan_scan_id"] = res.scan_id
    if res.start.get("frame") is not None:
        attrs["frame"] = res.start["frame"]                    # the stage frame: the figure's axes in µm of x, y
    if res.final_data_error is not None:
        attrs["final_data_error"] = res.final_data_error       # the derived run's one number, in the title
    return ResultData(object=res.object, probe=res.probe, positions_px=res.positions_px,
                      error_data=np.zeros(0) if res.data_error is None else np.asarray(res.data_error, float),
                      error_probe=curves(res.probe_error, res.probe.shape[0]),
                      error_object=curves(res.object_error, res.object.shape[0]),
                      probe_power_fraction=res.probe_power_fraction, params=res.recon, attrs=attrs)


def summary_png(res: DerivedResult, path: str | os.PathLike, truth: Any = None) -> str:
    """Object modes, probe modes and the convergence curves in one PNG (written atomically): the same
    figure as ``hxn-ptycho reconstruct --png``, at the object pixel size recorded in ``recon``;
    ``truth`` (a simulation's known object) beside the result."""
    from hxn_ptycho.plots import summary_png as plot

    status = " (interrupted)" if res.interrupted else ""
    plot(as_result_data(res), path, title=f"scan {res.scan_id} — derived run {res.uid[:8]}{status}", truth=truth)
    return str(path)
