"""A vectorised env that runs inside a learned world model, for DPPO fine-tuning in imagination.

``ImaginedVecEnv`` has the interface the DPPO loop uses from ``envs.make_vec_env``: the same
observation and action spaces (obs (E, To, D), action chunks (E, Ta, Da)), ``reset(seed)`` ->
(obs, info), ``step(chunks)`` -> (obs, reward, terminated, truncated, info) with SAME_STEP
autoreset (``info["final_obs"]``, ``info["final_info"]``) and ``is_success`` / ``n_executed`` /
``sim_fault`` in every info, exactly as ``envs.chunk.ChunkWrapper`` under a ``SyncVectorEnv``.

- Start states: real initial observations (from the play data, or from real env resets that take
  no step), encoded by the RSSM's posterior. The first observation an episode returns is that
  real observation; later ones are decoded from imagined latents (the policy acts on decoded
  observations, so the deployed policy runs unchanged in the real simulator).
- Transitions: the RSSM prior, one control step per executed action (actions are clipped to the
  action space first, as the real envs do).
- Reward and termination: the success classifier on the imagined latent. A step whose success
  probability exceeds the threshold, for the ``success_steps``-th imagined step in a row, earns
  ``success_reward`` and ends the episode (``terminated``); otherwise the reward is 0.
  (A classifier with a small false-positive rate per step fires somewhere in most long imagined
  episodes; real successes persist, spurious hits rarely do.) ``max_episode_steps`` control
  steps -> truncated.
- Halting on uncertainty (MOReL): with ``max_disagreement``, a step whose disagreement-ensemble
  spread exceeds it (imagination has left the states the model knows) ends the episode
  (``terminated``) with reward ``-halt_penalty``, so DPPO cannot profit from spurious imagined
  successes there. ``halted`` counts such episodes since construction.
- A non-finite decoded observation is a "simulator fault", handled as ``ChunkWrapper`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from world_models.checkpoint import WorldModelBundle

StartSampler = Callable[[np.random.Generator, int], np.ndarray]
"""(rng, n) -> n real initial observations (n, D) float32."""

INFO_KEYS = ("is_success", "n_executed", "sim_fault")


def pool_start_sampler(pool: np.ndarray) -> StartSampler:
    """Draw start observations uniformly (with replacement) from ``pool`` (N, D)."""
    pool = np.asarray(pool, dtype=np.float32)
    if pool.ndim != 2 or len(pool) == 0:
        raise ValueError(f"start-state pool must be a non-empty (N, D) array, got {pool.shape}")

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        return pool[rng.integers(0, len(pool), size=n)]

    return sample


def reset_start_sampler(env: gym.Env) -> StartSampler:
    """Start observations from real ``env.reset`` calls (no ``env.step`` is ever taken)."""

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        return np.stack(
            [np.asarray(env.reset(seed=int(rng.integers(2**31)))[0], np.float32) for _ in range(n)]
        )

    return sample


def _info(values: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    """A vector info dict in gymnasium's layout: each key with its ``_key`` presence mask."""
    out: dict[str, np.ndarray] = {}
    for key, value in values.items():
        out[key] = value
        out[f"_{key}"] = mask.copy()
    return out


