"""Atomic file writes: the one mechanism behind every results file, CSV, plot and cache entry.

``replace_atomic(path, write)`` writes into a temporary file beside ``path`` (named
``.<name>.tmp-<pid>-<random>``, so a cache can tell orphans of killed runs), flushes and fsyncs
it, gives it the mode a plain ``open()`` would (``mkstemp`` makes 0o600, which would hide results
from the rest of a team), moves it onto ``path`` with ``os.replace`` and fsyncs the folder. A
reader, or a run killed mid-write, sees the old file or the new one, never a truncated one; on
any error the temporary file is removed and ``path`` is untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["file_mode", "replace_atomic", "tmp_prefix", "write_text_atomic"]


def tmp_prefix(path: Path) -> str:
    """The start of the temporary files' names of ``path`` (followed by the writer's pid)."""
    return f".{path.name}.tmp-"


def file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """``write(f)`` into a binary temporary file beside ``path``, then moved onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{tmp_prefix(path)}{os.getpid()}-")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """``text`` (UTF-8) to ``path`` through :func:`replace_atomic`."""
    return replace_atomic(path, lambda f: f.write(text.encode("utf-8")))
