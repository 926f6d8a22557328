# 10-devices.py — the HXN devices: simulated (default) or real (HXN_PTYCHO_SIM=0).
# ruff: noqa: F821  (RE, sd, CATALOG, PROFILE_DIR, ... come from the earlier startup files)
#
# Simulated: the devices of hxn_ptycho.callbacks.sim_beamline, which emit what the beamline's
# emit — eiger1 (step scans, TPX_HDF5), eiger2 + PandA + SIS (fly2dpd, MERLIN_FLY_STREAM_V2 /
# PANDA / SIS_HDF51_FLY_STREAM_V1), merlin1 (FlyPlan2D, TPX_HDF5), zpssx/zpssy, zpsth and dcm_th
# (Si(111)) in the baseline. ptycho_scan(scan_type) runs one of the three scan types on a
# simulated sample: 'step' (default; $HXN_PTYCHO_SIM_SCAN), 'fly2dpd' or 'FlyPlan2D'.
# Real: hxntools' own device classes, PV names from $HXN_PTYCHO_PVS (a YAML file:
# {zpssx: PV, zpssy: PV, zpsth: PV, dcm_th: PV, merlin1: PREFIX, sclr1: PREFIX}); the Eigers and
# the PandA flyer are the facility profile's (NSLS2/hxn-profile-collection 92-eiger2.py,
# 93-scanplan-panda.py) and are used from there.
#
# The detector distance is never fixed here: each scan's export takes it from the run
# (start['scan']['detector_distance'], which fly2dpd records), else a detector-stage value in the
# baseline, else the beamline's standard 2.05 m (ExportConfig.distance_m overrides that default).
import os

SIMULATED = os.environ.get("HXN_PTYCHO_SIM", "1") != "0"
DETECTOR_DISTANCE_M = None          # from each scan (see above); a number here overrides the 2.05 m default

if SIMULATED:
    from hxn_ptycho.callbacks.sim_beamline import make_hxn, plan_for, simulated_scan

    SIM_SCAN_TYPE = os.environ.get("HXN_PTYCHO_SIM_SCAN", "step")
    _sim_points = int(os.environ.get("HXN_PTYCHO_SIM_POINTS", "100"))
    _sim_seed = int(os.environ.get("HXN_PTYCHO_SIM_SEED", "1"))
    sim_sample, _sim_truth = simulated_scan(SIM_SCAN_TYPE, n_positions=_sim_points, seed=_sim_seed)
    sim_scan = sim_sample.scan
    hxn = make_hxn(DETECTOR_DIR)               # a folder the catalog server reads (00-base)
    zpssx, zpssy, zpsth, dcm_th, sclr1 = hxn.zpssx, hxn.zpssy, hxn.zpsth, hxn.dcm_th, hxn.sclr1
    eiger1, eiger2, merlin1 = hxn.eiger1, hxn.eiger2, hxn.merlin1
    _samples = {SIM_SCAN_TYPE: sim_sample}

    def ptycho_scan(scan_type=None, **md):
        """A ptychography scan of the simulated sample: 'step' (eiger1), 'fly2dpd' (eiger2) or 'FlyPlan2D'."""
        kind = scan_type or SIM_SCAN_TYPE
        if kind not in _samples:
            _samples[kind] = simulated_scan(kind, n_positions=_sim_points, seed=_sim_seed)[0]
        sample = _samples[kind]
        dwell = float(os.environ.get("HXN_PTYCHO_SIM_DWELL", "0"))     # seconds at each step-scan point
        if kind == "step" and dwell > 0:
            from hxn_ptycho.callbacks.sim_beamline import step_scan
            return (yield from step_scan(hxn, sample, md={"ptycho_crop": sample.scan.n, **md}, dwell_s=dwell))
        return (yield from plan_for(kind, hxn, sample, md={"ptycho_crop": sample.scan.n, **md}))
else:
    import yaml
    from hxntools.detectors.merlin import HxnMerlinDetector
    from ophyd import EpicsMotor, EpicsScaler

    with open(os.environ["HXN_PTYCHO_PVS"]) as _f:
        _pvs = yaml.safe_load(_f)
    zpssx = EpicsMotor(_pvs["zpssx"], name="zpssx")
    zpssy = EpicsMotor(_pvs["zpssy"], name="zpssy")
    zpsth = EpicsMotor(_pvs["zpsth"], name="zpsth")
    dcm_th = EpicsMotor(_pvs["dcm_th"], name="dcm_th")
    sclr1 = EpicsScaler(_pvs["sclr1"], name="sclr1")
    merlin1 = HxnMerlinDetector(_pvs["merlin1"], name="merlin1")

sd.baseline.extend([dcm_th, zpsth])
