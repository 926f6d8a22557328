"""An independent simulator of real HXN ptychography scans, written from the beamline's public code.

It was written WITHOUT reading this project's own simulator or readers; every convention below is
taken from a public source, named where it is used.  Sources (snapshots read on 2026-12-05):

- NSLS2/hxn-profile-collection (d488ad8):
  ``startup/93-scanplan-panda.py`` -- ``fly2dpd`` / ``flyscan_pd`` / ``HXNFlyerPanda`` (the
  documents of a PandA fly scan, the start metadata, the PandA and SIS resources and datums, the
  bulk event written at ``complete``/``collect``), ``startup/92-eiger2.py`` (eiger2 in fly mode:
  spec ``MERLIN_FLY_STREAM_V2``, ``frame_per_point`` = points, datum ``point_number`` 0, image
  shape ``(num_triggers, height, width)``, 32-bit images above 6.67 ms exposure),
  ``startup/20-eiger.py`` (eiger1, ``image_name='eiger1'``), ``startup/22-scalers.py``
  (``sclr1``, 16 channels), ``startup/50-scans.py`` (``fermat = hxntools.scans.relative_fermat``,
  the baseline devices), ``startup/94-user-panda-utils.py`` (``export_scan_header``: "Eiger2 image
  is mirrored" -- the IOC/file writer corrects it, the HDF5 file holds the corrected frame).
- NSLS-II-HXN/hxntools (2e3f166): ``motor_info.py`` (``motor_table``: PandA channel and µm per
  count of each stage), ``handlers/rasmi2.py`` (``SIS_HDF51_FLY_STREAM_V1``,
  ``MERLIN_FLY_STREAM_V2``: ``entry/instrument/detector/data``), ``handlers/timepix.py``
  (``TPX_HDF5``: ``/entry/instrument/detector/data``, ``frame_per_point``),
  ``handlers/bulkdata.py`` (``PANDA``: dataset ``/<field>``), ``detectors/merlin.py`` and
  ``detectors/trigger_mixins.py`` (``TPX_HDF5``, ``frame_per_point`` 1, one datum per point with
  ``point_number``), ``scans.py`` (``relative_fermat`` -> bluesky ``rel_spiral_fermat``).
- bluesky 1.15 ``plans.spiral_fermat`` / ``rel_spiral_fermat`` / ``scan_nd`` (``plan_args``,
  ``hints['dimensions']``, ``start['motors']`` from the cycler's key *set*),
  ``plan_patterns.spiral_fermat`` (the points), ``bundlers.RunBundler.collect`` (a flyer's
  ``collect`` gives descriptor, then asset documents, then one ``event_page``).
- NSLS-II-HXN/hxnfly (a71b4f3): ``bs.py`` ``FlyPlan2D`` / ``FlyPlan._update_md`` (``plan_args``,
  ``motors``, ``fast_axis``, ``plan_name``), ``fly2d.py`` (``shape``, ``scan_range``),
  ``fly.py`` (``get_scaler_info``: ``scaler_alive``, ``sclr1_chN``; one row per point with the
  gathered motor positions, ``elapsed_time``, ``alive``, ``dead``).
- NSLS2/ptycho_gui (8787bcf): ``nsls2ptycho/core/HXN_databroker.py`` ``load_metadata`` (points =
  ``start['motors']`` readings, ic = ``sclr1_ch3`` for ``ssy`` else ``sclr1_ch4``, energy from the
  baseline ``dcm_th`` with Si(111) d = 3.1355893 Å) and ``save_data`` (``img * ic[0] / ic[i]``,
  crop ``img[cy-nn//2:cy+nn//2, cx-n//2:cx+n//2]``, ``np.rot90(crop, axes=(1, 0))``,
  ``np.fft.fftshift``, sqrt, stored "nz*nx*ny": the pattern is indexed ``[x, y]``);
  ``nsls2ptycho/core/ptycho_param.py`` (``x_direction = y_direction = -1``).
- NSLS2/holoptycho (5875d2d): ``scripts/offline_epie.py`` (the validated engine feed for eiger2
  scan 411993: crop, zero pixels ``>= uint16 max`` and ``>= 50000``, sqrt, ``rot90_cw`` =
  ``a.swapaxes(-1, -2)[..., :, ::-1]``, ``ifftshift``; positions ``counts * x_ratio *
  x_direction``, averaged over the PandA upsample; object indexed ``[x, y]`` (``rr, cc = px_x,
  px_y``)), ``AGENTS.md`` "Iterative engine data conventions" (``dp_orient_iterative = rot90_cw``;
  "the engine needs the x (fast-axis) position sign FLIPPED relative to the shared config
  (``x_direction_iterative = +1.0`` against the shared ``x_direction = -1.0``)"),
  ``holoptycho/preprocess.py`` ``PointProcessorOp`` (``pos = counts * ratio * direction``).

The forward model is written the way ptycho_gui/holoptycho index things: object and patterns
``[x, y]`` (axis 0 is x).  With engine signs ``(sx, sy)`` the engine sees the object at
``(u, v) = (sx * x, sy * y)`` (stage µm), and its measured intensity for view k is
``I_k[kx, ky] = |fft2(P[x, y] * O[x - u_k, y - v_k])|**2`` (zero frequency at [0, 0]).  The truth
is drawn in the stage frame ``[y, x]`` (rows +y, columns +x) and taken to the engine's ``[x, y]``
explicitly by ``_to_engine`` (a transpose, then a flip of each axis whose sign is negative), so
``object_truth``/``probe_truth`` need no guessing.  The raw
frame written to the HDF5 file is the inverse of the beamline tools' preprocessing applied to
``I_k``: ``crop = rot90_ccw(fftshift(I_k))`` (ptycho_gui applies ``fftshift(rot90_cw(crop))``),
scaled by the frame's ion-chamber ratio ``ic[k] / ic[0]``, placed at rows
``cy - N/2 : cy + N/2``, columns ``cx - N/2 : cx + N/2`` of a larger frame.  Nothing in the
documents records (cx, cy): ptycho_gui asks the user for it, holoptycho finds the beam from the
data (``preprocess.py`` ``compute_center_box``), so the beam is put off-centre and a consumer must
find it; ``notes['crop_centre']`` gives the truth.

Eiger signs (``eiger_signs``), the two public conventions, in stage µm:

- ``"holoptycho"``: (sx, sy) = (+1, -1).  holoptycho ``scripts/offline_epie.py`` (x_ratio =
  -9.542e-05 = hxntools ``motor_table['zpssx']``, y_ratio < 0) with ``AGENTS.md``'s validated
  ``x_direction_iterative = +1`` and ``y_direction = -1``: engine x = +stage x, engine y = -stage y.
- ``"ptycho_gui"``: (sx, sy) = (-1, -1).  ptycho_gui ``ptycho_param.py`` lines 95-96
  (``x_direction = -1.``, ``y_direction = -1.``) applied to the recorded stage positions
  (``HXN_databroker.load_metadata``: ``points[0] = df[motors[0]]``), as holoptycho's port of the
  engine applies them (``preprocess.py`` ``pos0 * x_ratio * x_direction``).  NSLS2/ptycho (the
  engine itself) is not public in the sources reached, so this product is an inference.

Merlin (FlyPlan2D) always uses ptycho_gui's (-1, -1): ptycho_gui was written for Merlin data
(``load_metadata``: ``ccd_pixel_um = 55.``).

Deliberate simplifications (documented, not hidden): fly-scan motion blur is not simulated (each
frame is computed at the mean position of its exposure); positions are held on the object pixel
grid (the recorded readbacks carry that, the fermat setpoints do not) so the forward model is
exact; a single coherent probe mode.
"""
from __future__ import annotations

