"""gymnasium's MuJoCo locomotion tasks (Hopper, Walker2d, HalfCheetah v5) as registered tasks.

Locomotion has no success criterion: ``info["is_success"]`` is always False and progress is the
return. There is no scripted expert; demonstrations come from a Gaussian-PPO expert.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.registry import TaskSpec, register

LOCOMOTION_MAX_EPISODE_STEPS = 1000
# Control frequency = 1 / (model timestep * frame_skip) of each gymnasium v5 env.
LOCOMOTION_CONTROL_FREQ = {
    "Hopper-v5": 1.0 / (0.002 * 4),
    "Walker2d-v5": 1.0 / (0.002 * 4),
    "HalfCheetah-v5": 1.0 / (0.01 * 5),
}


class LocomotionInfo(gym.Wrapper):
    """Adds ``info["is_success"] = False`` and casts observations to float32."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.observation_space
        self.observation_space = spaces.Box(
            space.low.astype(np.float32), space.high.astype(np.float32), dtype=np.float32
        )

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        return obs.astype(np.float32), dict(info, is_success=False)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return (
            obs.astype(np.float32),
            float(reward),
            terminated,
            truncated,
            dict(info, is_success=False),
        )


def _factory(env_id: str):
    def make(reward_type: str = "dense", **kwargs: Any) -> gym.Env:
        if reward_type != "dense":
            raise ValueError(f"{env_id} has only its dense locomotion reward, not {reward_type!r}")
        return LocomotionInfo(
            gym.make(env_id, max_episode_steps=LOCOMOTION_MAX_EPISODE_STEPS, **kwargs)
        )

    return make


for _env_id, _freq in LOCOMOTION_CONTROL_FREQ.items():
    register(
        TaskSpec(
            name=_env_id,
            family="gym",
            make=_factory(_env_id),
            max_episode_steps=LOCOMOTION_MAX_EPISODE_STEPS,
            control_freq=_freq,
            make_expert=None,
            description=(
                f"gymnasium {_env_id} locomotion (MuJoCo). No success criterion: "
                "info['is_success'] is always False; judge by return. No scripted expert "
                "(demonstrations come from a Gaussian-PPO expert)."
            ),
        )
    )
