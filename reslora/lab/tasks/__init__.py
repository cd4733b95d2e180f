"""Benchmark families: each supplies data, collate, loss and evaluation to the shared loop."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch


class Task(Protocol):
    """What the shared loop needs from a benchmark family (GLUE, reasoning, text-to-image)."""

    name: str
    headline: str  # the metric that model selection and the tables use

    def load_model(self, model_cfg) -> torch.nn.Module: ...

    def datasets(self) -> dict:
        """{'train', 'validation', 'test'[, 'test_<extra>']: datasets}."""

    def collate(self): ...

    def model_inputs(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """The keyword arguments of one forward of the model for ``batch`` (a collated training batch): what
        training, evaluation and the merge calibration (merge_ls) all feed the model. ``generator``: the
        random source of tasks whose inputs are random (text-to-image noise and timesteps)."""

    def loss(self, model, batch: dict) -> torch.Tensor: ...

    def evaluate(self, model, loader, accelerator) -> dict:
        """Metrics of the model on ``loader``, and per-item predictions under ``items`` where the task has
        items (test splits)."""


def seeded_parts(n: int, seed: int, sizes: dict[str, int | None]) -> dict[str, np.ndarray]:
    """Disjoint parts of ``range(n)``, taken one after another from a seeded random order, in the order of
    ``sizes`` (a size of None: all that is left). The order is ``np.random.default_rng(seed).permutation(n)``, the
    one ``datasets.Dataset.shuffle(seed=...)`` draws. Every task family splits with it (GLUE, reasoning,
    text-to-image)."""
    order = np.random.default_rng(seed).permutation(n)
    parts, start = {}, 0
    for name, size in sizes.items():
        stop = n if size is None else min(n, start + size)
        parts[name], start = order[start:stop], stop
    return parts


def build_task(cfg) -> Task:
    """The task object for ``cfg.task`` (family ``glue``, ...), reading data per ``cfg.data``."""
    if cfg.data.mirror and not Path(cfg.data.mirror).is_dir():
        raise FileNotFoundError(f"data.mirror={cfg.data.mirror!r} (DATA_MIRROR) is not a directory")
    if cfg.task.family == "glue":
        from .glue import GlueTask

        return GlueTask(cfg.task, cfg.data, cfg.seed)
    if cfg.task.family == "reasoning":
        from .reasoning import ReasoningTask

        return ReasoningTask(cfg.task, cfg.data, cfg.seed)
    if cfg.task.family == "text2image":
        from .text2image import Text2ImageTask

        return Text2ImageTask(cfg.task, cfg.data, cfg.seed)
    raise ValueError(f"task.family={cfg.task.family!r} is not supported; choose one of ['glue', 'reasoning', "
                     "'text2image']")
