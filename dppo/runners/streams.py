"""Per-env sampling noise: every env stream draws from its own generator.

A batched ``torch.randn`` couples the rows of a batch, so a policy sampled for envs 0..E-1 in one
process and for envs 0..E/2-1 and E/2..E-1 in two would see different noise. Here env ``e``'s
noise in a rollout comes from a generator seeded by (rollout seed, e) only, so the collected
batch does not depend on how the envs are split over workers. Both runners use it.

Noise alone is not enough for bit-identical batches: CPU GEMM / convolution kernels round
differently for different batch sizes, so the same env row denoised in a batch of 50 and in one
of 25 differs in the last bits. With ``block_rows`` set, the denoiser runs on blocks of exactly
that many rows (the last one zero-padded), and each env's samples are the same bits whatever the
split (16 rows suffices for the MLP, transformer and U-Net denoisers on this machine's kernels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dppo.actors import DiffusionActor
from policies.chunk_samplers import ChunkSampler, SamplerState
from policies.diffusion import DiffusionPolicy
from policies.samplers import ChainResult, DiffusionSampler, EpsFn, Hook, StepTable

NOISE_DOMAIN = 0x5EED_D1FF
"""Mixed into every stream seed so sampling noise never equals an env's own seeded randomness."""


def stream_seed(seed: int, env_index: int) -> int:
    """A 63-bit generator seed for env ``env_index`` of the rollout seeded ``seed``."""
    seq = np.random.SeedSequence(entropy=[NOISE_DOMAIN, seed], spawn_key=(env_index,))
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class ChunkNoise:
    """The standard-normal draws of one chunk: ``blocks`` (B, J, Tp, Da), row b from stream b.

    ``draw`` hands out blocks 0, 1, ... in order: the chain's start, then one per denoising step.
    """

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks
        self.used = 0

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        """The next (B, Tp, Da) draw, on ``like``'s device and dtype."""
        if self.used == self.blocks.shape[1]:
            raise RuntimeError(f"all {self.used} noise draws of this chunk are used")
        z = self.blocks[:, self.used]
        if z.shape != like.shape:
            raise ValueError(f"noise of shape {tuple(like.shape)} asked of {tuple(z.shape)} draws")
        self.used += 1
        return z.to(like)


class StreamNoise:
    """One ``torch.Generator`` per env of ``env_ids`` (global indices), seeded from ``seed``."""

    def __init__(self, seed: int, env_ids: Sequence[int]):
        self.env_ids = [int(e) for e in env_ids]
        self.generators = [torch.Generator().manual_seed(stream_seed(seed, e)) for e in env_ids]

    def chunk_noise(self, n_draws: int, shape: tuple[int, ...]) -> ChunkNoise:
        """``n_draws`` draws of ``shape`` per stream: (B, n_draws, *shape)."""
        return ChunkNoise(
            torch.stack([torch.randn((n_draws, *shape), generator=g) for g in self.generators])
        )


class StreamNoiseSampler(DiffusionSampler):
    """``base``'s transitions; its noise comes from the ``ChunkNoise`` passed as ``generator``."""

    def __init__(self, base: DiffusionSampler):
        super().__init__(
            base.schedule, base.timesteps, min_std=base.min_std, noise_clip=base.noise_clip
        )
        self.base = base
        self.name = base.name
        self.mean_term = base.mean_term

    def step_table(self, like: torch.Tensor) -> StepTable:
        return self.base.step_table(like)

    def draw_noise(self, like: torch.Tensor, generator: Any) -> torch.Tensor:
        z = generator.draw(like)
        return z if self.noise_clip is None else z.clamp(-self.noise_clip, self.noise_clip)


def blocked_eps_fn(policy: DiffusionPolicy, cond: torch.Tensor, rows: int | None) -> EpsFn:
    """``policy.eps_fn(cond)`` run on blocks of exactly ``rows`` rows (None: the whole batch)."""
    if rows is None:
        return policy.eps_fn(cond)
    n, pad = cond.shape[0], -cond.shape[0] % rows
    cond_blocks = torch.cat([cond, cond.new_zeros(pad, *cond.shape[1:])]).split(rows)

    def eps(x: torch.Tensor, t: int, i: int) -> torch.Tensor:
        x_blocks = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]).split(rows)
        return torch.cat(
            [policy.eps(xb, t, cb) for xb, cb in zip(x_blocks, cond_blocks, strict=True)]
        )[:n]

    return eps


class StreamChunkSampler(ChunkSampler):
    """Full reverse chains from fresh noise, every env stream drawing from its own generator.

    The runtime's shared generator is ignored: stream b of the batch is env ``streams.env_ids[b]``.
    ``block_rows``: see ``blocked_eps_fn``.
    """

    name = "stream_noise"

    def __init__(
        self, diffusion: DiffusionSampler, streams: StreamNoise, block_rows: int | None = None
    ):
        super().__init__(StreamNoiseSampler(diffusion))
        self.streams = streams
        self.block_rows = block_rows

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
        n_streams = len(self.streams.generators)
        if cond.shape[0] != n_streams:
            raise ValueError(f"batch of {cond.shape[0]} for {n_streams} noise streams")
        cfg = policy.cfg
        noise = self.streams.chunk_noise(self.diffusion.n_steps + 1, (cfg.horizon, cfg.action_dim))
        start = cond.new_empty(n_streams, cfg.horizon, cfg.action_dim)
        return self.diffusion.run(
            blocked_eps_fn(policy, cond, self.block_rows),
            noise.draw(start),
            cond,
            generator=noise,
            hooks=hooks,
            obs=obs,
            record_from=record_from,
        )


def use_stream_noise(
    actor: Any, seed: int, env_ids: Sequence[int], block_rows: int | None = None
) -> None:
    """Make a ``DiffusionActor``'s training runtime draw per-env noise for the rollout ``seed``.

    The Gaussian baseline keeps its own generator (it runs in-process only).
    """
    if isinstance(actor, DiffusionActor):
        actor.runtime.set_sampler(
            StreamChunkSampler(actor.train_sampler, StreamNoise(seed, env_ids), block_rows)
        )
