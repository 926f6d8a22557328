"""A collected (or stored) HXN run → the scan file, with no beamline options needed.

The defaults know the beamline (sources in the README's "HXN scans" section):

- **Detector**: the first of ``merlin1, merlin2, eiger1, eiger2, eiger_mobile`` named in
  ``start['detectors']`` or ``start['scan']['detectors']`` (fly2dpd puts them there,
  NSLS2/hxn-profile-collection startup/93-scanplan-panda.py ``fly2dpd``).
- **Frames**: through :mod:`.frames` (the specs ``TPX_HDF5``, ``MERLIN_FLY_STREAM_V2``,
  ``MERLIN_HDF5_BULK``, ``AD_HDF5``, stream_resource HDF5; ``frame_per_point = N`` is N frames).
- **Positions**: which motor is x and which y comes from what the plan states
  (:func:`scan_axes`: ``plan_args`` x_motor/y_motor or motor1/motor2, fly2dpd's scan axes,
  ``hints['dimensions']``), never from the order of ``start['motors']``. Step scans and
  ``FlyPlan2D`` record those motors (µm) in every event (hxntools scans, NSLS-II-HXN/hxnfly fly.py ``dataframe_to_bluesky_data``);
  ``fly2dpd`` records PandA encoder counts (datums of a ``PANDA`` resource), which are scaled by
  hxntools' ``motor_table`` (motor_info.py) and averaged over the ``position_supersample``
  samples of each point (scan_info.py ``get_scan_positions``); ``ss*`` stages, which no encoder
  reads, take the positions computed from ``scan['scan_input']`` as there. The fast axis is
  foreshortened by the sample rotation from ``zpsth``/``dsth`` in the baseline: x·|cos θ|
  (|sin θ| beyond 45°), as NSLS2/holoptycho preprocess.py does with ptycho_gui's angle.
- **Intensities**: ``sclr1_ch3`` for ``ss*`` scans, else ``sclr1_ch4`` (NSLS2/ptycho_gui
  HXN_databroker.py ``load_metadata``), also as SIS datums; non-positive values are replaced by
  the next positive one (its ``array_ensure_positive_elements``); frames are scaled by
  ic[0]/ic[i] (its ``save_data``). Saturated or flagged pixels (the integer maximum or one
  below, Eiger's markers) and stuck hot pixels are masked on the *raw* frames, before the
  normalisation and the beam-centre search. Frames without beam (a total below 1 % of the
  median, ptycho_gui's "dark frames") are dropped and listed in the scan file.
- **Geometry**: distance from ``start['scan']['detector_distance']``; else a detector-stage
  value in the baseline (``detector_distance``); else 2.05 m (what fly2dpd records today),
  configurable. Energy from ``dcm_th`` (Si(111) Bragg: E = 12.39842 / (2·3.1355893·sin θ) keV).
  Pixel: Merlin 55 µm, Eiger 75 µm. Every value and where it came from goes into the scan
  file's ``geometry_source`` attribute (JSON).
- **Orientation**: decided by the data (short DM trials on a subset, the detector's documented
  default :data:`~.orientation.DETECTOR_ORIENTATION` first; an undecided margin keeps the default
  and is flagged), or forced by name; the scan file is in the stage frame (recorded positions,
  frames through the mirror-equivalent symmetry), :mod:`.orientation`.

Every problem raises :class:`ExportError` with a message that names it; that message becomes
the ``reason`` of the derived run that records the failure.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hxn_ptycho.errors import HxnPtychoError

from . import frames as fr
from .collector import CollectedRun

if TYPE_CHECKING:
    from hxn_ptycho.scanfile import ScanData

log = logging.getLogger(__name__)

HC_KEV_A = 12.39842              # h·c in keV·Å
HC_KEV_NM = HC_KEV_A / 10        # h·c in keV·nm
SI111_D_A = 3.1355893            # Si(111) lattice spacing in Å
PIXEL_UM = {"merlin": 55.0, "eiger": 75.0}
DETECTORS = ("merlin1", "merlin2", "eiger1", "eiger2", "eiger_mobile")
DEFAULT_DISTANCE_M = 2.05        # what fly2dpd records (startup/93-scanplan-panda.py)
# hxntools motor_info.py motor_table: motor -> (PandA field, µm per encoder count)
MOTOR_TABLE: dict[str, tuple[str, float]] = {
    "zpssx": ("inenc2_val", -1e-4 * 0.9542), "zpssy": ("inenc3_val", -1.03297e-4),
    "zpssz": ("inenc4_val", 1e-4), "dssx": ("inenc2_val", -1e-4), "dssy": ("inenc3_val", 1e-4),
    "dssz": ("inenc4_val", 1e-4 * 1.047), "ssx": ("inenc2_val", 1e-4), "ssy": ("inenc3_val", 1e-4),
    "ssz": ("inenc4_val", 1e-4), "pt_tomo_ssx": ("inenc2_val", -1e-4), "pt_tomo_ssy": ("inenc4_val", -1e-4)}
PANDA_SCAN_TYPES = ("2D_FLY_PANDA", "2D_FLY_CONT_PANDA")
ONE_D_PLANS = {"count", "FlyPlan1D", "1D_FLY_PANDA", "TIME_FLY_PANDA", "fly1dpd", "timescan"}


class ExportError(HxnPtychoError, ValueError):
    """The run cannot become a scan file; the message names the missing or bad item."""


@dataclass
class ExportConfig:
    """How runs become scan files. The defaults are the beamline's; start metadata overrides."""

    detectors: tuple[str, ...] = DETECTORS
    position_fields: tuple[str, str] | None = None            # override: x, y columns in µm
    scaler: str | None = "auto"                               # 'auto': sclr1_ch3 (ss*) / sclr1_ch4; None: none
    stream: str = "primary"
    energy_kev: float | None = None                           # explicit energy; else dcm_th
    energy_motor: str = "dcm_th"                              # degrees, in the baseline
    distance_m: float | None = None                           # when the run records none (None: 2.05 m)
    distance_field: str = "detector_distance"                 # a baseline detector-stage value, in m
    pixel_um: dict[str, float] = field(default_factory=lambda: dict(PIXEL_UM))
    crop: int = 128
    center: tuple[int, int] | None = None                     # (row, col); None = from the mean frame
    bad_pixels: tuple[tuple[int, int], ...] = ()
    hot_pixels: bool = True                                   # mask pixels constant and bright in all frames
    dark_fraction: float = 0.01                               # drop frames below this × the median total
    foreshortening: bool = True                               # x·|cos θ| from zpsth/dsth
    orientation: str | dict[str, str] | None = None           # None/'auto': decided by the data; 'default'; a name
    motor_table: dict[str, tuple[str, float]] = field(default_factory=lambda: dict(MOTOR_TABLE))
    path_remap: tuple[tuple[str, str], ...] = fr.DEFAULT_REMAP
    frame_wait_s: float = 5.0                                 # wait this long for frames still being written
    data_roots: tuple[str, ...] | None = None                 # detector files only from here (None: trust.py's)


