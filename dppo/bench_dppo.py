"""Throughput of the DPPO loop: rollout env-steps/s vs the raw vector env, update samples/s."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import envs
from dppo.finetune import build_learner, collect_rollout, learn
from dppo.run_dir import write_json


def raw_env_throughput(
    task: str, n_envs: int, n_action_steps: int, n_steps: int, seed: int
) -> float:
    """Env steps/s of the chunked vector env under uniformly random chunks."""
    venv = envs.make_vec_env(task, n_envs, seed=seed, n_obs_steps=1, n_action_steps=n_action_steps)
    venv.reset(seed=seed)
    rng = np.random.default_rng(seed)
    low, high = venv.single_action_space.low, venv.single_action_space.high
    done_steps, start = 0, time.perf_counter()
    while done_steps < n_steps:
        _, _, term, trunc, info = venv.step(rng.uniform(low, high, size=(n_envs, *low.shape)))
        done_steps += n_envs * n_action_steps
    elapsed = time.perf_counter() - start
    venv.close()
    return done_steps / elapsed


def checkpoint_or_fresh_policy(cfg: DictConfig, tmp: Path) -> str:
    if cfg.checkpoint:
        return cfg.checkpoint
    from dppo.pretrain import build_policy, task_io_spec
    from policies.checkpoint import save_policy

    shapes, action_dim = task_io_spec(cfg.task.name)
    policy = build_policy(
        OmegaConf.create({"task": cfg.task, "policy": cfg.policy}), shapes, action_dim
    )
    return str(save_policy(policy, tmp / "policy"))


def bench_learner(cfg: DictConfig, **extra: Any):
    """A DPPO learner for ``cfg``'s task and algorithm (``extra`` keys join its finetune config)."""
    with tempfile.TemporaryDirectory() as tmp:
        ft_cfg = OmegaConf.create(
            {
                "task": cfg.task,
                "algorithm": cfg.algorithm,
                "seed": cfg.seed,
                "checkpoint": checkpoint_or_fresh_policy(cfg, Path(tmp)),
                **extra,
            }
        )
        return build_learner(ft_cfg)


def run_bench_dppo(cfg: DictConfig) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    a, task = cfg.algorithm, cfg.task
    learner = bench_learner(cfg)
    obs_key = envs.get_task(task.name).obs_key
    venv = envs.make_vec_env(
        task.name,
        task.n_envs,
        seed=cfg.seed,
        n_obs_steps=task.n_obs_steps,
        n_action_steps=task.n_action_steps,
    )
    collect_rollout(learner, venv, obs_key, 2, cfg.seed, scale=True)  # warm-up
    times = {"rollout": 0.0, "logprob": 0.0, "update": 0.0}
    env_steps = pairs = 0
    for itr in range(cfg.iterations):
        before = learner.env_steps
        t0 = time.perf_counter()
        ro = collect_rollout(learner, venv, obs_key, a.n_steps, cfg.seed + itr, scale=True)
        t1 = time.perf_counter()
        stats, learn_times = learn(learner, ro, a, train_actor=True)
        times["rollout"] += t1 - t0
        times["logprob"] += learn_times["time_logprob"]
        times["update"] += learn_times["time_update"]
        env_steps += learner.env_steps - before
        pairs += stats["n_pairs"]
    venv.close()
    raw = raw_env_throughput(
        task.name, task.n_envs, task.n_action_steps, cfg.raw_env_steps, cfg.seed
    )
    rollout_sps = env_steps / times["rollout"]
    result = {
        "task": task.name,
        "n_envs": task.n_envs,
        "denoising": a.denoising,
        "ft_denoising_steps": learner.actor.n_transitions,
        "threads": cfg.threads,
        "raw_env_steps_per_s": round(raw, 1),
        "rollout_env_steps_per_s": round(rollout_sps, 1),
        "rollout_over_raw": round(rollout_sps / raw, 4),
        "logprob_pairs_per_s": round(pairs / times["logprob"], 1),
        "update_pairs_per_s": round(pairs * a.update_epochs / times["update"], 1),
        "iteration_s": round(sum(times.values()) / cfg.iterations, 3),
        "time_split": {k: round(v / cfg.iterations, 3) for k, v in times.items()},
    }
    for key, value in result.items():
        print(f"{key:>26}: {value}")
    if cfg.out:
        write_json(Path(cfg.out), result)
    return result
