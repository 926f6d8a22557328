"""How well the engine reconstructs the independent simulator's scans from CORRECTLY prepared frames.

For each kind: simulate (tests/hxn_indep_sim.py), read the raw frames as ptycho_gui does
(tests/test_hxn_indep_sim.py readers), take them from the beamline's [x, y] engine frame to the
stage frame [y, x] (undo the signs in q, transpose), write a scan file with the recorded
positions, run ``hxn-ptycho reconstruct`` (default probe init, and with the true probe as
``probe_guess``), and print the object NRMSE against the truth after the best global complex
factor and integer shift (searched over +-16 px: object and probe may translate together), where
the central halves of at least 6 views' windows overlap.  A third run checks consistency: the true
probe held fixed, no power bound (``--power-bound 0``), on the noise-free frames: DM then fits
the data exactly if the frames, positions and the engine's conventions agree.

    python benchmarks/indep_sim_reconstruct.py [--iterations 150] [--step-fraction 0.38 0.13]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import hxn_indep_sim as sim
import test_hxn_indep_sim as readers


def write_stage_frame_scan(scan: sim.IndepScan, path: Path, probe_guess: bool) -> None:
    frames, pos, ic, energy = readers._read_scan(scan)
    n = scan.frame_size
    cy, cx = scan.notes["crop_centre"]["cy"], scan.notes["crop_centre"]["cx"]
    bad = frames >= np.iinfo(np.uint16).max
    f = frames.astype(float)
    f[bad] = 0
    inten = readers._ptycho_gui_patterns(f, ic, cx, cy, n)  # the tools' engine frame [u, v]
    mq = np.fft.fftshift(np.rot90(bad[0, cy - n // 2:cy + n // 2, cx - n // 2:cx + n // 2], axes=(1, 0)))
    for ax, s in enumerate(scan.notes["engine_signs"]):  # u = s x: undo in q (k -> -k mod n)
        if s < 0:
            inten = np.roll(np.flip(inten, axis=ax + 1), 1, axis=ax + 1)
            mq = np.roll(np.flip(mq, axis=ax), 1, axis=ax)
    with h5py.File(path, "w") as h:
        h["diffamp"] = np.sqrt(np.maximum(inten.transpose(0, 2, 1), 0)).astype(np.float32)
        h["points"] = pos.T.astype(np.float64)
        h["lambda_nm"] = 1.239842 / energy
        h["z_m"] = scan.distance_m
        h["ccd_pixel_um"] = scan.detector_pixel_m * 1e6
        h["mask"] = ~mq.T
        if probe_guess:
            h["probe_guess"] = scan.probe_truth.astype(np.complex64)


def nrmse(scan: sim.IndepScan, result: Path, search: int = 16, min_views: int = 6) -> tuple[float, int, int]:
    with h5py.File(result, "r") as h:
        obj = h["object"][0]
        corners = h["positions_px"][:]
    n = scan.frame_size
    p_um = scan.pixel_m * 1e6
    x0, y0 = scan.origin_um
    cov = np.zeros(obj.shape, int)
    for r, c in corners.astype(int):
        cov[r + n // 4:r + 3 * n // 4, c + n // 4:c + 3 * n // 4] += 1
    rr, cc = np.nonzero(cov >= min_views)
    d0 = int(np.median(np.round((scan.positions_um[:, 1] - y0) / p_um) - corners[:, 0] - n // 2))
    d1 = int(np.median(np.round((scan.positions_um[:, 0] - x0) / p_um) - corners[:, 1] - n // 2))
    truth = scan.object_truth
    a = obj[rr, cc]
    best = (np.inf, 0, 0)
    for dr in range(-search, search + 1):
        for dc in range(-search, search + 1):
            i, j = rr + d0 + dr, cc + d1 + dc
            ok = (i >= 0) & (i < truth.shape[0]) & (j >= 0) & (j < truth.shape[1])
            if ok.mean() < 0.9:
                continue
            b, aa = truth[i[ok], j[ok]], a[ok]
            g = np.vdot(aa, b) / np.vdot(aa, aa)
            e = float(np.linalg.norm(g * aa - b) / np.linalg.norm(b))
            if e < best[0]:
                best = (e, dr, dc)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--step-fraction", type=float, nargs="+", default=[sim.STEP_FRACTION])
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for frac in args.step_fraction:
            for kind in sim.KINDS:
                scan = sim.simulate(kind, Path(tmp) / f"{kind}_{frac}", seed=args.seed, step_fraction=frac)
                row = [kind, f"step/diameter {frac}", f"{len(scan.positions_um)} views"]
                clean = sim.simulate(kind, Path(tmp) / f"{kind}_{frac}_clean", seed=args.seed, step_fraction=frac,
                                     photons=None)
                for guess in (0, 1, 2):
                    path = Path(tmp) / f"scan_{kind}_{frac}_{guess}.h5"
                    write_stage_frame_scan(clean if guess == 2 else scan, path, guess > 0)
                    cmd = ["hxn-ptycho", "reconstruct", str(path), "--iterations", str(args.iterations), "--quiet"]
                    if guess:
                        cmd += ["--probe-init", "file"]
                    if guess == 2:
                        cmd += ["--probe-update-start", str(10**6), "--power-bound", "0"]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                    err = out.split("final data error ")[1].split(",")[0]
                    e, dr, dc = nrmse(scan, path.with_name(path.stem + "_recon.h5"))
                    label = ("default probe init", "true probe init", "noise-free, true probe fixed, no power bound")[guess]
                    row.append(f"{label}: data error {err}, NRMSE {e:.3f} "
                               f"(shift {dr},{dc})")
                print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
