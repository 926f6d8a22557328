"""Reconstruction parameters: every knob with its default, bounds, help text and JSON round trip.

Each field of :class:`ReconParams` is declared with :func:`param`, which records its help text,
its bounds or choices and the concern it belongs to (``group``). Validation, the command-line
options of every entry point (:func:`add_param_options` / :func:`params_from_namespace`) and the
``--help`` text are all generated from those declarations, so a new field is settable everywhere
the moment it is declared.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any, Union

from .errors import BadInput

ProbeModes = Union[int, str]

GROUPS = ("algorithm", "probe modes", "initial guess", "positions", "memory", "execution")


class ParamError(BadInput):
    """A reconstruction parameter has a value the engine cannot use."""


def param(default: Any, help: str, *, group: str, min: float | None = None, max: float | None = None,
          min_open: bool = False, choices: tuple | None = None, kind: str | None = None,
          cli: bool = True) -> Any:
    """A :class:`ReconParams` field: default, help, bounds (``min``/``max``; ``min_open`` = strict),
    ``choices``, and ``kind`` ("int", "float", "str", "bool", "int_or_auto", "path", "algorithm").

    ``cli=False`` keeps a field out of the generated command-line options (still settable in JSON).
    """
    assert group in GROUPS, group
    return dataclasses.field(default=default, metadata={
        "help": help, "group": group, "min": min, "max": max, "min_open": min_open,
        "choices": choices, "kind": kind, "cli": cli})


@dataclass
class ReconParams:
    """Parameters of one multi-mode Difference Map reconstruction.

    The defaults are what a beamline user gets from ``hxn-ptycho reconstruct SCAN.h5``.
    """

    # -- algorithm ------------------------------------------------------------------------
    iterations: int = param(100, "iterations in all", group="algorithm", min=1, kind="int")
    beta: float = param(1.0, "DM relaxation β of equation (3)", group="algorithm", min=0.0, max=1.5,
                        min_open=True, kind="float")
    power_bound: float = param(0.25, "relaxed Fourier projection (4): mean squared amplitude deviation per "
                               "pixel left alone (photon counts: 0.25 = Poisson noise); 0 = exact",
                               group="algorithm", min=0.0, kind="float")
    dm_relax_floor: float = param(0.15, "least relaxation r of a view outside the power bound (DM's damping: ψ ← "
                                  "(1 − r)·DM(ψ) + r·P·O with β = 1) while the bound does not damp DM as a whole "
                                  "(mean √(bound/deviation) below it: high counts with model errors) and positions "
                                  "are not being refined; 0 = none (docs/dm_damping.md)", group="algorithm",
                                  min=0.0, max=0.5, kind="float")
    detector_gain: float | None = param(None, "data units per photon, which scales the power bound (default: "
                                        "found from the quantum of the counts; 1 when they are not quantised)",
                                        group="algorithm", min=0.0, min_open=True, kind="float")
    update_rounds: int = param(1, "most probe/object update alternations per DM iteration (PtyPy's "
                               "overlap_max_iterations)", group="algorithm", min=1, kind="int")
    overlap_converge: float = param(0.0, "end the alternations of a DM iteration once the probe's relative "
                                    "change ‖ΔP‖/‖P‖ falls below this (PtyPy's overlap_converge_factor); "
                                    "0 = always update_rounds", group="algorithm", min=0.0, kind="float")
    probe_update_start: int = param(2, "first iteration (0-based) with a probe update", group="algorithm",
                                    min=0, kind="int")
    object_reg: float = param(1e-3, "relative regulariser of the object denominator (6)", group="algorithm",
                              min=0.0, kind="float")
    probe_reg: float = param(1e-3, "relative regulariser of the probe denominator (5)", group="algorithm",
                             min=0.0, kind="float")
    margin: int = param(4, "object pixels around the outermost probe window", group="algorithm", min=0,
                        kind="int")
    algorithm: str = param("DM", "the chain of algorithms, e.g. 'DM:200,ML:100' (DM = Difference Map, ML = "
                           "Poisson maximum likelihood by conjugate gradient); a stage without a count takes "
                           "the rest of 'iterations'; when every stage has one, their sum is the total",
                           group="algorithm", kind="algorithm")
    ml_noise_model: str = param("amplitude", "noise model of the ML stage: Poisson likelihood of the counts, or "
                                "'amplitude' (Gaussian on √I, the variance-stabilised Poisson model)",
                                group="algorithm", choices=("poisson", "amplitude"), kind="str")
    # -- probe modes ----------------------------------------------------------------------
    probe_modes: ProbeModes = param(1, "probe modes: an integer, or 'auto' (found from the data: auto_rule)",
                                    group="probe modes", min=1, kind="int_or_auto")
    object_modes: int = param(1, "object modes (mixed states)", group="probe modes", min=1, kind="int")
    extra_mode_power: float = param(0.1, "power of a new probe mode relative to the first", group="probe modes",
                                    min=0.0, max=1.0, min_open=True, kind="float")
    auto_max_modes: int = param(8, "ceiling for probe_modes=auto", group="probe modes", min=1, kind="int")
    auto_interval: int = param(10, "iterations between probe_modes=auto decisions", group="probe modes",
                               min=1, kind="int")
    auto_threshold: float = param(0.01, "probe_modes=auto keeps a mode above this power fraction",
                                  group="probe modes", min=0.0, max=1.0, min_open=True, kind="float")
    auto_rule: str = param("trend", "probe_modes=auto: 'trend' grows from 1 mode, each new mode strong, and keeps "
                           "it only if its power share holds (see auto_min_trend); 'power' is the paper's 1 % "
                           "rule; 'prune' is 'power', then keeps the fewest modes beyond which one more lowers "
                           "the data error by less than auto_prune_gain; 'gain' keeps a new mode only if the "
                           "data error falls faster after it than before; 'heldout' counts the modes before "
                           "the reconstruction from 15 % of each frame's pixels that no fit sees, on at most "
                           "the 100 views nearest the scan's centre (minutes on a CPU; docs/auto_modes.md)",
                           group="probe modes", choices=("trend", "power", "prune", "gain", "heldout"), kind="str")
    auto_new_mode_power: float = param(0.3, "probe_modes=auto ('trend'): power of a new k-th mode relative to "
                                       "the first, divided by k - 1", group="probe modes", min=0.0, max=1.0,
                                       min_open=True, kind="float")
    auto_min_trend: float = param(-0.01, "probe_modes=auto ('trend'): the newest mode is kept if its power "
                                  "fraction changes by at least this share of itself over its second interval",
                                  group="probe modes", min=-1.0, max=1.0, kind="float")
    auto_prune_gain: float = param(0.05, "probe_modes=auto ('prune'): the relative drop of the data error a "
                                   "further mode must bring to be kept", group="probe modes", min=0.0,
                                   kind="float")
    auto_prune_after: int = param(30, "probe_modes=auto ('prune'): iterations between the last mode added "
                                  "and the pruning decision", group="probe modes", min=0, kind="int")
    auto_min_gain: float = param(0.3, "probe_modes=auto ('gain'): the error drop in the interval after adding a "
                                 "mode must exceed this many times the drop in the interval before",
                                 group="probe modes", min=0.0, kind="float")
    orthogonalize_every: int = param(10, "orthogonalise probe modes (and exit waves) every k iterations; "
                                     "0 = only at the end", group="probe modes", min=0, kind="int")
    # -- initial guess --------------------------------------------------------------------
    live_final_share: float = param(0.1, "a live job (--follow): the share of the schedule, its last iterations, "
                                    "that the final phase runs after the stop at least; the live iterations "
                                    "stand for the ones before (1 = the whole schedule from the live state; "
                                    "docs/live.md)", group="algorithm", min=0.0, max=1.0, min_open=True,
                                    kind="float")
    object_init: str = param("ones", "initial object", group="initial guess", choices=("ones", "random"),
                             kind="str")
    probe_init: str = param("auto", "initial probe: scan file guess if any, else from the mean amplitude",
                            group="initial guess", choices=("auto", "file", "amplitude"), kind="str")
    probe_modes_init: str = param("auto", "shapes of the extra probe modes: 'motion' = successive derivatives of "
                                  "the first mode along the scan's motion in the probe's pixel frame (the modes a "
                                  "probe moving during the exposure adds; direction from the positions' order), "
                                  "'default' = derivatives along rows and columns, 'auto' = 'motion' where the "
                                  "scan file says it is a fly scan (attribute scan_kind), else 'default' "
                                  "(docs/auto_modes.md)", group="initial guess",
                                  choices=("auto", "motion", "default"), kind="str")
    motion_mode_power: float = param(0.3, "probe_modes_init motion: power of the first derivative mode relative "
                                     "to the first mode (the k-th at this / k)", group="initial guess",
                                     min=0.0, max=1.0, min_open=True, kind="float")
    init_from: str | None = param(None, "a previous result file to start from (warm start), laid on this "
                                  "canvas by where its object lies (its 'frame'): another margin or refined "
                                  "positions may follow", group="initial guess", kind="path")
    seed: int = param(0, "random seed (initial guesses)", group="initial guess", kind="int")
    # -- positions ------------------------------------------------------------------------
    refine_positions: bool = param(False, "refine every view's position (sub-pixel) during the reconstruction",
                                   group="positions", kind="bool")
    position_start: int = param(10, "first iteration (0-based) of position refinement", group="positions",
                                min=0, kind="int")
    position_interval: int = param(1, "iterations between position refinements", group="positions", min=1,
                                   kind="int")
    position_max_shift: float = param(8.0, "largest correction (pixels) of a view beyond the global affine "
                                      "term", group="positions", min=0.0, min_open=True, kind="float")
    position_search_radius: float = param(0.0, "radius (pixels) of the coarse global stage of position refinement, "
                                          "before the gradient steps: a grid search of every view, an affine map and "
                                          "the smooth drift fitted to the moves, outliers searched again; 0 = none. "
                                          "Use about the largest stage error (and position_max_shift at least as "
                                          "large; docs/position_search.md)", group="positions", min=0.0,
                                          kind="float")
    position_grow: bool = param(True, "in the coarse stage (position_search_radius > 0), register the views in "
                                "scan order against the object grown from the views before them (a smooth drift "
                                "plus jitter: first, and again half-way through the gradient stage with the "
                                "refined probe, the nominal scale held from there); needs one process",
                                group="positions", kind="bool")
    position_probe_defocus: bool = param(True, "with position_grow: before the first growth, choose the probe's "
                                         "far-field defocus (the frames' mean amplitude cut to the pupil, with a "
                                         "defocus phase of either sign) by the data error of the first 48 views "
                                         "grown with it at half resolution, coarse to fine (10-16 short growths); "
                                         "the current probe is kept unless a defocus fits better; where one is "
                                         "taken the grown scale is kept (not held to the nominal one) "
                                         "(docs/position_search.md)", group="positions", kind="bool")
    position_step: float = param(1.0, "largest move (pixels) of a view in one refinement (gradient) or the "
                                 "first search step (search)", group="positions", min=0.0, min_open=True,
                                 kind="float")
    position_affine: bool = param(True, "fit a global affine term (scale, rotation, shear) to the refined "
                                  "positions: the systematic errors of a stage", group="positions", kind="bool")
    position_hold_scale: bool = param(False, "hold the global scale of the nominal positions (a calibrated, "
                                      "e.g. interferometer, stage): the linear map refined -> nominal keeps "
                                      "only its rotation; each view's own correction stays", group="positions",
                                      kind="bool")
    position_method: str = param("gradient", "position refinement: a Gauss-Newton gradient step, or a "
                                 "bounded search", group="positions", choices=("gradient", "search"),
                                 kind="str")
    position_end: int = param(0, "last iteration (0-based) of position refinement; afterwards the windows "
                              "snap to the nearest pixel; 0 = at 80 % of the iterations", group="positions",
                              min=0, kind="int")
    position_subpixel_windows: bool = param(False, "keep sub-pixel (bilinear, slightly blurring) windows after "
                                            "the refinement instead of snapping them to the nearest pixel",
                                            group="positions", kind="bool")
    # -- memory ---------------------------------------------------------------------------
    precision: str = param("single", "complex64 (single) or complex128 (double)", group="memory",
                           choices=("single", "double"), kind="str")
    batch_size: int | None = param(None, "views per batch (default: from max_memory_gb)", group="memory",
                                   min=1, kind="int")
    exit_waves_on_host: bool | None = param(None, "GPU: keep exit waves in pinned host memory "
                                            "(default: when they don't fit)", group="memory", kind="bool")
    max_memory_gb: float | None = param(None, "bound for one process's memory (default 75 % of RAM, "
                                        "90 % of a GPU's)", group="memory", min=0.0, min_open=True,
                                        kind="float")
    # -- execution ------------------------------------------------------------------------
    threads: int | None = param(None, "FFT threads per rank (default: cores / ranks)", group="execution",
                                min=1, kind="int")
    backend: str = param("numba", "array backend: numba (fused CPU kernels), numpy (the reference), cupy "
                         "(GPU), auto (the GPU when one is visible, else numba)", group="execution",
                         choices=("numba", "numpy", "cupy", "auto"), kind="str")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ParamError` naming the first bad parameter (from the field declarations)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_value(f, getattr(self, f.name)))

    @property
    def initial_probe_modes(self) -> int:
        return 2 if self.probe_modes == "auto" else int(self.probe_modes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReconParams:
        if not isinstance(d, dict):
            raise ParamError(f"reconstruction parameters must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ParamError(f"unknown reconstruction parameter(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> ReconParams:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ParamError(f"reconstruction parameters are not valid JSON: {exc}") from None

    def replace(self, **changes: Any) -> ReconParams:
        return dataclasses.replace(self, **changes)


def _bounds_text(meta: Mapping[str, Any]) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is None and hi is None:
        return ""
    left = "(" if meta.get("min_open") else "["
    return f"{left}{'-∞' if lo is None else lo}, {'∞' if hi is None else hi}]"


def check_value(f: dataclasses.Field, value: Any) -> Any:
    """``value`` for field ``f``, converted where the kind allows (``"3"`` → 3), or :class:`ParamError`."""
    meta, name = f.metadata, f.name
    kind = meta.get("kind")
    if value is None:
        if f.default is None:
            return None
        raise ParamError(f"{name} must be set (got None)")
    if kind == "int_or_auto":
        if isinstance(value, str):
            if value == "auto":
                return value
            try:
                value = int(value)
            except ValueError:
                raise ParamError(f"{name} must be an integer or 'auto', got {value!r}") from None
        kind = "int"
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ParamError(f"{name} must be an integer, got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"{name} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ParamError(f"{name} must be a finite number, got {value}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ParamError(f"{name} must be true or false, got {value!r}")
    elif kind in ("str", "path", "algorithm"):
        if not isinstance(value, str):
            raise ParamError(f"{name} must be a string, got {value!r}")
        if kind == "algorithm":
            parse_algorithm(value, name)
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ParamError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and (value < lo or (meta.get("min_open") and value <= lo)) or \
                hi is not None and value > hi:
            raise ParamError(f"{name} must lie in {_bounds_text(meta)}, got {value}")
    return value


ALGORITHMS = ("DM", "ML")


def parse_algorithm(text: str, name: str = "algorithm") -> list[tuple[str, int | None]]:
    """``"DM:200,ML:100"`` → ``[("DM", 200), ("ML", 100)]``; a stage without a count gets ``None``."""
    stages: list[tuple[str, int | None]] = []
    for part in text.split(","):
        part = part.strip()
        alg, _, count = part.partition(":")
        alg = alg.strip().upper()
        if alg not in ALGORITHMS:
            raise ParamError(f"{name} {text!r}: unknown algorithm {part.partition(':')[0].strip()!r} "
                             f"(choose {', '.join(ALGORITHMS)}, e.g. 'DM:200,ML:100')")
        if count.strip():
            try:
                k = int(count)
            except ValueError:
                raise ParamError(f"{name} {text!r}: the count of {alg} must be an integer, got {count.strip()!r}") from None
            if k < 1:
                raise ParamError(f"{name} {text!r}: the count of {alg} must be at least 1, got {k}")
            stages.append((alg, k))
        else:
            stages.append((alg, None))
    if sum(c is None for _, c in stages) > 1:
        raise ParamError(f"{name} {text!r}: at most one stage may go without a count")
    return stages


def algorithm_stages(params: "ReconParams") -> list[tuple[str, int]]:
    """The chain of algorithms with their iteration counts; their sum is the total number of iterations."""
    stages = parse_algorithm(params.algorithm)
    fixed = sum(c for _, c in stages if c is not None)
    if all(c is not None for _, c in stages):
        return [(a, int(c)) for a, c in stages if c is not None]
    rest = params.iterations - fixed
    if rest < 1:
        raise ParamError(f"algorithm {params.algorithm!r}: the stages with a count take {fixed} iterations, "
                         f"leaving none of iterations = {params.iterations} for the stage without one")
    return [(a, int(c) if c is not None else rest) for a, c in stages]


# -- command-line options generated from the fields -------------------------------------------

def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _cli_type(f: dataclasses.Field) -> Any:
    kind = f.metadata.get("kind")

    def convert(text: str) -> Any:
        value: Any = text
        if kind in ("int", "int_or_auto") and text != "auto":
            try:
                value = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        elif kind == "float":
            try:
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        elif kind == "bool":
            low = text.lower()
            if low not in ("true", "false", "yes", "no", "1", "0"):
                raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}")
            value = low in ("true", "yes", "1")
        try:
            return check_value(f, value)
        except ParamError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(" must ", 1)[-1].join(("must ", ""))) from None
    convert.__name__ = kind or "value"
    return convert


def add_param_options(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """One option per :class:`ReconParams` field (``--power-bound``), grouped by concern, with the
    default and bounds in the help. Unset options stay ``None`` in the namespace (see
    :func:`params_from_namespace`), so a caller's own defaults are not overridden."""
    groups = {g: parser.add_argument_group(f"reconstruction: {g}") for g in GROUPS}
    for f in dataclasses.fields(ReconParams):
        meta = f.metadata
        if not meta.get("cli", True) or f.name in skip:
            continue
        bits = [meta["help"]]
        if meta.get("choices"):
            bits.append("one of " + ", ".join(meta["choices"]))
        bounds = _bounds_text(meta)
        if bounds:
            bits.append(f"in {bounds}")
        if f.default is not None:
            bits.append(f"default {f.default!r}")
        elif meta.get("kind") != "path":
            bits.append("default: automatic")
        metavar = {"int": "N", "float": "X", "int_or_auto": "N|auto", "bool": "true|false",
                   "path": "FILE"}.get(meta.get("kind") or "")
        if meta.get("choices"):
            metavar = "{" + ",".join(meta["choices"]) + "}"
        flag: dict[str, Any] = {"nargs": "?", "const": True} if meta.get("kind") == "bool" else {}   # a switch
        groups[meta["group"]].add_argument(option_name(f.name), dest=f"param_{f.name}", type=_cli_type(f),
                                           default=None, metavar=metavar or "VALUE",
                                           help="; ".join(bits).replace("%", "%%"), **flag)