def bragg_energy_kev(theta_deg: float) -> float:
    """Si(111) monochromator angle (degrees) → photon energy (keV)."""
    s = math.sin(math.radians(float(theta_deg)))
    if s <= 0:
        raise ExportError(f"dcm_th = {theta_deg} degrees does not give a positive Bragg energy")
    return HC_KEV_A / (2 * SI111_D_A * s)


def bragg_angle_deg(energy_kev: float) -> float:
    """The inverse of :func:`bragg_energy_kev`."""
    return math.degrees(math.asin(HC_KEV_A / (2 * SI111_D_A * float(energy_kev))))


# -- which run, which detector ------------------------------------------------------------------

def named_detectors(start: dict) -> list[str]:
    """Detectors of a start document: top level and ``start['scan']['detectors']`` (fly2dpd)."""
    out: list[str] = []
    for named in (start.get("detectors"), (start.get("scan") or {}).get("detectors")
                  if isinstance(start.get("scan"), dict) else None):
        if isinstance(named, str):
            named = [named]
        for d in named or []:
            if isinstance(d, str) and d not in out:
                out.append(d)
    return out


def find_detector(start: dict, detectors: tuple[str, ...] = DETECTORS) -> str | None:
    """The first configured detector named in the start document, if any."""
    named = named_detectors(start)
    for det in detectors:
        if det in named:
            return det
    return None


def scan_kind(start: dict) -> str:
    """'fly2dpd' (PandA fly scan), 'FlyPlan2D' (hxnfly) or 'step' (hxntools/bluesky step scans)."""
    scan = start.get("scan") if isinstance(start.get("scan"), dict) else {}
    if start.get("plan_name") == "fly2dpd" or scan.get("type") in PANDA_SCAN_TYPES:
        return "fly2dpd"
    if start.get("plan_name") == "FlyPlan2D":
        return "FlyPlan2D"
    return "step"


def why_not_ptycho(start: dict, detectors: tuple[str, ...] = DETECTORS) -> str | None:
    """None if the run is a ptychography scan we reconstruct, else the reason it is not."""
    det = find_detector(start, detectors)
    if det is None:
        return f"it names none of the detectors {list(detectors)} (it names {named_detectors(start)})"
    plan = start.get("plan_name")
    scan = start.get("scan") if isinstance(start.get("scan"), dict) else {}
    if plan in ONE_D_PLANS or scan.get("type") in ONE_D_PLANS:
        return f"plan {plan or scan.get('type')!r} is not a 2-D scan"
    motors = start.get("motors")
    if isinstance(motors, list) and len(motors) == 1:
        return f"it scans one motor ({motors[0]}), not two"
    return None


def _motor_name(value: Any) -> str | None:
    """A motor as a plan states it: a name, or the ``repr`` bluesky puts in ``plan_args``
    (``EpicsMotor(prefix='…', name='zpssx', …)``) → ``'zpssx'``."""
    import re
    if not isinstance(value, str) or not value.strip():
        return None
    m = re.search(r"\bname=['\"]([^'\"]+)['\"]", value)
    if m:
        return m.group(1)
    return value.strip() if re.fullmatch(r"[A-Za-z_][\w.]*", value.strip()) else None


