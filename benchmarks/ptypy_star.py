"""The Siemens star as a PtyPy scan: one definition shared by the PtyPy benchmarks
(``ptypy_star_positions.py``, ``ptypy_dm_compare.py``). PtyPy is not a dependency: import this
only in a process that has it (a side environment)."""
from __future__ import annotations

from typing import Any

import numpy as np

RES = 1e-8          # metres per object pixel, through the geometry below (any value: PtyPy works in metres)
LAMBDA_M, DISTANCE_M = 1e-10, 1.0


def register_star_scan(frames: np.ndarray, positions_rc: np.ndarray) -> None:
    """Register PtyPy's ``StarScan`` data source: ``frames`` (FFT-shifted, as the star's, handed to
    PtyPy with the zero frequency centred) at window corners ``positions_rc`` (object pixels)."""
    from ptypy.core.data import PtyScan
    from ptypy.experiment import register

    centred = np.fft.fftshift(frames, axes=(-2, -1)).astype(np.float32)
    n = frames.shape[-1]

    @register()
    class StarScan(PtyScan):
        """
        Defaults:

        [name]
        default = StarScan
        type = str
        help =
        """

        def __init__(self, pars: Any = None, **kwargs: Any) -> None:
            p = self.DEFAULT.copy(depth=99)
            p.update(pars)
            super().__init__(p, **kwargs)

        def load_positions(self) -> np.ndarray:
            return positions_rc * RES

        def load_weight(self) -> np.ndarray:
            return np.ones((n, n))

        def load(self, indices: Any) -> tuple[dict, dict, dict]:
            return {i: centred[i] for i in indices}, {}, {}


def star_data_params(u: Any, frames: np.ndarray) -> Any:
    """PtyPy's ``scans.star.data`` parameters for the star's frames (``u`` = ``ptypy.utils``)."""
    n = frames.shape[-1]
    return u.Param(name="StarScan", shape=n, num_frames=len(frames), energy=1.23984193 / (LAMBDA_M * 1e9),
                   distance=DISTANCE_M, psize=LAMBDA_M * DISTANCE_M / (n * RES), auto_center=False,
                   center=(n // 2, n // 2), orientation=None)
