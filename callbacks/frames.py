"""The one frame source: a run's external data → (file, dataset, frame range) chunks → arrays.

A *live* run (documents collected by :mod:`.collector`) and a *stored* run (a Tiled catalog's
run, see :func:`stored_run`) yield the same description, a :class:`Source` — a list of
:class:`Chunk` (file, HDF5 dataset, first and last frame) — and one reader, :func:`read`, reads
it with one waiting rule: a file, dataset or frame that is not there yet is waited for up to
``wait_s``, anything else fails at once, naming the file.

The HXN specs and their dataset paths follow the beamline's handlers:

==========================  ==================================  ==============================
spec                        dataset                             datum → frames
==========================  ==================================  ==============================
``TPX_HDF5``                ``/entry/instrument/detector/data`` ``point_number`` · fpp … +fpp
``MERLIN_FLY_STREAM_V2``    ``/entry/instrument/detector/data`` ``point_number`` · fpp … +fpp
``MERLIN_HDF5_BULK``        ``/entry/instrument/detector/data`` the whole dataset
``AD_HDF5`` / ``HDF5``      ``/entry/data/data``                ``point_number`` · fpp … +fpp
``PANDA``                   ``/<field>``                        the whole dataset
``SIS_HDF51_FLY_STREAM_V1`` ``<column>``                        ``point_number`` · fpp … +fpp
stream_resource (HDF5)      ``parameters['dataset']``           stream_datum ``indices``
==========================  ==================================  ==============================

(NSLS-II-HXN/hxntools ``handlers/timepix.py`` HDF5DatasetSliceHandler/TimepixHDF5Handler,
``handlers/rasmi2.py`` BulkMerlinStream/SISHDF5Handler, ``handlers/bulkdata.py``
BulkMerlin/PandAHandlerHDF5; databroker's AreaDetectorHDF5Handler for ``AD_HDF5``.) A datum with
``frame_per_point = N`` is N frames (fly2dpd's single Eiger datum holds the whole scan). Files
are opened read-only without file locking, first plainly (so HDF5 detects a truncated file, see
:func:`open_h5`) and as a SWMR reader only while a SWMR writer holds them, and the dataset is
refreshed before its length is read. Detector files must lie under the data roots
(:func:`check_paths`, :mod:`.trust`). Paths are remapped like the handlers'
``/data`` → ``/nsls2/data/hxn/legacy`` (:data:`DEFAULT_REMAP`, configurable).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from .collector import CollectedRun

log = logging.getLogger(__name__)

DETECTOR_DATASET = "/entry/instrument/detector/data"      # hxntools TPX/Merlin handlers
AD_DATASET = "/entry/data/data"                           # databroker AreaDetectorHDF5Handler
SPEC_DATASET = {"TPX_HDF5": DETECTOR_DATASET, "MERLIN_FLY_STREAM_V2": DETECTOR_DATASET,
                "MERLIN_HDF5_BULK": DETECTOR_DATASET, "AD_HDF5": AD_DATASET, "AD_HDF5_SWMR": AD_DATASET,
                "HDF5": AD_DATASET}
WHOLE_DATASET_SPECS = {"MERLIN_HDF5_BULK", "PANDA"}
SPECS = (*SPEC_DATASET, "PANDA", "SIS_HDF51_FLY_STREAM_V1")
# fly2dpd's SIS resource says frame_per_point = points × supersample but holds one value per point
CLIPPED_SPECS = {"SIS_HDF51_FLY_STREAM_V1"}
# hxntools handlers/hxn_handler.py and timepix.py: '/data/...' → '/nsls2/data/hxn/legacy/...'
DEFAULT_REMAP: tuple[tuple[str, str], ...] = (("/data", "/nsls2/data/hxn/legacy"),)


class SourceError(ValueError):
    """External data cannot be described or read; the message names the run, key and file."""


class NotReady(SourceError):
    """A file, dataset or frame is not there (yet): the detector may still be writing it."""


@dataclass(frozen=True)
class Chunk:
    """Frames ``start:stop`` of ``dataset`` in ``file`` (``stop`` None: to the end of the dataset)."""

    file: str
    dataset: str
    start: int = 0
    stop: int | None = None
    spec: str = ""


@dataclass
class Source:
    """Where one data key's values are: chunks in order; ``expected`` frames in all (if known)."""

    key: str
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        return list(dict.fromkeys(c.file for c in self.chunks))

    def describe(self) -> list[tuple[str, str, int, int | None]]:
        """(file, dataset, start, stop) with contiguous chunks merged."""
        out: list[list] = []
        for c in self.chunks:
            last = out[-1] if out else None
            if last and last[0] == c.file and last[1] == c.dataset and last[3] == c.start and c.stop is not None:
                last[3] = c.stop
            else:
                out.append([c.file, c.dataset, c.start, c.stop])
        return [tuple(x) for x in out]