import json
import time as _time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import event_model
import h5py
import numpy as np
from scipy import ndimage

KINDS = ("fly2dpd", "fermat", "FlyPlan2D")
EIGER_SIGNS = {"holoptycho": (1, -1), "ptycho_gui": (-1, -1)}
MERLIN_SIGNS = (-1, -1)

# hxntools motor_info.py motor_table: (PandA data key, µm per encoder count, HDF5 dataset)
MOTOR_TABLE = {
    "zpssx": ("inenc2_val", -1e-4 * 0.9542, "/INENC2.VAL.Value"),
    "zpssy": ("inenc3_val", -1.03297e-4, "/INENC3.VAL.Value"),
    "zpssz": ("inenc4_val", 1e-4, "/INENC4.VAL.Value"),
}
# ptycho_gui HXN_databroker.load_metadata: energy_kev = 12.39842 / (2 * 3.1355893 * sin(dcm_th))
SI111_D_A = 3.1355893
HC_KEV_A = 12.39842
N_SCALER = 16  # hxn-profile-collection 22-scalers.py n_scaler_mca
STEP_FRACTION = 0.13  # scan step / probe diameter: ~87 % overlap, dense as HXN scans are (see simulate)
PROBE_LOBE = 0.45  # side lobe amplitude (breaks the probe's mirror symmetry)
PROBE_COMA = 0.6  # rad, coma-like cubic phase at a quarter of the window
EIGER_FLAG_U32 = 2**32 - 1  # Eiger marks dead/flagged pixels with the bit depth's maximum
MERLIN_HOT = 2**24 - 1  # a stuck pixel of a Merlin in 24-bit mode (fly2dpd: quad_merlin_mode 1)


@dataclass
class IndepScan:
    """One simulated run; see INDEP_SIM_API.md.  Truth arrays are in the STAGE frame, [y, x]."""

    kind: str
    detector: str
    documents: list[tuple[str, dict]]
    data_dir: Path
    files: list[Path]
    object_truth: np.ndarray
    origin_um: tuple[float, float]
    pixel_m: float
    probe_truth: np.ndarray
    positions_um: np.ndarray
    energy_kev: float
    distance_m: float
    detector_pixel_m: float
    frame_size: int
    eiger_signs: str
    motor_order: str
    notes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Setup:
    detector: str
    energy_kev: float
    distance_m: float
    det_pixel_m: float
    frame_hw: tuple[int, int]  # raw frame (height, width) for N = 64, scaled with N
    centre_frac: tuple[float, float]  # (cy, cx) as fractions of (H, W): off-centre beam
    motors: tuple[str, str]
    signs: tuple[int, int]


def _wavelength_m(energy_kev: float) -> float:
    return HC_KEV_A / energy_kev * 1e-10


def _setup(kind: str, eiger_signs: str) -> _Setup:
    if kind == "fly2dpd":
        # 15 keV, 0.7 m, 75 µm -> 12.1 nm at N = 64
        return _Setup("eiger2", 15.0, 0.7, 75e-6, (104, 120), (0.42, 0.58), ("zpssx", "zpssy"), EIGER_SIGNS[eiger_signs])
    if kind == "fermat":
        # 10 keV, 0.6 m, 75 µm -> 15.5 nm
        return _Setup("eiger1", 10.0, 0.6, 75e-6, (100, 112), (0.55, 0.45), ("zpssx", "zpssy"), EIGER_SIGNS[eiger_signs])
    if kind == "FlyPlan2D":
        # 12 keV, 0.5 m, 55 µm -> 14.7 nm; the ss* stages of the hxnfly era
        return _Setup("merlin1", 12.0, 0.5, 55e-6, (96, 110), (0.46, 0.55), ("ssx", "ssy"), MERLIN_SIGNS)
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


# ----------------------------------------------------------------------------------------------
# physics: object, probe, positions, forward model
# ----------------------------------------------------------------------------------------------

def _make_object(rng: np.random.Generator, ny: int, nx: int) -> np.ndarray:
    """Complex object, stage frame [y, x]: blobs at two scales plus asymmetric sharp shapes."""
    fine = ndimage.gaussian_filter(rng.standard_normal((ny, nx)), 1.5)
    coarse = ndimage.gaussian_filter(rng.standard_normal((ny, nx)), 7.0)
    fine /= np.abs(fine).max() + 1e-12
    coarse /= np.abs(coarse).max() + 1e-12
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    shapes = np.zeros((ny, nx))
    # an "F" (no mirror symmetry), a right triangle and a slanted bar, repeated over the field
    for oy in range(0, ny, 70):
        for ox in range(0, nx, 70):
            y0, x0 = oy + 12, ox + 14
            shapes[(yy >= y0) & (yy < y0 + 34) & (xx >= x0) & (xx < x0 + 6)] = 1.0
            shapes[(yy >= y0) & (yy < y0 + 6) & (xx >= x0) & (xx < x0 + 22)] = 1.0
            shapes[(yy >= y0 + 14) & (yy < y0 + 19) & (xx >= x0) & (xx < x0 + 15)] = 1.0
            ty, tx = oy + 40, ox + 36
            shapes[(yy >= ty) & (yy < ty + 22) & (xx >= tx) & (xx - tx < (yy - ty))] = 0.7
            shapes[(np.abs((xx - ox - 50) - 0.5 * (yy - oy - 10)) < 2.5) & (yy > oy + 2) & (yy < oy + 30)] = 0.5
    shapes = ndimage.gaussian_filter(shapes, 0.6)
    amp = 0.82 + 0.08 * fine + 0.06 * coarse - 0.25 * shapes
    phase = 0.5 * coarse + 0.25 * fine + 0.9 * shapes
    return (np.clip(amp, 0.2, 1.0) * np.exp(1j * phase)).astype(np.complex128)


