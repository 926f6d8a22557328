"""Query helpers: the reconstruction of a scan, as arrays and parameters.

``hxn_ptycho.results(catalog, scan_id=N)`` or ``results(catalog, raw_uid=UID)`` returns the
latest derived run of that raw scan as a :class:`DerivedResult` (a failed one too, with its
reason and no arrays). ``catalog`` is a URL, a config file, an embedded server's folder, or a
Tiled client of the ``processed`` container.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class NoResult(LookupError):
    """No derived run matches the query."""


@dataclass
class DerivedResult:
    uid: str
    raw_uid: str | None
    scan_id: Any
    exit_status: str | None
    reason: str | None
    recon: dict = field(default_factory=dict)
    start: dict = field(default_factory=dict)
    object: np.ndarray | None = None               # (M_O, H, W) complex
    probe: np.ndarray | None = None                # (M_P, n, n) complex
    positions_px: np.ndarray | None = None         # (N, 2)
    probe_power_fraction: np.ndarray | None = None
    final_data_error: float | None = None
    data_error: np.ndarray | None = None           # per iteration
    probe_error: np.ndarray | None = None
    object_error: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.exit_status == "success"

    def summary(self) -> str:
        head = f"derived run {self.uid} of scan {self.scan_id} (raw {self.raw_uid}): {self.exit_status}"
        if not self.ok:
            return f"{head} — {self.reason}"
        return (f"{head}; object {tuple(self.object.shape)}, probe {tuple(self.probe.shape)}, "
                f"probe power {np.round(self.probe_power_fraction, 3).tolist()}, "
                f"final data error {self.final_data_error:.4g}")


def _processed(catalog: Any) -> Any:
    if hasattr(catalog, "search"):
        return catalog
    from .catalog import runs
    return runs(catalog, "processed")


def find_derived(catalog: Any, *, scan_id: int | None = None, raw_uid: str | None = None,
                 only_success: bool = False) -> Any:
    """The latest derived run (a Tiled client) for ``scan_id`` or ``raw_uid``."""
    from tiled.queries import Eq

    if (scan_id is None) == (raw_uid is None):
        raise ValueError("give exactly one of scan_id= or raw_uid=")
    found = _processed(catalog).search(Eq("plan_name", "hxn_ptycho_dm"))
    found = found.search(Eq("raw_uid", raw_uid)) if raw_uid is not None else found.search(Eq("scan_id", int(scan_id)))
    if only_success:
        found = found.search(Eq("stop.exit_status", "success"))
    what = f"raw_uid={raw_uid}" if raw_uid is not None else f"scan_id={scan_id}"
    if not len(found):
        raise NoResult(f"no reconstruction of {what} in the catalog")
    return found.values().last()


def _read(stream: Any, key: str, required: bool = True) -> np.ndarray | None:
    try:
        return np.asarray(stream[key].read())
    except KeyError:
        if required:
            raise NoResult(f"derived run {stream.uri}: stream has no '{key}'") from None
        return None


def as_v3(run: Any) -> Any:
    """The v3 view of a run. databroker's v1/v2 accessors switch the *shared* structure-client
    registry to v2 (``copy.copy`` of tiled's ``OneShotCachedMap`` shares its dict), so a client
    may hand out v2 runs after ``db[...]`` was used; v3 gives streams as containers of arrays."""
    return run.v3 if hasattr(run, "v3") else run


def load_result(run: Any) -> DerivedResult:
    run = as_v3(run)
    md = run.metadata
    start, stop = dict(md.get("start", {})), dict(md.get("stop") or {})
    out = DerivedResult(uid=start.get("uid"), raw_uid=start.get("raw_uid"), scan_id=start.get("scan_id"),
                        exit_status=stop.get("exit_status"), reason=stop.get("reason"),
                        recon=dict(start.get("recon", {})), start=start)
    if out.exit_status != "success":
        return out
    p = run["primary"]
    out.object = _read(p, "object")[0]
    out.probe = _read(p, "probe")[0]
    out.positions_px = _read(p, "positions_px")[0]
    out.probe_power_fraction = _read(p, "probe_power_fraction")[0]
    out.final_data_error = float(_read(p, "final_data_error")[0])
    if "iterations" in run:
        it = run["iterations"]
        out.data_error, out.probe_error, out.object_error = (_read(it, k, False) for k in
                                                             ("data_error", "probe_error", "object_error"))
    return out


def results(catalog: Any = None, *, scan_id: int | None = None, raw_uid: str | None = None,
            only_success: bool = False) -> DerivedResult:
    """The latest reconstruction of a raw scan: arrays, parameters, status (and reason if it failed)."""
    return load_result(find_derived(catalog, scan_id=scan_id, raw_uid=raw_uid, only_success=only_success))


def summary_png(res: DerivedResult, path: str | os.PathLike) -> str:
    """Object phase and amplitude, probe modes and the error curves in one PNG (written atomically):
    the same figure as ``hxn-ptycho reconstruct --png``."""
    from hxn_ptycho.plots import summary_png as plot
    from hxn_ptycho.resultfile import ResultData

    if not res.ok:
        raise NoResult(f"derived run {res.uid} failed ({res.reason}); there is nothing to plot")

    def curves(values: np.ndarray | None, width: int) -> np.ndarray:
        if values is None:
            return np.full((iters, width), np.nan)
        return np.asarray(values, dtype=float).reshape(iters, -1)

    iters = 0 if res.data_error is None else len(res.data_error)
    data = ResultData(object=res.object, probe=res.probe, positions_px=res.positions_px,
                      error_data=np.zeros(0) if res.data_error is None else np.asarray(res.data_error, float),
                      error_probe=curves(res.probe_error, res.probe.shape[0]),
                      error_object=curves(res.object_error, res.object.shape[0]),
                      probe_power_fraction=res.probe_power_fraction, params=res.recon)
    plot(data, path, title=f"scan {res.scan_id} — derived run {res.uid[:8]}, final data error "
                           f"{res.final_data_error:.4g}")
    return str(path)