def remap_path(path: str, remap: tuple[tuple[str, str], ...] = DEFAULT_REMAP) -> str:
    """Apply the first matching prefix remap (``/data/x`` → ``/nsls2/data/hxn/legacy/x``) if the
    original does not exist and the remapped one does (so local test folders are never touched)."""
    for old, new in remap:
        if path == old or path.startswith(old.rstrip("/") + "/"):
            candidate = new.rstrip("/") + path[len(old.rstrip("/")):]
            if not os.path.exists(path) and os.path.exists(candidate):
                return candidate
    return path


def path_from_uri(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme not in ("file", ""):
        raise SourceError(f"cannot read detector data from {uri!r}: only local files are supported")
    path = unquote(parts.path)
    if parts.netloc and parts.netloc not in ("localhost",):
        path = "/" + parts.netloc + path if not path.startswith("/") else path
    return path


def resource_file(res: dict) -> str:
    root = res.get("root") or ""
    path = res.get("resource_path") or ""
    return os.path.join(root, path.lstrip("/")) if root and not path.startswith(root) else path


# -- describing: documents → Source ------------------------------------------------------------

def _datum_chunk(run: CollectedRun, ref: Any, index: int, key: str,
                 remap: tuple[tuple[str, str], ...]) -> Chunk:
    if ref is None:
        raise SourceError(f"run {run.uid}: event {index + 1} has no value for '{key}'")
    datum = run.datums.get(ref)
    if datum is None:
        raise SourceError(f"run {run.uid}: '{key}' of event {index + 1} refers to datum {ref!r} "
                          "that was never announced")
    res = run.resources.get(datum.get("resource"))
    if res is None:
        raise SourceError(f"run {run.uid}: datum {ref!r} refers to an unknown resource {datum.get('resource')!r}")
    spec = str(res.get("spec", ""))
    kw = dict(res.get("resource_kwargs") or {})
    dkw = dict(datum.get("datum_kwargs") or {})
    path = remap_path(resource_file(res), remap)
    fpp = int(kw.get("frame_per_point", 1) or 1)
    if spec in SPEC_DATASET:
        dataset = kw.get("dataset") or SPEC_DATASET[spec]
    elif spec == "PANDA":
        if "field" not in dkw:
            raise SourceError(f"run {run.uid}: PANDA datum {ref!r} has no 'field'")
        dataset = "/" + str(dkw["field"]).lstrip("/")
    elif spec == "SIS_HDF51_FLY_STREAM_V1":
        if "column" not in dkw:
            raise SourceError(f"run {run.uid}: SIS datum {ref!r} has no 'column'")
        dataset = str(dkw["column"])
    else:
        raise SourceError(f"run {run.uid}: '{key}' is stored with resource spec {spec!r}, which is not "
                          f"supported (supported: {', '.join(SPECS)}, and stream_resource HDF5)")
    if spec in WHOLE_DATASET_SPECS:
        return Chunk(path, dataset, 0, None, spec)
    point = int(dkw.get("point_number", index))
    return Chunk(path, dataset, point * fpp, (point + 1) * fpp, spec)


def _stream_chunks(run: CollectedRun, key: str, remap: tuple[tuple[str, str], ...]) -> list[Chunk]:
    srs = {uid: sr for uid, sr in run.stream_resources.items() if sr.get("data_key") == key}
    if not srs:
        raise SourceError(f"run {run.uid}: no stream_resource for '{key}'")
    chunks = []
    for sd in sorted((d for d in run.stream_datums if d.get("stream_resource") in srs),
                     key=lambda d: (d.get("seq_nums") or {}).get("start", 0)):
        sr = srs[sd["stream_resource"]]
        mimetype = sr.get("mimetype", "application/x-hdf5")
        if "hdf5" not in str(mimetype):
            raise SourceError(f"run {run.uid}: '{key}' is stored as {mimetype!r}; only HDF5 is supported")
        params = dict(sr.get("parameters") or {})
        spec = str(params.get("spec", ""))
        dataset = params.get("dataset") or SPEC_DATASET.get(spec)
        if not dataset and spec == "PANDA" and params.get("field"):
            dataset = "/" + str(params["field"]).lstrip("/")
        if not dataset and spec == "SIS_HDF51_FLY_STREAM_V1" and params.get("column"):
            dataset = str(params["column"])
        if not dataset:
            raise SourceError(f"run {run.uid}: the stream_resource of '{key}' names no dataset")
        path = remap_path(path_from_uri(sr.get("uri", "")), remap)
        fpp = int(params.get("multiplier") or params.get("frame_per_point") or 1)
        ind = sd.get("indices") or {}
        if spec in WHOLE_DATASET_SPECS or params.get("_whole"):
            chunks.append(Chunk(path, dataset, 0, None, spec))
        else:
            chunks.append(Chunk(path, dataset, int(ind.get("start", 0)) * fpp, int(ind.get("stop", 1)) * fpp, spec))
    if not chunks:
        raise SourceError(f"run {run.uid}: no stream_datum for '{key}'")
    return chunks


class PathRefused(SourceError):
    """A document names a detector file outside the data roots (or its resource's root)."""


def check_paths(run: CollectedRun, source: Source, remap: tuple[tuple[str, str], ...],
                roots: tuple[str, ...] | None) -> Source:
    """Refuse (:class:`PathRefused`, naming the file) a source whose files lie outside the data roots
    (:func:`.trust.refuse_data_file`): a document cannot make us read what it likes."""
    from .trust import data_roots, refuse_data_file
    allowed = data_roots(roots)
    own = {remap_path(resource_file(r), remap): remap_path(str(r["root"]), remap)
           for r in run.resources.values() if r.get("root")}
    for path in source.files:
        why = refuse_data_file(path, allowed, own.get(path))
        if why is not None:
            raise PathRefused(f"run {run.uid}: '{source.key}': {why}")
    return source


def describe(run: CollectedRun, key: str, stream: str = "primary",
             remap: tuple[tuple[str, str], ...] = DEFAULT_REMAP, roots: tuple[str, ...] | None = None) -> Source:
    """The :class:`Source` of external data key ``key`` in ``stream`` (datums or stream datums), its
    files checked against the data ``roots`` (None: the defaults, see :func:`.trust.data_roots`)."""
    data_key = run.data_keys(stream).get(key)
    if data_key is None:
        raise SourceError(f"run {run.uid}: no data key '{key}' in the '{stream}' stream "
                          f"(keys: {sorted(run.data_keys(stream))})")
    refs = run.columns.get(stream, {}).get(key)
    external = str(data_key.get("external", ""))
    if external.upper().startswith("STREAM") or (refs is None and any(
            sr.get("data_key") == key for sr in run.stream_resources.values())):
        return check_paths(run, Source(key, _stream_chunks(run, key, remap)), remap, roots)
    if refs is None:
        raise SourceError(f"run {run.uid}: '{key}' has no values in the '{stream}' stream")
    return check_paths(run, Source(key, [_datum_chunk(run, ref, i, key, remap) for i, ref in enumerate(refs)]),
                       remap, roots)


def is_external(run: CollectedRun, key: str, stream: str = "primary") -> bool:
    return bool(run.data_keys(stream).get(key, {}).get("external"))


# -- reading: Source → arrays (one reader, one waiting rule) -------------------------------------

class Truncated(NotReady):
    """A detector file is shorter than its HDF5 superblock says: damaged, or still being copied."""


@contextlib.contextmanager
def open_h5(path: str) -> Iterator[Any]:
    """Open a detector file read-only, without file locking (as hxntools' handlers), so that damage shows.

    A plain open first: HDF5 then checks the file's length against its superblock, so a truncated
    file is :class:`Truncated` (waited for like any file not ready — a copy may still be running —
    then a failure naming it), never frames of zeros. Only a file that a writer holds open in SWMR
    mode ("already open for write") is opened as a SWMR reader, as the live handlers do.
    """
    import h5py
    if not os.path.exists(path):
        raise NotReady(f"detector file {path} does not exist")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as exc:
        text = str(exc)
        if "truncated file" in text:
            size = os.path.getsize(path)
            raise Truncated(f"detector file {path} is truncated: it holds {size} bytes, fewer than its HDF5 "
                            f"header records ({text.rpartition('(')[2].rstrip(')')})") from None
        try:                                   # held open by a SWMR writer: read it as the live handlers do
            f = h5py.File(path, "r", libver="latest", swmr=True, locking=False)
        except (OSError, ValueError):
            raise NotReady(f"cannot open detector file {path}: {exc}") from None
    try:
        yield f
    finally:
        f.close()


def _dataset(f: Any, chunk: Chunk) -> Any:
    try:
        d = f[chunk.dataset]
    except KeyError:
        raise NotReady(f"detector file {chunk.file} has no dataset {chunk.dataset!r} (yet)") from None
    with contextlib.suppress(Exception):
        d.id.refresh()
    return d


def _with_wait(fn: Any, wait_s: float) -> Any:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return fn()
        except NotReady:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.25)


