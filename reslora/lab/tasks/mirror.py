"""The local data mirror: each file read is checked against the mirror's ``manifest.json`` (sha256, as
``../shared/data`` has it), once per file version (the hash is cached by path, size and mtime)."""

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


def verify_mirror_file(mirror: Path, path: Path, cache_dir: str | Path | None = None) -> None:
    """Refuse ``path`` when the mirror's manifest lists it with another sha256 (naming the file and both
    hashes). A mirror without a manifest, or a file it does not list, is read unverified (and recorded so)."""
    manifest_path = Path(mirror) / "manifest.json"
    relative = str(Path(path).resolve().relative_to(Path(mirror).resolve())) if manifest_path.is_file() else None
    entry = json.loads(manifest_path.read_text()).get(relative) if relative else None
    if entry is None or "sha256" not in entry:
        FILES_READ[str(path)] = {"verified": False}
        return
    stat = Path(path).stat()
    key = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
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
