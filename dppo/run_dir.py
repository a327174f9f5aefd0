"""Run folders: resolved config, JSON-lines metrics, summary, plots, an incomplete marker."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

INCOMPLETE = "INCOMPLETE"
"""Marker file present while a run is in progress or after it crashed."""


def default_run_path(kind: str, task: str, root: str | Path = "runs") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{kind}-{task}-{stamp}"


class RunDir:
    """One folder per run: ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``plots/``."""

    def __init__(
        self, path: str | Path, config: dict[str, Any] | None = None, resume: bool = False
    ):
        self.path = Path(path)
        if self.path.exists() and any(self.path.iterdir()) and not resume:
            raise FileExistsError(
                f"run folder {self.path} exists and is not empty; pick another out="
            )
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / INCOMPLETE).write_text(f"started {time.ctime()}\n")
        if config is not None and not resume:
            (self.path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.start = time.time()

    @property
    def checkpoints(self) -> Path:
        p = self.path / "checkpoints"
        p.mkdir(exist_ok=True)
        return p

    @property
    def plots(self) -> Path:
        p = self.path / "plots"
        p.mkdir(exist_ok=True)
        return p

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        f = self.path / "metrics.jsonl"
        if not f.exists():
            return []
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, keep: Any) -> None:
        """Keep only the metric records for which ``keep(record)`` is true (used on resume)."""
        records = [r for r in self.read_metrics() if keep(r)]
        (self.path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        summary = {**summary, "wall_time_s": round(time.time() - self.start, 2)}
        write_json(self.path / "summary.json", summary)
        (self.path / INCOMPLETE).unlink(missing_ok=True)
        return summary


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    tmp.replace(path)


def plot_curves(
    path: Path, records: list[dict[str, Any]], x: str, ys: list[str], title: str
) -> None:
    """Save a PNG with one panel per metric in ``ys`` against ``x`` (missing points skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ys = [y for y in ys if any(y in r for r in records)]
    if not ys:
        return
    fig, axes = plt.subplots(1, len(ys), figsize=(4 * len(ys), 3), squeeze=False)
    for ax, y in zip(axes[0], ys, strict=True):
        pts = [(r[x], r[y]) for r in records if y in r and x in r and r[y] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o" if len(pts) < 30 else None)
        ax.set_xlabel(x)
        ax.set_title(y)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