def read(source: Source, wait_s: float = 5.0, region: tuple[slice, slice] | None = None,
         dtype: Any = None) -> np.ndarray:
    """All values of ``source`` concatenated along the first axis (native dtype unless ``dtype``).

    ``region`` (rows, cols) reads only that part of each frame (a crop). Missing files, datasets
    or frames are waited for up to ``wait_s`` seconds (the detector may still be writing), then
    :class:`NotReady` names what is missing.
    """
    def attempt() -> np.ndarray:
        parts: list[np.ndarray] = []
        by_file: dict[str, list[Chunk]] = {}
        order: list[tuple[str, int]] = []
        for c in source.chunks:
            order.append((c.file, len(by_file.setdefault(c.file, []))))
            by_file[c.file].append(c)
        got: dict[tuple[str, int], np.ndarray] = {}
        for path, chunks in by_file.items():
            with open_h5(path) as f:
                dsets: dict[str, Any] = {}
                for i, c in enumerate(chunks):
                    if c.dataset not in dsets:            # one dataset object (refreshed once) per file
                        dsets[c.dataset] = _dataset(f, c)
                    d = dsets[c.dataset]
                    stop = d.shape[0] if c.stop is None else c.stop
                    if c.spec in CLIPPED_SPECS:     # the SIS handler slices past the end (hxntools rasmi2.py)
                        stop = min(stop, d.shape[0])
                    if stop > d.shape[0]:
                        raise NotReady(f"frames {c.start}..{stop - 1} of {c.dataset} are missing from {path} "
                                       f"(it holds {d.shape[0]})")
                    sel: tuple = (slice(c.start, stop),)
                    if region is not None and d.ndim >= 3:
                        sel = sel + tuple(region)
                    got[(path, i)] = np.asarray(d[sel])
        parts = [got[k] for k in order]
        out = np.concatenate(parts) if parts else np.zeros((0,))
        return out if dtype is None else out.astype(dtype, copy=False)
    return _with_wait(attempt, wait_s)


