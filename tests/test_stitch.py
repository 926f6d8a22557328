"""Async mode's pieces without MPI: the split into regions, the index-list reader, the phase-ramp
fit, and the stitcher recovering a known object from misaligned overlapping regions."""
from __future__ import annotations

import numpy as np
import pytest

from hxn_ptycho import stitch
from hxn_ptycho.params import ParamError
from hxn_ptycho.registration import fourier_shift
from hxn_ptycho.resultfile import ResultData
from hxn_ptycho.scanfile import read_scan, read_scan_views
from hxn_ptycho.simulate import simulate_scan, write_simulation


@pytest.fixture(scope="module")
def sim_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("stitch") / "scan_3.h5"
    write_simulation(path, *simulate_scan(n=16, n_positions=40, seed=3, overlap_step=4.0))
    return path


def test_grid_shape_is_near_square():
    assert stitch.grid_shape(2, (100.0, 100.0)) in ((1, 2), (2, 1))
    assert stitch.grid_shape(4, (100.0, 100.0)) == (2, 2)
    assert stitch.grid_shape(2, (300.0, 100.0)) == (2, 1)       # tall scan: cut across rows
    assert stitch.grid_shape(3, (10.0, 300.0)) == (1, 3)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_split_regions_cover_and_overlap(k):
    rng = np.random.default_rng(0)
    pos = rng.uniform(0, 200, (300, 2))
    regions = stitch.split_regions(pos, k, overlap=20.0)
    assert len(regions) == k
    covered = np.zeros(len(pos), bool)
    for views in regions:
        assert len(views) > 0 and np.all(np.diff(views) > 0)
        covered[views] = True
    assert covered.all()
    if k > 1:
        assert sum(len(v) for v in regions) > len(pos)             # neighbours share views
        assert max(len(v) for v in regions) < len(pos)


def test_split_regions_more_regions_than_views():
    with pytest.raises(ParamError, match=r"more regions/ranks \(5\) than views \(4\)"):
        stitch.split_regions(np.zeros((4, 2)), 5, 1.0)


def test_read_scan_views_reads_only_those_frames(sim_path):
    full = read_scan(sim_path)
    idx = np.array([7, 2, 30, 11])
    part = read_scan_views(sim_path, idx)
    np.testing.assert_array_equal(part.diffamp, full.diffamp[idx])
    np.testing.assert_array_equal(part.points, full.points[:, idx])
    assert part.n_views == 4 and part.lambda_nm == full.lambda_nm
    with pytest.raises(ValueError, match="repeat"):
        read_scan_views(sim_path, [1, 1])
    with pytest.raises(ValueError, match="must lie in"):
        read_scan_views(sim_path, [0, 40])


def test_read_scan_slice_is_a_hyperslab(sim_path):
    part = read_scan(sim_path, views=slice(10, 25))
    assert part.diffamp.shape[0] == 15 and part.views == slice(10, 25) and part.n_views == 40


def test_fit_phase_ramp_recovers_scale_and_ramp():
    rng = np.random.default_rng(1)
    img = rng.uniform(0.5, 1.0, (40, 50)) * np.exp(1j * rng.uniform(-0.5, 0.5, (40, 50)))
    scale, a, b = 1.7 * np.exp(0.9j), 0.03, -0.02
    ref = stitch._ramp(img.shape, scale, a, b) * img
    weight = np.zeros(img.shape)
    weight[5:30, 10:45] = 1.0
    s, fa, fb = stitch.fit_phase_ramp(ref, img, weight)
    assert abs(s - scale) < 1e-9 and abs(fa - a) < 1e-12 and abs(fb - b) < 1e-12


def _region(index: int, obj: np.ndarray, box: tuple[slice, slice], n: int) -> stitch.RegionResult:
    part = obj[box]
    weight = np.ones(part.shape)
    weight[:, :n // 2] = weight[:, -(n // 2):] = 0.5            # fainter at the region's edges
    res = ResultData(object=part[None].copy(), probe=np.ones((1, n, n), complex), positions_px=np.zeros((1, 2)),
                     error_data=np.full(3, float(index + 1)), error_probe=np.zeros((3, 1)),
                     error_object=np.zeros((3, 1)), probe_power_fraction=np.ones(1),
                     attrs={"final_cost": 1.0, "final_data_error": 1.0, "elapsed_s": 1.0})
    return stitch.RegionResult(index=index, views=np.arange(10 + index), offset=(box[0].start, box[1].start),
                               result=res, weight=weight, intensity=1.0)


def test_stitch_removes_scale_phase_ramp_and_shift():
    n, shape = 16, (48, 96)
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:shape[0] + 32, :shape[1] + 32]
    big = (0.6 + 0.4 * np.sin(xx / 3.0) * np.cos(yy / 4.0)) * np.exp(1j * 0.8 * np.sin(xx / 5.0 + yy / 7.0))
    big = big * (1 + 0.05 * rng.standard_normal(big.shape))
    truth = big[16:-16, 16:-16]
    left = _region(0, truth, (slice(0, 48), slice(0, 60)), n)
    right = _region(1, truth, (slice(0, 48), slice(36, 96)), n)
    left.views = np.arange(20)                                      # more views: placed first
    # the right region came back shifted by 0.4 px, with another complex scale and a phase ramp
    moved = fourier_shift(big, (0.0, 0.4))[16:-16, 16 + 36:16 + 96]
    right.result.object = (stitch._ramp(moved.shape, 0.5 * np.exp(2.0j), 0.01, -0.015) * moved)[None]
    res = stitch.stitch_regions([left, right], np.zeros((2, 2)), shape)
    assert right.shift == pytest.approx((0.0, -0.4), abs=0.02)
    err = np.linalg.norm(res.object[0] - truth) / np.linalg.norm(truth)
    assert err < 0.02
    assert res.attrs["stitch_order"] == [0, 1]
    np.testing.assert_allclose(res.error_data, 1.5)                 # intensity-weighted mean of 1 and 2
