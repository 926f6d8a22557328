"""The motion start of the extra probe modes (issue 18 part 2; docs/auto_modes.md, "Session 17: the
motion start"): for a fly scan the extra modes are the first mode's orthonormalised derivatives
along the stage's motion in the probe's pixel frame; otherwise the default start is unchanged."""
from __future__ import annotations

import numpy as np
import pytest
from mode_mixtures import mixture_scan

from hxn_ptycho import initial, modes
from hxn_ptycho.params import ParamError, ReconParams
from hxn_ptycho.scanfile import positions_px


def _start(scan, K=3, **kw):
    p = ReconParams(probe_modes=K, **kw)
    pos, _ = positions_px(scan.points, scan.pixel_size_m, scan.n, 4)
    power, mean_amp = 1e6, np.mean(scan.diffamp, axis=0).astype(np.float64)
    return initial.initial_probe(scan, p, K, power, mean_amp, pos), pos


def _unit(a):
    return a / np.linalg.norm(a)


def _derivative_shapes(p0, axis):
    """The orthonormal first and second derivatives of p0 along ``axis`` (0 rows, 1 columns)."""
    k = 2j * np.pi * np.fft.fftfreq(p0.shape[axis])
    k = k[:, None] if axis == 0 else k[None, :]
    base = [_unit(p0)]
    for order in (1, 2):
        c = np.fft.ifft2(np.fft.fft2(p0) * k ** order)
        for b in base:
            c = c - np.vdot(b, c) * b
        base.append(_unit(c))
    return base[1:]


@pytest.mark.parametrize("transpose", [False, True])
def test_fly_scan_starts_from_the_derivatives_along_the_motion(transpose):
    scan, _ = mixture_scan("fly", np.array([0.68, 0.24, 0.08]), 1e6, seed=1)   # raster, fast axis = columns (x)
    if transpose:                                   # the stage moves along y: the motion is along the rows
        n = int(np.ceil(np.sqrt(scan.n_views)))
        order = np.arange(scan.n_views).reshape(-1, n).T.ravel() if scan.n_views == n * n else None
        assert order is not None
        scan.points = scan.points[:, order]
        scan.diffamp = scan.diffamp[order]
    scan.attrs["scan_kind"] = "fly2dpd"
    probe, pos = _start(scan)
    u = initial.motion_direction(pos)
    axis = 0 if transpose else 1
    assert abs(u[axis]) > 0.99, u
    p0 = probe[0]
    g = probe.reshape(3, -1)
    gram = g.conj() @ g.T
    assert np.allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-9 * gram[0, 0].real)   # orthogonal
    assert np.allclose(np.diag(gram).real / gram[0, 0].real, [1, 0.3, 0.15], rtol=1e-9)  # declared powers
    assert np.sum(np.abs(probe) ** 2) == pytest.approx(1e6, rel=1e-9)                  # total power kept
    for k, shape in enumerate(_derivative_shapes(p0, axis)):
        assert abs(np.vdot(shape, _unit(probe[k + 1]))) > 0.999        # the derivative along the motion
    for k, shape in enumerate(_derivative_shapes(p0, 1 - axis)):
        assert abs(np.vdot(shape, _unit(probe[k + 1]))) < 0.5          # not the one across it


def test_step_scan_keeps_the_default_start_and_motion_can_be_forced():
    scan, _ = mixture_scan("fly", np.array([0.68, 0.24, 0.08]), 1e6, seed=1)
    scan.attrs["scan_kind"] = "step"
    probe, _ = _start(scan)
    p0 = _start(scan, K=1)[0][0]
    expected = modes.initial_probe_modes(p0, 3, 0.1, 0)
    assert np.allclose(probe, expected)                          # the library's default start, unchanged
    forced, _ = _start(scan, probe_modes_init="motion")
    assert initial.probe_modes_init(scan, ReconParams(probe_modes_init="motion")) == "motion"
    assert not np.allclose(forced[1:], probe[1:])
    scan.attrs["scan_kind"] = "FlyPlan2D"
    assert initial.probe_modes_init(scan, ReconParams()) == "motion"
    assert initial.probe_modes_init(scan, ReconParams(probe_modes_init="default")) == "default"


def test_motion_direction_needs_two_positions():
    assert initial.motion_direction(np.zeros((3, 2))) is None
    with pytest.raises(ParamError, match="no two distinct positions"):
        initial.initial_modes(np.ones((8, 8), complex), 2, type("S", (), {"attrs": {"scan_kind": "fly2dpd"}})(),
                              ReconParams(), np.zeros((3, 2)))