class ImaginedVecEnv(VectorEnv):
    """``num_envs`` imagined episodes of a world model; see the module docstring.

    Args:
        bundle: loaded world model + success classifier.
        start_sampler: where episodes start (``pool_start_sampler`` / ``reset_start_sampler``).
        single_observation_space: (To, D) Box of one real chunk-wrapped env.
        single_action_space: (Ta, Da) Box of one real chunk-wrapped env.
        max_episode_steps: control steps per imagined episode (the real task's limit by default).
        success_threshold: classifier probability above which a step counts as success (None:
            the classifier's own threshold).
        sample_latent: draw z from the prior (Dreamer) or use its mean.
        max_disagreement: halt episodes whose ensemble disagreement exceeds this (None: never;
            needs a bundle with an ensemble).
        halt_penalty: the reward of a halting step is minus this.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(
        self,
        bundle: WorldModelBundle,
        start_sampler: StartSampler,
        num_envs: int,
        single_observation_space: spaces.Box,
        single_action_space: spaces.Box,
        max_episode_steps: int,
        success_threshold: float | None = None,
        success_reward: float = 1.0,
        sample_latent: bool = True,
        seed: int | None = None,
        on_close: Callable[[], None] | None = None,
        success_steps: int = 1,
        max_disagreement: float | None = None,
        halt_penalty: float = 1.0,
    ):
        if bundle.classifier is None:
            raise ValueError("the imagined env needs a world model with a success classifier")
        if max_disagreement is not None and bundle.ensemble is None:
            raise ValueError(
                "halting on disagreement needs a world model trained with a disagreement "
                "ensemble (train-world-model ensemble.n_heads >= 2)"
            )
        if num_envs < 1 or max_episode_steps < 1 or success_steps < 1:
            raise ValueError(
                f"need num_envs >= 1, max_episode_steps >= 1 and success_steps >= 1, got "
                f"{num_envs}, {max_episode_steps}, {success_steps}"
            )
        self.model, self.classifier = bundle.model.eval(), bundle.classifier.eval()
        cfg = self.model.cfg
        n_obs_steps, obs_dim = single_observation_space.shape
        if obs_dim != cfg.obs_dim or single_action_space.shape[1] != cfg.action_dim:
            raise ValueError(
                f"spaces (obs {single_observation_space.shape}, action "
                f"{single_action_space.shape}) do not fit the world model (obs dim {cfg.obs_dim}, "
                f"action dim {cfg.action_dim})"
            )
        self.num_envs = num_envs
        self.single_observation_space = single_observation_space
        self.single_action_space = single_action_space
        self.observation_space = batch_space(single_observation_space, num_envs)
        self.action_space = batch_space(single_action_space, num_envs)
        self.n_obs_steps, self.n_action_steps = n_obs_steps, single_action_space.shape[0]
        self.max_episode_steps = int(max_episode_steps)
        self.threshold = (
            self.classifier.cfg.threshold if success_threshold is None else float(success_threshold)
        )
        self.success_reward = float(success_reward)
        self.success_steps = int(success_steps)
        self.sample_latent = sample_latent
        self.ensemble = bundle.ensemble
        self.max_disagreement = max_disagreement
        self.halt_penalty = float(halt_penalty)
        self.halted = 0
        self._start_sampler = start_sampler
        self._on_close = on_close
        self._rng = np.random.default_rng(seed)
        self._gen = torch.Generator().manual_seed(0 if seed is None else seed)
        self._low = single_action_space.low
        self._high = single_action_space.high
        self._state = self.model.initial(num_envs)
        self._first = torch.zeros(num_envs, obs_dim)
        self._history = np.zeros((num_envs, n_obs_steps, obs_dim), np.float32)
        self._elapsed = np.zeros(num_envs, dtype=np.int64)
        self._streak = np.zeros(num_envs, dtype=np.int64)  # consecutive classifier hits

    # -- episodes -------------------------------------------------------------------------------
    @torch.no_grad()
    def _start(self, mask: np.ndarray) -> None:
        """Begin new episodes in the envs of ``mask`` (E,) bool."""
        idx = np.flatnonzero(mask)
        first = torch.as_tensor(self._start_sampler(self._rng, len(idx)), dtype=torch.float32)
        state = self.model.encode_start(first, self._gen, self.sample_latent)
        rows = torch.as_tensor(idx)
        self._state.deter[rows] = state.deter
        self._state.stoch[rows] = state.stoch
        self._first[rows] = first
        self._history[idx] = first.numpy()[:, None]
        self._elapsed[idx] = 0
        self._streak[idx] = 0

    def _reset_info(self) -> dict[str, np.ndarray]:
        n = self.num_envs
        values = {
            "is_success": np.zeros(n, bool),
            "n_executed": np.zeros(n, np.int64),
            "sim_fault": np.zeros(n, bool),
        }
        return _info(values, np.ones(n, bool))

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start every env afresh: obs (E, To, D) (the real first observation repeated To times)."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
            self._gen.manual_seed(seed)
        self._start(np.ones(self.num_envs, bool))
        return self._history.copy(), self._reset_info()

    @torch.no_grad()
    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Imagine the chunks ``actions`` (E, Ta, Da); see the module docstring for the returns."""
        actions = np.asarray(actions)
        if actions.shape != self.action_space.shape:
            raise ValueError(
                f"expected action chunks of shape {self.action_space.shape}, got {actions.shape}"
            )
        chunks = torch.as_tensor(np.clip(actions, self._low, self._high), dtype=torch.float32)
        n = self.num_envs
        active = np.ones(n, bool)
        reward = np.zeros(n, np.float64)
        success = np.zeros(n, bool)
        terminated, truncated, fault = (np.zeros(n, bool) for _ in range(3))
        n_executed = np.zeros(n, np.int64)
        for k in range(self.n_action_steps):
            nxt = self.model.imagine_step(self._state, chunks[:, k], self._gen, self.sample_latent)
            obs = self.model.decode_obs(nxt, self._first).numpy()
            above = (self.classifier.prob(nxt.feature()) > self.threshold).numpy()
            finite = np.isfinite(obs).all(axis=1)
            faulty = active & ~finite
            ok = active & finite
            self._streak = np.where(ok, np.where(above, self._streak + 1, 0), self._streak)
            hit = self._streak >= self.success_steps
            halt = ok & ~hit & self._uncertain(nxt)
            fault |= faulty
            truncated |= faulty
            n_executed += active
            self._state = nxt.where(torch.as_tensor(ok), self._state)
            self._history[ok] = np.concatenate([self._history[ok, 1:], obs[ok, None]], axis=1)
            self._elapsed += ok
            reward += np.where(ok & hit, self.success_reward, 0.0) - self.halt_penalty * halt
            success |= ok & hit
            terminated |= (ok & hit) | halt
            self.halted += int(halt.sum())
            out_of_time = ok & ~hit & ~halt & (self._elapsed >= self.max_episode_steps)
            truncated |= out_of_time
            active &= ~(faulty | hit | halt | out_of_time)
            if not active.any():
                break
        ended = terminated | truncated
        step_values = {"is_success": success, "n_executed": n_executed, "sim_fault": fault}
        info: dict[str, Any] = _info(step_values, np.ones(n, bool))
        if ended.any():
            final_obs = np.full(n, None, dtype=object)
            for i in np.flatnonzero(ended):
                final_obs[i] = self._history[i].copy()
            info["final_obs"] = final_obs
            info["_final_obs"] = ended.copy()
            info["final_info"] = _info(
                {k: np.where(ended, v, np.zeros_like(v)) for k, v in step_values.items()}, ended
            )
            info["_final_info"] = ended.copy()
            self._start(ended)
            for key in INFO_KEYS:  # the top-level info of a reset env is its reset info
                info[key] = np.where(ended, np.zeros_like(info[key]), info[key])
        return self._history.copy(), reward, terminated, truncated, info

    def _uncertain(self, state) -> np.ndarray:
        """(E,) bool: the ensemble's disagreement on ``state`` exceeds ``max_disagreement``."""
        if self.max_disagreement is None:
            return np.zeros(self.num_envs, bool)
        return (self.ensemble.disagreement(state.deter) > self.max_disagreement).numpy()

    def close_extras(self, **kwargs: Any) -> None:
        if self._on_close is not None:
            self._on_close()


