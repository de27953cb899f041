"""Errors the command line reports as one message (no traceback)."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A mistake in the user's input: printed as one message, exit status 2."""
