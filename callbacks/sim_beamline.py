"""A simulated HXN built from ophyd's simulated devices, and two ptychography plans.

- ``zpssx``/``zpssy``: scanning stages (µm, ``SynAxis``); ``zpssx_enc``/``zpssy_enc``: encoders
- ``merlin1``: a Merlin-like detector whose frames (from a callable of the stage positions) are
  appended to an area-detector-style HDF5 file (``/entry/data/data``) announced by
  ``resource`` (spec ``AD_HDF5``) and one ``datum`` per point
- ``dcm_th`` (degrees, Si(111)) and ``sclr1`` (``sclr1_ch4``) — ``dcm_th`` goes in the baseline

``step_scan`` moves the stages point by point (``list_scan``); ``fly_scan`` keeps the stages in
continuous motion and records the encoders with every frame, as a fly scan does.
"""
from __future__ import annotations

import itertools
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.sim import SynAxis
from ophyd.status import StatusBase

from .export import bragg_angle_deg

FrameFunc = Callable[[float, float], np.ndarray]


class SimMerlin(Device):
    """Merlin-like detector: frames from ``frame_func(x_um, y_um)`` into AD-style HDF5 files."""

    image = Cpt(Signal, kind="normal", value="")

    def __init__(self, *args: Any, frame_func: FrameFunc | None = None, save_path: str | os.PathLike = ".",
                 stages: tuple[Any, Any] | None = None, frame_shape: tuple[int, int] = (128, 128),
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frame_func = frame_func
        self.save_path = str(save_path)
        self.stages = stages
        self.frame_shape = tuple(frame_shape)
        self.drop_points: set[int] = set()        # points whose frames are "lost" (for failure tests)
        self._asset_docs: list[tuple[str, dict]] = []
        self._file: str | None = None
        self._resource_uid: str | None = None
        self._counter: Iterator[int] | None = None

    def stage(self) -> list:
        Path(self.save_path).mkdir(parents=True, exist_ok=True)
        name = f"{self.name}_{uuid.uuid4().hex[:12]}.h5"
        self._file = os.path.join(self.save_path, name)
        self._resource_uid = str(uuid.uuid4())
        self._counter = itertools.count()
        self._asset_docs.append(("resource", {
            "uid": self._resource_uid, "spec": "AD_HDF5", "root": self.save_path, "resource_path": name,
            "resource_kwargs": {"frame_per_point": 1}, "path_semantics": "posix"}))
        return super().stage()

    def unstage(self) -> list:
        self._file = self._resource_uid = self._counter = None
        return super().unstage()

    def _position(self) -> tuple[float, float]:
        if self.stages is None:
            return 0.0, 0.0
        return float(self.stages[0].position), float(self.stages[1].position)

    def _append_frame(self, frame: np.ndarray) -> None:
        import h5py
        with h5py.File(self._file, "a") as f:       # opened per frame: readers never meet an open writer
            if "entry/data/data" not in f:
                f.create_dataset("entry/data/data", shape=(0, *frame.shape), maxshape=(None, *frame.shape),
                                 dtype=np.uint32, chunks=(1, *frame.shape))
            d = f["entry/data/data"]
            d.resize(d.shape[0] + 1, axis=0)
            d[-1] = frame

    def trigger(self) -> StatusBase:
        if self._counter is None:
            raise RuntimeError(f"{self.name} must be staged before it is triggered")
        point = next(self._counter)
        if point not in self.drop_points:
            x, y = self._position()
            frame = self.frame_func(x, y) if self.frame_func else np.zeros(self.frame_shape)
            self._append_frame(np.asarray(np.clip(np.rint(frame), 0, 2**32 - 1), dtype=np.uint32))
        datum_id = f"{self._resource_uid}/{point}"
        self._asset_docs.append(("datum", {"resource": self._resource_uid, "datum_id": datum_id,
                                           "datum_kwargs": {"point_number": point}}))
        self.image.put(datum_id)
        status = StatusBase()
        status.set_finished()
        return status

    def describe(self) -> dict:
        desc = super().describe()
        key = f"{self.name}_image"
        desc[key].update({"shape": list(self.frame_shape), "dtype": "array", "dtype_numpy": "<u4",
                          "external": "FILESTORE:"})
        return desc

    def collect_asset_docs(self) -> Iterator[tuple[str, dict]]:
        docs, self._asset_docs = self._asset_docs, []
        yield from docs


class SimScaler(Device):
    ch4 = Cpt(Signal, kind="hinted", value=100000.0)


class Encoder(Signal):
    """An encoder reading the stage position (with a little noise), as a fly scan records it."""

    def __init__(self, *args: Any, axis: SynAxis, noise_um: float = 0.0, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._axis, self._noise = axis, noise_um
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    def get(self, **kwargs: Any) -> float:
        with self._lock:
            jitter = self._rng.normal(0, self._noise) if self._noise else 0.0
        return float(self._axis.position) + jitter


@dataclass
class SimHXN:
    """The simulated devices, by their beamline names."""

    zpssx: SynAxis
    zpssy: SynAxis
    zpssx_enc: Encoder
    zpssy_enc: Encoder
    merlin1: SimMerlin
    dcm_th: SynAxis
    sclr1: SimScaler

    @property
    def baseline(self) -> list:
        return [self.dcm_th]


class SimFrames:
    """Detector frames of a simulated scan (``hxn_ptycho.simulate``): the frame nearest (x, y).

    The scan's (n, n) intensities (zero frequency at [0, 0]) are shifted to the beam centre
    ``center`` of a ``shape`` detector; ``hot`` pixels read a constant large value.
    """

    def __init__(self, scan: Any, shape: tuple[int, int] = (96, 96), center: tuple[int, int] | None = None,
                 hot: tuple[tuple[int, int], ...] = ((5, 7),)) -> None:
        self.scan = scan
        self.points = np.asarray(scan.points)
        n = scan.n
        self.shape = tuple(shape)
        self.center = tuple(center) if center is not None else (shape[0] // 2 + 3, shape[1] // 2 - 2)
        self.r0, self.c0 = self.center[0] - n // 2, self.center[1] - n // 2
        self.hot = hot
        self.intensity = np.fft.fftshift(np.asarray(scan.diffamp, dtype=np.float64) ** 2, axes=(-2, -1))

    def __call__(self, x: float, y: float) -> np.ndarray:
        d = (self.points[0] - x) ** 2 + (self.points[1] - y) ** 2
        i = int(np.argmin(d))
        n = self.intensity.shape[-1]
        frame = np.zeros(self.shape)
        frame[self.r0:self.r0 + n, self.c0:self.c0 + n] = self.intensity[i]
        for r, c in self.hot:
            frame[r, c] = 5e6
        return frame


def make_hxn(frame_func: FrameFunc | None, save_path: str | os.PathLike, energy_kev: float = 12.0,
             frame_shape: tuple[int, int] = (96, 96), detector: str = "merlin1") -> SimHXN:
    """Build the simulated devices; ``dcm_th`` is set for ``energy_kev``."""
    zpssx, zpssy = SynAxis(name="zpssx"), SynAxis(name="zpssy")
    for axis in (zpssx, zpssy):
        axis.delay = 0
    merlin = SimMerlin(name=detector, frame_func=frame_func, save_path=save_path, stages=(zpssx, zpssy),
                       frame_shape=frame_shape)
    dcm_th = SynAxis(name="dcm_th")
    dcm_th.set(bragg_angle_deg(energy_kev)).wait(5)
    return SimHXN(zpssx=zpssx, zpssy=zpssy,
                  zpssx_enc=Encoder(name="zpssx_enc", axis=zpssx, noise_um=0.0),
                  zpssy_enc=Encoder(name="zpssy_enc", axis=zpssy, noise_um=0.0),
                  merlin1=merlin, dcm_th=dcm_th, sclr1=SimScaler(name="sclr1"))


def ptycho_md(detector: SimMerlin, distance_m: float, **extra: Any) -> dict:
    """Start-document metadata a ptychography scan carries."""
    return {"detector_distance_m": float(distance_m), "ptycho_detector": detector.name, **extra}


def step_scan(hxn: SimHXN, points_um: np.ndarray, *, distance_m: float, read_y: bool = True,
              md: dict | None = None) -> Iterator:
    """Step scan through ``points_um`` (2, N): move both stages, expose, read the scaler."""
    from bluesky import plans as bp

    detectors = [hxn.merlin1, hxn.sclr1]
    if not read_y:                          # a broken scan: y positions never recorded
        from bluesky import plan_stubs as bps
        from bluesky import preprocessors as bpp

        @bpp.stage_decorator(detectors)
        @bpp.run_decorator(md={"detectors": [d.name for d in detectors], "plan_name": "step_scan",
                               **ptycho_md(hxn.merlin1, distance_m), **(md or {})})
        def inner() -> Iterator:
            for x, y in zip(*points_um):
                yield from bps.mv(hxn.zpssx, x, hxn.zpssy, y)
                yield from bps.trigger_and_read([*detectors, hxn.zpssx])
        return (yield from inner())
    return (yield from bp.list_scan(detectors, hxn.zpssx, list(points_um[0]), hxn.zpssy, list(points_um[1]),
                                    md={**ptycho_md(hxn.merlin1, distance_m), **(md or {})}))


def fly_scan(hxn: SimHXN, points_um: np.ndarray, *, distance_m: float, md: dict | None = None) -> Iterator:
    """Fly-scan-like: the stages move continuously; each frame is recorded with the encoders."""
    from bluesky import plan_stubs as bps
    from bluesky import preprocessors as bpp

    detectors = [hxn.merlin1, hxn.sclr1]
    run_md = {"detectors": [d.name for d in detectors], "plan_name": "fly_scan", "num_points": points_um.shape[1],
              "ptycho_position_fields": ["zpssx_enc", "zpssy_enc"], **ptycho_md(hxn.merlin1, distance_m),
              **(md or {})}

    @bpp.stage_decorator(detectors)
    @bpp.run_decorator(md=run_md)
    def inner() -> Iterator:
        for x, y in zip(*points_um):
            hxn.zpssx.set(x)                  # the "continuous" motion: no wait between frames
            hxn.zpssy.set(y)
            yield from bps.trigger_and_read([*detectors, hxn.zpssx_enc, hxn.zpssy_enc])
    return (yield from inner())
