"""The result file of one reconstruction: written atomically, read back for warm starts and queries.

Fields:

- ``object`` complex (M_O, H, W); ``probe`` complex (M_P, n, n)
- ``positions_px`` float64 (N, 2): (row, col) of each view's window corner in ``object``, nominal
  (from the scan's positions)
- ``positions_refined_px`` float64 (N, 2), optional: the corners after position refinement
  (sub-pixel; absent when positions were not refined, and in files written before it existed)
- ``error/data`` (iterations,), ``error/probe`` (iterations, M_P), ``error/object`` (iterations, M_O)
- ``error/relax`` (iterations,), optional: the mean relaxation r of each DM iteration's Fourier step
  (DM's damping, ``dm.relaxation``; NaN for other algorithms; absent in older files)
- ``probe_power_fraction`` (M_P,)
- attributes: ``params`` (JSON of :class:`~hxn_ptycho.params.ReconParams`), ``version``,
  ``elapsed_s``, ``final_cost``, ``final_data_error``, ``probe_modes_log`` and the scan's own
  attributes (``scan_id``, ``raw_uid``, ...) prefixed with ``scan_``; ``frame`` (JSON: where the object
  lies, :func:`hxn_ptycho.engine.result_frame`), by which a warm start lays the object on its own canvas
  (:attr:`ResultData.origin`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import __version__
from .h5util import FileFormatError, atomic_h5, open_h5, require, require_finite, require_shape

KIND = "result"


@dataclass
class ResultData:
    """A reconstruction as stored in a result file (numpy arrays, plain attributes)."""

    object: np.ndarray                      # (M_O, H, W) complex
    probe: np.ndarray                       # (M_P, n, n) complex
    positions_px: np.ndarray                # (N, 2) float64
    error_data: np.ndarray                  # (iterations,)
    error_probe: np.ndarray                 # (iterations, M_P)
    error_object: np.ndarray                # (iterations, M_O)
    probe_power_fraction: np.ndarray        # (M_P,)
    params: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    positions_refined_px: np.ndarray | None = None     # (N, 2) float64, after position refinement
    error_relax: np.ndarray | None = None   # (iterations,) mean relaxation r of DM (NaN elsewhere); optional

    @property
    def iterations(self) -> int:
        return int(self.error_data.shape[0])

    @property
    def final_data_error(self) -> float | None:
        """The one final data error of a result: ε_D = Σ (|F(P·O)| − √I)² / Σ I over all views and
        unmasked pixels, of the *returned* model (after the last update and the final orthogonalisation
        of the modes): the ``final_data_error`` attribute the engine measures at the end. The curve
        ``error_data`` holds, for DM, ε_D of the reflected wave F(2·P·O − ψ) that each iteration's
        projection sees (PtyPy's Fourier error; for ML that of the model), so its last point is one
        update older and not the model's own; it stands in only for a file without the attribute. The job's last line, the
        outcome record, the derived run, the listing and the figure all give this number."""
        value = self.attrs.get("final_data_error")
        if value is not None and np.isfinite(float(value)):
            return float(value)
        if self.iterations == 0 or not np.isfinite(self.error_data[-1]):
            return None
        return float(self.error_data[-1])

    @property
    def frame_um(self) -> tuple[float, float, float] | None:
        """(x, y) in µm of object pixel [0, 0] and the pixel size in µm, from the ``frame`` attribute
        (:func:`hxn_ptycho.engine.result_frame`; JSON text in a file, a dict from a derived run); None where
        it is absent or malformed (older files, a live state)."""
        text = self.attrs.get("frame")
        try:
            frame: Any = json.loads(text) if isinstance(text, str) else text
            x0, y0 = (float(v) for v in frame["origin_um"])
            pixel = float(frame["pixel_um"])
        except (TypeError, ValueError, KeyError):
            return None
        return (x0, y0, pixel) if pixel > 0 and all(np.isfinite((x0, y0, pixel))) else None

    @property
    def pixel_um(self) -> float | None:
        """The object's pixel size (µm) of the ``frame`` attribute; None for a file without it."""
        frame = self.frame_um
        return None if frame is None else frame[2]

    @property
    def origin(self) -> np.ndarray | None:
        """Where the object's pixel (0, 0) lies in its scan's frame, in object pixels (row, col), in the
        window-corner convention of :meth:`hxn_ptycho.engine.Reconstruction.canvas_origin` (a view at the
        position p, in object pixels, has its window's corner at p − origin): the ``frame`` attribute's
        origin (:func:`hxn_ptycho.engine.result_frame`: that pixel's own (x, y), the beam at the window's
        pixel n/2) plus n/2. None for a file without the attribute (older files, a live state): it is laid
        on a canvas of its own shape only."""
        frame = self.frame_um
        if frame is None:
            return None
        x0, y0, pixel = frame
        half = self.probe.shape[-1] // 2
        return np.array([y0 / pixel + half, x0 / pixel + half])

    def validate(self, filename: str = "<memory>") -> None:
        o, p = self.object, self.probe
        if o.ndim != 3 or not np.iscomplexobj(o):
            raise FileFormatError(f"{KIND} file {filename}: field 'object' must be complex (M_O, H, W), got {o.dtype} {o.shape}")
        if p.ndim != 3 or p.shape[1] != p.shape[2] or not np.iscomplexobj(p):
            raise FileFormatError(f"{KIND} file {filename}: field 'probe' must be complex (M_P, n, n), got {p.dtype} {p.shape}")
        n = p.shape[-1]
        if o.shape[1] < n or o.shape[2] < n:
            raise FileFormatError(f"{KIND} file {filename}: field 'object' {o.shape} is smaller than the probe window {n}")
        require_shape(self.positions_px.shape, (None, 2), "positions_px", KIND, filename)
        it = self.error_data.shape[0]
        require_shape(self.error_data.shape, (it,), "error/data", KIND, filename)
        require_shape(self.error_probe.shape, (it, p.shape[0]), "error/probe", KIND, filename)
        require_shape(self.error_object.shape, (it, o.shape[0]), "error/object", KIND, filename)
        if self.error_relax is not None:
            require_shape(self.error_relax.shape, (it,), "error/relax", KIND, filename)
        require_shape(self.probe_power_fraction.shape, (p.shape[0],), "probe_power_fraction", KIND, filename)
        for name, arr in (("object", o), ("probe", p), ("positions_px", self.positions_px)):
            require_finite(arr, name, KIND, filename)
        checks = [("positions_px", self.positions_px)]
        if self.positions_refined_px is not None:
            require_shape(self.positions_refined_px.shape, self.positions_px.shape, "positions_refined_px", KIND,
                          filename)
            require_finite(self.positions_refined_px, "positions_refined_px", KIND, filename)
            checks.append(("positions_refined_px", self.positions_refined_px))
        for name, pos in checks:
            if pos.size and (pos.min() < 0 or pos[:, 0].max() + n > o.shape[1] or pos[:, 1].max() + n > o.shape[2]):
                raise FileFormatError(f"{KIND} file {filename}: field '{name}' puts windows outside the object array")


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, bytes):
        return v.decode()
    return v


