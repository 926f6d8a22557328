"""hxn-ptycho: multi-mode Difference Map ptychography for the NSLS-II HXN beamline.

The core (this package's modules) never imports the Bluesky layer; the stored reconstructions are
queried from it: ``from hxn_ptycho.callbacks import results``.
"""
from __future__ import annotations

__version__ = "0.1.0"
