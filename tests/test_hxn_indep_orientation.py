"""The right image of every HXN scan, checked against an independent simulator.

``tests/hxn_indep_sim.py`` rebuilds HXN's documents and detector files from the beamline's public
code alone (an ``[x, y]``-indexed forward model, ptycho_gui's rotation, both public Eiger sign
conventions, fermat runs with either ``start['motors']`` order). Here the export, with no beamline
options, must give the scan *in the stage frame*: the recorded stage positions and the frames of
this project's own ``[y, x]``-indexed forward model of the truth (no convention involved), and the
reconstruction must match the truth with no rotation, flip or conjugation.

Cheap (default suite): the exported scan against the model, for every case. Slow
(``pytest -m slow tests/test_hxn_indep_orientation.py``): the whole chain through the callback
(and once through ``hxn-ptycho listen`` over 0MQ) to the derived run, its object against the truth.
"""
from __future__ import annotations

import json

import conftest_bluesky
import hxn_indep_sim as ind
import numpy as np
import pytest
from hxn_ptycho.callbacks.export import ExportConfig, build_scan

from hxn_ptycho.metrics import illuminated_region, nrmse
from hxn_ptycho.scanfile import ScanData

# (kind, eiger signs, start['motors'] order, the stage-frame class the data must give)
CASES = [("fly2dpd", "holoptycho", "xy", "identity,x+,y+"),
         ("fermat", "holoptycho", "xy", "identity,x+,y+"),
         ("fermat", "holoptycho", "yx", "identity,x+,y+"),
         ("fermat", "ptycho_gui", "xy", "fliplr,x+,y+"),
         ("fermat", "ptycho_gui", "yx", "fliplr,x+,y+"),
         ("FlyPlan2D", "ptycho_gui", "xy", "fliplr,x+,y+")]
IDS = [f"{k}-{s}-{o}" for k, s, o, _ in CASES]


def collected(scan: ind.IndepScan):
    """The documents through the collector the callback uses (as ``RE.subscribe`` would feed it)."""
    from event_model import RunRouter

    from hxn_ptycho.callbacks.collector import RunCollector
    got: list = []
    router = RunRouter([lambda name, start: ([RunCollector(start, got.append)], [])])
    ind.emit(scan, router)
    assert len(got) == 1
    return got[0]


def stage_model(scan: ind.IndepScan) -> np.ndarray:
    """This project's forward model of the truth, in the stage frame and [y, x] indexing: the beam
    (probe pixel n/2) on each recorded position, zero frequency at [0, 0] — no convention to port."""
    n, h = scan.frame_size, scan.frame_size // 2
    p_um = scan.pixel_m * 1e6
    jx = np.round((scan.positions_um[:, 0] - scan.origin_um[0]) / p_um).astype(int)
    iy = np.round((scan.positions_um[:, 1] - scan.origin_um[1]) / p_um).astype(int)
    out = np.empty((len(jx), n, n))
    for k, (i, j) in enumerate(zip(iy, jx)):
        out[k] = np.abs(np.fft.fft2(scan.probe_truth * scan.object_truth[i - h:i + h, j - h:j + h])) ** 2 / (n * n)
    return out


def cfg(scan: ind.IndepScan, **kw) -> ExportConfig:
    return ExportConfig(crop=scan.frame_size, **kw)      # the crop is the reconstruction's size


