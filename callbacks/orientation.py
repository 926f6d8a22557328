"""Detector orientation: which of the 8 frame symmetries, and which position signs, map a
detector's frames and a scan's recorded positions onto the engine's convention.

The engine's convention (``hxn_ptycho.simulate``/``scanfile.positions_px``): frame rows follow
``points[1]`` (y), columns follow ``points[0]`` (x), zero frequency at [0, 0]. A detector
convention is a frame symmetry — one of the 8 elements of the square's symmetry group, named
as NSLS2/holoptycho orientation.py names them — applied to each crop in *q* space (about the zero
frequency, so no half-pixel shift), and the signs of x and y.

Defaults (:data:`DETECTOR_ORIENTATION`), from the beamline's code:

- Merlin: ptycho_gui rotates each crop clockwise (``np.rot90(crop, axes=(1, 0))``,
  NSLS2/ptycho_gui HXN_databroker.py ``save_data``) and uses x, y signs −1 (ptycho_param.py
  ``x_direction = y_direction = -1``).
- Eiger: the same clockwise rotation on the engine's input (holoptycho ``dp_orient_iterative``
  default ``rot90_cw``; frames replayed from files need no ``detector_orientation``) with
  holoptycho's validated Eiger signs x +1, y −1.

``orientation="auto"`` runs short DM trials on a compact subset of views and keeps the lowest
data error; the report gives every error, the margin over the runner-up, and says "ambiguous"
below 5 %. What data can decide: flipping the sign of x (or y) is the same as mirroring the
frames *and* the sample, so the 32 conventions (8 symmetries × 4 sign pairs) fall into 8
classes of 4 *mirror-equivalent* ones that describe the same intensities for a mirrored sample
(their short-trial errors differ by artefacts only — which one "wins" changes with the trial
resolution). Each class has exactly one member per sign pair, so auto tries the 8 symmetries
with the detector's documented position signs (the motor/encoder convention, which data cannot
give) and reports the mirror-equivalents. The twin rot180∘T (conjugate sample, same signs) is a
different class here: the trials separate it by a large margin (tests/test_orientation.py).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from hxn_ptycho.scanfile import ScanData

    from .export import Prepared

log = logging.getLogger(__name__)


def _flip(a: np.ndarray, axis: int) -> np.ndarray:
    """q → −q along ``axis`` for zero frequency at index 0."""
    return np.roll(np.flip(a, axis), 1, axis)


def _t(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


# the 8 symmetries as operations on (..., n, n) arrays with the zero frequency at [0, 0]
FRAME_OPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda a: a,
    "flipud": lambda a: _flip(a, -2),
    "fliplr": lambda a: _flip(a, -1),
    "rot180": lambda a: _flip(_flip(a, -2), -1),
    "transpose": _t,
    "antitranspose": lambda a: _flip(_flip(_t(a), -2), -1),
    "rot90_cw": lambda a: _t(_flip(a, -2)),          # np.rot90(a, axes=(1, 0)) = flipud(a).T
    "rot90_ccw": lambda a: _flip(_t(a), -2),         # np.rot90(a) = flipud(a.T)
}
INVERSE = {"rot90_cw": "rot90_ccw", "rot90_ccw": "rot90_cw"}
TWIN = {"identity": "rot180", "rot180": "identity", "flipud": "fliplr", "fliplr": "flipud",
        "transpose": "antitranspose", "antitranspose": "transpose", "rot90_cw": "rot90_ccw",
        "rot90_ccw": "rot90_cw"}


@dataclass(frozen=True)
class Orientation:
    """A frame symmetry and the signs of the recorded x and y positions."""

    frame: str = "identity"
    sign_x: int = 1
    sign_y: int = 1

    def __post_init__(self) -> None:
        from .export import ExportError
        if self.frame not in FRAME_OPS:
            raise ExportError(f"unknown frame orientation {self.frame!r} (known: {', '.join(FRAME_OPS)})")
        if self.sign_x not in (1, -1) or self.sign_y not in (1, -1):
            raise ExportError(f"position signs must be +1 or -1, got x {self.sign_x}, y {self.sign_y}")

    @property
    def name(self) -> str:
        return f"{self.frame},x{'+' if self.sign_x > 0 else '-'},y{'+' if self.sign_y > 0 else '-'}"

    @classmethod
    def parse(cls, text: str) -> Orientation:
        """``"rot90_cw,x-,y-"`` (signs optional, default +)."""
        from .export import ExportError
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        if not parts:
            raise ExportError("an empty orientation was given")
        frame, sx, sy = parts[0], 1, 1
        for p in parts[1:]:
            if p in ("x+", "x-"):
                sx = 1 if p.endswith("+") else -1
            elif p in ("y+", "y-"):
                sy = 1 if p.endswith("+") else -1
            else:
                raise ExportError(f"orientation {text!r}: {p!r} is not x+, x-, y+ or y-")
        return cls(frame, sx, sy)

    def apply_frames(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(FRAME_OPS[self.frame](a))

    def invert_frames(self, a: np.ndarray) -> np.ndarray:
        """Engine-convention frames → what the detector records (used by the simulated beamline)."""
        return np.ascontiguousarray(FRAME_OPS[INVERSE.get(self.frame, self.frame)](a))


DETECTOR_ORIENTATION: dict[str, Orientation] = {
    "merlin1": Orientation("rot90_cw", -1, -1), "merlin2": Orientation("rot90_cw", -1, -1),
    "eiger1": Orientation("rot90_cw", 1, -1), "eiger2": Orientation("rot90_cw", 1, -1),
    "eiger_mobile": Orientation("rot90_cw", 1, -1),
}


def orientation_for(detector: str, wanted: str | Orientation | None = None) -> Orientation:
    """The orientation asked for (name or object), else the detector's documented default."""
    if isinstance(wanted, Orientation):
        return wanted
    if wanted:
        return Orientation.parse(wanted)
    return DETECTOR_ORIENTATION.get(detector, Orientation())


