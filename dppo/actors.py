"""Actors for the PPO loop: the DPPO diffusion actor and a Gaussian-policy baseline.

Both expose the same small interface to ``dppo.finetune``:
``act(obs) -> (actions (E, Ta, Da), record)``, ``n_transitions`` (K: PPO samples per env step),
``log_prob(record_batch) -> (M,)`` for (env step, transition) pairs, ``parameters()``,
``eval_runtime(n_envs)``, and ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from dppo.ppo_math import gaussian_log_prob
from policies.chunk_samplers import ChunkSampler, DDIMChunkSampler, DDPMChunkSampler
from policies.diffusion import DiffusionPolicy
from policies.runtime import PolicyRuntime
from policies.samplers import DDIMSampler, DDPMSampler


class DiffusionActor:
    """DPPO actor over the two-level MDP (env step x denoising step).

    ``ddpm`` mode fine-tunes the last ``ft_denoising_steps`` (K') of the DDPM chain, a frozen copy
    of the pre-trained denoiser serving the others; ``ddim`` mode fine-tunes all ``ddim_steps``,
    sampled with ``ddim_eta_train`` (1) in training and eta = 0 at evaluation. Every transition's
    std is floored at ``min_sampling_std`` when sampling and ``min_logprob_std`` in log-probs.
    """

    def __init__(self, policy: DiffusionPolicy, algo: Any, n_envs: int, seed: int):
        self.policy = policy
        self.algo = algo
        schedule = policy.schedule
        common = {"min_std": algo.min_sampling_std, "noise_clip": algo.noise_clip}
        if algo.denoising == "ddpm":
            self.train_sampler = DDPMSampler(schedule, **common)
            self.n_transitions = int(algo.ft_denoising_steps)
            policy.add_frozen_copy(finetuned_below_t=self.n_transitions)
            self._eval_sampler = lambda: DDPMChunkSampler(policy)
        elif algo.denoising == "ddim":
            self.train_sampler = DDIMSampler(
                schedule, n_steps=algo.ddim_steps, eta=algo.ddim_eta_train, **common
            )
            self.n_transitions = int(algo.ddim_steps)
            policy.add_frozen_copy(finetuned_below_t=schedule.num_train_steps)
            self._eval_sampler = lambda: DDIMChunkSampler(policy, steps=algo.ddim_steps, eta=0.0)
        else:
            raise ValueError(
                f"algorithm.denoising must be 'ddpm' or 'ddim', got {algo.denoising!r}"
            )
        self.record_from = self.train_sampler.n_steps - self.n_transitions
        self.runtime = PolicyRuntime(policy, ChunkSampler(self.train_sampler), n_envs, seed=seed)
        cfg = policy.cfg
        self.executed = slice(cfg.action_start, cfg.action_start + cfg.n_action_steps)

    def act(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        """obs {key: (E, To, ...)} -> actions (E, Ta, Da), record {cond (E,Dc), chain (E,K+1,Tp,Da)}."""
        res = self.runtime.act(obs, record_from=self.record_from)
        return res.actions, {"cond": res.cond, "chain": res.chain}

    def condition(self, obs: dict[str, np.ndarray]) -> torch.Tensor:
        with torch.no_grad():
            return self.policy.condition(
                {k: torch.as_tensor(v, dtype=torch.float32) for k, v in obs.items()}
            )

    def log_prob(
        self, cond: torch.Tensor, chain: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob of transition k (M,) of chains (M, K+1, Tp, Da) under the fine-tuned denoiser.

        Returns (log_prob (M,) averaged over the executed Ta x Da elements, std (M,) used).
        """
        rows = torch.arange(chain.shape[0])
        x, x_next = chain[rows, k], chain[rows, k + 1]
        step = k + self.record_from
        t = torch.tensor(self.train_sampler.timesteps)[step]
        eps = self.policy.denoiser(x, t, cond)
        mean, std, _ = self.train_sampler.gaussian(x, eps, step)
        std = std.clamp(min=self.algo.min_logprob_std).expand_as(mean)
        lp = gaussian_log_prob(x_next, mean, std)[:, self.executed]
        return lp.mean(dim=(1, 2)), std[:, self.executed].mean(dim=(1, 2))

    def parameters(self):
        return self.policy.denoiser.parameters()

    def eval_runtime(self, n_envs: int, seed: int) -> PolicyRuntime:
        return PolicyRuntime(self.policy, self._eval_sampler(), n_envs, seed=seed)

    def bc_loss(self, obs, action, generator=None) -> torch.Tensor:
        return self.policy.bc_loss(obs, action, generator=generator)


class GaussianChunkPolicy(nn.Module):
    """MLP mean over the executed chunk (Ta x Da) with a state-independent log-std."""

    def __init__(
        self,
        cond_dim: int,
        n_action_steps: int,
        action_dim: int,
        hidden: int = 256,
        depth: int = 2,
        init_log_std: float = -0.5,
    ):
        super().__init__()
        layers, d = [], cond_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.Tanh()]
            d = hidden
        self.body = nn.Sequential(*layers)
        self.mean = nn.Linear(d, n_action_steps * action_dim)
        nn.init.zeros_(self.mean.bias)
        self.mean.weight.data.mul_(0.01)
        self.log_std = nn.Parameter(torch.full((n_action_steps * action_dim,), init_log_std))
        self.shape = (n_action_steps, action_dim)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.mean(self.body(cond)).view(-1, *self.shape)
        return mean, self.log_std.exp().view(*self.shape).expand_as(mean)


