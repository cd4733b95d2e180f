"""Assets: weights the project builds itself that shape a reported number, yet are neither a pretrained package
nor mirrored data (Fig. 3's judges, the text-to-image base).

An asset is named by its weights file's path relative to ``assets/`` or to the cache directory
(``t2i/judges-thick-e12.safetensors``): a committed file under ``assets/`` is used as it is, else the task builds
it into the cache. ``assets/SHA256SUMS`` (``sha256sum`` format: ``cd assets && sha256sum -c --ignore-missing
SHA256SUMS``) commits the hash of each asset that reported numbers used, whether its file is committed or rebuilt;
an asset whose file hashes otherwise is refused with an error naming it. Every record names the hash of each
asset it used (``assets.sha256``), and ``make check-records`` checks those against SHA256SUMS.

Builds run on one thread (``single_threaded``): torch's multi-threaded CPU kernels split their sums by thread
count, so a build on two threads gives other weights than on one. A rebuild on another processor can still
differ in the last bits (its vector kernels round otherwise), which is why the small files are committed.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from ..io import file_sha256

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
SHA256SUMS = "SHA256SUMS"


class AssetMismatch(ValueError):
    """An asset whose file is not the one its committed sha256 names."""


def committed_hashes() -> dict[str, str]:
    """{asset name: sha256} of ``assets/SHA256SUMS`` (empty when there is none)."""
    sums = ASSETS_DIR / SHA256SUMS
    if not sums.is_file():
        return {}
    rows = (line.split(maxsplit=1) for line in sums.read_text().splitlines() if line.strip())
    return {name.strip().lstrip("*"): sha for sha, name in rows}


def locate(name: str, cache_dir: str | Path) -> Path:
    """The asset's file: committed under ``assets/`` if it is there, else its place in the cache."""
    committed = ASSETS_DIR / name
    return committed if committed.is_file() else Path(cache_dir) / name


def verified_sha256(name: str, path: str | Path) -> str:
    """The sha256 of the asset ``name``'s file at ``path``, after checking it against assets/SHA256SUMS (an asset
    that SHA256SUMS does not list is only hashed)."""
    actual, expected = file_sha256(path), committed_hashes().get(name)
    if expected is not None and actual != expected:
        raise AssetMismatch(
            f"asset {name}: {path} has sha256 {actual}, but {ASSETS_DIR / SHA256SUMS} commits {expected}. Another "
            "build (other code, settings, or processor) made other weights: use the committed file, or delete this "
            "one and rebuild it on one thread; to adopt new weights, commit the file and its sha256 together")
    return actual


def commit_asset(name: str, files: list[Path]) -> str:
    """Copy an asset's built ``files`` (its weights file first, then any files that go with it: a config) into
    assets/, beside where ``name`` points, and write the weights file's sha256 into SHA256SUMS. Returns it."""
    target = ASSETS_DIR / name
    target.parent.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copyfile(file, target.parent / Path(file).name)
    sha256 = file_sha256(target)
    hashes = {**committed_hashes(), name: sha256}
    (ASSETS_DIR / SHA256SUMS).write_text("".join(f"{hashes[k]}  {k}\n" for k in sorted(hashes)))
    return sha256


def committed_file_problems() -> list[str]:
    """Committed asset files under assets/ whose sha256 is not the one SHA256SUMS commits."""
    problems = []
    for name, sha in committed_hashes().items():
        path = ASSETS_DIR / name
        if path.is_file() and (actual := file_sha256(path)) != sha:
            problems.append(f"assets/{name} has sha256 {actual[:12]}, assets/{SHA256SUMS} commits {sha[:12]}")
    return problems


def record_asset_problems(record: dict) -> list[str]:
    """What is wrong with the assets a record names: a hash that SHA256SUMS does not commit for that asset."""
    committed = committed_hashes()
    problems = []
    for name, sha in (record.get("assets") or {}).get("sha256", {}).items():
        if name not in committed:
            problems.append(f"asset {name} (sha256 {sha[:12]}) is not in assets/{SHA256SUMS}: commit its hash")
        elif committed[name] != sha:
            problems.append(f"asset {name}: the record used sha256 {sha[:12]}, assets/{SHA256SUMS} commits "
                            f"{committed[name][:12]}")
    return problems


def names_no_hashes(record: dict) -> bool:
    """A record of a task with assets (text-to-image) made before assets were hashed."""
    return bool(record.get("assets")) and "sha256" not in record["assets"]


@contextmanager
def single_threaded():
    """Run the block on one torch thread (the caller's thread count is restored after): a build gives the same
    weights whatever thread count the caller runs with."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
