"""The diffusion policy: observation encoder + denoiser + noise schedule + normaliser."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from policies.denoisers import build_denoiser
from policies.normalizer import ACTION_KEY, Normalizer
from policies.schedule import NoiseSchedule, ScheduleConfig

POLICY_TYPES = ("diffusion", "streaming")
TIMESTEP_CACHE_SIZE = 1024
"""Cached (t, batch, device) timestep tensors kept before the cache starts over."""


@dataclass
class PolicyConfig:
    """Everything needed to rebuild a policy's modules (saved as JSON next to the weights).

    To = ``n_obs_steps``, Tp = ``horizon``, Ta = ``n_action_steps``; the executed slice of a chunk is
    [To-1, To-1+Ta). ``finetuned_below_t``: when a frozen copy of the pre-trained denoiser exists
    (after DPPO), the fine-tuned denoiser serves timesteps t < finetuned_below_t, the frozen one the rest.
    """

    task: str
    obs_shapes: dict[str, list[int]]
    action_dim: int
    n_obs_steps: int = 1
    horizon: int = 4
    n_action_steps: int = 4
    policy_type: str = "diffusion"
    denoiser: str = "mlp"
    denoiser_kwargs: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    finetuned_below_t: int | None = None

    def __post_init__(self):
        self.obs_shapes = {k: [int(d) for d in v] for k, v in self.obs_shapes.items()}
        if self.policy_type not in POLICY_TYPES:
            raise ValueError(f"policy_type must be one of {POLICY_TYPES}, got {self.policy_type!r}")
        if min(self.n_obs_steps, self.horizon, self.n_action_steps) < 1:
            raise ValueError("n_obs_steps, horizon and n_action_steps must all be >= 1")
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ValueError(
                f"executed slice [To-1, To-1+Ta) = [{self.n_obs_steps - 1}, "
                f"{self.n_obs_steps - 1 + self.n_action_steps}) does not fit in horizon Tp={self.horizon}"
            )

    @property
    def action_start(self) -> int:
        return self.n_obs_steps - 1

    @property
    def cond_dim(self) -> int:
        per_step = sum(int(torch.tensor(s).prod()) for s in self.obs_shapes.values())
        return per_step * self.n_obs_steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DiffusionPolicy(nn.Module):
    """Predicts eps for noisy normalised action chunks (B, Tp, Da) given observations (B, To, ...)."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        self.schedule = NoiseSchedule(ScheduleConfig(**cfg.schedule))
        shapes = {k: tuple(v) for k, v in cfg.obs_shapes.items()}
        shapes[ACTION_KEY] = (cfg.action_dim,)
        self.normalizer = Normalizer(shapes)
        self.denoiser = build_denoiser(
            cfg.denoiser,
            action_dim=cfg.action_dim,
            horizon=cfg.horizon,
            cond_dim=cfg.cond_dim,
            per_action_levels=cfg.policy_type == "streaming",
            **cfg.denoiser_kwargs,
        )
        self.frozen_denoiser: nn.Module | None = None
        self._timesteps: dict[tuple, torch.Tensor] = {}
        if cfg.finetuned_below_t is not None:
            self.add_frozen_copy(cfg.finetuned_below_t)

    def add_frozen_copy(self, finetuned_below_t: int) -> None:
        """Freeze a copy of the current denoiser for timesteps >= ``finetuned_below_t`` (DPPO)."""
        if self.frozen_denoiser is None:
            self.frozen_denoiser = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.cfg.finetuned_below_t = int(finetuned_below_t)

    @property
    def obs_keys(self) -> list[str]:
        return sorted(self.cfg.obs_shapes)

    def encode(self, obs_norm: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised observations {key: (B, To, *shape)} -> conditioning (B, To * sum(dims))."""
        keys = self.obs_keys
        if len(keys) == 1:  # one op less per call: the common state-observation case
            return obs_norm[keys[0]].flatten(1)
        return torch.cat([obs_norm[k].flatten(1) for k in keys], dim=-1)

    def condition(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw observations {key: (B, To, *shape)} -> conditioning (B, Dc)."""
        return self.encode(self.normalizer.normalize_obs({k: obs[k] for k in self.obs_keys}))

    def network_for(self, t: int) -> nn.Module:
        ft = self.cfg.finetuned_below_t
        if self.frozen_denoiser is None or ft is None or t < ft:
            return self.denoiser
        return self.frozen_denoiser

    def eps(self, x: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predicted noise (B, Tp, Da); ``t`` an int (same for all) or (B,) / (B, Tp) levels."""
        if isinstance(t, int):
            return self.network_for(t)(x, self._timestep_tensor(t, x), cond)
        return self.network_for(int(t.flatten()[0]))(x, t, cond)

    def _timestep_tensor(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """(B,) long tensor filled with t, cached per (t, B, device): samplers ask for the same
        few every chunk, and at batch 1 on a CPU building one costs a tenth of a small network."""
        key = (t, x.shape[0], x.device)
        found = self._timesteps.get(key)
        if found is None:
            if len(self._timesteps) >= TIMESTEP_CACHE_SIZE:
                self._timesteps.clear()
            found = self._timesteps[key] = torch.full(
                (x.shape[0],), t, device=x.device, dtype=torch.long
            )
        return found

    def eps_fn(self, cond: torch.Tensor):
        """Closure for samplers: (x, t, step_index) -> eps."""
        return lambda x, t, i: self.eps(x, t, cond)

    def bc_loss(
        self,
        obs: dict[str, torch.Tensor],
        action: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Denoising (epsilon-prediction MSE) loss on raw obs {key: (B,To,...)}, action (B,Tp,Da)."""
        if self.cfg.policy_type == "streaming":
            from policies.streaming import streaming_bc_loss

            return streaming_bc_loss(self, obs, action, generator)
        cond = self.condition(obs)
        x0 = self.normalizer.normalize(ACTION_KEY, action)
        b = x0.shape[0]
        t = torch.randint(
            0, self.schedule.num_train_steps, (b,), device=x0.device, generator=generator
        )
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        pred = self.denoiser(self.schedule.add_noise(x0, eps, t), t, cond)
        return nn.functional.mse_loss(pred, eps)
