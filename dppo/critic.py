"""State-value critic V(obs) over the same conditioning vector as the actor."""

from __future__ import annotations

import torch
from torch import nn


class Critic(nn.Module):
    """MLP (B, Dc) -> (B,); DPPO uses 256 x 3 with Mish."""

    def __init__(self, cond_dim: int, hidden: int = 256, depth: int = 3):
        super().__init__()
        layers, d = [], cond_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.Mish()]
            d = hidden
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.net(cond).squeeze(-1)

    @torch.no_grad()
    def values(self, cond: torch.Tensor, batch: int = 8192) -> torch.Tensor:
        """V for a large (N, Dc) batch without building a graph."""
        return torch.cat([self(c) for c in cond.split(batch)]) if len(cond) else cond.new_zeros(0)
