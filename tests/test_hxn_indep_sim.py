"""Self-checks of the independent HXN simulator (tests/hxn_indep_sim.py).

The readers here are written in the test from the beamline tools' public code, not from the
simulator: hxntools' handlers (``handlers/timepix.py``, ``rasmi2.py``, ``bulkdata.py``), hxntools
``motor_info.motor_table``, ptycho_gui ``HXN_databroker.load_metadata``/``save_data`` and
holoptycho ``scripts/offline_epie.py``.  The forward model they are compared with is computed
here from the stage-frame truth by coordinates (where each engine pixel lies on the stage), not
by the simulator's array flips.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import event_model
import h5py
import numpy as np
import pytest
from scipy.spatial import cKDTree

import hxn_indep_sim as sim

SIGNS = {"holoptycho": (1, -1), "ptycho_gui": (-1, -1)}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Noise-free scans of the three kinds (Eiger signs as holoptycho validated them)."""
    return {k: sim.simulate(k, tmp_path_factory.mktemp(f"clean_{k}"), photons=None, seed=3) for k in sim.KINDS}


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    return {k: sim.simulate(k, tmp_path_factory.mktemp(f"noisy_{k}"), seed=5) for k in sim.KINDS}


# ------------------------------------------------------------------ readers (from the beamline code)

def _resources(scan):
    res = {d["uid"]: d for n, d in scan.documents if n == "resource"}
    datums = {d["datum_id"]: d for n, d in scan.documents if n == "datum"}
    return res, datums


def _primary_rows(scan):
    """The primary stream's rows, as a dict of column -> list (events and event pages)."""
    desc = {d["uid"]: d["name"] for n, d in scan.documents if n == "descriptor"}
    cols: dict[str, list] = {}
    for n, d in scan.documents:
        if n == "event" and desc[d["descriptor"]] == "primary":
            for k, v in d["data"].items():
                cols.setdefault(k, []).append(v)
        elif n == "event_page" and desc[d["descriptor"]] == "primary":
            for k, v in d["data"].items():
                cols.setdefault(k, []).extend(v)
    return cols


def _baseline_first(scan):
    desc = {d["uid"]: d["name"] for n, d in scan.documents if n == "descriptor"}
    return next(d["data"] for n, d in scan.documents if n == "event" and desc[d["descriptor"]] == "baseline")


def _retrieve(scan, datum_id):
    """hxntools handlers: TPX_HDF5 / MERLIN_FLY_STREAM_V2 / SIS_HDF51_FLY_STREAM_V1 / PANDA."""
    res, datums = _resources(scan)
    datum = datums[datum_id]
    r = res[datum["resource"]]
    path = os.path.join(r["root"], r["resource_path"])
    kw = datum["datum_kwargs"]
    with h5py.File(path, "r", libver="latest", swmr=True, locking=False) as f:
        if r["spec"] in ("TPX_HDF5", "MERLIN_FLY_STREAM_V2"):
            fpp = r["resource_kwargs"]["frame_per_point"]
            pn = kw["point_number"]
            return f["/entry/instrument/detector/data"][pn * fpp:(pn + 1) * fpp]
        if r["spec"] == "SIS_HDF51_FLY_STREAM_V1":
            fpp = r["resource_kwargs"]["frame_per_point"]
            pn = kw["point_number"]
            return f[kw["column"]][pn * fpp:(pn + 1) * fpp]
        if r["spec"] == "PANDA":
            return f[f"/{kw['field']}"][:]
    raise AssertionError(f"unknown spec {r['spec']}")


# hxntools motor_info.motor_table (µm per count), copied by value from the public file
MOTOR_TABLE = {"zpssx": ("inenc2_val", -1e-4 * 0.9542), "zpssy": ("inenc3_val", -1.03297e-4)}


def _motor_name(plan_repr: str) -> str:
    return re.search(r"name='([^']+)'", plan_repr).group(1)