def scan_axes(start: dict) -> tuple[list[str], str]:
    """([x motor, y motor], where that was read) from what the plan states, never from the order of
    ``start['motors']`` (bluesky's ``spiral_fermat`` fills it from a set, so it changes from one
    process to the next):

    1. ``plan_args['x_motor']``/``['y_motor']`` (bluesky spiral/fermat plans write their reprs);
    2. fly2dpd's ``scan['fast_axis']``/``['slow_axis']['motor_name']`` (hxn-profile-collection
       93-scanplan-panda.py: fast = x);
    3. ``plan_args['motor1']``/``['motor2']`` (hxnfly bs.py FlyPlan2D; ptycho_gui
       HXN_databroker.py ``load_metadata`` takes scan_start1/scan_end1 as x);
    4. ``hints['dimensions']`` with two entries, in the plan's order (x first for the spirals);
    5. ``plan_args['args']`` of grid scans, first motor x (ptycho_gui ``load_metadata``);
    6. else the two motor names, if one ends in ``x`` and the other in ``y``.
    """
    pa = start.get("plan_args") if isinstance(start.get("plan_args"), dict) else {}
    scan = start.get("scan") if isinstance(start.get("scan"), dict) else {}
    x, y = _motor_name(pa.get("x_motor")), _motor_name(pa.get("y_motor"))
    if x and y:
        return [x, y], "plan_args x_motor/y_motor"
    try:
        return [str(scan["fast_axis"]["motor_name"]), str(scan["slow_axis"]["motor_name"])], \
            "scan fast_axis/slow_axis"
    except (KeyError, TypeError):
        pass
    x, y = _motor_name(pa.get("motor1")), _motor_name(pa.get("motor2"))
    if x and y:
        return [x, y], "plan_args motor1/motor2"
    dims = (start.get("hints") or {}).get("dimensions") if isinstance(start.get("hints"), dict) else None
    if isinstance(dims, list) and len(dims) == 2:
        try:
            names = [str(d[0][0]) for d in dims]
            return names, "hints['dimensions']"
        except (IndexError, TypeError, KeyError):
            pass
    args = pa.get("args")
    if isinstance(args, list):
        motors = [n for n in (_motor_name(a) for a in args if isinstance(a, str)) if n]
        if len(motors) >= 2:
            return motors[:2], "plan_args args (first motor x)"
    motors = start.get("motors")
    if isinstance(motors, list) and len(motors) == 2:
        names = [str(m) for m in motors]
        xs = [m for m in names if m.lower().endswith("x")]
        ys = [m for m in names if m.lower().endswith("y")]
        if len(xs) == 1 and len(ys) == 1:
            return [xs[0], ys[0]], "motor names (…x, …y)"
    return [], "nothing in the plan says which motor is x"


def scan_motors(start: dict) -> list[str]:
    """[x motor, y motor] (see :func:`scan_axes`), or [] if the plan does not say."""
    return scan_axes(start)[0]


def frame_key(run: CollectedRun, detector: str, stream: str) -> str:
    """The detector's image data key in ``stream``: an external key of ``detector`` with ≥ 2 dims."""
    data_keys = run.data_keys(stream)
    if not data_keys:
        raise ExportError(f"run {run.uid} has no '{stream}' stream (no descriptor)")
    candidates = list(run.object_keys(stream).get(detector) or [])
    candidates += [k for k in data_keys if k.startswith(detector) and k not in candidates]
    for key in candidates:
        dk = data_keys.get(key, {})
        if dk.get("external") and len(dk.get("shape") or []) >= 2:
            return key
    raise ExportError(f"run {run.uid}: no image data key of detector '{detector}' in the '{stream}' stream "
                      f"(keys: {sorted(data_keys)})")


def baseline_value(run: CollectedRun, key: str) -> Any:
    for v in run.columns.get("baseline", {}).get(key) or []:
        if v is not None:
            return v
    return None


# -- geometry -----------------------------------------------------------------------------------

