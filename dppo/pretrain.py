"""Imitation pre-training of a diffusion policy on a demonstration dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

import envs
from dppo.config import require, to_container
from dppo.evaluate import evaluate
from dppo.run_dir import RunDir, default_run_path, plot_curves
from dppo.schedules import warmup_cosine
from dppo.tracking import Tracker
from envs.dataset import DemoDataset, WindowDataset
from policies.checkpoint import LATEST, save_policy
from policies.chunk_samplers import build_chunk_sampler
from policies.diffusion import DiffusionPolicy, PolicyConfig
from policies.ema import EMA
from policies.normalizer import ACTION_KEY
from policies.runtime import PolicyRuntime


def task_io_spec(task: str) -> tuple[dict[str, tuple[int, ...]], int]:
    """({obs_key: shape}, action_dim) of a task, read off one env instance."""
    spec = envs.get_task(task)
    env = envs.make_env(task)
    shapes = {spec.obs_key: tuple(env.observation_space.shape)}
    action_dim = int(env.action_space.shape[0])
    env.close()
    return shapes, action_dim


def sampler_options(sampler_cfg: DictConfig | dict) -> tuple[str, dict[str, Any]]:
    opts = dict(sampler_cfg)
    return opts.pop("name"), opts


def validate(cfg: DictConfig) -> None:
    t = cfg.train
    require(t.steps > 0, f"train.steps must be > 0, got {t.steps}")
    require(t.batch_size > 0, f"train.batch_size must be > 0, got {t.batch_size}")
    require(0 <= t.warmup_steps < t.steps, "train.warmup_steps must be in [0, train.steps)")
    require(cfg.final_eval_episodes >= 0, "final_eval_episodes must be >= 0")
    require(cfg.dataset is None or Path(cfg.dataset).exists(), f"dataset {cfg.dataset} not found")


def materialise_windows(dataset: DemoDataset, n_obs_steps: int, horizon: int):
    """All training windows as tensors: ({key: (N, To, *shape)}, actions (N, Tp, Da))."""
    windows = WindowDataset(dataset, n_obs_steps=n_obs_steps, horizon=horizon)
    items = [windows[i] for i in range(len(windows))]
    obs = {k: torch.as_tensor(np.stack([it["obs"][k] for it in items])) for k in items[0]["obs"]}
    actions = torch.as_tensor(np.stack([it["action"] for it in items]))
    return obs, actions


def build_policy(cfg: DictConfig, obs_shapes, action_dim: int) -> DiffusionPolicy:
    return DiffusionPolicy(
        PolicyConfig(
            task=cfg.task.name,
            obs_shapes={k: list(v) for k, v in obs_shapes.items()},
            action_dim=action_dim,
            n_obs_steps=cfg.task.n_obs_steps,
            horizon=cfg.task.horizon,
            n_action_steps=cfg.task.n_action_steps,
            policy_type=cfg.policy.type,
            denoiser=cfg.policy.denoiser,
            denoiser_kwargs=dict(cfg.policy.denoiser_kwargs),
            schedule=dict(cfg.policy.schedule),
        )
    )


def eval_policy(policy: DiffusionPolicy, cfg: DictConfig, n_episodes: int, seed: int) -> dict:
    name, opts = sampler_options(cfg.sampler)
    n_envs = min(cfg.task.n_envs, n_episodes)
    runtime = PolicyRuntime(policy, build_chunk_sampler(name, policy, **opts), n_envs, seed=seed)
    return evaluate(runtime, cfg.task.name, n_episodes, n_envs, seed=seed).to_dict()


def pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Train, evaluate and save; returns the summary written to ``<run>/summary.json``."""
    validate(cfg)
    t = cfg.train
    torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    obs_shapes, action_dim = task_io_spec(cfg.task.name)
    out = Path(cfg.out) if cfg.out else default_run_path("pretrain", cfg.task.name)
    dataset_path = cfg.dataset
    if dataset_path is None:
        from envs.demos import record_demos

        dataset_path = out.parent / f"{out.name}-demos"
        record_demos(
            cfg.task.name,
            cfg.task.demo_episodes,
            dataset_path,
            noise=cfg.task.expert_noise,
            seed=t.seed,
        )
    dataset = DemoDataset(dataset_path, obs_keys=obs_shapes, action_dim=action_dim)
    require(
        dataset.meta.get("task") in (None, cfg.task.name),
        f"dataset {dataset_path} was recorded on task {dataset.meta.get('task')!r}, "
        f"not {cfg.task.name!r}",
    )

    run = RunDir(out, to_container(cfg))
    tracker = Tracker(cfg.wandb.mode, cfg.wandb.project, str(run.path), to_container(cfg))
    policy = build_policy(cfg, obs_shapes, action_dim)
    obs, actions = materialise_windows(dataset, cfg.task.n_obs_steps, cfg.task.horizon)
    fit_data = {k: v.flatten(0, 1).numpy() for k, v in obs.items()}
    fit_data[ACTION_KEY] = actions.flatten(0, 1).numpy()
    policy.normalizer.fit(fit_data)

    optimizer = torch.optim.AdamW(
        policy.denoiser.parameters(), lr=t.lr, weight_decay=t.weight_decay
    )
    scheduler = warmup_cosine(optimizer, t.warmup_steps, t.steps)
    ema = EMA(policy, power=t.ema_power, max_decay=t.ema_max_decay)
    gen = torch.Generator().manual_seed(t.seed)
    n = actions.shape[0]
    losses = []
    bar = tqdm(range(1, t.steps + 1), desc=f"pretrain {cfg.task.name}")
    for step in bar:
        idx = torch.randint(0, n, (min(t.batch_size, n),), generator=gen)
        loss = policy.bc_loss({k: v[idx] for k, v in obs.items()}, actions[idx], generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update(policy)
        losses.append(loss.item())
        if step % 50 == 0 or step == t.steps:
            record = {
                "step": step,
                "loss": float(np.mean(losses[-50:])),
                "lr": scheduler.get_last_lr()[0],
            }
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                record["success_rate"] = eval_policy(ema.model, cfg, t.eval_episodes, t.seed)[
                    "success_rate"
                ]
            run.log(record)
            tracker.log(record, step)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        if step % t.checkpoint_every == 0 or step == t.steps:
            save_policy(
                ema.model, run.checkpoints / LATEST, meta={"step": step, "kind": "pretrain"}
            )

    final = {}
    if cfg.final_eval_episodes:
        final = eval_policy(ema.model, cfg, cfg.final_eval_episodes, t.seed + 1)
        run.log({"step": t.steps, **{f"eval/{k}": v for k, v in final.items()}})
    plot_curves(
        run.plots / "pretrain.png",
        run.read_metrics(),
        "step",
        ["loss", "success_rate"],
        f"pre-training on {cfg.task.name}",
    )
    tracker.close()
    return run.finish(
        {
            "task": cfg.task.name,
            "run": str(run.path),
            "dataset": str(dataset_path),
            "n_demo_episodes": dataset.n_episodes,
            "steps": t.steps,
            "final_loss": float(np.mean(losses[-50:])),
            "success_rate": final.get("success_rate"),
            "eval": final,
        }
    )