def _read_scan(scan):
    """Frames (n, H, W), positions (n, 2) in µm of (x, y), ic, energy: as the beamline tools read them."""
    start = scan.documents[0][1]
    rows = _primary_rows(scan)
    if start.get("scan", {}).get("type") == "2D_FLY_PANDA":
        det = [d for d in start["scan"]["detectors"] if d.startswith(("eiger", "merlin"))][0]
        frames = _retrieve(scan, rows[f"{det}_image"][0])
        n = len(frames)
        xm, ym = start["scan"]["fast_axis"]["motor_name"], start["scan"]["slow_axis"]["motor_name"]
        pos = []
        for m in (xm, ym):
            counts = _retrieve(scan, rows[MOTOR_TABLE[m][0]][0]).astype(float)
            up = len(counts) // n  # holoptycho offline_epie: round(len(positions) / n_frames)
            pos.append(counts.reshape(n, up).mean(axis=1) * MOTOR_TABLE[m][1])
        ic_key = "sclr1_ch3" if ym == "ssy" else "sclr1_ch4"
        ic = _retrieve(scan, rows[ic_key][0]).astype(float)
    else:
        det = start["detectors"][0]
        frames = np.concatenate([_retrieve(scan, d) for d in rows[det]])
        if start["plan_name"] == "FlyPlan2D":
            xm, ym = _motor_name(start["plan_args"]["motor1"]), _motor_name(start["plan_args"]["motor2"])
        else:
            xm, ym = _motor_name(start["plan_args"]["x_motor"]), _motor_name(start["plan_args"]["y_motor"])
        pos = [np.asarray(rows[xm], float), np.asarray(rows[ym], float)]
        ic = np.asarray(rows["sclr1_ch3" if ym == "ssy" else "sclr1_ch4"], float)
    th = np.deg2rad(_baseline_first(scan)["dcm_th"])
    energy = 12.39842 / (2.0 * 3.1355893 * np.sin(th))
    return frames, np.stack(pos, axis=1), ic, energy


