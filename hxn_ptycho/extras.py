"""The optional parts of the install, and a clear error naming the extra when one is missing.

``pip install hxn-ptycho`` is the compute stack only (engine, job, files, MPI: numpy, scipy, h5py,
tqdm, mpi4py, mpich) — what every rank on a compute node needs. The rest comes as extras:

- ``[beamline]``: the Bluesky layer and the catalog (serve, listen, demo, results, reconstruct
  --catalog): bluesky, event-model, ophyd, databroker, tiled, bluesky-tiled-plugins, pyzmq, ...;
  it includes ``[plots]``;
- ``[plots]``: matplotlib, for summary figures (``--png``); only rank 0 draws, and only when asked;
- ``[prefect]``: the Prefect flows (``hxn_ptycho.workflows``);
- ``[stream]``: the Eiger stream's decompression (bitshuffle, lz4) for ``listen --eiger-stream``;
- ``[gpu]`` / ``[gpu-cuda13]``: CuPy.

Checked with :func:`importlib.util.find_spec` (nothing is imported by the check).
"""
from __future__ import annotations

import importlib.util

from .errors import BadInput

#: the modules each extra provides (a missing one means the extra is not installed)
EXTRAS: dict[str, tuple[str, ...]] = {
    "beamline": ("bluesky", "event_model", "ophyd", "databroker", "tiled", "bluesky_tiled_plugins", "zmq",
                 "yaml", "matplotlib"),
    "plots": ("matplotlib",),
    "prefect": ("prefect",),
    "stream": ("bitshuffle", "lz4"),
    "gpu": ("cupy",),
}


class MissingExtra(BadInput):
    """A command needs an extra that is not installed; the message names it and the pip command."""


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be found here."""
    out = []
    for name in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtra` when ``what`` (e.g. ``hxn-ptycho listen``) cannot run here."""
    gone = missing(extra)
    if gone:
        raise MissingExtra(f"{what} needs the '{extra}' extra, which is not installed here (missing: "
                           f"{', '.join(gone)}): pip install 'hxn-ptycho[{extra}]' "
                           f"(this is a compute-only install: numpy, scipy, h5py, mpi4py)")
