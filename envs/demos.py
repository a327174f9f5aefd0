"""Demonstrations from a task's scripted expert: collect episodes, write them as a dataset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from envs.dataset import Episode, write_dataset
from envs.registry import Expert, get_task
from envs.vector import make_env

DEFAULT_MAX_ATTEMPTS_FACTOR = 4.0


def _run_episode(env, expert, rng: np.random.Generator, obs_key: str) -> tuple[Episode, bool]:
    obs, info = env.reset()
    expert.reset(env, obs, rng)
    observations, actions, rewards, successes = [], [], [], []
    while True:
        action = np.asarray(expert.act(env, obs), dtype=np.float32)
        observations.append(obs)
        actions.append(action)
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        successes.append(bool(info.get("is_success", False)))
        if terminated or truncated:
            break
    episode = {
        "obs": {obs_key: np.asarray(observations, dtype=np.float32)},
        "action": np.asarray(actions),
        "reward": np.asarray(rewards, dtype=np.float32),
        "success": np.asarray(successes),
    }
    return episode, any(successes)


def collect_demos(
    task: str,
    n_episodes: int,
    noise: float | None = None,
    seed: int = 0,
    only_success: bool = True,
    max_attempts_factor: float = DEFAULT_MAX_ATTEMPTS_FACTOR,
    progress: bool = True,
    expert: Expert | None = None,
) -> tuple[list[Episode], dict[str, Any]]:
    """Run the scripted expert of ``task`` (or ``expert``) until ``n_episodes`` episodes are kept.

    ``noise`` defaults to the task's ``default_expert_noise``. With ``only_success`` failed
    episodes are dropped; at most ``ceil(n_episodes * max_attempts_factor)`` episodes are tried.
    Each episode holds ``{"obs": {obs_key: (T, D)}, "action": (T, Da), "reward": (T,),
    "success": (T,)}`` (the observation at t is the one the action at t was chosen from).

    Returns (episodes, stats) with stats ``attempts``, ``successes``, ``expert_success_rate``,
    ``kept``, ``noise``, ``seed``, ``mean_length``. Raises ValueError if the task has no scripted
    expert and RuntimeError if too few episodes succeed.
    """
    spec = get_task(task)
    if expert is None and spec.make_expert is None:
        raise ValueError(f"task {task!r} has no scripted expert (make_expert is None)")
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    noise = spec.default_expert_noise if noise is None else float(noise)
    expert = expert if expert is not None else spec.make_expert(noise)
    env = make_env(task, seed=seed)
    rng = np.random.default_rng(seed)
    max_attempts = int(np.ceil(n_episodes * max_attempts_factor)) if only_success else n_episodes

    episodes: list[Episode] = []
    attempts = successes = 0
    with tqdm(total=n_episodes, desc=f"demos {task}", disable=not progress) as bar:
        while len(episodes) < n_episodes and attempts < max_attempts:
            episode, success = _run_episode(env, expert, rng, spec.obs_key)
            attempts += 1
            successes += success
            if success or not only_success:
                episodes.append(episode)
                bar.update(1)
            bar.set_postfix(success_rate=f"{successes / attempts:.2f}")
    env.close()

    stats = {
        "attempts": attempts,
        "successes": successes,
        "expert_success_rate": successes / attempts,
        "kept": len(episodes),
        "noise": noise,
        "seed": seed,
        "mean_length": float(np.mean([len(ep["action"]) for ep in episodes])) if episodes else 0.0,
    }
    if len(episodes) < n_episodes:
        raise RuntimeError(
            f"expert on {task!r} (noise {noise}) succeeded in only {successes} of {attempts} "
            f"attempts, fewer than the {n_episodes} episodes asked for; lower the noise or raise "
            "max_attempts_factor"
        )
    return episodes, stats


def record_demos(
    task: str,
    n_episodes: int,
    out: str | os.PathLike,
    noise: float | None = None,
    seed: int = 0,
    only_success: bool = True,
    max_attempts_factor: float = DEFAULT_MAX_ATTEMPTS_FACTOR,
    progress: bool = True,
    overwrite: bool = False,
    expert: Expert | None = None,
) -> tuple[Path, dict[str, Any]]:
    """``collect_demos`` then ``write_dataset`` to ``out`` with the task's metadata.

    Returns (path, stats).
    """
    spec = get_task(task)
    episodes, stats = collect_demos(
        task, n_episodes, noise, seed, only_success, max_attempts_factor, progress, expert
    )
    meta = {
        "task": task,
        "control_freq": spec.control_freq,
        "max_episode_steps": spec.max_episode_steps,
        "expert_noise": stats["noise"],
        "expert_success_rate": stats["expert_success_rate"],
        "attempts": stats["attempts"],
        "only_success": only_success,
        "seed": seed,
        "created_by": "envs.demos.record_demos",
    }
    path = write_dataset(out, episodes, meta, overwrite=overwrite)
    return path, stats
