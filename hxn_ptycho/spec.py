"""One job specification: everything a reconstruction job needs, built once by any entry point.

A :class:`JobSpec` holds

- ``params``: the :class:`~hxn_ptycho.params.ReconParams` (backend and threads are fields there);
- ``geometry``: the scan's geometry as exported (λ, z, detector pixel, energy, crop, beam centre,
  orientation) and ``provenance``, where each value came from;
- ``execution``: MPI ranks, ``mode`` (sync/async), GPUs;
- ``source``: the scan file, result file, raw run uid, scan id and the catalog it belongs to.

It is written as ONE JSON file handed to the job (``python -m hxn_ptycho.job SPEC.json``) and
published unchanged as the derived run's ``recon`` start metadata, with the job's measured facts
(elapsed time, modes used, host, versions, interrupted...) in the fixed sub-record
``recon["measured"]`` (see :data:`MEASURED_KEYS`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadInput
from .params import ParamError, ReconParams

SPEC_VERSION = 1
MODES = ("sync", "async")
#: ranks per core beyond which ``--nprocs`` is refused unless forced
MAX_RANKS_PER_CORE = 4
#: the fixed keys of ``recon["measured"]`` (the job's measured facts); absent facts are None
MEASURED_KEYS = ("status", "elapsed_s", "startup_s", "iterations_done", "probe_modes_used", "final_data_error",
                 "final_cost", "interrupted", "host", "versions", "backend", "ranks", "mode",
                 "probe_modes_auto",     # probe_modes=auto's evidence: per decision each mode's share, the trend
                 "live")                 # a job that followed a growing scan file: previews, lags, final latency


class SpecError(BadInput):
    """A job specification is malformed or asks for something that cannot run; the message says what."""


def _fields(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise SpecError(f"job spec: unknown {what} field(s): {', '.join(sorted(unknown))}")
    return d


@dataclass
class Geometry:
    """The scan's geometry as exported; ``provenance[name]`` says where each value came from."""

    lambda_nm: float | None = None
    z_m: float | None = None
    ccd_pixel_um: float | None = None
    energy_kev: float | None = None
    crop: int | None = None                      # frame size n after the crop
    center: list[int] | None = None              # (row, col) of the beam on the detector
    orientation: str = "as recorded"             # detector frames as written by the detector
    detector: str | None = None
    n_views: int | None = None
    pixel_size_m: float | None = None            # object pixel λ·z / (n·Δ)
    provenance: dict[str, str] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)   # the export's notes: dropped frames, masked pixels,
                                                           # scan kind, orientation trials

    @classmethod
    def from_scan_file(cls, path: str | os.PathLike, provenance: dict[str, str] | None = None) -> Geometry:
        """The geometry stored in a scan file (frames are not read). Unknown provenance: "scan file"."""
        from .h5util import open_h5, scalar
        from .scanfile import KIND, scan_info
        info = scan_info(path)
        with open_h5(path, KIND) as f:
            lam, z, pix = (scalar(f, k, KIND) for k in ("lambda_nm", "z_m", "ccd_pixel_um"))
        attrs = info["attrs"]
        n = int(info["n"])
        center = [int(attrs["center_row"]), int(attrs["center_col"])] if "center_row" in attrs else None
        energy = attrs.get("energy_kev")
        prov = {k: f"scan file {Path(path).name}" for k in ("lambda_nm", "z_m", "ccd_pixel_um", "crop")}
        prov.update(_export_sources(attrs))
        prov.update(provenance or {})
        notes = {k: _maybe_json(attrs[k]) for k in EXPORT_NOTES if k in attrs}
        return cls(lambda_nm=lam, z_m=z, ccd_pixel_um=pix, energy_kev=None if energy is None else float(energy),
                   crop=n, center=center, orientation=str(attrs.get("orientation", "as recorded")),
                   detector=attrs.get("detector"), n_views=int(info["n_views"]),
                   pixel_size_m=lam * 1e-9 * z / (n * pix * 1e-6), provenance=prov, export=notes)


EXPORT_NOTES = ("scan_kind", "dropped_frames", "masked_saturated", "masked_hot", "angle_deg",
                "orientation_report", "frame_source")
_SOURCE_NAMES = {"distance_m": "z_m", "pixel_um": "ccd_pixel_um"}


def find_key(tree: Any, key: str) -> Any:
    """The first non-None value of ``key`` in nested dicts (breadth first: a job spec or a derived
    run's ``recon``, wherever it nests the key), or None."""
    level = [tree]
    while level:
        nxt: list[Any] = []
        for d in level:
            if isinstance(d, dict):
                if d.get(key) is not None and not isinstance(d[key], dict):
                    return d[key]
                nxt.extend(v for v in d.values() if isinstance(v, dict))
        level = nxt
    return None


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _export_sources(attrs: dict[str, Any]) -> dict[str, str]:
    """Where the export took each value, from the scan file's ``geometry_source`` attribute (JSON:
    ``{name: [value, source]}`` or ``{name: source}``), under the spec's names."""
    raw = _maybe_json(attrs.get("geometry_source"))
    if not isinstance(raw, dict):
        return {}
    out: dict[str, str] = {}
    for k, v in raw.items():
        src = v[1] if isinstance(v, list) and len(v) == 2 else v
        if src is not None:
            out[_SOURCE_NAMES.get(str(k), str(k))] = str(src)
    if "energy_kev" in out:
        out["lambda_nm"] = "λ = hc / energy"
    return out


