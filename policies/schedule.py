"""Noise schedule: the betas / alphas of a diffusers scheduler, kept as plain tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler


@dataclass(frozen=True)
class ScheduleConfig:
    num_train_steps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    clip_sample: bool = True
    clip_sample_range: float = 1.0


class NoiseSchedule:
    """Forward-process quantities indexed by the integer train timestep t in [0, N).

    ``alphas_cumprod[t]`` is alpha-bar_t; ``noise_level(t) = sqrt(1 - alpha-bar_t)``.
    """

    def __init__(self, cfg: ScheduleConfig = ScheduleConfig()):
        self.cfg = cfg
        scheduler = DDPMScheduler(
            num_train_timesteps=cfg.num_train_steps,
            beta_schedule=cfg.beta_schedule,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            clip_sample=cfg.clip_sample,
            clip_sample_range=cfg.clip_sample_range,
            prediction_type="epsilon",
        )
        self.betas = scheduler.betas.float()
        self.alphas = scheduler.alphas.float()
        self.alphas_cumprod = scheduler.alphas_cumprod.float()

    @property
    def num_train_steps(self) -> int:
        return self.cfg.num_train_steps

    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        """alpha-bar at timestep(s) t; t = -1 means the clean end of the chain (alpha-bar 1)."""
        t = torch.as_tensor(t)
        ones = torch.ones_like(t, dtype=self.alphas_cumprod.dtype)
        return torch.where(t >= 0, self.alphas_cumprod.to(t.device)[t.clamp(min=0)], ones)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0). x0, eps: (B, Tp, Da); t: (B,) or per-action (B, Tp)."""
        a = self.alpha_bar(t).to(x0)
        while a.dim() < x0.dim():
            a = a.unsqueeze(-1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def clip_x0(self, x0: torch.Tensor) -> torch.Tensor:
        if not self.cfg.clip_sample:
            return x0
        r = self.cfg.clip_sample_range
        return x0.clamp(-r, r)
