"""The derived run of one reconstruction, written into the catalog's ``processed`` container.

:func:`publish_outcome` is the one publisher: the queue runner, the CLI and the Prefect flow call
it with the job's spec and the outcome record the job wrote (or a failure outcome when the job
died or could not start), and it writes the success or the failure.

Start: ``plan_name`` "hxn_ptycho_dm", ``plan_type`` "analysis", ``raw_uid``, the raw ``scan_id``,
``recon`` (the job spec unchanged — ``params``, ``geometry``, ``execution``, ``source`` — plus the
job's measured facts in ``recon["measured"]``), ``versions`` and ``host``; on success ``frame``:
where the object lies — ``rows`` "+y", ``cols`` "+x", ``origin_um`` the stage (x, y) of object pixel
[0, 0], ``pixel_um``, ``stage_frame`` (true when the scan file holds the recorded stage positions).
Stream ``primary`` (one event): ``object``, ``probe``, ``positions_px`` (and ``positions_refined_px``),
``probe_power_fraction``, ``final_probe_error`` and ``final_object_error`` as external HDF5
(``StreamResource``/``StreamDatum`` into a sidecar file beside the result file whose *virtual*
datasets map onto the result file's and carry the leading event axis Tiled expects), and the one
number ``final_data_error`` inline. Stream ``iterations`` (one event per iteration): ``data_error``
inline, ``probe_error`` and ``object_error`` external, served from the result file itself.
Stop: ``exit_status`` "success", or "fail" with ``reason`` — a failed reconstruction is recorded.

The publisher writes what the job wrote, once: it reads the result's attributes and its
per-iteration data error, never its arrays (the catalog serves them from the job's file, which
must therefore stay where the server can read it and must not change after publishing); it does
not hash the result again when the file still has the fingerprint the job recorded
(:func:`~.trust.check_result`); and it sends each node of the run once (:mod:`.runwriter`: 16
requests instead of bluesky's ``TiledWriter``'s 49 and a ``GET`` of the run's state, docs/quick-answers.md).

Exactly once. A job's derived run has a uid fixed by the job (:func:`run_uid`: raw uid + result
file), and its documents are saved *before* they are sent, as one file per job beside the result
(``<result>.docs.jsonl``: a header naming the catalog and the uid, then one ``[name, doc]`` a line).
:func:`send_saved` sends such a file under an exclusive lock and deletes it only once the catalog
holds the complete run: a run already complete there is not sent again, a half-written one (a
publisher killed mid-way, a catalog killed mid-publish) is deleted first and sent whole. So a
publish that failed is simply retried — by the queue runner (periodically), by ``listen`` at
start-up and by ``serve`` when it comes back (:func:`republish_all`) — and however often it is
retried, the catalog ends with one run of that uid, success or fail, never both.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from hxn_ptycho.errors import BadInput
from hxn_ptycho.spec import JobSpec, versions

from .catalog import (
    CatalogConfig,
    CatalogError,
    atomic_write_text,
    resolve_catalog,
    runs,
)

log = logging.getLogger(__name__)

PLAN_NAME = "hxn_ptycho_dm"
PLAN_TYPE = "analysis"
SIDE_SUFFIX = ".tiled.h5"
SAVED_SUFFIX = ".docs.jsonl"
SAVED_HEADER = "hxn_ptycho_saved_run"
PUBLISH_WORKERS = 4          # requests of one step of a publish sent side by side (runwriter.write_run)
_UID_NAMESPACE = uuid.UUID("6a1c2f1e-7d7b-4a53-9a0e-5f0f3b1c9d21")

Doc = tuple[str, dict]


def jsonable(value: Any) -> Any:
    """Plain JSON types only (numpy scalars/arrays, tuples, paths and bytes converted)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    """The package versions, looked up once per process (11 metadata lookups: tens of ms)."""
    return tuple(versions().items())


def start_metadata(raw_uid: str | None, recon: dict, **extra: Any) -> dict:
    recon = jsonable(dict(recon or {}))
    md = {"plan_name": PLAN_NAME, "plan_type": PLAN_TYPE, "raw_uid": raw_uid,
          "recon": recon, "versions": dict(_versions()), "host": socket.gethostname()}
    source = recon.get("source") or {}
    scan_id = source.get("scan_id", recon.get("scan_id"))
    scan_file = source.get("scan_file", recon.get("scan_file"))
    if scan_id is None and scan_file:
        scan_id = _scan_file_id(scan_file)
    if scan_id is not None:
        md["scan_id"] = scan_id
    md.update(jsonable(extra))
    return md


