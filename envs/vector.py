"""Env factories: one seeded env, and a vector env of chunk-wrapped sub-envs.

The vector env uses gymnasium's SAME_STEP autoreset: when a sub-env's episode ends, the returned
observation is already the first one of the next episode, and ``info["final_obs"][i]`` /
``info["final_info"]`` hold the real last observation and info of the episode that ended (what a
truncated episode must bootstrap from). Note that for such an env ``info["is_success"][i]`` is the
*reset's* info; use ``step_success`` and ``real_next_obs`` below instead of reading them by hand.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv, VectorEnv

from envs.chunk import ChunkWrapper
from envs.registry import get_task


class SeedOnFirstReset(gym.Wrapper):
    """Uses ``seed`` for the first ``reset`` that is not given one (and seeds the action space)."""

    def __init__(self, env: gym.Env, seed: int):
        super().__init__(env)
        self._pending_seed: int | None = seed
        env.action_space.seed(seed)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        if seed is None:
            seed = self._pending_seed
        self._pending_seed = None
        return self.env.reset(seed=seed, options=options)


def make_env(task: str, seed: int | None = None, **kwargs: Any) -> gym.Env:
    """One env of ``task`` (with its TimeLimit); ``seed`` seeds its first reset.

    ``kwargs`` go to the task's factory (e.g. ``reward_type="sparse"``,
    ``render_mode="rgb_array"``).
    """
    env = get_task(task).make(**kwargs)
    return env if seed is None else SeedOnFirstReset(env, seed)


def make_vec_env(
    task: str,
    n_envs: int,
    seed: int | None = None,
    n_obs_steps: int = 1,
    n_action_steps: int = 1,
    async_: bool = False,
    **kwargs: Any,
) -> VectorEnv:
    """``n_envs`` chunk-wrapped envs of ``task``: obs (n_envs, To, D), actions (n_envs, Ta, Da).

    Sub-env i is seeded with ``seed + i``. Sync by default (cheapest on few cores for cheap envs);
    ``async_=True`` runs each sub-env in its own process. Autoreset mode is SAME_STEP (see the
    module docstring).
    """
    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    get_task(task)  # fail early, in this process, on an unknown task

    def factory(index: int):
        def make() -> gym.Env:
            env_seed = None if seed is None else seed + index
            return ChunkWrapper(
                make_env(task, seed=env_seed, **kwargs), n_obs_steps, n_action_steps
            )

        return make

    env_fns = [factory(i) for i in range(n_envs)]
    vector_cls = AsyncVectorEnv if async_ else SyncVectorEnv
    return vector_cls(env_fns, autoreset_mode=AutoresetMode.SAME_STEP)


def _ended(terminated: np.ndarray, truncated: np.ndarray) -> np.ndarray:
    return np.logical_or(terminated, truncated)


def step_success(info: dict[str, Any], terminated: np.ndarray, truncated: np.ndarray) -> np.ndarray:
    """Per-env success of the step just taken (B,) bool, read from ``final_info`` for envs whose
    episode ended (their top-level info already belongs to the next episode)."""
    success = np.asarray(info.get("is_success", np.zeros(len(terminated))), dtype=bool).copy()
    ended = _ended(terminated, truncated)
    if ended.any():
        final = info["final_info"]["is_success"]
        success[ended] = np.asarray(final, dtype=bool)[ended]
    return success


def real_next_obs(
    obs: np.ndarray, info: dict[str, Any], terminated: np.ndarray, truncated: np.ndarray
) -> np.ndarray:
    """The observations (B, To, D) that followed the step: ``obs`` except for envs whose episode
    ended, where it is the episode's real final observation (to bootstrap truncated episodes)."""
    ended = _ended(terminated, truncated)
    if not ended.any():
        return obs
    next_obs = np.array(obs, copy=True)
    for i in np.flatnonzero(ended):
        next_obs[i] = info["final_obs"][i]
    return next_obs
