"""Subcommand bodies: each takes a composed config and returns a JSON-able result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

import envs
from dppo.config import require
from dppo.run_dir import write_json
from dppo.runners import evaluate_with_runner
from policies.checkpoint import load_policy, read_checkpoint_meta, resolve_checkpoint
from policies.chunk_samplers import build_chunk_sampler
from policies.gpu import apply_fast_path, check_fast_path
from policies.guidance import build_hooks
from policies.runtime import PolicyRuntime


def demos(cfg: DictConfig) -> dict[str, Any]:
    from envs.demos import record_demos

    task = cfg.task.name
    spec = envs.get_task(task)
    require(cfg.n_episodes > 0, f"n_episodes must be > 0, got {cfg.n_episodes}")
    expert = None
    if cfg.expert is not None:
        from dppo.gaussian_expert import GaussianPolicyExpert

        expert = GaussianPolicyExpert(cfg.expert, noise=cfg.noise or 0.0)
        require(
            expert.task == task, f"expert {cfg.expert} was trained on {expert.task!r}, not {task!r}"
        )
    require(
        expert is not None or spec.make_expert is not None,
        f"task {task!r} has no scripted expert: pass expert=<run of dppo finetune algorithm=ppo_gaussian>",
    )
    only_success = (
        cfg.only_success if cfg.only_success is not None else spec.make_expert is not None
    )
    out = Path(cfg.out) if cfg.out else Path("data") / f"{task}-demos"
    path, stats = record_demos(
        task,
        cfg.n_episodes,
        out,
        noise=cfg.noise,
        seed=cfg.seed,
        only_success=only_success,
        expert=expert,
    )
    return {"dataset": str(path), **stats}


def pretrain(cfg: DictConfig) -> dict[str, Any]:
    from dppo.pretrain import pretrain as run_pretrain

    return run_pretrain(cfg)


def eval(cfg: DictConfig) -> dict[str, Any]:  # noqa: A001 - the subcommand's name
    torch.set_num_threads(cfg.threads)
    check_fast_path(cfg.fast_path, cfg.precision)
    folder = resolve_checkpoint(cfg.checkpoint)
    meta = read_checkpoint_meta(folder)
    task = cfg.eval_task or meta["config"]["task"]
    require(cfg.n_episodes > 0 and cfg.n_envs > 0, "n_episodes and n_envs must be > 0")
    envs.get_task(task)
    from dppo.pretrain import sampler_options, task_io_spec

    shapes, action_dim = task_io_spec(task)
    policy = load_policy(folder, task=task, obs_shapes=shapes, action_dim=action_dim)
    name, opts = sampler_options(cfg.sampler)
    n_envs = min(cfg.n_envs, cfg.n_episodes)

    def make_runtime(n_streams: int) -> PolicyRuntime:
        sampler = apply_fast_path(
            build_chunk_sampler(name, policy, **opts), policy, cfg.fast_path, cfg.precision
        )
        hooks = build_hooks(cfg.guidance, policy, task, sampler=sampler)
        return PolicyRuntime(policy, sampler, n_streams, hooks=hooks, seed=cfg.seed)

    runtime = make_runtime(n_envs)
    result = evaluate_with_runner(cfg, runtime, policy, task, n_envs).to_dict()
    out = Path(cfg.out) if cfg.out else _run_of(folder) / f"eval-{name}"
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "task": task,
        "checkpoint": str(folder),
        "sampler": runtime.sampler.describe(),
        "guidance": [h.describe() for h in runtime.hooks],
        **result,
    }
    if cfg.video:
        from dppo.video import record_video

        video = record_video(
            make_runtime(1), task, out / "eval.mp4", n_episodes=cfg.video_episodes, seed=cfg.seed
        )
        report["video"] = str(video)
    write_json(out / "eval.json", report)
    report["eval_json"] = str(out / "eval.json")
    return report


def _run_of(checkpoint_folder: Path) -> Path:
    """The run folder that holds a checkpoint folder (<run>/checkpoints/<name>)."""
    if checkpoint_folder.parent.name == "checkpoints":
        return checkpoint_folder.parent.parent
    return checkpoint_folder


def print_result(result: dict[str, Any]) -> None:
    def short(v):
        if isinstance(v, float | np.floating):
            return round(float(v), 4)
        return v

    print(json.dumps({k: short(v) for k, v in result.items() if not isinstance(v, dict)}, indent=2))


def finetune(cfg: DictConfig) -> dict[str, Any]:
    from dppo.finetune import finetune as run_finetune

    return run_finetune(cfg)


def serve(cfg: DictConfig) -> dict[str, Any]:
    from dppo.serving.server import serve_command

    return serve_command(cfg)


def robot_sim(cfg: DictConfig) -> dict[str, Any]:
    from dppo.serving.robot_sim import robot_sim_command

    return robot_sim_command(cfg)


def bench_serve(cfg: DictConfig) -> dict[str, Any]:
    from dppo.serving.bench import bench_serve as run_bench

    return run_bench(cfg)


def quickstart(cfg: DictConfig) -> dict[str, Any]:
    from dppo.quickstart import quickstart as run_quickstart

    return run_quickstart(cfg)


def train_dynamics(cfg: DictConfig) -> dict[str, Any]:
    from dppo.train_dynamics import train_dynamics as run_train_dynamics

    return run_train_dynamics(cfg)


def bench_guidance(cfg: DictConfig) -> dict[str, Any]:
    from dppo.bench_guidance import run_bench_guidance

    return run_bench_guidance(cfg)


def bench_dppo(cfg: DictConfig) -> dict[str, Any]:
    from dppo.bench_dppo import run_bench_dppo

    return run_bench_dppo(cfg)


def collect_play(cfg: DictConfig) -> dict[str, Any]:
    from envs.play import record_play

    require(cfg.n_steps > 0, f"n_steps must be > 0, got {cfg.n_steps}")
    out = Path(cfg.out) if cfg.out else Path("data") / f"{cfg.task.name}-play"
    path, stats = record_play(
        cfg.task.name, cfg.n_steps, out, seed=cfg.seed, episode_steps=cfg.episode_steps
    )
    return {"dataset": str(path), **stats}


def train_world_model(cfg: DictConfig) -> dict[str, Any]:
    from dppo.world_model_train import train_world_model as run_train_world_model

    return run_train_world_model(cfg)


def finetune_offline(cfg: DictConfig) -> dict[str, Any]:
    from dppo.finetune_offline import finetune_offline as run_finetune_offline

    return run_finetune_offline(cfg)


def bench_inference(cfg: DictConfig) -> dict[str, Any]:
    from dppo.bench_inference import run_bench_inference

    return run_bench_inference(cfg)


def bench_rollout(cfg: DictConfig) -> dict[str, Any]:
    from dppo.bench_rollout import run_bench_rollout

    return run_bench_rollout(cfg)
