"""Detector orientation: which of the 8 frame symmetries maps a detector's frames onto the
engine's convention, decided by the data; results in the stage's x/y frame.

**Indexing.** This project indexes the object and every pattern ``[row, col] = [y, x]``
(``hxn_ptycho.scanfile.positions_px``: rows follow ``points[1]`` = y, columns ``points[0]`` = x;
zero frequency at [0, 0]). The beamline's tools index them ``[x, y]`` (axis 0 is x):
NSLS2/ptycho_gui ``nsls2ptycho/core/HXN_databroker.py`` ``save_data`` allocates the patterns
``np.zeros((num_frame, n, nn)) # nz*nx*ny`` with ``n`` "the x dimension of the ROI window";
NSLS2/holoptycho ``scripts/offline_epie.py`` puts x on the object's axis 0
(``rr, cc = px_x + 32, px_y + 32`` ... ``obj[a:b, c:d]`` with ``a = rr[i]``). So a symmetry
``S`` they apply to the raw crop is, in our indexing, ``transpose ∘ S``: their ``rot90_cw``
(ptycho_gui ``np.rot90(tmptmp, axes=(1, 0))``; holoptycho ``dp_orient_iterative`` default
``rot90_cw``, AGENTS.md "Iterative engine conventions") is our ``flipud`` (:func:`from_beamline`).

**Signs and the stage frame.** The beamline's engines multiply the recorded positions by
``x_direction``/``y_direction`` (ptycho_gui ``ptycho_param.py``: −1, −1; holoptycho's Eiger
iterative engine: x +1, y −1, AGENTS.md "Position signs"). Flipping the sign of x is the same as
mirroring the frames along q_x *and* the sample along x, so every convention (symmetry, signs)
has exactly one mirror-equivalent with signs (+, +) — :meth:`Orientation.in_stage_frame` — and
with it the engine reconstructs the sample as it lies on the stage: the scan file keeps the
recorded stage positions, and object, probe and ``positions_px`` come back with rows along +y
and columns along +x (as HXN's own 2-D maps, hxn-profile-collection ``53-viewer2d.py``).

**Decided by the data** (:func:`decide`): the 8 stage-frame symmetries fall into 8 classes the
data tell apart (the consistent one has a far lower data error after a short DM run). The
default (``orientation=None`` / ``"auto"``) runs 8 short trials on a compact subset of views,
the detector's documented default (:data:`DETECTOR_ORIENTATION`) first, and keeps the lowest
data error when its margin over the runner-up is at least :data:`AMBIGUOUS_MARGIN`; below it the
scan is reconstructed with the default and flagged (logged and recorded in the scan file's
``orientation_report``), never silently guessed. A name forces one convention
(``"flipud,x+,y-"`` in this project's indexing, or ``"beamline:rot90_cw,x+,y-"`` as ptycho_gui and
holoptycho name it); ``"default"`` takes the detector's documented default without trials.
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
def _which(a: np.ndarray, b: np.ndarray) -> str:
    """The name of the symmetry that maps ``a`` (a labelled square) to ``b``."""
    return next(f for f, op in FRAME_OPS.items() if np.array_equal(op(a), b))


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
        """``"flipud,x-,y-"`` (signs optional, default +), in this project's [y, x] indexing; with the
        prefix ``beamline:`` the symmetry is named as ptycho_gui/holoptycho name it ([x, y] indexing)."""
        from .export import ExportError
        text = str(text).strip()
        beamline = text.startswith("beamline:")
        if beamline:
            text = text[len("beamline:"):]
        parts = [p.strip() for p in text.split(",") if p.strip()]
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
        if beamline:
            if frame not in FRAME_OPS:
                raise ExportError(f"unknown frame orientation {frame!r} (known: {', '.join(FRAME_OPS)})")
            return from_beamline(frame, sx, sy)
        return cls(frame, sx, sy)

    def in_stage_frame(self) -> Orientation:
        """The mirror-equivalent convention with signs (+, +): the frames mirrored along q_x where x
        is negated and along q_y where y is, so the recorded stage positions are used as they are
        and the sample comes back as it lies on the stage (rows +y, columns +x)."""
        a = np.arange(16.0).reshape(4, 4)
        b = FRAME_OPS[self.frame](a)
        if self.sign_x < 0:
            b = _flip(b, -1)
        if self.sign_y < 0:
            b = _flip(b, -2)
        return Orientation(_which(a, b), 1, 1)

    def apply_frames(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(FRAME_OPS[self.frame](a))

    def invert_frames(self, a: np.ndarray) -> np.ndarray:
        """Engine-convention frames → what the detector records (used by the simulated beamline)."""
        return np.ascontiguousarray(FRAME_OPS[INVERSE.get(self.frame, self.frame)](a))


# The beamline's documented conventions, as they name them ([x, y] indexing) and in ours.
BEAMLINE_DEFAULTS: dict[str, tuple[str, int, int, str]] = {
    "merlin": ("rot90_cw", -1, -1, "ptycho_gui HXN_databroker.py save_data np.rot90(crop, axes=(1, 0)); "
                                   "ptycho_param.py x_direction = y_direction = -1"),
    "eiger": ("rot90_cw", 1, -1, "holoptycho dp_orient_iterative default rot90_cw; AGENTS.md 'Position signs': "
                                 "x_direction_iterative +1, y_direction -1"),
}


def from_beamline(frame: str, sign_x: int = 1, sign_y: int = 1) -> Orientation:
    """A convention as ptycho_gui/holoptycho state it (their symmetry ``frame`` on the raw crop, read
    as an [x, y]-indexed pattern) → this project's [y, x] indexing: ``transpose ∘ frame``."""
    a = np.arange(16.0).reshape(4, 4)
    return Orientation(_which(a, _t(FRAME_OPS[frame](a))), sign_x, sign_y)


