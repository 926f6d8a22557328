"""Helpers for the HXN scan tests: run a simulated beamline scan and collect its documents."""
from __future__ import annotations

from typing import Any

from event_model import RunRouter


def make_re(hxn: Any) -> Any:
    from bluesky import RunEngine
    from bluesky.preprocessors import SupplementalData
    RE = RunEngine({}, call_returns_result=False)
    RE.preprocessors.append(SupplementalData(baseline=hxn.baseline))
    return RE


def collect(RE: Any) -> list:
    """Subscribe a collector to ``RE``; the returned list receives each finished CollectedRun."""
    from hxn_ptycho.callbacks.collector import RunCollector
    got: list = []
    RE.subscribe(RunRouter([lambda name, start: ([RunCollector(start, got.append)], [])]))
    return got


def run_scan(kind: str, tmp_path: Any, n_positions: int = 64, seed: int = 1, setup: Any = None,
             **sample_kw: Any) -> tuple[Any, Any, Any, Any]:
    """(CollectedRun, sample, truth, hxn) of one simulated scan of type ``kind``."""
    import warnings

    from hxn_ptycho.callbacks.sim_beamline import make_hxn, plan_for, simulated_scan
    sample, truth = simulated_scan(kind, n_positions=n_positions, seed=seed, **sample_kw)
    hxn = make_hxn(tmp_path / "detector")
    if setup is not None:
        setup(hxn, sample)
    RE = make_re(hxn)
    got = collect(RE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)       # bluesky: kickoff(num=...) kwargs
        RE(plan_for(kind, hxn, sample))
    return got[0], sample, truth, hxn
