"""Why position refinement contracts the Siemens star: one refinement step at known positions.

    python benchmarks/star_position_bias.py [--iterations 150]

Makes data with known positions — the star reconstructed from the file's positions (object and
probe) is the truth, frames simulated from it at the nominal (whole-pixel) corners with Poisson
noise — then reconstructs them from those exact positions (DM, and DM then ML) and applies one
Gauss-Newton refinement step with every pairing of true/reconstructed object and probe. Prints
the mean radial move of the views (negative: towards the scan's centre), and the scale of the
linear map fitted to the moves. With the true probe the step barely moves the views; with the
reconstructed one they all move inwards — the scan and the object with it then contract.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from hxn_ptycho.datasets import siemens_star
from hxn_ptycho.engine import Reconstruction
from hxn_ptycho.params import ReconParams
from hxn_ptycho.positions import PositionRefiner

STAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "siemens-star-small" / "siemens-star-small.npz.bz2"


def one_step(scan, obj: np.ndarray, probe: np.ndarray, pos: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean radial move (px) and the diagonal of the fitted linear map of one refinement step from
    ``obj``, ``probe`` whose views sit at ``pos`` (window corners of a reconstruction without refinement)."""
    p = ReconParams(iterations=2, refine_positions=True, position_start=0, probe_modes=probe.shape[0])
    rec = Reconstruction(scan, p, log=lambda m: None)
    off = np.round((rec.geom.positions_all - pos).mean(0)).astype(int)
    full = np.ones(rec.obj_shape, rec.cdtype)
    full[:, off[0]:off[0] + obj.shape[1], off[1]:off[1] + obj.shape[2]] = obj
    rec.obj, rec.probe = rec.be.asarray(full), rec.be.asarray(probe.astype(rec.cdtype))
    ref = PositionRefiner(rec)
    ref.count = 75                       # the end of the coarse-to-fine schedule (no smoothing)
    before = rec.geom.positions_all.copy()
    ref.refine()
    d = rec.geom.positions_all - before
    d -= d.mean(0)
    x = before - before.mean(0)
    radial = np.sum(d * x, axis=1) / np.maximum(np.hypot(*x.T), 1e-9)
    lin, *_ = np.linalg.lstsq(x, d, rcond=None)
    return float(radial.mean()), 1 + np.diag(lin.T)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--star", type=Path, default=STAR)
    args = ap.parse_args()
    scan = siemens_star(args.star)
    truth = Reconstruction(scan, ReconParams(iterations=args.iterations), log=lambda m: None).run()
    obj, probe, pos = truth.object, truth.probe, truth.positions_px.astype(int)
    n = probe.shape[-1]
    rng = np.random.default_rng(5)
    amps = np.empty(scan.diffamp.shape, np.float32)
    for j, (r, c) in enumerate(pos):
        inten = np.sum(np.abs(np.fft.fft2(probe * obj[0, r:r + n, c:c + n], norm="ortho")) ** 2, axis=0)
        amps[j] = np.sqrt(rng.poisson(inten))
    syn = dataclasses.replace(scan, diffamp=amps)
    print(f"data from the star reconstruction ({args.iterations} DM iterations) at known positions")
    print("object          probe           mean radial move (px)  fitted scale (rows, cols)")
    chains = (f"DM:{args.iterations}", f"DM:{args.iterations * 2 // 3},ML:{args.iterations // 3}")
    for chain in chains:
        rec = Reconstruction(syn, ReconParams(algorithm=chain), log=lambda m: None).run()
        assert np.array_equal(rec.positions_px, truth.positions_px)
        overlap = abs(np.vdot(truth.probe, rec.probe)) / np.linalg.norm(truth.probe) / np.linalg.norm(rec.probe)
        for oname, o in (("true", obj), (chain, rec.object)):
            for pname, pr in (("true", probe), (chain, rec.probe)):
                if oname == pname == "true" and chain != chains[0]:
                    continue
                radial, scale = one_step(syn, o, pr, pos)
                print(f"{oname:<15} {pname:<15} {radial:+.3f}                 {scale[0]:.4f} {scale[1]:.4f}", flush=True)
        print(f"  ({chain}: probe overlap with the true one {overlap:.4f}, cost {rec.attrs['final_cost']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