def apply_orientation(prep: Prepared, orient: Orientation) -> ScanData:
    """The scan in the engine's convention."""
    from hxn_ptycho.scanfile import ScanData

    inten = orient.apply_frames(prep.intensity)
    mask = orient.apply_frames(prep.mask)
    points = prep.points * np.array([[orient.sign_x], [orient.sign_y]], dtype=np.float64)
    geo = prep.geometry
    sources = {**prep.sources, "orientation_value": orient.name}
    attrs = {**prep.attrs, "geometry_source": json.dumps(
        {"energy_kev": [geo["energy_kev"], sources.get("energy_kev")],
         "distance_m": [geo["distance_m"], sources.get("distance_m")],
         "pixel_um": [geo["pixel_um"], sources.get("pixel_um")],
         **{k: v for k, v in sources.items() if k not in ("energy_kev", "distance_m", "pixel_um")}})}
    return ScanData(diffamp=np.sqrt(inten).astype(np.float32), points=points,
                    lambda_nm=(12.39842 / 10) / geo["energy_kev"], z_m=geo["distance_m"],
                    ccd_pixel_um=geo["pixel_um"], mask=None if mask.all() else mask, attrs=attrs)


def _subset(points: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` views nearest the scan's centre (a compact, overlapping patch)."""
    c = np.median(points, axis=1, keepdims=True)
    d = np.sum((points - c) ** 2, axis=0)
    return np.sort(np.argsort(d)[:count])


def _low_q(a: np.ndarray, n: int) -> np.ndarray:
    """The central n×n frequencies of (..., N, N) arrays with the zero frequency at [0, 0]."""
    idx = np.r_[0:n // 2, -(n // 2):0]
    return a[..., idx[:, None], idx[None, :]]


def trial_error(prep: Prepared, orient: Orientation, views: np.ndarray, iterations: int, seed: int = 0,
                trial_n: int = 32) -> float:
    """Final data error of a short single-mode DM run on ``views`` with ``orient``, on the central
    ``trial_n`` × ``trial_n`` frequencies (a coarser object pixel: 4× cheaper for 64-pixel frames)."""
    from dataclasses import replace

    from hxn_ptycho.engine import reconstruct
    from hxn_ptycho.params import ReconParams

    n = prep.intensity.shape[-1]
    m = min(trial_n, n) // 2 * 2
    inten, mask = (prep.intensity[views], prep.mask) if m >= n else (_low_q(prep.intensity[views], m),
                                                                     _low_q(prep.mask, m))
    sub = replace(prep, intensity=inten, mask=mask, points=prep.points[:, views])
    scan = apply_orientation(sub, orient)
    res = reconstruct(scan, ReconParams(iterations=iterations, probe_modes=1, seed=seed, threads=1),
                      log=lambda _msg: None)
    return float(res.error_data[-1])


def mirror_equivalents(o: Orientation) -> list[Orientation]:
    """The conventions that fit the same data for a mirrored sample: a position sign flipped
    together with the frame flipped along that axis (frame rows follow y, columns x)."""
    out = []
    for fx, fy in ((-1, 1), (1, -1), (-1, -1)):
        a = np.arange(16.0).reshape(4, 4)
        b = FRAME_OPS[o.frame](a)
        if fx < 0:
            b = _flip(b, -1)
        if fy < 0:
            b = _flip(b, -2)
        frame = next(f for f, op in FRAME_OPS.items() if np.array_equal(op(a), b))
        out.append(Orientation(frame, o.sign_x * fx, o.sign_y * fy))
    return out


def auto_orientation(prep: Prepared, detector: str, views: int = 48, iterations: int = 25,
                     ambiguous_margin: float = 0.05, trial_n: int = 64) -> tuple[Orientation, dict[str, Any]]:
    """Try the 8 frame symmetries with the detector's position signs (one member of each of the
    8 data-distinguishable classes of the 32 conventions); keep the lowest data error."""
    default = DETECTOR_ORIENTATION.get(detector, Orientation())
    idx = _subset(prep.points, min(views, prep.points.shape[1]))
    errors: dict[str, float] = {}
    trials: dict[str, Orientation] = {}
    for frame in FRAME_OPS:
        o = Orientation(frame, default.sign_x, default.sign_y)
        trials[o.name] = o
        errors[o.name] = trial_error(prep, o, idx, iterations, trial_n=trial_n)
    ranked = sorted(errors, key=errors.get)
    chosen, runner = trials[ranked[0]], ranked[1]
    floor = max(errors[chosen.name], 1e-300)
    margin = (errors[runner] - floor) / floor
    twin = Orientation(TWIN[chosen.frame], chosen.sign_x, chosen.sign_y).name
    report = {"errors": {k: round(errors[k], 6) for k in ranked}, "views": int(idx.size),
              "iterations": iterations, "chosen": chosen.name, "runner_up": runner,
              "runner_up_is": "twin (conjugate)" if runner == twin else "distinct", "margin": round(margin, 4),
              "position_signs": f"the {detector} default ({default.name.split(',', 1)[1]})",
              "mirror_equivalents": [m.name for m in mirror_equivalents(chosen)]}
    report["ambiguous"] = bool(margin < ambiguous_margin)
    report["summary"] = (f"{chosen.name}, margin {margin:.1%} over {runner}"
                         + ("; AMBIGUOUS" if report["ambiguous"] else ""))
    log.info("orientation auto for %s: %s", detector, report["summary"])
    return chosen, report