def write_result(path: str | os.PathLike, res: ResultData) -> None:
    """Validate and write ``res`` to ``path`` atomically (temporary name, then rename)."""
    res.validate(str(path))
    with atomic_h5(path) as f:
        f.create_dataset("object", data=res.object)
        f.create_dataset("probe", data=res.probe)
        f.create_dataset("positions_px", data=np.asarray(res.positions_px, dtype=np.float64))
        if res.positions_refined_px is not None:
            f.create_dataset("positions_refined_px", data=np.asarray(res.positions_refined_px, dtype=np.float64))
        g = f.create_group("error")
        g.create_dataset("data", data=np.asarray(res.error_data, dtype=np.float64))
        g.create_dataset("probe", data=np.asarray(res.error_probe, dtype=np.float64))
        g.create_dataset("object", data=np.asarray(res.error_object, dtype=np.float64))
        if res.error_relax is not None:
            g.create_dataset("relax", data=np.asarray(res.error_relax, dtype=np.float64))
        f.create_dataset("probe_power_fraction", data=np.asarray(res.probe_power_fraction, dtype=np.float64))
        f.attrs["params"] = json.dumps(res.params, sort_keys=True)
        f.attrs["version"] = __version__
        for k, v in res.attrs.items():
            if k in ("params", "version"):
                continue
            # HDF5 attributes hold no None, dict or list: those as JSON text ('null' for None: no value)
            f.attrs[k] = json.dumps(v) if v is None or isinstance(v, (dict, list, tuple)) else v


def read_result(path: str | os.PathLike) -> ResultData:
    """Read and validate a result file; errors name the missing or malformed field."""
    with open_h5(path, KIND) as f:
        arrays = {name: require(f, name, KIND)[()] for name in
                  ("object", "probe", "positions_px", "error/data", "error/probe", "error/object",
                   "probe_power_fraction")}
        refined = np.asarray(f["positions_refined_px"][()], dtype=np.float64) if "positions_refined_px" in f else None
        relax = np.asarray(f["error/relax"][()], dtype=np.float64) if "error/relax" in f else None
        attrs = {k: _jsonable(v) for k, v in f.attrs.items()}
    try:
        params = json.loads(attrs.pop("params", "{}"))
    except json.JSONDecodeError:
        raise FileFormatError(f"{KIND} file {path}: attribute 'params' is not valid JSON") from None
    res = ResultData(
        object=np.asarray(arrays["object"]), probe=np.asarray(arrays["probe"]),
        positions_px=np.asarray(arrays["positions_px"], dtype=np.float64),
        error_data=np.asarray(arrays["error/data"]), error_probe=np.asarray(arrays["error/probe"]),
        error_object=np.asarray(arrays["error/object"]),
        probe_power_fraction=np.asarray(arrays["probe_power_fraction"]), params=params, attrs=attrs,
        positions_refined_px=refined, error_relax=relax)
    res.validate(str(path))
    return res