def frame_shape(source: Source, wait_s: float = 5.0) -> tuple[tuple[int, ...], Any]:
    """(frame shape, dtype) of the first chunk's dataset."""
    def attempt() -> tuple[tuple[int, ...], Any]:
        c = source.chunks[0]
        with open_h5(c.file) as f:
            d = _dataset(f, c)
            return tuple(d.shape[1:]), d.dtype
    return _with_wait(attempt, wait_s)


def iter_frames(source: Source, wait_s: float = 5.0, batch: int = 256) -> Iterator[np.ndarray]:
    """The frames of ``source`` in batches of about ``batch`` (native dtype), for one pass statistics."""
    for c in source.chunks:
        stop = c.stop
        if stop is None:
            def length(c: Chunk = c) -> int:
                with open_h5(c.file) as f:
                    return int(_dataset(f, c).shape[0])
            stop = _with_wait(length, wait_s)
        for lo in range(c.start, stop, batch):
            yield read(Source(source.key, [Chunk(c.file, c.dataset, lo, min(lo + batch, stop), c.spec)]), wait_s)


# -- a run's column: internal values or external data ---------------------------------------------

def column(run: CollectedRun, key: str, stream: str = "primary", wait_s: float = 5.0,
           remap: tuple[tuple[str, str], ...] = DEFAULT_REMAP,
           roots: tuple[str, ...] | None = None) -> np.ndarray | None:
    """The values of ``key`` in ``stream`` as one flat float array (external data resolved and
    concatenated, e.g. PandA encoder or SIS scaler datums); None if the stream has no such key."""
    if key not in run.data_keys(stream) and key not in run.columns.get(stream, {}):
        return None
    if is_external(run, key, stream):
        return read(describe(run, key, stream, remap, roots), wait_s).astype(np.float64).ravel()
    values = run.columns.get(stream, {}).get(key)
    if values is None:
        return None
    if any(v is None for v in values):
        missing = [i + 1 for i, v in enumerate(values) if v is None]
        raise SourceError(f"run {run.uid}: '{key}' is missing in {len(missing)} event(s) (first: event {missing[0]})")
    return np.asarray(values, dtype=np.float64).ravel()


