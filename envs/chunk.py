"""Chunk execution: one wrapper step = Ta env steps, observations stacked over To steps."""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from policies.history import ObsHistory

_OBS_KEY = "obs"  # the single stream of the wrapper's ObsHistory


class ChunkWrapper(gym.Wrapper):
    """Executes action chunks (Ta, Da) and returns the last To observations (To, D).

    - ``reset``: the history is the first observation repeated To times.
    - ``step(chunk)``: the Ta actions run one by one; when the episode ends inside the chunk the
      remaining actions are not applied. Returns the stacked history (To, D) after the last
      executed step, the *sum* of the executed steps' rewards, terminated / truncated of the last
      executed step and its info, with ``info["is_success"]`` True if success happened at any
      executed step and ``info["n_executed"]`` the number of env steps run.
    - Simulator faults: a non-finite observation or reward is not passed on. The step returns the
      last finite history, the reward summed over the steps before the fault (the faulty step
      counts 0), ``truncated=True`` and ``info["sim_fault"] = True`` (a vector env's autoreset
      then resets this env). ``n_sim_faults`` counts them over the wrapper's life.

    Every info (reset and step) carries ``is_success``, ``n_executed`` and ``sim_fault`` so that
    vectorised infos have the same keys at every step.
    """

    def __init__(self, env: gym.Env, n_obs_steps: int = 1, n_action_steps: int = 1):
        super().__init__(env)
        obs_space, act_space = env.observation_space, env.action_space
        if not isinstance(obs_space, spaces.Box) or len(obs_space.shape) != 1:
            raise TypeError(f"ChunkWrapper needs a flat Box observation space, got {obs_space}")
        if not isinstance(act_space, spaces.Box) or len(act_space.shape) != 1:
            raise TypeError(f"ChunkWrapper needs a flat Box action space, got {act_space}")
        if n_action_steps < 1:
            raise ValueError(f"n_action_steps must be >= 1, got {n_action_steps}")
        self.n_obs_steps = n_obs_steps
        self.n_action_steps = n_action_steps
        self.observation_space = spaces.Box(
            np.repeat(obs_space.low[None], n_obs_steps, axis=0),
            np.repeat(obs_space.high[None], n_obs_steps, axis=0),
            dtype=obs_space.dtype,
        )
        self.action_space = spaces.Box(
            np.repeat(act_space.low[None], n_action_steps, axis=0),
            np.repeat(act_space.high[None], n_action_steps, axis=0),
            dtype=act_space.dtype,
        )
        self._history = ObsHistory(n_obs_steps)
        self.n_sim_faults = 0

    def _stacked(self) -> np.ndarray:
        return self._history.stacked()[_OBS_KEY][0]

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        if not np.isfinite(obs).all():
            raise RuntimeError("the environment returned a non-finite observation on reset")
        self._history.reset({_OBS_KEY: np.asarray(obs, dtype=self.observation_space.dtype)[None]})
        info = dict(info)
        info.setdefault("is_success", False)
        info.update(n_executed=0, sim_fault=False)
        return self._stacked(), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Run the chunk ``action`` (Ta, Da); see the class docstring for what is returned."""
        chunk = np.asarray(action)
        if chunk.shape != self.action_space.shape:
            raise ValueError(
                f"expected an action chunk of shape {self.action_space.shape}, got {chunk.shape}"
            )
        total_reward, success, fault = 0.0, False, False
        terminated = truncated = False
        info: dict[str, Any] = {}
        observations = []  # the finite observations of this chunk
        for a in chunk:
            obs, reward, terminated, truncated, info = self.env.step(a)
            if not (np.isfinite(obs).all() and math.isfinite(reward)):
                fault, terminated, truncated = True, False, True
                self.n_sim_faults += 1
                break
            observations.append(obs)
            total_reward += float(reward)
            success = success or bool(info.get("is_success", False))
            if terminated or truncated:
                break
        # only the last To observations can remain in the history
        for obs in observations[-self.n_obs_steps :]:
            self._history.push({_OBS_KEY: np.asarray(obs, self.observation_space.dtype)[None]})
        n_executed = len(observations) + fault
        info = dict(info, is_success=success, n_executed=n_executed, sim_fault=fault)
        return self._stacked(), total_reward, terminated, truncated, info