DETECTOR_ORIENTATION: dict[str, Orientation] = {
    det: from_beamline(*BEAMLINE_DEFAULTS[det.rstrip("0123456789").split("_")[0]][:3])
    for det in ("merlin1", "merlin2", "eiger1", "eiger2", "eiger_mobile")}
#: below this relative margin of the best trial over the runner-up the data do not decide
AMBIGUOUS_MARGIN = 0.5


def orientation_for(detector: str, wanted: str | Orientation | None = None) -> Orientation:
    """The orientation asked for (name or object), else the detector's documented default."""
    if isinstance(wanted, Orientation):
        return wanted
    if wanted and wanted not in ("default", "auto"):
        return Orientation.parse(wanted)
    return DETECTOR_ORIENTATION.get(detector, Orientation())


STAGE_FRAME = {"rows": "+y", "cols": "+x", "positions": "the recorded stage positions (µm), signs not applied"}


def apply_orientation(prep: Prepared, orient: Orientation) -> ScanData:
    """The scan in the engine's convention and the stage frame: frames through ``orient``'s
    stage-frame equivalent, positions as recorded."""
    from hxn_ptycho.scanfile import ScanData

    stage = orient.in_stage_frame()
    inten = stage.apply_frames(prep.intensity)
    mask = stage.apply_frames(prep.mask)
    geo = prep.geometry
    sources = {**prep.sources, "orientation_value": orient.name}
    attrs = {**prep.attrs, "frame": json.dumps(STAGE_FRAME), "geometry_source": json.dumps(
        {"energy_kev": [geo["energy_kev"], sources.get("energy_kev")],
         "distance_m": [geo["distance_m"], sources.get("distance_m")],
         "pixel_um": [geo["pixel_um"], sources.get("pixel_um")],
         **{k: v for k, v in sources.items() if k not in ("energy_kev", "distance_m", "pixel_um")}})}
    return ScanData(diffamp=np.sqrt(inten).astype(np.float32), points=np.array(prep.points, dtype=np.float64),
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


def trial(prep: Prepared, orient: Orientation, views: np.ndarray, iterations: int, seed: int = 0,
          trial_n: int = 32) -> tuple[float, np.ndarray]:
    """(final data error, probe) of a short single-mode DM run on ``views`` with ``orient``, on the
    central ``trial_n`` × ``trial_n`` frequencies (a coarser object pixel: 4× cheaper for 64-pixel
    frames); the probe is brought back to the full crop (zero-padded in q: same field of view)."""
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
    probe = np.asarray(res.probe[0], np.complex128)
    if probe.shape[-1] != n:
        q = np.fft.fft2(np.fft.ifftshift(probe))
        full = np.zeros((n, n), complex)
        idx = np.r_[0:m // 2, -(m // 2):0]
        full[idx[:, None], idx[None, :]] = q
        probe = np.fft.fftshift(np.fft.ifft2(full))
    err = res.final_data_error                  # the model's own error (DM's curve is the reflected wave's)
    return float(err if err is not None else np.inf), probe


def trial_error(prep: Prepared, orient: Orientation, views: np.ndarray, iterations: int, seed: int = 0,
                trial_n: int = 32) -> float:
    """Final data error of :func:`trial`."""
    return trial(prep, orient, views, iterations, seed, trial_n)[0]


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
        out.append(Orientation(_which(a, b), o.sign_x * fx, o.sign_y * fy))
    return out


def documented_member(pair: tuple[Orientation, Orientation], default: Orientation) -> Orientation | None:
    """Of a twin pair {F, rot180∘F} (the same data: the one fits the sample, the other its
    conjugate, ``|FFT(conj ψ)|² = rot180 |FFT ψ|²``), the member that is the detector's documented
    frame symmetry with its documented y sign, if either is."""
    for m in pair:
        if any(e.frame == default.frame and e.sign_y == default.sign_y for e in [m, *mirror_equivalents(m)]):
            return m
    return None


def auto_orientation(prep: Prepared, detector: str, views: int = 48, iterations: int = 25,
                     ambiguous_margin: float = AMBIGUOUS_MARGIN, trial_n: int = 64
                     ) -> tuple[Orientation, dict[str, Any]]:
    """(chosen, report) of :func:`decide`."""
    d = decide(prep, detector, views, iterations, ambiguous_margin, trial_n)
    return d.orientation, d.report


@dataclass
class Decision:
    """The orientation decided, its report (JSON-able) and a starting probe for the engine (None
    when the data did not decide)."""

    orientation: Orientation
    report: dict[str, Any]
    probe: np.ndarray | None = None


def decide(prep: Prepared, detector: str, views: int = 48, iterations: int = 25,
           ambiguous_margin: float = AMBIGUOUS_MARGIN, trial_n: int = 64) -> Decision:
    """Try the 8 stage-frame symmetries (one member of each of the 8 classes of the 32
    conventions), the detector's documented default first, and decide between the 4 twin pairs.

    A twin pair {F, rot180∘F} describes the same intensities (the second for the conjugate sample
    and probe), so no data error can tell its members apart — a short trial's preference between
    them reflects its starting guess, not the data. The pairs are ranked by their lower trial
    error; the best pair wins when its margin over the next pair is at least ``ambiguous_margin``.
    Within it, the member whose conventions include the detector's documented symmetry with its
    documented y sign is kept (ptycho_gui and holoptycho agree on y −1; they differ on x, and
    that difference — the parity — is what the data decide). Undecided: the default, flagged."""
    import time

    t0 = time.perf_counter()
    default = DETECTOR_ORIENTATION.get(detector, Orientation())
    first = default.in_stage_frame()
    idx = _subset(prep.points, min(views, prep.points.shape[1]))
    errors: dict[str, float] = {}
    trials: dict[str, Orientation] = {}
    probes: dict[str, np.ndarray] = {}
    for frame in [first.frame] + [f for f in FRAME_OPS if f != first.frame]:
        o = Orientation(frame, 1, 1)
        trials[o.name] = o
        errors[o.name], probes[o.name] = trial(prep, o, idx, iterations, trial_n=trial_n)
    pairs: list[tuple[Orientation, Orientation]] = []
    for o in trials.values():
        if not any(o in p for p in pairs):
            pairs.append((o, trials[Orientation(TWIN[o.frame], 1, 1).name]))
    pair_error = {p: min(errors[p[0].name], errors[p[1].name]) for p in pairs}
    ranked = sorted(pairs, key=lambda p: pair_error[p])
    best, runner = ranked[0], ranked[1]
    floor = max(pair_error[best], 1e-300)
    margin = (pair_error[runner] - floor) / floor
    ambiguous = bool(margin < ambiguous_margin)
    documented = documented_member(best, default)
    if ambiguous:
        chosen, twin_by = first, "-"
    elif documented is not None:
        chosen, twin_by = documented, f"the documented symmetry and y sign of {detector} ({default.name})"
    else:
        chosen = min(best, key=lambda o: errors[o.name])
        twin_by = "the lower trial error (neither member is documented for this detector: check the sample's phase sign)"
    # the starting probe: the better trial of the chosen pair — its twin's conjugated (the twin fits
    # the conjugate probe): the engine's own start has a defocus of one sign, and the sample may sit
    # on either side of the focus
    probe, probe_from = None, "none (the engine's own start)"
    if not ambiguous:
        twin = Orientation(TWIN[chosen.frame], 1, 1)
        if errors[twin.name] < errors[chosen.name]:
            probe, probe_from = np.conj(probes[twin.name]), f"the {twin.name} trial, conjugated"
        else:
            probe, probe_from = probes[chosen.name], f"the {chosen.name} trial"
    cost = time.perf_counter() - t0
    runner_name = min(runner, key=lambda o: errors[o.name]).name
    report = {"errors": {k: round(errors[k], 6) for k in sorted(errors, key=lambda k: errors[k])},
              "views": int(idx.size), "iterations": iterations, "trial_n": trial_n, "cost_s": round(cost, 3),
              "first_candidate": f"{first.name} (the {detector} default {default.name})",
              "best_pair": [o.name for o in best], "runner_up": runner_name, "margin": round(margin, 4),
              "ambiguous_below": ambiguous_margin, "ambiguous": ambiguous, "chosen": chosen.name,
              "decided_by": "the detector default (the data did not decide)" if ambiguous else "the data",
              "twin_resolved_by": twin_by, "probe_guess": probe_from,
              "mirror_equivalents": [m.name for m in mirror_equivalents(chosen)]}
    # the summary (recorded in geometry_source) holds no timing: two exports of one run give one scan file
    report["summary"] = (f"{chosen.name}, margin {margin:.1%} of the pair {'/'.join(report['best_pair'])} over "
                         f"{runner_name}" + ("; AMBIGUOUS: the detector default is used" if ambiguous else ""))
    if ambiguous:
        log.warning("orientation of a %s scan not decided by the data (margin %.1f%% < %.0f%%): "
                    "reconstructed with the detector default %s; trials: %s", detector, 100 * margin,
                    100 * ambiguous_margin, default.name, report["errors"])
    else:
        log.info("orientation auto for %s: %s, %.1f s", detector, report["summary"], cost)
    return Decision(chosen, report, probe)
