"""The derived run of one reconstruction, written into the catalog's ``processed`` container.

:func:`publish_outcome` is the one publisher: the queue runner, the CLI and the Prefect flow call
it with the job's spec and the outcome record the job wrote (or a failure outcome when the job
died or could not start), and it writes the success or the failure.

Start: ``plan_name`` "hxn_ptycho_dm", ``plan_type`` "analysis", ``raw_uid``, the raw ``scan_id``,
``recon`` (the job spec unchanged — ``params``, ``geometry``, ``execution``, ``source`` — plus the
job's measured facts in ``recon["measured"]``), ``versions`` and ``host``.
Stream ``primary`` (one event): ``object``, ``probe`` and ``positions_px`` as external HDF5
(``StreamResource``/``StreamDatum`` into a sidecar file beside the result file, whose datasets
carry the leading event axis Tiled expects), ``probe_power_fraction`` and the final errors inline.
Stream ``iterations``: the per-iteration errors inline, one event per iteration.
Stop: ``exit_status`` "success", or "fail" with ``reason`` — a failed reconstruction is recorded.

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


def start_metadata(raw_uid: str | None, recon: dict, **extra: Any) -> dict:
    recon = jsonable(dict(recon or {}))
    md = {"plan_name": PLAN_NAME, "plan_type": PLAN_TYPE, "raw_uid": raw_uid,
          "recon": recon, "versions": versions(), "host": socket.gethostname()}
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
    """``<result>.tiled.h5`` with ``object``, ``probe``, ``positions_px`` (each with a leading axis of 1,
    as Tiled's stream datums want): HDF5 *virtual* datasets that map onto the result file's own — a
    few hundred bytes, written without reading or copying the arrays (``res`` gives only their
    shapes and types: a :class:`ResultData` or :class:`ResultLayout`)."""
    import h5py

    from hxn_ptycho.h5util import atomic_h5

    result = Path(result_path).resolve()
    side = Path(str(result_path) + SIDE_SUFFIX).resolve()
    keys = ["object", "probe", "positions_px"]
    if getattr(res, "positions_refined_px", None) is not None:
        keys.append("positions_refined_px")
    with atomic_h5(side) as f:
        for key in keys:
            arr = getattr(res, key)
            shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
            layout = h5py.VirtualLayout(shape=(1, *shape), dtype=dtype)
            layout[0] = h5py.VirtualSource(str(result), key, shape=shape, dtype=dtype)
            f.create_virtual_dataset(key, layout)
    return side


class ResultLayout:
    """What publishing needs of a result file, read without its large arrays: the shapes and types
    of ``object``, ``probe``, positions (h5py datasets, not read), the small arrays (errors, probe
    power) and the attributes — the job validated the file when it wrote it."""

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
        self.error_probe = np.asarray(require(f, "error/probe", KIND)[()], dtype=np.float64)
        self.error_object = np.asarray(require(f, "error/object", KIND)[()], dtype=np.float64)
        self.probe_power_fraction = np.asarray(require(f, "probe_power_fraction", KIND)[()], dtype=np.float64)
        self.attrs = {k: _jsonable(v) for k, v in f.attrs.items()}
        self.params = _json.loads(self.attrs.pop("params", "{}") or "{}")
        self.iterations = int(self.error_data.shape[0])
        self.final_data_error = ResultData.final_data_error.fget(self)    # the one definition

    def close(self) -> None:
        self._file.close()


def _array_key(arr: np.ndarray, external: bool) -> dict:
    key = {"source": PLAN_NAME, "dtype": "array", "shape": list(arr.shape), "dtype_numpy": arr.dtype.str}
    if external:
        key["external"] = "STREAM:"
    return key


def result_documents(result_path: str | os.PathLike, raw_uid: str | None, recon: dict,
                     uid: str | None = None) -> list[Doc]:
    """The complete derived run (success) of the result file at ``result_path`` (start uid ``uid``)."""
    res = ResultLayout(result_path)                 # shapes and small arrays only: no re-read, no copy
    try:
        return _result_documents(res, result_path, raw_uid, recon, uid)
    finally:
        res.close()


def _result_documents(res: Any, result_path: str | os.PathLike, raw_uid: str | None, recon: dict,
                      uid: str | None) -> list[Doc]:
    from event_model import compose_run

    recon = dict(recon or {})
    recon.setdefault("params", res.params)
    extra: dict[str, Any] = {}
    if not (recon.get("source") or {}).get("scan_id", recon.get("scan_id")) and "scan_scan_id" in res.attrs:
        extra["scan_id"] = res.attrs["scan_scan_id"]
    side = write_sidecar(result_path, res)
    bundle = compose_run(uid=uid, metadata=start_metadata(raw_uid, recon,
                                                          result_file=str(Path(result_path).resolve()), **extra))
    docs: list[Doc] = [("start", bundle.start_doc)]
    external = {"object": res.object, "probe": res.probe, "positions_px": res.positions_px}   # h5py: not read
    if getattr(res, "positions_refined_px", None) is not None:       # --refine-positions: beside the nominal
        external["positions_refined_px"] = res.positions_refined_px
    inline = {"probe_power_fraction": np.asarray(res.probe_power_fraction, dtype=np.float64),
              "final_probe_error": np.asarray(res.error_probe[-1], dtype=np.float64),
              "final_object_error": np.asarray(res.error_object[-1], dtype=np.float64)}
    data_keys = {k: _array_key(v, True) for k, v in external.items()}
    data_keys.update({k: _array_key(v, False) for k, v in inline.items()})
    data_keys["final_data_error"] = {"source": PLAN_NAME, "dtype": "number", "shape": []}
    primary = bundle.compose_descriptor(name="primary", data_keys=data_keys)
    docs.append(("descriptor", primary.descriptor_doc))
    for key in external:
        sres = bundle.compose_stream_resource(mimetype="application/x-hdf5", uri=side.as_uri(), data_key=key,
                                              parameters={"dataset": f"/{key}", "chunk_shape": [1]})
        docs.append(("stream_resource", sres.stream_resource_doc))
        docs.append(("stream_datum", sres.compose_stream_datum(indices={"start": 0, "stop": 1},
                                                               descriptor=primary.descriptor_doc)))
    now = time.time()
    data = {k: v.tolist() for k, v in inline.items()}
    final = res.final_data_error                  # the one definition (ResultData.final_data_error)
    data["final_data_error"] = float("nan") if final is None else final
    docs.append(("event", primary.compose_event(data=data, timestamps={k: now for k in data})))
    it_keys = {"data_error": {"source": PLAN_NAME, "dtype": "number", "shape": []},
               "probe_error": _array_key(np.asarray(res.error_probe[0], dtype=np.float64), False),
               "object_error": _array_key(np.asarray(res.error_object[0], dtype=np.float64), False)}
    iters = bundle.compose_descriptor(name="iterations", data_keys=it_keys)
    docs.append(("descriptor", iters.descriptor_doc))
    n = res.iterations
    page = {"data_error": [float(x) for x in res.error_data],
            "probe_error": np.asarray(res.error_probe, dtype=np.float64).tolist(),
            "object_error": np.asarray(res.error_object, dtype=np.float64).tolist()}
    docs.append(("event_page", iters.compose_event_page(
        data=page, timestamps={k: [now] * n for k in page}, seq_num=list(range(1, n + 1)))))
    docs.append(("stop", bundle.compose_stop(**stop_status(recon, n))))
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
        container = runs(resolve_catalog(catalog), "processed")
        if run_state(container, uid) == "absent":
            _send(container, docs)
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
    """``"absent"``, ``"complete"`` (it has its stop document) or ``"partial"`` in a runs container."""
    try:
        node = container[uid]
    except KeyError:
        return "absent"
    return "complete" if (node.metadata or {}).get("stop") else "partial"


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
            container = runs(resolve_catalog(target), "processed")
            state = run_state(container, uid)
            if state == "partial":                 # a half-written run (409 on a re-send): delete it first
                log.warning("derived run %s is half-written in the catalog: deleting it to send it whole", uid)
                container[uid].delete(recursive=True, external_only=False)
            if state != "complete":
                _send(container, docs)
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


def _send(container: Any, docs: list[Doc]) -> None:
    from bluesky_tiled_plugins import TiledWriter
    writer = TiledWriter(container, max_array_size=0)
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
