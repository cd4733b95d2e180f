"""Benchmark families: each supplies data, collate, loss and evaluation to the shared loop."""

from __future__ import annotations

from pathlib import Path


def build_task(cfg):
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
