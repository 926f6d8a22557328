"""A derived run's documents into Tiled in the fewest requests (the publisher's writer).

bluesky's ``TiledWriter`` (bluesky_tiled_plugins/writing/tiled_writer.py, ``_RunWriter``) is written
for a RunEngine that streams: it creates each node, then updates it, and closes every node's stream
at the stop — 49 requests for one derived run, about 0.9 s on the embedded catalog, most of a
publish (docs/quick-answers.md). A derived run is known whole before the first request, so this
writer sends each node once, already complete, with the same layout ``TiledWriter`` gives a run
(the ``BlueskyRun`` v3 container; a ``BlueskyEventStream`` + ``composite`` container per stream with
the descriptor as its metadata; an ``internal`` SQL table of the events' scalar data with ``seq_num``,
``time`` and ``ts_<key>`` columns; one external ``application/x-hdf5`` array node per
StreamResource data key; the stop document in the run's metadata):

- the run, each stream: one ``POST`` each;
- each external array: one ``POST /register`` with its final data source (TiledWriter: a register
  and a data-source ``PUT``);
- each stream's events: the table's ``POST`` and one ``PATCH`` with all rows;
- the stop: one ``PATCH`` of the run's metadata;
- each node's stream is closed (``DELETE /stream/close``) only where the server may have subscribers
  (a streaming cache); an embedded server has none (``CatalogConfig.streams``).

16 requests for a derived run of the embedded catalog instead of 49 and a ``GET`` of its state (17
with refined positions): the run's ``POST`` comes first and answers 409 when the catalog has the run
(:class:`RunExists`, nothing else sent). Six steps (the first array of each file registered before
the others, so its asset row is inserted once): the requests of one step go side by side
(``workers``; the publisher uses 4), which
about halves the time on a loaded server. An external array's structure is
the HDF5 dataset's shape — the events along the first axis, then the data key's shape, as the
publisher writes them (``derived.write_sidecar``); unlike ``TiledWriter``'s consolidator a data key of
shape ``[1]`` keeps its axis. No retries: a request that fails leaves a partial run, which the
publisher deletes and sends again whole (``derived.send_saved``).

What this writer does not handle (Resource/Datum documents, event data that are arrays, other
mimetypes, templated files) raises :class:`Unsupported`; the publisher then uses ``TiledWriter``
(documents saved by older versions).
"""
from __future__ import annotations

import functools
import json
import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

RUN_SPEC = {"name": "BlueskyRun", "version": "3.0"}
STREAM_SPECS = [{"name": "BlueskyEventStream", "version": "3.0"}, {"name": "composite", "version": None}]
HDF5 = "application/x-hdf5"
SQL_TABLE = "application/x-tiled-sql-table"
ARROW_FILE = "application/vnd.apache.arrow.file"
RESERVED_KEYS = ("time", "seq_num")
# the numpy type of a JSON-typed data key without dtype_numpy (bluesky_tiled_plugins' JSON_TO_NUMPY_DTYPE)
JSON_TO_NUMPY = {"number": "<f8", "array": "<f8", "boolean": "|b1", "string": "<U0", "integer": "<i8"}
SCALAR_TYPES = {"number", "integer", "boolean", "string"}


class Unsupported(ValueError):
    """Documents this writer does not write (the publisher then uses bluesky's TiledWriter)."""


class RunExists(Exception):
    """The catalog already holds a run of this uid: its ``POST`` answered 409, and nothing else was sent."""


@dataclass
class _External:
    resource: dict
    descriptor: str
    rows: int = 0


@dataclass
class _Stream:
    descriptor: dict
    rows: list[dict] = field(default_factory=list)
    external: dict[str, _External] = field(default_factory=dict)     # data key -> its StreamResource


@dataclass
class RunPlan:
    """A run's documents sorted into what is sent: the start, the streams, the stop."""

    start: dict
    streams: dict[str, _Stream]
    stop: dict | None

    @property
    def uid(self) -> str:
        return str(self.start["uid"])


