"""Crash-safe file writes: after a crash (or a kill) a reader finds either the old file or the complete new
one, never a part of it.

Each write goes to a uniquely named temporary file in the target's folder (``.<name>.<random>.tmp``, so two
writers never share one and the rename stays on one file system), which is flushed and fsynced, renamed over
the target with ``os.replace`` (atomic on POSIX), and then the folder is fsynced so that the rename itself
survives a power cut. Files get the usual permissions (``0o666`` less the umask).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_path", "atomic_write", "atomic_write_text", "fsync_dir"]


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder: makes renames and new names in it durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary path next to ``path`` for a writer that takes a file name (e.g. safetensors'
    ``save_file``). When the block ends normally the file is fsynced and renamed to ``path`` and the folder
    fsynced; when it raises, the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write`` on a binary file that atomically becomes ``path`` (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    data = text.encode(encoding)
    atomic_write(path, lambda fh: fh.write(data))
