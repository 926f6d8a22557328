"""The Bluesky layer of hxn-ptycho (installed as ``hxn_ptycho.callbacks``).

``results(catalog, scan_id=N)`` (or ``raw_uid=...``, ``uid=...``, ``all=True``) returns the stored
reconstruction(s) of a scan: see :func:`hxn_ptycho.callbacks.query.results` (imported on first use,
so that importing a callback module does not import the Tiled client). ``live_preview(catalog,
raw_uid=...)`` returns the live preview of a scan being reconstructed (:mod:`.live`).
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "results":
        from .query import results
        return results
    if name == "live_preview":
        from .live import live_preview
        return live_preview
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