class RunningObsNorm:
    """Running mean/std of flat observations (E, To*D), for policies trained from scratch."""

    def __init__(self, dim: int, clip: float = 10.0):
        self.mean, self.var, self.count, self.clip = torch.zeros(dim), torch.ones(dim), 1e-4, clip

    def update(self, x: torch.Tensor) -> None:
        b_mean, b_var, b = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, total = b_mean - self.mean, self.count + b
        self.mean = self.mean + delta * b / total
        self.var = (self.var * self.count + b_var * b + delta**2 * self.count * b / total) / total
        self.count = total

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / (self.var.sqrt() + 1e-8)).clamp(-self.clip, self.clip)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, s: dict) -> None:
        self.mean, self.var, self.count = s["mean"], s["var"], float(s["count"])


class GaussianActor:
    """Gaussian-policy PPO baseline acting on action chunks; one PPO sample per env step (K = 1)."""

    n_transitions = 1

    def __init__(
        self,
        obs_key: str,
        obs_dim: int,
        n_obs_steps: int,
        n_action_steps: int,
        action_dim: int,
        action_low: np.ndarray,
        action_high: np.ndarray,
        algo: Any,
        seed: int,
    ):
        self.obs_key = obs_key
        self.net = GaussianChunkPolicy(
            obs_dim * n_obs_steps,
            n_action_steps,
            action_dim,
            hidden=algo.gaussian_hidden,
            init_log_std=algo.gaussian_init_log_std,
        )
        self.obs_norm = RunningObsNorm(obs_dim * n_obs_steps)
        self.low, self.high = action_low, action_high
        self.generator = torch.Generator().manual_seed(seed)

    def condition(self, obs: dict[str, np.ndarray]) -> torch.Tensor:
        return self.obs_norm(torch.as_tensor(obs[self.obs_key], dtype=torch.float32).flatten(1))

    @torch.no_grad()
    def act(self, obs, deterministic: bool = False):
        raw = torch.as_tensor(obs[self.obs_key], dtype=torch.float32).flatten(1)
        if not deterministic:
            self.obs_norm.update(raw)
        cond = self.obs_norm(raw)
        mean, std = self.net(cond)
        a = (
            mean
            if deterministic
            else mean + std * torch.randn(mean.shape, generator=self.generator)
        )
        chain = a.unsqueeze(1).expand(-1, 2, -1, -1).clone()  # (E, 2, Ta, Da): K + 1 = 2 slots
        return np.clip(a.numpy(), self.low, self.high), {"cond": cond, "chain": chain}

    def log_prob(self, cond, chain, k):
        mean, std = self.net(cond)
        lp = gaussian_log_prob(chain[:, 1], mean, std, clamp=None)
        return lp.sum(dim=(1, 2)), std.mean(dim=(1, 2))

    def parameters(self):
        return self.net.parameters()

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "obs_norm": self.obs_norm.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.net.load_state_dict(s["net"])
        self.obs_norm.load_state_dict(s["obs_norm"])