def _ptycho_gui_patterns(frames, ic, cx, cy, n):
    """ptycho_gui HXN_databroker.save_data, intensities (before its sqrt)."""
    out = np.zeros((len(frames), n, n))
    for i, raw in enumerate(frames):
        img = raw.astype(float) * ic[0] / ic[i]
        crop = img[cy - n // 2:cy + n // 2, cx - n // 2:cx + n // 2]
        crop = np.rot90(crop, axes=(1, 0))
        out[i] = np.fft.fftshift(crop)
    return out


def _holoptycho_patterns(frames, ic, box, bad):
    """holoptycho scripts/offline_epie.py: crop, zero flagged, rot90_cw (swapaxes + [..., ::-1]), ifftshift."""
    r0, r1, c0, c1 = box
    dp = frames[:, r0:r1, c0:c1].astype(np.float64)
    dp[bad[:, r0:r1, c0:c1]] = 0
    dp *= (ic[0] / ic)[:, None, None]  # its ML/DM engine normalises separately; same scaling as ptycho_gui here
    return np.fft.ifftshift(dp.swapaxes(-1, -2)[..., :, ::-1], axes=(-2, -1))


def _model(scan, signs):
    """|fft2(P * O)|^2 in the [x, y] engine frame, computed by coordinates from the stage truth."""
    n = scan.frame_size
    p_um = scan.pixel_m * 1e6
    sx, sy = signs
    x0, y0 = scan.origin_um
    off = np.arange(n) - n // 2  # engine pixel a -> engine coordinate u_k + off[a] * p
    out = np.empty((len(scan.positions_um), n, n))
    for k, (x, y) in enumerate(scan.positions_um):
        u, v = sx * x, sy * y
        xs = sx * (u + off * p_um)  # stage x of engine row a
        ys = sy * (v + off * p_um)  # stage y of engine column b
        j = np.round((xs - x0) / p_um).astype(int)
        i = np.round((ys - y0) / p_um).astype(int)
        patch = scan.object_truth[i[None, :], j[:, None]]  # [a, b] = O(x_a, y_b)
        pj = (n // 2 + sx * off) % n
        pi = (n // 2 + sy * off) % n
        probe = scan.probe_truth[pi[None, :], pj[:, None]]
        out[k] = np.abs(np.fft.fft2(probe * patch)) ** 2 / (n * n)
    return out


def _rel_err(a, b, mask=None):
    """Relative error of a against b after the best global factor (photon units are a free scale)."""
    if mask is not None:
        a, b = a[:, mask], b[:, mask]
    g = float(np.vdot(b, a).real / np.vdot(b, b).real)
    return float(np.linalg.norm(a - g * b) / np.linalg.norm(a))


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("kind", sim.KINDS)
def test_documents_valid_and_routable(clean, kind):
    scan = clean[kind]
    names = [n for n, _ in scan.documents]
    assert names[0] == "start" and names[-1] == "stop"
    for name, doc in scan.documents:
        event_model.schema_validators[event_model.DocumentNames[name]].validate(doc)
    seen: list[tuple[str, int]] = []

    def rows(name, doc):
        if name in ("event_page", "datum_page"):
            return len(doc["uid" if name == "event_page" else "datum_id"])
        return 1

    def factory(name, start_doc):
        return [lambda n, d: seen.append((n, rows(n, d)))], []

    router = event_model.RunRouter([factory])
    sim.emit(scan, router)
    # the router hands callbacks pages (an event as a one-row event_page, a datum as a datum_page)
    paged = {"event": "event_page", "datum": "datum_page"}
    expect = [(paged.get(n, n), rows(n, d)) for n, d in scan.documents]
    assert seen == expect
    # every datum is referenced by the primary stream and points at a known resource
    res, datums = _resources(scan)
    assert all(d["resource"] in res for d in datums.values())
    used = {v for vals in _primary_rows(scan).values() for v in vals if isinstance(v, str)}
    assert set(datums) <= used
    assert scan.documents[-1][1]["num_events"]["primary"] == (1 if kind == "fly2dpd" else len(scan.positions_um))


@pytest.mark.parametrize("kind", sim.KINDS)
def test_files_hold_what_the_datums_point_to(noisy, kind):
    scan = noisy[kind]
    res, _ = _resources(scan)
    named = {Path(os.path.join(r["root"], r["resource_path"])).resolve() for r in res.values()}
    assert named == {p.resolve() for p in scan.files}
    assert all(p.exists() and p.parent == scan.data_dir for p in scan.files)
    frames, pos, ic, energy = _read_scan(scan)
    n = len(scan.positions_um)
    assert frames.shape == (n,) + tuple(scan.notes["raw_frame_shape"]) and frames.dtype == np.uint32
    assert len(ic) == n and np.all(ic > 0)
    np.testing.assert_allclose(pos, scan.positions_um, atol=1e-3)  # PandA count rounding: 0.05 nm
    assert abs(energy - scan.energy_kev) < 1e-6
    # photons: the crop holds ~`photons` counts a frame (flux-scaled), the flagged pixel its marker
    cy, cx = scan.notes["crop_centre"]["cy"], scan.notes["crop_centre"]["cx"]
    h = scan.frame_size // 2
    crop = frames[:, cy - h:cy + h, cx - h:cx + h].astype(float)
    fy, fx = scan.notes["flagged_pixels"][0]
    assert np.all(frames[:, fy, fx] == scan.notes["flag_value"])
    crop[:, fy - cy + h, fx - cx + h] = 0
    total = (crop.sum(axis=(1, 2)) * ic[0] / ic).mean()
    assert 0.9e6 < total < 1.1e6
    # the beam is off-centre in a larger frame, and its centroid finds the crop centre
    H, W = frames.shape[1:]
    assert H > scan.frame_size and W > scan.frame_size and (cy, cx) != (H // 2, W // 2)
    mean = frames.astype(float).mean(axis=0)
    mean[fy, fx] = 0
    yy, xx = np.mgrid[0:H, 0:W]
    assert abs((mean * yy).sum() / mean.sum() - cy) < 2.5 and abs((mean * xx).sum() / mean.sum() - cx) < 2.5


@pytest.mark.parametrize("kind", sim.KINDS)
def test_beamline_preprocessing_gives_the_xy_forward_model(clean, kind):
    scan = clean[kind]
    n = scan.frame_size
    frames, pos, ic, _ = _read_scan(scan)
    np.testing.assert_allclose(pos, scan.positions_um, atol=1e-3)
    cy, cx = scan.notes["crop_centre"]["cy"], scan.notes["crop_centre"]["cx"]
    signs = SIGNS[scan.eiger_signs] if scan.detector.startswith("eiger") else SIGNS["ptycho_gui"]
    model = _model(scan, signs)
    gui = _ptycho_gui_patterns(frames, ic, cx, cy, n)
    bad = frames >= np.iinfo(np.uint16).max  # holoptycho: dp >= uint16 max -> 0
    holo = _holoptycho_patterns(frames, ic, scan.notes["crop_box"], bad)
    keep = ~np.fft.fftshift(np.rot90(bad[0, cy - n // 2:cy + n // 2, cx - n // 2:cx + n // 2], axes=(1, 0)))
    assert (~keep).sum() == 1  # exactly the flagged pixel
    err_gui = _rel_err(gui, model, keep)
    err_holo = _rel_err(holo, model, keep)
    assert err_gui < 1e-5 and err_holo < 1e-5, (err_gui, err_holo)
    assert np.vdot(model[:, keep], gui[:, keep]).real / np.vdot(model[:, keep], model[:, keep]).real == pytest.approx(
        scan.notes["photon_scale"], rel=1e-5)
    # the check can fail: any other frame symmetry or other position signs miss by far
    for k_rot, flip in [(0, False), (1, False), (2, False), (3, True), (0, True)]:
        alt = np.rot90(gui, k_rot, axes=(-2, -1))
        alt = alt[..., ::-1] if flip else alt
        if k_rot == 0 and not flip:
            continue
        assert _rel_err(alt, model, None) > 0.05
    for other in [(1, 1), (-1, 1), (1, -1), (-1, -1)]:
        if other != signs:
            assert _rel_err(gui, _model(scan, other), keep) > 0.05


def test_motor_orders_give_the_same_scan(tmp_path):
    a = sim.simulate("fermat", tmp_path / "xy", seed=7, motor_order="xy")
    b = sim.simulate("fermat", tmp_path / "yx", seed=7, motor_order="yx")
    np.testing.assert_array_equal(a.positions_um, b.positions_um)
    sa, sb = a.documents[0][1], b.documents[0][1]
    assert sa["motors"] == ["zpssx", "zpssy"] and sb["motors"] == ["zpssy", "zpssx"]
    for s in (sa, sb):  # what bluesky's spiral_fermat states, independent of the set order
        assert _motor_name(s["plan_args"]["x_motor"]) == "zpssx"
        assert s["hints"]["dimensions"][0][0] == ["zpssx"] and s["hints"]["dimensions"][1][0] == ["zpssy"]
        assert s["plan_name"] == "rel_spiral_fermat"
    pa, pb = _read_scan(a)[1], _read_scan(b)[1]
    np.testing.assert_allclose(pa, pb)
    # taking x from start['motors'][0] swaps the axes of one of them
    rows = _primary_rows(b)
    naive = np.stack([rows[sb["motors"][0]], rows[sb["motors"][1]]], axis=1)
    assert np.abs(naive - pb).max() > 0.1


def test_sparse_scans_keep_the_forward_model(tmp_path):
    scan = sim.simulate("fly2dpd", tmp_path, photons=None, seed=4, step_fraction=0.38, n_positions=64)
    frames, pos, ic, _ = _read_scan(scan)
    n = scan.frame_size
    cy, cx = scan.notes["crop_centre"]["cy"], scan.notes["crop_centre"]["cx"]
    gui = _ptycho_gui_patterns(frames, ic, cx, cy, n)
    keep = np.ones((n, n), bool)
    fy, fx = scan.notes["flagged_pixels"][0]
    keep[np.fft.fftshift(np.rot90(np.arange(n * n).reshape(n, n) == (fy - cy + n // 2) * n + (fx - cx + n // 2),
                                  axes=(1, 0)))] = False
    assert _rel_err(gui, _model(scan, SIGNS["holoptycho"]), keep) < 1e-5
    nn = np.median(cKDTree(scan.positions_um).query(scan.positions_um, k=2)[0][:, 1])
    probe = np.abs(scan.probe_truth) ** 2
    diameter = 2 * np.sqrt((probe > 0.05 * probe.max()).sum() / np.pi) * scan.pixel_m * 1e6
    assert 0.6 < 1 - nn / diameter < 0.8 and np.ptp(scan.positions_um, axis=0).min() > 0.7


def test_the_two_eiger_sign_conventions_give_different_frames(tmp_path):
    a = sim.simulate("fermat", tmp_path / "h", seed=9, photons=None, eiger_signs="holoptycho")
    b = sim.simulate("fermat", tmp_path / "g", seed=9, photons=None, eiger_signs="ptycho_gui")
    np.testing.assert_array_equal(a.positions_um, b.positions_um)
    np.testing.assert_array_equal(a.object_truth, b.object_truth)
    fa, fb = _read_scan(a)[0].astype(float), _read_scan(b)[0].astype(float)
    fa[fa > 1e8] = 0
    fb[fb > 1e8] = 0
    assert np.linalg.norm(fa - fb) / np.linalg.norm(fa) > 0.2
    assert a.notes["engine_signs"] == [1, -1] and b.notes["engine_signs"] == [-1, -1]


@pytest.mark.parametrize("kind", sim.KINDS)
def test_geometry_is_realistic(noisy, kind):
    scan = noisy[kind]
    lam = 12.39842e-10 / scan.energy_kev
    assert scan.pixel_m == pytest.approx(lam * scan.distance_m / (scan.frame_size * scan.detector_pixel_m))
    assert 5e-9 <= scan.pixel_m <= 20e-9
    assert 9 <= scan.energy_kev <= 15 and 0.5 <= scan.distance_m <= 2.0
    assert scan.detector_pixel_m == (55e-6 if scan.detector == "merlin1" else 75e-6)
    assert len(scan.positions_um) <= 150
    probe = np.abs(scan.probe_truth) ** 2
    diameter = 2 * np.sqrt((probe > 0.05 * probe.max()).sum() / np.pi) * scan.pixel_m * 1e6
    nn = np.median(cKDTree(scan.positions_um).query(scan.positions_um, k=2)[0][:, 1])
    assert 1 - nn / diameter >= 0.6
    assert np.ptp(scan.positions_um, axis=0).min() > 0.3
    # the probe has no flip or rotation symmetry (that is what makes orientation errors visible)
    p = scan.probe_truth
    for alt in (p[::-1], p[:, ::-1], p[::-1, ::-1], p.T, np.rot90(p)):
        assert np.abs(np.abs(alt) - np.abs(p)).sum() / np.abs(p).sum() > 0.1
    # object has amplitude and phase structure
    assert np.ptp(np.abs(scan.object_truth)) > 0.2 and np.ptp(np.angle(scan.object_truth)) > 0.5


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        sim.simulate("raster", tmp_path)
    with pytest.raises(ValueError, match="eiger_signs"):
        sim.simulate("fermat", tmp_path, eiger_signs="up")
    with pytest.raises(ValueError, match="motor_order"):
        sim.simulate("fermat", tmp_path, motor_order="xx")
    with pytest.raises(ValueError, match="step_fraction"):
        sim.simulate("fermat", tmp_path, step_fraction=0.9)
    with pytest.raises(ValueError, match="frame_size"):
        sim.simulate("fermat", tmp_path, frame_size=63)
