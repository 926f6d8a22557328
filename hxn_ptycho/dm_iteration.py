"""The Difference Map iteration, an object over a :class:`~hxn_ptycho.engine.Reconstruction`'s parts.

One iteration on the exit waves of the views this process holds (equation numbers of :mod:`dm`):

1. the Fourier step, one pass over the batches: Φ = P·O (2), the transform of the reflected wave
   2Φ − ψ and its data error (7), ψ ← ψ + β·(F⁻¹Π_F(F(2Φ − ψ)) − Φ) (3), (4) (``dm.dm_step``), and
   the sums of the object update (6) from the new ψ in the same pass;
2. the overlap step: the object update (6), then — from iteration ``probe_update_start`` — the
   probe update (5) and the object update again, in turn, at most ``update_rounds`` probe updates,
   ending early once the probe's relative change is below ``overlap_converge`` (the overlap loop
   of Thibault et al., *Ultramicroscopy* 109, 338 (2009), as in PtyPy's DM);
3. the relative changes ε_P, ε_O of (7).

The state is ψ alone, in real space (PtyPy's DM): one forward and one inverse FFT an iteration and
one full-size array — keeping F(ψ) beside it, as this engine did before, gave the model's own
error F(P·O) for free but doubled the memory. The error of an iteration is therefore that of the
reflected wave the projection sees (it tends to the model's as ψ → P·O); the final error of the
model is measured once at the end (``error_pass``). Every sum over views goes
through the reconstruction's reducer, so each rank sees the same probe and ends the overlap loop
at the same round.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import dm
from .backend import ObjectSums

if TYPE_CHECKING:
    from .engine import Reconstruction


class DMIteration:
    """The Difference Map (equations (2)–(7)) over a reconstruction's parts."""

    name = "DM"

    def __init__(self, rec: Reconstruction) -> None:
        self.rec = rec
        self.mean_relax = float("nan")      # mean r of the last Fourier step (dm.relaxation): DM's damping
        self.undamped = float("inf")        # its mean without the floor
        self.nums_zero = False              # the workers' object numerators were left zero by the last update
        self.dens_zero = False              # and their denominators
        self.den_apart = False              # this Fourier pass leaves (6)'s denominator to object_update
        self.object_change: Any = None      # ε_O of the last update against the object before it

    # --- per batch ------------------------------------------------------------------------------
    def _windows(self, w: Any, b: slice) -> tuple[Any, Any]:
        """(corners, object windows) of batch ``b`` for a pass: the windows are gathered here only
        when sub-pixel (bilinear); on the pixel grid the pass reads the object itself."""
        rec, B = self.rec, b.stop - b.start
        pos, sub = rec.geom.pass_positions(b)
        return pos, (rec.geom.gather(rec.be, rec.obj, b, w.objwin[:B], w.tmp[:B]) if sub else None)

    # (2)–(4), (7) then (6): one batch's Fourier pass with its object sums from the new ψ (one sweep
    # on the numba backend)
    def _fourier_batch(self, w: Any, b: slice) -> None:
        rec = self.rec
        psi = rec._load(w, "psi", b)
        pos, windows = self._windows(w, b)
        amp, rows = rec.batch_frames(b)
        obj, probe, mask, pbound, beta, floor = self._pass_args        # (fourier_step's: the same every batch)
        w.err += rec.be.fourier_pass(obj, pos, probe, psi, amp, mask, pbound, beta, floor, w.relax, w, windows,
                                     w.dm_sums, rows)
        rec._store(w, "psi", b, psi)

    # (6) Σ_j,k P_k*·ψ_j^(k,l) and Σ_j,k |P_k|², scattered onto the object
    def _object_sums(self, w: Any, b: slice, psi: Any = None) -> None:
        rec = self.rec
        psi = rec._load(w, "psi", b) if psi is None else psi
        pos, sub = rec.geom.pass_positions(b)
        rec.be.object_pass(psi, rec._probe_conj, rec._probe_intensity, pos, w.obj_num, w.obj_den, w, sub)

    # (5) Σ_j,l O_l*·ψ_j^(k,l) and Σ_j,l |O_l|²
    def _probe_sums(self, w: Any, b: slice) -> None:
        rec = self.rec
        pos, windows = self._windows(w, b)
        rec.be.probe_pass(rec._load(w, "psi", b), rec.obj, pos, w.probe_num, w.probe_den, w, windows)

    # --- the steps ------------------------------------------------------------------------------
    # (2)–(4), (7): the DM update of every exit wave; returns Σ(|F(2·P·O − ψ)| − √I)² / ΣI
    def fourier_step(self) -> float:
        rec = self.rec
        rec._probe_terms()
        # one process, a CPU backend, windows on the pixel grid: the object update forms (6)'s
        # denominator from the probe and the corners, by rows in cache (Backend.object_update den_at)
        self.den_apart = rec.reducer.size == 1 and rec.be.cache_batches and not rec.geom.subpixel
        rec._reset("err", *(() if self.nums_zero else ("obj_num",)),
                   *(() if self.dens_zero or self.den_apart else ("obj_den",)))
        for w in rec._workers:                                      # (6) of the new ψ, each worker's sums
            w.dm_sums = ObjectSums(rec._probe_conj, rec._probe_intensity, w.obj_num,
                                   None if self.den_apart else w.obj_den)
        self.nums_zero = False                                    # the pass adds to them
        self.dens_zero = self.dens_zero and self.den_apart          # (untouched by the pass when apart)
        for w in rec._workers:
            w.relax = dm.RelaxSum()
        # the floor holds while the bound does not damp DM as a whole (mean √(bound/deviation) below
        # it, as at high counts with model errors): then a view far outside the bound is a count
        # level, not a view the model cannot yet fit (a misplaced one), which stays undamped
        # while positions are refined the misfit is the positions' (DM must show it, undamped)
        floor = 0.0 if rec.refining_positions else rec.params.dm_relax_floor
        self.floor_now = floor if self.undamped < floor else 0.0
        self._pass_args = (rec.obj, rec.probe, rec.mask, rec.pbound, rec.params.beta, self.floor_now)
        rec._each(self._fourier_batch)
        self.mean_relax, raw = rec._reduce_relax()
        self.undamped = raw if self.floor_now > 0 else self.mean_relax
        return rec._reduce_err() / max(rec.total_intensity, 1e-300)

    # (6) O_l = (Σ_j,k P_k*·ψ + α·O_l) / (Σ_j,k |P_k|² + α), from the sums already accumulated
    def update_object(self) -> None:
        rec = self.rec
        if rec.reducer.size == 1:           # the backend's update from the workers' sums, shared out by rows
            ws = rec._workers
            den_at = (rec._probe_intensity, rec.geom.corner) if self.den_apart else None
            new, self.object_change = rec.be.object_update([w.obj_num for w in ws],
                                                           None if den_at else [w.obj_den for w in ws],
                                                           rec.obj, rec.params.object_reg, rec.scheduler.split,
                                                           den_at)
            rec.obj = new.astype(rec.cdtype, copy=False)
            self.nums_zero = True
            self.dens_zero = self.dens_zero or den_at is None
            return
        self.object_change = None
        num, den = rec._sum_workers("obj_num", fresh=True), rec._sum_workers("obj_den", fresh=True)
        rec.reducer.allreduce_sum([num, den])
        rec.obj = dm.regularised_ratio(rec.be, num, den, rec.obj, rec.params.object_reg,
                                       consume=True).astype(rec.cdtype, copy=False)

    # (5) P_k = (Σ_j,l O_l*·ψ + α·P_k) / (Σ_j,l |O_l|² + α)
    def update_probe(self) -> None:
        rec = self.rec
        rec._reset("probe_num", "probe_den")
        rec._each(self._probe_sums)
        num, den = rec._sum_workers("probe_num", fresh=True), rec._sum_workers("probe_den", fresh=True)
        rec.reducer.allreduce_sum([num, den])
        rec.probe = dm.regularised_ratio(rec.be, num, den[None], rec.probe, rec.params.probe_reg,
                                         consume=True).astype(rec.cdtype, copy=False)
        rec._probe_terms()

    # (6), then (5) ⇄ (6) until ‖ΔP‖/‖P‖ < overlap_converge (at most update_rounds probe updates)
    def overlap_step(self, it: int) -> int:
        """The object and probe updates of one iteration; returns the number of probe updates."""
        rec, p = self.rec, self.rec.params
        self.update_object()
        if it < p.probe_update_start:
            return 0
        for r in range(1, p.update_rounds + 1):
            before = rec.probe
            self.update_probe()
            if r == p.update_rounds or (p.overlap_converge and
                                        dm.probe_change(rec.be, rec.probe, before) < p.overlap_converge):
                return r
            rec._reset(*(() if self.nums_zero else ("obj_num",)), *(() if self.dens_zero else ("obj_den",)))
            self.nums_zero = self.dens_zero = False
            rec._each(self._object_sums)
            self.update_object()
        return p.update_rounds          # pragma: no cover - the loop returns

    def iterate(self, it: int) -> tuple[float, np.ndarray, np.ndarray]:
        """One DM iteration; returns the data error and ε_P, ε_O of equation (7)."""
        rec = self.rec
        obj_old, probe_old = rec.obj, rec.probe          # the updates make new arrays
        self.object_change = None
        data_err = self.fourier_step()
        rounds = self.overlap_step(it)
        rec.overlap_rounds.append(rounds)
        # ε_O from the update's own sweep where the object was updated once (else measured here)
        eo = (self.object_change if rounds <= 1 and self.object_change is not None
              else dm.relative_change(rec.be, rec.obj, obj_old))
        return data_err, dm.relative_change(rec.be, rec.probe, probe_old), eo
