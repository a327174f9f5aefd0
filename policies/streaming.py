"""Streaming Diffusion Policy (SDP): a chunk whose actions carry increasing noise levels.

Layout. The Tp positions of a chunk form h sub-chunks: sub-chunk 0 is [0, To-1+Ta) (the To-1
past actions and the executed slice), sub-chunk j >= 1 is [To-1+j*Ta, To-1+(j+1)*Ta). This needs
Tp - To + 1 divisible by Ta (h = (Tp - To + 1) / Ta) and the number of train steps N divisible by
h (D = N / h levels per call).

Levels. Level L in {0, ..., N}: L = 0 is clean, L >= 1 is train timestep L - 1 (L = N is the top,
t = N - 1, where fresh Gaussian noise enters as in DDPM). The policy's denoiser sees one level
per action (``per_action_levels``).

Training (``streaming_bc_loss``). With probability 1 - ``P_CONSTANT`` the levels form the chunk-wise
staircase L_j = j*D + o with one random offset o in {1, ..., D} shared by the chunk; otherwise
one random level in {1, ..., N} is shared by every action (constant-level samples).

Inference (``StreamingChunkSampler``). Before a call sub-chunk j sits at level (j+1)*D (the
pattern). Each network call lowers every action by one level of its own (a DDIM transition
t -> t-1 per action, ``eta`` as in DDIM); after D calls sub-chunk 0 is clean and its executed
slice is returned. The buffer then rolls by Ta: sub-chunk j+1 (now at level (j+1)*D) becomes
sub-chunk j, fresh noise at level N fills the last Ta positions, and the To-1 past positions,
which roll in clean, are re-noised to level D with q(x_t | x_0): the pattern is restored. The
staircase offsets o = D, ..., 1 of training are exactly the levels a call visits.

First call of a stream (or after a reset): the chunk is drawn with a full constant-level chain
(N network calls from pure noise, DDIM over every level: the constant-level training samples),
its executed slice is returned, and the buffer is built from the clean chunk exactly as after a
roll: rolled by Ta, its future sub-chunks q-noised to the pattern, fresh noise at the top.

State (per stream, leading dimension B): ``buffer`` (B, Tp, Da) normalised noisy actions,
``levels`` (B, Tp) long, ``has_buffer`` (B,) bool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from policies.chunk_ops import rows
from policies.chunk_samplers import CHUNK_SAMPLERS, ChunkSampler, SamplerState
from policies.diffusion import DiffusionPolicy
from policies.normalizer import ACTION_KEY
from policies.samplers import (
    ChainResult,
    DDIMSampler,
    Hook,
    StepCoefficients,
    ddim_coefficients,
    gaussian_transition,
)
from policies.schedule import NoiseSchedule

P_CONSTANT = 0.2
"""Share of training samples whose actions all share one noise level (SDP mixes ~0.8 / 0.2)."""
STREAMING = "streaming"


@dataclass(frozen=True)
class StreamingLayout:
    """Sub-chunks and levels of a streaming policy (see the module docstring)."""

    horizon: int
    n_obs_steps: int
    n_action_steps: int
    num_train_steps: int

    def __post_init__(self):
        span = self.horizon - self.n_obs_steps + 1
        if span % self.n_action_steps:
            raise ValueError(
                f"streaming needs Tp - To + 1 = {self.horizon} - {self.n_obs_steps} + 1 = {span} "
                f"divisible by Ta = {self.n_action_steps} (sub-chunks of Ta actions after the "
                f"To-1 past ones); e.g. horizon={self.n_obs_steps - 1 + 4 * self.n_action_steps}"
            )
        if self.num_train_steps % self.n_sub_chunks:
            raise ValueError(
                f"streaming needs the number of train steps N = {self.num_train_steps} divisible "
                f"by the number of sub-chunks h = {self.n_sub_chunks} (each call denoises N/h "
                f"levels); e.g. schedule.num_train_steps={3 * self.n_sub_chunks}"
            )

    @classmethod
    def of(cls, policy: DiffusionPolicy) -> StreamingLayout:
        cfg = policy.cfg
        return cls(
            cfg.horizon, cfg.n_obs_steps, cfg.n_action_steps, policy.schedule.num_train_steps
        )

    @property
    def n_sub_chunks(self) -> int:
        """h."""
        return (self.horizon - self.n_obs_steps + 1) // self.n_action_steps

    @property
    def levels_per_call(self) -> int:
        """D = N / h: network calls per sampler call."""
        return self.num_train_steps // self.n_sub_chunks

    def sub_chunk_index(self, device=None) -> torch.Tensor:
        """(Tp,) long: the sub-chunk of each position."""
        p = torch.arange(self.horizon, device=device)
        return ((p - (self.n_obs_steps - 1)).clamp(min=0)) // self.n_action_steps

    def pattern(self, device=None) -> torch.Tensor:
        """(Tp,) long: each position's level before a call, (j + 1) * D."""
        return (self.sub_chunk_index(device) + 1) * self.levels_per_call


