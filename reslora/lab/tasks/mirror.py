"""The local data mirror: each file read is checked against the mirror's ``manifest.json`` (sha256, as
``../shared/data`` has it), once per file version (the hash is cached by path, size, mtime, ctime and inode); a
file it does not list is refused unless ``data.allow_unlisted``."""

from __future__ import annotations

import json
from pathlib import Path

from ...io import exclusive, file_sha256, write_json

# Every mirror file this process read (by its path in the mirror), with its sha256 and what its manifest says: the
# run record lists them.
FILES_READ: dict[str, dict] = {}


def cached_sha256(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """The sha256 of ``path``, hashed once per file version: cached under ``cache_dir`` keyed on its size, mtime,
    ctime and inode (``cp -p`` or ``tar x`` can restore a file's mtime, never its ctime)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"
    cache = Path(cache_dir or ".cache") / "mirror_sha256.json"
    with exclusive(cache):
        known = json.loads(cache.read_text()) if cache.is_file() else {}
        if key not in known:
            known[key] = file_sha256(path)
            write_json(cache, known)
    return known[key]


def verify_mirror_file(mirror: Path, path: Path, cache_dir: str | Path | None = None,
                       allow_unlisted: bool = False) -> None:
    """Refuse ``path`` when the mirror's manifest lists it with another sha256 (naming the file and both hashes),
    and when the manifest does not list it (or the mirror has none) unless ``allow_unlisted`` (config key
    ``data.allow_unlisted``): then it is read unverified, and recorded so, with its sha256 (what a rerun compares)."""
    manifest_path = Path(mirror) / "manifest.json"
    relative = str(Path(path).resolve().relative_to(Path(mirror).resolve()))
    entry = json.loads(manifest_path.read_text()).get(relative) if manifest_path.is_file() else None
    if entry is None or "sha256" not in entry:
        if not allow_unlisted:
            raise ValueError(f"{path} is not listed in {manifest_path}" + ("" if manifest_path.is_file() else
                             " (the mirror has no manifest)") + ", so it cannot be verified: add it there with its "
                             "sha256 and bytes, or set data.allow_unlisted=true to read it unverified (the record "
                             "then says verified: false)")
        FILES_READ[relative] = {"verified": False, "sha256": cached_sha256(path, cache_dir)}
        return
    digest = cached_sha256(path, cache_dir)
    if digest != entry["sha256"]:
        raise ValueError(f"{path} does not match {manifest_path}: sha256 {digest} where the manifest has "
                         f"{entry['sha256']} ({Path(path).stat().st_size} bytes, manifest {entry.get('bytes')}); the "
                         "file is truncated or altered: restore it from its source")
    FILES_READ[relative] = {"verified": True, "sha256": digest, "examples": entry.get("examples")}


def files_now(files_read: dict, mirror: str | Path | None, cache_dir: str | Path | None = None) -> dict:
    """The mirror files a record was made from (its ``data_files``) as they are in ``mirror`` now: {name: {sha256}}
    for each that is there (hashed through the cache), what ``data_differences`` compares it with."""
    paths = {name: Path(mirror) / name for name in files_read} if mirror else {}
    return {name: {"sha256": cached_sha256(path, cache_dir)} for name, path in paths.items() if path.is_file()}


def data_differences(then: dict, now: dict) -> list[str]:
    """How the mirror files a record or checkpoint was made from (its ``data_files``) differ from the files read now
    (``FILES_READ``, or ``files_now``): one line per file that is not read now or was not read then, has no sha256
    (an older record's unverified read), or has another sha256. Empty: the same data."""
    changed = []
    for name in sorted(then.keys() | now.keys()):
        old, new = (then.get(name) or {}).get("sha256"), (now.get(name) or {}).get("sha256")
        if name not in now:
            changed.append(f"{name} is not in the mirror now")
        elif name not in then:
            changed.append(f"{name} was not read then")
        elif old is None:
            changed.append(f"{name} was read unverified, without a sha256")
        elif old != new:
            changed.append(f"{name}: sha256 {old[:12]}... then, {new[:12]}... now")
    return changed
