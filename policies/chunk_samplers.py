"""Chunk samplers: how the runtime gets a clean chunk for a batch of observation streams.

A chunk sampler wraps a ``DiffusionSampler`` (the timestep list and Gaussian transitions) and
decides where the chain starts: fresh noise (``ddpm``, ``ddim``) or, in later strategies, a
warm-started guess kept in the per-stream ``state`` that the runtime owns.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch

from policies.diffusion import DiffusionPolicy
from policies.samplers import ChainResult, DDIMSampler, DDPMSampler, DiffusionSampler, Hook

SamplerState = dict[str, torch.Tensor]
"""Per-stream warm-start state: tensors with a leading batch dimension B."""


class ChunkSampler:
    """Base strategy: a full reverse chain from fresh Gaussian noise.

    ``sample`` returns a ChainResult whose ``x`` is the clean normalised chunk (B, Tp, Da).
    ``record_from`` (a step index) asks for the chain of the steps from there on (DPPO).
    """

    name = "base"
    supports_guidance = True
    stochastic_state = False
    policy_types: tuple[str, ...] = ("diffusion",)
    """Policy types (PolicyConfig.policy_type) the sampler can run."""
    eager_parts: tuple[str, ...] = ()
    """Attributes holding a ``DiffusionSampler`` that is never ``run`` as a chain (e.g. a one-call
    probe): ``policies.gpu.accelerate`` leaves them as they are."""
    compiled_parts: tuple[str, ...] = ()
    """Methods that are pure tensor functions of a call's hot path (random draws passed in):
    ``policies.gpu.accelerate(mode="compile")`` compiles them too."""

    def __init__(self, diffusion: DiffusionSampler):
        self.diffusion = diffusion

    def init_state(self, policy: DiffusionPolicy, batch: int, device) -> SamplerState:
        return {}

    def reset_state(self, state: SamplerState, mask: torch.Tensor) -> None:
        """Forget warm-start information of the streams selected by ``mask`` (B,) bool."""

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
        cfg = policy.cfg
        x = torch.randn(
            (cond.shape[0], cfg.horizon, cfg.action_dim),
            generator=generator,
            device=cond.device,
            dtype=cond.dtype,
        )
        return self.diffusion.run(
            policy.eps_fn(cond),
            x,
            cond,
            generator=generator,
            hooks=hooks,
            obs=obs,
            record_from=record_from,
        )

    def after_chunk(
        self, policy: DiffusionPolicy, result: ChainResult, state: SamplerState
    ) -> None:
        """Update warm-start state once a chunk has been produced (stateless: nothing)."""

    def postprocess(self, actions: np.ndarray) -> np.ndarray:
        """Map executed actions (B, Ta, Da) in env units before they leave the runtime."""
        return actions

    def describe(self) -> dict:
        return {
            "name": self.name,
            "n_steps": self.diffusion.n_steps,
            "timesteps": list(self.diffusion.timesteps),
        }


class DDPMChunkSampler(ChunkSampler):
    name = "ddpm"

    def __init__(
        self, policy: DiffusionPolicy, min_std: float = 0.0, noise_clip: float | None = None
    ):
        super().__init__(DDPMSampler(policy.schedule, min_std=min_std, noise_clip=noise_clip))


class DDIMChunkSampler(ChunkSampler):
    name = "ddim"

    def __init__(
        self,
        policy: DiffusionPolicy,
        steps: int = 10,
        eta: float = 0.0,
        min_std: float = 0.0,
        noise_clip: float | None = None,
    ):
        super().__init__(
            DDIMSampler(
                policy.schedule, n_steps=steps, eta=eta, min_std=min_std, noise_clip=noise_clip
            )
        )

    def describe(self) -> dict:
        return {**super().describe(), "eta": self.diffusion.eta}


CHUNK_SAMPLERS: dict[str, type[ChunkSampler]] = {
    "ddpm": DDPMChunkSampler,
    "ddim": DDIMChunkSampler,
}


def build_chunk_sampler(name: str, policy: DiffusionPolicy, **options) -> ChunkSampler:
    """Instantiate sampler ``name``; unknown names or options raise errors listing the valid ones."""
    if name not in CHUNK_SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(CHUNK_SAMPLERS)}")
    cls = CHUNK_SAMPLERS[name]
    if policy.cfg.policy_type not in cls.policy_types:
        able = [n for n, c in CHUNK_SAMPLERS.items() if policy.cfg.policy_type in c.policy_types]
        raise ValueError(
            f"sampler {name!r} cannot run a policy of type "
            f"{policy.cfg.policy_type!r} (it needs {', '.join(cls.policy_types)}); "
            f"valid samplers for this policy: {', '.join(able)}"
        )
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p not in ("self", "policy")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"sampler {name!r} has no option(s) {unknown}; valid options: {valid}")
    return cls(policy, **options)


# Samplers in their own modules register themselves in CHUNK_SAMPLERS on import.
from policies import rti, streaming, truncated  # noqa: E402, F401