def training_levels(
    layout: StreamingLayout,
    batch: int,
    generator: torch.Generator | None = None,
    device=None,
    p_constant: float = P_CONSTANT,
) -> torch.Tensor:
    """(B, Tp) long levels in {1..N}: staircases with a shared offset, or one constant level."""
    d, n = layout.levels_per_call, layout.num_train_steps
    offset = torch.randint(1, d + 1, (batch, 1), generator=generator, device=device)
    stair = layout.sub_chunk_index(device)[None] * d + offset
    constant = torch.randint(1, n + 1, (batch, 1), generator=generator, device=device)
    use_constant = torch.rand((batch, 1), generator=generator, device=device) < p_constant
    return torch.where(use_constant, constant.expand_as(stair), stair)


def streaming_bc_loss(
    policy: DiffusionPolicy,
    obs: dict[str, torch.Tensor],
    action: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Epsilon-prediction MSE with one noise level per action: obs {key: (B,To,...)}, action (B,Tp,Da)."""
    layout = StreamingLayout.of(policy)
    cond = policy.condition(obs)
    x0 = policy.normalizer.normalize(ACTION_KEY, action)
    t = training_levels(layout, x0.shape[0], generator, x0.device) - 1
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    noisy = policy.schedule.add_noise(x0, eps, t.cpu())  # the schedule's tables live on CPU
    pred = policy.denoiser(noisy, t, cond)
    return nn.functional.mse_loss(pred, eps)


def level_alphas(schedule: NoiseSchedule, t: torch.Tensor):
    """(alpha-bar_t, alpha-bar_{t-1}) for per-action timesteps t (..., Tp): each (..., Tp, 1)."""
    t_cpu = t.cpu()  # the schedule's tables live on the CPU
    a = schedule.alpha_bar(t_cpu)[..., None].to(t.device)
    a_prev = schedule.alpha_bar(t_cpu - 1)[..., None].to(t.device)
    return a, a_prev


def level_coefficients(a: torch.Tensor, a_prev: torch.Tensor, eta: float) -> StepCoefficients:
    """Per-action DDIM coefficients from alpha-bar ``a`` to ``a_prev`` (``level_alphas``)."""
    c_x0, c_eps, std = ddim_coefficients(a, a_prev, eta)
    return StepCoefficients(
        sqrt_a=a.sqrt(),
        neg_sqrt_1ma=-(1 - a).sqrt(),
        c_x0=c_x0,
        c_term=c_eps,
        std=std,
        stochastic=eta > 0,
    )


@dataclass(frozen=True)
class StreamingConstants:
    """What every steady-state call of a ``StreamingChunkSampler`` reuses, on one device.

    ``pattern`` (Tp,) levels before a call; ``steps`` see ``steps_on``; ``clean`` (Tp, 1) the
    positions clean after a call; ``renoise[cold]`` (Tp, 1) the positions ``roll`` re-noises
    (``renoises[cold]``: any at all); ``sqrt_a_pattern`` / ``sqrt_1ma_pattern`` (Tp, 1) q(x_t |
    x_0) at each position's pattern level; ``first_levels[c]``: step c's timestep of position 0
    (what ``DiffusionPolicy.eps`` reads to pick the network).
    """

    pattern: torch.Tensor
    steps: list
    clean: torch.Tensor
    renoise: dict[bool, torch.Tensor]
    renoises: dict[bool, bool]
    sqrt_a_pattern: torch.Tensor
    sqrt_1ma_pattern: torch.Tensor
    first_levels: list[int]


class StreamingChunkSampler(ChunkSampler):
    """SDP runtime: D = N/h network calls per call, the noisy buffer kept in the runtime state.

    ``nfe`` of a call: D for streams with a buffer, N for streams starting (a batch mixing both
    runs two sub-batches). ``sample`` also rolls the buffer (it draws the fresh noise).
    """

    name = STREAMING
    supports_guidance = False
    policy_types = (STREAMING,)
    compiled_parts = ("advance_roll",)

    def __init__(self, policy: DiffusionPolicy, eta: float = 0.0):
        if policy.cfg.policy_type != STREAMING:
            raise ValueError(
                f"sampler 'streaming' needs a policy trained with per-action noise levels "
                f"(policy type 'streaming', e.g. `dppo pretrain policy=streaming`); this policy "
                f"is of type {policy.cfg.policy_type!r}: use ddpm, ddim, rti or truncated"
            )
        self.layout = lay = StreamingLayout.of(policy)
        n = lay.num_train_steps
        super().__init__(DDIMSampler(policy.schedule, eta=eta, timesteps=range(n - 1, -1, -1)))
        self.eta = float(eta)
        self.schedule = policy.schedule
        pattern = lay.pattern()
        # After a call sub-chunk j sits at level j*D; rolled by Ta, position p holds what was at
        # p + Ta. Positions that roll in clean below their pattern level (the To-1 past ones)
        # are re-noised; every other rolled position lands exactly on its pattern level.
        after = (pattern - lay.levels_per_call)[lay.n_action_steps :]
        target = pattern[: lay.horizon - lay.n_action_steps]
        if not bool(((after == target) | (after == 0)).all()):
            raise RuntimeError(f"streaming layout {lay} does not restore its pattern")
        fresh = torch.zeros(lay.n_action_steps, dtype=torch.bool)
        self.renoise = {
            False: torch.cat([after < target, fresh]),
            True: torch.cat([torch.ones(lay.horizon - lay.n_action_steps).bool(), fresh]),
        }
        """Positions re-noised by ``roll`` after a steady-state call (False) or a first call (True)."""
        self._constants: dict[str, StreamingConstants] = {}

    def constants(self, device) -> StreamingConstants:
        """This sampler's ``StreamingConstants`` on ``device``, computed once."""
        key = str(device)
        if key not in self._constants:
            pattern = self.layout.pattern(device)
            steps = []
            for c in range(self.layout.levels_per_call):
                a, a_prev = level_alphas(self.schedule, pattern - 1 - c)
                steps.append((pattern - 1 - c, a, a_prev, level_coefficients(a, a_prev, self.eta)))
            a_pattern = level_alphas(self.schedule, pattern - 1)[0]
            self._constants[key] = StreamingConstants(
                pattern=pattern,
                steps=steps,
                clean=(pattern == self.layout.levels_per_call)[:, None],
                renoise={cold: m.to(device)[:, None] for cold, m in self.renoise.items()},
                renoises={cold: bool(m.any()) for cold, m in self.renoise.items()},
                sqrt_a_pattern=a_pattern.sqrt(),
                sqrt_1ma_pattern=(1 - a_pattern).sqrt(),
                first_levels=[int(t[0]) for t, *_ in steps],
            )
        return self._constants[key]

    def steps_on(self, device) -> list:
        """Per network call c of a steady-state call: (timesteps (Tp,) = pattern - 1 - c,
        alpha-bar (Tp, 1), alpha-bar of the next level (Tp, 1), their ``level_coefficients``)."""
        return self.constants(device).steps

    def init_state(self, policy: DiffusionPolicy, batch: int, device) -> SamplerState:
        cfg = policy.cfg
        return {
            "buffer": torch.zeros(batch, cfg.horizon, cfg.action_dim, device=device),
            "levels": self.layout.pattern(device).repeat(batch, 1),
            "has_buffer": torch.zeros(batch, dtype=torch.bool, device=device),
        }

    def reset_state(self, state: SamplerState, mask: torch.Tensor) -> None:
        state["has_buffer"][mask.to(state["has_buffer"].device)] = False

    def sample(
        self,
        policy: DiffusionPolicy,
        cond: torch.Tensor,
        state: SamplerState,
        *,
        generator: torch.Generator | None,
        hooks: Sequence[Hook] = (),
        obs: dict[str, torch.Tensor] | None = None,
        record_from: int | None = None,
    ) -> ChainResult:
        if hooks:
            raise ValueError("sampler 'streaming' does not support guidance hooks")
        if record_from is not None:
            raise ValueError("sampler 'streaming' does not record chains; DPPO uses ddpm or ddim")
        has = state["has_buffer"]
        if has.shape[0] != cond.shape[0]:
            raise ValueError(
                f"streaming state holds {has.shape[0]} streams, got a batch of "
                f"{cond.shape[0]}: build the runtime with n_streams={cond.shape[0]}"
            )
        n_warm = int(has.sum())
        if n_warm == len(has):  # steady state: the whole batch advances, no indexing
            buffer = state["buffer"]
            self.check_levels(state["levels"])
            noise = self.level_noise(buffer, generator)
            fresh, renoise = self.roll_noise(buffer, False, generator)
            chunk, state["buffer"] = self.advance_roll(policy, buffer, cond, noise, fresh, renoise)
            return ChainResult(x=chunk, chain=None, nfe=self.layout.levels_per_call)
        cfg = policy.cfg
        x = torch.empty(
            cond.shape[0], cfg.horizon, cfg.action_dim, device=cond.device, dtype=cond.dtype
        )
        buffers = state["buffer"].clone()
        nfe = 0
        cold = torch.nonzero(~has).flatten()
        noise = torch.randn(
            (len(cold), cfg.horizon, cfg.action_dim),
            generator=generator,
            device=cond.device,
            dtype=cond.dtype,
        )
        res = self.diffusion.run(
            policy.eps_fn(cond[cold]), noise, cond[cold], generator=generator, obs=rows(obs, cold)
        )
        x[cold] = res.x
        buffers[cold] = self.roll(res.x, cold=True, generator=generator)
        nfe += res.nfe
        if n_warm:
            warm = torch.nonzero(has).flatten()
            chunk, buffer = self.advance(
                policy, cond[warm], state["buffer"][warm], state["levels"][warm], generator
            )
            x[warm] = chunk
            buffers[warm] = self.roll(buffer, cold=False, generator=generator)
            nfe += self.layout.levels_per_call
        state["buffer"] = buffers
        state["levels"] = self.constants(cond.device).pattern.repeat(len(has), 1)
        state["has_buffer"] = torch.ones_like(has)
        per_stream = (len(cold) * res.nfe + n_warm * self.layout.levels_per_call) / len(has)
        return ChainResult(x=x, chain=None, nfe=nfe, nfe_per_stream=per_stream)

    def advance(
        self,
        policy: DiffusionPolicy,
        cond: torch.Tensor,
        buffer: torch.Tensor,
        levels: torch.Tensor,
        generator: torch.Generator | None,
    ):
        """D network calls on buffers (M, Tp, Da) whose levels (M, Tp) are the pattern.

        Returns (chunk, buffer): the chunk holds the clean sub-chunk 0 (level 0) and the last x0
        prediction elsewhere; the buffer is the denoised one (sub-chunk j at level j*D), unrolled.
        """
        self.check_levels(levels)
        return self.advanced(policy, buffer, cond, self.level_noise(buffer, generator))

    def check_levels(self, levels: torch.Tensor) -> None:
        """Raise if the state's levels (M, Tp) are not the pattern (a corrupted state)."""
        pattern = self.constants(levels.device).pattern
        if not torch.equal(levels, pattern.expand_as(levels)):
            raise RuntimeError(
                f"streaming buffer levels {levels.tolist()} are not the pattern "
                f"{pattern.tolist()}: the sampler state was corrupted"
            )

    def level_noise(
        self, buffer: torch.Tensor, generator: torch.Generator | None
    ) -> list[torch.Tensor]:
        """One draw like ``buffer`` per stochastic level step of a call, in the eager order."""
        steps = self.constants(buffer.device).steps
        return [self.diffusion.draw_noise(buffer, generator) for *_, c in steps if c.stochastic]

    def advance_roll(
        self,
        policy: DiffusionPolicy,
        buffer: torch.Tensor,
        cond: torch.Tensor,
        noise: Sequence[torch.Tensor],
        fresh: torch.Tensor,
        renoise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A steady-state call with its random draws given: (chunk, next buffer).

        ``noise``: ``level_noise``; ``fresh`` / ``renoise``: ``roll_noise``. A pure tensor
        function (``policies.gpu.accelerate(mode="compile")`` compiles it)."""
        chunk, x = self.advanced(policy, buffer, cond, noise)
        return chunk, self.rolled(x, False, fresh, renoise)

    def advanced(
        self,
        policy: DiffusionPolicy,
        buffer: torch.Tensor,
        cond: torch.Tensor,
        noise: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``advance`` with its draws given and the levels already checked: the D per-action
        transitions of a call on buffers (M, Tp, Da) at the pattern, with ``noise`` drawn
        beforehand (one (M, Tp, Da) draw per stochastic step) -> (chunk, buffer). A pure tensor
        function."""
        x = buffer
        const, m, draws = self.constants(x.device), x.shape[0], iter(noise)
        for (t, _, _, c), first in zip(const.steps, const.first_levels, strict=True):
            # the network as policy.eps picks it, without reading t back (no host sync)
            eps = policy.network_for(first)(x, t.expand(m, -1), cond)
            mean, x0 = gaussian_transition(self.schedule, c, x, eps, eps)
            x = mean + c.std * next(draws) if c.stochastic else mean
        return torch.where(const.clean, x, x0), x

    def roll(self, x: torch.Tensor, cold: bool, generator: torch.Generator | None) -> torch.Tensor:
        """Buffers after a call (M, Tp, Da) -> the next call's: shifted by Ta, fresh noise at
        level N appended, clean positions re-noised to their pattern level (all of them when
        ``cold``: the chunk of a first call is clean everywhere)."""
        return self.rolled(x, cold, *self.roll_noise(x, cold, generator))

    def roll_noise(
        self, x: torch.Tensor, cold: bool, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``roll``'s draws for buffers like x (M, Tp, Da): fresh top-level noise (M, Ta, Da) and
        the re-noising draw (M, Tp, Da), None when nothing is re-noised."""
        shape = (x.shape[0], self.layout.n_action_steps, x.shape[2])
        fresh = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
        if not self.constants(x.device).renoises[cold]:
            return fresh, None
        return fresh, torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def rolled(
        self, x: torch.Tensor, cold: bool, fresh: torch.Tensor, renoise: torch.Tensor | None
    ) -> torch.Tensor:
        """``roll`` with its draws given (``roll_noise``)."""
        x = torch.cat([x[:, self.layout.n_action_steps :], fresh], dim=1)
        if renoise is None:
            return x
        const = self.constants(x.device)
        noised = torch.addcmul(const.sqrt_a_pattern * x, renoise, const.sqrt_1ma_pattern)
        return torch.where(const.renoise[cold], noised, x)

    def describe(self) -> dict:
        lay = self.layout
        return {
            "name": self.name,
            "eta": self.eta,
            "n_sub_chunks": lay.n_sub_chunks,
            "levels_per_call": lay.levels_per_call,
            "num_train_steps": lay.num_train_steps,
            "n_steps": lay.levels_per_call,
        }


CHUNK_SAMPLERS[StreamingChunkSampler.name] = StreamingChunkSampler