def _scan_file_id(path: str) -> Any:
    """The raw ``scan_id`` stored in a scan file's attributes, if it can be read."""
    try:
        from hxn_ptycho.scanfile import scan_info
        value = scan_info(path)["attrs"].get("scan_id")
        return int(value) if value is not None and int(value) >= 0 else None
    except Exception:  # noqa: BLE001 - an unreadable scan file just leaves scan_id unset
        return None


def write_sidecar(result_path: str | os.PathLike, res: Any) -> Path:
    """``<result>.tiled.h5``: what the ``primary`` stream serves, each with the leading event axis of 1
    that Tiled's stream datums want — ``object``, ``probe``, ``positions_px`` (and
    ``positions_refined_px``), ``probe_power_fraction`` and the last row of ``error/probe`` and
    ``error/object`` as ``final_probe_error``/``final_object_error``. All are HDF5 *virtual*
    datasets mapping onto the result file's own: a few kB whatever the scan size, written without
    reading or copying the arrays (``res`` gives only their shapes and types: a :class:`ResultData`
    or :class:`ResultLayout`)."""
    import h5py

    from hxn_ptycho.h5util import atomic_h5

    result = Path(result_path).resolve()
    side = Path(str(result_path) + SIDE_SUFFIX).resolve()
    with atomic_h5(side) as f:
        for key, name, row in _sidecar_keys(res):
            arr = getattr(res, name)
            shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
            source = h5py.VirtualSource(str(result), _DATASETS.get(name, name), shape=shape, dtype=dtype)
            if row is None:
                layout = h5py.VirtualLayout(shape=(1, *shape), dtype=dtype)
                layout[0] = source
            else:                                   # the last row of a curve (NaN when there is none)
                layout = h5py.VirtualLayout(shape=(1, *shape[1:]), dtype=dtype)
                if shape[0]:
                    layout[0] = source[shape[0] - 1]
            f.create_virtual_dataset(key, layout, fillvalue=np.nan if dtype.kind == "f" else None)
    return side


# the result file's dataset of each field (hxn_ptycho/resultfile.py)
_DATASETS = {"error_data": "error/data", "error_probe": "error/probe", "error_object": "error/object"}


def _sidecar_keys(res: Any) -> list[tuple[str, str, str | None]]:
    """(data key, field of ``res``, "last" for the last row of a curve) of the sidecar's datasets."""
    keys: list[tuple[str, str, str | None]] = [("object", "object", None), ("probe", "probe", None),
                                                ("positions_px", "positions_px", None)]
    if getattr(res, "positions_refined_px", None) is not None:       # --refine-positions: beside the nominal
        keys.append(("positions_refined_px", "positions_refined_px", None))
    return keys + [("probe_power_fraction", "probe_power_fraction", None),
                   ("final_probe_error", "error_probe", "last"), ("final_object_error", "error_object", "last")]


class ResultLayout:
    """What publishing needs of a result file, read without its arrays: the attributes, the
    per-iteration data error (one number per iteration, the ``iterations`` stream's table), and the
    shapes and types of everything else (h5py datasets, not read) — the job validated the file when
    it wrote it, and the catalog serves the arrays from the file itself."""

    def __init__(self, path: str | os.PathLike) -> None:
        import json as _json

        from hxn_ptycho.h5util import open_h5, require
        from hxn_ptycho.resultfile import KIND, ResultData, _jsonable
        self._file = open_h5(path, KIND)
        f = self._file
        self.object, self.probe = require(f, "object", KIND), require(f, "probe", KIND)
        self.positions_px = require(f, "positions_px", KIND)
        self.positions_refined_px = f.get("positions_refined_px", None)
        self.error_data = np.asarray(require(f, "error/data", KIND)[()], dtype=np.float64)
        self.error_probe, self.error_object = require(f, "error/probe", KIND), require(f, "error/object", KIND)
        self.probe_power_fraction = require(f, "probe_power_fraction", KIND)
        self.attrs = {k: _jsonable(v) for k, v in f.attrs.items()}
        self.params = _json.loads(self.attrs.pop("params", "{}") or "{}")
        self.iterations = int(self.error_data.shape[0])
        self.final_data_error = ResultData.final_data_error.fget(self)    # the one definition

    def close(self) -> None:
        self._file.close()