# -- a stored run: Tiled data sources → the same documents ------------------------------------------

def stored_run(catalog: Any, uid: str | int | None = None) -> CollectedRun:
    """A :class:`CollectedRun` of a stored raw run, read from its metadata and data sources.

    ``catalog`` is a catalog spec (URL, config, :class:`~.catalog.CatalogConfig`), a Tiled
    container client, or the run's client itself (then ``uid`` is None). Scalars and small
    columns are read; external arrays are *not* downloaded: each external key becomes a
    ``stream_resource``/``stream_datum`` pair built from its data source (asset URI, dataset,
    spec, frames per point), so :func:`describe`/:func:`read` read the files as for a live run.
    """
    run_client = _run_client(catalog, uid)
    md = dict(run_client.metadata)
    start = dict(md.get("start") or {})
    run = CollectedRun(start=start, stop=dict(md.get("stop") or {}) or None)
    streams = _stream_names(run_client)
    for stream in streams:
        node = run_client[stream]
        smd = dict(node.metadata or {})
        data_keys = {k: dict(v) for k, v in (smd.get("data_keys") or {}).items()}
        desc_uid = f"stored-{stream}"
        cols: dict[str, list] = {}
        n_events = 0                                  # events of the stream, as the catalog holds them
        base = getattr(node, "base", node)            # a composite stream: its parts (tables, arrays)
        for part, child in base.items():
            family = str(getattr(child, "structure_family", ""))
            if family.endswith("table"):
                table = child.read()
                for col in table.columns:
                    if col not in ("seq_num", "time"):
                        cols[str(col)] = list(np.asarray(table[col]))
            elif data_keys.get(part, {}).get("external") or _is_external_node(child):
                _add_stored_source(run, child, part, desc_uid)
                with contextlib.suppress(Exception):
                    n_events = max(n_events, int(child.shape[0]))
                data_keys[part] = {**data_keys.get(part, {}), "external": "STREAM:"}
            else:
                try:
                    cols[part] = list(np.asarray(child.read()))
                except Exception:  # noqa: BLE001 - a node that is not an array is not a column
                    continue
        run.descriptors[desc_uid] = {"uid": desc_uid, "name": stream, "data_keys": data_keys,
                                     "object_keys": dict(smd.get("object_keys") or {}),
                                     "configuration": dict(smd.get("configuration") or {})}
        run.columns[stream] = cols
        n = max(max((len(v) for v in cols.values()), default=0), n_events)
        run.seq_nums[stream] = list(range(1, n + 1))
    return run


def _run_client(catalog: Any, uid: Any) -> Any:
    if uid is None:
        return catalog
    if isinstance(catalog, (str, os.PathLike)) or type(catalog).__name__ == "CatalogConfig":
        from .catalog import runs
        catalog = runs(catalog, "raw")
    try:
        return catalog[uid]
    except KeyError:
        raise SourceError(f"no run {uid!r} in the catalog") from None


