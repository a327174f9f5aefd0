"""Real-Time Iteration for Diffusion Policy (RTI-DP): warm start from the previous chunk.

The first call of a stream (and the first after ``reset_state``) runs a full reverse chain with the
base sampler (``ddim`` with ``base_steps`` steps, or ``ddpm``). Every later call reuses the
previous clean chunk (normalised units, kept in the runtime-owned state): it is shifted by the Ta
executed actions (the last action repeated to keep Tp actions), noised to the first timestep of
the warm step list with q(x_t | x_0), and denoised with DDIM transitions over that list only
(e.g. ``steps=[3, 1, 0]`` of 100 train steps: 3 network evaluations instead of 10 or 100). No
retraining is needed: the policy is an ordinary diffusion policy.

Discrete gripper dimensions (``gripper_dims``): ``gripper_clip=f`` clips the stored guess's gripper
entries to +-1/f before reuse, so a few denoising steps can still flip the gripper; with
``binarize_gripper`` the executed gripper commands are mapped to +-1 (env units).

State (per stream, leading dimension B): ``prev`` (B, Tp, Da) the last clean normalised chunk,
``has_prev`` (B,) bool.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from policies.chunk_ops import rows, shift_chunk, shift_index, step_list
from policies.chunk_samplers import (
    CHUNK_SAMPLERS,
    ChunkSampler,
    DDIMChunkSampler,
    DDPMChunkSampler,
    SamplerState,
)
from policies.diffusion import DiffusionPolicy
from policies.samplers import ChainResult, DDIMSampler, Hook

BASE_SAMPLERS = ("ddim", "ddpm")
GRIPPER_OPEN, GRIPPER_CLOSED = -1.0, 1.0


class RTIChunkSampler(ChunkSampler):
    """RTI-DP: full chain on the first call of a stream, a few warm-started steps afterwards.

    ``nfe`` of a call counts network calls: base steps for the cold streams plus warm steps for
    the warm ones (a batch mixing both runs two sub-batches).
    """

    name = "rti"

    def __init__(
        self,
        policy: DiffusionPolicy,
        base: str = "ddim",
        base_steps: int = 10,
        steps: Sequence[int] | None = None,
        start_step: int | None = None,
        n_steps: int | None = None,
        eta: float = 0.0,
        gripper_dims: Sequence[int] = (),
        gripper_clip: float | None = None,
        binarize_gripper: bool = True,
    ):
        if base not in BASE_SAMPLERS:
            raise ValueError(f"rti base sampler must be one of {BASE_SAMPLERS}, got {base!r}")
        self.cold = (
            DDIMChunkSampler(policy, steps=base_steps, eta=eta)
            if base == "ddim"
            else DDPMChunkSampler(policy)
        )
        super().__init__(self.cold.diffusion)
        n_train = policy.schedule.num_train_steps
        self.warm = DDIMSampler(
            policy.schedule, eta=eta, timesteps=step_list(n_train, steps, start_step, n_steps)
        )
        a_start = policy.schedule.alpha_bar(self.warm.timesteps[0])
        self.sqrt_a_start, self.sqrt_1ma_start = a_start.sqrt(), (1 - a_start).sqrt()
        """q(x_t | x_0) at the first warm step: 0-dim CPU tensors (scalars on any device)."""
        self.base = base
        self.shift = policy.cfg.n_action_steps
        self._shift_index: dict[torch.device, torch.Tensor] = {}
        dims = [int(d) for d in gripper_dims]
        bad = [d for d in dims if not 0 <= d < policy.cfg.action_dim]
        if bad:
            raise ValueError(
                f"gripper_dims {bad} outside the action's {policy.cfg.action_dim} dims"
            )
        if gripper_clip is not None and gripper_clip < 1:
            raise ValueError(
                f"gripper_clip f must be >= 1 (the guess is clipped to +-1/f), got {gripper_clip}"
            )
        if gripper_clip is not None and not dims:
            raise ValueError("gripper_clip needs gripper_dims")
        self.gripper_dims = dims
        self.gripper_clip = None if gripper_clip is None else float(gripper_clip)
        self.binarize_gripper = bool(binarize_gripper)

    def init_state(self, policy: DiffusionPolicy, batch: int, device) -> SamplerState:
        cfg = policy.cfg
        return {
            "prev": torch.zeros(batch, cfg.horizon, cfg.action_dim, device=device),
            "has_prev": torch.zeros(batch, dtype=torch.bool, device=device),
        }

    def reset_state(self, state: SamplerState, mask: torch.Tensor) -> None:
        state["has_prev"][mask.to(state["has_prev"].device)] = False

    def warm_guess(self, prev: torch.Tensor) -> torch.Tensor:
        """Previous clean chunks (M, Tp, Da) -> the shifted, gripper-clipped guesses."""
        index = self._shift_index.get(prev.device)
        if index is None:
            index = self._shift_index[prev.device] = shift_index(
                prev.shape[1], self.shift, prev.device
            )
        guess = shift_chunk(prev, self.shift, index)
        if self.gripper_clip is not None:
            bound = 1.0 / self.gripper_clip
            guess[..., self.gripper_dims] = guess[..., self.gripper_dims].clamp(-bound, bound)
        return guess

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
        if record_from is not None:
            raise ValueError("sampler 'rti' does not record chains; DPPO uses ddpm or ddim")
        has = state["has_prev"]
        if has.shape[0] != cond.shape[0]:
            raise ValueError(
                f"rti state holds {has.shape[0]} streams, got a batch of "
                f"{cond.shape[0]}: build the runtime with n_streams={cond.shape[0]}"
            )
        if bool(has.all()):  # steady state: the whole batch warm-starts, no indexing
            return self.warm_sample(policy, cond, state["prev"], generator, hooks, obs)
        if not bool(has.any()):
            return self.cold.sample(policy, cond, {}, generator=generator, hooks=hooks, obs=obs)
        cfg = policy.cfg
        x = torch.empty(
            cond.shape[0], cfg.horizon, cfg.action_dim, device=cond.device, dtype=cond.dtype
        )
        cold, warm = torch.nonzero(~has).flatten(), torch.nonzero(has).flatten()
        res_cold = self.cold.sample(
            policy, cond[cold], {}, generator=generator, hooks=hooks, obs=rows(obs, cold)
        )
        x[cold] = res_cold.x
        res_warm = self.warm_sample(
            policy, cond[warm], state["prev"][warm], generator, hooks, rows(obs, warm)
        )
        x[warm] = res_warm.x
        per_stream = (len(cold) * res_cold.nfe + len(warm) * res_warm.nfe) / len(has)
        return ChainResult(
            x=x, chain=None, nfe=res_cold.nfe + res_warm.nfe, nfe_per_stream=per_stream
        )

    def warm_sample(
        self,
        policy: DiffusionPolicy,
        cond: torch.Tensor,
        prev: torch.Tensor,
        generator: torch.Generator | None,
        hooks: Sequence[Hook] = (),
        obs: dict[str, torch.Tensor] | None = None,
    ) -> ChainResult:
        """Warm start from previous clean chunks prev (M, Tp, Da): shift, noise, warm steps."""
        guess = self.warm_guess(prev)
        z = self.warm.draw_noise(guess, generator)
        x_start = torch.addcmul(guess.mul_(self.sqrt_a_start), z, self.sqrt_1ma_start)
        return self.warm.run(
            policy.eps_fn(cond), x_start, cond, generator=generator, hooks=hooks, obs=obs
        )

    def after_chunk(
        self, policy: DiffusionPolicy, result: ChainResult, state: SamplerState
    ) -> None:
        # the runtime never hands result.x out (it returns an un-normalised copy), so it can be
        # kept without a copy
        state["prev"] = result.x.detach()
        state["has_prev"].fill_(True)

    def postprocess(self, actions: np.ndarray) -> np.ndarray:
        """Binarise the executed gripper commands (B, Ta, Da), env units, to +-1."""
        if not (self.binarize_gripper and self.gripper_dims):
            return actions
        out = np.array(actions, copy=True)
        grip = out[..., self.gripper_dims]
        out[..., self.gripper_dims] = np.where(grip >= 0, GRIPPER_CLOSED, GRIPPER_OPEN)
        return out

    def describe(self) -> dict:
        return {
            "name": self.name,
            "base": self.base,
            "base_timesteps": list(self.cold.diffusion.timesteps),
            "n_steps": self.warm.n_steps,
            "timesteps": list(self.warm.timesteps),
            "eta": self.warm.eta,
            "gripper_dims": self.gripper_dims,
            "gripper_clip": self.gripper_clip,
            "binarize_gripper": self.binarize_gripper,
        }


CHUNK_SAMPLERS[RTIChunkSampler.name] = RTIChunkSampler