def plan_run(docs: list[tuple[str, dict]]) -> RunPlan:
    """Sort one run's documents; :class:`Unsupported` for anything this writer does not write."""
    if not docs or docs[0][0] != "start":
        raise Unsupported("the documents do not begin with a start document")
    start = dict(docs[0][1])
    streams: dict[str, _Stream] = {}
    by_uid: dict[str, _Stream] = {}
    resources: dict[str, dict] = {}
    stop = None
    for name, doc in docs[1:]:
        if name == "descriptor":
            if doc["name"] in streams:
                raise Unsupported(f"a second descriptor of stream {doc['name']!r}")
            stream = streams[doc["name"]] = by_uid[doc["uid"]] = _Stream(_normalized_descriptor(doc))
        elif name in ("event", "event_page"):
            stream = _stream_of(by_uid, doc)
            stream.rows += _rows(doc) if name == "event_page" else [_row(doc)]
        elif name == "stream_resource":
            params = doc.get("parameters") or {}
            if doc.get("mimetype") != HDF5 or params.get("template") or not params.get("dataset"):
                raise Unsupported(f"stream resource of {doc.get('mimetype')!r} (only one HDF5 dataset of one file)")
            resources[doc["uid"]] = doc
        elif name == "stream_datum":
            stream = _stream_of(by_uid, doc)
            sres = resources.get(doc["stream_resource"])
            if sres is None:
                raise Unsupported(f"stream datum before its stream resource {doc['stream_resource']}")
            key = sres["data_key"]
            ext = stream.external.setdefault(key, _External(sres, doc["descriptor"]))
            if ext.resource["uid"] != sres["uid"] or doc["indices"]["start"] != ext.rows:
                raise Unsupported(f"{key}: several resources or non-consecutive datums")
            ext.rows = int(doc["indices"]["stop"])
        elif name == "stop":
            stop = dict(doc)
        else:
            raise Unsupported(f"{name} documents")
    for sname, stream in streams.items():
        keys = stream.descriptor.get("data_keys", {})
        for key, spec in keys.items():
            external = "external" in spec
            if external and key not in stream.external:
                raise Unsupported(f"{sname}/{key} is external but has no stream resource")
            if not external and (spec.get("dtype") not in SCALAR_TYPES or list(spec.get("shape") or [])):
                raise Unsupported(f"{sname}/{key}: event data that are arrays")
    return RunPlan(start=start, streams=streams, stop=stop)


def _stream_of(by_uid: dict[str, _Stream], doc: dict) -> _Stream:
    try:
        return by_uid[doc["descriptor"]]
    except KeyError:
        raise Unsupported(f"a document of an unknown descriptor {doc.get('descriptor')}") from None


def _normalized_descriptor(doc: dict) -> dict:
    """The descriptor as bluesky's RunNormalizer gives it to the writer: every data key with its
    ``dtype_numpy``, ``shape`` a list; reserved names (``time``, ``seq_num``) are refused."""
    doc = json.loads(json.dumps(doc))
    for key, spec in doc.get("data_keys", {}).items():
        if key in RESERVED_KEYS:
            raise Unsupported(f"data key {key!r} is a reserved name")
        if not spec.get("dtype_numpy") and spec.get("dtype") in JSON_TO_NUMPY:
            spec["dtype_numpy"] = JSON_TO_NUMPY[spec["dtype"]]
        if spec.get("shape") is None:
            spec["shape"] = []
        if "external" in spec and spec["external"] is None:
            spec["external"] = ""
    return doc


def _row(event: dict) -> dict:
    row = {"seq_num": event["seq_num"], "time": event["time"], **event["data"]}
    row.update({f"ts_{k}": v for k, v in event["timestamps"].items()})
    return row


def _rows(page: dict) -> list[dict]:
    n = len(page["seq_num"])
    return [_row({"seq_num": page["seq_num"][i], "time": page["time"][i],
                  "data": {k: v[i] for k, v in page["data"].items()},
                  "timestamps": {k: v[i] for k, v in page["timestamps"].items()}}) for i in range(n)]


