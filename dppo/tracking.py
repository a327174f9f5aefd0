"""Optional wandb mirror of the run folder's metrics (off or offline by default: no network)."""

from __future__ import annotations

import os
from typing import Any

WANDB_MODES = ("disabled", "offline", "online")


class Tracker:
    """Sends metric records to wandb when enabled; the run folder stays the source of truth."""

    def __init__(self, mode: str, project: str, run_dir: str, config: dict[str, Any]):
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb.mode must be one of {WANDB_MODES}, got {mode!r}")
        self.run = None
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(project=project, dir=run_dir, mode=mode, config=config)

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(record, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
