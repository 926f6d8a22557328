"""Prefect flows for NSLS-II's end-of-run pipeline (``pip install -e ".[prefect]"``, Prefect 3).

At NSLS-II a Kafka consumer starts ``run_deployment("end-of-run-workflow/<deployment>",
parameters={"stop_doc": stop_doc})`` for every stop document; the flow takes
``stop_doc["run_start"]`` and reads the run from Tiled. This module follows that shape — see
NSLS2/hex-workflows ``end_of_run_workflow.py`` (the flow's signature, skipping runs that did not
succeed), ``data_validation.py`` (``get_run`` as a retried task reading ``raw[uid]`` from Tiled) and
``prefect.yaml`` (entrypoint + work pool) — so these flows can be added to an HXN workflows repository:

- :func:`end_of_run_workflow` (``stop_doc``): reconstructs the run if it is a ptychography run that
  succeeded (same selection as the callback), else logs why not and returns None;
- :func:`reconstruct` (``uid``, ``catalog``, ``**options``): run ``uid`` of ``catalog`` → scan file
  → job spec → job (``mpiexec`` for ``nprocs`` > 1) → derived run, published by the one publisher.
  ``options`` are the :class:`~hxn_ptycho.params.ReconParams` fields (``power_bound=0.5``) and
  ``nprocs``, ``mode``, ``force_nprocs``, ``output``, ``png``.

The catalog defaults to ``$HXN_PTYCHO_CATALOG`` and the Tiled key to ``$TILED_API_KEY`` (set them in
the work pool's environment; never pass a key as a parameter).
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

__all__ = ["end_of_run_workflow", "reconstruct"]


@task(retries=2, retry_delay_seconds=5)
def stored_run_start(uid: str, catalog: str | None) -> dict:
    """The start (and stop) document of raw run ``uid`` (retried: the run may still be being written)."""
    from hxn_ptycho.callbacks.commands import find_stored_run
    raw = find_stored_run(catalog, uid=uid)
    return {"start": dict(raw.metadata["start"]), "stop": dict(raw.metadata.get("stop") or {})}


@flow(name="hxn-ptycho-reconstruct", log_prints=True)
def reconstruct(uid: str, catalog: str | None = None, refuse: str | None = None, **options: Any) -> dict:
    """Reconstruct run ``uid`` of ``catalog`` and publish its derived run; returns what happened.

    Exactly once: however often the run is delivered, it gets one derived run, under the uid the
    listener's :func:`~hxn_ptycho.callbacks.derived.run_uid` gives its result file (named after the
    run); a delivery finding that run complete returns it without running again
    (:func:`~hxn_ptycho.callbacks.commands.reconstruct_stored_once`). A run that cannot be exported
    (or ``refuse``, a reason not to run it) is recorded as a ``fail`` derived run. Raises (the flow
    run fails) when the reconstruction failed — after recording the failure in the catalog.
    """
    from hxn_ptycho.callbacks.commands import reconstruct_stored_once
    from hxn_ptycho.job import final_line
    from hxn_ptycho.spec import parts_from_options

    logger = get_run_logger()
    params, execution, rest = parts_from_options(dict(options), extra=("output", "png"))
    logger.info("reconstructing raw run %s: %d rank(s), mode %s", uid, execution.ranks, execution.mode)
    status, outcome, derived_uid = reconstruct_stored_once(catalog, uid, params=params, execution=execution,
                                                           output=rest.get("output"), png=rest.get("png"),
                                                           refuse=refuse)
    logger.info("%s; derived run %s", final_line(outcome), derived_uid)
    if status != 0:
        raise RuntimeError(f"the reconstruction of run {uid} failed: {outcome.get('reason')} "
                           f"(recorded as derived run {derived_uid})")
    return {"raw_uid": uid, "derived_uid": derived_uid, "result_file": outcome.get("result_file"),
            "measured": outcome.get("measured")}


@flow(name="end-of-run-workflow", log_prints=True)
def end_of_run_workflow(stop_doc: dict, catalog: str | None = None, **options: Any) -> dict | None:
    """NSLS-II's end-of-run entry: reconstruct ``stop_doc["run_start"]`` if it is a ptychography run
    that ended in success (a stop without ``exit_status`` is recorded as ``fail`` naming that);
    ``options`` as for :func:`reconstruct`."""
    from hxn_ptycho.callbacks.export import ExportConfig
    from hxn_ptycho.callbacks.router import is_ptycho_run

    logger = get_run_logger()
    uid = stop_doc["run_start"]
    status = stop_doc.get("exit_status")
    if status is not None and status != "success":
        logger.info("run %s ended with exit_status %r: not reconstructed", uid, status)
        return None
    start = stored_run_start(uid, catalog)["start"]
    if not is_ptycho_run(start, ExportConfig().detectors):
        logger.info("run %s (scan %s) is not a ptychography run: not reconstructed", uid, start.get("scan_id"))
        return None
    refuse = None if status is not None else \
        "not reconstructed: its stop document has no exit_status, so how the scan ended is unknown"
    return reconstruct(uid, catalog, refuse=refuse, **options)