@pytest.mark.parametrize(("kind", "signs", "order", "expected"), CASES, ids=IDS)
def test_export_gives_the_scan_in_the_stage_frame(kind, signs, order, expected, tmp_path, capsys):
    """The symmetry is decided by the data with a wide margin (the twin resolved by the documented
    symmetry and y sign), the frames are the stage-frame model of the truth within Poisson noise
    (a wrong symmetry is ~10³× off), the positions are the recorded stage positions (x, y from the
    plan whatever the order of start['motors']), and the scan file says it is in the stage frame."""
    sim = ind.simulate(kind, tmp_path, n_positions=49, frame_size=64, eiger_signs=signs, motor_order=order, seed=5)
    scan = build_scan(collected(sim), cfg(sim))
    report = json.loads(scan.attrs["orientation_report"])
    with capsys.disabled():
        print(f"\n[hxn-ptycho] indep {kind}/{sim.detector} signs {signs} motors {order}: {report['summary']}, {report['cost_s']:.1f} s")
    assert scan.attrs["orientation"] == expected and report["decided_by"] == "the data"
    assert report["margin"] > 2.0
    np.testing.assert_allclose(scan.points, sim.positions_um.T, atol=2e-3)       # µm; encoder counts
    want = stage_model(sim) * sim.notes["photon_scale"]
    good = scan.mask if scan.mask is not None else np.ones(want.shape[1:], bool)
    assert (~good).sum() <= 1                                                     # the flagged pixel
    got = scan.diffamp.astype(np.float64) ** 2
    shift = centre_offset(got, want)          # the beam centre may be a pixel off (see the xfail below)
    assert max(abs(shift[0]), abs(shift[1])) <= 1
    want = np.roll(want, shift, (-2, -1))
    h = sim.frame_size // 2
    good = good.copy()
    good[h, :] = good[:, h] = False           # the Nyquist row/column: from outside the written crop
    chi2 = float(np.mean(((got - want) ** 2 / (want + 1.0))[:, good]))
    assert chi2 < 1.5, chi2                                                        # Poisson: about 1
    assert json.loads(scan.attrs["frame"])["rows"] == "+y"
    assert scan.pixel_size_m == pytest.approx(sim.pixel_m, rel=1e-4)


def test_the_detector_default_alone_is_right_for_its_documented_convention(tmp_path):
    """With no trials (``orientation='default'``) an eiger2 fly2dpd scan in holoptycho's convention
    and a merlin1 FlyPlan2D in ptycho_gui's come out right — this needs the axis swap: with the
    beamline's rot90_cw taken as ours (the swap dropped) the frames are transposed and rotated."""
    for kind, signs in (("fly2dpd", "holoptycho"), ("FlyPlan2D", "ptycho_gui")):
        sim = ind.simulate(kind, tmp_path / kind, n_positions=30, frame_size=32, photons=None,
                           eiger_signs=signs, seed=6)
        scan = build_scan(collected(sim), cfg(sim, orientation="default"))
        want = stage_model(sim) * sim.notes["photon_scale"]      # noise-free: the expected counts
        good = scan.mask.copy() if scan.mask is not None else np.ones(want.shape[1:], bool)
        h = sim.frame_size // 2      # the Nyquist row and column: an even crop's flip brings them from
        good[h, :] = good[:, h] = False      # outside the crop (zero here), the model has them
        np.testing.assert_allclose(scan.diffamp.astype(np.float64) ** 2 * good, want * good, rtol=2e-5,
                                   atol=2e-6 * want.max())


def test_fermat_axes_come_from_the_plan_not_start_motors(tmp_path):
    """Both orders of start['motors'] give the same positions; x and y are the plan's."""
    from hxn_ptycho.callbacks.export import positions, scan_axes
    pts = {}
    for order in ("xy", "yx"):
        sim = ind.simulate("fermat", tmp_path / order, n_positions=30, frame_size=32, photons=None,
                           motor_order=order, seed=7)
        run = collected(sim)
        assert run.start["motors"] == (["zpssx", "zpssy"] if order == "xy" else ["zpssy", "zpssx"])
        assert scan_axes(run.start) == (["zpssx", "zpssy"], "plan_args x_motor/y_motor")
        pts[order] = positions(run, cfg(sim))[0]
        np.testing.assert_allclose(pts[order], sim.positions_um.T, atol=1e-9)
    np.testing.assert_array_equal(pts["xy"], pts["yx"])


@pytest.mark.xfail(strict=True, reason="the beam centre (centre of mass of the mean frame, rounded) is one pixel off "
                   "the zero frequency for these probes (coma): object NRMSE 0.12 instead of 0.076 (fly2dpd, seed 20)")
def test_the_beam_centre_is_the_zero_frequency(tmp_path):
    """Known limit, outside the orientation: the export's beam centre against the true zero frequency
    (the sim writes ptycho_gui's rot90_ccw of the fftshifted pattern: zero at crop row cy-1, col cx).
    Measured with the simulator as merged (its probe with coma): one column off for both."""
    from hxn_ptycho.callbacks.export import prepare
    off = []
    for kind in ("fly2dpd", "fermat"):
        sim = ind.simulate(kind, tmp_path / kind, n_positions=49, frame_size=64, seed=5)
        prep = prepare(collected(sim), cfg(sim))
        c = sim.notes["crop_centre"]
        off.append((prep.attrs["center_row"] - (c["row"] - 1), prep.attrs["center_col"] - c["col"]))
    assert off == [(0, 0), (0, 0)], off