def geometry(run: CollectedRun, cfg: ExportConfig, detector: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(values, where each came from) for energy, distance and pixel size."""
    s = run.start
    scan = s.get("scan") if isinstance(s.get("scan"), dict) else {}
    src: dict[str, str] = {}
    if s.get("energy_kev") is not None:
        energy, src["energy_kev"] = float(s["energy_kev"]), "start['energy_kev']"
    elif cfg.energy_kev is not None:
        energy, src["energy_kev"] = float(cfg.energy_kev), "configuration (energy_kev)"
    else:
        theta = baseline_value(run, cfg.energy_motor)
        if theta is None:
            raise ExportError(f"run {run.uid}: no energy — neither 'energy_kev' in the metadata, an explicit "
                              f"energy, nor '{cfg.energy_motor}' in the baseline")
        energy = bragg_energy_kev(theta)
        src["energy_kev"] = f"baseline {cfg.energy_motor} = {float(theta):.6g} deg (Si(111) Bragg)"
    if scan.get("detector_distance") is not None:
        distance, src["distance_m"] = float(scan["detector_distance"]), "start['scan']['detector_distance']"
    elif s.get("detector_distance_m") is not None:
        distance, src["distance_m"] = float(s["detector_distance_m"]), "start['detector_distance_m']"
    elif baseline_value(run, cfg.distance_field) is not None:
        distance = float(baseline_value(run, cfg.distance_field))
        src["distance_m"] = f"baseline {cfg.distance_field}"
    elif cfg.distance_m is not None:
        distance, src["distance_m"] = float(cfg.distance_m), "configuration (distance_m)"
    else:
        distance, src["distance_m"] = DEFAULT_DISTANCE_M, f"HXN default {DEFAULT_DISTANCE_M} m (the run records none)"
    if distance <= 0:
        raise ExportError(f"run {run.uid}: detector distance {distance} m ({src['distance_m']}) is not positive")
    if s.get("detector_pixel_um") is not None:
        pixel, src["pixel_um"] = float(s["detector_pixel_um"]), "start['detector_pixel_um']"
    else:
        family = next((f for f in cfg.pixel_um if detector.startswith(f)), None)
        if family is None:
            raise ExportError(f"run {run.uid}: no pixel size for detector '{detector}' (table: {cfg.pixel_um})")
        pixel, src["pixel_um"] = float(cfg.pixel_um[family]), f"{family} pixel table"
    return {"energy_kev": energy, "distance_m": distance, "pixel_um": pixel}, src


# -- positions ----------------------------------------------------------------------------------

def _field_values(run: CollectedRun, name: str, cfg: ExportConfig) -> np.ndarray:
    cols = run.columns.get(cfg.stream, {})
    if name not in cols and name not in run.data_keys(cfg.stream):
        raise ExportError(f"run {run.uid}: position field '{name}' is not in the '{cfg.stream}' stream "
                          f"(fields: {sorted(cols)})")
    try:
        values = fr.column(run, name, cfg.stream, cfg.frame_wait_s, cfg.path_remap, cfg.data_roots)
    except fr.SourceError as exc:
        msg = str(exc).replace(f"'{name}' is missing", f"position field '{name}' is missing")
        raise ExportError(msg) from None
    if values is None:
        raise ExportError(f"run {run.uid}: position field '{name}' has no values in the '{cfg.stream}' stream")
    return values


def _scan_input_positions(start: dict, axis: int, npoints: int) -> np.ndarray:
    """ss* stages: positions computed from scan_input, as hxntools scan_info.get_scan_positions."""
    si = (start.get("scan") or {}).get("scan_input")
    if not si or len(si) < 6:
        raise ExportError("an ss* stage fly scan needs start['scan']['scan_input'] to compute its positions")
    n1, n2 = int(si[2]), int(si[5])
    if axis == 0:
        return np.tile(np.linspace(si[0], si[1], n1 + 1)[:-1], [n2, 1]).reshape(n1 * n2)[:npoints]
    return np.tile(np.linspace(si[3], si[4], n2 + 1)[:-1], [n1, 1]).T.reshape(n1 * n2)[:npoints]


def check_position_fields(run: CollectedRun, fields: Any, where: str) -> tuple[str, str]:
    """The (x, y) field names of a position-field list, or an :class:`ExportError` naming what is wrong:
    the list must name exactly one x and one y field, two different names (never guessed from one)."""
    ok = isinstance(fields, (list, tuple)) and len(fields) == 2 and all(isinstance(f, str) and f for f in fields)
    if not ok or fields[0] == fields[1]:
        raise ExportError(f"run {run.uid}: {where} {fields!r} must name one x and one y field "
                          "(two different position columns, x first)")
    return str(fields[0]), str(fields[1])


def positions(run: CollectedRun, cfg: ExportConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """(2, N) positions in µm (row 0 = x, the fast axis) and where they came from."""
    s = run.start
    override = s.get("ptycho_position_fields") or cfg.position_fields
    kind = scan_kind(s)
    motors = scan_motors(s)
    info: dict[str, Any] = {"kind": kind, "motors": motors, "axes": scan_axes(s)[1]}
    if override:
        where = "ptycho_position_fields" if s.get("ptycho_position_fields") else "the position fields"
        fields = check_position_fields(run, list(override) if isinstance(override, tuple) else override, where)
        pts = np.stack([_field_values(run, f, cfg) for f in fields])
        info["positions"] = f"columns {list(fields)}"
    elif kind == "fly2dpd":
        if len(motors) < 2:
            raise ExportError(f"run {run.uid}: fly2dpd run without its scan axes (scan fast_axis/slow_axis)")
        shape = s.get("shape") or (s.get("scan") or {}).get("shape")
        npoints = int(np.prod(shape)) if shape else None
        out, used = [], []
        for axis, motor in enumerate(motors):
            if motor.startswith("ss"):
                out.append(_scan_input_positions(s, axis, npoints or 0))
                used.append(f"{motor}: computed from scan_input")
                continue
            if motor not in cfg.motor_table:
                raise ExportError(f"run {run.uid}: no encoder is known for motor '{motor}' "
                                  f"(motor table: {sorted(cfg.motor_table)})")
            enc, scale = cfg.motor_table[motor]
            raw = _field_values(run, enc, cfg) * scale
            n = npoints or raw.size
            if cfg.stream in run.points_from_stream_datums:   # no events of its own (collector.py): the points so far
                n = len(run.seq_nums.get(cfg.stream, [])) or n
            if raw.size > n:
                if raw.size % n:
                    raise ExportError(f"run {run.uid}: {raw.size} {enc} samples are not a multiple of {n} points")
                raw = raw.reshape(n, raw.size // n).mean(axis=1)
            out.append(raw)
            used.append(f"{motor}: {enc} × {scale:g} µm/count, averaged per point")
        if len({len(o) for o in out}) != 1:
            raise ExportError(f"run {run.uid}: x and y have {len(out[0])} and {len(out[1])} positions")
        pts = np.stack(out)
        info["positions"] = "; ".join(used) + f" (x, y from {info['axes']})"
    else:
        if len(motors) < 2:
            raise ExportError(f"run {run.uid}: cannot tell the x and y motors: no plan_args x_motor/y_motor, "
                              f"scan axes or hints['dimensions'] (start['motors'] = {s.get('motors')})")
        pts = np.stack([_field_values(run, m, cfg) for m in motors])
        info["positions"] = f"motor columns x = {motors[0]}, y = {motors[1]} (from {info['axes']})"
    if not np.all(np.isfinite(pts)):
        raise ExportError(f"run {run.uid}: positions contain NaN or infinite values")
    angle, angle_src, factor = foreshortening(run, cfg, motors)
    if angle:
        pts = pts.copy()
        pts[0] *= factor
    info.update(angle_deg=angle, angle_source=angle_src)
    return pts, info


def foreshortening(run: CollectedRun, cfg: ExportConfig, motors: list[str]) -> tuple[float, str, float]:
    """(rotation angle in degrees, where it came from, the fast axis' factor |cos θ| or |sin θ| beyond 45°)."""
    angle, angle_src = 0.0, "none (not a zp/ds stage scan)"
    if cfg.foreshortening and motors:
        motor_theta = "zpsth" if motors[0].startswith("zp") else "dsth" if motors[0].startswith("d") else None
        if motor_theta:
            v = baseline_value(run, motor_theta)
            if v is not None:
                angle, angle_src = float(v), f"baseline {motor_theta}"
            else:
                angle_src = f"{motor_theta} not in the baseline: 0"
    factor = abs(math.cos(math.radians(angle))) if abs(angle) <= 45 else abs(math.sin(math.radians(angle)))
    return angle, angle_src, factor


# -- intensities --------------------------------------------------------------------------------

def ensure_positive(arr: np.ndarray) -> int:
    """Replace non-positive values by the next positive one (the last ones by the previous),
    in place, as ptycho_gui's array_ensure_positive_elements; returns how many were replaced."""
    bad = arr <= 0
    if not bad.any():
        return 0
    good = np.nonzero(~bad)[0]
    if good.size == 0:
        raise ExportError("the scaler has no positive value: the beam was off for the whole scan")
    nxt = np.searchsorted(good, np.arange(arr.size))
    nxt = np.where(nxt < good.size, good[np.minimum(nxt, good.size - 1)], good[-1])
    arr[bad] = arr[nxt[bad]]
    return int(bad.sum())


def scaler_values(run: CollectedRun, cfg: ExportConfig, motors: list[str], n: int) -> tuple[np.ndarray | None, str]:
    name = run.start.get("ptycho_scaler", cfg.scaler)
    if not name:
        return None, "none (configured off)"
    if name == "auto":
        name = "sclr1_ch3" if motors and motors[0].startswith("ss") else "sclr1_ch4"
    try:
        values = fr.column(run, name, cfg.stream, cfg.frame_wait_s, cfg.path_remap, cfg.data_roots)
    except fr.SourceError as exc:
        raise ExportError(f"scaler {name}: {exc}") from None
    if values is None:
        return None, f"none ({name} not recorded)"
    if values.size != n:
        if values.size > n > 0:
            values = values[:n]
        else:
            raise ExportError(f"run {run.uid}: scaler {name} has {values.size} values for {n} frames")
    values = values.astype(np.float64).copy()
    patched = ensure_positive(values)
    return values, name + (f" ({patched} non-positive value(s) replaced)" if patched else "")


# -- frames: statistics on the raw frames, then the crop ------------------------------------------

def saturation_value(dtype: Any) -> float | None:
    """Values at or above this are saturated/flagged: integer maximum − 1 (Eiger marks defective
    pixels with the maximum and the one below); None for float data."""
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.integer):
        return float(np.iinfo(dt).max - 1)
    return None


@dataclass
class FrameStats:
    n: int
    shape: tuple[int, int]
    mean: np.ndarray
    good: np.ndarray
    saturated: int
    hot: int


def check_frame_shape(source: fr.Source, shape: tuple[int, ...], batch: np.ndarray, first: int) -> None:
    """Refuse frames of a second shape (one scan file holds one frame size), naming both shapes."""
    if tuple(batch.shape[1:]) != tuple(shape):
        raise ExportError(f"detector data {source.key} has frames of two shapes: "
                          f"{'×'.join(map(str, shape))} (the first {first}) and "
                          f"{'×'.join(map(str, batch.shape[1:]))} (from frame {first + 1}), in "
                          f"{', '.join(source.files)}")


class StatsAccumulator:
    """The raw-frame statistics of :func:`raw_statistics`, batch by batch (files or a stream alike)."""

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        self.shape = tuple(shape)
        self.sat = saturation_value(dtype)
        self.acc = np.zeros(shape)
        self.lo = np.full(shape, np.inf)
        self.hi = np.full(shape, -np.inf)
        self.flagged = np.zeros(shape, bool)
        self.n = 0

    def add(self, batch: np.ndarray) -> None:
        b = batch.astype(np.float64)
        if self.sat is not None:
            self.flagged |= np.any(batch >= self.sat, axis=0)
        self.flagged |= ~np.all(np.isfinite(b), axis=0) | np.any(b < 0, axis=0)
        b = np.where(np.isfinite(b), b, 0.0)
        self.acc += b.sum(axis=0)
        self.lo = np.minimum(self.lo, b.min(axis=0))
        self.hi = np.maximum(self.hi, b.max(axis=0))
        self.n += b.shape[0]

    def result(self, cfg: ExportConfig, bad: list[tuple[int, int]]) -> FrameStats:
        shape = self.shape
        good = ~self.flagged
        for r, c in bad:
            if 0 <= r < shape[0] and 0 <= c < shape[1]:
                good[r, c] = False
        mean = self.acc / self.n
        hot = 0
        if cfg.hot_pixels and self.n > 1:
            med = float(np.median(mean[good])) if good.any() else 0.0
            stuck = (self.hi == self.lo) & (mean > 10 * max(med, 1.0)) & good
            hot = int(stuck.sum())
            good &= ~stuck
        return FrameStats(n=self.n, shape=(int(shape[0]), int(shape[1])), mean=mean, good=good,
                          saturated=int(self.flagged.sum()), hot=hot)


def raw_statistics(source: fr.Source, cfg: ExportConfig, bad: list[tuple[int, int]]) -> FrameStats:
    """One pass over the raw frames, batch by batch: the mean frame and the good-pixel mask
    (saturated/flagged, non-finite, negative, configured and stuck hot pixels masked)."""
    (shape, dtype) = fr.frame_shape(source, cfg.frame_wait_s)
    if len(shape) != 2:
        raise ExportError(f"detector data {source.key} has frames of shape {shape}, expected 2-D")
    acc = StatsAccumulator(shape, dtype)
    for batch in fr.iter_frames(source, cfg.frame_wait_s):
        check_frame_shape(source, shape, batch, acc.n)
        acc.add(batch)
    if acc.n == 0:
        raise ExportError(f"detector data {source.key}: no frames in {source.files}")
    return acc.result(cfg, bad)


def beam_center(mean_frame: np.ndarray, good: np.ndarray) -> tuple[int, int]:
    """Centre of mass of the (masked) mean frame, rounded to whole pixels."""
    w = np.where(good, mean_frame, 0.0)
    total = w.sum()
    if total <= 0:
        raise ExportError("cannot find the beam centre: the mean detector frame is empty")
    rows, cols = np.indices(w.shape)
    return round(float((rows * w).sum() / total)), round(float((cols * w).sum() / total))


def crop_window(shape: tuple[int, int], center: tuple[int, int], size: int) -> tuple[slice, slice]:
    r0, c0 = center[0] - size // 2, center[1] - size // 2
    h, w = shape
    if size > min(h, w) or r0 < 0 or c0 < 0 or r0 + size > h or c0 + size > w:
        raise ExportError(f"a {size}×{size} crop around the beam centre {center} does not fit the {h}×{w} detector")
    return slice(r0, r0 + size), slice(c0, c0 + size)


# -- the scan -----------------------------------------------------------------------------------

@dataclass
class Prepared:
    """Everything but the orientation: q-space intensities (zero frequency at [0, 0])."""

    intensity: np.ndarray          # (N, n, n) float64, zero frequency at [0, 0], detector orientation
    mask: np.ndarray               # (n, n) bool, same layout
    points: np.ndarray             # (2, N) µm as recorded (after foreshortening)
    geometry: dict[str, Any]
    sources: dict[str, Any]
    attrs: dict[str, Any]


def finish_frames(raw: np.ndarray, good: np.ndarray, ic: np.ndarray | None, ic0: float | None,
                  dark_fraction: float, median_total: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Cropped raw frames (N, n, n) float64 → (intensity with the zero frequency at [0, 0], mask, kept
    indices, dark indices, the median total used). Frames whose masked total is at most
    ``dark_fraction`` × the median total (of these frames, or ``median_total``) are without beam
    (ptycho_gui's dark frames); the rest are scaled by ic0 / ic[i] (ptycho_gui ``save_data``). The one
    computation of the export and of a stream's chunks (:mod:`.stream`)."""
    raw = np.where(np.isfinite(raw) & good, raw, 0.0)
    totals = raw.sum(axis=(1, 2))                      # ptycho_gui: a crop without counts is a dark frame
    med = float(np.median(totals)) if median_total is None else float(median_total)
    dark = np.nonzero(totals <= dark_fraction * max(med, 1e-300))[0]
    keep = np.setdiff1d(np.arange(raw.shape[0]), dark)
    if ic is not None and ic0 is not None:
        raw = raw * (ic0 / ic)[:, None, None]            # ptycho_gui save_data: img * ic[0] / ic[i]
    raw = raw[keep]
    inten = np.where(good, np.maximum(raw, 0.0), 0.0)
    inten = np.fft.ifftshift(inten, axes=(-2, -1))
    return inten, np.fft.ifftshift(good), keep, dark, med


def prepare(run: CollectedRun, cfg: ExportConfig) -> Prepared:
    """Read and pre-process a run's frames; orientation is applied by :func:`build_scan`."""
    check_complete(run)
    s = run.start
    det = find_detector(s, cfg.detectors)
    if det is None:
        raise ExportError(f"run {run.uid} names none of the detectors {list(cfg.detectors)}")
    geo, src = geometry(run, cfg, det)
    points, pinfo = positions(run, cfg)
    n_points = points.shape[1]
    if n_points == 0:
        raise ExportError(f"run {run.uid} has no positions in the '{cfg.stream}' stream")
    key = frame_key(run, det, cfg.stream)
    try:
        source = fr.describe(run, key, cfg.stream, cfg.path_remap, cfg.data_roots)
        bad = [tuple(p) for p in s.get("ptycho_bad_pixels", cfg.bad_pixels)]
        stats = raw_statistics(source, cfg, bad)
    except fr.SourceError as exc:
        raise ExportError(str(exc)) from None
    if stats.n != n_points:
        raise ExportError(f"run {run.uid}: {stats.n} detector frames in {source.files} for {n_points} positions")
    ic, ic_src = scaler_values(run, cfg, pinfo["motors"], n_points)
    crop = int(s.get("ptycho_crop", cfg.crop))
    center = s.get("ptycho_center", cfg.center)
    center_src = "configured" if center is not None else "centre of mass of the masked mean raw frame"
    center = tuple(center) if center is not None else beam_center(stats.mean, stats.good)
    region = crop_window(stats.shape, center, crop)
    try:
        raw = fr.read(source, cfg.frame_wait_s, region=region, dtype=np.float64)
    except fr.SourceError as exc:
        raise ExportError(str(exc)) from None
    good = stats.good[region]
    inten, mask, keep, dark, _ = finish_frames(raw, good, ic, None if ic is None else float(ic[0]), cfg.dark_fraction)
    if keep.size == 0:
        raise ExportError(f"run {run.uid}: every frame is without beam")
    src.update(positions=pinfo["positions"], angle=pinfo["angle_source"], scaler=ic_src, center=center_src,
               frames=f"{key}: {len(source.describe())} frame range(s) in {len(source.files)} file(s)")
    attrs = {"scan_id": int(run.scan_id) if isinstance(run.scan_id, (int, np.integer)) else -1,
             "raw_uid": run.uid, "detector": det, "energy_kev": geo["energy_kev"], "scan_kind": pinfo["kind"],
             "center_row": int(center[0]), "center_col": int(center[1]), "angle_deg": pinfo["angle_deg"],
             "masked_saturated": stats.saturated, "masked_hot": stats.hot,
             "dropped_frames": json.dumps([int(i) for i in dark]),
             "frame_source": json.dumps(source.describe()[:50])}
    if dark.size:
        log.info("run %s: %d frame(s) without beam dropped: %s", run.uid, dark.size, dark[:20].tolist())
    return Prepared(intensity=inten, mask=mask, points=points[:, keep], geometry=geo, sources=src, attrs=attrs)


def planned_points(run: CollectedRun) -> int | None:
    """The number of points the plan announced (``start['num_points']``), None if it gave none."""
    n = run.start.get("num_points")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def check_complete(run: CollectedRun, cfg_stream: str = "primary") -> None:
    """Refuse a run whose documents were incomplete: lost, duplicated or out-of-order events
    (``seq_num`` against the stop's ``num_events``), events of an unknown descriptor... — the
    collector's ``problems``. Such a run becomes a ``fail`` derived run naming what is missing,
    never a reconstruction from the wrong set of views."""
    from .collector import sequence_problems

    problems = list(run.problems)
    num_events = (run.stop or {}).get("num_events") or {}
    for stream, seq in run.seq_nums.items():        # every seq_num, here off the RunEngine's thread
        expected = num_events.get(stream) if isinstance(num_events, dict) else None
        counted_by = "the stop document counts"
        if expected is None and stream == cfg_stream and scan_kind(run.start) == "step":
            expected = planned_points(run)          # no count in the stop: the step plan's, for a lost tail
            counted_by = "no num_events in the stop; the start's num_points is"
        problems += [p for p in sequence_problems(stream, seq, expected, counted_by) if p not in problems]
    if problems:
        raise ExportError(f"run {run.uid}: its documents are incomplete, so it is not reconstructed: "
                          + "; ".join(problems))


def kept_field(start: dict, cfg: ExportConfig) -> Callable[[str, dict], bool]:
    """Which event columns the collector keeps for :func:`build_scan`: the position fields or scan
    motors and their encoders, the scalers, the energy, angle and detector-distance motors of the
    baseline, the detector's keys and every external key (datum ids) — nothing else is copied."""
    names: set[str] = set()
    for fields in (start.get("ptycho_position_fields"), cfg.position_fields):
        if isinstance(fields, (list, tuple)):
            names |= {str(f) for f in fields}
    try:
        motors = scan_motors(start)
    except Exception:  # noqa: BLE001 - malformed metadata: the export names it later
        motors = []
    names |= set(motors)
    names |= {cfg.motor_table[m][0] for m in motors if m in cfg.motor_table}
    scaler = start.get("ptycho_scaler", cfg.scaler)
    names |= {"sclr1_ch3", "sclr1_ch4"} if scaler == "auto" else {str(scaler)} if scaler else set()
    names |= {k for k in (cfg.energy_motor, cfg.distance_field, "zpsth", "dsth") if k}
    try:
        det = find_detector(start, cfg.detectors)
    except Exception:  # noqa: BLE001
        det = None

    def keep(key: str, data_key: dict) -> bool:
        return key in names or bool(data_key.get("external")) or (det is not None and key.startswith(det))
    return keep


def wants_decision(run: CollectedRun, cfg: ExportConfig, detector: str) -> bool:
    """Whether the export of ``run`` decides the orientation by the data (no convention forced)."""
    wanted = run.start.get("ptycho_orientation", cfg.orientation)
    if isinstance(wanted, dict):
        wanted = wanted.get(detector)
    return wanted in (None, "", "auto")


def decide_orientation(run: CollectedRun, cfg: ExportConfig) -> tuple[Any, tuple[int, int], str, int] | None:
    """The orientation decision on the views of ``run`` so far, the beam centre it was made with,
    the detector and the crop (``(decision, (row, col), detector, crop)``); None where a
    convention is forced (nothing to decide).

    The live feed calls this once, on its first views, before its first chunk is in; the first
    chunk's export then takes the decision (:func:`build_scan` ``decision=``) instead of making it."""
    from .orientation import decide
    prep = prepare(run, cfg)
    det = prep.attrs["detector"]
    if not wants_decision(run, cfg, det):
        return None
    d = decide(prep, det)
    d.report["decided_on_views"] = int(prep.points.shape[1])
    return d, (int(prep.attrs["center_row"]), int(prep.attrs["center_col"])), str(det), int(prep.intensity.shape[-1])


def recorded_decision(scan_file: str | os.PathLike) -> Any:
    """The orientation decision a live scan file records (the live feed's, made on the run's first
    views: its ``orientation_as``, ``orientation_report`` and ``probe_guess``), as a
    :class:`.orientation.Decision`; None where the file records none (a convention was forced, or
    no file). The post-stop export of the same run takes it (:func:`export_scan` ``live_file=``), so
    both files are equal in every dataset and attribute (docs/live.md)."""
    import h5py

    from .orientation import Decision, Orientation
    path = Path(scan_file)
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r", libver="latest", swmr=True, locking=False) as f:
            if "orientation_report" not in f.attrs or "orientation_as" not in f.attrs:
                return None
            report = json.loads(str(f.attrs["orientation_report"]))
            orient = Orientation.parse(str(f.attrs["orientation_as"]))
            probe = np.asarray(f["probe_guess"][()]) if "probe_guess" in f else None
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"live scan file {path}: its orientation decision cannot be read ({exc})") from None
    return Decision(orient, report, probe)


def _as_live_file(scan: ScanData, live_file: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """Where the live file's recorded decisions (``decision_*``: beam centre, orientation, crop)
    are those of ``scan``, the post-stop export of the same run: record them in ``scan`` too and
    return the growing file's bookkeeping as it stands for a complete file of ``scan``'s views
    (``n_written``, ``complete``; extra datasets of :func:`~hxn_ptycho.scanfile.write_scan`), so
    the two files are equal in every dataset and attribute. None where they are not (a beam
    centre or crop of its own: the export then decides the orientation on all its frames)."""
    import h5py

    path = Path(live_file)
    if not path.exists():
        return {}
    from hxn_ptycho.scanfile import FINAL_ATTRS, final_attr_datasets
    with h5py.File(path, "r", libver="latest", swmr=True, locking=False) as f:
        recorded = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()
                    if k.startswith("decision_")}
        growing = {k: np.asarray(f[k][()]) for k in ("n_written", "complete") if k in f}
        final = list(f[FINAL_ATTRS]) if FINAL_ATTRS in f else []
    own = {"decision_center": json.dumps([int(scan.attrs["center_row"]), int(scan.attrs["center_col"])]),
           "decision_orientation": str(scan.attrs["orientation"]), "decision_crop": int(scan.n)}
    mismatch = [k for k, v in own.items() if k in recorded and recorded[k] != v]
    if mismatch:
        log.info("run %s: the live file %s records %s unlike the post-stop export: it decides again", scan.attrs.get(
            "raw_uid"), path, ", ".join(f"{k}={recorded[k]!r} (here {own[k]!r})" for k in mismatch))
        return None
    scan.attrs.update(recorded)
    out: dict[str, np.ndarray] = {}
    if "n_written" in growing:
        out["n_written"] = np.array([scan.n_views], dtype=growing["n_written"].dtype)
    if "complete" in growing:
        out["complete"] = np.ones(1, dtype=growing["complete"].dtype)
    # the attributes the live file writes at the stop into datasets (SWMR: hxn_ptycho/scanfile.py)
    out.update(final_attr_datasets({k: str(scan.attrs[k]) for k in final if k in scan.attrs}))
    return out


def build_scan(run: CollectedRun, cfg: ExportConfig, decision: Any = None) -> ScanData:
    """The :class:`~hxn_ptycho.scanfile.ScanData` of a run, in the stage frame; its frames are read
    through :mod:`.frames` and their symmetry is decided by the data unless one is forced
    (:mod:`.orientation`). ``decision``: an orientation decision already made on this run's first
    views (:func:`decide_orientation`), taken instead of deciding again."""
    from .orientation import apply_orientation, decide, orientation_for

    prep = prepare(run, cfg)
    det = prep.attrs["detector"]
    wanted = run.start.get("ptycho_orientation", cfg.orientation)
    if isinstance(wanted, dict):
        wanted = wanted.get(det)
    report: dict[str, Any] = {}
    probe = None
    if wanted in (None, "", "auto"):
        if decision is None:
            decision = decide(prep, det)
        orient, report, probe = decision.orientation, decision.report, decision.probe
        prep.sources["orientation"] = f"auto ({report.get('summary', '')})"
    else:
        orient = orientation_for(det, wanted)
        prep.sources["orientation"] = f"{det} default (no trials)" if wanted == "default" else "configured"
    scan = apply_orientation(prep, orient)
    if probe is not None and probe.shape == (scan.n, scan.n):
        scan.probe_guess = probe.astype(np.complex64)      # the trials' probe: the right side of focus
    scan.attrs["orientation"] = orient.in_stage_frame().name
    scan.attrs["orientation_as"] = orient.name
    if report:
        scan.attrs["orientation_report"] = json.dumps(report)
    return scan


def export_scan(run: CollectedRun, cfg: ExportConfig, path: str | os.PathLike,
                live_file: str | os.PathLike | None = None) -> ScanData:
    """Build and atomically write the scan file of ``run``; return its data. ``live_file``: the
    run's live scan file, if one was grown; the orientation decision it records (made on the first
    views) is taken instead of deciding again on all frames (:func:`recorded_decision`)."""
    from hxn_ptycho.h5util import FileFormatError
    from hxn_ptycho.scanfile import write_scan

    extras = None
    if live_file is None:
        scan = build_scan(run, cfg)
    else:
        scan = build_scan(run, cfg, recorded_decision(live_file))
        extras = _as_live_file(scan, live_file)
        if extras is None:              # the recorded decisions are not this export's: decided again
            scan = build_scan(run, cfg)
    from dataclasses import replace

    from hxn_ptycho.scanfile import FINAL_ATTRS
    final = {k.split("/", 1)[1] for k in extras or {} if k.startswith(FINAL_ATTRS + "/")}
    try:                                # those attributes as the live file holds them: in datasets
        write_scan(path, replace(scan, attrs={k: v for k, v in scan.attrs.items() if k not in final})
                   if final else scan, extras)
    except FileFormatError as exc:
        raise ExportError(str(exc)) from None
    return scan
