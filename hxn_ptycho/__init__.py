"""hxn-ptycho: multi-mode Difference Map ptychography for the NSLS-II HXN beamline."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def results(catalog: Any = None, **query: Any) -> Any:
    """The stored reconstruction(s) of a scan: ``results(catalog, scan_id=N)`` or ``raw_uid=...``.

    Returns the arrays (object, probe modes, positions, errors) and the parameters of the newest
    readable derived run; ``uid=U`` picks one derived run, ``all=True`` lists every reconstruction
    of the scan. See :func:`hxn_ptycho.callbacks.query.results` (imported lazily so that the core
    never needs Bluesky or Tiled).
    """
    from hxn_ptycho.callbacks.query import results as _results
    return _results(catalog, **query)