# -- the whole chain: documents → callback → scan file → job → derived run --------------------------

tiled_server = conftest_bluesky.tiled_server      # the fixture (a real Tiled server process)

ITERATIONS = 60


def stage_truth_on(res_object: np.ndarray, frame: dict, sim: ind.IndepScan) -> np.ndarray:
    """The truth placed on the result's object grid by the result's stated frame (origin, pixel)."""
    p_um = sim.pixel_m * 1e6
    assert frame["rows"] == "+y" and frame["cols"] == "+x"
    assert frame["pixel_um"] == pytest.approx(p_um, rel=1e-3)
    dc = int(round((sim.origin_um[0] - frame["origin_um"][0]) / p_um))
    dr = int(round((sim.origin_um[1] - frame["origin_um"][1]) / p_um))
    out = np.ones(res_object.shape, complex)
    H, W = res_object.shape
    t = sim.object_truth
    r0, c0 = max(dr, 0), max(dc, 0)
    r1, c1 = min(dr + t.shape[0], H), min(dc + t.shape[1], W)
    out[r0:r1, c0:c1] = t[r0 - dr:r1 - dr, c0 - dc:c1 - dc]
    return out


def object_error(obj: np.ndarray, positions_px: np.ndarray, probe: np.ndarray, frame: dict,
                 sim: ind.IndepScan) -> float:
    """NRMSE against the truth in the stage frame: a shift (sub-pixel, fitted), a phase ramp and a
    complex scale may be fitted; no rotation, flip or conjugation."""
    region = illuminated_region(positions_px, probe, obj.shape[-2:])
    return nrmse(obj[0], stage_truth_on(obj[0], frame, sim), region)


def centre_offset(exported: np.ndarray, model: np.ndarray) -> tuple[int, int]:
    """The whole-pixel q shift between the exported frames and the model (a beam centre found one
    pixel off): the roll of the model's mean frame that best matches the exported one."""
    a, b = exported.mean(axis=0), model.mean(axis=0)
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    return min(shifts, key=lambda d: float(np.sum((np.roll(b, d, (0, 1)) - a) ** 2)))


def reference_error(sim: ind.IndepScan, exported: ScanData) -> float:
    """What the engine reaches on correctly prepared frames of the same scan — the stage-frame model
    with the same photon scale and Poisson noise, the true positions — cropped about the same beam
    centre as the export (the centre estimate is not what this test is about: see
    test_the_beam_centre_is_the_zero_frequency), with the same parameters, mask and starting probe."""
    from hxn_ptycho.engine import reconstruct
    from hxn_ptycho.params import ReconParams
    rng = np.random.default_rng(11)
    model = stage_model(sim) * sim.notes["photon_scale"]
    model = np.roll(model, centre_offset(exported.diffamp.astype(np.float64) ** 2, model), (-2, -1))
    inten = rng.poisson(model).astype(np.float64)
    lam_nm = 12.39842 / 10 / sim.energy_kev
    scan = ScanData(diffamp=np.sqrt(inten).astype(np.float32), points=sim.positions_um.T.copy(),
                    lambda_nm=lam_nm, z_m=sim.distance_m, ccd_pixel_um=sim.detector_pixel_m * 1e6, mask=exported.mask,
                    probe_guess=exported.probe_guess, attrs={"frame": json.dumps({"positions": "stage"})})
    res = reconstruct(scan, ReconParams(iterations=ITERATIONS, probe_modes=1), log=lambda _m: None)
    return object_error(res.object, res.positions_px, res.probe, json.loads(res.attrs["frame"]), sim)