def _make_probe(n: int, pixel_m: float, wavelength_m: float) -> np.ndarray:
    """A defocused zone-plate-like probe, stage frame [y, x], centre at pixel (n/2, n/2).

    Amplitude: a tilted elliptical disc with a weaker side lobe; phase: the spherical wave of a
    focus ``dz`` upstream (pi r^2 / (lambda dz)) plus a coma-like cubic term.  No flip or
    rotation maps it onto itself.  Row 0 and column 0 are zero, so that flipping an even-sized
    array about its centre pixel (what a sign change does) loses nothing.
    """
    c = n / 2
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    x, y = xx - c, yy - c
    th = np.deg2rad(25.0)
    xr, yr = x * np.cos(th) + y * np.sin(th), -x * np.sin(th) + y * np.cos(th)
    a, b = 0.24 * n, 0.18 * n
    disc = np.exp(-(((xr / a) ** 2 + (yr / b) ** 2) ** 3))
    lobe = PROBE_LOBE * np.exp(-((x - 0.17 * n) ** 2 + (y + 0.12 * n) ** 2) / (2 * (0.05 * n) ** 2))
    amp = disc + lobe
    dz = 150e-6
    alpha = min(np.pi * pixel_m**2 / (wavelength_m * dz), 0.03)  # rad per px^2, kept well sampled
    phase = alpha * (x**2 + y**2) + PROBE_COMA * ((x / (0.25 * n)) ** 3 - 0.5 * (x / (0.25 * n)) * (y / (0.25 * n)) ** 2)
    probe = amp * np.exp(1j * phase)
    probe[0, :] = 0
    probe[:, 0] = 0
    return probe.astype(np.complex128)


def _to_engine(arr_yx: np.ndarray, signs: tuple[int, int], *, probe: bool) -> np.ndarray:
    """Stage [y, x] -> the engine's [u, v] = [sx x, sy y] indexing (axis 0 is x)."""
    out = arr_yx.T
    for axis, s in enumerate(signs):
        if s < 0:
            out = np.flip(out, axis=axis)
            if probe:  # keep the centre pixel n/2 at n/2 (probe is zero on the rolled-in edge)
                out = np.roll(out, 1, axis=axis)
    return np.ascontiguousarray(out)


def _engine_intensities(obj_yx: np.ndarray, probe_yx: np.ndarray, iy: np.ndarray, jx: np.ndarray,
                        signs: tuple[int, int]) -> np.ndarray:
    """|fft2(P * O)|^2 in the [x, y]-indexed engine frame, zero frequency at [0, 0]."""
    n = probe_yx.shape[0]
    obj_e = _to_engine(obj_yx, signs, probe=False)
    prb_e = _to_engine(probe_yx, signs, probe=True)
    ny, nx = obj_yx.shape
    a = jx if signs[0] > 0 else (nx - 1 - jx)
    b = iy if signs[1] > 0 else (ny - 1 - iy)
    out = np.empty((len(iy), n, n))
    h = n // 2
    for k in range(len(iy)):
        ex = prb_e * obj_e[a[k] - h:a[k] + h, b[k] - h:b[k] + h]
        out[k] = np.abs(np.fft.fft2(ex)) ** 2 / (n * n)
    return out


def engine_to_crop(intensity_engine: np.ndarray) -> np.ndarray:
    """Inverse of ptycho_gui save_data's ``fftshift(rot90(crop, axes=(1, 0)))`` (last two axes)."""
    return np.rot90(np.fft.fftshift(intensity_engine, axes=(-2, -1)), 1, axes=(-2, -1))


def crop_to_engine(crop: np.ndarray) -> np.ndarray:
    """ptycho_gui save_data: ``np.fft.fftshift(np.rot90(crop, axes=(1, 0)))`` (last two axes)."""
    return np.fft.fftshift(np.rot90(crop, -1, axes=(-2, -1)), axes=(-2, -1))


def _raster(num1: int, num2: int, step_um: float) -> np.ndarray:
    """fly2dpd / FlyPlan2D order: fast axis (motor1 = x) inner, every line the same direction."""
    xs = (np.arange(num1) - (num1 - 1) / 2) * step_um
    ys = (np.arange(num2) - (num2 - 1) / 2) * step_um
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def _fermat_points(x_range: float, y_range: float, dr: float, factor: float) -> np.ndarray:
    """bluesky plan_patterns.spiral_fermat (tilt 0, dr_y None), centred at 0."""
    phi = 137.508 * np.pi / 180.0
    half_x, half_y = x_range / 2, y_range / 2
    diag = np.sqrt(half_x**2 + half_y**2)
    num_rings = int((1.5 * diag / (dr / factor)) ** 2)
    tilt_tan = np.tan(np.pi / 2.0)
    pts = []
    for i_ring in range(1, num_rings):
        radius = np.sqrt(i_ring) * dr / factor
        angle = phi * i_ring
        x, y = radius * np.cos(angle), radius * np.sin(angle)
        if abs(x - y / tilt_tan) <= half_x and abs(y) <= half_y:
            pts.append((x, y))
    return np.asarray(pts, dtype=float)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------

def _write_detector_file(path: Path, frames: np.ndarray) -> None:
    """AD HDF5 plugin with HXN's layout: the handlers read /entry/instrument/detector/data."""
    with h5py.File(path, "w", libver="latest") as f:
        ds = f.create_dataset("entry/instrument/detector/data", data=frames, chunks=(1,) + frames.shape[1:])
        f["entry/data/data"] = ds  # the NeXus hard link the AD layout also carries