def _stream_names(run_client: Any) -> list[str]:
    keys = list(run_client.keys())
    if "streams" in keys:                 # older TiledWriter layout: run/streams/<name>
        return [f"streams/{k}" for k in run_client["streams"]]
    return [k for k in keys if k not in ("config",)]


def _is_external_node(child: Any) -> bool:
    try:
        sources = child.data_sources()
    except Exception:  # noqa: BLE001 - not an array client
        return False
    return any(getattr(s, "management", None) is not None and str(s.management).endswith("external")
               for s in sources or [])


def _add_stored_source(run: CollectedRun, child: Any, key: str, desc_uid: str) -> None:
    for i, ds in enumerate(child.data_sources()):
        params = dict(getattr(ds, "parameters", None) or {})
        assets = list(getattr(ds, "assets", None) or [])
        if not assets:
            raise SourceError(f"run {run.uid}: stored key '{key}' has no data file (asset)")
        uri = assets[0].data_uri
        structure = getattr(ds, "structure", None)
        shape = list((structure.get("shape") if isinstance(structure, dict) else getattr(structure, "shape", None))
                     or [])
        n_points = int(shape[0]) if shape else 1
        # one HXN detector/PandA/SIS file per scan and key: the whole dataset is this key's data
        params["_whole"] = True
        sr_uid = f"stored-{key}-{i}"
        run.stream_resources[sr_uid] = {"uid": sr_uid, "data_key": key, "uri": uri,
                                        "mimetype": getattr(ds, "mimetype", "application/x-hdf5"),
                                        "parameters": params}
        run.stream_datums.append({"uid": f"{sr_uid}/0", "stream_resource": sr_uid, "descriptor": desc_uid,
                                  "indices": {"start": 0, "stop": n_points},
                                  "seq_nums": {"start": 1, "stop": n_points + 1}})


# -- making the HXN specs readable by the Tiled server (TiledWriter patches) --------------------------

def _patch_resource(doc: dict) -> dict:
    """Name the HDF5 dataset of the HXN specs the TiledWriter does not know, so the Tiled server
    can serve the arrays (``h.data('eiger2_image')``); SIS resources record one value per point
    although they say ``frame_per_point = points × supersample``, so that claim is dropped."""
    spec = str(doc.get("spec", "")).upper()
    kw = dict(doc.get("resource_kwargs") or {})
    if spec in ("MERLIN_FLY_STREAM_V2", "MERLIN_HDF5_BULK") and not kw.get("dataset"):
        kw["dataset"] = DETECTOR_DATASET
    if spec == "SIS_HDF51_FLY_STREAM_V1":
        kw.pop("frame_per_point", None)
    doc["resource_kwargs"] = kw
    return doc


def _patch_datum(doc: dict) -> dict:
    """PANDA ``field`` and SIS ``column`` datums name their dataset (hxntools' handlers read
    ``/<field>`` and ``<column>``)."""
    kw = dict(doc.get("datum_kwargs") or {})
    spec = kw.get("_resource_spec")
    if spec == "PANDA" and "field" in kw:
        kw["dataset"] = "/" + str(kw.pop("field")).lstrip("/")
    elif spec == "SIS_HDF51_FLY_STREAM_V1" and "column" in kw:
        kw["dataset"] = str(kw.pop("column"))
    doc["datum_kwargs"] = kw
    return doc


def _patch_descriptor(doc: dict) -> dict:
    """fly2dpd's SIS channels are external arrays written as float32 (93-scanplan-panda.py
    ExportSISDataPanda creates them with dtype "f") but described without a dtype."""
    import re
    for key, dk in (doc.get("data_keys") or {}).items():
        if re.fullmatch(r"sclr\d+_ch\d+", key) and dk.get("external") and dk.get("dtype") == "array" \
                and not dk.get("dtype_numpy") and not dk.get("dtype_str"):
            dk["dtype_numpy"] = "<f4"
    return doc


TILED_WRITER_PATCHES = {"resource": _patch_resource, "datum": _patch_datum, "descriptor": _patch_descriptor}
