"""The local data mirror: each file read is checked against the mirror's ``manifest.json`` (sha256, as
``../shared/data`` has it), once per file version (the hash is cached by path, size, mtime, ctime and inode); a
file it does not list is refused unless ``data.allow_unlisted``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ...io import exclusive, write_json

# Every mirror file this process read, with what its manifest says: the run record lists them.
FILES_READ: dict[str, dict] = {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_mirror_file(mirror: Path, path: Path, cache_dir: str | Path | None = None,
                       allow_unlisted: bool = False) -> None:
    """Refuse ``path`` when the mirror's manifest lists it with another sha256 (naming the file and both hashes),
    and when the manifest does not list it (or the mirror has none) unless ``allow_unlisted`` (config key
    ``data.allow_unlisted``): then it is read unverified, and recorded so. The hash is cached per file version,
    keyed on the inode and ctime too: ``cp -p`` or ``tar x`` can restore a file's mtime, never its ctime."""
    manifest_path = Path(mirror) / "manifest.json"
    relative = str(Path(path).resolve().relative_to(Path(mirror).resolve()))
    entry = json.loads(manifest_path.read_text()).get(relative) if manifest_path.is_file() else None
    if entry is None or "sha256" not in entry:
        if not allow_unlisted:
            raise ValueError(f"{path} is not listed in {manifest_path}" + ("" if manifest_path.is_file() else
                             " (the mirror has no manifest)") + ", so it cannot be verified: add it there with its "
                             "sha256 and bytes, or set data.allow_unlisted=true to read it unverified (the record "
                             "then says verified: false)")
        FILES_READ[str(path)] = {"verified": False}
        return
    stat = Path(path).stat()
    key = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"
    cache = Path(cache_dir or ".cache") / "mirror_sha256.json"
    with exclusive(cache):
        known = json.loads(cache.read_text()) if cache.is_file() else {}
        digest = known.get(key)
        if digest is None:
            digest = known[key] = _sha256(Path(path))
            write_json(cache, known)
    if digest != entry["sha256"]:
        raise ValueError(f"{path} does not match {manifest_path}: sha256 {digest} where the manifest has "
                         f"{entry['sha256']} ({stat.st_size} bytes, manifest {entry.get('bytes')}); the file is "
                         "truncated or altered: restore it from its source")
    FILES_READ[relative] = {"verified": True, "sha256": digest, "examples": entry.get("examples")}


def data_differences(files_read: dict, mirror: str | Path | None) -> list[str]:
    """How the mirror files a record was made from (its ``data_files``) differ from those files in ``mirror`` now:
    one line per file that was read unverified, is gone, or has another sha256 (empty: the same data)."""
    changed = []
    for name, read in files_read.items():
        path = Path(mirror or "") / name
        if not read.get("verified"):
            changed.append(f"{name} was read unverified")
        elif not mirror or not path.is_file():
            changed.append(f"{name} is not in the mirror {mirror}")
        elif (digest := _sha256(path)) != read["sha256"]:
            changed.append(f"{name}: sha256 {read['sha256'][:12]}... then, {digest[:12]}... now")
    return changed