START_STATE_SOURCES = ("play", "reset")


def make_imagined_vec_env(
    bundle: WorldModelBundle,
    task: str,
    num_envs: int,
    n_obs_steps: int,
    n_action_steps: int,
    max_episode_steps: int | None = None,
    start_states: str = "play",
    seed: int | None = None,
    **kwargs: Any,
) -> ImaginedVecEnv:
    """An imagined vector env with the spaces of ``envs.make_vec_env(task, ...)``.

    ``start_states``: "play" draws the encoded initial observations of the play episodes stored
    with the world model; "reset" draws fresh real ``env.reset`` observations (no step is taken).
    ``max_episode_steps`` defaults to the task's limit. ``kwargs`` go to ``ImaginedVecEnv``.
    """
    import envs
    from envs.chunk import ChunkWrapper

    if start_states not in START_STATE_SOURCES:
        raise ValueError(f"start_states must be one of {START_STATE_SOURCES}, got {start_states!r}")
    spec = envs.get_task(task)
    real = ChunkWrapper(envs.make_env(task), n_obs_steps, n_action_steps)
    if start_states == "play":
        sampler, on_close = pool_start_sampler(bundle.start_obs.numpy()), None
        real.close()
    else:
        sampler, on_close = reset_start_sampler(real.env), real.close
    return ImaginedVecEnv(
        bundle,
        sampler,
        num_envs,
        real.observation_space,
        real.action_space,
        max_episode_steps or spec.max_episode_steps,
        seed=seed,
        on_close=on_close,
        **kwargs,
    )
