"""The single policy runtime: observations in, executed action slices out.

Evaluation, DPPO rollouts, the world-model loop and the policy server all act through
``PolicyRuntime``. It owns the observation history (for callers that push one observation at a
time), the chunk sampler and its per-stream warm-start state, guidance hooks and the RNG.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from policies.chunk_samplers import ChunkSampler, SamplerState
from policies.diffusion import DiffusionPolicy
from policies.history import ObsHistory
from policies.normalizer import ACTION_KEY
from policies.samplers import Hook


@dataclass
class ActResult:
    """One call's output.

    actions: (B, Ta, Da) env units, the slice to execute. chunk: (B, Tp, Da) env units.
    chain: (B, K+1, Tp, Da) normalised samples of the recorded denoising steps, or None.
    cond: (B, Dc) conditioning used. nfe: network evaluations (a batched call counts once).
    ms: wall time of the call. nfe_per_stream: one stream's share, averaged over the batch (differs
    from nfe when warm-started streams and starting episodes share a call).
    """

    actions: np.ndarray
    chunk: np.ndarray
    chain: torch.Tensor | None
    cond: torch.Tensor
    nfe: int
    ms: float
    nfe_per_stream: float


class PolicyRuntime:
    """Runs ``policy`` with ``sampler`` for ``n_streams`` parallel observation streams."""

    def __init__(
        self,
        policy: DiffusionPolicy,
        sampler: ChunkSampler,
        n_streams: int = 1,
        *,
        hooks: Sequence[Hook] = (),
        seed: int | None = None,
        device: str = "cpu",
    ):
        self.policy = policy.to(device).eval()
        self.sampler = sampler
        self.hooks = list(hooks)
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed if seed is not None else torch.seed())
        self.n_streams = n_streams
        self.history = ObsHistory(policy.cfg.n_obs_steps)
        self.state: SamplerState = sampler.init_state(policy, n_streams, self.device)

    @property
    def cfg(self):
        return self.policy.cfg

    def reset(self, mask: np.ndarray | None = None) -> None:
        """Start new episodes for the streams in ``mask`` (all when None): warm-start state cleared."""
        m = torch.ones(self.n_streams, dtype=torch.bool) if mask is None else torch.as_tensor(mask)
        self.sampler.reset_state(self.state, m.to(self.device))
        if mask is None:
            self.history = ObsHistory(self.cfg.n_obs_steps)

    def set_sampler(self, sampler: ChunkSampler) -> None:
        self.sampler = sampler
        self.state = sampler.init_state(self.policy, self.n_streams, self.device)

    def _to_tensors(self, obs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        missing = [k for k in self.policy.obs_keys if k not in obs]
        if missing:
            raise KeyError(
                f"observation lacks key(s) {missing}; policy expects {self.policy.obs_keys}"
            )
        out = {}
        for k in self.policy.obs_keys:
            x = torch.as_tensor(np.asarray(obs[k]), dtype=torch.float32, device=self.device)
            want = (self.cfg.n_obs_steps, *self.cfg.obs_shapes[k])
            if tuple(x.shape[1:]) != want:
                raise ValueError(
                    f"observation {k!r} has shape {tuple(x.shape)}, expected (B, {want})"
                )
            out[k] = x
        return out

    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray], record_from: int | None = None) -> ActResult:
        """Observation histories {key: (B, To, *shape)} -> the Ta actions to execute per stream."""
        start = time.perf_counter()
        obs_t = self._to_tensors(obs)
        obs_norm = self.policy.normalizer.normalize_obs(obs_t)
        cond = self.policy.encode(obs_norm)
        result = self.sampler.sample(
            self.policy,
            cond,
            self.state,
            generator=self.generator,
            hooks=self.hooks,
            obs=obs_norm,
            record_from=record_from,
        )
        self.sampler.after_chunk(self.policy, result, self.state)
        chunk = self.policy.normalizer.unnormalize(ACTION_KEY, result.x).cpu().numpy()
        s = self.cfg.action_start
        actions = self.sampler.postprocess(chunk[:, s : s + self.cfg.n_action_steps])
        ms = (time.perf_counter() - start) * 1e3
        return ActResult(actions, chunk, result.chain, cond, result.nfe, ms, result.nfe_per_stream)

    def step(self, obs: dict[str, np.ndarray], reset: np.ndarray | None = None) -> ActResult:
        """Push one observation {key: (B, *shape)} into the history and act.

        ``reset`` (B,) bool marks streams whose episode starts with this observation.
        """
        if self.history.is_empty:
            self.history.reset(obs)
            return self.act(self.history.stacked())
        self.history.push(obs)
        if reset is not None and np.any(reset):
            mask = np.asarray(reset, dtype=bool)
            self.history.reset(obs, mask=mask)
            self.reset(mask)
        return self.act(self.history.stacked())
