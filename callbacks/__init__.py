"""The Bluesky layer of hxn-ptycho (installed as ``hxn_ptycho.callbacks``)."""
