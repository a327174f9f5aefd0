"""The small pieces of PPO / DPPO maths, each pinned down by tests.

Shapes: T chunk steps per env per iteration, E envs, K fine-tuned denoising steps.
"""

from __future__ import annotations

import math

import numpy as np
import torch

LOGPROB_CLAMP = (-5.0, 2.0)
"""Per-element log-prob clamp of the public DPPO code, applied before averaging."""


def gae(
    rewards: np.ndarray,
    values: np.ndarray,
    next_values: np.ndarray,
    dones: np.ndarray,
    gamma: float,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over chunk steps.

    rewards, values, dones: (T, E). ``next_values[t]`` is the value of the state after step t
    *within the same episode*: V(next obs) when the episode goes on, V(final obs) when it was
    truncated (time limit: bootstrap from the real final observation, not the reset one) and 0
    when it terminated. ``dones[t]`` (terminated or truncated) stops the recursion at episode ends.
    Returns (advantages, returns), both (T, E).
    """
    T = rewards.shape[0]
    adv = np.zeros_like(rewards, dtype=np.float64)
    last = np.zeros(rewards.shape[1], dtype=np.float64)
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * next_values[t] - values[t]
        last = delta + gamma * lam * (1.0 - dones[t]) * last
        adv[t] = last
    return adv.astype(np.float32), (adv + values).astype(np.float32)


def clip_schedule(n_steps: int, clip: float, clip_base: float, rate: float = 3.0) -> np.ndarray:
    """PPO clip per fine-tuned denoising step i = 0 (noisiest) .. K-1 (cleanest).

    eps_i = base + (clip - base) (exp(rate i / (K-1)) - 1) / (exp(rate) - 1); with K = 1 the single
    step gets ``clip`` (the public code divides 0 by 0 there).
    """
    if n_steps == 1:
        return np.array([clip], dtype=np.float32)
    i = np.arange(n_steps)
    growth = (np.exp(rate * i / (n_steps - 1)) - 1) / (math.exp(rate) - 1)
    return (clip_base + (clip - clip_base) * growth).astype(np.float32)


def denoising_discount(n_steps: int, gamma_denoising: float) -> np.ndarray:
    """Weight of the env-step advantage at fine-tuned step i: gamma_denoising ** (K-1-i)."""
    return (gamma_denoising ** (n_steps - 1 - np.arange(n_steps))).astype(np.float32)


def gaussian_log_prob(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    clamp: tuple[float, float] | None = LOGPROB_CLAMP,
) -> torch.Tensor:
    """Element-wise Normal(mean, std) log-density, optionally clamped per element."""
    var = std**2
    lp = -((x - mean) ** 2) / (2 * var) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.clamp(*clamp) if clamp is not None else lp


def explained_variance(pred: np.ndarray, target: np.ndarray) -> float:
    var = np.var(target)
    return float("nan") if var == 0 else float(1 - np.var(target - pred) / var)


class RunningRewardScaler:
    """Divides rewards by the running std of the discounted return (per env stream)."""

    def __init__(self, n_envs: int, gamma: float, eps: float = 1e-8):
        self.gamma, self.eps = gamma, eps
        self.ret = np.zeros(n_envs)
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        self.ret = self.ret * self.gamma + rewards
        for r in self.ret:
            self.count += 1
            d = r - self.mean
            self.mean += d / self.count
            self.m2 += d * (r - self.mean)
        scaled = rewards / (self.std + self.eps)
        self.ret[dones.astype(bool)] = 0.0
        return scaled.astype(np.float32)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {
            "ret": torch.as_tensor(self.ret),
            "count": self.count,
            "mean": self.mean,
            "m2": self.m2,
        }

    def load_state_dict(self, state: dict) -> None:
        self.ret = state["ret"].numpy().astype(np.float64)
        self.count, self.mean, self.m2 = (
            int(state["count"]),
            float(state["mean"]),
            float(state["m2"]),
        )