@dataclass
class Execution:
    """How the job runs: MPI ranks, the MPI scheme and the GPUs (backend and threads are parameters)."""

    ranks: int = 1
    mode: str = "sync"
    gpus: list[str] = field(default_factory=list)   # GPU ids visible to the job (CUDA_VISIBLE_DEVICES)
    force: bool = False                              # allow more than MAX_RANKS_PER_CORE ranks per core
    launcher: str = "local"                          # "local" (mpiexec here) or "slurm" (sbatch/srun)
    slurm: dict[str, Any] = field(default_factory=dict)   # SlurmSettings (hxn_ptycho/slurm.py) as a dict

    def validate(self) -> None:
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, int) or self.ranks < 1:
            raise SpecError(f"ranks (--nprocs) must be a positive integer, got {self.ranks!r}")
        if self.mode not in MODES:
            raise SpecError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        from .slurm import LAUNCHERS, SlurmSettings
        if self.launcher not in LAUNCHERS:
            raise SpecError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if not isinstance(self.slurm, dict):
            raise SpecError(f"execution.slurm must be an object of Slurm settings, got {self.slurm!r}")
        SlurmSettings.from_dict(self.slurm)


@dataclass
class Source:
    """Which scan, which result, which run of which catalog."""

    scan_file: str = ""
    result_file: str = ""
    raw_uid: str | None = None
    scan_id: int | None = None
    catalog: str | None = None                  # URL, config file or server folder; key from TILED_API_KEY
    png: str | None = None                      # also write a summary figure


