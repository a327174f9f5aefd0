"""Rollout storage for one PPO iteration: T chunk steps x E envs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Rollout:
    """cond (T, E, Dc); chain (T, E, K+1, Tp, Da); rewards/dones/terminated (T, E);
    ``final_cond`` holds V-inputs of truncated episodes' real final observations: {(t, e): (Dc,)};
    ``last_cond`` (E, Dc) is the observation after the last step."""

    cond: list[torch.Tensor] = field(default_factory=list)
    chain: list[torch.Tensor] = field(default_factory=list)
    rewards: list[np.ndarray] = field(default_factory=list)
    raw_rewards: list[np.ndarray] = field(default_factory=list)
    dones: list[np.ndarray] = field(default_factory=list)
    terminated: list[np.ndarray] = field(default_factory=list)
    final_cond: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    last_cond: torch.Tensor | None = None
    episode_returns: list[float] = field(default_factory=list)
    episode_successes: list[bool] = field(default_factory=list)
    sim_faults: int = 0

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack(self.cond), torch.stack(self.chain)

    def arrays(self, name: str) -> np.ndarray:
        return np.stack(getattr(self, name)).astype(np.float32)
