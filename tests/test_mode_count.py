"""``probe_modes=auto`` with ``auto_rule='heldout'`` (hxn_ptycho/mode_count.py; issue 18, part 2).

The rule's grid and held-out families are in docs/auto_modes.md ("Session 27") and the README; here: the
count and its evidence end to end on a cheap schedule, the job's path, the refusals, and (slow) the rule of
record on the issue's own mixture and a check cell.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from mode_mixtures import mixture_scan, spectrum

from hxn_ptycho import mode_count
from hxn_ptycho.engine import Reconstruction, reconstruct
from hxn_ptycho.params import ParamError, ReconParams

QUIET = {"log": lambda m: None}
HELD = {"probe_modes": "auto", "auto_rule": "heldout", "detector_gain": 1.0, "threads": 1}
#: a cheaper schedule than the rule of record (M = 4, shorter fits, two starts): right on 64² frames
CHEAP = mode_count.HeldOutCount(fit_modes=4, schedule="DM:20,ML:200", screen="DM:10,ML:30", starts=(1.0, -1.0),
                                refit=50)


def test_the_held_out_count_keeps_a_true_second_mode_and_stops_at_it(monkeypatch):
    """A 70/30 two-mode fly mixture at 10⁶ photons: the step 1 → 2 is kept (z > 2) and the step 2 → 3 is
    not (z ≤ 2), through ``engine.reconstruct``, which then runs with the count found and stores the
    evidence. A chain that kept every mode (4), or none (1), or a result that ignored the count, fails."""
    monkeypatch.setattr(mode_count, "RULE", CHEAP)
    scan, _ = mixture_scan("fly", np.array([0.7, 0.3]), 1e6, seed=1)
    raw = scan.diffamp.copy()
    res = reconstruct(scan, ReconParams(iterations=10, **HELD), **QUIET)
    ev = res.attrs["probe_modes_auto"]
    assert ev["rule"] == "heldout" and ev["found"] == 2 == res.probe.shape[0], ev
    z = [c.get("z") for c in ev["chain"]]
    assert z[1] > 2 >= z[2], z
    assert [c["modes"] for c in ev["chain"]] == [1, 2, 3, 4] and ev["fit_modes"] == 4 and ev["at_cap"] is False
    # each refit's held-out error, and the start choice's evidence
    assert ev["chain"][1]["held_out_error"] < ev["chain"][0]["held_out_error"]
    assert {s["factor"] for s in ev["starts"]} == {1.0, -1.0} and ev["start_chosen"] in (1.0, -1.0)
    assert abs(sum(ev["fit_shares"]) - 1) < 1e-3 and len(ev["fit_shares"]) == 4
    np.testing.assert_array_equal(scan.diffamp, raw)          # the raw frames are never modified
    # the reconstruction starts from the count's 2-mode model: below what the engine's own start reaches
    # in the same iterations, and nearer the true 70/30 split
    fixed = reconstruct(scan, ReconParams(iterations=10, probe_modes=2, detector_gain=1.0, threads=1), **QUIET)
    err, err_fixed = res.attrs["final_data_error"], fixed.attrs["final_data_error"]
    assert err < 0.9 * err_fixed, (err, err_fixed)
    share, share_fixed = float(res.probe_power_fraction[1]), float(fixed.probe_power_fraction[1])
    assert abs(share - 0.3) < abs(share_fixed - 0.3), (share, share_fixed, err, err_fixed)
    json.dumps(ev)                                             # stored as JSON in the result and the derived run


def test_held_out_pixels_are_what_no_fit_sees():
    """The kept-only copy carries no held-out count (each replaced by its pixel's mean over the frames
    that keep it), and the split is the same every time (its seed)."""
    scan, _ = mixture_scan("gsm", spectrum(2, 0.3), 1e6, seed=1, n_positions=20)
    kept, keep = mode_count.holdout_split(scan, 0.15)
    kept2, keep2 = mode_count.holdout_split(scan, 0.15)
    np.testing.assert_array_equal(keep, keep2)
    assert 0.13 < 1 - keep.mean() < 0.17
    np.testing.assert_array_equal(kept.diffamp[keep], scan.diffamp[keep])
    fill = (scan.diffamp * keep).sum(axis=0) / keep.sum(axis=0)
    v, i, j = np.nonzero(~keep)
    np.testing.assert_allclose(kept.diffamp[v, i, j], fill[i, j], rtol=1e-6)


def test_chain_and_start_choice_read_their_significance_level():
    rng = np.random.default_rng(0)
    strong, none = 5 + rng.normal(0, 1, 80), rng.normal(0, 1, 80)
    assert mode_count.chain_count([strong, strong, none, strong])[0] == 3     # the first step not above z
    assert mode_count.chain_count([strong, strong])[0] == 3                    # every step kept: M
    assert mode_count.chain_count([none, strong])[0] == 1
    base = 100 + rng.normal(0, 1, 80)
    def off(x: float) -> np.ndarray:
        return base + x + rng.normal(0, 1, 80)
    assert mode_count.choose_start({1.0: base, -1.0: off(1)})[0] == 1.0         # worse: the default stays
    assert mode_count.choose_start({1.0: base, -1.0: off(-0.05)})[0] == 1.0     # no better beyond noise
    chosen, zs = mode_count.choose_start({1.0: base, -1.0: off(-3), 0.5: off(-1)})
    assert chosen == -1.0 and zs[-1.0] > zs[0.5] > 2 and zs[1.0] == 0    # the lowest of those beyond z


def test_the_held_out_count_is_refused_where_the_whole_scan_is_not_at_hand():
    """A reconstruction fed views (a live session) cannot run it, nor engine.reconstruct on one rank's views;
    the rule is a declared choice of auto_rule, and a bad held-out schedule is refused by name."""
    scan, _ = mixture_scan("gsm", spectrum(1, 1.0), 1e6, seed=1, n_positions=12)
    with pytest.raises(ParamError, match="heldout"):
        Reconstruction(scan, ReconParams(iterations=2, **HELD), **QUIET)

    class TwoRanks:
        size, rank = 2, 0
    with pytest.raises(ParamError, match="whole scan"):
        reconstruct(scan, ReconParams(iterations=2, **HELD), reducer=TwoRanks(), **QUIET)
    from hxn_ptycho.distributed import LocalComm
    from hxn_ptycho.live import follow_distributed
    with pytest.raises(ParamError, match="cannot follow a growing scan"):     # refused before any wait
        follow_distributed("/nonexistent/scan.h5", ReconParams(iterations=2, **HELD), LocalComm())
    with pytest.raises(ParamError, match="auto_rule"):
        ReconParams(auto_rule="held-out")
    with pytest.raises(ParamError, match="default start"):
        mode_count.HeldOutCount(starts=(0.5, -1.0))
    with pytest.raises(ParamError, match="held-out share"):
        mode_count.HeldOutCount(holdout=1.0)
    with pytest.raises(ParamError, match="max_views 2"):
        mode_count.HeldOutCount(max_views=2)
    with pytest.raises(ParamError, match="at least 1 worker, got 0"):
        mode_count.HeldOutCount(workers=0)
    with pytest.raises(ParamError, match="holds 5 of its 12 views"):           # a rank's share is not the scan
        mode_count.count_and_model(replace(scan, diffamp=scan.diffamp[:5], views=slice(0, 5)),
                                   ReconParams(**HELD), CHEAP, log_fn=lambda m: None)


def test_the_job_counts_on_rank_0_and_writes_the_evidence_to_the_result(tmp_path, monkeypatch):
    """The offline job (``run_distributed``): the count of the whole scan file, the reconstruction with it,
    the evidence in the result file. A count that fails fails the job with its reason."""
    from hxn_ptycho.distributed import LocalComm, count_on_rank0, run_distributed
    from hxn_ptycho.errors import HxnPtychoError
    from hxn_ptycho.resultfile import read_result, write_result
    from hxn_ptycho.scanfile import write_scan
    # the plumbing only (the count itself: the test above): a token schedule on a small scan
    monkeypatch.setattr(mode_count, "RULE", mode_count.HeldOutCount(
        fit_modes=3, schedule="DM:4,ML:6", screen="DM:2,ML:2", starts=(1.0,), refit=4, max_views=20))
    scan, _ = mixture_scan("fly", np.array([0.7, 0.3]), 1e6, seed=1, n=32, n_positions=30)
    write_scan(tmp_path / "scan.h5", scan)
    # positions refined after it: the job's canvas is larger than the count's, which saw 20 of the 30 views
    res, _ = run_distributed(str(tmp_path / "scan.h5"), ReconParams(iterations=3, refine_positions=True,
                                                                    position_start=1, **HELD), LocalComm(), **QUIET)
    ev = res.attrs["probe_modes_auto"]
    assert ev["rule"] == "heldout" and ev["found"] == res.probe.shape[0] and ev["fit_modes"] == 3
    assert (ev["views_counted"], ev["views_total"]) == (20, 30)
    part = mode_count.read_for_count(str(tmp_path / "scan.h5"))    # rank 0 reads the counted frames only
    views = mode_count.central_views(scan.points, 20)
    assert part.attrs["views_total"] == 30 and part.n_views == len(part.diffamp) == 20
    np.testing.assert_array_equal(part.diffamp, scan.diffamp[views].astype(np.float32))
    np.testing.assert_array_equal(part.points, scan.points[:, views])
    import h5py

    from hxn_ptycho.h5util import FileFormatError
    for name, data in (("no_points.h5", None), ("flat_points.h5", np.zeros(30))):
        with h5py.File(tmp_path / name, "w") as f:                  # bad files: refused by name, nothing counted
            f["diffamp"] = np.ones((30, 8, 8), np.float32)
            if data is not None:
                f["points"] = data
        with pytest.raises(FileFormatError, match="missing field 'points'" if data is None else r"'points' has shape"):
            mode_count.read_for_count(str(tmp_path / name))
    assert len(ev["chain"]) == 3 and ev["starts"][0]["factor"] == 1.0
    write_result(tmp_path / "r.h5", res)
    back = read_result(tmp_path / "r.h5").attrs["probe_modes_auto"]
    assert (json.loads(back) if isinstance(back, str) else back) == json.loads(json.dumps(ev))

    def broken(*a, **k):
        raise RuntimeError("no count today")
    monkeypatch.setattr(mode_count, "count_and_model", broken)
    with pytest.raises(RuntimeError, match="no count today"):           # rank 0: raised as it was
        run_distributed(str(tmp_path / "scan.h5"), ReconParams(iterations=5, **HELD), LocalComm(), **QUIET)

    class OtherRank:                    # another rank hears rank 0's failure in the broadcast, never waits
        rank, size = 1, 2

        def bcast_idle(self, obj):
            return ("error", "RuntimeError: no count today")
    with pytest.raises(HxnPtychoError, match="failed on rank 0: RuntimeError: no count today"):
        count_on_rank0(str(tmp_path / "scan.h5"), ReconParams(iterations=5, **HELD), OtherRank())


@pytest.mark.slow
@pytest.mark.parametrize("shares,K", [((0.68, 0.24, 0.08), 3), ((1.0,), 1)], ids=["issue-68-24-8", "one-mode"])
def test_the_rule_of_record_counts_the_issues_fly_mixture(shares, K):
    """Issue 18's fly-scan-like mixture (64² frames, a raster, 10⁶ photons, 68/24/8 %), which ``trend``
    counts as 5 (its strict xfail in test_auto_modes.py), and the one-mode fly scan: the held-out count
    with the rule of record (docs/auto_modes.md: z of the steps 24.7, 19.6, 0.6 on the first) — ~90 s each."""
    scan, _ = mixture_scan("fly", np.array(shares), 1e6, seed=1)
    res = reconstruct(scan, ReconParams(iterations=20, **HELD), **QUIET)
    ev = res.attrs["probe_modes_auto"]
    assert ev["found"] == K == res.probe.shape[0], [c.get("z") for c in ev["chain"]]


def test_the_final_line_and_the_startup_tell_the_count_apart_from_the_reconstruction():
    """The job's last line names the count's seconds beside the reconstruction's, and the first iteration
    (for the startup figure) is dated before neither: a trend evidence, stored or as JSON, counts 0 s."""
    from hxn_ptycho.job import count_seconds, final_line
    heldout = {"rule": "heldout", "found": 2, "seconds": 82.04}
    facts = {"final_data_error": 0.00114, "final_cost": 0.28, "elapsed_s": 1.8, "iterations_done": 50, "ranks": 1,
             "probe_modes_auto": heldout}
    line = final_line({"status": "success", "measured": facts, "result_file": "r.h5"})
    assert "time 1.8 s after 82.0 s counting 2 probe mode(s) (50 iterations" in line, line
    assert count_seconds({"probe_modes_auto": json.dumps(heldout)}) == 82.04
    assert count_seconds({"probe_modes_auto": {"rule": "trend", "found": 3, "decisions": []}}) == 0.0
    assert count_seconds({}) == 0.0
    assert "counting" not in final_line({"status": "success", "measured": {**facts, "probe_modes_auto": None}})


def test_a_stop_request_ends_the_count_with_its_own_error_and_no_result(monkeypatch):
    """Ctrl-C (the engine's ``stop``) during the count: the fit under way stops at its next iteration and the
    count ends with CountInterrupted (exit status 130), not after minutes of fits, and nothing is
    reconstructed."""
    import threading
    scan, _ = mixture_scan("fly", np.array([0.7, 0.3]), 1e6, seed=1, n=32, n_positions=30)
    calls = []

    def stop() -> bool:                 # asked once an iteration: true from the 5th on (the first screen)
        calls.append(1)
        return len(calls) >= 5
    monkeypatch.setattr(mode_count, "RULE", replace(mode_count.RULE, workers=1))
    with pytest.raises(mode_count.CountInterrupted, match="stopped") as info:
        reconstruct(scan, ReconParams(iterations=3, **HELD), stop=stop, **QUIET)
    assert info.value.exit_status == 130 and len(calls) == 5
    # two fits at a time: each one under way stops at its next iteration, the others do not start
    calls.clear()
    monkeypatch.setattr(mode_count, "RULE", replace(mode_count.RULE, workers=2))
    with pytest.raises(mode_count.CountInterrupted, match="stopped"):
        reconstruct(scan, ReconParams(iterations=3, **HELD), stop=stop, **QUIET)
    assert 5 <= len(calls) <= 5 + 1 + len(mode_count.RULE.starts), len(calls)
    done = threading.Event()
    done.set()
    with pytest.raises(mode_count.CountInterrupted):
        mode_count.count_and_model(scan, ReconParams(**HELD), CHEAP, log_fn=lambda m: None, stop=done)


def test_a_count_at_the_fits_modes_is_said_to_be_a_lower_bound():
    """Where every step of the over-complete fit keeps a held-out gain (here a fit of 2 modes on a 70/30
    mixture; on the real Siemens star, 6 of 6), the count is the fit's size, not a count: the evidence, the
    count's log and the job's last line say so."""
    from hxn_ptycho.job import final_line
    scan, _ = mixture_scan("fly", np.array([0.7, 0.3]), 1e6, seed=1, n=32, n_positions=60)   # step 1 → 2: z 16
    said: list[str] = []
    ev, model = mode_count.count_and_model(scan, ReconParams(**HELD), replace(CHEAP, fit_modes=2, workers=2),
                                           log_fn=said.append)
    assert ev["found"] == 2 == ev["fit_modes"] and ev["at_cap"] is True, ev
    assert any("so 2 is a lower bound" in line for line in said), said
    assert model.probe.shape[0] == 2
    done = {"status": "success", "result_file": "r.h5", "measured": {"probe_modes_auto": ev}}
    assert "counting at least 2 probe mode(s)" in final_line(done)
    assert "counting 2 probe mode(s)" in final_line({**done, "measured": {"probe_modes_auto": {**ev, "at_cap": False}}})
    # the fits two at a time (threads) are the fits one at a time, bit for bit: the same count and model
    ev1, model1 = mode_count.count_and_model(scan, ReconParams(**HELD), replace(CHEAP, fit_modes=2, workers=1),
                                             log_fn=lambda m: None)

    def facts(e: dict) -> str:
        return json.dumps({k: v for k, v in e.items() if k not in ("seconds", "workers", "starts")}, sort_keys=True)
    assert facts(ev1) == facts(ev) and ev1["workers"] == 1 and ev["workers"] == 2
    assert [s["held_out_error"] for s in ev1["starts"]] == [s["held_out_error"] for s in ev["starts"]]
    np.testing.assert_array_equal(model1.object, model.object)
    np.testing.assert_array_equal(model1.probe, model.probe)


def test_the_summary_figure_says_how_the_count_was_found():
    from hxn_ptycho.plots import count_note
    ev = {"rule": "heldout", "found": 2, "z_min": 2.0, "chain": [{"modes": 1}, {"modes": 2, "z": 24.28},
                                                                   {"modes": 3, "z": -0.16}, {"modes": 4, "z": 6.8}]}
    assert count_note({"probe_modes_auto": ev}) == " (counted on held-out pixels, steps' z 24.3, -0.2 against 2)"
    assert count_note({"probe_modes_auto": json.dumps(ev)}) == count_note({"probe_modes_auto": ev})
    assert count_note({"probe_modes_auto": {"rule": "trend", "found": 2}}) == count_note({}) == ""
    capped = {**ev, "found": 4, "fit_modes": 4, "at_cap": True}
    assert count_note({"probe_modes_auto": capped}).endswith("6.8 against 2; every step of the 4-mode fit kept: "
                                                              "a lower bound)")


def test_a_model_from_part_of_the_scan_is_laid_on_the_whole_scans_canvas():
    """The count's model lives on its own canvas (part of the scan's views, no room for position refinement);
    the engine lays it on its own canvas by their origins: every view's window of the whole canvas holds what
    that view's window of the count's canvas held. Without the origins' difference (laid at the corner) the
    windows do not match."""
    from hxn_ptycho.initial import initial_object, lay_object
    scan, _ = mixture_scan("gsm", spectrum(1, 1.0), 1e6, seed=3, n=32, n_positions=60)
    views = mode_count.central_views(scan.points, 25)
    assert len(views) == 25 and np.all(np.diff(views) > 0)
    d = np.hypot(*(scan.points - ((scan.points.min(1) + scan.points.max(1)) / 2)[:, None]))
    assert d[views].max() <= np.delete(d, views).min()                    # the 25 nearest the centre
    assert mode_count.central_views(scan.points, 60) is None
    part = Reconstruction(mode_count.views_of(scan, views), ReconParams(iterations=1, threads=1), **QUIET)
    whole = Reconstruction(scan, ReconParams(iterations=1, threads=1, refine_positions=True), **QUIET)
    assert whole.margin > part.margin
    rng = np.random.default_rng(0)
    obj = rng.normal(size=part.obj_shape) + 1j * rng.normal(size=part.obj_shape)
    model = mode_count.CountedModel(obj, np.ones((1, 32, 32)), origin=part.canvas_origin())
    fill = initial_object(whole.obj_shape, whole.params)
    laid = initial_object(whole.obj_shape, whole.params, model, whole.canvas_origin())
    assert laid.shape == whole.obj_shape

    def windows(o: np.ndarray, corners: np.ndarray) -> np.ndarray:
        return np.array([o[0, r:r + 32, c:c + 32] for r, c in np.round(corners).astype(int)])
    same = [np.array_equal(a, b) for a, b in zip(windows(obj, part.positions_all),
                                                 windows(laid, whole.positions_all[views]))]
    assert np.mean(same) > 0.9, np.mean(same)               # a view may round one pixel the other way
    corner = lay_object(obj, whole.canvas_origin(), whole.canvas_origin(), fill)
    assert not any(np.array_equal(a, b) for a, b in zip(windows(obj, part.positions_all),
                                                        windows(corner, whole.positions_all[views])))
    np.testing.assert_array_equal(laid[:, 0, 0], fill[:, 0, 0])            # the whole canvas's own start beyond
    part.close()
    whole.close()


def test_a_large_scan_is_counted_on_its_central_views_and_positions_may_be_refined_after(monkeypatch):
    """A scan of more views than the rule was measured on (100; here a cheap rule of 45) is counted on the
    views nearest its centre, says so in its evidence, and the reconstruction of the whole scan — with its
    positions refined, on a larger canvas than the count's — starts from the count's model laid on its
    canvas: below the engine's own start after the same iterations. (Before, a refined reconstruction
    refused the count's model: 'object shape … differs'.)"""
    monkeypatch.setattr(mode_count, "RULE", replace(CHEAP, max_views=45))
    scan, _ = mixture_scan("fly", np.array([0.7, 0.3]), 1e6, seed=2, n_positions=90)
    refine = {"refine_positions": True, "position_start": 5}
    res = reconstruct(scan, ReconParams(iterations=10, **HELD, **refine), **QUIET)
    ev = res.attrs["probe_modes_auto"]
    assert (ev["views_counted"], ev["views_total"], ev["found"]) == (45, 90, 2), ev
    assert res.object.shape[1:] == Reconstruction(scan, ReconParams(iterations=1, threads=1, **refine),
                                                   **QUIET).obj_shape[1:]
    fixed = reconstruct(scan, ReconParams(iterations=10, probe_modes=2, detector_gain=1.0, threads=1, **refine),
                        **QUIET)
    assert res.attrs["final_data_error"] < 0.9 * fixed.attrs["final_data_error"], \
        (res.attrs["final_data_error"], fixed.attrs["final_data_error"])
