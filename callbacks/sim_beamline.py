"""A simulated HXN that speaks the beamline's dialect, and its three ptychography scan types.

The devices emit what the real ones emit (sources in NSLS2/hxn-profile-collection and
NSLS-II-HXN/hxntools, hxnfly):

- ``eiger1``/``eiger2`` (:class:`SimEiger`): an area-detector HDF5 file per scan with the frames at
  ``/entry/instrument/detector/data`` (hard link ``/entry/data/data``, frame ids at
  ``/entry/instrument/NDAttributes/NDArrayUniqueId``); step mode: resource spec ``TPX_HDF5``,
  ``frame_per_point = 1``, one datum ``{'point_number': i}`` per event; fly mode (fly2dpd):
  spec ``MERLIN_FLY_STREAM_V2``, ``frame_per_point = N`` and one datum for all N frames
  (startup/92-eiger2.py ``EigerFileStoreHDF5``). ``describe()`` gives the shape
  (num_triggers, height, width) as that file's ``describe`` does.
- ``merlin1`` (:class:`SimMerlin`): ``TPX_HDF5`` per point (hxntools detectors/merlin.py).
- ``panda1`` + ``sclr1`` behind the ``PandaFlyer`` (:class:`SimPandaFlyer`,
  startup/93-scanplan-panda.py ``HXNFlyerPanda``): a ``PANDA`` resource with one datum
  ``{'field': 'INENC2.VAL.Value'}`` per encoder (datasets ``/INENCk.VAL.Value``, int32 counts,
  ``position_supersample`` samples per point), an ``SIS_HDF51_FLY_STREAM_V1`` resource with
  ``frame_per_point = N × supersample`` and one datum ``{'column': 'sclr1_chK', 'point_number': 0}``
  per channel; one event in ``primary`` holding every datum id.
- the hxnfly flyer (:class:`SimHxnFlyer`, hxnfly fly.py ``dataframe_to_bluesky_data``): one event
  per point with the motor positions (µm), the scaler channels and the Merlin datum.

The sample is a :class:`SimSample`: a simulated scan (``hxn_ptycho.simulate``) relabelled to the
beamline geometry (detector pixel, distance), taken as the sample on the stage: its positions are
what the stages record, its frames what the export must give back (the stage frame, rows +y,
columns +x). The detector writes them as the beamline records them: the inverse of the
detector's documented convention in its stage-frame form (:meth:`~.orientation.Orientation.in_stage_frame`),
so that ptycho_gui/holoptycho — their rotation (our ``flipud``, :func:`~.orientation.from_beamline`)
and their signs on the recorded positions — see a consistent scan (of the mirrored sample where a
sign is negative). The export decides the symmetry from the data. The step scan is a spiral whose
``start['motors']`` order is chosen (``motor_order``), as bluesky's ``spiral_fermat`` fills it from
a set, with ``plan_args`` x_motor/y_motor and ``hints['dimensions']`` as bluesky writes them.
"""
from __future__ import annotations

import itertools
import os
import time
import warnings
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.sim import SynAxis
from ophyd.status import StatusBase

from .export import MOTOR_TABLE, PIXEL_UM, bragg_angle_deg
from .orientation import DETECTOR_ORIENTATION, Orientation

DETECTOR_SHAPE = (96, 96)


def _done() -> StatusBase:
    st = StatusBase()
    st.set_finished()
    return st


