"""hxn-ptycho: multi-mode Difference Map ptychography for the NSLS-II HXN beamline."""
__version__ = "0.1.0"
