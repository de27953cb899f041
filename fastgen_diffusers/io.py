"""Atomic writes: a file or a folder appears at its final path complete, or not at all.

Everything is first written under a hidden sibling name starting with ``.tmp-`` (same folder, so
the final rename stays on one file system; the Hub upload skips ``.tmp*``), then renamed into
place. A writer that raises leaves the target as it was and removes what it wrote. Temporaries
are created with the process umask (not ``mkstemp``'s 0600 / ``mkdtemp``'s 0700), so written
files keep the permissions of their neighbours.

Example::

    from fastgen_diffusers.io import atomic_directory, atomic_file, write_json_atomic

    with atomic_file("out/notes.txt") as f:
        f.write("hello\\n")
    write_json_atomic("out/scheduler/scheduler_config.json", {"shift": 1.0})
    with atomic_directory("out/transformer") as tmp:
        model.save_pretrained(tmp)  # "out/transformer" is swapped in only now
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "TMP_PREFIX",
    "atomic_directory",
    "atomic_file",
    "atomic_path",
    "commit_directory",
    "remove_directory",
    "write_json_atomic",
    "write_text_atomic",
]

TMP_PREFIX = ".tmp-"


def _named(error: BaseException, path: Path) -> BaseException:
    """A full-disk ``OSError`` raised by a write (which names no file) with ``path`` named, so
    the message says where space ran out; any other error unchanged."""
    if (
        isinstance(error, OSError)
        and error.errno in (errno.ENOSPC, errno.EDQUOT)
        and not error.filename
    ):
        named = OSError(error.errno, os.strerror(error.errno), str(path))
        named.__cause__ = error
        return named
    return error


def _sibling(path: Path, tag: str) -> Path:
    # Unique per call: concurrent writers of one target never share a temporary.
    return path.with_name(f"{TMP_PREFIX}{tag}{uuid.uuid4().hex[:12]}-{path.name}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path`` (not created) for a writer that takes a
    file name; on a clean exit the file written there is flushed to disk and renamed over
    ``path``. If the block raises, the temporary is removed, ``path`` is left as it was and the
    error propagates.

    Example::

        with atomic_path("out/model.safetensors") as tmp:
            safetensors.torch.save_file(tensors, tmp)
    """
    path = Path(path)
    tmp = _sibling(path, "")
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written to {tmp} for {path}")
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        named = _named(err, path)
        if named is not err:
            raise named from err
        raise


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike,
    mode: str = "w",
    *,
    encoding: str | None = "utf-8",
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing (``mode`` ``"w"`` or ``"wb"``); on a
    clean exit it is flushed, synced and renamed over ``path``. If the block raises, ``path`` is
    untouched and the temporary removed.

    Example::

        with atomic_file("out/README.md", newline="") as f:
            f.write(card_text)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        # "x": the temporary is new (never someone else's file) and gets umask permissions.
        f: IO[Any]
        if mode == "wb":
            f = open(tmp, "xb")
        else:
            f = open(tmp, "x", encoding=encoding, newline=newline)
        with f:
            yield f


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (no newline translation); returns ``path``."""
    path = Path(path)
    with atomic_file(path, encoding=encoding, newline="") as f:
        f.write(text)
    return path


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented, key-sorted JSON to ``path`` atomically, creating missing
    parent folders; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        json.dump(data, f, indent=2, sort_keys=True)
    return path


def remove_directory(path: str | os.PathLike) -> None:
    """Delete the folder ``path`` (if it exists) without ever showing it half-deleted: it is
    first renamed to a hidden sibling, then removed. A crash mid-delete leaves only that
    ``.tmp-`` sibling, which nothing lists."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    trash = _sibling(path, "old-")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def commit_directory(
    tmp: str | os.PathLike, path: str | os.PathLike, *, overwrite: bool = True
) -> bool:
    """Move the finished folder ``tmp`` (a sibling of ``path``) to ``path``.

    ``overwrite=True``: an existing ``path`` is first renamed out of the visible set (a hidden
    ``.tmp-`` sibling), ``tmp`` is renamed in, then the old content is deleted, so ``path`` holds
    the old content or the new one, never a mix. ``overwrite=False``: an existing non-empty
    ``path`` is kept (a concurrent writer of the same content finished first) and ``tmp`` is
    deleted. Returns whether ``tmp`` became ``path``.
    """
    tmp, path = Path(tmp), Path(path)
    if not overwrite:
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        return True
    trash = None
    if path.exists() or path.is_symlink():
        trash = _sibling(path, "old-")
        os.rename(path, trash)
    try:
        os.replace(tmp, path)
    except BaseException:
        if trash is not None:
            os.rename(trash, path)  # put the old content back
        raise
    if trash is not None:
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a new empty hidden sibling folder of ``path`` to build into; on a clean exit it
    becomes ``path`` (see :func:`commit_directory` for ``overwrite``). If the block raises, the
    folder is deleted, ``path`` is left as it was and the error propagates. The parent folder
    must exist.

    Example::

        with atomic_directory("cache/abc123", overwrite=False) as tmp:
            (tmp / "index.json").write_text("{}")
    """
    path = Path(path)
    tmp = _sibling(path, "")
    tmp.mkdir()  # umask permissions, unlike mkdtemp's 0700
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        named = _named(err, path)
        if named is not err:
            raise named from err
        raise
    try:
        commit_directory(tmp, path, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
