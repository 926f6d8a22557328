"""The summary figure, checked through its matplotlib objects (not pixels): physical scale bars,
one labelled probe panel with a colour bar per mode, every object mode, labelled convergence
curves with the probe-mode changes marked, a legend beside (not over) the curves, the scan named
and the quality number (the final data error ε_D) in the title."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hxn_ptycho.plots import mode_changes, object_pixel_size_m, quality, scale_bar_length, summary_figure, summary_png
from hxn_ptycho.resultfile import ResultData

ITERS = 30


def _result(K: int = 3, L: int = 2, pixel_size_m: float | None = 10e-9, scan_id: int = 42) -> ResultData:
    rng = np.random.default_rng(1)
    n, H, W = 32, 96, 100
    probe = (rng.random((K, n, n)) + 1j * rng.random((K, n, n))).astype(np.complex64)
    frac = np.array([0.8, 0.15, 0.05, 0.03, 0.02][:K])
    frac = frac / frac.sum()
    err = np.geomspace(0.1, 0.003, ITERS)
    ep = np.tile(np.geomspace(0.05, 0.001, ITERS)[:, None], (1, K))
    ep[:10, K - 1] = np.nan                                     # the last mode came at iteration 10
    attrs = {"scan_scan_id": scan_id, "probe_modes_log": json.dumps([
        f"iteration 9: the newest of {K - 1} modes carries 5.00 % >= 1 %: adding mode {K}",
        f"iteration 19: the newest of {K} modes carries 1.50 % >= 1 %: keeping {K} mode(s), the ceiling"])}
    if pixel_size_m:
        attrs["pixel_size_m"] = pixel_size_m
    return ResultData(object=(rng.random((L, H, W)) * np.exp(1j * rng.random((L, H, W)))).astype(np.complex64),
                      probe=probe, positions_px=np.array([[0.0, 0.0], [30.0, 34.0], [64.0, 68.0]]),
                      error_data=err, error_probe=ep, error_object=np.tile(err[:, None], (1, L)) * 2,
                      probe_power_fraction=frac, params={"iterations": ITERS}, attrs=attrs)


def _titled(fig, pattern: str) -> list:
    return [ax for ax in fig.axes if re.search(pattern, ax.get_title())]


def _scale_bars(ax) -> list:
    return [a for a in ax.artists if a.get_gid() == "scale bar"]


def test_probe_panels_one_per_mode_with_colour_bars_and_power():
    res = _result(K=3)
    fig = summary_figure(res)
    amp = _titled(fig, r"^probe mode \d+: [\d.]+ % of the power$")
    assert len(amp) == 3
    for k, ax in enumerate(amp):
        share = float(re.search(r"([\d.]+) %", ax.get_title()).group(1))
        assert share == pytest.approx(100 * res.probe_power_fraction[k], abs=0.05)
        assert ax.images and ax.images[0].colorbar is not None
        assert ax.images[0].colorbar.ax.get_ylabel() == "amplitude |P|"
    phase = _titled(fig, r"^probe mode \d+: phase$")
    assert len(phase) == 3 and all(ax.images[0].colorbar.ax.get_ylabel() == "phase (rad)" for ax in phase)
    assert len(_titled(summary_figure(_result(K=5)), r"^probe mode \d+: [\d.]+ % of the power$")) == 5


def test_every_object_mode_with_a_physical_scale_bar():
    res = _result(L=2, pixel_size_m=10e-9)
    fig = summary_figure(res)
    for m in range(2):
        for part in ("phase", "amplitude"):
            (ax,) = _titled(fig, rf"^object mode {m}: {part}$")
            assert ax.images[0].colorbar is not None
            (bar,) = _scale_bars(ax)
            text = bar.txt_label.get_text()
            value, unit = re.fullmatch(r"([\d.]+) (nm|µm)", text).groups()
            length_m = float(value) * (1e-9 if unit == "nm" else 1e-6)
            drawn_px = bar.size_bar.get_children()[0].get_width()
            assert drawn_px * 10e-9 == pytest.approx(length_m)            # the bar is as long as it says
            width_px = ax.images[0].get_array().shape[1]
            assert 0.1 < drawn_px / width_px < 0.4
    assert len(_titled(summary_figure(_result(L=1)), r"^object: phase$")) == 1


def test_scale_from_geometry_and_unknown_pixel_size():
    res = _result(pixel_size_m=None)
    res.attrs.update(lambda_nm=0.1, z_m=0.5, ccd_pixel_um=55.0)          # λ·z/(n·Δ) with n = 32
    assert object_pixel_size_m(res) == pytest.approx(0.1e-9 * 0.5 / (32 * 55e-6))
    bare = _result(pixel_size_m=None)
    assert object_pixel_size_m(bare) is None
    fig = summary_figure(bare)
    (ax,) = _titled(fig, r"^object mode 0: phase$")
    assert ax.get_xlabel() == "x (pixels)" and not _scale_bars(ax)
    assert "object pixel size unknown" in fig._suptitle.get_text()
    assert scale_bar_length(1.2e-6) == (pytest.approx(2e-7), "200 nm")
    assert scale_bar_length(60e-6) == (pytest.approx(1e-5), "10 µm")


def test_convergence_curves_labelled_mode_changes_marked_legend_beside():
    res = _result(K=3, L=2)
    fig = summary_figure(res)
    (ax,) = _titled(fig, r"^convergence")
    assert ax.get_xlabel() == "iteration" and ax.get_yscale() == "log"
    leg = ax.get_legend()
    labels = [t.get_text() for t in leg.get_texts()]
    assert labels[0].startswith("ε_D data error")
    assert [f"ε_P probe mode {k}" for k in range(3)] == labels[1:4]
    assert [f"ε_O object mode {m}" for m in range(2)] == labels[4:6]
    assert "probe-mode change" in labels
    final = res.final_data_error                       # the model's own error, the reported number, marked
    assert final is not None and f"final ε_D of the model {final:.3g}" in labels
    changes = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert [float(line.get_xdata()[0]) for line in changes] == [10.0]     # the 'keeping' line is no change
    assert any("+1 → 3 modes" in t.get_text() for t in ax.texts)
    assert any("ε_P k, ε_O l: relative change" in t.get_text().replace("\n", " ") for t in ax.texts)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert leg.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1   # not over the curves


def test_title_names_scan_and_quality_number(tmp_path):
    res = _result(scan_id=42)
    assert quality(res) == pytest.approx(res.error_data[-1])
    fig = summary_figure(res)
    title = fig._suptitle.get_text()
    assert title.startswith("scan 42 — ")
    assert f"final data error ε_D = {res.error_data[-1]:.4g}" in title
    assert "object pixel 10 nm" in title
    out = tmp_path / "sub" / "summary.png"
    summary_png(res, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("sub/*.part*"))


def test_mode_changes_parse_the_engine_log():
    log = ["iteration 9: the newest of 2 modes carries 7.78 % >= 1 %: adding mode 3",
           "iteration 19: the newest of 3 modes carries 0.50 % < 1 %: keeping 2 mode(s)",
           "iteration 40: the newest of 2 modes carries 2.00 % >= 1 %: adding mode 3"]
    assert mode_changes(log, 40) == [(10, "+1 → 3 modes"), (20, "−1 → 2 mode(s)"), (40, "+1 → 3 modes")]
    assert mode_changes(json.dumps(log), 40) == mode_changes(log, 40)


def test_results_figure_uses_recon_geometry():
    """``results --png`` draws a derived run: its pixel size and mode log come from ``recon``."""
    from hxn_ptycho.callbacks.query import DerivedResult, as_result_data

    r = _result(pixel_size_m=None)
    d = DerivedResult(uid="0123456789", raw_uid="raw", scan_id=42, exit_status="success", reason=None,
                      recon={"params": {"iterations": ITERS}, "geometry": {"pixel_size_m": 12e-9},
                             "probe_modes_log": json.loads(r.attrs["probe_modes_log"])},
                      object=r.object, probe=r.probe, positions_px=r.positions_px,
                      probe_power_fraction=r.probe_power_fraction, final_data_error=float(r.error_data[-1]),
                      data_error=r.error_data, probe_error=r.error_probe, object_error=r.error_object)
    data = as_result_data(d)
    assert object_pixel_size_m(data) == pytest.approx(12e-9)
    assert mode_changes(data.attrs["probe_modes_log"], ITERS)[0][0] == 10



def test_results_figure_axes_from_the_derived_runs_frame():
    """``results --png`` and the demo draw a derived run: the stage frame the start document
    carries (``start['frame']``) puts the object panels in µm of x and y, as the job's own figure."""
    from hxn_ptycho.callbacks.query import DerivedResult, as_result_data

    r = _result(pixel_size_m=None)
    frame = {"rows": "+y", "cols": "+x", "origin_um": [3.0, -2.0], "pixel_um": 0.012}
    d = DerivedResult(uid="0123456789", raw_uid="raw", scan_id=42, exit_status="success", reason=None,
                      recon={"params": {"iterations": ITERS}, "geometry": {"pixel_size_m": 12e-9}},
                      start={"frame": frame},
                      object=r.object, probe=r.probe, positions_px=r.positions_px,
                      probe_power_fraction=r.probe_power_fraction, final_data_error=float(r.error_data[-1]),
                      data_error=r.error_data, probe_error=r.error_probe, object_error=r.error_object)
    ax = summary_figure(as_result_data(d)).axes[0]
    assert ax.get_xlabel() == "x (µm)" and ax.get_ylabel() == "y (µm)"
    x0, x1, _, _ = ax.images[0].get_extent()
    assert 3.0 - 0.012 < x0 < x1

