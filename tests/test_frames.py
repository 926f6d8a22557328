"""The one frame source: documents → (file, dataset, frame range) chunks → arrays, for every HXN spec."""
from __future__ import annotations

import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from hxn_ptycho.callbacks import frames as fr
from hxn_ptycho.callbacks.collector import CollectedRun


def _run_with(resources, datums, column, key="det_image", shape=(4, 4)) -> CollectedRun:
    run = CollectedRun(start={"uid": "u"})
    run.descriptors["d"] = {"uid": "d", "name": "primary",
                            "data_keys": {key: {"dtype": "array", "shape": list(shape), "external": "FILESTORE:"}}}
    run.resources = {r["uid"]: r for r in resources}
    run.datums = {d["datum_id"]: d for d in datums}
    run.columns["primary"] = {key: column}
    return run


def _stack(n, shape=(4, 4), offset=0):
    return (np.arange(n * shape[0] * shape[1], dtype=np.uint32).reshape(n, *shape) + offset)


@pytest.mark.parametrize("spec,dataset", [("TPX_HDF5", "/entry/instrument/detector/data"),
                                          ("AD_HDF5", "/entry/data/data")])
def test_per_point_specs_with_frame_per_point(tmp_path, spec, dataset):
    data = _stack(6)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f[dataset] = data
    res = {"uid": "r", "spec": spec, "root": str(tmp_path), "resource_path": "f.h5",
           "resource_kwargs": {"frame_per_point": 2}}
    datums = [{"datum_id": f"r/{i}", "resource": "r", "datum_kwargs": {"point_number": i}} for i in range(3)]
    run = _run_with([res], datums, [d["datum_id"] for d in datums])
    src = fr.describe(run, "det_image")
    assert src.describe() == [(str(tmp_path / "f.h5"), dataset, 0, 6)]
    np.testing.assert_array_equal(fr.read(src), data)         # 3 datums × 2 frames = 6 frames


def test_fly_stream_one_datum_is_all_frames(tmp_path):
    """fly2dpd: MERLIN_FLY_STREAM_V2, frame_per_point = N, one datum with point_number 0."""
    data = _stack(9)
    with h5py.File(tmp_path / "e.h5", "w") as f:
        f["entry/instrument/detector/data"] = data
    res = {"uid": "r", "spec": "MERLIN_FLY_STREAM_V2", "root": str(tmp_path), "resource_path": "e.h5",
           "resource_kwargs": {"frame_per_point": 9}}
    run = _run_with([res], [{"datum_id": "r/0", "resource": "r", "datum_kwargs": {"point_number": 0}}], ["r/0"])
    np.testing.assert_array_equal(fr.read(fr.describe(run, "det_image")), data)


def test_bulk_panda_and_sis(tmp_path):
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f["entry/instrument/detector/data"] = _stack(5)
    with h5py.File(tmp_path / "p.h5", "w") as f:
        f["INENC2.VAL.Value"] = np.arange(50, dtype=np.int32)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["sclr1_ch4"] = np.full(5, 7.0, np.float32)
    bulk = _run_with([{"uid": "b", "spec": "MERLIN_HDF5_BULK", "root": str(tmp_path), "resource_path": "m.h5",
                       "resource_kwargs": {}}], [{"datum_id": "b/0", "resource": "b", "datum_kwargs": {}}], ["b/0"])
    assert fr.read(fr.describe(bulk, "det_image")).shape == (5, 4, 4)
    run = CollectedRun(start={"uid": "u"})
    run.descriptors["d"] = {"uid": "d", "name": "primary", "data_keys": {
        "inenc2_val": {"dtype": "array", "shape": [50], "external": "FILESTORE:"},
        "sclr1_ch4": {"dtype": "array", "shape": [5], "external": "FILESTORE:"}}}
    run.resources = {"p": {"uid": "p", "spec": "PANDA", "root": str(tmp_path), "resource_path": "p.h5",
                           "resource_kwargs": {}},
                     "s": {"uid": "s", "spec": "SIS_HDF51_FLY_STREAM_V1", "root": "/",
                           "resource_path": str(tmp_path / "s.h5").lstrip("/"),
                           "resource_kwargs": {"frame_per_point": 50}}}
    run.datums = {"p/1": {"datum_id": "p/1", "resource": "p", "datum_kwargs": {"field": "INENC2.VAL.Value"}},
                  "s/1": {"datum_id": "s/1", "resource": "s", "datum_kwargs": {"column": "sclr1_ch4", "point_number": 0}}}
    run.columns["primary"] = {"inenc2_val": ["p/1"], "sclr1_ch4": ["s/1"]}
    np.testing.assert_array_equal(fr.column(run, "inenc2_val"), np.arange(50))
    np.testing.assert_array_equal(fr.column(run, "sclr1_ch4"), np.full(5, 7.0))   # SIS: one value a point


