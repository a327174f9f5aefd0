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
    recorded step (None unless recording). ``nfe``: network evaluations spent (a batched call
    counts once). ``nfe_per_stream``: what one stream's chunk cost, averaged over the batch; it
    differs from ``nfe`` when streams cost different amounts (a warm-started batch with a starting
    episode); left out, it is ``nfe``.
    """

    x: torch.Tensor
    chain: torch.Tensor | None
    nfe: int
    nfe_per_stream: float | None = None

    def __post_init__(self):
        if self.nfe_per_stream is None:
            self.nfe_per_stream = float(self.nfe)


@dataclass(frozen=True)
class StepCoefficients:
    """The transition out of one step as 0-dim tensors (see ``StepTable``)."""

    sqrt_a: torch.Tensor
    neg_sqrt_1ma: torch.Tensor
    c_x0: torch.Tensor
    c_term: torch.Tensor
    std: torch.Tensor
    stochastic: bool


@dataclass(frozen=True)
class StepTable:
    """Coefficients of every transition of a sampler's step list, each (K,), computed once.

    ``x0 = clip((x + neg_sqrt_1ma * eps) / sqrt_a)``, ``mean = c_x0 * x0 + c_term * term`` where
    the term is ``eps`` (DDIM) or ``x`` (DDPM), and ``std`` is floored at the sampler's
    ``min_std`` (see ``gaussian_transition``).
    ``steps[i]`` holds step i's values as 0-dim tensors, so the sampling loop indexes nothing.
    """

    sqrt_a: torch.Tensor
    neg_sqrt_1ma: torch.Tensor
    c_x0: torch.Tensor
    c_term: torch.Tensor
    std: torch.Tensor
    steps: list[StepCoefficients]


class DiffusionSampler:
    """A descending list of timesteps and the Gaussian transition between consecutive ones.

    ``min_std`` floors every transition's std (DPPO's exploration floor, 0 for plain sampling);
    ``noise_clip`` clamps the standard-normal draws (DPPO uses 3); both default to off so the
    plain samplers match diffusers bit for bit.
    """

    name = "base"
    mean_term = "eps"
    """What ``c_term`` multiplies in the transition mean: "eps" (DDIM) or "x" (DDPM)."""

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
        self._table: dict[tuple, Any] = {}

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

    def _alphas(self, i: int, like: torch.Tensor):
        """(t, alpha-bar_t, alpha-bar_prev) of step index ``i`` (0-dim, ``like``'s device/dtype)."""
        ts, alpha_bars = self._lookup(like)
        return ts[i], alpha_bars[i], alpha_bars[i + 1]

    def coefficients(
        self, t: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_x0, c_term, std before the floor) of transitions t -> prev, all (K,) tensors."""
        raise NotImplementedError

    def step_table(self, like: torch.Tensor) -> StepTable:
        """This sampler's ``StepTable`` on ``like``'s device and dtype, cached."""
        key = ("steps", like.device, like.dtype)
        if key not in self._table:
            ts, alpha_bars = self._lookup(like)
            a_t, a_prev = alpha_bars[:-1], alpha_bars[1:]
            c_x0, c_term, std = self.coefficients(ts[:-1], a_t, a_prev)
            columns = {
                "sqrt_a": a_t.sqrt(),
                "neg_sqrt_1ma": -(1 - a_t).sqrt(),
                "c_x0": c_x0,
                "c_term": c_term,
                "std": std.clamp(min=self.min_std),
            }
            steps = [
                StepCoefficients(
                    **{k: v[i] for k, v in columns.items()},
                    stochastic=bool(columns["std"][i] > 0),
                )
                for i in range(self.n_steps)
            ]
            self._table[key] = StepTable(**columns, steps=steps)
        return self._table[key]

    def _coefficients_at(self, i: int | torch.Tensor, like: torch.Tensor) -> StepCoefficients:
        """Step ``i``'s coefficients: 0-dim for an int, (M, 1, ..., 1) for (M,) indices."""
        table = self.step_table(like)
        if isinstance(i, int):
            return table.steps[i]
        shape = (-1,) + (1,) * (like.dim() - 1)
        idx = i.to(like.device)
        return StepCoefficients(
            sqrt_a=table.sqrt_a[idx].reshape(shape),
            neg_sqrt_1ma=table.neg_sqrt_1ma[idx].reshape(shape),
            c_x0=table.c_x0[idx].reshape(shape),
            c_term=table.c_term[idx].reshape(shape),
            std=table.std[idx].reshape(shape),
            stochastic=bool((table.std[idx] > 0).any()),
        )

    def transition(
        self, c: StepCoefficients, x: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, x0) of the Gaussian transition with coefficients ``c`` from x given eps."""
        return gaussian_transition(self.schedule, c, x, eps, x if self.mean_term == "x" else eps)

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor, i: int | torch.Tensor) -> torch.Tensor:
        return predict_x0(self.schedule, self._coefficients_at(i, x), x, eps)

    def gaussian(self, x: torch.Tensor, eps: torch.Tensor, i: int | torch.Tensor):
        """(mean, std, x0) of the transition out of step i (int, or (M,) per-sample indices).

        std is floored at ``min_std``.
        """
        c = self._coefficients_at(i, x)
        mean, x0 = self.transition(c, x, eps)
        return mean, c.std, x0

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
        steps = self.step_table(x).steps
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
                c = steps[i]
                mean, _ = self.transition(c, x, eps)
                x = mean + c.std * self.draw_noise(x, generator) if c.stochastic else mean
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
    mean_term = "x"

    def __init__(self, schedule: NoiseSchedule, **kw):
        super().__init__(schedule, range(schedule.num_train_steps - 1, -1, -1), **kw)

    def coefficients(self, t, a_t, a_prev):
        beta_t = 1 - a_t / a_prev
        c_x0 = a_prev.sqrt() * beta_t / (1 - a_t)
        c_x = (1 - beta_t).sqrt() * (1 - a_prev) / (1 - a_t)
        var = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
        return c_x0, c_x, torch.where(t > 0, var.sqrt(), torch.zeros_like(var))


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

    def coefficients(self, t, a_t, a_prev):
        return ddim_coefficients(a_t, a_prev, self.eta)


def gaussian_transition(
    schedule: NoiseSchedule,
    c: StepCoefficients,
    x: torch.Tensor,
    eps: torch.Tensor,
    term: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, x0) of one transition: x0 = clip((x - sqrt(1 - abar) eps) / sqrt(abar)) and
    mean = c_x0 x0 + c_term term, with ``term`` eps (DDIM) or x (DDPM).

    Five tensor ops: at batch 1 on a CPU the cost is per op, not per element. ``c``'s tensors
    are 0-dim, or broadcast against x (per-sample or per-action coefficients).
    """
    x0 = predict_x0(schedule, c, x, eps)
    return torch.addcmul(c.c_x0 * x0, term, c.c_term), x0


def predict_x0(
    schedule: NoiseSchedule, c: StepCoefficients, x: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """The clipped clean-sample estimate clip((x - sqrt(1 - abar) eps) / sqrt(abar))."""
    return schedule.clip_x0(torch.addcmul(x, eps, c.neg_sqrt_1ma) / c.sqrt_a)


def ddim_coefficients(
    a_t: torch.Tensor, a_prev: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_x0, c_eps, std) of DDIM steps from alpha-bar ``a_t`` to ``a_prev`` with ``eta``."""
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * var.sqrt()
    return a_prev.sqrt(), (1 - a_prev - std**2).clamp(min=0).sqrt(), std


def ddim_timesteps(num_train_steps: int, n_steps: int) -> list[int]:
    """diffusers' "leading" spacing: [0, r, 2r, ...] reversed with r = N // n_steps."""
    if not 1 <= n_steps <= num_train_steps:
        raise ValueError(f"DDIM steps must be in [1, {num_train_steps}], got {n_steps}")
    ratio = num_train_steps // n_steps
    return [i * ratio for i in range(n_steps - 1, -1, -1)]
