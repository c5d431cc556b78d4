"""Safe on-disk caches for the studies and benchmarks.

A cache entry is one ``torch.save`` file. Reading is always ``torch.load(weights_only=True)``, so a
planted or tampered entry cannot run code; an entry that does not read back (truncated by a killed
run, empty, garbage, or a pickle that needs ``weights_only=False``) is treated as missing: a
:class:`CacheWarning` names the file, the entry is rebuilt and replaced.

Writes are atomic: the object is saved to a temporary file in the same folder, flushed and
fsync'ed, moved onto the entry with ``os.replace`` and the folder is fsync'ed, so a reader sees
either the old entry or the new one, never a partial file. A run killed mid-write leaves only its
temporary file (``.<name>.tmp-<pid>-<random>``); the next ``load_or_build`` of that entry removes
temporary files whose writer process no longer exists.

Builds are serialised per entry across processes (an exclusive ``flock`` on ``.<name>.lock``
beside it, where the system has one): a second process asking for an entry that another is
building waits, then loads what the first saved, instead of building it again (for example
several benchmark processes started together that share a pre-trained model). The lock file is
removed after the build; a process killed while building releases its lock with it.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..files import replace_atomic, tmp_prefix, write_text_atomic

__all__ = ["CacheWarning", "load_or_build", "save_atomic", "write_text_atomic"]

# Leaf types that torch.load(weights_only=True) reads back without extra allow-listing.
_LEAVES = (torch.Tensor, int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device,
           torch.Size)


class CacheWarning(UserWarning):
    """An unreadable cache entry was found (and rebuilt) or an orphan temporary file removed."""


def _check_loadable(obj: Any, where: str = "obj") -> None:
    """Raise TypeError naming the first element that weights_only loading would refuse."""
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"{where}: tensor subclass {type(obj).__name__} is not weights_only-loadable; "
                            "store a plain tensor (t.as_subclass(torch.Tensor))")
        return
    if isinstance(obj, _LEAVES):
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            _check_loadable(k, f"{where} key {k!r}")
            _check_loadable(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple, set)) and type(obj) in (list, tuple, set):
        for i, v in enumerate(obj):
            _check_loadable(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: {type(obj).__module__}.{type(obj).__qualname__} is not weights_only-loadable; "
                    "cache only tensors, dicts, lists, tuples, numbers and strings")


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically: write a temporary file in the same folder, flush
    and fsync it, ``os.replace`` it onto ``path``, fsync the folder. ``obj`` must be
    weights_only-loadable (tensors, dicts, lists, tuples, numbers, strings); anything else raises
    ``TypeError`` before a byte is written."""
    _check_loadable(obj)
    replace_atomic(path, lambda f: torch.save(obj, f))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but not ours, or cannot tell: leave its file alone
    return True


def _remove_orphans(path: Path) -> None:
    """Remove temporary files of ``path`` whose writer process is gone (a killed run)."""
    prefix = tmp_prefix(path)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        pid_text = name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and _pid_alive(int(pid_text)):
            continue
        orphan = path.parent / name
        try:
            orphan.unlink()
        except OSError:
            continue
        warnings.warn(f"removed orphan temporary file {orphan} (left by an interrupted run)",
                      CacheWarning, stacklevel=3)


def _stat(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _load(path: Path, what: str) -> tuple[bool, Any]:
    """``(True, object)`` if ``path`` reads back, else ``(False, None)`` (a warning names an
    unreadable entry)."""
    if not path.exists():
        return False, None
    if not path.is_file():
        raise IsADirectoryError(f"{what} {path} exists but is not a file; remove it or choose "
                                "another cache folder")
    try:
        return True, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means "rebuild"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in reason or "Weights only" in reason:
            reason = "it is not loadable with weights_only=True (it is never loaded unsafely)"
        warnings.warn(f"{what} {path} is unreadable ({type(exc).__name__}: {reason[:200]}); "
                      "rebuilding it", CacheWarning, stacklevel=3)
    return False, None


@contextmanager
def _build_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``.<name>.lock`` beside ``path`` (no-op without ``fcntl``)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: builds are not serialised
        yield
        return
    lock = path.parent / f".{path.name}.lock"
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"ofmu: waiting for another process that is building {what} {path}",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            try:  # only our own lock file: a waiter may already hold a newer one
                if os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:
                    lock.unlink()
            except OSError:
                pass
            fcntl.flock(f, fcntl.LOCK_UN)


def load_or_build(path: str | os.PathLike, build: Callable[[], Any], *, what: str = "cache entry") -> Any:
    """Return ``torch.load(path, weights_only=True)`` (on the CPU) if ``path`` exists and reads back;
    otherwise call ``build()``, save its result atomically (see :func:`save_atomic`) and return it.

    An unreadable entry (truncated, empty, garbage, or not loadable with ``weights_only=True``) is
    treated as missing: a :class:`CacheWarning` names the path and says it is rebuilt. Orphan
    temporary files of that entry left by a killed run are removed. The built object must be
    weights_only-loadable (tensors, dicts, lists, tuples, numbers, strings). While one process
    builds an entry, another asking for it waits and then loads it (module docstring)."""
    path = Path(path)
    _remove_orphans(path)
    found, obj = _load(path, what)
    if found:
        return obj
    seen = _stat(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(path, what):
        if _stat(path) != seen:  # another process saved it while this one waited
            found, obj = _load(path, what)
            if found:
                return obj
        obj = build()
        save_atomic(obj, path)
    return obj
