"""The NSLS-II HXN scan file ``scan_<N>.h5``: read, validate and atomically write.

Fields (HXN names and units):

- ``diffamp`` float32 (N, n, n): sqrt(intensity), zero frequency at pixel [0, 0]
- ``points`` float64 (2, N): positions in micrometres, row 0 = x (object columns), row 1 = y (rows)
- ``lambda_nm``, ``z_m``, ``ccd_pixel_um``: wavelength, detector distance, detector pixel
- optional ``mask`` bool (n, n), true = good pixel; ``probe_guess`` complex (n, n) or (M, n, n)
- attributes such as ``scan_id`` and ``raw_uid``

The object pixel size is λ·z / (n·Δ). Each MPI rank may read only its own slice of frames.

Indexing: patterns and the object are ``[row, col] = [y, x]``. A scan file written by NSLS2/ptycho_gui
(``nsls2ptycho/core/HXN_databroker.py`` ``save_data``: datasets ``x_pixel_m``, ``dr_x``, ... and
``diffamp`` "nz*nx*ny", i.e. ``[x, y]``-indexed, with the raw stage positions in ``points`` and the
signs ``x_direction = y_direction = -1`` of ``ptycho_param.py`` left to its engine) is read with
that indexing undone and those signs folded into the frames (:func:`from_ptycho_gui`), so it
reconstructs in the stage frame like the files this project writes (attribute ``frame``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import Any

import h5py
import numpy as np

from .h5util import FileFormatError, atomic_h5, open_h5, read_h5, require, require_finite, require_shape, scalar

KIND = "scan"
#: datasets only a ptycho_gui scan file has (HXN_databroker.py save_data)
PTYCHO_GUI_FIELDS = ("x_pixel_m", "y_pixel_m", "dr_x", "x_depth_field_m")
PTYCHO_GUI_FRAME = {"rows": "+y", "cols": "+x", "positions": "the recorded stage positions (µm)",
                    "converted": "ptycho_gui scan file: [x, y] indexing undone (transpose) and its default "
                                 "x_direction = y_direction = -1 (ptycho_param.py) folded into the frames"}


def is_ptycho_gui(f: h5py.File) -> bool:
    """A scan file written by ptycho_gui (its own datasets, no ``frame`` attribute of ours)."""
    return "frame" not in f.attrs and any(k in f for k in PTYCHO_GUI_FIELDS)


def from_ptycho_gui(diffamp: np.ndarray) -> np.ndarray:
    """ptycho_gui's ``[x, y]``-indexed patterns (zero frequency at [0, 0]) → ours, in the stage frame:
    the transpose (its axis 0 is x) then q → −q along both axes (its engine negates x and y)."""
    t = np.swapaxes(diffamp, -1, -2)
    return np.ascontiguousarray(np.roll(np.flip(t, (-2, -1)), (1, 1), (-2, -1)))


@dataclass
class ScanData:
    diffamp: np.ndarray                 # (N, n, n) float32, or a rank's slice of it
    points: np.ndarray                  # (2, N_total) float64 µm — always every view
    lambda_nm: float
    z_m: float
    ccd_pixel_um: float
    mask: np.ndarray | None = None      # (n, n) bool, true = good
    probe_guess: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    views: slice = field(default_factory=lambda: slice(None))  # which views ``diffamp`` holds

    @property
    def n(self) -> int:
        return int(self.diffamp.shape[-1])

    @property
    def n_views(self) -> int:
        return int(self.points.shape[1])

    @property
    def pixel_size_m(self) -> float:
        """Object pixel size λ·z / (n·Δ) in metres."""
        return self.lambda_nm * 1e-9 * self.z_m / (self.n * self.ccd_pixel_um * 1e-6)

    def validate(self, filename: str = "<memory>") -> None:
        d = self.diffamp
        if d.ndim != 3 or d.shape[1] != d.shape[2]:
            raise FileFormatError(f"{KIND} file {filename}: field 'diffamp' has shape {d.shape}, expected (N, n, n)")
        if self.points.ndim != 2 or self.points.shape[0] != 2:
            raise FileFormatError(f"{KIND} file {filename}: field 'points' has shape {self.points.shape}, expected (2, N)")
        if self.n_views == 0:
            raise FileFormatError(f"{KIND} file {filename}: the scan has no views (empty 'points')")
        expected = len(range(*self.views.indices(self.n_views)))
        if d.shape[0] != expected:
            raise FileFormatError(
                f"{KIND} file {filename}: 'diffamp' holds {d.shape[0]} frames but 'points' has {expected} positions")
        require_finite(self.points, "points", KIND, filename)
        require_finite(d, "diffamp", KIND, filename)
        if d.size and float(d.min()) < 0:
            raise FileFormatError(f"{KIND} file {filename}: field 'diffamp' has negative values (it must be sqrt(intensity))")
        for name in ("lambda_nm", "z_m", "ccd_pixel_um"):
            v = float(getattr(self, name))
            if not np.isfinite(v) or v <= 0:
                raise FileFormatError(f"{KIND} file {filename}: field '{name}' = {v} must be a positive finite number")
        if self.mask is not None:
            require_shape(self.mask.shape, (self.n, self.n), "mask", KIND, filename)
            if not self.mask.any():
                raise FileFormatError(f"{KIND} file {filename}: field 'mask' masks every pixel")
        if self.probe_guess is not None:
            pg = self.probe_guess
            if pg.ndim not in (2, 3) or pg.shape[-2:] != (self.n, self.n):
                raise FileFormatError(
                    f"{KIND} file {filename}: field 'probe_guess' has shape {pg.shape}, expected (n, n) or (M, n, n) with n = {self.n}")
            require_finite(pg, "probe_guess", KIND, filename)


def _write_header(f: h5py.File, scan: ScanData) -> None:
    """Everything of a scan file but its frames and positions: geometry, mask, probe guess, attributes."""
    f["lambda_nm"] = float(scan.lambda_nm)
    f["z_m"] = float(scan.z_m)
    f["ccd_pixel_um"] = float(scan.ccd_pixel_um)
    if scan.mask is not None:
        f.create_dataset("mask", data=np.asarray(scan.mask, dtype=bool))
    if scan.probe_guess is not None:
        f.create_dataset("probe_guess", data=np.asarray(scan.probe_guess))
    for k, v in scan.attrs.items():
        f.attrs[k] = v


def write_scan(path: str | os.PathLike, scan: ScanData, extras: dict[str, np.ndarray] | None = None) -> None:
    """Validate and write a scan file atomically (temporary name, then rename).

    ``extras`` are further datasets (e.g. ``truth/object`` of a simulation), written as given.
    """
    scan.validate(str(path))
    with atomic_h5(path) as f:
        f.create_dataset("diffamp", data=np.asarray(scan.diffamp, dtype=np.float32), chunks=(1,) + scan.diffamp.shape[1:])
        f.create_dataset("points", data=np.asarray(scan.points, dtype=np.float64))
        _write_header(f, scan)
        for k, v in (extras or {}).items():
            f.create_dataset(k, data=np.asarray(v))


def _points(f: h5py.File, path: str | os.PathLike) -> h5py.Dataset:
    p = require(f, "points", KIND)
    if p.ndim != 2 or p.shape[0] != 2:
        raise FileFormatError(f"{KIND} file {path}: field 'points' has shape {p.shape}, expected (2, N)")
    return p


def scan_info(path: str | os.PathLike) -> dict[str, Any]:
    """Shape and geometry of a scan file without reading its frames."""
    with open_h5(path, KIND) as f:
        d = require(f, "diffamp", KIND)
        if d.ndim != 3 or d.shape[1] != d.shape[2]:
            raise FileFormatError(f"{KIND} file {path}: field 'diffamp' has shape {d.shape}, expected (N, n, n)")
        p = _points(f, path)
        if p.shape[1] != d.shape[0]:
            raise FileFormatError(
                f"{KIND} file {path}: 'diffamp' has {d.shape[0]} frames but 'points' has {p.shape[1]} positions")
        if d.shape[0] == 0:
            raise FileFormatError(f"{KIND} file {path}: the scan has no views (empty 'diffamp')")
        return {"n_views": int(d.shape[0]), "n": int(d.shape[1]), "attrs": file_attrs(f)}


def file_attrs(f: h5py.File) -> dict[str, Any]:
    """A scan file's attributes: the root's, and those a growing file gives its final value only at
    the stop (``final_attrs/<name>``, UTF-8 text in a dataset; see :class:`GrowingScanWriter`), once
    written (an empty one is not known yet)."""
    attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    group = f.get(FINAL_ATTRS)
    if isinstance(group, h5py.Group):
        for k, d in group.items():
            if isinstance(d, h5py.Dataset) and d.shape and d.shape[0]:
                attrs[k] = bytes(np.asarray(d[()], np.uint8)).decode("utf-8")
    return attrs


def final_attr_datasets(values: dict[str, str]) -> dict[str, np.ndarray]:
    """``values`` (attribute name → text) as the datasets a growing file writes them to at the stop
    (``final_attrs/<name>``): the extra datasets of :func:`write_scan` that make a one-shot file of
    the same scan equal to a complete growing one."""
    return {f"{FINAL_ATTRS}/{k}": np.frombuffer(_text(k, v).encode("utf-8"), np.uint8).copy() for k, v in values.items()}


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise FileFormatError(f"{KIND}: the final value of attribute {name!r} must be text (JSON), got "
                              f"{type(value).__name__}")
    return value


def _read_fields(f: h5py.File, path: str | os.PathLike, info: dict[str, Any], diffamp: np.ndarray,
                 points: np.ndarray, views: slice) -> ScanData:
    """The scan's scalar and small fields around frames already read; validated."""
    mask = np.asarray(require(f, "mask", KIND)[()], dtype=bool) if "mask" in f else None
    probe_guess = np.asarray(f["probe_guess"][()]) if "probe_guess" in f else None
    if is_ptycho_gui(f):
        import json
        diffamp = from_ptycho_gui(diffamp)
        mask = None if mask is None else from_ptycho_gui(mask)
        info = {**info, "attrs": {**info["attrs"], "frame": json.dumps(PTYCHO_GUI_FRAME)}}
    scan = ScanData(
        diffamp=diffamp, points=points,
        lambda_nm=scalar(f, "lambda_nm", KIND), z_m=scalar(f, "z_m", KIND),
        ccd_pixel_um=scalar(f, "ccd_pixel_um", KIND),
        mask=mask, probe_guess=probe_guess, attrs=info["attrs"], views=views)
    scan.validate(str(path))
    return scan