@dataclass
class JobSpec:
    """The one record a job is started from and published as (see the module docstring)."""

    params: ReconParams = field(default_factory=ReconParams)
    geometry: Geometry = field(default_factory=Geometry)
    execution: Execution = field(default_factory=Execution)
    source: Source = field(default_factory=Source)
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        self.execution.validate()

    # -- the files the job writes beside the result ----------------------------------------
    @property
    def spec_file(self) -> Path:
        return Path(str(self.source.result_file) + ".spec.json")

    @property
    def outcome_file(self) -> Path:
        return Path(str(self.source.result_file) + ".outcome.json")

    # -- JSON round trip -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "params": self.params.to_dict(),
                "geometry": dataclasses.asdict(self.geometry), "execution": dataclasses.asdict(self.execution),
                "source": dataclasses.asdict(self.source)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        if not isinstance(d, dict):
            raise SpecError(f"a job spec must be a JSON object, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if k != "measured"}     # a published recon record reads back too
        _fields(cls, d, "top-level")
        if d.get("version", SPEC_VERSION) != SPEC_VERSION:
            raise SpecError(f"job spec version {d.get('version')} is not {SPEC_VERSION}")
        try:
            return cls(params=ReconParams.from_dict(dict(d.get("params") or {})),
                       geometry=Geometry(**_fields(Geometry, dict(d.get("geometry") or {}), "geometry")),
                       execution=Execution(**_fields(Execution, dict(d.get("execution") or {}), "execution")),
                       source=Source(**_fields(Source, dict(d.get("source") or {}), "source")))
        except ParamError as exc:
            raise SpecError(f"job spec: {exc}") from None
        except TypeError as exc:
            raise SpecError(f"job spec: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SpecError(f"job spec is not valid JSON: {exc}") from None

    @classmethod
    def read(cls, path: str | os.PathLike) -> JobSpec:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise SpecError(f"cannot read the job spec {path}: {exc}") from None
        return cls.from_json(text)

    def write(self, path: str | os.PathLike | None = None) -> Path:
        """Write the spec atomically (default: ``<result>.spec.json``); return the path."""
        from .h5util import atomic_path
        target = Path(path) if path is not None else self.spec_file
        with atomic_path(target) as tmp:
            tmp.write_text(self.to_json())
        return target

    def recon(self, measured: dict[str, Any] | None = None) -> dict[str, Any]:
        """The derived run's ``recon`` record: this spec unchanged, plus ``measured`` (fixed keys)."""
        out = self.to_dict()
        given = dict(measured or {})
        out["measured"] = {k: given.get(k) for k in MEASURED_KEYS}
        return out

    def replace(self, **changes: Any) -> JobSpec:
        return dataclasses.replace(self, **changes)


# -- checks made before any process starts -------------------------------------------------------

def check_ranks(spec: JobSpec, *, cores: int | None = None) -> None:
    """Refuse ranks beyond the views, or beyond ``MAX_RANKS_PER_CORE`` × cores unless forced."""
    from .backend import available_cores
    ranks, n_views = spec.execution.ranks, spec.geometry.n_views
    if n_views is not None and ranks > n_views:
        raise SpecError(f"--nprocs {ranks} is more than the scan's {n_views} views: use at most {n_views} ranks")
    cores = cores or available_cores()
    if ranks > MAX_RANKS_PER_CORE * cores and not spec.execution.force and spec.execution.launcher == "local":
        raise SpecError(f"--nprocs {ranks} is more than {MAX_RANKS_PER_CORE} ranks per core on this machine "
                        f"({cores} cores): use at most {MAX_RANKS_PER_CORE * cores}, or --force-nprocs to insist")
    if spec.execution.mode == "async" and ranks > 1 and spec.params.init_from:
        raise SpecError("--init-from (a warm start) is not supported with --mode async and more than one rank")


def versions() -> dict[str, str]:
    """Versions of Python and of the packages a reconstruction depends on (no Bluesky import)."""
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for dist in ("hxn-ptycho", "numpy", "scipy", "h5py", "mpi4py", "cupy-cuda12x", "cupy-cuda13x",
                 "event-model", "bluesky-tiled-plugins", "tiled", "prefect"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


# -- command-line options of the execution, shared by every entry point -----------------------------

def add_execution_options(parser: argparse.ArgumentParser, *, nprocs: int = 1) -> None:
    """``--nprocs``, ``--mode`` and ``--force-nprocs`` (backend and threads are parameter options)."""
    g = parser.add_argument_group("execution")
    g.add_argument("--nprocs", type=int, default=nprocs,
                   help=f"MPI ranks (mpiexec -n K); 1 runs in-process (default {nprocs}); at most the scan's "
                        f"views and {MAX_RANKS_PER_CORE} per core")
    g.add_argument("--mode", choices=MODES, default="sync",
                   help="MPI scheme: sync (Allreduce every iteration, default) or async (regions stitched)")
    g.add_argument("--force-nprocs", action="store_true",
                   help=f"allow more than {MAX_RANKS_PER_CORE} ranks per core")
    from .slurm import LAUNCHERS, add_slurm_options
    g.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: mpiexec on this machine (default); slurm: sbatch, ranks started by srun "
                        "(see docs/slurm.md)")
    add_slurm_options(g)


def execution_from_namespace(args: argparse.Namespace, gpus: list[str] | None = None) -> Execution:
    from .slurm import settings_from_namespace
    slurm = settings_from_namespace(args)
    launcher = getattr(args, "launcher", "local") or "local"
    if slurm and launcher != "slurm":
        raise SpecError("the --slurm-* options need --launcher slurm")
    ex = Execution(ranks=int(getattr(args, "nprocs", 1) or 1), mode=getattr(args, "mode", "sync") or "sync",
                   gpus=list(gpus or []), force=bool(getattr(args, "force_nprocs", False)),
                   launcher=launcher, slurm=slurm)
    ex.validate()
    return ex


EXECUTION_OPTIONS = {"nprocs": "ranks", "ranks": "ranks", "mode": "mode", "gpus": "gpus",
                     "force_nprocs": "force", "force": "force", "launcher": "launcher", "slurm": "slurm"}


def _slurm_fields() -> set[str]:
    from .slurm import SlurmSettings
    return {f.name for f in dataclasses.fields(SlurmSettings)}


def parts_from_options(options: dict[str, Any], base: dict[str, Any] | None = None,
                       extra: tuple[str, ...] = ()) -> tuple[ReconParams, Execution, dict[str, Any]]:
    """Keyword options (a Prefect flow's ``**options``, a config) → parameters, execution and the
    ``extra`` keys; ``power_bound=0.5`` is the field, ``nprocs``/``mode`` the execution. Unknown keys
    are refused, naming them."""
    names = {f.name for f in dataclasses.fields(ReconParams)}
    params = dict(base or {})
    ex: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    unknown = []
    for key, value in options.items():
        k = key.replace("-", "_")
        if k in names:
            params[k] = value
        elif k in EXECUTION_OPTIONS:
            ex[EXECUTION_OPTIONS[k]] = value
        elif k.startswith("slurm_") and k[len("slurm_"):] in _slurm_fields():
            ex.setdefault("slurm", {})[k[len("slurm_"):]] = value
        elif k in extra:
            rest[k] = value
        else:
            unknown.append(key)
    if unknown:
        raise SpecError(f"unknown option(s): {', '.join(sorted(unknown))} (options are the ReconParams fields, "
                        f"nprocs, mode, force_nprocs, launcher, slurm_*{''.join(', ' + e for e in extra)})")
    try:
        recon = ReconParams.from_dict(params)
    except ParamError as exc:
        raise SpecError(str(exc)) from None
    execution = Execution(**ex)
    execution.validate()
    return recon, execution, rest
