"""Small helpers every stage uses to write artifacts safely and say what made them."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON atomically (see `write_atomic`)."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`:
    readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data if isinstance(data, bytes) else data.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        shareable(Path(tmp))
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            # A failed write() names no file; the user needs to know which one.
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def shareable(path: Path) -> None:
    """Give a file (or every file under a directory) the usual umask-derived mode.

    mkstemp and safetensors create 0600 files; pools are meant to be read by every user
    and process on a shared filesystem, like any other file written there."""
    umask = os.umask(0)
    os.umask(umask)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        os.chmod(f, 0o666 & ~umask)


def read_json(path: Path) -> Any:
    with path.open() as fh:
        return json.load(fh)


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive `flock` on `path` (created if missing). Yields False instead of
    waiting when `blocking` is False and another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fh.fileno(), flags)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def library_versions() -> dict[str, str]:
    """Versions of what produced an artifact (imports only what is already loaded or cheap)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("merge-mix", "torch", "transformers", "tokenizers", "safetensors", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
