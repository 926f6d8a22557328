"""The one error root of hxn-ptycho.

Every error we raise on purpose derives from :class:`HxnPtychoError`; its ``exit_status`` is what
a command exits with. :class:`BadInput` (status 2) is input we refuse — a bad option, file,
parameter or document — with a message that names the problem.
"""
from __future__ import annotations


class HxnPtychoError(Exception):
    """Root of every error hxn-ptycho raises on purpose; ``exit_status`` is a command's exit status."""

    exit_status: int = 1


class BadInput(HxnPtychoError, ValueError):
    """Input we refuse (exit status 2); the message names the bad item."""

    exit_status = 2