@dataclass
class SimSample:
    """A simulated scan at the beamline geometry; ``frame(i)`` is view i as a detector records it."""

    scan: Any                                   # ScanData in the engine's convention
    detector: str = "eiger2"
    orientation: Orientation | None = None      # None: the detector's default
    shape: tuple[int, int] = DETECTOR_SHAPE
    center: tuple[int, int] | None = None
    hot: tuple[tuple[int, int], ...] = ((5, 7),)          # stuck bright pixels
    flagged: tuple[tuple[int, int], ...] = ((60, 30),)    # pixels at the integer maximum
    dark: tuple[int, ...] = ()                            # views without beam
    scaler: float = 1.0e5

    def __post_init__(self) -> None:
        self.orient = self.orientation or DETECTOR_ORIENTATION.get(self.detector, Orientation())
        self.center = tuple(self.center) if self.center else (self.shape[0] // 2 + 3, self.shape[1] // 2 - 2)
        inten = np.asarray(self.scan.diffamp, np.float64) ** 2
        self._raw = np.fft.fftshift(self.orient.in_stage_frame().invert_frames(inten), axes=(-2, -1))

    @property
    def n_views(self) -> int:
        return int(self.scan.points.shape[1])

    def recorded_points(self) -> np.ndarray:
        """(2, N) positions in µm as the stages record them (the beamline's engines multiply them
        by the detector's signs; this project uses them as they are)."""
        return np.array(self.scan.points, dtype=np.float64)

    def stage_scan(self) -> Any:
        """The scan the export should give back: the simulation itself (recorded positions, frames
        in the stage frame)."""
        return self.scan

    def stage_object(self, obj: np.ndarray) -> np.ndarray:
        """The simulation's object as it lies on the stage: the simulation's own."""
        return obj

    def frame(self, i: int, dtype: Any = np.uint32) -> np.ndarray:
        n = self._raw.shape[-1]
        out = np.zeros(self.shape)
        r0, c0 = self.center[0] - n // 2, self.center[1] - n // 2
        if i not in self.dark:
            out[r0:r0 + n, c0:c0 + n] = self._raw[i]
        info = np.iinfo(dtype)
        for r, c in self.hot:
            out[r, c] = min(5e6, info.max - 10)
        for r, c in self.flagged:
            out[r, c] = info.max
        return np.clip(np.rint(out), 0, info.max).astype(dtype)


def hxn_sample(scan: Any, detector: str, distance_m: float = 2.05, **kw: Any) -> SimSample:
    """``scan`` relabelled to ``detector`` at ``distance_m`` (same object pixels, rescaled µm)."""
    pixel = next(v for k, v in PIXEL_UM.items() if detector.startswith(k))
    old = scan.pixel_size_m
    relabelled = replace(scan, z_m=float(distance_m), ccd_pixel_um=float(pixel))
    relabelled = replace(relabelled, points=scan.points * (relabelled.pixel_size_m / old))
    return SimSample(relabelled, detector=detector, **kw)


class _ADFile:
    """An area-detector-like HDF5 file written frame by frame (the layout hxntools reads), open for
    the whole scan in SWMR mode and flushed after every append, as the AD HDF5 plugin's SWMR mode
    does: readers (hxntools' handlers open with ``swmr=True``) see each frame as soon as it is in."""

    def __init__(self, path: str, frame_shape: tuple[int, int], dtype: Any) -> None:
        import h5py
        self.path = path
        f = self.f = h5py.File(path, "w", libver="latest", locking=False)   # the flags of the readers (frames.open_h5)
        d = f.create_dataset("entry/instrument/detector/data", shape=(0, *frame_shape),
                             maxshape=(None, *frame_shape), dtype=dtype, chunks=(1, *frame_shape))
        f["entry/data/data"] = d                          # hard link, as the AD NeXus layout has
        f.create_dataset("entry/instrument/NDAttributes/NDArrayUniqueId", shape=(0,), maxshape=(None,),
                         dtype=np.int32)
        f.swmr_mode = True

    def append(self, frames: np.ndarray, ids: list[int]) -> None:
        d = self.f["entry/instrument/detector/data"]
        n = d.shape[0]
        d.resize(n + len(frames), axis=0)
        d[n:] = frames
        u = self.f["entry/instrument/NDAttributes/NDArrayUniqueId"]
        u.resize(n + len(ids), axis=0)
        u[n:] = ids
        d.flush()
        u.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


class _SimAreaDetector(Device):
    """Common part of the simulated Eiger and Merlin (files, resources, datums)."""

    image = Cpt(Signal, kind="normal", value="")
    spec_step = "TPX_HDF5"
    spec_fly = "TPX_HDF5"

    def __init__(self, *args: Any, save_path: str | os.PathLike = ".", frame_shape: tuple[int, int] = DETECTOR_SHAPE,
                 dtype: Any = np.uint32, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_path = str(save_path)
        self.frame_shape = tuple(frame_shape)
        self.dtype = dtype
        self.sample: SimSample | None = None
        self.fly = False                          # fly2dpd: one datum for every frame
        self.total_points = 1
        self.drop_points: set[int] = set()        # frames "lost" (for failure tests)
        self._asset_docs: list[tuple[str, dict]] = []
        self._file: _ADFile | None = None
        self._resource_uid: str | None = None
        self._counter: Iterator[int] | None = None
        self._point = 0

    def stage(self) -> list:
        Path(self.save_path).mkdir(parents=True, exist_ok=True)
        name = f"{self.name}_{uuid.uuid4().hex[:12]}_000000.h5"
        self._file = _ADFile(os.path.join(self.save_path, name), self.frame_shape, self.dtype)
        self._resource_uid = str(uuid.uuid4())
        self._counter = itertools.count()
        fpp = self.total_points if self.fly else 1
        self._asset_docs.append(("resource", {
            "uid": self._resource_uid, "spec": self.spec_fly if self.fly else self.spec_step,
            "root": self.save_path, "resource_path": name, "resource_kwargs": {"frame_per_point": fpp},
            "path_semantics": "posix"}))
        return super().stage()

    def unstage(self) -> list:
        if self._file is not None:
            self._file.close()
        self._file = self._resource_uid = self._counter = None
        return super().unstage()

    def expose(self, indices: list[int]) -> None:
        """Write the frames of views ``indices`` (the beam on those points)."""
        keep = [i for i in indices if i not in self.drop_points]
        if not keep or self.sample is None:
            return
        frames = np.stack([self.sample.frame(i, self.dtype) for i in keep])
        self._file.append(frames, keep)

    def point_datum(self) -> str:
        point = next(self._counter)
        datum_id = f"{self._resource_uid}/{point}"
        self._asset_docs.append(("datum", {"resource": self._resource_uid, "datum_id": datum_id,
                                           "datum_kwargs": {"point_number": point}}))
        return datum_id

    def trigger(self) -> StatusBase:
        if self._counter is None:
            raise RuntimeError(f"{self.name} must be staged before it is triggered")
        if self.fly:
            return _done()                        # fly mode: frames come with the flyer's motion
        self.expose([self._point])
        self._point += 1
        self.image.put(self.point_datum())
        return _done()

    def describe(self) -> dict:
        desc = super().describe()
        key = f"{self.name}_image"
        n = self.total_points if self.fly else 1
        desc[key].update({"shape": [n, *self.frame_shape], "dtype": "array",
                          "dtype_numpy": np.dtype(self.dtype).str, "external": "FILESTORE:"})
        return desc

    def collect_asset_docs(self) -> Iterator[tuple[str, dict]]:
        docs, self._asset_docs = self._asset_docs, []
        yield from docs


class SimEiger(_SimAreaDetector):
    """Eiger: ``TPX_HDF5`` in step mode, ``MERLIN_FLY_STREAM_V2`` in fly mode (92-eiger2.py)."""

    spec_step = "TPX_HDF5"
    spec_fly = "MERLIN_FLY_STREAM_V2"


class SimMerlin(_SimAreaDetector):
    """Merlin: ``TPX_HDF5``, one datum per point (hxntools detectors/merlin.py)."""


class SimScaler(Device):
    """sclr1: channels ``sclr1_ch1`` … ``sclr1_ch8`` (ch3 for ss* scans, ch4 for zp/ds scans)."""

    ch1 = Cpt(Signal, value=1.0e5, kind="normal")
    ch2 = Cpt(Signal, value=1.0e5, kind="normal")
    ch3 = Cpt(Signal, value=1.0e5, kind="hinted")
    ch4 = Cpt(Signal, value=1.0e5, kind="hinted")


# -- fly2dpd: the PandA flyer -------------------------------------------------------------------------

PANDA_FIELDS = {f"inenc{k}_val": f"INENC{k}.VAL.Value" for k in range(1, 5)}
SIS_CHANNELS = [f"sclr1_ch{k}" for k in range(1, 9)]


class _SimPandaBase(Device):
    """What both PandA flyers share: the detectors, motors and sample they are given by the plan,
    the files' names and the recorded motion (:meth:`recorded`: the same values in the files and on
    the streams, whichever flyer runs the scan)."""

    def __init__(self, *args: Any, save_path: str | os.PathLike = ".", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_path = str(save_path)
        self.detectors: list[_SimAreaDetector] = []
        self.motors: tuple[str, str] = ("zpssx", "zpssy")
        self.sample: SimSample | None = None
        self.position_supersample = 10
        self.bad_scaler: dict[int, float] = {}    # point -> value (e.g. 0: a glitch to be patched)
        self.streams: Any = None                  # a sim_streams.SimStreams: the scan also goes out on the streams
        self._recorded: tuple[dict, dict] | None = None

    def _start_files(self, num: int) -> tuple[str, str]:
        """At kickoff (``num`` encoder samples): the save folder made, the recorded motion reset; the
        new (PandA, SIS) file names, as the beamline names them."""
        self.frame_per_point = int(num)
        Path(self.save_path).mkdir(parents=True, exist_ok=True)
        self._recorded = None
        stamp = time.strftime("%Y%m%d_%H%M%S")
        return f"panda_rbdata_{stamp}_{uuid.uuid4().hex[:8]}.h5", f"{uuid.uuid4()}.h5"

    def recorded(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(encoder field → int32 samples, SIS channel → float32 values per point) of the motion,
        computed once: the files and the streams carry the same values."""
        if self._recorded is None:
            s = self.sample
            n = s.n_views
            ss = self.position_supersample
            pts = s.recorded_points()
            rng = np.random.default_rng(7)
            enc_for = {}
            for axis, motor in enumerate(self.motors):
                enc, scale = MOTOR_TABLE[motor]
                # the stage moves across each point during the exposure: symmetric samples about it
                motion = np.linspace(-0.3, 0.3, ss) * np.median(np.abs(np.diff(pts[axis]))) if n > 1 else np.zeros(ss)
                samples = (pts[axis][:, None] + motion[None, :] + rng.normal(0, 1e-4, (n, ss))) / scale
                enc_for[enc] = np.rint(samples).astype(np.int32).ravel()
            sis = {}
            for name in SIS_CHANNELS:
                v = np.full(n, s.scaler, np.float32)
                for i, bad in self.bad_scaler.items():
                    v[i] = bad
                sis[name] = v
            self._recorded = (enc_for, sis)
        return self._recorded


class SimPandaFlyer(_SimPandaBase):
    """``PandaFlyer``: PandA encoders + SIS scaler into HDF5 files, one event of datums."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._docs: list[tuple[str, dict]] = []
        self._bulk: dict | None = None
        self.frames_written = False

    def kickoff(self, *, num: int) -> StatusBase:
        self._panda_name, self._sis_name = self._start_files(num)
        self._panda_res = {"uid": str(uuid.uuid4()), "spec": "PANDA", "root": self.save_path,
                           "resource_path": self._panda_name, "resource_kwargs": {}, "path_semantics": "posix"}
        self._sis_res = {"uid": str(uuid.uuid4()), "spec": "SIS_HDF51_FLY_STREAM_V1", "root": "/",
                         "resource_path": os.path.join(self.save_path, self._sis_name).lstrip("/"),
                         "resource_kwargs": {"frame_per_point": self.frame_per_point}, "path_semantics": "posix"}
        self._docs = [("resource", self._panda_res)]
        self._panda_datums = {}
        for key, fieldname in PANDA_FIELDS.items():
            d = {"resource": self._panda_res["uid"], "datum_id": f"{self._panda_res['uid']}/{key}",
                 "datum_kwargs": {"field": fieldname}}
            self._docs.append(("datum", d))
            self._panda_datums[key] = d["datum_id"]
        self._docs.append(("resource", self._sis_res))
        self.frames_written = False
        return _done()

    def fly(self) -> None:
        """The motion: every point exposed; encoders sampled ``position_supersample`` times."""
        import h5py
        n = self.sample.n_views
        ss = self.position_supersample
        if not self.frames_written:               # (the streams' sender may have written them during the scan)
            for det in self.detectors:
                det.expose(list(range(n)))
        enc_for, sis = self.recorded()
        with h5py.File(os.path.join(self.save_path, self._panda_name), "w") as f:
            for key, fieldname in PANDA_FIELDS.items():
                f[fieldname] = enc_for.get(key, np.zeros(n * ss, np.int32))
            f["PCAP.TS_TRIG.Value"] = np.arange(n * ss, dtype=np.float64) * 1e-3
        with h5py.File(os.path.join(self.save_path, self._sis_name), "w") as f:
            for name, v in sis.items():
                f[name] = v

    def complete(self) -> StatusBase:
        if self.streams is not None:              # the motion goes out on the streams first (a thread)
            from .sim_streams import emit_scan
            return emit_scan(self, self._complete)
        return self._complete()

    def _complete(self) -> StatusBase:
        self.fly()
        now = time.time()
        data = dict(self._panda_datums)
        for name in SIS_CHANNELS:
            d = {"resource": self._sis_res["uid"], "datum_id": f"{self._sis_res['uid']}/{name}",
                 "datum_kwargs": {"column": name, "point_number": 0}}
            self._docs.append(("datum", d))
            data[name] = d["datum_id"]
        for det in self.detectors:
            self._docs.extend(det.collect_asset_docs())
            data[f"{det.name}_image"] = det.point_datum()
            self._docs.extend(det.collect_asset_docs())
        self._bulk = {"data": data, "timestamps": {k: now for k in data}, "time": now,
                      "filled": {k: False for k in data}}
        return _done()

    def describe_collect(self) -> dict:
        desc: dict[str, dict] = {}
        for key in PANDA_FIELDS:
            desc[key] = {"source": "PANDA", "dtype": "array", "dtype_str": "<i4",
                         "shape": [self.frame_per_point], "external": "FILESTORE:"}
        for name in SIS_CHANNELS:
            desc[name] = {"source": f"XF03IDC-ES-SCLR1:{name}", "dtype": "array",
                          "shape": [self.frame_per_point // self.position_supersample], "external": "FILESTORE:"}
        for det in self.detectors:
            desc.update(det.describe())
        return {"primary": desc}

    def collect(self) -> Iterator[dict]:
        yield self._bulk

    def collect_asset_docs(self) -> Iterator[tuple[str, dict]]:
        docs, self._docs = self._docs, []
        yield from docs


class _SwmrColumns:
    """An HDF5 file of 1-D datasets grown point by point in SWMR mode and flushed after every append
    (the PandA's and SIS scaler's files of a fly2dpd followed live): a reader sees each point's
    values as soon as they are in."""

    def __init__(self, path: str, columns: dict[str, Any]) -> None:
        import h5py
        self.path = path
        self.f = h5py.File(path, "w", libver="latest", locking=False)
        for name, dtype in columns.items():
            self.f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(4096,))
        self.f.swmr_mode = True

    def append(self, values: dict[str, np.ndarray]) -> None:
        for name, v in values.items():
            d = self.f[name]
            n = d.shape[0]
            d.resize(n + len(v), axis=0)
            d[n:] = v
            d.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()
            self.f = None


class SimPandaStreamFlyer(_SimPandaBase):
    """The PandA flyer of a fly2dpd that goes out *during* the scan (``fly2dpd(stream_datum_every_s=...)``),
    as an ophyd-async flyer does under bluesky's ``collect_while_completing`` (bluesky
    plan_stubs.py: ``complete_all`` without waiting, then ``collect`` every ``flush_period`` until the
    motion is done, and once more after it): it writes bluesky's ``WritesStreamAssets`` protocol —
    ``describe_collect`` (every key ``external: 'STREAM:'``), ``get_index`` (the points whose frame,
    encoder samples and scaler values are all flushed) and ``collect_asset_docs`` (one StreamResource
    per data key at the first collect, then one StreamDatum per key for the points flushed since the
    last collect). No events: the RunEngine counts the points from the StreamDatums' ``seq_nums``.

    The frames go to the detector's file (:class:`_ADFile`, SWMR, flushed per frame), the encoder
    samples (``position_supersample`` a point, int32 counts, datasets ``/INENCk.VAL.Value`` as the
    PandA writes them) and the SIS channels (one value a point) to SWMR files flushed per point, so
    that what a StreamDatum names is readable when it is emitted. Same values as
    :class:`SimPandaFlyer` (:meth:`SimPandaFlyer.recorded`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dwell_s = 0.0                        # seconds per point of the motion
        self._index = 0                           # points flushed (frames, positions, scaler)
        self._emitted = 0                         # points named by StreamDatums so far
        self._resources: dict[str, dict] = {}     # data key -> its StreamResource
        self._sent_resources = False
        self._thread: Any = None
        self._status: StatusBase | None = None

    def describe_collect(self) -> dict:
        desc: dict[str, dict] = {}
        for key in PANDA_FIELDS:
            desc[key] = {"source": "PANDA", "dtype": "array", "dtype_numpy": "<i4",
                         "shape": [self.position_supersample], "external": "STREAM:"}
        for name in SIS_CHANNELS:
            desc[name] = {"source": f"XF03IDC-ES-SCLR1:{name}", "dtype": "number", "dtype_numpy": "<f4",
                          "shape": [], "external": "STREAM:"}
        for det in self.detectors:
            desc[f"{det.name}_image"] = {"source": det.name, "dtype": "array",
                                         "dtype_numpy": np.dtype(det.dtype).str, "shape": list(det.frame_shape),
                                         "external": "STREAM:"}
        return desc

    def kickoff(self, *, num: int) -> StatusBase:
        import threading
        panda_path, sis_path = (os.path.join(self.save_path, name) for name in self._start_files(num))
        self._panda = _SwmrColumns(panda_path, {**{f: np.int32 for f in PANDA_FIELDS.values()},
                                                "PCAP.TS_TRIG.Value": np.float64})
        self._sis = _SwmrColumns(sis_path, {name: np.float32 for name in SIS_CHANNELS})
        ss = self.position_supersample

        def resource(key: str, path: str, dataset: str, multiplier: int = 1) -> dict:
            return {"uid": str(uuid.uuid4()), "data_key": key, "mimetype": "application/x-hdf5",
                    "uri": Path(path).resolve().as_uri(),
                    "parameters": {"dataset": dataset, "multiplier": multiplier}}
        self._resources = {key: resource(key, panda_path, "/" + field, ss) for key, field in PANDA_FIELDS.items()}
        self._resources.update({name: resource(name, sis_path, "/" + name) for name in SIS_CHANNELS})
        for det in self.detectors:
            det._asset_docs = []                  # its step-mode Resource is not this scan's document
            self._resources[f"{det.name}_image"] = resource(f"{det.name}_image", det._file.path,
                                                            "/entry/instrument/detector/data")
        self._index = self._emitted = 0
        self._sent_resources = False
        self._status = StatusBase()
        self._thread = threading.Thread(target=self._move, name="sim-panda-motion", daemon=True)
        self._thread.start()
        return _done()

    def _move(self) -> None:
        """The motion: point by point, the frame, the encoder samples and the scaler flushed, then
        the point counted (:meth:`get_index`)."""
        assert self._status is not None
        try:
            n, ss = self.sample.n_views, self.position_supersample
            enc_for, sis = self.recorded()
            t0 = time.monotonic()
            for i in range(n):
                if self.dwell_s > 0:
                    time.sleep(max(0.0, t0 + (i + 1) * self.dwell_s - time.monotonic()))
                for det in self.detectors:
                    det.expose([i])
                self._panda.append({**{f: enc_for.get(k, np.zeros(n * ss, np.int32))[i * ss:(i + 1) * ss]
                                       for k, f in PANDA_FIELDS.items()},
                                    "PCAP.TS_TRIG.Value": (np.arange(i * ss, (i + 1) * ss) * 1e-3)})
                self._sis.append({name: v[i:i + 1] for name, v in sis.items()})
                self._index = i + 1
            self._panda.close()
            self._sis.close()
            self._status.set_finished()
        except Exception as exc:  # noqa: BLE001 - the plan's complete fails with it
            self._status.set_exception(exc)

    def complete(self) -> StatusBase:
        assert self._status is not None
        return self._status

    def get_index(self) -> int:
        return self._index

    def collect_asset_docs(self, index: int | None = None) -> Iterator[tuple[str, dict]]:
        n = self._index if index is None else min(int(index), self._index)
        if not self._sent_resources:
            self._sent_resources = True
            for doc in self._resources.values():
                yield "stream_resource", dict(doc)
        if n > self._emitted:
            for doc in self._resources.values():
                yield "stream_datum", {"uid": f"{doc['uid']}/{self._emitted}", "stream_resource": doc["uid"],
                                       "descriptor": "", "indices": {"start": self._emitted, "stop": n},
                                       "seq_nums": {"start": 0, "stop": 0}}
            self._emitted = n


# -- FlyPlan2D: the hxnfly flyer ------------------------------------------------------------------------

class SimHxnFlyer(Device):
    """hxnfly's flyer: one event per point (motor positions in µm, scaler, Merlin datum)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.detectors: list[_SimAreaDetector] = []
        self.motors: tuple[str, str] = ("zpssx", "zpssy")
        self.sample: SimSample | None = None
        self.drop_motor: str | None = None        # a broken gather: this axis is never recorded
        self._events: list[dict] = []

    def kickoff(self) -> StatusBase:
        return _done()

    def complete(self) -> StatusBase:
        s = self.sample
        pts = s.recorded_points()
        t0 = time.time()
        self._events = []
        for det in self.detectors:
            det.expose(list(range(s.n_views)))
        for i in range(s.n_views):
            data = {m: float(pts[a, i]) for a, m in enumerate(self.motors) if m != self.drop_motor}
            data.update({"sclr1_ch3": s.scaler, "sclr1_ch4": s.scaler, "elapsed_time": 1e-2 * i,
                         "alive": 1.0, "dead": 0.0})
            for det in self.detectors:
                data[f"{det.name}_image"] = det.point_datum()
            ts = t0 + 1e-2 * i
            self._events.append({"time": ts, "data": data, "timestamps": {k: ts for k in data}})
        return _done()

    def describe_collect(self) -> dict:
        desc = {m: {"source": "HW:ppmac_gather", "shape": [], "dtype": "number"}
                for m in self.motors if m != self.drop_motor}
        for k in ("elapsed_time", "alive", "dead", "sclr1_ch3", "sclr1_ch4"):
            desc[k] = {"source": "HW:ppmac_gather", "shape": [], "dtype": "number"}
        for det in self.detectors:
            desc.update(det.describe())
        return {"primary": desc}

    def collect(self) -> Iterator[dict]:
        yield from self._events

    def collect_asset_docs(self) -> Iterator[tuple[str, dict]]:
        for det in self.detectors:
            yield from det.collect_asset_docs()


# -- the beamline -------------------------------------------------------------------------------------

@dataclass
class SimHXN:
    """The simulated devices, by their beamline names."""

    zpssx: SynAxis
    zpssy: SynAxis
    zpsth: SynAxis
    dcm_th: SynAxis
    sclr1: SimScaler
    eiger1: SimEiger
    eiger2: SimEiger
    merlin1: SimMerlin
    panda_flyer: SimPandaFlyer
    hxn_flyer: SimHxnFlyer
    panda_stream_flyer: SimPandaStreamFlyer | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def baseline(self) -> list:
        return [self.dcm_th, self.zpsth]

    def detector(self, name: str) -> _SimAreaDetector:
        return getattr(self, name)


def make_hxn(save_path: str | os.PathLike, energy_kev: float = 12.0,
             frame_shape: tuple[int, int] = DETECTOR_SHAPE) -> SimHXN:
    """Build the simulated devices; ``dcm_th`` is set for ``energy_kev``, ``zpsth`` at 0."""
    zpssx, zpssy, zpsth = SynAxis(name="zpssx"), SynAxis(name="zpssy"), SynAxis(name="zpsth")
    for axis in (zpssx, zpssy, zpsth):
        axis.delay = 0
    dcm_th = SynAxis(name="dcm_th")
    dcm_th.delay = 0
    dcm_th.set(bragg_angle_deg(energy_kev)).wait(5)
    det_path = Path(save_path)
    return SimHXN(zpssx=zpssx, zpssy=zpssy, zpsth=zpsth, dcm_th=dcm_th, sclr1=SimScaler(name="sclr1"),
                  eiger1=SimEiger(name="eiger1", save_path=det_path, frame_shape=frame_shape),
                  eiger2=SimEiger(name="eiger2", save_path=det_path, frame_shape=frame_shape),
                  merlin1=SimMerlin(name="merlin1", save_path=det_path, frame_shape=frame_shape),
                  panda_flyer=SimPandaFlyer(name="PandaFlyer", save_path=det_path),
                  hxn_flyer=SimHxnFlyer(name="hxn_flyer"),
                  panda_stream_flyer=SimPandaStreamFlyer(name="PandaFlyer", save_path=det_path))


def _grid_shape(n: int) -> tuple[int, int]:
    side = int(np.ceil(np.sqrt(n)))
    return side, int(np.ceil(n / side))


def fly2dpd(hxn: SimHXN, sample: SimSample, *, detector: str = "eiger2", motors: tuple[str, str] = ("zpssx", "zpssy"),
            position_supersample: int = 10, dwell: float = 0.01, md: dict | None = None,
            streams: Any = None, stream_datum_every_s: float | None = None, dwell_s: float = 0.0) -> Iterator:
    """fly2dpd as startup/93-scanplan-panda.py runs it: start metadata in ``md['scan']``, the
    PandA flyer kicked off for N × supersample samples, one collect. ``streams``
    (:class:`.sim_streams.SimStreams`): the motion also goes out on the Eiger and PandA streams.

    ``stream_datum_every_s`` (seconds): the scan followed live from its documents — the flyer is
    :class:`SimPandaStreamFlyer` and the plan is ``declare_stream``, ``kickoff``, then bluesky's
    ``collect_while_completing(flush_period=stream_datum_every_s)``: StreamResources at the first
    collect, StreamDatums for the points flushed about every ``stream_datum_every_s`` while the
    motion runs, no events. ``dwell_s`` > 0: the motion takes that long per point (a demo scan as
    long as a real one)."""
    from bluesky import plan_stubs as bps
    from bluesky import preprocessors as bpp

    det = hxn.detector(detector)
    det.sample, det.fly, det.total_points = sample, True, sample.n_views
    if stream_datum_every_s is not None:
        if stream_datum_every_s <= 0:
            raise ValueError(f"stream_datum_every_s must be > 0 (got {stream_datum_every_s})")
        if streams is not None:
            raise ValueError("give streams (the detector streams) or stream_datum_every_s (the documents), not both")
        if hxn.panda_stream_flyer is None:
            raise ValueError("this simulated HXN has no PandA stream flyer (make it with make_hxn)")
    flyer: Any = hxn.panda_flyer if stream_datum_every_s is None else hxn.panda_stream_flyer
    flyer.detectors, flyer.motors, flyer.sample = [det], motors, sample
    flyer.position_supersample = position_supersample
    flyer.streams = streams
    pts = sample.recorded_points()
    num1, num2 = _grid_shape(sample.n_views)
    scan_input = [float(pts[0].min()), float(pts[0].max()), num1, float(pts[1].min()), float(pts[1].max()), num2]
    run_md = {"plan_name": "fly2dpd", "motors": list(motors), "motor1": motors[0], "motor2": motors[1],
              "shape": [num1, num2], "fly_type": "grid",
              "scan": {"type": "2D_FLY_PANDA", "scan_input": scan_input, "sample_name": "",
                       "detectors": [detector, "panda1", "sclr1"],
                       "detector_distance": float(sample.scan.z_m), "dwell": dwell,
                       "fast_axis": {"motor_name": motors[0], "units": "um"},
                       "slow_axis": {"motor_name": motors[1], "units": "um"}, "shape": [num1, num2]}}
    run_md.update(md or {})

    if stream_datum_every_s is not None:
        flyer.dwell_s = float(dwell_s)

    @bpp.stage_decorator([det])
    @bpp.run_decorator(md=run_md)
    def live() -> Iterator:
        yield from bps.declare_stream(flyer, name="primary", collect=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"About to call kickoff\(\) with args", category=UserWarning)
            yield from bps.kickoff(flyer, num=sample.n_views * position_supersample, wait=True)
        yield from bps.collect_while_completing([flyer], [flyer], flush_period=stream_datum_every_s,
                                                stream_name="primary")

    @bpp.stage_decorator([det])
    @bpp.run_decorator(md=run_md)
    def inner() -> Iterator:
        # kickoff(flyer, num=...) as hxn-profile-collection's fly2dpd calls it; bluesky warns once per
        # process that Msg kwargs may be deprecated — not news to a simulated scan's user
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"About to call kickoff\(\) with args", category=UserWarning)
            yield from bps.kickoff(flyer, num=sample.n_views * position_supersample, wait=True)
        yield from bps.trigger(det)
        yield from bps.complete(flyer, wait=True)
        yield from bps.collect(flyer)
    try:
        return (yield from (inner() if stream_datum_every_s is None else live()))
    finally:
        det.fly = False


def flyplan2d(hxn: SimHXN, sample: SimSample, *, detector: str = "merlin1",
              motors: tuple[str, str] = ("zpssx", "zpssy"), md: dict | None = None) -> Iterator:
    """hxnfly FlyPlan2D: top-level detectors/motors, plan_args, one event per point."""
    from bluesky import plan_stubs as bps
    from bluesky import preprocessors as bpp

    det = hxn.detector(detector)
    det.sample = sample
    flyer = hxn.hxn_flyer
    flyer.detectors, flyer.motors, flyer.sample = [det], motors, sample
    pts = sample.recorded_points()
    num1, num2 = _grid_shape(sample.n_views)
    run_md = {"plan_name": "FlyPlan2D", "plan_type": "FlyPlan2D", "detectors": [detector, "sclr1"],
              "motors": list(motors), "fast_axis": motors[0], "shape": [num1, num2],
              "scan_range": [[float(pts[0].min()), float(pts[0].max())], [float(pts[1].min()), float(pts[1].max())]],
              "plan_args": {"motor1": motors[0], "scan_start1": float(pts[0].min()), "scan_end1": float(pts[0].max()),
                            "num1": num1, "motor2": motors[1], "scan_start2": float(pts[1].min()),
                            "scan_end2": float(pts[1].max()), "num2": num2, "exposure_time": 0.01,
                            "dead_time": 0.005, "fly_type": "soft", "return_speed": 40.0, "max_points": 16384}}
    run_md.update(md or {})

    @bpp.stage_decorator([det])
    @bpp.run_decorator(md=run_md)
    def inner() -> Iterator:
        yield from bps.kickoff(flyer, wait=True)
        yield from bps.complete(flyer, wait=True)
        yield from bps.collect(flyer)
    return (yield from inner())


def step_scan(hxn: SimHXN, sample: SimSample, *, detector: str = "eiger1",
              motors: tuple[str, str] = ("zpssx", "zpssy"), read_y: bool = True, md: dict | None = None,
              motor_order: str = "yx", dwell_s: float = 0.0) -> Iterator:
    """A bluesky spiral step scan (as ``spiral_fermat``, run through ``list_scan`` over the simulated
    positions): top-level detectors, ``plan_args`` ``x_motor``/``y_motor`` (reprs) and
    ``hints['dimensions']`` x first as bluesky writes them, ``start['motors']`` in ``motor_order``
    ('xy' or 'yx': bluesky fills it from a set); one event per point with the detector datum, the
    motor readbacks (µm) and the scaler. Each frame is in the detector's file (SWMR, flushed after
    every point: readable mid-scan) before its event; ``dwell_s`` > 0 waits that long at each point,
    so a demo scan takes as long as a real one."""
    from bluesky import plan_stubs as bps
    from bluesky import plans as bp
    from bluesky import preprocessors as bpp

    det = hxn.detector(detector)
    det.sample, det.fly, det._point = sample, False, 0
    mx, my = getattr(hxn, motors[0]), getattr(hxn, motors[1])
    pts = sample.recorded_points()
    dets = [det, hxn.sclr1]
    ordered = list(motors) if motor_order == "xy" else [motors[1], motors[0]]
    plan_md = {"plan_name": "spiral_fermat", "motors": ordered,
               "plan_args": {"detectors": [repr(d) for d in dets], "x_motor": repr(mx), "y_motor": repr(my),
                             "x_range": float(np.ptp(pts[0])), "y_range": float(np.ptp(pts[1]))},
               "hints": {"dimensions": [[[motors[0]], "primary"], [[motors[1]], "primary"]]}, **(md or {})}
    per_step = None
    if dwell_s > 0:
        def per_step(detectors: Any, step: Any, pos_cache: Any) -> Iterator:
            yield from bps.one_nd_step(detectors, step, pos_cache)
            yield from bps.sleep(dwell_s)
    if read_y:
        return (yield from bp.list_scan(dets, mx, list(pts[0]), my, list(pts[1]), per_step=per_step, md=plan_md))

    @bpp.stage_decorator(dets)                 # a broken scan: y never recorded
    @bpp.run_decorator(md={"detectors": [d.name for d in dets], **plan_md})
    def inner() -> Iterator:
        for x, y in zip(*pts):
            yield from bps.mv(mx, x, my, y)
            yield from bps.trigger_and_read([*dets, mx])
    return (yield from inner())


SCAN_TYPES = {"fly2dpd": ("eiger2", fly2dpd), "step": ("eiger1", step_scan), "FlyPlan2D": ("merlin1", flyplan2d)}


def simulated_scan(scan_type: str, n_positions: int = 64, seed: int = 1, probe_modes: int = 1,
                   **kw: Any) -> tuple[SimSample, Any]:
    """(sample, truth) of a simulated scan for ``scan_type`` ('fly2dpd', 'step', 'FlyPlan2D')."""
    from hxn_ptycho.simulate import simulate_scan

    if scan_type not in SCAN_TYPES:
        raise ValueError(f"unknown scan type {scan_type!r} (known: {', '.join(SCAN_TYPES)})")
    detector, _plan = SCAN_TYPES[scan_type]
    pattern = "spiral" if scan_type == "step" else "raster"
    scan, truth = simulate_scan(n=64, n_positions=n_positions, seed=seed, pattern=pattern, photons=1e6,
                                probe_modes=probe_modes)
    return hxn_sample(scan, detector, **kw), truth


def plan_for(scan_type: str, hxn: SimHXN, sample: SimSample, md: dict | None = None) -> Iterator:
    detector, plan = SCAN_TYPES[scan_type]
    return plan(hxn, sample, detector=sample.detector or detector, md=md)
