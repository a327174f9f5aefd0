"""Record evaluation episodes to mp4 through the policy runtime."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np

import envs
from policies.runtime import PolicyRuntime


def record_video(
    runtime: PolicyRuntime,
    task: str,
    path: Path,
    n_episodes: int = 1,
    seed: int = 0,
    fps: int | None = None,
) -> Path:
    """Roll ``n_episodes`` with a one-stream runtime, rendering every env step (rgb_array)."""
    spec = envs.get_task(task)
    env = envs.make_env(task, seed=seed, render_mode="rgb_array")
    frames = []
    try:
        for episode in range(n_episodes):
            obs, _ = env.reset(seed=seed + episode)
            runtime.reset()
            frames.append(env.render())
            done = False
            while not done:
                chunk = runtime.step({spec.obs_key: obs[None]}).actions[0]
                for action in chunk:
                    obs, _, terminated, truncated, _ = env.step(action)
                    frames.append(env.render())
                    done = terminated or truncated
                    if done:
                        break
    finally:
        env.close()
    path = Path(path)
    imageio.mimsave(path, [np.asarray(f) for f in frames], fps=fps or int(spec.control_freq))
    return path
