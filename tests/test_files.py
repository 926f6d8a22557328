"""Scan and result files: round trips, validation that names the bad field, atomic writes."""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from hxn_ptycho.h5util import FileFormatError
from hxn_ptycho.resultfile import ResultData, read_result, write_result
from hxn_ptycho.scanfile import ScanData, positions_px, read_scan, scan_info, write_scan


def small_scan(n_views: int = 5, n: int = 8) -> ScanData:
    rng = np.random.default_rng(0)
    return ScanData(diffamp=rng.uniform(0, 3, (n_views, n, n)).astype(np.float32),
                    points=rng.uniform(0, 1, (2, n_views)), lambda_nm=0.1, z_m=0.5, ccd_pixel_um=55.0,
                    mask=np.ones((n, n), bool), probe_guess=np.ones((n, n), np.complex64),
                    attrs={"scan_id": 42, "raw_uid": "abc"})


def test_scan_round_trip_and_slices(tmp_path):
    scan = small_scan()
    path = tmp_path / "scan_42.h5"
    write_scan(path, scan)
    back = read_scan(path)
    np.testing.assert_array_equal(back.diffamp, scan.diffamp)
    np.testing.assert_array_equal(back.points, scan.points)
    assert back.attrs["scan_id"] == 42 and back.attrs["raw_uid"] == "abc"
    part = read_scan(path, views=slice(1, 3))
    assert part.diffamp.shape[0] == 2 and part.points.shape == (2, 5)
    np.testing.assert_array_equal(part.diffamp, scan.diffamp[1:3])
    assert back.pixel_size_m == pytest.approx(0.1e-9 * 0.5 / (8 * 55e-6))
    assert scan_info(path)["n_views"] == 5


def _write_raw(path, **fields):
    with h5py.File(path, "w") as f:
        for k, v in fields.items():
            f[k] = v


GOOD = dict(diffamp=np.ones((3, 4, 4), np.float32), points=np.zeros((2, 3)), lambda_nm=0.1, z_m=0.5, ccd_pixel_um=55.0)


@pytest.mark.parametrize("change, words", [
    ({"diffamp": None}, "missing field 'diffamp'"),
    ({"points": None}, "missing field 'points'"),
    ({"lambda_nm": None}, "missing field 'lambda_nm'"),
    ({"diffamp": np.ones((3, 4, 5), np.float32)}, "'diffamp' has shape"),
    ({"points": np.zeros((3, 3))}, "'points' has shape"),
    ({"points": np.zeros((2, 4))}, "3 frames but 'points' has 4"),
    ({"diffamp": np.full((3, 4, 4), np.nan, np.float32)}, "NaN"),
    ({"diffamp": -np.ones((3, 4, 4), np.float32)}, "negative"),
    ({"z_m": -1.0}, "'z_m'"),
    ({"diffamp": np.ones((0, 4, 4), np.float32), "points": np.zeros((2, 0))}, "no views"),
    ({"mask": np.zeros((4, 4), bool)}, "masks every pixel"),
    ({"mask": np.ones((3, 3), bool)}, "'mask' has shape"),
])
def test_bad_scan_files_name_the_problem(tmp_path, change, words):
    fields = dict(GOOD)
    for k, v in change.items():
        if v is None:
            fields.pop(k)
        else:
            fields[k] = v
    path = tmp_path / "bad.h5"
    _write_raw(path, **fields)
    with pytest.raises(FileFormatError, match=words.replace("(", r"\(")):
        read_scan(path)


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(FileFormatError, match="not found"):
        read_scan(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(FileFormatError, match="not a readable HDF5"):
        read_scan(tmp_path / "text.h5")


def test_failed_write_leaves_nothing_behind(tmp_path):
    bad = small_scan()
    bad.diffamp[0, 0, 0] = np.nan
    with pytest.raises(FileFormatError):
        write_scan(tmp_path / "scan.h5", bad)
    assert os.listdir(tmp_path) == []


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "scan.h5"
    write_scan(path, small_scan())
    scan = small_scan()
    scan.attrs = {"bad": object()}          # h5py cannot store this: fails mid-write
    with pytest.raises(Exception):
        write_scan(path, scan)
    assert sorted(os.listdir(tmp_path)) == ["scan.h5"]
    assert read_scan(path).attrs["scan_id"] == 42


def test_positions_follow_hxn_axes():
    points = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])      # x then y, µm
    pos, shape = positions_px(points, 0.5e-6, 8, margin=3)
    np.testing.assert_array_equal(pos, [[3, 3], [3, 5], [7, 3]])  # (row = y, col = x)
    assert shape == (7 + 8 + 3, 5 + 8 + 3)


