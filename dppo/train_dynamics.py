"""``dppo train-dynamics``: fit DynaGuide's dynamics model on a demonstration dataset.

Training pairs follow the policy's chunk convention: the window anchored at step t of an episode
holds observations t-To+1..t and actions t-To+1..t-To+Tp (indices clipped to the episode, as in
``envs.dataset.WindowDataset``); the target is the observation at t + future_steps (clipped to
the episode's last observation). Episodes are split into training and validation sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from dppo.config import require, to_container
from dppo.pretrain import task_io_spec
from dppo.run_dir import RunDir, default_run_path, plot_curves
from dppo.schedules import warmup_cosine
from dppo.tracking import Tracker
from envs.dataset import DemoDataset
from policies.checkpoint import LATEST
from policies.dynaguide import DynamicsConfig, DynamicsModel, save_dynamics
from policies.normalizer import ACTION_KEY


def dynamics_windows(
    dataset: DemoDataset, n_obs_steps: int, horizon: int, future_steps: int
) -> dict[str, Any]:
    """Every anchor of every episode as tensors.

    Returns {"obs": {key: (N, To, *shape)}, "action": (N, Tp, Da), "future": {key: (N, *shape)},
    "episode": (N,) episode index}.
    """
    obs_idx, act_idx, fut_idx, episode = [], [], [], []
    for e, (start, end) in enumerate(
        zip(dataset.episode_starts, dataset.episode_ends, strict=True)
    ):
        length = int(end - start)
        t = np.arange(length)
        obs_idx.append(start + np.clip(t[:, None] + np.arange(1 - n_obs_steps, 1), 0, length - 1))
        offsets = np.arange(1 - n_obs_steps, horizon - n_obs_steps + 1)
        act_idx.append(start + np.clip(t[:, None] + offsets, 0, length - 1))
        fut_idx.append(start + np.minimum(t + future_steps, length - 1))
        episode.append(np.full(length, e))
    oi, ai, fi = (np.concatenate(a) for a in (obs_idx, act_idx, fut_idx))
    return {
        "obs": {k: torch.as_tensor(v[oi], dtype=torch.float32) for k, v in dataset.obs.items()},
        "action": torch.as_tensor(dataset.action[ai]),
        "future": {k: torch.as_tensor(v[fi], dtype=torch.float32) for k, v in dataset.obs.items()},
        "episode": torch.as_tensor(np.concatenate(episode)),
    }


def _select(windows: dict[str, Any], mask: torch.Tensor) -> dict[str, Any]:
    return {
        "obs": {k: v[mask] for k, v in windows["obs"].items()},
        "action": windows["action"][mask],
        "future": {k: v[mask] for k, v in windows["future"].items()},
    }


def _batch(windows: dict[str, Any], idx: torch.Tensor) -> tuple:
    return (
        {k: v[idx] for k, v in windows["obs"].items()},
        windows["action"][idx],
        {k: v[idx] for k, v in windows["future"].items()},
    )


def split_episodes(
    n_episodes: int, val_fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """Indices of the validation episodes (none when the fraction is 0 or there is one episode)."""
    n_val = int(round(n_episodes * val_fraction))
    n_val = min(max(n_val, 1 if val_fraction > 0 else 0), n_episodes - 1)
    return torch.randperm(n_episodes, generator=generator)[:n_val]


@torch.no_grad()
def evaluate_loss(model: DynamicsModel, windows: dict[str, Any], batch_size: int) -> float:
    n = len(windows["action"])
    total = 0.0
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(s + batch_size, n))
        total += model.loss(*_batch(windows, idx)).item() * len(idx)
    return total / n


def validate(cfg: DictConfig) -> None:
    t = cfg.train
    require(t.steps > 0, f"train.steps must be > 0, got {t.steps}")
    require(t.batch_size > 0, f"train.batch_size must be > 0, got {t.batch_size}")
    require(0 <= t.warmup_steps < t.steps, "train.warmup_steps must be in [0, train.steps)")
    require(0 <= t.val_fraction < 1, f"train.val_fraction must be in [0, 1), got {t.val_fraction}")
    require(cfg.dynamics.future_steps >= 1, "dynamics.future_steps must be >= 1")
    require(Path(cfg.dataset).exists(), f"dataset {cfg.dataset} not found")


def train_dynamics(cfg: DictConfig) -> dict[str, Any]:
    """Train, validate and save; returns the summary written to ``<run>/summary.json``."""
    validate(cfg)
    t = cfg.train
    torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    task = cfg.task.name
    obs_shapes, action_dim = task_io_spec(task)
    dataset = DemoDataset(cfg.dataset, obs_keys=obs_shapes, action_dim=action_dim)
    require(
        dataset.meta.get("task") in (None, task),
        f"dataset {cfg.dataset} was recorded on task {dataset.meta.get('task')!r}, "
        f"not {task!r}; pass task={dataset.meta.get('task')}",
    )
    d = cfg.dynamics
    model = DynamicsModel(
        DynamicsConfig(
            task=task,
            obs_shapes={k: list(v) for k, v in obs_shapes.items()},
            action_dim=action_dim,
            n_obs_steps=cfg.task.n_obs_steps,
            horizon=cfg.task.horizon,
            future_steps=d.future_steps,
            target_dims=None if d.target_dims is None else list(d.target_dims),
            hidden_dim=d.hidden_dim,
            depth=d.depth,
        )
    )
    model.normalizer.fit({**dataset.obs, ACTION_KEY: dataset.action})
    windows = dynamics_windows(dataset, cfg.task.n_obs_steps, cfg.task.horizon, d.future_steps)
    gen = torch.Generator().manual_seed(t.seed)
    val_mask = torch.isin(
        windows["episode"], split_episodes(dataset.n_episodes, t.val_fraction, gen)
    )
    train_set, val_set = _select(windows, ~val_mask), _select(windows, val_mask)

    out = Path(cfg.out) if cfg.out else default_run_path("dynamics", task)
    run = RunDir(out, to_container(cfg))
    tracker = Tracker(cfg.wandb.mode, cfg.wandb.project, str(run.path), to_container(cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = warmup_cosine(optimizer, t.warmup_steps, t.steps)
    meta = {"kind": "dynamics", "task": task, "dataset": str(Path(cfg.dataset).resolve())}
    n = len(train_set["action"])
    initial_loss = evaluate_loss(model, train_set, t.batch_size)
    losses: list[float] = []
    record: dict[str, Any] = {}
    bar = tqdm(range(1, t.steps + 1), desc=f"train-dynamics {task}")
    for step in bar:
        idx = torch.randint(0, n, (min(t.batch_size, n),), generator=gen)
        loss = model.loss(*_batch(train_set, idx))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % t.log_every == 0 or step == t.steps:
            record = {
                "step": step,
                "loss": float(np.mean(losses[-t.log_every :])),
                "lr": scheduler.get_last_lr()[0],
            }
            if len(val_set["action"]):
                record["val_loss"] = evaluate_loss(model, val_set, t.batch_size)
            run.log(record)
            tracker.log(record, step)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        if step % t.checkpoint_every == 0 or step == t.steps:
            save_dynamics(model, run.checkpoints / LATEST, meta={**meta, "step": step})
    plot_curves(
        run.plots / "dynamics.png",
        run.read_metrics(),
        "step",
        ["loss", "val_loss"],
        f"dynamics model on {task}",
    )
    tracker.close()
    return run.finish(
        {
            "task": task,
            "run": str(run.path),
            "checkpoint": str(run.checkpoints / LATEST),
            "dataset": meta["dataset"],
            "n_episodes": dataset.n_episodes,
            "n_train_windows": n,
            "n_val_windows": len(val_set["action"]),
            "steps": t.steps,
            "initial_loss": initial_loss,
            "final_loss": record.get("loss"),
            "val_loss": record.get("val_loss"),
        }
    )