def test_mode_changes_from_curves_without_a_log():
    """A derived run has no mode log; the ε_P curve of an added mode starts after its addition."""
    res = _result(K=3)
    del res.attrs["probe_modes_log"]
    fig = summary_figure(res)
    (ax,) = _titled(fig, r"^convergence")
    changes = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert [float(line.get_xdata()[0]) for line in changes] == [10.0]


def test_title_block_stage_switch_truth_and_no_plunge():
    """The title block names detector, energy, distance, views and the algorithm chain; a DM → ML
    switch is marked; ε of an iteration without an update is not drawn (no plunge to the axis); the
    known truth is drawn beside the result; the probe's amplitude and phase share one row."""
    res = _result(K=1, L=1)
    res.error_probe[:, 0] = np.geomspace(0.05, 0.001, ITERS)
    res.error_probe[:2] = 0.0                           # no probe update in the first two iterations
    res.attrs["algorithm_stages"] = ["DM:20", "ML:10"]
    facts = {"detector": "eiger2", "energy_kev": 12.0, "z_m": 2.05}
    fig = summary_figure(res, facts=facts, truth=res.object[0])
    title = fig._suptitle.get_text()
    assert "DM:20 → ML:10" in title and "detector eiger2" in title and "energy 12 keV" in title
    assert "distance 2.05 m" in title and f"{res.positions_px.shape[0]} views" in title
    (conv,) = _titled(fig, "convergence")
    switches = [ln for ln in conv.get_lines() if ln.get_label() == "algorithm switch"]
    assert len(switches) == 1 and switches[0].get_xdata()[0] == 20.5
    probe_line = [ln for ln in conv.get_lines() if ln.get_label() == "ε_P probe mode 0"][0]
    assert np.isnan(probe_line.get_ydata()[:2]).all() and np.isfinite(probe_line.get_ydata()[2:]).all()
    assert _titled(fig, "known truth: phase") and _titled(fig, "known truth: amplitude")
    (amp,) = _titled(fig, r"probe mode 0: .*% of the power")
    (ph,) = _titled(fig, "probe mode 0: phase")
    assert amp.get_subplotspec().rowspan == ph.get_subplotspec().rowspan