def _array_key(arr: Any, external: bool, shape: tuple[int, ...] | None = None) -> dict:
    shape = tuple(arr.shape) if shape is None else shape
    key = {"source": PLAN_NAME, "dtype": "array", "shape": list(shape), "dtype_numpy": np.dtype(arr.dtype).str}
    if external:
        key["external"] = "STREAM:"
    return key


def result_documents(result_path: str | os.PathLike, raw_uid: str | None, recon: dict,
                     uid: str | None = None) -> list[Doc]:
    """The complete derived run (success) of the result file at ``result_path`` (start uid ``uid``)."""
    res = ResultLayout(result_path)                 # attributes, shapes and the data-error curve: no array read
    try:
        return _result_documents(res, result_path, raw_uid, recon, uid)
    finally:
        res.close()


def _result_documents(res: Any, result_path: str | os.PathLike, raw_uid: str | None, recon: dict,
                      uid: str | None) -> list[Doc]:
    """The documents: every array is external — ``primary``'s in the sidecar (virtual datasets onto the
    result file), ``iterations``' per-mode curves in the result file itself — and only the numbers
    travel inline (``final_data_error``; the per-iteration ``data_error``)."""
    from event_model import compose_run

    recon = dict(recon or {})
    recon.setdefault("params", res.params)
    extra: dict[str, Any] = {}
    frame = res.attrs.get("frame")
    if frame:       # where the object lies: rows +y, columns +x, origin in µm (hxn_ptycho.engine.result_frame)
        extra["frame"] = json.loads(frame) if isinstance(frame, str) else frame
    if not (recon.get("source") or {}).get("scan_id", recon.get("scan_id")) and "scan_scan_id" in res.attrs:
        extra["scan_id"] = res.attrs["scan_scan_id"]
    result = Path(result_path).resolve()
    side = write_sidecar(result_path, res)
    bundle = compose_run(uid=uid, metadata=start_metadata(raw_uid, recon, result_file=str(result), **extra))
    docs: list[Doc] = [("start", bundle.start_doc)]
    number = {"source": PLAN_NAME, "dtype": "number", "shape": [], "dtype_numpy": "<f8"}
    sidecar = _sidecar_keys(res)
    data_keys = {key: _array_key(getattr(res, name), True, None if row is None else tuple(getattr(res, name).shape[1:]))
                 for key, name, row in sidecar}
    data_keys["final_data_error"] = dict(number)
    primary = bundle.compose_descriptor(name="primary", data_keys=data_keys)
    docs.append(("descriptor", primary.descriptor_doc))
    docs += _external(bundle, primary, side, [(key, f"/{key}") for key, _name, _row in sidecar], 1)
    now = time.time()
    final = res.final_data_error                  # the one definition (ResultData.final_data_error)
    data = {"final_data_error": float("nan") if final is None else final}
    docs.append(("event", primary.compose_event(data=data, timestamps={k: now for k in data})))
    n = res.iterations
    if n:
        it_keys = {"data_error": dict(number),
                   "probe_error": _array_key(res.error_probe, True, tuple(res.error_probe.shape[1:])),
                   "object_error": _array_key(res.error_object, True, tuple(res.error_object.shape[1:]))}
        iters = bundle.compose_descriptor(name="iterations", data_keys=it_keys)
        docs.append(("descriptor", iters.descriptor_doc))
        docs += _external(bundle, iters, result, [("probe_error", "/error/probe"), ("object_error", "/error/object")], n)
        page = {"data_error": [float(x) for x in res.error_data]}
        docs.append(("event_page", iters.compose_event_page(
            data=page, timestamps={k: [now] * n for k in page}, seq_num=list(range(1, n + 1)))))
    docs.append(("stop", bundle.compose_stop(**stop_status(recon, n))))
    return docs


def _external(bundle: Any, stream: Any, path: Path, keys: list[tuple[str, str]], rows: int) -> list[Doc]:
    """StreamResource + StreamDatum of each (data key, HDF5 dataset) of ``path``: ``rows`` events."""
    docs: list[Doc] = []
    for key, dataset in keys:
        sres = bundle.compose_stream_resource(mimetype="application/x-hdf5", uri=path.as_uri(), data_key=key,
                                              parameters={"dataset": dataset, "chunk_shape": [rows]})
        docs.append(("stream_resource", sres.stream_resource_doc))
        docs.append(("stream_datum", sres.compose_stream_datum(indices={"start": 0, "stop": rows},
                                                               descriptor=stream.descriptor_doc)))
    return docs


