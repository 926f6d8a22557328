"""Detector orientation: exact q-space symmetries, documented defaults, and auto-detection
finding the convention a simulated scan was recorded with — for every one of the 8."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hxn_ptycho.callbacks.export import ExportConfig, ExportError, build_scan
from hxn_ptycho.callbacks.orientation import (
    DETECTOR_ORIENTATION,
    FRAME_OPS,
    INVERSE,
    TWIN,
    Orientation,
    mirror_equivalents,
)
from hxn_sim import run_scan


def test_frame_symmetries_are_exact_about_zero_frequency():
    rng = np.random.default_rng(0)
    a = rng.random((3, 8, 8))
    seen = set()
    for name, op in FRAME_OPS.items():
        b = op(a)
        np.testing.assert_array_equal(b[:, 0, 0], a[:, 0, 0])            # zero frequency stays put
        np.testing.assert_array_equal(FRAME_OPS[INVERSE.get(name, name)](b), a)
        np.testing.assert_array_equal(FRAME_OPS["rot180"](op(a)), FRAME_OPS[TWIN[name]](a))
        seen.add(b.tobytes())
    assert len(seen) == 8
    # rot90_cw is ptycho_gui's np.rot90(crop, axes=(1, 0)) up to the centring of an even crop
    c = np.fft.fftshift(a, axes=(-2, -1))
    ours = np.fft.fftshift(FRAME_OPS["rot90_cw"](a), axes=(-2, -1))
    np.testing.assert_array_equal(np.roll(np.rot90(c, axes=(2, 1)), 1, axis=-1), ours)


def test_defaults_and_parsing():
    # the beamline's rot90_cw on an [x, y]-indexed pattern is our flipud (their axis 0 is x)
    assert DETECTOR_ORIENTATION["merlin1"].name == "flipud,x-,y-"        # ptycho_gui
    assert DETECTOR_ORIENTATION["eiger2"].name == "flipud,x+,y-"         # holoptycho's Eiger
    assert DETECTOR_ORIENTATION["merlin1"].in_stage_frame().name == "fliplr,x+,y+"
    assert DETECTOR_ORIENTATION["eiger2"].in_stage_frame().name == "identity,x+,y+"
    assert Orientation.parse("beamline:rot90_cw,x-,y-").name == "flipud,x-,y-"
    assert Orientation.parse("transpose,x-").name == "transpose,x-,y+"
    with pytest.raises(ExportError, match="unknown frame orientation 'sideways'"):
        Orientation.parse("sideways")
    with pytest.raises(ExportError, match="is not x\\+, x-, y\\+ or y-"):
        Orientation.parse("identity,z+")


def xy_forward(obj_xy, probe_xy, corner_xy):
    """A pattern as ptycho_gui/holoptycho model it: object and pattern indexed [x, y], zero frequency
    centred (as their crop before fftshift)."""
    (a, b), n = corner_xy, probe_xy.shape[0]
    return np.fft.fftshift(np.abs(np.fft.fft2(probe_xy * obj_xy[a:a + n, b:b + n])) ** 2)


@pytest.mark.parametrize("det", ["merlin1", "eiger2"])
def test_the_beamline_rotation_is_ported_with_its_axis_swap(det):
    """An [x, y]-indexed forward model, recorded as the beamline's preprocessing inverts it (raw =
    their rot90_ccw of the pattern, as ptycho_gui's ``np.rot90(crop, axes=(1, 0))`` is its rot90_cw):
    the detector default must give our [y, x]-indexed pattern of the same window, i.e. the transpose.
    Dropping the axis swap (rot90_cw as the default) gives a transposed-and-rotated pattern: fails."""
    rng = np.random.default_rng(3)
    n = 16
    obj_xy = np.exp(1j * rng.random((40, 40))) * (0.5 + rng.random((40, 40)))
    probe_xy = np.zeros((n, n), complex)
    probe_xy[4:13, 3:11] = 1.0 + 0.3j * rng.random((9, 8))        # not symmetric
    pattern_xy = xy_forward(obj_xy, probe_xy, (7, 11))
    raw = np.rot90(pattern_xy, axes=(0, 1))                          # the inverse of their rot90_cw
    np.testing.assert_allclose(np.rot90(raw, axes=(1, 0)), pattern_xy)
    ours = np.fft.fftshift(DETECTOR_ORIENTATION[det].apply_frames(np.fft.ifftshift(raw)))
    # our indexing: rows y, columns x -> the transpose of theirs (up to the half-pixel centring of
    # an even crop, which the beam-centre search absorbs: compare after re-centring)
    want = pattern_xy.T
    best = min(float(np.abs(np.roll(ours, (dr, dc), (0, 1)) - want).max())
               for dr in (-1, 0, 1) for dc in (-1, 0, 1))
    assert best < 1e-9 * want.max()


def check_auto(used: Orientation, tmp_path, capsys) -> None:
    """A scan recorded with ``used``: auto must find the twin pair of its stage-frame equivalent (the
    one with signs (+, +): the data cannot tell a mirrored sample apart, the recorded positions are
    used as they are) by a clear margin over the other 3 pairs, and inside the pair the member
    documented for the detector (symmetry and y sign) — which is ``used`` itself whenever ``used``
    is a documented convention; for an undocumented one the data cannot tell it from its twin
    (the conjugate sample: |FFT(conj ψ)|² = rot180 |FFT ψ|²)."""
    from hxn_ptycho.callbacks.orientation import documented_member
    run, sample, _truth, _hxn = run_scan("step", tmp_path, n_positions=49, orientation=used)
    scan = build_scan(run, ExportConfig(crop=64))
    report = json.loads(scan.attrs["orientation_report"])
    with capsys.disabled():
        print(f"\n[hxn-ptycho] orientation auto, recorded {used.name}: chose {scan.attrs['orientation']}, "
              f"margin {report['margin']:.1%} over {report['runner_up']}, {report['cost_s']} s")
    stage = used.in_stage_frame()
    pair = (stage, Orientation(TWIN[stage.frame], 1, 1))
    assert scan.attrs["orientation"] in {o.name for o in pair}
    documented = documented_member(pair, EIGER)
    if documented is not None:
        assert scan.attrs["orientation"] == documented.name
    if any(e.frame == EIGER.frame and e.sign_y == EIGER.sign_y for e in [used, *mirror_equivalents(used)]):
        assert scan.attrs["orientation"] == stage.name         # a documented convention: exactly it
    assert report["margin"] > 1.0 and not report["ambiguous"] and report["decided_by"] == "the data"
    np.testing.assert_allclose(scan.points, sample.recorded_points())          # the stage positions
    geo = json.loads(scan.attrs["geometry_source"])
    assert geo["orientation"].startswith("auto (")


EIGER = DETECTOR_ORIENTATION["eiger1"]
EVERY = [Orientation(f, sx, sy) for f in FRAME_OPS for sx in (1, -1) for sy in (1, -1)]
FAST = [o for o in EVERY if (o.sign_x, o.sign_y) == (EIGER.sign_x, EIGER.sign_y)] + [
    Orientation("flipud", -1, -1), Orientation("identity", 1, 1), Orientation("fliplr", -1, 1)]
REST = [o for o in EVERY if o not in FAST]


@pytest.mark.parametrize("used", FAST, ids=lambda o: o.name)
def test_auto_finds_the_convention_used(used, tmp_path, capsys):
    check_auto(used, tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("used", REST, ids=lambda o: o.name)
def test_auto_finds_every_other_convention(used, tmp_path, capsys):
    check_auto(used, tmp_path, capsys)


def test_undecided_data_keep_the_default_and_are_flagged(tmp_path, caplog):
    """Frames symmetric under all 8 symmetries cannot decide: the detector default is used, the
    report says so and a warning is logged — never the trial that happened to be lowest."""
    import logging
    from dataclasses import replace

    from hxn_ptycho.callbacks.export import prepare
    from hxn_ptycho.callbacks.orientation import auto_orientation
    run, _sample, _truth, _hxn = run_scan("step", tmp_path, n_positions=25)
    prep = prepare(run, ExportConfig(crop=64))
    sym = np.mean([op(prep.intensity) for op in FRAME_OPS.values()], axis=0)
    msym = np.all([op(prep.mask) for op in FRAME_OPS.values()], axis=0)
    with caplog.at_level(logging.WARNING, logger="hxn_ptycho"):
        chosen, report = auto_orientation(replace(prep, intensity=sym, mask=msym), "eiger1", views=16,
                                          iterations=5)
    assert report["ambiguous"] and report["margin"] < 0.5
    assert chosen == EIGER.in_stage_frame() and report["chosen"] == "identity,x+,y+"
    assert report["decided_by"].startswith("the detector default")
    assert "not decided by the data" in caplog.text


def test_forced_orientation_skips_the_trials(tmp_path):
    run, sample, _truth, _hxn = run_scan("step", tmp_path, n_positions=16)
    scan = build_scan(run, ExportConfig(crop=64, orientation="beamline:rot90_cw,x+,y-"))
    assert "orientation_report" not in scan.attrs and scan.attrs["orientation"] == "identity,x+,y+"
    assert json.loads(scan.attrs["geometry_source"])["orientation"] == "configured"
    np.testing.assert_allclose(scan.diffamp, sample.stage_scan().diffamp * (scan.mask if scan.mask is not None
                                                                              else 1), rtol=1e-6, atol=1e-4)


def test_mirror_equivalents():
    names = {m.name for m in mirror_equivalents(Orientation("rot90_cw", -1, -1))}
    # measured: these three fit a scan recorded with rot90_cw,x-,y- within 20 % (the rest ≥ 15×)
    assert names == {"antitranspose,x-,y+", "transpose,x+,y-", "rot90_ccw,x+,y+"}


def test_summary_figure_axes_are_stage_microns(tmp_path):
    """The object panels are drawn in µm of the stage's x and y from the result's frame (rows +y
    downwards as HXN's 2-D maps, columns +x); without a frame they stay in pixels."""
    from conftest_bluesky import make_result

    from hxn_ptycho.plots import _lit_window, summary_figure
    res = make_result(tmp_path / "r.h5")
    res.attrs["frame"] = json.dumps({"rows": "+y", "cols": "+x", "origin_um": [10.0, -5.0], "pixel_um": 0.01})
    fig = summary_figure(res, pixel_size_m=1e-8)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "x (µm)" and ax.get_ylabel() == "y (µm)"
    rows, cols = _lit_window(res)
    x0, x1, y1, y0 = ax.images[0].get_extent()
    assert x0 == pytest.approx(10.0 + (cols.start - 0.5) * 0.01) and x1 > x0
    assert y0 == pytest.approx(-5.0 + (rows.start - 0.5) * 0.01) and y1 > y0       # first row at the top
    del res.attrs["frame"]
    ax = summary_figure(res, pixel_size_m=1e-8).axes[0]
    assert "µm" not in ax.get_xlabel()


def test_a_ptycho_gui_scan_file_is_read_in_our_indexing(tmp_path):
    """ptycho_gui's save_data writes [x, y]-indexed patterns ("nz*nx*ny") and the raw stage positions,
    its engine negating x and y (ptycho_param.py). A file holding a scan consistent that way is read
    back as the same scan in our [y, x] indexing and the stage frame; our own files are left as they are."""
    import h5py

    from hxn_ptycho.scanfile import read_scan, read_scan_views, write_scan
    from hxn_ptycho.simulate import simulate_scan
    scan, _truth = simulate_scan(n=16, n_positions=9, seed=2, photons=None)
    ours = scan.diffamp.astype(np.float64)                   # consistent with points p (stage frame)
    # their engine: positions -p; in our indexing the consistent frames are then rot180(ours);
    # their file holds those frames [x, y]-indexed, i.e. transposed
    theirs = np.swapaxes(FRAME_OPS["rot180"](ours), -1, -2)
    path = tmp_path / "scan_7.h5"
    with h5py.File(path, "w") as f:
        f["diffamp"] = theirs
        f["points"] = scan.points
        for k, v in (("z_m", scan.z_m), ("lambda_nm", scan.lambda_nm), ("ccd_pixel_um", scan.ccd_pixel_um),
                     ("x_pixel_m", scan.pixel_size_m), ("y_pixel_m", scan.pixel_size_m), ("dr_x", 0.1),
                     ("dr_y", 0.1), ("x_range", 1.0), ("y_range", 1.0), ("angle", 0.0)):
            f[k] = v
    got = read_scan(path)
    np.testing.assert_allclose(got.diffamp, ours, rtol=1e-6)
    np.testing.assert_array_equal(got.points, scan.points)
    assert json.loads(got.attrs["frame"])["rows"] == "+y"
    np.testing.assert_allclose(read_scan_views(path, np.array([4, 1])).diffamp, ours[[4, 1]], rtol=1e-6)
    write_scan(tmp_path / "own.h5", scan)                       # ours: no conversion
    np.testing.assert_array_equal(read_scan(tmp_path / "own.h5").diffamp, scan.diffamp)
