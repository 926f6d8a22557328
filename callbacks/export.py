"""A collected ptychography run → the HXN scan file.

Positions come from the scan motors (``zpssx``/``zpssy``) or configured encoder fields, frames
from the detector's area-detector HDF5 files (``resource``/``datum``, spec ``AD_HDF5``) or from
``stream_resource``/``stream_datum``. Frames are optionally normalised by a scaler
(``sclr1_ch4``), cropped around the beam centre (configured, or the centre of mass of the mean
frame), bad pixels are masked, and the zero frequency is moved to pixel [0, 0]. The energy comes
from an explicit value or from ``dcm_th`` in the baseline via Si(111) Bragg:
E = 12.39842 / (2·3.1355893·sin θ) keV. Distance and pixel size come from metadata or the
per-detector table (Merlin 55 µm, Eiger 75 µm).

Every problem raises :class:`ExportError` with a message that names it; that message becomes
the ``reason`` of the derived run that records the failure.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import numpy as np

if TYPE_CHECKING:
    from hxn_ptycho.scanfile import ScanData

from .collector import CollectedRun

HC_KEV_A = 12.39842              # h·c in keV·Å
HC_KEV_NM = HC_KEV_A / 10        # h·c in keV·nm
SI111_D_A = 3.1355893            # Si(111) lattice spacing in Å
PIXEL_UM = {"merlin": 55.0, "eiger": 75.0}


class ExportError(ValueError):
    """The run cannot become a scan file; the message names the missing or bad item."""


@dataclass
class ExportConfig:
    """How runs become scan files. Start-document metadata overrides (see :func:`effective`)."""

    detectors: tuple[str, ...] = ("merlin1", "merlin2", "eiger1")
    position_fields: tuple[str, str] = ("zpssx", "zpssy")     # x, y in µm
    scaler: str | None = "sclr1_ch4"                          # normalisation, if present
    stream: str = "primary"
    energy_kev: float | None = None                           # explicit energy; else dcm_th
    energy_motor: str = "dcm_th"                              # degrees, in the baseline
    distance_m: float | None = None                           # default when metadata has none
    pixel_um: dict[str, float] = field(default_factory=lambda: dict(PIXEL_UM))
    crop: int = 128
    center: tuple[int, int] | None = None                     # (row, col); None = from the mean frame
    bad_pixels: tuple[tuple[int, int], ...] = ()
    hot_pixels: bool = True                                   # mask pixels constant and bright in all frames
    frame_wait_s: float = 5.0                                 # wait this long for frames still being written


def bragg_energy_kev(theta_deg: float) -> float:
    """Si(111) monochromator angle (degrees) → photon energy (keV)."""
    s = math.sin(math.radians(float(theta_deg)))
    if s <= 0:
        raise ExportError(f"dcm_th = {theta_deg} degrees does not give a positive Bragg energy")
    return HC_KEV_A / (2 * SI111_D_A * s)


def bragg_angle_deg(energy_kev: float) -> float:
    """The inverse of :func:`bragg_energy_kev`."""
    return math.degrees(math.asin(HC_KEV_A / (2 * SI111_D_A * float(energy_kev))))


# -- which detector, which fields -----------------------------------------------------------

def find_detector(start: dict, detectors: tuple[str, ...]) -> str | None:
    """The configured detector named in the start document (``detectors`` list), if any."""
    named = start.get("detectors") or []
    if isinstance(named, str):
        named = [named]
    for det in named:
        if det in detectors:
            return det
    return None


def frame_key(run: CollectedRun, detector: str, stream: str) -> str:
    """The detector's image data key in ``stream``: an external key of ``detector`` with ≥ 2 dims."""
    data_keys = run.data_keys(stream)
    if not data_keys:
        raise ExportError(f"run {run.uid} has no '{stream}' stream (no descriptor)")
    candidates = run.object_keys(stream).get(detector) or [k for k in data_keys if k.startswith(detector)]
    for key in candidates:
        dk = data_keys.get(key, {})
        if dk.get("external") and len(dk.get("shape") or []) >= 2:
            return key
    raise ExportError(f"run {run.uid}: no image data key of detector '{detector}' in the '{stream}' stream "
                      f"(keys: {sorted(data_keys)})")


def _baseline_value(run: CollectedRun, key: str) -> Any:
    values = run.columns.get("baseline", {}).get(key)
    if values:
        for v in values:
            if v is not None:
                return v
    return None


