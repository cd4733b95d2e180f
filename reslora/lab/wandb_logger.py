"""W&B logging for one run: offline by default (``wandb sync`` later), disabled in tests, online on request.
Each run is finished at its end, so jobs of a multirun never share a W&B run. The W&B run id is derived from the
run dir, with ``resume="allow"``: a run resumed from its checkpoint continues the same W&B run."""

from __future__ import annotations

import hashlib
from pathlib import Path

MODES = ("offline", "online", "disabled")


class RunLogger:
    def __init__(self, cfg, name: str, group: str, config: dict, run_dir: Path, tags: list[str] = (),
                 main_process: bool = True):
        if cfg.mode not in MODES:
            raise ValueError(f"logger.mode={cfg.mode!r}; choose one of {list(MODES)}")
        self.run = None
        if cfg.mode != "disabled" and main_process:  # one W&B run per run, whatever the number of processes
            import wandb

            run_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, name=name, group=group,
                                  config=config, dir=str(run_dir), reinit="finish_previous", id=run_id(run_dir),
                                  resume="allow", tags=[str(t) for t in tags])

    def artifact(self, path: Path, name: str) -> None:
        """Attach a file (the run record) to the run."""
        if self.run is not None:
            import wandb

            artifact = wandb.Artifact(name, type="run-record")
            artifact.add_file(str(path))
            self.run.log_artifact(artifact)

    def log(self, values: dict, step: int) -> None:
        if self.run is not None:  # numbers only (text2image metrics also carry a PNG of samples)
            self.run.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def run_id(run_dir: Path) -> str:
    """A W&B run id that the same run dir always gets (the run dir is keyed by the run's config)."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
