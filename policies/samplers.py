"""Samplers: strategies that turn a denoiser and a noise schedule into action chunks.

Every denoising transition is an explicit Gaussian ``x_prev ~ N(mean, std^2)`` so that DPPO can
compute its log-probability. ``DDPMSampler`` and ``DDIMSampler`` reproduce diffusers'
``DDPMScheduler.step`` / ``DDIMScheduler.step`` (epsilon prediction, sample clipping).

Shapes: x, eps, x0, mean: (B, Tp, Da) in normalised action units; t is an integer train timestep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from policies.schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, int, int], torch.Tensor]
"""eps_fn(x (B,Tp,Da), t, step_index) -> predicted noise (B,Tp,Da)."""


@dataclass
class StepContext:
    """What a guidance hook sees at one denoising step; hooks may replace ``eps`` or ``x``."""

    step_index: int
    t: int
    noise_level: float
    x: torch.Tensor
    eps: torch.Tensor
    x0: torch.Tensor
    cond: torch.Tensor
    obs: dict[str, torch.Tensor] | None
    sampler: DiffusionSampler
    extra: dict[str, Any] = field(default_factory=dict)


Hook = Callable[[StepContext], None]
"""``hook(ctx)`` may replace ``ctx.eps`` / ``ctx.x``. Optional attributes read by ``run``:
``repeats`` (int, passes of (predict, guide, step) per level; the largest over the hooks wins) and
``finalize(x, obs) -> x`` (applied in order to the final sample)."""


@dataclass
class ChainResult:
    """Output of one reverse chain.

    ``x``: (B, Tp, Da) final sample. ``chain``: (B, K+1, Tp, Da) samples before and after each
    recorded step (None unless recording). ``nfe``: network evaluations spent.
    """

    x: torch.Tensor
    chain: torch.Tensor | None
    nfe: int


class DiffusionSampler:
    """A descending list of timesteps and the Gaussian transition between consecutive ones.

    ``min_std`` floors every transition's std (DPPO's exploration floor, 0 for plain sampling);
    ``noise_clip`` clamps the standard-normal draws (DPPO uses 3); both default to off so the
    plain samplers match diffusers bit for bit.
    """

    name = "base"

    def __init__(
        self,
        schedule: NoiseSchedule,
        timesteps: Sequence[int],
        min_std: float = 0.0,
        noise_clip: float | None = None,
    ):
        ts = [int(t) for t in timesteps]
        if not ts or any(a <= b for a, b in zip(ts, ts[1:], strict=False)):
            raise ValueError(f"timesteps must be a non-empty strictly descending list, got {ts}")
        if ts[0] >= schedule.num_train_steps or ts[-1] < 0:
            raise ValueError(f"timesteps must lie in [0, {schedule.num_train_steps}), got {ts}")
        self.schedule = schedule
        self.timesteps = ts
        self.min_std = float(min_std)
        self.noise_clip = noise_clip
        self._table: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def n_steps(self) -> int:
        return len(self.timesteps)

    def _lookup(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps + [-1], their alpha-bars) on ``like``'s device and dtype, cached."""
        key = (like.device, like.dtype)
        if key not in self._table:
            ts = torch.tensor(self.timesteps + [-1])
            self._table[key] = (ts.to(like.device), self.schedule.alpha_bar(ts).to(like))
        return self._table[key]

    def _alphas(self, i: int | torch.Tensor, like: torch.Tensor):
        """(t, alpha-bar_t, alpha-bar_prev) for step index ``i``: an int, or (M,) per sample.

        Per-sample values are shaped (M, 1, ..., 1) to broadcast against ``like`` (M, Tp, Da).
        """
        ts, alpha_bars = self._lookup(like)
        if isinstance(i, int):
            return ts[i], alpha_bars[i], alpha_bars[i + 1]
        shape = (-1,) + (1,) * (like.dim() - 1)
        idx = i.to(ts.device)
        return ts[idx].reshape(shape), alpha_bars[idx].reshape(shape), alpha_bars[idx + 1].reshape(shape)

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor, i: int | torch.Tensor) -> torch.Tensor:
        _, a, _ = self._alphas(i, x)
        return self.schedule.clip_x0((x - (1 - a).sqrt() * eps) / a.sqrt())

    def gaussian(self, x: torch.Tensor, eps: torch.Tensor, i: int | torch.Tensor):
        """(mean, std, x0) of the transition out of step i (int, or (M,) per-sample indices).

        std is floored at ``min_std``.
        """
        raise NotImplementedError

    def draw_noise(self, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        z = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
        if self.noise_clip is not None:
            z = z.clamp(-self.noise_clip, self.noise_clip)
        return z

    def run(
        self,
        eps_fn: EpsFn,
        x: torch.Tensor,
        cond: torch.Tensor,
        *,
        start: int = 0,
        generator: torch.Generator | None = None,
        hooks: Sequence[Hook] = (),
        obs: dict[str, torch.Tensor] | None = None,
        record_from: int | None = None,
    ) -> ChainResult:
        """Denoise ``x`` from step index ``start`` to the end of the list.

        With ``record_from = s`` the samples entering steps s.. and the final sample are stacked
        into ``chain`` (B, n_steps - s + 1, Tp, Da). Hooks run only here, in order, at every
        step; a hook's ``repeats > 1`` re-noises each step's output back to its level and repeats
        the step (self-recurrence), which cannot be recorded as a chain of single transitions.
        """
        repeats = max((int(getattr(h, "repeats", 1)) for h in hooks), default=1)
        if repeats > 1 and record_from is not None:
            raise ValueError("guidance with repeated passes per level cannot record a chain")
        recorded = []
        for i in range(start, self.n_steps):
            if record_from is not None and i >= record_from:
                recorded.append(x)
            for r in range(repeats):
                if r:
                    x = self.renoise(x, i, generator)
                eps = eps_fn(x, self.timesteps[i], i)
                if hooks:
                    ctx = StepContext(
                        i,
                        self.timesteps[i],
                        self.noise_level(i),
                        x,
                        eps,
                        self.predict_x0(x, eps, i),
                        cond,
                        obs,
                        self,
                    )
                    for hook in hooks:
                        hook(ctx)
                    x, eps = ctx.x, ctx.eps
                mean, std, _ = self.gaussian(x, eps, i)
                x = mean + std * self.draw_noise(x, generator) if bool((std > 0).any()) else mean
        for hook in hooks:
            finalize = getattr(hook, "finalize", None)
            if finalize is not None:
                x = finalize(x, obs)
        chain = None
        if record_from is not None:
            recorded.append(x)
            chain = torch.stack(recorded, dim=1)
        return ChainResult(x=x, chain=chain, nfe=(self.n_steps - start) * repeats)

    def renoise(self, x: torch.Tensor, i: int, generator: torch.Generator | None) -> torch.Tensor:
        """Noise a sample at the level after step i back to step i's level: q(x_t | x_prev)."""
        _, a_t, a_prev = self._alphas(i, x)
        ratio = a_t / a_prev
        return ratio.sqrt() * x + (1 - ratio).sqrt() * self.draw_noise(x, generator)

    def noise_level(self, i: int) -> float:
        return float((1 - self.schedule.alpha_bar(self.timesteps[i])).sqrt())


class DDPMSampler(DiffusionSampler):
    """Ancestral DDPM over every train timestep (diffusers' "fixed_small" variance)."""

    name = "ddpm"

    def __init__(self, schedule: NoiseSchedule, **kw):
        super().__init__(schedule, range(schedule.num_train_steps - 1, -1, -1), **kw)

    def gaussian(self, x, eps, i):
        t, a_t, a_prev = self._alphas(i, x)
        beta_t = 1 - a_t / a_prev
        x0 = self.predict_x0(x, eps, i)
        mean = (a_prev.sqrt() * beta_t / (1 - a_t)) * x0 + (
            (1 - beta_t).sqrt() * (1 - a_prev) / (1 - a_t)
        ) * x
        var = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
        std = torch.where(t > 0, var.sqrt(), torch.zeros_like(var)).clamp(min=self.min_std)
        return mean, std, x0


class DDIMSampler(DiffusionSampler):
    """DDIM with ``eta`` over any descending timestep list (default: diffusers' "leading" spacing)."""

    name = "ddim"

    def __init__(
        self,
        schedule: NoiseSchedule,
        n_steps: int = 10,
        eta: float = 0.0,
        timesteps: Sequence[int] | None = None,
        **kw,
    ):
        if timesteps is None:
            timesteps = ddim_timesteps(schedule.num_train_steps, n_steps)
        super().__init__(schedule, timesteps, **kw)
        self.eta = float(eta)

    def gaussian(self, x, eps, i):
        _, a_t, a_prev = self._alphas(i, x)
        x0 = self.predict_x0(x, eps, i)
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = self.eta * var.sqrt()
        mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
        return mean, std.clamp(min=self.min_std), x0


def ddim_timesteps(num_train_steps: int, n_steps: int) -> list[int]:
    """diffusers' "leading" spacing: [0, r, 2r, ...] reversed with r = N // n_steps."""
    if not 1 <= n_steps <= num_train_steps:
        raise ValueError(f"DDIM steps must be in [1, {num_train_steps}], got {n_steps}")
    ratio = num_train_steps // n_steps
    return [i * ratio for i in range(n_steps - 1, -1, -1)]