def test_stream_resource(tmp_path):
    data = _stack(7)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["x/y"] = data
    run = CollectedRun(start={"uid": "u"})
    run.descriptors["d"] = {"uid": "d", "name": "primary",
                            "data_keys": {"k": {"dtype": "array", "shape": [4, 4], "external": "STREAM:"}}}
    run.stream_resources = {"sr": {"uid": "sr", "data_key": "k", "uri": (tmp_path / "s.h5").as_uri(),
                                   "mimetype": "application/x-hdf5", "parameters": {"dataset": "/x/y"}}}
    run.stream_datums = [{"stream_resource": "sr", "indices": {"start": 3, "stop": 7}, "seq_nums": {"start": 4}},
                         {"stream_resource": "sr", "indices": {"start": 0, "stop": 3}, "seq_nums": {"start": 1}}]
    src = fr.describe(run, "k")
    assert src.describe() == [(str(tmp_path / "s.h5"), "/x/y", 0, 7)]
    np.testing.assert_array_equal(fr.read(src, region=(slice(1, 3), slice(0, 2))), data[:, 1:3, 0:2])


def test_unknown_spec_is_named(tmp_path):
    run = _run_with([{"uid": "r", "spec": "NPY_SEQ", "root": "/", "resource_path": "x"}],
                    [{"datum_id": "r/0", "resource": "r", "datum_kwargs": {}}], ["r/0"])
    with pytest.raises(fr.SourceError, match="resource spec 'NPY_SEQ', which is not supported"):
        fr.describe(run, "det_image")


def test_path_remap(tmp_path):
    new = tmp_path / "legacy" / "2025" / "a.h5"
    new.parent.mkdir(parents=True)
    new.write_bytes(b"")
    remap = ((str(tmp_path / "data"), str(tmp_path / "legacy")),)
    assert fr.remap_path(str(tmp_path / "data" / "2025" / "a.h5"), remap) == str(new)
    assert fr.remap_path("/elsewhere/a.h5", remap) == "/elsewhere/a.h5"
    assert fr.DEFAULT_REMAP == (("/data", "/nsls2/data/hxn/legacy"),)


def test_missing_file_waits_then_names_it(tmp_path):
    src = fr.Source("k", [fr.Chunk(str(tmp_path / "never.h5"), "/d", 0, 1)])
    t0 = time.monotonic()
    with pytest.raises(fr.NotReady, match=f"detector file {tmp_path / 'never.h5'} does not exist"):
        fr.read(src, wait_s=0.6)
    assert time.monotonic() - t0 >= 0.6


WRITER = """
import sys, time, h5py, numpy as np
path, go = sys.argv[1], sys.argv[2]
f = h5py.File(path, "w", libver="latest")
d = f.create_dataset("entry/instrument/detector/data", shape=(0, 4, 4), maxshape=(None, 4, 4), dtype="u4",
                     chunks=(1, 4, 4))
f.swmr_mode = True
for i in range(6):
    d.resize(i + 1, axis=0); d[i] = i; d.flush()
    if i == 2:
        open(go, "w").close()          # three frames are there; the file stays open for writing
        time.sleep(1.0)
time.sleep(1.0)
f.close()
"""


def test_reader_waits_for_frames_of_a_file_still_being_written(tmp_path):
    """The writer holds the file open in SWMR mode; the reader (no locking) waits for frames 3-5."""
    path, go = tmp_path / "swmr.h5", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(go)])
    try:
        deadline = time.monotonic() + 30
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        src = fr.Source("k", [fr.Chunk(str(path), "/entry/instrument/detector/data", 0, 6, "TPX_HDF5")])
        out = fr.read(src, wait_s=20)
        assert proc.poll() is None or out.shape[0] == 6
        np.testing.assert_array_equal(out[:, 0, 0], np.arange(6))
    finally:
        proc.wait(30)