def small_result() -> ResultData:
    rng = np.random.default_rng(1)
    return ResultData(object=(rng.standard_normal((1, 20, 20)) + 0j).astype(np.complex64),
                      probe=np.ones((2, 8, 8), np.complex64), positions_px=np.array([[0.0, 0.0], [12.0, 12.0]]),
                      error_data=np.linspace(1, 0.1, 4), error_probe=np.zeros((4, 2)), error_object=np.zeros((4, 1)),
                      probe_power_fraction=np.array([0.9, 0.1]), params={"iterations": 4},
                      attrs={"elapsed_s": 1.5, "probe_modes_log": ["a", "b"]})


def test_result_round_trip(tmp_path):
    res = small_result()
    write_result(tmp_path / "r.h5", res)
    back = read_result(tmp_path / "r.h5")
    np.testing.assert_array_equal(back.object, res.object)
    np.testing.assert_array_equal(back.error_probe, res.error_probe)
    assert back.params == {"iterations": 4} and back.attrs["elapsed_s"] == 1.5
    assert "version" in back.attrs and back.iterations == 4


def test_a_result_attribute_without_a_value_is_written(tmp_path):
    # the position search records None where its defocus choice kept the current probe; HDF5 has
    # no None, and writing it failed the whole job after the last iteration
    res = small_result()
    res.attrs.update(position_probe_defocus=None, position_scale=[1.0, 0.0, 0.0, 1.0])
    write_result(tmp_path / "r.h5", res)
    back = read_result(tmp_path / "r.h5")
    assert json.loads(back.attrs["position_probe_defocus"]) is None
    assert json.loads(back.attrs["position_scale"]) == [1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("field, value, words", [
    ("positions_px", np.array([[0.0, 0.0], [15.0, 15.0]]), "outside the object"),
    ("error_probe", np.zeros((4, 3)), "'error/probe' has shape"),
    ("probe_power_fraction", np.ones(3), "'probe_power_fraction' has shape"),
    ("object", np.ones((1, 20, 20)), "must be complex"),
])
def test_bad_results_are_refused(tmp_path, field, value, words):
    res = small_result()
    setattr(res, field, value)
    with pytest.raises(FileFormatError, match=words):
        write_result(tmp_path / "r.h5", res)
    assert not os.listdir(tmp_path)


def test_result_with_a_missing_field_names_it(tmp_path):
    write_result(tmp_path / "r.h5", small_result())
    with h5py.File(tmp_path / "r.h5", "a") as f:
        del f["error/object"]
    with pytest.raises(FileFormatError, match="missing field 'error/object'"):
        read_result(tmp_path / "r.h5")


def test_h5_differences_is_strict_both_ways(tmp_path):
    """A dataset or attribute in either file only, or different, is named: root attributes by name,
    an object's as path@name."""
    import h5py

    from hxn_ptycho.h5util import h5_differences
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for p in (a, b):
        with h5py.File(p, "w") as f:
            f["x"] = np.arange(3)
            f["g/y"] = np.ones(2)
            f.attrs["k"] = 1
            f["x"].attrs["u"] = "m"
    assert h5_differences(a, b) == ([], [])
    with h5py.File(b, "r+") as f:
        f["g/y"][1] = 2.0                 # a value
        f["only_b"] = np.zeros(1)         # a dataset the first file lacks
        f.attrs["extra"] = 2              # a root attribute the first file lacks
        f["x"].attrs["u"] = "n"           # an object's attribute
    assert h5_differences(a, b) == (["g/y", "only_b"], ["extra", "x@u"])
    assert h5_differences(b, a) == (["g/y", "only_b"], ["extra", "x@u"])


def test_a_whole_file_is_read_while_a_forked_process_holds_the_writers_lock(tmp_path):
    """CI once lost a scan this way: a job's ``mpiexec`` forked while the scan file was being written
    inherited the writer's exclusive HDF5 lock, and the reader got "unable to lock file, errno = 11"
    for a file already whole and renamed into place. Our readers take no lock (h5util.read_h5)."""
    import subprocess
    from hxn_ptycho.h5util import open_h5
    path = tmp_path / "whole.h5"
    f = h5py.File(path, "w")                      # takes the exclusive lock
    f["x"] = np.arange(3)
    f.flush()
    child = subprocess.Popen(["sleep", "30"], close_fds=False)   # inherits the locked descriptor
    try:
        f.close()                                 # the writer is done; the child still holds the lock
        with pytest.raises(OSError, match="lock"):
            h5py.File(path, "r")                  # what the readers did before: the lock is still held
        with open_h5(path, "scan") as g:
            assert list(g["x"][()]) == [0, 1, 2]
    finally:
        child.kill()
        child.wait()