def _truncate(data: Any) -> Any:
    """Numbers JSON can carry (bluesky_tiled_plugins.utils.truncate_json_overflow, as TiledWriter does)."""
    if isinstance(data, dict):
        return {k: _truncate(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_truncate(v) for v in data]
    if isinstance(data, (int, float)) and not isinstance(data, bool) and math.isfinite(data) and not data % 1 \
            and not (1 - 2**53 <= data <= 2**53 - 1):
        return min(max(data, 1 - 2**53), 2**53 - 1)
    return data


def _array_source(ext: _External, spec: dict) -> dict:
    """The data source of one external HDF5 array: the dataset as it is in the file (events first)."""
    from tiled.structures.array import ArrayStructure, BuiltinDtype
    from tiled.structures.core import StructureFamily
    from tiled.structures.data_source import Asset, DataSource, Management

    params = ext.resource.get("parameters") or {}
    shape = (ext.rows, *[int(d) for d in spec.get("shape") or []])
    structure = ArrayStructure(data_type=BuiltinDtype.from_numpy_dtype(np.dtype(spec["dtype_numpy"])), shape=shape,
                               chunks=tuple((d,) for d in shape), dims=None)
    source = DataSource(mimetype=HDF5, structure_family=StructureFamily.array, structure=structure,
                        parameters={"dataset": params["dataset"], "swmr": params.get("swmr", True),
                                    "locking": params.get("locking")},
                        assets=[Asset(data_uri=ext.resource["uri"], is_directory=False, parameter="data_uris",
                                      num=0)],
                        properties={}, management=Management.external)
    return asdict(source)


def _table(rows: list[dict]) -> tuple[Any, bytes]:
    """(the table's structure, its rows as an Arrow file) — the ``internal`` table of a stream."""
    import pyarrow
    from tiled.structures.table import TableStructure

    table = pyarrow.Table.from_pylist(rows)
    schema = table.schema
    for i, fld in enumerate(table.schema):             # all-null columns: strings (as TiledWriter does)
        if pyarrow.types.is_null(fld.type):
            schema = schema.set(i, fld.with_type(pyarrow.string()))
    table = table.cast(schema)
    sink = pyarrow.BufferOutputStream()
    with pyarrow.ipc.new_file(sink, schema) as writer:
        writer.write_table(table)
    return TableStructure.from_schema(schema, 1), bytes(sink.getvalue())


def _dump(body: Any) -> bytes:
    from tiled.utils import safe_json_dump       # what Tiled's client sends (numpy and enums included)
    return bytes(safe_json_dump(body))


class _Http:
    """The few requests of a run: JSON in, JSON out, Tiled's error messages (``handle_error``)."""

    def __init__(self, container: Any) -> None:
        self.http = container.context.http_client
        self.base = container.uri                                   # .../api/v1/metadata/<processed>
        self.ancestors = list(container.path_parts)
        self.count = 0
        self.lock = threading.Lock()

    def url(self, route: str, *parts: str) -> str:
        return "/".join([self.base.replace("/metadata/", f"/{route}/", 1), *parts])

    def send(self, method: str, url: str, **kwargs: Any) -> Any:
        from tiled.client.utils import handle_error
        with self.lock:
            self.count += 1
        return handle_error(self.http.request(method, url, **kwargs))

    def create(self, parts: list[str], key: str, family: str, *, metadata: dict, specs: list[dict],
               sources: list[dict] = (), register: bool = False) -> None:
        body = {"id": key, "ancestors": self.ancestors + parts, "metadata": metadata, "structure_family": family,
                "specs": specs, "data_sources": list(sources), "access_tags": None}
        self.send("POST", self.url("register" if register else "metadata", *parts),
                  content=_dump(body), headers={"Content-Type": "application/json"})


def write_run(container: Any, docs: list[tuple[str, dict]], *, close_streams: bool = True, workers: int = 1) -> int:
    """Write one run's documents into ``container`` (a Tiled client of a ``CatalogOfBlueskyRuns``
    container); return the number of requests sent. :class:`Unsupported` before any request for
    documents this writer does not handle; :class:`RunExists` when the run's ``POST`` finds a run
    of that uid (nothing else is sent: the caller decides whether it is complete).

    In order: the run; its streams; each stream's arrays and tables; the stop (so a run with a
    stop document is complete); the streams closed. ``workers`` > 1 sends the requests of one step
    side by side (one connection each)."""
    plan = plan_run(docs)
    http = _Http(container)
    start = dict(plan.start)
    access_tags = start.pop("tiled_access_tags", None)
    if access_tags or start.get("tiled_specs"):
        raise Unsupported("access tags or extra specs in the start document")
    uid = plan.uid
    streams: list[Callable[[], None]] = []
    first: list[Callable[[], None]] = []       # the first array of each file: its asset row inserted alone
    children: list[Callable[[], None]] = []
    assets: set[str] = set()
    opened: list[list[str]] = []
    for sname, stream in plan.streams.items():
        meta = {k: v for k, v in stream.descriptor.items() if k not in ("name", "object_keys", "run_start")}
        streams.append(functools.partial(http.create, [uid], sname, "container", metadata=_truncate(meta),
                                         specs=STREAM_SPECS))
        keys = stream.descriptor.get("data_keys", {})
        for key, ext in stream.external.items():
            # Tiled looks an asset up by its URI and inserts it when missing (``_put_asset``): two
            # registers of one file side by side both insert, and PostgreSQL refuses the second (500).
            uri = ext.resource["uri"]
            (children if uri in assets else first).append(functools.partial(
                http.create, [uid, sname], key, "array", metadata={}, specs=[],
                sources=[_array_source(ext, keys[key])], register=True))
            assets.add(uri)
            opened.append([uid, sname, key])
        if stream.rows:
            children.append(functools.partial(_write_table, http, [uid, sname], stream.rows, keys))
            opened.append([uid, sname, "internal"])
        opened.append([uid, sname])
    steps: list[list[Callable[[], None]]] = [
        [functools.partial(http.create, [], uid, "container", metadata={"start": _truncate(start)}, specs=[RUN_SPEC])],
        streams, first, children]
    if plan.stop is not None:
        patch = [{"op": "add", "path": "/stop", "value": _truncate(plan.stop)}]
        steps.append([functools.partial(
            http.send, "PATCH", http.url("metadata", uid), params={"drop_revision": True},
            content=_dump({"content-type": "application/json-patch+json", "metadata": patch, "specs": None,
                           "access_tags": None}), headers={"Content-Type": "application/json"})])
    if close_streams:                                       # the run last, as TiledWriter does
        steps += [[functools.partial(http.send, "DELETE", http.url("stream/close", *parts)) for parts in opened],
                  [functools.partial(http.send, "DELETE", http.url("stream/close", uid))]]
    import httpx
    try:                        # the run's POST also says whether the catalog has it (no GET before)
        steps[0][0]()
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 409:
            raise RunExists(f"the catalog already holds a run {uid}") from None
        raise
    _send_steps(steps[1:], workers)
    return http.count


def _send_steps(steps: list[list[Callable[[], Any]]], workers: int) -> None:
    """Each step's requests side by side on ``workers`` threads, one step after the other; the first
    error ends the run (a partial run). Where no thread can be started — a publish from an ``atexit``
    handler, after ``concurrent.futures`` has shut down (the profile leaving a session) — the rest
    go one at a time."""
    from concurrent.futures import Future, ThreadPoolExecutor
    pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    pools = [pool] if pool is not None else []
    try:
        for step in steps:
            futures: list[Future] = []
            for call in step:
                if pool is not None:
                    try:
                        futures.append(pool.submit(call))
                        continue
                    except RuntimeError:                # "cannot schedule new futures after interpreter shutdown"
                        pool = None
                call()
            for future in futures:
                future.result()
    finally:
        for p in pools:
            p.shutdown(wait=True)


def _write_table(http: _Http, parts: list[str], rows: list[dict], keys: dict) -> None:
    """A stream's ``internal`` table: created with its schema, then all rows in one append."""
    structure, body = _table(rows)
    columns = {k: v for k, v in keys.items() if k in structure.columns}
    source = {"structure_family": "table", "structure": asdict(structure), "mimetype": SQL_TABLE,
              "parameters": {}, "assets": [], "management": "writable", "properties": {}}
    http.create(parts, "internal", "table", metadata=_truncate(columns), specs=[], sources=[source])
    http.send("PATCH", http.url("table/partition", *parts, "internal"), params={"partition": 0},
              content=body, headers={"Content-Type": ARROW_FILE})