def effective(run: CollectedRun, cfg: ExportConfig) -> dict[str, Any]:
    """Geometry and options for this run: start metadata first, then the config."""
    s = run.start
    det = find_detector(s, cfg.detectors)
    if det is None:
        raise ExportError(f"run {run.uid} names none of the detectors {list(cfg.detectors)}")
    energy = s.get("energy_kev", cfg.energy_kev)
    if energy is None:
        theta = _baseline_value(run, cfg.energy_motor)
        if theta is None:
            raise ExportError(f"run {run.uid}: no energy — neither 'energy_kev' in the metadata, an explicit "
                              f"energy, nor '{cfg.energy_motor}' in the baseline")
        energy = bragg_energy_kev(theta)
    distance = s.get("detector_distance_m", cfg.distance_m)
    if distance is None:
        raise ExportError(f"run {run.uid}: no detector distance — set 'detector_distance_m' in the metadata "
                          "or distance_m in the configuration")
    pixel = s.get("detector_pixel_um")
    if pixel is None:
        family = next((f for f in cfg.pixel_um if det.startswith(f)), None)
        if family is None:
            raise ExportError(f"run {run.uid}: no pixel size for detector '{det}' (table: {cfg.pixel_um})")
        pixel = cfg.pixel_um[family]
    center = s.get("ptycho_center", cfg.center)
    return {"detector": det, "energy_kev": float(energy), "distance_m": float(distance), "pixel_um": float(pixel),
            "crop": int(s.get("ptycho_crop", cfg.crop)), "center": tuple(center) if center is not None else None,
            "position_fields": tuple(s.get("ptycho_position_fields", cfg.position_fields)),
            "bad_pixels": [tuple(p) for p in s.get("ptycho_bad_pixels", cfg.bad_pixels)]}


def positions_um(run: CollectedRun, fields: tuple[str, str], stream: str) -> np.ndarray:
    """(2, N) positions in µm from the named columns (row 0 = x)."""
    cols = run.columns.get(stream, {})
    out = []
    for name in fields:
        values = cols.get(name)
        if values is None:
            raise ExportError(f"run {run.uid}: position field '{name}' is not in the '{stream}' stream "
                              f"(fields: {sorted(cols)})")
        missing = [i + 1 for i, v in enumerate(values) if v is None]
        if missing:
            raise ExportError(f"run {run.uid}: position field '{name}' is missing in {len(missing)} event(s) "
                              f"(first: event {missing[0]})")
        out.append(np.asarray(values, dtype=np.float64))
    pts = np.stack(out)
    if not np.all(np.isfinite(pts)):
        raise ExportError(f"run {run.uid}: positions {list(fields)} contain NaN or infinite values")
    return pts


# -- frames ---------------------------------------------------------------------------------

