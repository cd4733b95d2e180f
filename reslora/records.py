"""Run records: one JSON per run, the only input of tables and figures."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

from .io import write_json

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "wandb", "numpy", "diffusers")


def record_path(results_dir: str | Path, scale: str, tag: str, task: str, method: str, seed: int) -> Path:
    return Path(results_dir) / "records" / scale / tag / task / method / f"seed{seed}.json"


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_done(path: Path) -> bool:
    record = read_record(path)
    return record is not None and record.get("status") == "ok"


def load_records(results_dir: str | Path, scale: str, tag: str) -> list[dict]:
    root = Path(results_dir) / "records" / scale / tag
    records = (read_record(p) for p in sorted(root.glob("*/*/seed*.json")))
    return [r for r in records if r is not None]


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"versions": versions, "git": _git(), "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count()}


def _git() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).parent).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status)}


def write_record(record: dict, *paths: Path) -> None:
    for path in paths:
        write_json(path, record)