def check_derived(res, sim: ind.IndepScan, expected: str, capsys, how: str) -> None:
    assert res.ok, res.reason
    recon = res.start["recon"]
    frame = res.start["frame"]
    assert frame["rows"] == "+y" and frame["cols"] == "+x" and frame["stage_frame"]
    assert recon["geometry"]["orientation"] == expected
    pos = np.asarray(res.positions_px)
    p_um = sim.pixel_m * 1e6
    # positions_px run along +y (rows) and +x (columns): corner = (stage - origin) / pixel - n/2
    np.testing.assert_allclose(pos[:, 0], (sim.positions_um[:, 1] - frame["origin_um"][1]) / p_um - sim.frame_size // 2,
                               atol=0.51)
    np.testing.assert_allclose(pos[:, 1], (sim.positions_um[:, 0] - frame["origin_um"][0]) / p_um - sim.frame_size // 2,
                               atol=0.51)
    got = object_error(res.object, pos, res.probe, frame, sim)
    from hxn_ptycho.scanfile import read_scan
    exported = read_scan(recon["source"]["scan_file"])
    assert exported.probe_guess is not None           # the trials' probe, on the right side of focus
    ref = reference_error(sim, exported)
    with capsys.disabled():
        print(f"\n[hxn-ptycho] {how} indep {sim.kind}/{sim.detector} signs {sim.eiger_signs} motors "
              f"{sim.motor_order}: derived-run object NRMSE {got:.4f} (stage frame, no rotation); "
              f"correctly prepared frames {ref:.4f}")
    assert got <= 1.5 * ref
    assert got < 0.2              # measured 0.08-0.14 (60 iterations); wrong symmetries 0.24-0.36, the twin 0.35


@pytest.mark.slow
def test_indep_scans_through_the_callback_and_the_zmq_listener(tiled_server, tmp_path, monkeypatch, capsys):
    """Every case through the callback the listener uses (in process), the last one also through
    ``hxn-ptycho listen`` over a real 0MQ proxy: ``success`` derived runs in the stage frame."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from conftest_bluesky import stop_zmq_stack, wait_for

    from hxn_ptycho.callbacks.catalog import free_port, tiled_writer
    from hxn_ptycho.callbacks.launcher import JobQueue
    from hxn_ptycho.callbacks.query import results
    from hxn_ptycho.callbacks.router import CallbackConfig, PtychoCallback

    server = tiled_server
    monkeypatch.setenv("TILED_API_KEY", server.api_key)
    sims = {i: ind.simulate(k, server.directory / f"sim{i}", n_positions=64, frame_size=64, eiger_signs=s,
                            motor_order=o, seed=20 + i) for i, (k, s, o, _e) in enumerate(CASES)}
    writer = tiled_writer(server.uri, "raw", max_array_size=0)
    work = server.directory / "indep_inproc"
    jobs = JobQueue(work / "queue", env={"TILED_API_KEY": server.api_key}).start()
    cb = PtychoCallback(CallbackConfig(work_dir=str(work / "work"), catalog=server.uri,
                                       params={"iterations": ITERATIONS, "probe_modes": 1}, nprocs=1,
                                       export=ExportConfig(crop=64, frame_wait_s=1.0)), jobs)
    try:
        for i in sims:
            def both(name, doc):
                writer(name, doc)
                cb(name, doc)
            ind.emit(sims[i], both)
        assert cb.flush(300)
        assert jobs.wait_idle(600), "the jobs did not finish"
        for i, sim in sims.items():
            uid = sim.documents[0][1]["uid"]
            check_derived(results(server.uri, raw_uid=uid), sim, CASES[i][3], capsys, "in process")
    finally:
        jobs.stop()
        cb.close()

    from bluesky.callbacks.zmq import Publisher
    from test_callbacks_listener import start_listener
    port_in, port_out = free_port(), free_port()
    exe = Path(sys.executable).with_name("bluesky-0MQ-proxy")
    proxy = subprocess.Popen([str(exe), str(port_in), str(port_out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    listener = start_listener(server, port_out, server.directory / "indep_listen", tmp_path / "listen.log",
                              extra=("--iterations", str(ITERATIONS)))
    publisher = None
    try:
        sim = ind.simulate("fermat", server.directory / "sim_listen", n_positions=64, frame_size=64,
                           eiger_signs="ptycho_gui", motor_order="yx", seed=40)
        publisher = Publisher(f"127.0.0.1:{port_in}")
        time.sleep(1.0)
        ind.emit(sim, lambda name, doc: (writer(name, doc), publisher(name, doc)))
        uid = sim.documents[0][1]["uid"]

        def done():
            try:
                return bool(results(server.uri, raw_uid=uid).exit_status)
            except Exception:  # noqa: BLE001 - not there yet
                return False
        wait_for(done, 600, interval=2.0, what="the derived run of the listener")
        check_derived(results(server.uri, raw_uid=uid), sim, "fliplr,x+,y+", capsys, "listen (0MQ)")
    finally:
        stop_zmq_stack(publisher, listener, proxy)