def _path_from_uri(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme not in ("file", ""):
        raise ExportError(f"cannot read detector data from {uri!r}: only local files are supported")
    return unquote(parts.path)


def _resource_file(res: dict) -> str:
    root = res.get("root") or ""
    path = res.get("resource_path") or ""
    return os.path.join(root, path) if root and not os.path.isabs(path) else path


class FramesNotReady(ExportError):
    """A detector file or frame is not there (yet): the detector may still be writing it."""


def _open_h5(path: str) -> Any:
    import h5py
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise FramesNotReady(f"cannot open detector file {path}: {exc}") from None


def frames_from_datums(run: CollectedRun, refs: list) -> np.ndarray:
    """One frame per event from AD_HDF5 resources/datums (``frame_per_point`` frames summed)."""
    files: dict[str, Any] = {}
    out = []
    try:
        for i, ref in enumerate(refs):
            if ref is None:
                raise ExportError(f"run {run.uid}: event {i + 1} has no detector frame")
            datum = run.datums.get(ref)
            if datum is None:
                raise ExportError(f"run {run.uid}: event {i + 1} refers to datum {ref!r} that was never announced")
            res = run.resources.get(datum.get("resource"))
            if res is None:
                raise ExportError(f"run {run.uid}: datum {ref!r} refers to an unknown resource {datum.get('resource')!r}")
            spec = str(res.get("spec", "")).upper()
            if not spec.startswith("AD_HDF5") and spec != "HDF5":
                raise ExportError(f"run {run.uid}: detector resource spec {spec!r} is not supported (AD_HDF5 only)")
            path = _resource_file(res)
            if path not in files:
                files[path] = _open_h5(path)
            dset = files[path]["/entry/data/data"]
            fpp = int((res.get("resource_kwargs") or {}).get("frame_per_point", 1))
            point = int(datum.get("datum_kwargs", {}).get("point_number", i))
            lo, hi = point * fpp, (point + 1) * fpp
            if hi > dset.shape[0]:
                raise FramesNotReady(f"run {run.uid}: frame {point} is missing from {path} "
                                  f"(the file holds {dset.shape[0] // max(fpp, 1)} points)")
            out.append(np.asarray(dset[lo:hi], dtype=np.float64).sum(axis=0))
    finally:
        for f in files.values():
            f.close()
    return np.stack(out)


def frames_from_stream(run: CollectedRun, key: str, n_events: int) -> np.ndarray:
    """Frames announced by stream_resource/stream_datum documents for ``key``, in index order."""
    import h5py
    srs = {uid: sr for uid, sr in run.stream_resources.items() if sr.get("data_key") == key}
    if not srs:
        raise ExportError(f"run {run.uid}: no stream_resource for detector key '{key}'")
    chunks = []
    for sd in sorted((d for d in run.stream_datums if d.get("stream_resource") in srs),
                     key=lambda d: d.get("seq_nums", {}).get("start", 0)):
        sr = srs[sd["stream_resource"]]
        path = _path_from_uri(sr.get("uri", ""))
        dataset = (sr.get("parameters") or {}).get("dataset", "/entry/data/data")
        start, stop = sd["indices"]["start"], sd["indices"]["stop"]
        try:
            with h5py.File(path, "r") as f:
                d = f[dataset]
                if stop > d.shape[0]:
                    raise ExportError(f"run {run.uid}: frames {start}..{stop} are missing from {path} "
                                      f"(it holds {d.shape[0]})")
                chunks.append(np.asarray(d[start:stop], dtype=np.float64))
        except (OSError, KeyError) as exc:
            raise ExportError(f"cannot read detector frames from {path}:{dataset}: {exc}") from None
    if not chunks:
        raise ExportError(f"run {run.uid}: no stream_datum for detector key '{key}'")
    frames = np.concatenate(chunks)
    if frames.shape[0] != n_events:
        raise ExportError(f"run {run.uid}: {frames.shape[0]} detector frames for {n_events} positions")
    return frames


def load_frames(run: CollectedRun, key: str, stream: str, n_events: int, wait_s: float) -> np.ndarray:
    data_key = run.data_keys(stream).get(key, {})
    refs = run.columns.get(stream, {}).get(key)
    if str(data_key.get("external", "")).startswith("STREAM") or (refs is None and run.stream_resources):
        return frames_from_stream(run, key, n_events)
    if refs is None:
        raise ExportError(f"run {run.uid}: detector key '{key}' has no values in the '{stream}' stream")
    deadline = time.monotonic() + wait_s
    while True:                 # only a file or frame still being written is worth waiting for
        try:
            return frames_from_datums(run, refs)
        except FramesNotReady:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.25)


# -- crop, mask, centre ---------------------------------------------------------------------

def beam_center(mean_frame: np.ndarray, good: np.ndarray) -> tuple[int, int]:
    """Centre of mass of the (masked) mean frame, rounded to whole pixels."""
    w = np.where(good, mean_frame, 0.0)
    total = w.sum()
    if total <= 0:
        raise ExportError("cannot find the beam centre: the mean detector frame is empty")
    rows, cols = np.indices(w.shape)
    return round(float((rows * w).sum() / total)), round(float((cols * w).sum() / total))


def bad_pixel_mask(frames: np.ndarray, bad: list[tuple[int, int]], hot: bool) -> np.ndarray:
    """True = good pixel: configured bad pixels, non-finite/negative values and hot pixels masked."""
    good = np.all(np.isfinite(frames), axis=0) & np.all(frames >= 0, axis=0)
    for r, c in bad:
        if 0 <= r < good.shape[0] and 0 <= c < good.shape[1]:
            good[r, c] = False
    if hot and frames.shape[0] > 1:
        mean = frames.mean(axis=0)
        constant = np.ptp(frames, axis=0) == 0
        good &= ~(constant & (mean > 10 * max(float(np.median(mean[good])) if good.any() else 0.0, 1.0)))
    return good


def crop_frames(frames: np.ndarray, good: np.ndarray, center: tuple[int, int], size: int) -> tuple[np.ndarray, np.ndarray]:
    r0, c0 = center[0] - size // 2, center[1] - size // 2
    h, w = frames.shape[1:]
    if size > min(h, w) or r0 < 0 or c0 < 0 or r0 + size > h or c0 + size > w:
        raise ExportError(f"a {size}×{size} crop around the beam centre {center} does not fit the {h}×{w} detector")
    return frames[:, r0:r0 + size, c0:c0 + size], good[r0:r0 + size, c0:c0 + size]