def stop_status(recon: dict, iterations_done: int) -> dict:
    """The stop document's status: "success" for a complete run; a run stopped early on request
    (Ctrl-C: ``measured.interrupted``) is "abort" with the iterations done — its data are kept, and
    :func:`hxn_ptycho.callbacks.query.results` never prefers it to a complete one."""
    measured = recon.get("measured") or {}
    if not measured.get("interrupted"):
        return {"exit_status": "success"}
    total = (recon.get("params") or {}).get("iterations")
    return {"exit_status": "abort",
            "reason": f"interrupted after {measured.get('iterations_done', iterations_done)}"
                      f"{f' of {total}' if total else ''} iterations (stopped on request; the result so far is kept)"}


def failure_documents(raw_uid: str | None, recon: dict, reason: str, uid: str | None = None) -> list[Doc]:
    """A derived run that records a failed reconstruction: start, then stop with ``fail`` and the reason."""
    from event_model import compose_run

    bundle = compose_run(uid=uid, metadata=start_metadata(raw_uid, recon))
    return [("start", bundle.start_doc), ("stop", bundle.compose_stop(exit_status="fail", reason=str(reason)))]


def write_documents(catalog: str | os.PathLike | CatalogConfig | None, docs: Iterable[Doc],
                    backup: str | os.PathLike | None = None) -> str:
    """Send one run's documents to the ``processed`` container exactly once; return its uid.

    With ``backup`` the documents are saved there *first* and sent by :func:`send_saved` (the file
    stays when the send fails, for a later retry, and the error says where); when even the save
    fails (a full disk) they are sent directly.
    """
    docs = list(docs)
    uid = docs[0][1]["uid"]
    if backup is not None:
        from .trust import Untrusted
        try:
            save_documents(backup, docs, catalog)
        except (OSError, Untrusted) as save_exc:          # a full disk, or a publish secret not ours
            log.error("could not save derived run %s to %s (%s): sending it unsaved", uid, backup, save_exc)
            saved_note = f"; saving its documents to {backup} failed too ({save_exc})"
        else:
            try:
                return send_saved(backup, catalog)
            except SendBusy:
                return uid                         # another process is sending these very documents
            except CatalogError as exc:
                raise CatalogError(f"{exc} (send them later with hxn_ptycho.callbacks.derived.republish; "
                                   "the queue runner, 'listen' and 'serve' retry them)") from exc
    else:
        saved_note = ""
    try:
        _deliver(resolve_catalog(catalog), docs, replace_partial=False)
    except Exception as exc:
        raise CatalogError(f"could not write derived run {uid} to the catalog {catalog}: "
                           f"{type(exc).__name__}: {exc}{saved_note}") from exc
    return uid


def save_documents(path: str | os.PathLike, docs: Iterable[Doc], catalog: Any = None) -> None:
    """Save one run's documents (atomically) for :func:`send_saved`: a header line, then ``[name, doc]`` lines."""
    from .trust import sign
    docs = list(docs)
    where = catalog.uri if isinstance(catalog, CatalogConfig) else (str(catalog) if catalog is not None else None)
    head = {"catalog": where, "uid": docs[0][1]["uid"], "saved": time.time()}
    lines = "".join(json.dumps([n, d]) + "\n" for n, d in docs)
    head["hmac"] = sign(_signed_text(head, lines), Path(path).parent)   # see trust.py: only ours are sent
    atomic_write_text(path, json.dumps([SAVED_HEADER, head]) + "\n" + lines)


def _signed_text(head: dict, lines: str) -> str:
    """What a saved file's HMAC covers: its header (without the HMAC) and every document line."""
    return json.dumps({k: v for k, v in head.items() if k != "hmac"}, sort_keys=True) + "\n" + lines


def read_saved(path: str | os.PathLike) -> tuple[dict, list[Doc]]:
    """(header, documents) of a saved-documents file, refused (:class:`~.trust.Untrusted`) unless it
    carries our signature (:func:`~.trust.verify_saved`)."""
    from .trust import Untrusted, verify_saved
    text = Path(path).read_text()
    first, _, lines = text.partition("\n")
    try:
        row = json.loads(first)
        if not (isinstance(row, list) and len(row) == 2 and row[0] == SAVED_HEADER and isinstance(row[1], dict)):
            raise ValueError("no header")
    except ValueError:
        raise Untrusted(f"refusing saved documents {path}: no hxn-ptycho header (not written by hxn-ptycho)") from None
    head = dict(row[1])
    verify_saved(path, _signed_text(head, lines), head.get("hmac"))
    rows = [json.loads(line) for line in lines.splitlines() if line.strip()]
    docs = [(str(n), d) for n, d in rows]
    if not docs or docs[0][0] != "start":
        raise CatalogError(f"{path} holds no run (its first document is not a start document)")
    return head, docs


