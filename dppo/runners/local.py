"""The in-process runner: ``collect_rollout`` on one vector env, with per-env sampling noise."""

from __future__ import annotations

from typing import Any

from dppo.buffer import Rollout
from dppo.finetune import Learner, collect_rollout
from dppo.runners.streams import use_stream_noise


class LocalRunner:
    """Collects rollouts in this process from ``venv`` (E envs: obs (E, To, D)).

    ``block_rows``: denoiser block size (``dppo.runners.streams.blocked_eps_fn``).
    """

    def __init__(
        self, venv: Any, obs_key: str, reward_scaling: bool, block_rows: int | None = None
    ):
        self.venv = venv
        self.obs_key = obs_key
        self.reward_scaling = reward_scaling
        self.block_rows = block_rows

    def collect(self, learner: Learner, n_steps: int, seed: int) -> Rollout:
        """``n_steps`` chunk steps in every env; env i resets with ``seed + i``."""
        use_stream_noise(learner.actor, seed, range(self.venv.num_envs), self.block_rows)
        return collect_rollout(
            learner, self.venv, self.obs_key, n_steps, seed, scale=self.reward_scaling
        )

    def close(self) -> None:
        self.venv.close()
