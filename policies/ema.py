"""Exponential moving average of weights with the warm-up schedule of Diffusion Policy."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """decay(step) = 1 - (1 + step / inv_gamma) ** -power, clipped to [min_decay, max_decay]."""

    def __init__(
        self,
        model: nn.Module,
        power: float = 0.75,
        inv_gamma: float = 1.0,
        min_decay: float = 0.0,
        max_decay: float = 0.9999,
    ):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.power, self.inv_gamma = power, inv_gamma
        self.min_decay, self.max_decay = min_decay, max_decay
        self.step = 0

    def decay(self, step: int) -> float:
        value = 1 - (1 + step / self.inv_gamma) ** -self.power
        return max(self.min_decay, min(value, self.max_decay)) if step > 0 else 0.0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay(self.step)
        for p_ema, p in zip(self.model.parameters(), model.parameters(), strict=True):
            p_ema.mul_(d).add_(p.detach(), alpha=1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
        self.step += 1