def read_scan(path: str | os.PathLike, views: slice = slice(None)) -> ScanData:
    """Read and validate a scan file; ``views`` selects the frames this process reads (a hyperslab)."""
    info = scan_info(path)
    with open_h5(path, KIND) as f:
        points = np.asarray(f["points"][()], dtype=np.float64)
        start, stop, step = views.indices(info["n_views"])
        if step != 1:
            raise ValueError("views must be a contiguous slice")
        diffamp = np.asarray(f["diffamp"][start:stop], dtype=np.float32)
        return _read_fields(f, path, info, diffamp, points, slice(start, stop))


def read_points(path: str | os.PathLike) -> np.ndarray:
    """The positions (2, N) µm of every view of a scan file, without its frames (the file's shape is
    checked by the read of the frames that follows, :func:`read_scan_views`)."""
    with open_h5(path, KIND) as f:
        return np.asarray(_points(f, path)[()], dtype=np.float64)


def read_scan_views(path: str | os.PathLike, indices: np.ndarray) -> ScanData:
    """Read only the frames ``indices`` (any order, no repeats) as a scan of its own.

    The returned scan holds just these views: ``points`` is their (2, len(indices)) subset in
    the order given, ``diffamp`` their frames (one HDF5 point selection; nothing else is read).
    """
    info = scan_info(path)
    idx = np.asarray(indices, dtype=np.int64).ravel()
    if idx.size == 0:
        raise ValueError(f"{KIND} file {path}: no views selected")
    if idx.min() < 0 or idx.max() >= info["n_views"]:
        raise ValueError(f"{KIND} file {path}: view indices must lie in [0, {info['n_views']}), "
                         f"got {int(idx.min())}..{int(idx.max())}")
    order = np.argsort(idx, kind="stable")
    ascending = idx[order]
    if np.any(np.diff(ascending) == 0):
        raise ValueError(f"{KIND} file {path}: view indices repeat")
    with open_h5(path, KIND) as f:
        points = np.asarray(f["points"][()], dtype=np.float64)[:, idx]
        frames = np.asarray(f["diffamp"][ascending], dtype=np.float32)   # h5py needs increasing indices
        diffamp = np.empty_like(frames)
        diffamp[order] = frames
        return _read_fields(f, path, info, diffamp, points, slice(None))