def run_state(container: Any, uid: str) -> str:
    """``"absent"``, ``"complete"`` (it has its stop document) or ``"partial"`` in a runs container
    (any Tiled client of it). One request, without the Tiled client's retries: a catalog that is
    down is known at once, and the publish saved for later."""
    from tiled.client.utils import handle_error
    resp = container.context.http_client.get(f"{container.uri.rstrip('/')}/{uid}")
    if resp.status_code == 404:
        return "absent"
    metadata = handle_error(resp).json()["data"]["attributes"].get("metadata") or {}
    return "complete" if metadata.get("stop") else "partial"


class SendBusy(CatalogError):
    """Another process is sending these saved documents right now."""


def send_saved(path: str | os.PathLike, catalog: str | os.PathLike | CatalogConfig | None = None) -> str:
    """Send a saved-documents file to its catalog exactly once; return the run's uid.

    Under an exclusive ``flock`` of the file (another sender gets :class:`SendBusy`): a run of that
    uid already complete in the catalog is not sent again; a partial one is deleted, then the
    whole run is written; the file is deleted only when the catalog holds the complete run.
    """
    import fcntl

    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SendBusy(f"{path} is gone (sent by another process)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SendBusy(f"{path} is being sent by another process") from None
        try:
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                raise SendBusy(f"{path} was replaced while waiting")
        except FileNotFoundError:
            raise SendBusy(f"{path} is gone (sent by another process)") from None
        head, docs = read_saved(path)
        target = catalog if catalog is not None else head.get("catalog")
        uid = docs[0][1]["uid"]
        try:
            state = _deliver(resolve_catalog(target), docs, replace_partial=True)
        except Exception as exc:
            what = str(exc) if isinstance(exc, CatalogError) else f"{type(exc).__name__}: {exc}"
            raise CatalogError(f"could not write derived run {uid} to the catalog {target}: {what}; "
                               f"its documents are saved in {path}") from exc
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                path.unlink()
        # one line per publish: the caller (publish_outcome, republish_all) says it was written
        (log.info if state == "complete" else log.debug)(
            "derived run %s %s catalog %s", uid, "was already complete in the" if state == "complete" else
            "written to the", target)
        return uid
    finally:
        os.close(fd)


def _deliver(cfg: CatalogConfig, docs: list[Doc], *, replace_partial: bool) -> str:
    """Send one run unless the catalog has it; return the state found (``absent``, ``partial``, ``complete``).

    A partial run is deleted and sent whole when ``replace_partial`` (else left: a plain
    :func:`write_documents` without saved documents does not delete). The run's ``POST`` is the first
    request and tells whether the catalog has it (:class:`~.runwriter.RunExists`, 409): only then is
    its state read. The connection is kept for the process (:func:`_processed`); a request that finds
    it broken (a restarted server) is tried once more on a new one — the state is read first then,
    so nothing is sent twice.
    """
    import httpx

    from .runwriter import RunExists

    uid = docs[0][1]["uid"]
    sent = False
    for attempt in (0, 1):
        container = _processed(cfg, fresh=attempt > 0)
        try:
            if attempt == 0:                # the usual case, a new run: its POST is the check (no GET)
                try:
                    sent = True
                    _send(cfg, container, docs)
                    return "absent"
                except RunExists:
                    sent = False            # nothing of ours was sent: look at what the catalog has
            state = run_state(container, uid)
            replace = state == "partial" and (replace_partial or sent)   # ours, if the first try began it
            if replace:                                 # a half-written run (409 on a re-send): delete it first
                log.warning("derived run %s is half-written in the catalog: deleting it to send it whole", uid)
                container[uid].delete(recursive=True, external_only=False)
            if state == "absent" or replace:
                sent = True
                _send(cfg, container, docs)
            return state
        except httpx.TransportError:
            _PROCESSED.pop(_processed_key(cfg), None)
            if attempt:
                raise
            log.debug("the catalog connection to %s broke: trying once more on a new one", cfg.uri)
    raise AssertionError("unreachable")


_PROCESSED: dict[tuple, Any] = {}


def _processed_key(cfg: CatalogConfig) -> tuple:
    return cfg.uri, cfg.processed, cfg.resolve_api_key()


def _processed(cfg: CatalogConfig, fresh: bool = False) -> Any:
    """The ``processed`` container, as a plain Tiled client (no bluesky_tiled_plugins classes: their
    import takes seconds), one connection per catalog and process — a queue runner publishes every
    run through it. Missing containers are created as :func:`~.catalog.runs` does."""
    from .catalog import connect, container, ensure_containers
    from .query import _plain_structure_clients
    key = _processed_key(cfg)
    if fresh or key not in _PROCESSED:
        client = connect(cfg, structure_clients=_plain_structure_clients())
        if cfg.owns():
            ensure_containers(client, (cfg.raw, cfg.processed))
        _PROCESSED[key] = container(client, cfg.processed)
    return _PROCESSED[key]


def _send(cfg: CatalogConfig, container: Any, docs: list[Doc]) -> None:
    """Write one run: our own writer (:mod:`.runwriter`, a request per node), or bluesky's
    ``TiledWriter`` for documents it does not handle (saved by an older version)."""
    from .runwriter import RunExists, Unsupported, write_run
    try:
        write_run(container, docs, close_streams=cfg.streams(), workers=PUBLISH_WORKERS)
        return
    except Unsupported as why:
        log.info("derived run %s: written by TiledWriter (%s)", docs[0][1]["uid"], why)
    if run_state(container, docs[0][1]["uid"]) != "absent":      # as write_run's first POST would say
        raise RunExists(f"the catalog already holds a run {docs[0][1]['uid']}")
    from bluesky_tiled_plugins import TiledWriter
    writer = TiledWriter(runs(cfg, "processed"), max_array_size=0)
    for name, doc in docs:
        writer(name, doc)


def republish(path: str | os.PathLike, catalog: str | os.PathLike | CatalogConfig | None = None) -> str:
    """Send documents saved by a failed publish to the catalog (see :func:`send_saved`); return the run's uid."""
    return send_saved(path, catalog)


def saved_files(folders: Iterable[str | os.PathLike], depth: int = 3) -> list[Path]:
    """The saved-documents files in ``folders`` and their sub-folders down to ``depth`` levels."""
    out: list[Path] = []
    for folder in folders:
        base = Path(folder)
        for level in range(depth + 1):
            out += sorted(base.glob("/".join(["*"] * level + ["*" + SAVED_SUFFIX])))
    return list(dict.fromkeys(out))


def republish_all(folders: Iterable[str | os.PathLike], catalog: str | os.PathLike | CatalogConfig | None = None,
                  *, accept: Any = None, depth: int = 3) -> tuple[list[str], list[str]]:
    """Send every saved-documents file in ``folders``; return (uids sent or found complete, errors).

    ``accept(header)`` may refuse files meant for another catalog (``serve`` sends only its own).
    """
    from .trust import Untrusted
    sent, errors = [], []
    for path in saved_files(folders, depth):
        try:
            if accept is not None and not accept(read_saved(path)[0]):
                continue
            sent.append(send_saved(path, catalog))
            log.info("republished the saved derived run %s (%s)", sent[-1], path)
        except SendBusy:
            continue
        except Untrusted as exc:                   # planted or changed: never sent, and said so
            log.error("%s", exc)
            errors.append(f"{path}: {exc}")
        except (CatalogError, OSError, ValueError) as exc:
            errors.append(f"{path}: {exc}")
    return sent, errors


def publish_result(catalog: str, result_path: str, raw_uid: str | None, recon: dict) -> str:
    """Write the derived run of a finished reconstruction; return its uid (called by the job's rank 0)."""
    docs = result_documents(result_path, raw_uid, recon)
    uid = write_documents(catalog, docs, backup=str(result_path) + ".docs.jsonl")
    log.info("derived run %s (raw %s) written to %s", uid, raw_uid, catalog)
    return uid


def publish_failure(catalog: str, raw_uid: str | None, recon: dict, reason: str) -> str:
    """Record a failed reconstruction as a derived run with ``exit_status`` "fail"; return its uid."""
    recon = dict(recon or {})
    backup = recon.pop("failure_backup", None)
    docs = failure_documents(raw_uid, recon, reason)
    uid = write_documents(catalog, docs, backup=backup)
    log.info("failed reconstruction of raw run %s recorded as %s: %s", raw_uid, uid, reason)
    return uid


# -- the one publisher --------------------------------------------------------------------------

class UnreadableResult(BadInput):
    """The result would be written where the catalog server cannot read it."""


def check_readable(spec: JobSpec) -> None:
    """Refuse a run whose result the catalog server could not read, naming the folder to add.

    Known for an embedded server (its ``catalog.json`` lists the folders it reads); for a remote
    server the readable folders are not known here and nothing is refused.
    """
    from .catalog import resolve_catalog
    if not spec.source.catalog:
        return
    cfg = resolve_catalog(spec.source.catalog)
    if cfg.readable is None:
        return
    folder = Path(spec.source.result_file).resolve().parent
    roots = [Path(r).resolve() for r in cfg.readable]
    if any(folder == r or r in folder.parents for r in roots):
        return
    raise UnreadableResult(
        f"the catalog server at {cfg.uri} cannot read {folder} (it reads {', '.join(map(str, roots))}): write the "
        f"result there (-o), or restart the server with 'hxn-ptycho serve --dir DIR --read {folder}'")


def run_uid(spec: JobSpec | dict) -> str:
    """The derived run's uid fixed by the job: a UUID-5 of (raw uid, result file).

    Whoever publishes this job's outcome — its runner, a restarted queue, the callback recording
    a run that never became a job, the listener recovering a run it missed — publishes under this
    uid, so the catalog can never hold two derived runs of one job.
    """
    if isinstance(spec, dict):
        spec = JobSpec.from_dict(spec)
    key = json.dumps([spec.source.raw_uid, str(spec.source.result_file)])
    return str(uuid.uuid5(_UID_NAMESPACE, key))


def saved_path(spec: JobSpec) -> Path | None:
    """The job's one saved-documents file, ``<result>.docs.jsonl`` (success or fail alike)."""
    return Path(str(spec.source.result_file) + SAVED_SUFFIX) if spec.source.result_file else None


def publish_outcome(spec: JobSpec | dict, outcome: dict | None, *, reason: str | None = None,
                    uid: str | None = None) -> str | None:
    """Publish a job's outcome as its derived run in ``spec.source.catalog``; return the run's uid.

    ``outcome`` is the job's outcome record (:func:`hxn_ptycho.job.read_outcome`), or None when the
    job wrote none (it died, or never started): the run is then recorded as failed with ``reason``.
    The start's ``recon`` is ``spec.recon(outcome["measured"])``. Returns None without a catalog.
    ``uid`` (e.g. :func:`run_uid`) makes the publish idempotent: a run of that uid already complete
    in the catalog is left as it is. The documents are saved in :func:`saved_path` before they are
    sent (see :func:`write_documents`), one file per job whatever the outcome.
    """
    from hxn_ptycho.job import failure_outcome
    if isinstance(spec, dict):
        spec = JobSpec.from_dict(spec)
    src = spec.source
    if not src.catalog:
        return None
    if outcome is None:
        outcome = failure_outcome(spec, reason or "the job ended without an outcome record")
    recon = spec.recon(outcome.get("measured"))
    backup = saved_path(spec)
    docs = None
    why = str(outcome.get("reason") or reason or "unknown failure")
    if outcome.get("status") == "success":
        from .trust import Untrusted, check_result
        try:
            check_result(src.result_file, outcome)      # this job's result, as the job wrote it
            docs = result_documents(outcome["result_file"], src.raw_uid, recon, uid=uid)
        except Untrusted as exc:
            why = f"the job's result is not published: {exc}"
            log.error("raw run %s: %s", src.raw_uid, why)
        except Exception as exc:  # noqa: BLE001 - an unreadable result (or no space for its sidecar) is a failure
            why = f"the job succeeded but its result could not be published: {type(exc).__name__}: {exc}"
            log.error("raw run %s: %s", src.raw_uid, why)
    if docs is not None:
        uid = write_documents(src.catalog, docs, backup=backup)
        log.info("derived run %s (raw %s) written to %s", uid, src.raw_uid, src.catalog)
    else:
        docs = failure_documents(src.raw_uid, recon, why, uid=uid)
        uid = write_documents(src.catalog, docs, backup=backup)
        log.info("failed reconstruction of raw run %s recorded as %s: %s", src.raw_uid, uid, why)
    return uid
