# 10-devices.py — the HXN devices: simulated (default) or real (HXN_PTYCHO_SIM=0).
# ruff: noqa: F821  (RE, sd, CATALOG, PROFILE_DIR, ... come from the earlier startup files)
#
# Simulated: zpssx/zpssy (+ encoders), merlin1 writing AD-style HDF5 frames of a simulated
# sample, dcm_th (Si(111), in the baseline) and sclr1. Real: EPICS devices whose PV names come
# from $HXN_PTYCHO_PVS (a YAML file: {zpssx: PV, zpssy: PV, dcm_th: PV, merlin1: PREFIX, sclr1: PREFIX}).
import os

SIMULATED = os.environ.get("HXN_PTYCHO_SIM", "1") != "0"

if SIMULATED:
    from hxn_ptycho.callbacks.sim_beamline import (
        SimFrames,
        fly_scan,
        make_hxn,
        step_scan,
    )

    from hxn_ptycho.simulate import simulate_scan

    sim_scan, _sim_truth = simulate_scan(n=64, n_positions=int(os.environ.get("HXN_PTYCHO_SIM_POINTS", "100")),
                                         seed=int(os.environ.get("HXN_PTYCHO_SIM_SEED", "1")))
    hxn = make_hxn(SimFrames(sim_scan), PROFILE_DIR / "detector")
    zpssx, zpssy, merlin1, dcm_th, sclr1 = hxn.zpssx, hxn.zpssy, hxn.merlin1, hxn.dcm_th, hxn.sclr1
    DETECTOR_DISTANCE_M = sim_scan.z_m

    def ptycho_scan(points_um=None, fly=False, **md):
        """A ptychography scan of the simulated sample (its own positions by default)."""
        points = sim_scan.points if points_um is None else points_um
        plan = fly_scan if fly else step_scan
        return (yield from plan(hxn, points, distance_m=DETECTOR_DISTANCE_M, md={"ptycho_crop": sim_scan.n, **md}))
else:
    import yaml
    from ophyd import EpicsMotor, EpicsScaler

    with open(os.environ["HXN_PTYCHO_PVS"]) as _f:
        _pvs = yaml.safe_load(_f)
    zpssx = EpicsMotor(_pvs["zpssx"], name="zpssx")
    zpssy = EpicsMotor(_pvs["zpssy"], name="zpssy")
    dcm_th = EpicsMotor(_pvs["dcm_th"], name="dcm_th")
    sclr1 = EpicsScaler(_pvs["sclr1"], name="sclr1")
    # The Merlin/Eiger with its HDF5 file plugin is the facility's own class (hxntools):
    from hxntools.detectors.merlin import HxnMerlinDetector
    merlin1 = HxnMerlinDetector(_pvs["merlin1"], name="merlin1")
    DETECTOR_DISTANCE_M = float(os.environ.get("HXN_PTYCHO_DISTANCE_M", "0.5"))

sd.baseline.append(dcm_th)