def positions_px(points: np.ndarray, pixel_size_m: float, n: int, margin: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Window corners (row, col) in object pixels for every view, and the object shape (H, W).

    Row follows y (``points[1]``), column follows x (``points[0]``); positions are rounded to
    whole pixels, and the outermost windows lie ``margin`` pixels inside the object array.
    """
    px = points * 1e-6 / pixel_size_m          # µm → object pixels
    rows = px[1] - px[1].min()
    cols = px[0] - px[0].min()
    pos = np.stack([np.round(rows), np.round(cols)], axis=1) + margin
    shape = (int(pos[:, 0].max()) + n + margin, int(pos[:, 1].max()) + n + margin)
    return pos.astype(np.float64), shape


def canvas_origin(points: np.ndarray, pixel_size_m: float, margin: int) -> np.ndarray:
    """Where pixel (0, 0) of the object canvas that :func:`positions_px` lays lies in the positions' own
    frame, in object pixels (row, col): a view at px (µm over the pixel size) has its corner at
    round(px − origin)."""
    px = np.asarray(points, np.float64) * 1e-6 / pixel_size_m
    return np.array([px[1].min() - margin, px[0].min() - margin])


# --- the growing scan file (a scan being measured) ------------------------------------------------
# Written under SWMR (single writer, multiple readers) while the scan runs: ``diffamp`` and ``points``
# grow along their view axis, ``n_written`` (1,) says how many views are whole (frames and positions
# flushed), ``complete`` (1,) turns 1 at the stop. Datasets only (SWMR cannot add attributes or
# objects once started); decisions made once from the first chunks (crop, centre, orientation,
# gain) are attributes written before SWMR starts. Attributes whose value describes the whole scan
# and is known only at the stop (where the frames are, which were dropped: ``final_attrs``) are not
# root attributes of a growing file: the HDF5 SWMR writer may append to and write datasets, not
# create or change attributes, while readers have the file open. Each is an empty extendible byte
# dataset ``final_attrs/<name>`` made with the file and written in place at the stop, before
# ``complete`` (file_attrs reads it back as the attribute). Once complete and closed the file reads
# as an ordinary scan file (read_scan), the bookkeeping datasets aside.

GROWING_FIELDS = ("n_written", "complete")
FINAL_ATTRS = "final_attrs"


class GrowingScanWriter:
    """Create a growing scan file and append chunks to it; :meth:`mark_complete` at the stop.

    ``header`` gives the geometry (``lambda_nm``, ``z_m``, ``ccd_pixel_um``, ``mask``,
    ``probe_guess``, ``attrs``) and the frame size (its ``diffamp`` may hold no frames);
    ``extent_um`` (x_min, x_max, y_min, y_max), the scan area the start document announces, sizes
    the live reconstruction's canvas; ``decisions`` are recorded as attributes (``decision_<k>``);
    ``final_attrs`` names the header's attributes whose value is known only at the stop: they are
    left out of the root's attributes and written at the stop into ``final_attrs/<name>`` (text),
    which SWMR allows while the file is read (see the comment above).
    """

    def __init__(self, path: str | os.PathLike, header: ScanData, *, extent_um: tuple[float, float, float, float]
                 | None = None, decisions: dict[str, Any] | None = None,
                 final_attrs: tuple[str, ...] | list[str] = ()) -> None:
        n = header.n
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            raise FileExistsError(f"{KIND} file {self.path} exists: a growing scan file is never overwritten")
        # made under a temporary name and renamed once SWMR is on: a reader never sees it half-made
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.part")
        f = h5py.File(tmp, "w", libver="latest", locking=False)   # the flags of the readers (h5util.read_h5)
        try:
            f.create_dataset("diffamp", shape=(0, n, n), maxshape=(None, n, n), dtype=np.float32, chunks=(1, n, n))
            f.create_dataset("points", shape=(2, 0), maxshape=(2, None), dtype=np.float64, chunks=(2, 1024))
            self.final_attrs = tuple(final_attrs)
            _write_header(f, replace(header, attrs={k: v for k, v in header.attrs.items()
                                                    if k not in self.final_attrs}))
            for k in self.final_attrs:           # written in place at the stop (mark_complete)
                f.create_dataset(f"{FINAL_ATTRS}/{k}", shape=(0,), maxshape=(None,), dtype=np.uint8, chunks=(4096,))
            f.create_dataset("n_written", data=np.zeros(1, np.int64))
            f.create_dataset("complete", data=np.zeros(1, np.int8))
            if extent_um is not None:
                f.create_dataset("extent_um", data=np.asarray(extent_um, np.float64))
            for k, v in (decisions or {}).items():      # scalars as they are, anything else as JSON text
                f.attrs[f"decision_{k}"] = v if isinstance(v, (int, float, str)) else json.dumps(v)
            f.swmr_mode = True
            os.replace(tmp, self.path)
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        self.f = f
        self.n = n
        self.written = 0

    def append(self, frames: np.ndarray, points: np.ndarray) -> int:
        """Append ``frames`` (m, n, n) sqrt-intensity and their ``points`` (2, m) µm; flushed; returns the count."""
        frames = np.asarray(frames, np.float32)
        points = np.asarray(points, np.float64)
        m = frames.shape[0]
        if frames.shape[1:] != (self.n, self.n) or points.shape != (2, m):
            raise FileFormatError(f"{KIND} file {self.path}: a chunk needs frames (m, {self.n}, {self.n}) and points "
                                  f"(2, m), got {frames.shape} and {points.shape}")
        if not (np.all(np.isfinite(frames)) and np.all(np.isfinite(points))) or (m and frames.min() < 0):
            raise FileFormatError(f"{KIND} file {self.path}: a chunk has non-finite or negative values")
        if self.f["complete"][0]:
            raise FileFormatError(f"{KIND} file {self.path} is complete: no view can be appended")
        a, b = self.written, self.written + m
        d, p = self.f["diffamp"], self.f["points"]
        d.resize(b, axis=0)
        p.resize(b, axis=1)
        d[a:b] = frames
        p[:, a:b] = points
        d.flush()
        p.flush()
        self.f["n_written"][0] = b          # only now are the views whole
        self.f["n_written"].flush()
        self.written = b
        return b

    def mark_complete(self, attrs: dict[str, Any] | None = None) -> None:
        """The scan stopped: no view follows. Closes the file. ``attrs``: the whole scan's values
        (text) of the attributes named ``final_attrs`` at creation (where the frames are, which were
        dropped), written into their datasets before the file is marked complete — data writes, which
        SWMR allows; no attribute is created or changed. A name not declared then is an error."""
        encoded: dict[str, np.ndarray] = {}
        for k, v in (attrs or {}).items():           # all checked before any is written
            if k not in self.final_attrs:
                raise FileFormatError(f"{KIND} file {self.path}: attribute {k!r} was not declared final when the "
                                      "file was made (a growing file's attributes are made then)")
            encoded[k] = np.frombuffer(_text(k, v).encode("utf-8"), np.uint8)
        for k, data in encoded.items():
            d = self.f[f"{FINAL_ATTRS}/{k}"]
            d.resize(data.shape[0], axis=0)
            d[:] = data
            d.flush()
        self.f.flush()
        self.f["complete"][0] = 1
        self.f["complete"].flush()
        self.close()

    def close(self) -> None:
        if self.f:
            self.f.close()


class GrowingScanReader:
    """Follow a growing scan file: :meth:`refresh` the view count, read only whole views."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileFormatError(f"{KIND} file not found: {self.path}")
        try:
            self.f = read_h5(self.path, libver="latest", swmr=True)
        except OSError as exc:
            raise FileFormatError(f"{KIND} file {self.path} is not a readable growing scan file ({exc})") from None
        for name in ("diffamp", "points") + GROWING_FIELDS:
            require(self.f, name, KIND)
        self.ready, self.complete = 0, False

    def header(self) -> ScanData:
        """The geometry and attributes, no frames."""
        f = self.f
        n = int(f["diffamp"].shape[-1])
        if FINAL_ATTRS in f:
            for d in f[FINAL_ATTRS].values():
                d.refresh()
        attrs = file_attrs(f)
        return ScanData(diffamp=np.zeros((0, n, n), np.float32), points=np.zeros((2, 0)),
                        lambda_nm=scalar(f, "lambda_nm", KIND), z_m=scalar(f, "z_m", KIND),
                        ccd_pixel_um=scalar(f, "ccd_pixel_um", KIND),
                        mask=np.asarray(f["mask"][()], bool) if "mask" in f else None,
                        probe_guess=np.asarray(f["probe_guess"][()]) if "probe_guess" in f else None, attrs=attrs)

    def extent_um(self) -> tuple[float, float, float, float] | None:
        if "extent_um" not in self.f:
            return None
        e = np.asarray(self.f["extent_um"][()], np.float64).ravel()
        if e.shape != (4,) or not np.all(np.isfinite(e)):
            raise FileFormatError(f"{KIND} file {self.path}: field 'extent_um' must be 4 finite numbers "
                                  "(x_min, x_max, y_min, y_max)")
        return float(e[0]), float(e[1]), float(e[2]), float(e[3])

    def refresh(self) -> tuple[int, bool]:
        """(whole views, complete), as flushed by the writer."""
        for name in GROWING_FIELDS:
            self.f[name].refresh()
        complete = bool(self.f["complete"][0])
        self.ready = int(self.f["n_written"][0])
        self.complete = complete
        return self.ready, complete

    def points(self, a: int, b: int) -> np.ndarray:
        if b > self.ready:
            raise ValueError(f"views {a}..{b} are not all written yet ({self.ready} are)")
        self.f["points"].refresh()
        return np.asarray(self.f["points"][:, a:b], np.float64)

    def frames(self, a: int, b: int) -> np.ndarray:
        if b > self.ready:
            raise ValueError(f"views {a}..{b} are not all written yet ({self.ready} are)")
        self.f["diffamp"].refresh()
        return np.asarray(self.f["diffamp"][a:b], np.float32)

    def close(self) -> None:
        self.f.close()
