"""Real HXN scan dialects (fly2dpd + eiger2 + PandA + SIS, a step scan with eiger1, FlyPlan2D with
merlin1) become scan files that reconstruct the simulated truth — with no beamline options."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from hxn_ptycho.callbacks.export import (
    ExportConfig,
    ExportError,
    beam_center,
    build_scan,
    ensure_positive,
    prepare,
)
from hxn_ptycho.callbacks.router import ignore_reason
from hxn_sim import run_scan

from hxn_ptycho.engine import reconstruct
from hxn_ptycho.metrics import illuminated_region, nrmse
from hxn_ptycho.params import ReconParams

KINDS = ["fly2dpd", "step", "FlyPlan2D"]
CFG = ExportConfig(crop=64)          # the crop is the reconstruction's size, not a beamline option


def object_nrmse(res, truth, sample=None) -> float:
    """NRMSE against the truth; with ``sample``, the truth as it lies on the stage (the export's frame)."""
    region = illuminated_region(res.positions_px, res.probe, res.object.shape[1:])
    obj = truth.object if sample is None else sample.stage_object(truth.object)
    return nrmse(res.object[0], obj, region)


@pytest.mark.parametrize("kind", KINDS)
def test_export_recovers_the_simulated_scan(kind, tmp_path):
    run, sample, _truth, _hxn = run_scan(kind, tmp_path)
    scan = build_scan(run, CFG)
    ref = sample.stage_scan()          # recorded stage positions, frames in the stage frame
    assert scan.diffamp.shape == ref.diffamp.shape
    good = scan.mask
    assert good is not None and (~good).sum() == 1          # the flagged pixel (the hot one is outside the crop)
    np.testing.assert_allclose(scan.diffamp * good, ref.diffamp * good, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(scan.points, ref.points, atol=2e-4)        # µm (encoder rounding)
    assert scan.pixel_size_m == pytest.approx(ref.pixel_size_m, rel=1e-3)
    geo = json.loads(scan.attrs["geometry_source"])
    if kind == "fly2dpd":
        assert geo["distance_m"] == [2.05, "start['scan']['detector_distance']"]
        assert "inenc2_val" in geo["positions"] and "averaged per point" in geo["positions"]
    else:
        assert geo["distance_m"][1].startswith("HXN default 2.05 m")
    assert geo["energy_kev"][0] == pytest.approx(12.0) and "dcm_th" in geo["energy_kev"][1]
    assert scan.attrs["detector"] == sample.detector
    assert scan.attrs["orientation"] == sample.orient.in_stage_frame().name      # decided by the data
    report = json.loads(scan.attrs["orientation_report"])
    assert report["decided_by"] == "the data" and report["margin"] > 1.0
    assert json.loads(scan.attrs["frame"])["rows"] == "+y"


@pytest.mark.parametrize("kind", KINDS)
def test_reconstruction_matches_the_truth_like_the_direct_scan_file(kind, tmp_path, capsys):
    """Object NRMSE (scale, shift, ramp removed; no rotation) within 1.5× of the same data written
    directly as a scan file; object pixel size within 1 % of the simulation's."""
    run, sample, truth, _hxn = run_scan(kind, tmp_path)
    scan = build_scan(run, CFG)
    p = ReconParams(iterations=60, seed=0)
    via_beamline = object_nrmse(reconstruct(scan, p, log=lambda _m: None), truth, sample)   # stage frame
    direct = object_nrmse(reconstruct(sample.scan, p, log=lambda _m: None), truth)
    with capsys.disabled():
        print(f"\n[hxn-ptycho] {kind}: object NRMSE via the beamline documents {via_beamline:.4f}, "
              f"direct scan file {direct:.4f}; pixel {scan.pixel_size_m * 1e9:.3f} nm "
              f"(simulation {sample.scan.pixel_size_m * 1e9:.3f} nm)")
    assert abs(scan.pixel_size_m / sample.scan.pixel_size_m - 1) < 0.01
    assert via_beamline <= 1.5 * direct
    assert via_beamline < 0.1


def test_wrong_orientation_or_distance_would_fail_the_quality_checks(tmp_path):
    """The checks above can fail: a wrong frame symmetry gives a much worse object, and the old
    fixed 0.5 m an object pixel 4.1× too small."""
    run, sample, truth, _hxn = run_scan("step", tmp_path)
    old = build_scan(run, ExportConfig(crop=64, distance_m=0.5))
    assert old.pixel_size_m / sample.scan.pixel_size_m == pytest.approx(0.5 / 2.05)
    p = ReconParams(iterations=60, seed=0)
    good = object_nrmse(reconstruct(build_scan(run, CFG), p, log=lambda _m: None), truth, sample)
    wrong = object_nrmse(reconstruct(build_scan(run, ExportConfig(crop=64, orientation="transpose,x+,y-")), p,
                                     log=lambda _m: None), truth, sample)
    assert wrong > 3 * good


def test_saturated_pixel_is_masked_before_the_beam_centre(tmp_path):
    """A pixel at the integer maximum far from the beam would drag the centre of mass onto it."""
    run, sample, _truth, _hxn = run_scan("fly2dpd", tmp_path, n_positions=25)
    prep = prepare(run, CFG)
    assert (prep.attrs["center_row"], prep.attrs["center_col"]) == tuple(sample.center)
    assert prep.attrs["masked_saturated"] == 1 and prep.attrs["masked_hot"] == 1
    frames = np.stack([sample.frame(i).astype(float) for i in range(sample.n_views)])
    unmasked = beam_center(frames.mean(axis=0), np.ones(frames.shape[1:], bool))
    assert unmasked != tuple(sample.center)                 # what happened before


def test_frames_without_beam_are_dropped_with_a_note(tmp_path):
    run, sample, _truth, _hxn = run_scan("step", tmp_path, n_positions=25, dark=(3, 7))
    scan = build_scan(run, CFG)
    assert scan.n_views == 23 and json.loads(scan.attrs["dropped_frames"]) == [3, 7]
    np.testing.assert_allclose(scan.points, np.delete(sample.recorded_points(), [3, 7], axis=1))


def test_non_positive_scaler_values_are_patched(tmp_path):
    def setup(hxn, sample):
        hxn.panda_flyer.bad_scaler = {4: 0.0, 5: -3.0}
    run, _sample, _truth, _hxn = run_scan("fly2dpd", tmp_path, n_positions=25, setup=setup)
    scan = build_scan(run, CFG)
    geo = json.loads(scan.attrs["geometry_source"])
    assert "2 non-positive value(s) replaced" in geo["scaler"]
    assert np.all(np.isfinite(scan.diffamp))
    a = np.array([0.0, 2.0, -1.0, 0.0, 5.0, 0.0])
    assert ensure_positive(a) == 4 and a.tolist() == [2.0, 2.0, 5.0, 5.0, 5.0, 5.0]


def test_foreshortening_from_zpsth(tmp_path):
    def setup(hxn, sample):
        hxn.zpsth.set(30.0).wait(5)
    run, sample, _truth, _hxn = run_scan("FlyPlan2D", tmp_path, n_positions=16, setup=setup)
    scan = build_scan(run, CFG)
    rec = sample.recorded_points()
    np.testing.assert_allclose(scan.points[0], rec[0] * math.cos(math.radians(30)), rtol=1e-9)
    np.testing.assert_allclose(scan.points[1], rec[1])
    assert scan.attrs["angle_deg"] == 30.0


def test_selection_of_hxn_runs(caplog, tmp_path):
    fly = {"uid": "u1", "plan_name": "fly2dpd", "motors": ["zpssx", "zpssy"],
           "scan": {"type": "2D_FLY_PANDA", "detectors": ["eiger2", "panda1", "sclr1"], "detector_distance": 2.05}}
    assert ignore_reason(fly, ExportConfig().detectors) is None
    assert ignore_reason({"detectors": ["eiger1", "sclr1"], "motors": ["zpssx", "zpssy"]}, CFG.detectors) is None
    assert "not a 2-D scan" in ignore_reason({"detectors": ["eiger2"], "plan_name": "FlyPlan1D"}, CFG.detectors)
    assert "one motor" in ignore_reason({"detectors": ["merlin1"], "motors": ["zpssx"]}, CFG.detectors)
    assert "none of the detectors" in ignore_reason({"detectors": ["xspress3"]}, CFG.detectors)
    assert "analysis" in ignore_reason({"detectors": ["eiger2"], "plan_name": "hxn_ptycho_dm"}, CFG.detectors)
    from hxn_ptycho.callbacks.router import CallbackConfig, PtychoCallback
    cb = PtychoCallback(CallbackConfig(work_dir=str(tmp_path / "work")))
    try:
        with caplog.at_level(logging.INFO, logger="hxn_ptycho"):
            cb("start", {"uid": "u2", "time": 0.0, "scan_id": 5, "detectors": ["xspress3"], "motors": ["zpssx"]})
        assert "run u2 (scan 5) ignored: it names none of the detectors" in caplog.text
    finally:
        cb.close()


def test_a_missing_detector_file_is_named(tmp_path):
    run, _sample, _truth, _hxn = run_scan("step", tmp_path, n_positions=9)
    path = json.loads(build_scan(run, CFG).attrs["frame_source"])[0][0]
    import os
    os.remove(path)
    with pytest.raises(ExportError, match=f"detector file {path} does not exist"):
        build_scan(run, ExportConfig(crop=64, frame_wait_s=0.3))


def test_any_exception_of_one_of_our_runs_becomes_a_failure(tmp_path, monkeypatch):
    """Not only ExportError: an unexpected error while exporting is recorded with its reason."""
    from hxn_ptycho.callbacks import router
    from hxn_ptycho.callbacks.router import CallbackConfig, PtychoCallback

    def boom(*_a, **_k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(router, "export_scan", boom)
    failures = []
    cb = PtychoCallback(CallbackConfig(work_dir=str(tmp_path / "work"), export=CFG), jobs=None,
                        on_failure=lambda run, reason: failures.append((run.uid, reason)))
    try:
        run, _sample, _truth, _hxn = run_scan("step", tmp_path, n_positions=9)
        cb._pending.put(run)
        assert cb.flush(30)
    finally:
        cb.close()
    assert failures == [(run.uid, "cannot build the scan file: RuntimeError: disk on fire")]
