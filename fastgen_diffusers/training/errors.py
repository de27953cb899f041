"""Errors that are the user's to fix, and how the command line reports them.

A :class:`UserError` is a mistake in the command line, the recipe, the data or the files a run
was pointed at: it says what was wrong (flag, value, file, row), what was expected and what to
do. :func:`~fastgen_diffusers.training.cli.main` prints it as one ``error: ...`` line and exits
with status 2, without a traceback; any other exception is a fault of the program and keeps its
traceback.

Example::

    from fastgen_diffusers.training.errors import UserError

    raise UserError(
        "--adam_beta1 1.5 is out of range", expected="a value in [0, 1)", fix="pass e.g. 0.9"
    )
"""

from __future__ import annotations

import errno
import os

__all__ = ["OutputNotWritableError", "UserError", "disk_full_path", "is_disk_full"]


class UserError(ValueError):
    """A user's mistake: ``problem``, then what was ``expected``, then the ``fix``.

    A ``ValueError``, so callers that catch bad values keep catching it.
    """

    def __init__(self, problem: str, *, expected: str | None = None, fix: str | None = None):
        message = problem
        if expected:
            message += f"; expected {expected}"
        if fix:
            message += f": {fix}"
        super().__init__(message)
        self.problem, self.expected, self.fix = problem, expected, fix


class OutputNotWritableError(UserError, PermissionError):
    """``--output_dir`` (or a folder a run writes to) cannot be written."""


_DISK_FULL_TEXT = ("No space left on device", "StorageFull", "Disk quota exceeded")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is a full disk: ``OSError`` with
    ``ENOSPC`` / ``EDQUOT``, or the same reported as text by a writer that wraps it (torch's
    ``PytorchStreamWriter``, safetensors)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(current) for text in _DISK_FULL_TEXT):
            return True
        current = current.__cause__ or current.__context__
    return False


def disk_full_path(error: BaseException) -> str | None:
    """The file a disk-full ``error`` names (``OSError.filename`` along its chain), if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.filename:
            return os.fspath(current.filename)
        current = current.__cause__ or current.__context__
    return None
