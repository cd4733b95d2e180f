"""Atomic writes and the cache lock that lets the parallel runs of a sweep share a cache entry."""

from __future__ import annotations

import errno
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from reslora.io import atomic_path, exclusive, write_json


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    write_json(path, {"status": "ok"})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half a rec")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == '{\n  "status": "ok"\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def build_once(entry: str, log: str) -> None:
    """What load_smollm2 does with its cache: check under the lock, build if missing (slowly)."""
    with exclusive(Path(entry)):
        if not Path(entry).exists():
            with open(log, "a") as f:
                f.write("built\n")
            time.sleep(0.5)
            Path(entry).write_text("model")


def test_parallel_runs_build_a_cache_entry_once(tmp_path):
    entry, log = tmp_path / "cache" / "model", tmp_path / "log"
    workers = [multiprocessing.Process(target=build_once, args=(str(entry), str(log))) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert log.read_text() == "built\n" and entry.read_text() == "model"


def test_a_write_that_fails_names_the_path_it_could_not_write(tmp_path):
    target = tmp_path / "records" / "seed0.json"
    with pytest.raises(OSError, match=f"could not write {target}: No space left on device") as raised:
        with atomic_path(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert raised.value.errno == errno.ENOSPC
    assert not target.exists() and list(target.parent.iterdir()) == []  # no temporary file left behind


def test_a_write_that_fails_without_an_errno_names_the_path(tmp_path):
    target = tmp_path / "seed0.json"
    with pytest.raises(OSError) as raised:
        with atomic_path(target):
            raise OSError("the mount went away")
    assert str(raised.value) == f"could not write {target}: the mount went away" and raised.value.errno is None
    assert list(tmp_path.iterdir()) == []


def test_a_write_refused_keeps_its_error_class(tmp_path):
    with pytest.raises(PermissionError, match=f"could not write {tmp_path / 'seed0.json'}: Permission denied"):
        with atomic_path(tmp_path / "seed0.json"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
