"""The simulated beamline's step scan as a live source: every frame is in the detector file (and
readable) when its event is emitted; a dwell time per point."""
from __future__ import annotations

import warnings

import h5py
from hxn_sim import make_re

from hxn_ptycho.callbacks.sim_beamline import make_hxn, simulated_scan, step_scan


def test_step_scan_frames_are_readable_at_their_event_and_each_point_dwells(tmp_path):
    sample, _ = simulated_scan("step", n_positions=6, seed=3)
    hxn = make_hxn(tmp_path / "detector")
    RE = make_re(hxn)
    sleeps: list[float] = []
    RE.msg_hook = lambda msg: sleeps.append(msg.args[0]) if msg.command == "sleep" else None
    files: dict[str, str] = {}
    readable: list[tuple[int, int]] = []

    def on_doc(name, doc):
        if name == "resource":
            files[doc["uid"]] = doc["resource_path"] if "resource_path" in doc else doc.get("uri", "")
        if name == "event" and "eiger1_image" in doc["data"] and files:
            path = next(iter(files.values()))
            path = path if path.startswith("/") else str(tmp_path / "detector" / path)
            with h5py.File(path, "r") as f:              # a reader during the scan
                readable.append((doc["seq_num"], f["entry/instrument/detector/data"].shape[0]))
    RE.subscribe(on_doc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        RE(step_scan(hxn, sample, dwell_s=0.01))
    assert sleeps == [0.01] * 6
    assert readable == [(i, i) for i in range(1, 7)], readable
