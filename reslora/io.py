"""Atomic file writes: a reader (or a run killed mid-write) never sees a half-written file."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds. An OSError while
    writing (a full disk, a read-only directory) is raised again naming ``path``, which the system's message
    (``[Errno 28] No space left on device``) does not."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results private to their writer
        os.replace(tmp, path)
    except OSError as error:
        message = f"could not write {path}: {error.strerror or error}"
        # with an errno, OSError(errno, message) keeps the error's class (PermissionError, ...); without, "[Errno None]"
        raise (OSError(message) if error.errno is None else OSError(error.errno, message)) from error
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def exclusive(path: str | Path):
    """Hold an inter-process lock named after ``path`` (a cache entry), so that the parallel runs of a sweep on
    a fresh machine build it once: the first builds it, the others wait, then find it built."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(path.name + ".lock"))):
        yield


def write_json(path: str | Path, data) -> None:
    """Strict JSON: a NaN or infinity is refused (``ValueError``), never written as the non-standard ``NaN``."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's content, read in blocks (mirror files and assets can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