def _raw_frames(crops: np.ndarray, hw: tuple[int, int], centre: tuple[int, int], photons: float | None,
                rng: np.random.Generator, flag: tuple[int, int, float] | None, dtype_int: Any) -> np.ndarray:
    n = crops.shape[-1]
    h, w = hw
    cy, cx = centre
    frames = np.zeros((crops.shape[0], h, w))
    frames[:, cy - n // 2:cy + n // 2, cx - n // 2:cx + n // 2] = crops
    if photons is not None:
        frames += 0.002  # a faint background over the whole sensor
        frames = rng.poisson(frames).astype(dtype_int)
    else:
        frames = frames.astype(np.float32)
    if flag is not None:
        fy, fx, value = flag
        frames[:, fy, fx] = value
    return frames


# ----------------------------------------------------------------------------------------------
# documents
# ----------------------------------------------------------------------------------------------

class _Docs:
    def __init__(self, md: dict, t0: float) -> None:
        self.t = t0
        self.run = event_model.compose_run(metadata=md, time=t0)
        self.docs: list[tuple[str, dict]] = [("start", self.run.start_doc)]

    def tick(self, dt: float = 0.01) -> float:
        self.t += dt
        return self.t

    def add(self, name: str, doc: dict) -> None:
        self.docs.append((name, dict(doc)))

    def resource(self, spec: str, root: str, resource_path: str, kwargs: dict) -> Any:
        bundle = self.run.compose_resource(spec=spec, root=root, resource_path=resource_path,
                                           resource_kwargs=kwargs, path_semantics="posix")
        self.add("resource", bundle.resource_doc)
        return bundle

    def datum(self, bundle: Any, kwargs: dict) -> str:
        d = bundle.compose_datum(datum_kwargs=kwargs)
        self.add("datum", d)
        return d["datum_id"]


def _baseline(docs: _Docs, energy_kev: float, motors: dict[str, float]) -> tuple[Any, dict, dict]:
    """sd.baseline (hxn-profile-collection 50-scans.py): dcm, the energy pseudo-motor, zp/ds stages."""
    dcm_th = float(np.rad2deg(np.arcsin(HC_KEV_A / (2 * SI111_D_A * energy_kev))))
    values = {"energy": energy_kev, "dcm_th": dcm_th, "ugap": 6.2, "zpsth": 0.0, "dsth": 0.0}
    values.update(motors)
    data_keys = {k: {"source": f"PV:XF:03ID-{k}", "dtype": "number", "shape": [], "precision": 4,
                     "units": "keV" if k == "energy" else ("deg" if k.endswith("th") else "um")}
                 for k in values}
    object_keys = {"dcm": ["dcm_th"], "e": ["energy"], "ugap": ["ugap"], "zps": ["zpsth"], "smlld": ["dsth"]}
    object_keys.update({m: [m] for m in motors})
    desc = docs.run.compose_descriptor(name="baseline", data_keys=data_keys, object_keys=object_keys,
                                       time=docs.tick())
    docs.add("descriptor", desc.descriptor_doc)
    return desc, values, {k: docs.t for k in values}


def _baseline_event(docs: _Docs, desc: Any, values: dict) -> None:
    t = docs.tick()
    docs.add("event", desc.compose_event(data=dict(values), timestamps={k: t for k in values}, time=t))


def _scaler_values(rng: np.random.Generator, n: int, dwell: float) -> dict[str, np.ndarray]:
    """sclr1 channels: ch1 the 50 MHz clock (alive time), ch3/ch4 ion chambers, others small."""
    drift = 1.0 + 0.04 * np.sin(np.linspace(0, 3 * np.pi, n)) + 0.01 * rng.standard_normal(n)
    ic = np.round(2.0e5 * dwell / 0.01 * drift)
    vals = {"sclr1_ch1": np.full(n, round(50e6 * dwell), dtype=float)}
    for ch in range(2, N_SCALER + 1):
        vals[f"sclr1_ch{ch}"] = np.round(rng.uniform(0, 20, n))
    vals["sclr1_ch3"] = ic.copy()
    vals["sclr1_ch4"] = ic.copy()
    return vals


def simulate(kind: str, out_dir: Path, *, n_positions: int = 100, frame_size: int = 64,
             photons: float | None = 1e6, seed: int = 0, eiger_signs: str = "holoptycho",
             motor_order: str = "xy", step_fraction: float | None = None) -> IndepScan:
    """Simulate one HXN run of ``kind`` into ``out_dir`` (see INDEP_SIM_API.md).

    ``step_fraction`` (an addition to the contract): scan step / probe diameter, default
    ``STEP_FRACTION`` = 0.13 (~87 % linear overlap, spans ~0.5 um at 100 views), dense as HXN scans
    are (holoptycho's example config: 20 nm steps) and as the engine's default probe guess assumes
    (RMS radius 2.5 x the median step); 0.38 gives 69-72 % overlap and 1-1.6 um spans, where the
    engine's default probe guess fails (benchmarks/indep_sim_reconstruct.py).

    ``photons=None`` gives the noise-free model (float32 frames, no background: the expected counts
    at 1e6 photons a crop, ``notes['photon_scale']`` times the unit-probe model); otherwise the
    mean number of photons in a crop, Poisson noise, integer frames.  ``n_positions`` is a target:
    grids use the nearest num1 x num2, the fermat spiral the nearest ``dr``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if eiger_signs not in EIGER_SIGNS:
        raise ValueError(f"unknown eiger_signs {eiger_signs!r}; expected one of {tuple(EIGER_SIGNS)}")
    if motor_order not in ("xy", "yx"):
        raise ValueError(f"motor_order must be 'xy' or 'yx', not {motor_order!r}")
    n = int(frame_size)
    if n < 16 or n % 2:
        raise ValueError(f"frame_size must be an even number >= 16, not {frame_size!r}")
    if n_positions < 4:
        raise ValueError(f"n_positions must be >= 4, not {n_positions!r}")
    frac = STEP_FRACTION if step_fraction is None else float(step_fraction)
    if not 0.02 <= frac <= 0.5:
        raise ValueError(f"step_fraction must be in [0.02, 0.5] (>= 50 % overlap), not {step_fraction!r}")
    if photons is not None and not photons > 0:
        raise ValueError(f"photons must be positive or None, not {photons!r}")
    out_dir = Path(out_dir)
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    su = _setup(kind, eiger_signs)
    lam = _wavelength_m(su.energy_kev)
    pixel_m = lam * su.distance_m / (n * su.det_pixel_m)
    p_um = pixel_m * 1e6

    # --- nominal scan (µm, relative to the motors' start positions) ---
    probe_um = 0.42 * n * p_um  # about the probe's diameter (the 5 %-of-peak contour)
    step_um = frac * probe_um  # linear overlap 1 - STEP_FRACTION (measured: see the docs)
    start_pos = {su.motors[0]: round(float(rng.uniform(-3, 3)), 3), su.motors[1]: round(float(rng.uniform(-3, 3)), 3)}
    plan: dict[str, Any] = {}
    if kind == "fermat":
        rng_um = round(float(np.sqrt(n_positions * np.pi * (step_um / np.sqrt(np.pi)) ** 2)), 3)
        dr = round(step_um / np.sqrt(np.pi), 4)
        rel = _fermat_points(rng_um, rng_um, dr, 1.0)
        plan.update(x_range=rng_um, y_range=rng_um, dr=dr, factor=1.0)
    else:
        num2 = max(2, int(round(np.sqrt(n_positions / 1.2))))
        num1 = max(2, int(round(n_positions / num2)))
        rel = _raster(num1, num2, step_um)
        plan.update(num1=num1, num2=num2, step_um=step_um)
    setpoints = rel + np.array([start_pos[su.motors[0]], start_pos[su.motors[1]]])
    actual = setpoints + rng.normal(0, 0.12 * step_um, setpoints.shape)  # stage jitter

    # --- object grid and positions held on it ---
    margin = n // 2 + 6
    x0 = float(np.floor((actual[:, 0].min() - margin * p_um) / p_um) * p_um)
    y0 = float(np.floor((actual[:, 1].min() - margin * p_um) / p_um) * p_um)
    jx = np.round((actual[:, 0] - x0) / p_um).astype(int)
    iy = np.round((actual[:, 1] - y0) / p_um).astype(int)
    nx, ny = int(jx.max() + margin + 1), int(iy.max() + margin + 1)
    positions = np.stack([x0 + jx * p_um, y0 + iy * p_um], axis=1)
    obj = _make_object(rng, ny, nx)
    probe = _make_probe(n, pixel_m, lam)

    # --- patterns: engine frame -> crops -> raw frames ---
    intens = _engine_intensities(obj, probe, iy, jx, su.signs)
    nfr = len(positions)
    dwell = 0.01
    scaler = _scaler_values(rng, nfr, dwell)
    ic_name = "sclr1_ch3" if su.motors[1] == "ssy" else "sclr1_ch4"  # ptycho_gui load_metadata
    ic = scaler[ic_name]
    # photon units in both modes (the noise-free model is the expectation at 1e6 photons a crop)
    scale = (1e6 if photons is None else photons) / float(intens.sum(axis=(1, 2)).mean())
    crops = engine_to_crop(intens) * scale * (ic / ic[0])[:, None, None]
    hw = (int(round(su.frame_hw[0] * n / 64)), int(round(su.frame_hw[1] * n / 64)))
    centre = (int(round(hw[0] * su.centre_frac[0])), int(round(hw[1] * su.centre_frac[1])))
    # a flagged (Eiger) or stuck (Merlin) pixel inside the crop, away from the zero frequency
    flag_val = float(MERLIN_HOT if su.detector.startswith("merlin") else EIGER_FLAG_U32)
    flag = (centre[0] + n // 4, centre[1] - n // 3, flag_val)
    frames = _raw_frames(crops, hw, centre, photons, rng, flag, np.uint32)

    t0 = 1.7e9 + seed
    uid8 = uuid.UUID(bytes=rng.bytes(16)).hex[:8]
    files: list[Path] = []
    notes: dict[str, Any] = {
        "crop_centre": {"row": centre[0], "col": centre[1], "cy": centre[0], "cx": centre[1]},
        "crop_box": [centre[0] - n // 2, centre[0] + n // 2, centre[1] - n // 2, centre[1] + n // 2],
        "raw_frame_shape": list(hw),
        "flagged_pixels": [[flag[0], flag[1]]],
        "flag_value": flag_val,
        "ic_key": ic_name,
        "ic": ic.tolist(),
        "engine_signs": list(su.signs),
        "motors_xy": list(su.motors),
        "setpoints_um": setpoints.tolist(),
        "probe_centre_px": [n // 2, n // 2],
        "noise_free": photons is None,
        "photon_scale": scale,
        "step_fraction": frac,
        "sources": {
            "engine_signs": ("holoptycho scripts/offline_epie.py + AGENTS.md 'Position signs'" if su.signs == (1, -1)
                             else "ptycho_gui nsls2ptycho/core/ptycho_param.py x_direction=y_direction=-1"),
            "frame_orientation": "ptycho_gui core/HXN_databroker.py save_data np.rot90(crop, axes=(1,0)) + fftshift; "
                                 "holoptycho scripts/offline_epie.py rot90_cw + ifftshift",
            "crop": "ptycho_gui save_data img[cy-nn//2:cy+nn//2, cx-n//2:cx+n//2]",
            "ic": "ptycho_gui load_metadata (sclr1_ch3 for ssy, else sclr1_ch4), save_data img*ic[0]/ic[i]",
            "energy": "ptycho_gui load_metadata, baseline dcm_th, Si(111)",
        },
    }
    notes.update(plan)

    if kind == "fly2dpd":
        docs = _fly2dpd_documents(su, data_dir, files, frames, positions, setpoints, start_pos, plan, scaler,
                                  dwell, t0, uid8, rng, seed)
    elif kind == "fermat":
        docs = _fermat_documents(su, data_dir, files, frames, positions, setpoints, start_pos, plan, scaler,
                                 dwell, t0, uid8, motor_order, seed)
    else:
        docs = _flyplan2d_documents(su, data_dir, files, frames, positions, start_pos, plan, scaler, dwell, t0,
                                    uid8, seed)
    notes["scan_id"] = docs[0][1]["scan_id"]

    return IndepScan(kind=kind, detector=su.detector, documents=docs, data_dir=data_dir, files=files,
                     object_truth=obj, origin_um=(x0, y0), pixel_m=pixel_m, probe_truth=probe,
                     positions_um=positions, energy_kev=su.energy_kev, distance_m=su.distance_m,
                     detector_pixel_m=su.det_pixel_m, frame_size=n, eiger_signs=eiger_signs,
                     motor_order=motor_order, notes=notes)


def _common_md(seed: int) -> dict:
    """RE.md at HXN (hxn-profile-collection 00-startup.py, 01-parameters.py)."""
    return {"beamline_id": "HXN", "group": "", "config": {}, "PI": "indsim", "experimenters": "indsim",
            "sample": "indsim", "scan_name": "indsim_1", "scan_id": 300000 + seed}


def _image_key(su: _Setup, n_frames_shape: list[int], uid: str, frames: np.ndarray) -> dict:
    dtype_str = "<f4" if frames.dtype == np.float32 else "<u4"
    return {"source": f"PV:XF:03IDC-ES{{Det:{su.detector}}}", "dtype": "array", "shape": n_frames_shape,
            "dtype_str": dtype_str, "external": "FILESTORE:"}


def _fly2dpd_documents(su: _Setup, data_dir: Path, files: list[Path], frames: np.ndarray, positions: np.ndarray,
                       setpoints: np.ndarray, start_pos: dict, plan: dict, scaler: dict, dwell: float, t0: float,
                       uid8: str, rng: np.random.Generator, seed: int) -> list[tuple[str, dict]]:
    """hxn-profile-collection 93-scanplan-panda.py fly2dpd -> flyscan_pd -> HXNFlyerPanda."""
    num1, num2 = plan["num1"], plan["num2"]
    total = num1 * num2
    m1, m2 = su.motors
    supersample = 10  # fly2dpd(position_supersample=10)
    rel_start1 = float(setpoints[:, 0].min() - start_pos[m1])
    rel_end1 = float(setpoints[:, 0].max() - start_pos[m1] + plan["step_um"])
    rel_start2 = float(setpoints[:, 1].min() - start_pos[m2])
    rel_end2 = float(setpoints[:, 1].max() - start_pos[m2] + plan["step_um"])
    start1, range1 = start_pos[m1] + rel_start1, rel_end1 - rel_start1
    start2, range2 = start_pos[m2] + rel_start2, rel_end2 - rel_start2
    md = _common_md(seed)
    md.update({
        "motors": [m1, m2], "motor1": m1, "motor2": m2, "shape": [num1, num2], "fly_type": "grid",
        "scan": {"type": "2D_FLY_PANDA",
                 "scan_input": [float(x) for x in [start1, start1 + range1, num1, start2, start2 + range2, num2]],
                 "sample_name": "",
                 "detectors": [su.detector, "panda1", "sclr1"],
                 # the plan writes a per-setup constant here (2.05 in 93-, 1.00 in 67-, 1.055 in 69-)
                 "detector_distance": su.distance_m,
                 "dwell": dwell,
                 "fast_axis": {"motor_name": m1, "units": "um"},
                 "slow_axis": {"motor_name": m2, "units": "um"},
                 "shape": [num1, num2]},
    })
    docs = _Docs(md, t0)
    bdesc, bvals, _ = _baseline(docs, su.energy_kev, {m1: start_pos[m1], m2: start_pos[m2], "zpssz": 0.0})
    _baseline_event(docs, bdesc, bvals)

    # files: eiger2 (MERLIN_FLY_STREAM_V2 while fly_next), PandA, SIS
    det_name = f"{uid8}-eiger2_000000.h5"
    det_path = data_dir / det_name
    _write_detector_file(det_path, frames)
    panda_name = f"panda_rbdata_20261205_000000_{uid8}.h5"
    panda_path = data_dir / panda_name
    sis_name = f"{uuid.UUID(bytes=rng.bytes(16))}.h5"
    sis_path = data_dir / sis_name
    # PandA: position_supersample samples per frame, spread over the exposure along the fast axis,
    # their mean the frame's position; counts = µm / (µm per count) (hxntools motor_table)
    offs = (np.arange(supersample) - (supersample - 1) / 2) / supersample * plan["step_um"] * 0.9
    xs = (positions[:, 0:1] + offs[None, :]).ravel()
    ys = np.repeat(positions[:, 1], supersample)
    counts = {
        "INENC1.VAL.Value": np.zeros(total * supersample, dtype=np.int32),
        "INENC2.VAL.Value": np.round(xs / MOTOR_TABLE[m1][1]).astype(np.int32),
        "INENC3.VAL.Value": np.round(ys / MOTOR_TABLE[m2][1]).astype(np.int32),
        "INENC4.VAL.Value": np.full(total * supersample, 1234, dtype=np.int32),
        "PCAP.TS_TRIG.Value": (np.arange(total * supersample) * dwell / supersample).astype(np.float64),
    }
    with h5py.File(panda_path, "w", libver="latest") as f:
        for k, v in counts.items():
            f.create_dataset(k, data=v)
    with h5py.File(sis_path, "w", libver="latest") as f:  # ExportSISDataPanda: one value per point
        for k, v in scaler.items():
            f.create_dataset(k, data=v.astype("f"), maxshape=(None,))
    files += [det_path, panda_path, sis_path]

    # collect(): descriptor, then the asset documents cached since kickoff, then one event_page
    fields = {"inenc1_val": ("INENC1.VAL.Value", "<i4"), "inenc2_val": ("INENC2.VAL.Value", "<i4"),
              "inenc3_val": ("INENC3.VAL.Value", "<i4"), "inenc4_val": ("INENC4.VAL.Value", "<i4"),
              "pcap_ts_trig": ("PCAP.TS_TRIG.Value", "<f8")}
    data_keys: dict[str, dict] = {}
    for key, (_, dt) in fields.items():
        data_keys[key] = {"source": "PANDA", "dtype": "array", "dtype_str": dt, "shape": [total * supersample],
                          "external": "FILESTORE:"}
    data_keys[f"{su.detector}_image"] = _image_key(su, [total, frames.shape[1], frames.shape[2]], uid8, frames)
    for name in scaler:
        data_keys[name] = {"source": f"PV:XF:03IDC-ES{{Sclr:1}}mca{name.split('ch')[-1]}", "dtype": "array",
                           "shape": [total * supersample], "external": "FILESTORE:"}
    pdesc = docs.run.compose_descriptor(name="primary", data_keys=data_keys, time=docs.tick(),
                                        object_keys={"PandaFlyer": list(data_keys)})
    docs.add("descriptor", pdesc.descriptor_doc)
    bulk: dict[str, Any] = {}
    panda_res = docs.resource("PANDA", str(data_dir), panda_name, {})
    for key, (dset, _) in fields.items():
        bulk[key] = docs.datum(panda_res, {"field": dset})
    sis_res = docs.resource("SIS_HDF51_FLY_STREAM_V1", str(data_dir.parent), str(sis_path),
                            {"frame_per_point": total * supersample})
    for name in scaler:
        bulk[name] = docs.datum(sis_res, {"column": name, "point_number": 0})
    det_res = docs.resource("MERLIN_FLY_STREAM_V2", str(data_dir.parent), f"{data_dir.name}/{det_name}",
                            {"frame_per_point": total})
    bulk[f"{su.detector}_image"] = docs.datum(det_res, {"point_number": 0})
    t = docs.tick(total * dwell)
    ev = pdesc.compose_event(data=bulk, timestamps={k: t for k in bulk}, filled={k: False for k in bulk}, time=t)
    docs.add("event_page", event_model.pack_event_page(ev))
    _baseline_event(docs, bdesc, bvals)
    docs.add("stop", docs.run.compose_stop(exit_status="success", time=docs.tick()))
    return docs.docs


def _fermat_documents(su: _Setup, data_dir: Path, files: list[Path], frames: np.ndarray, positions: np.ndarray,
                      setpoints: np.ndarray, start_pos: dict, plan: dict, scaler: dict, dwell: float, t0: float,
                      uid8: str, motor_order: str, seed: int) -> list[tuple[str, dict]]:
    """hxntools scans.relative_fermat -> bluesky rel_spiral_fermat -> spiral_fermat -> scan_nd."""
    mx, my = su.motors
    motors = [mx, my] if motor_order == "xy" else [my, mx]  # scan_nd: [m.name for m in cycler.keys] (a set)
    nfr = len(positions)
    plan_args = {"detectors": [f"HxnEigerDetector(prefix='XF:03IDC-ES{{Det:Eiger1M}}', name='{su.detector}')",
                               "HxnTriggeringScaler(prefix='XF:03IDC-ES{Sclr:1}', name='sclr1')"],
                 "x_motor": f"EpicsMotor(prefix='XF:03IDC-ES{{PPMAC-MTR:{mx}}}Mtr', name='{mx}')",
                 "y_motor": f"EpicsMotor(prefix='XF:03IDC-ES{{PPMAC-MTR:{my}}}Mtr', name='{my}')",
                 "x_start": 0, "y_start": 0, "x_range": plan["x_range"], "y_range": plan["y_range"],
                 "dr": plan["dr"], "factor": plan["factor"], "dr_y": None, "tilt": 0.0, "per_step": "None"}
    md = _common_md(seed)
    md.update({
        "detectors": [su.detector, "sclr1"], "motors": motors, "num_points": nfr, "num_intervals": nfr - 1,
        "plan_args": plan_args,
        "extents": [[-plan["x_range"], plan["x_range"]], [-plan["y_range"], plan["y_range"]]],
        "plan_name": "rel_spiral_fermat", "plan_pattern": "spiral_fermat",
        "plan_pattern_module": "bluesky.plan_patterns",
        "plan_pattern_args": {k: plan_args[k] for k in ("x_motor", "y_motor", "x_start", "y_start", "x_range",
                                                           "y_range", "dr", "factor", "dr_y", "tilt")},
        "hints": {"dimensions": [[[mx], "primary"], [[my], "primary"]]},
        # a step scan records no distance; the user passes it (md=) the way fly2dpd records it
        "scan": {"detector_distance": su.distance_m},
    })
    docs = _Docs(md, t0)
    bdesc, bvals, _ = _baseline(docs, su.energy_kev, {mx: start_pos[mx], my: start_pos[my]})
    _baseline_event(docs, bdesc, bvals)
    det_name = f"{uid8}-eiger1_000000.h5"
    det_path = data_dir / det_name
    _write_detector_file(det_path, frames)
    files.append(det_path)
    res = None
    pdesc = None
    for k in range(nfr):
        if res is None:  # staged eiger1: TPX_HDF5, frame_per_point 1 (hxntools detectors/merlin.py)
            res = docs.resource("TPX_HDF5", str(data_dir.parent), f"{data_dir.name}/{det_name}", {"frame_per_point": 1})
        did = docs.datum(res, {"point_number": k})
        data: dict[str, Any] = {su.detector: did}
        for m, col in ((mx, 0), (my, 1)):
            data[m] = float(positions[k, col])
            data[f"{m}_user_setpoint"] = float(setpoints[k, col])
        for name in ("sclr1_ch1", "sclr1_ch2", "sclr1_ch3", "sclr1_ch4", "sclr1_ch5"):
            data[name] = float(scaler[name][k])
        if pdesc is None:
            dk: dict[str, dict] = {su.detector: _image_key(su, [1, frames.shape[1], frames.shape[2]], uid8, frames)}
            for m in (mx, my):
                dk[m] = {"source": f"PV:XF:03IDC-ES{{PPMAC-MTR:{m}}}Mtr.RBV", "dtype": "number", "shape": [],
                         "units": "um", "precision": 4}
                dk[f"{m}_user_setpoint"] = {"source": f"PV:XF:03IDC-ES{{PPMAC-MTR:{m}}}Mtr", "dtype": "number",
                                            "shape": [], "units": "um", "precision": 4}
            for name in ("sclr1_ch1", "sclr1_ch2", "sclr1_ch3", "sclr1_ch4", "sclr1_ch5"):
                dk[name] = {"source": f"PV:XF:03IDC-ES{{Sclr:1}}.S{name.split('ch')[-1]}", "dtype": "number",
                            "shape": []}
            okeys = {su.detector: [su.detector], mx: [mx, f"{mx}_user_setpoint"],
                     my: [my, f"{my}_user_setpoint"], "sclr1": [f"sclr1_ch{c}" for c in range(1, 6)]}
            pdesc = docs.run.compose_descriptor(name="primary", data_keys=dk, object_keys=okeys, time=docs.tick())
            docs.add("descriptor", pdesc.descriptor_doc)
        t = docs.tick(dwell + 0.05)
        docs.add("event", pdesc.compose_event(data=data, timestamps={k2: t for k2 in data},
                                              filled={su.detector: False}, time=t))
    _baseline_event(docs, bdesc, bvals)
    docs.add("stop", docs.run.compose_stop(exit_status="success", time=docs.tick()))
    return docs.docs


def _flyplan2d_documents(su: _Setup, data_dir: Path, files: list[Path], frames: np.ndarray, positions: np.ndarray,
                         start_pos: dict, plan: dict, scaler: dict, dwell: float, t0: float, uid8: str,
                         seed: int) -> list[tuple[str, dict]]:
    """hxnfly bs.py FlyPlan2D (relative): md from FlyPlan._update_md and Fly2D._configure."""
    m1, m2 = su.motors
    num1, num2 = plan["num1"], plan["num2"]
    step = plan["step_um"]
    s1, e1 = -(num1 / 2) * step, (num1 / 2) * step
    s2, e2 = -(num2 / 2) * step, (num2 / 2) * step
    dead_time = 0.007
    plan_args = {"motor1": f"EpicsMotor(prefix='XF:03IDC-ES{{Ppmac:1-{m1}}}Mtr', name='{m1}')",
                 "scan_start1": s1, "scan_end1": e1, "num1": num1,
                 "motor2": f"EpicsMotor(prefix='XF:03IDC-ES{{Ppmac:1-{m2}}}Mtr', name='{m2}')",
                 "scan_start2": s2, "scan_end2": e2, "num2": num2,
                 "exposure_time": dwell, "dead_time": dead_time, "fly_type": "soft", "return_speed": 40.0,
                 "max_points": 16384}
    md = _common_md(seed)
    md.update({
        "plan_args": plan_args, "detectors": [su.detector, "sclr1"], "motors": [m1, m2], "fast_axis": m1,
        "plan_name": "FlyPlan2D", "plan_type": "FlyPlan2D", "shape": [num1, num2], "scan_count": 1,
        "subscan_dims": [[num1, num2]], "axes": [m1, m2], "fly_type": "soft",
        "scan_range": [[start_pos[m1] + s1, start_pos[m1] + e1], [start_pos[m2] + s2, start_pos[m2] + e2]],
        "exposure_time": dwell, "dead_time": dead_time,
        # hxnfly records no distance; the user passes it (md=) the way fly2dpd records it
        "scan": {"detector_distance": su.distance_m},
    })
    docs = _Docs(md, t0)
    bdesc, bvals, _ = _baseline(docs, su.energy_kev, {m1: start_pos[m1], m2: start_pos[m2]})
    _baseline_event(docs, bdesc, bvals)
    det_name = f"{uid8}-merlin1_000000.h5"
    det_path = data_dir / det_name
    _write_detector_file(det_path, frames)
    files.append(det_path)
    nfr = len(positions)
    # fly.py _configure: image key, gathered axes, elapsed/alive/dead, scaler_alive + sclr1_chN
    dk: dict[str, dict] = {su.detector: _image_key(su, [frames.shape[1], frames.shape[2]], uid8, frames)}
    for key in (m1, m2, "elapsed_time", "alive", "dead"):
        dk[key] = {"source": "HW:ppmac_gather", "shape": [], "dtype": "number"}
    dk["scaler_alive"] = {"source": "PV:XF:03IDC-ES{Sclr:1}mca1", "shape": [], "dtype": "number"}
    chans = [2, 3, 4, 5, 6]  # FlyPlan scaler_channels [1..6]; channel 1 becomes scaler_alive
    for c in chans:
        dk[f"sclr1_ch{c}"] = {"source": f"PV:XF:03IDC-ES{{Sclr:1}}mca{c}", "shape": [], "dtype": "number"}
    pdesc = docs.run.compose_descriptor(name="primary", data_keys=dk, time=docs.tick(),
                                        object_keys={"flyer": list(dk)})
    docs.add("descriptor", pdesc.descriptor_doc)
    # merlin1's assets (hxnfly registered them in the asset registry, reg=db.reg; replayed runs carry them)
    res = docs.resource("TPX_HDF5", str(data_dir.parent), f"{data_dir.name}/{det_name}", {"frame_per_point": 1})
    dids = [docs.datum(res, {"point_number": k}) for k in range(nfr)]
    t_start = docs.tick()
    events = []
    for k in range(nfr):
        t = t_start + k * (dwell + dead_time)
        data = {su.detector: dids[k], m1: float(positions[k, 0]), m2: float(positions[k, 1]),
                "elapsed_time": k * (dwell + dead_time), "alive": 1, "dead": 0,
                "scaler_alive": float(scaler["sclr1_ch1"][k]) / 50e3}
        for c in chans:
            data[f"sclr1_ch{c}"] = int(scaler[f"sclr1_ch{c}"][k])
        events.append(pdesc.compose_event(data=data, timestamps={k2: t for k2 in data},
                                          filled={su.detector: False}, time=t))
    docs.tick(nfr * (dwell + dead_time))
    docs.add("event_page", event_model.pack_event_page(*events))
    _baseline_event(docs, bdesc, bvals)
    docs.add("stop", docs.run.compose_stop(exit_status="success", time=docs.tick()))
    return docs.docs


def emit(scan: IndepScan, callback: Callable[[str, dict], Any]) -> None:
    """callback(name, doc) for every document, in order (as RE.subscribe would)."""
    for name, doc in scan.documents:
        callback(name, doc)


def describe(scan: IndepScan) -> str:
    """A one-line JSON summary (kind, detector, frames, pixel, signs, motors) for logs."""
    return json.dumps({"kind": scan.kind, "detector": scan.detector, "frames": len(scan.positions_um),
                       "pixel_nm": round(scan.pixel_m * 1e9, 3), "signs": scan.notes["engine_signs"],
                       "motors": scan.documents[0][1].get("motors"), "scan_id": scan.notes.get("scan_id"),
                       "time": _time.time()})