def params_from_namespace(args: argparse.Namespace, base: ReconParams | dict | None = None) -> ReconParams:
    """The parameters given on the command line, over ``base`` (a ReconParams or a dict of fields)."""
    values = base.to_dict() if isinstance(base, ReconParams) else dict(base or {})
    for f in dataclasses.fields(ReconParams):
        v = getattr(args, f"param_{f.name}", None)
        if v is not None:
            values[f.name] = v
    return ReconParams.from_dict(values)


def given_params(args: argparse.Namespace) -> dict[str, Any]:
    """Only the fields set explicitly on the command line."""
    return {f.name: getattr(args, f"param_{f.name}") for f in dataclasses.fields(ReconParams)
            if getattr(args, f"param_{f.name}", None) is not None}


def options_markdown() -> str:
    """The table of every reconstruction option (README's "Options"), generated from the declarations."""
    rows = ["| option | group | default | allowed | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(ReconParams):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        allowed = ", ".join(map(str, meta["choices"])) if meta.get("choices") else _bounds_text(meta)
        if meta.get("kind") == "int_or_auto":
            allowed += " or auto"
        default = ("none" if meta.get("kind") == "path" else "automatic") if f.default is None else f"`{f.default}`"
        text = meta["help"].replace("|", "\\|")
        rows.append(f"| `{option_name(f.name)}` | {meta['group']} | {default} | {allowed} | {text} |")
    return "\n".join(rows) + "\n"


def parse_assignments(pairs: Sequence[str]) -> dict[str, Any]:
    """``["name=value", ...]`` (a benchmark's ``--set``) → {name: value}, each value a Python
    literal where it parses as one, else the string."""
    import ast
    out: dict[str, Any] = {}
    for kv in pairs:
        if "=" not in kv:
            raise ParamError(f"{kv!r} is not name=value")
        k, v = kv.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out