def check_complete(run: CollectedRun) -> None:
    """Refuse a run whose documents were incomplete: lost, duplicated or out-of-order events
    (``seq_num`` against the stop's ``num_events``), events of an unknown descriptor... — the
    collector's ``problems``. Such a run becomes a ``fail`` derived run naming what is missing,
    never a reconstruction from the wrong set of views."""
    from .collector import sequence_problems

    problems = list(run.problems)
    num_events = (run.stop or {}).get("num_events") or {}
    for stream, seq in run.seq_nums.items():        # every seq_num, here off the RunEngine's thread
        expected = num_events.get(stream) if isinstance(num_events, dict) else None
        problems += [p for p in sequence_problems(stream, seq, expected) if p not in problems]
    if problems:
        raise ExportError(f"run {run.uid}: its documents are incomplete, so it is not reconstructed: "
                          + "; ".join(problems))


def kept_field(start: dict, cfg: ExportConfig) -> Callable[[str, dict], bool]:
    """Which event columns the collector keeps for :func:`build_scan`: the position fields, the
    scaler, the energy motor, the detector's keys and every external key (datum ids)."""
    fields = start.get("ptycho_position_fields", cfg.position_fields)
    try:
        names = {str(f) for f in fields} if not isinstance(fields, str) else set(cfg.position_fields)
    except TypeError:
        names = set(cfg.position_fields)
    names |= {k for k in (cfg.scaler, cfg.energy_motor) if k}
    det = find_detector(start, cfg.detectors)

    def keep(key: str, data_key: dict) -> bool:
        return key in names or bool(data_key.get("external")) or (det is not None and key.startswith(det))
    return keep


def build_scan(run: CollectedRun, cfg: ExportConfig, frames: np.ndarray | None = None) -> ScanData:
    """The :class:`~hxn_ptycho.scanfile.ScanData` of a collected run (reads the frames unless given)."""
    from hxn_ptycho.scanfile import ScanData

    check_complete(run)
    eff = effective(run, cfg)
    points = positions_um(run, eff["position_fields"], cfg.stream)
    n_events = points.shape[1]
    if n_events == 0:
        raise ExportError(f"run {run.uid} has no events in the '{cfg.stream}' stream")
    if frames is None:
        key = frame_key(run, eff["detector"], cfg.stream)
        frames = load_frames(run, key, cfg.stream, n_events, cfg.frame_wait_s)
    if frames.shape[0] != n_events:
        raise ExportError(f"run {run.uid}: {frames.shape[0]} detector frames for {n_events} positions")
    if cfg.scaler:
        norm = run.columns.get(cfg.stream, {}).get(cfg.scaler)
        if norm is not None and all(v is not None for v in norm):
            norm = np.asarray(norm, dtype=np.float64)
            if np.all(norm > 0):
                frames = frames * (norm.mean() / norm)[:, None, None]
    good = bad_pixel_mask(frames, eff["bad_pixels"], cfg.hot_pixels)
    center = eff["center"] or beam_center(frames.mean(axis=0), good)
    frames, good = crop_frames(frames, good, center, eff["crop"])
    frames = np.where(good, np.maximum(frames, 0.0), 0.0)
    diffamp = np.fft.ifftshift(np.sqrt(frames), axes=(-2, -1)).astype(np.float32)
    mask = np.fft.ifftshift(good)
    attrs = {"scan_id": int(run.scan_id) if isinstance(run.scan_id, (int, np.integer)) else -1,
             "raw_uid": run.uid, "detector": eff["detector"], "energy_kev": eff["energy_kev"],
             "center_row": int(center[0]), "center_col": int(center[1])}
    return ScanData(diffamp=diffamp, points=points, lambda_nm=HC_KEV_NM / eff["energy_kev"],
                    z_m=eff["distance_m"], ccd_pixel_um=eff["pixel_um"],
                    mask=None if mask.all() else mask, attrs=attrs)


def export_scan(run: CollectedRun, cfg: ExportConfig, path: str | os.PathLike) -> ScanData:
    """Build and atomically write the scan file of ``run``; return its data."""
    from hxn_ptycho.h5util import FileFormatError
    from hxn_ptycho.scanfile import write_scan

    scan = build_scan(run, cfg)
    try:
        write_scan(path, scan)
    except FileFormatError as exc:
        raise ExportError(str(exc)) from None
    return scan
