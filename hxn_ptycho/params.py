"""Reconstruction parameters: every knob with its default, and its JSON round trip."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Union

ProbeModes = Union[int, str]


class ParamError(ValueError):
    """A reconstruction parameter has a value the engine cannot use."""


@dataclass
class ReconParams:
    """Parameters of one multi-mode Difference Map reconstruction.

    The defaults are what a beamline user gets from ``hxn-ptycho reconstruct SCAN.h5``.
    """

    iterations: int = 100
    probe_modes: ProbeModes = 1          # an int, or "auto" (the paper's 1 % rule)
    object_modes: int = 1
    beta: float = 0.8                    # DM relaxation of equation (3)
    power_bound: float = 0.25            # relaxed Fourier projection (4): mean squared amplitude deviation per
                                         # pixel left alone (photon counts: 0.25 = Poisson noise); 0 = exact
    update_rounds: int = 1               # probe/object update alternations per DM iteration
    probe_update_start: int = 2          # first iteration (0-based) with a probe update
    object_init: str = "ones"            # "ones" or "random" (random phases)
    probe_init: str = "auto"             # "auto" (scan file guess, else "amplitude"), "file", "amplitude"
    init_from: str | None = None         # a previous result file (warm start)
    precision: str = "single"            # "single" (complex64) or "double" (complex128)
    batch_size: int | None = None        # views per batch; None = from max_memory_gb
    exit_waves_on_host: bool | None = None  # GPU: keep exit waves in pinned host memory (None = when they don't fit)
    max_memory_gb: float | None = None   # bound for one process's memory; None = 75 % of RAM (90 % of a GPU's)
    object_reg: float = 1e-3             # relative regulariser of the object denominator (6)
    probe_reg: float = 1e-3              # relative regulariser of the probe denominator (5)
    extra_mode_power: float = 0.1        # power of a new probe mode relative to the first
    auto_max_modes: int = 8              # ceiling for probe_modes="auto"
    auto_interval: int = 10              # iterations between "auto" decisions
    auto_threshold: float = 0.01         # the paper's 1 % rule
    orthogonalize_every: int = 10        # orthogonalise probe modes (and exit waves) every k iterations; 0 = only at the end
    margin: int = 4                      # object pixels around the outermost probe window
    seed: int = 0
    threads: int | None = None           # FFT threads; None = cores / ranks
    backend: str = "numpy"               # "numpy", "cupy" or "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ParamError` naming the first bad parameter."""
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ParamError(f"iterations must be a positive integer, got {self.iterations!r}")
        if isinstance(self.probe_modes, str):
            if self.probe_modes != "auto":
                try:
                    self.probe_modes = int(self.probe_modes)
                except ValueError:
                    raise ParamError(f"probe_modes must be an integer or 'auto', got {self.probe_modes!r}") from None
        if isinstance(self.probe_modes, int) and self.probe_modes < 1:
            raise ParamError(f"probe_modes must be at least 1, got {self.probe_modes}")
        if not isinstance(self.object_modes, int) or self.object_modes < 1:
            raise ParamError(f"object_modes must be a positive integer, got {self.object_modes!r}")
        if not 0.0 < float(self.beta) <= 1.5:
            raise ParamError(f"beta must lie in (0, 1.5], got {self.beta}")
        if not 0.0 <= float(self.power_bound) < float("inf"):
            raise ParamError(f"power_bound must be a finite number >= 0, got {self.power_bound}")
        if self.update_rounds < 1:
            raise ParamError(f"update_rounds must be at least 1, got {self.update_rounds}")
        if self.precision not in ("single", "double"):
            raise ParamError(f"precision must be 'single' or 'double', got {self.precision!r}")
        if self.object_init not in ("ones", "random"):
            raise ParamError(f"object_init must be 'ones' or 'random', got {self.object_init!r}")
        if self.probe_init not in ("auto", "file", "amplitude"):
            raise ParamError(f"probe_init must be 'auto', 'file' or 'amplitude', got {self.probe_init!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ParamError(f"batch_size must be positive, got {self.batch_size}")
        if self.max_memory_gb is not None and self.max_memory_gb <= 0:
            raise ParamError(f"max_memory_gb must be positive, got {self.max_memory_gb}")
        if self.backend not in ("numpy", "cupy", "auto"):
            raise ParamError(f"backend must be 'numpy', 'cupy' or 'auto', got {self.backend!r}")
        if self.threads is not None and self.threads < 1:
            raise ParamError(f"threads must be positive, got {self.threads}")

    @property
    def initial_probe_modes(self) -> int:
        return 2 if self.probe_modes == "auto" else int(self.probe_modes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReconParams":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ParamError(f"unknown reconstruction parameter(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "ReconParams":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "ReconParams":
        return dataclasses.replace(self, **changes)
