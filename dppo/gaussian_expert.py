"""Use a Gaussian-PPO run as a demonstration expert (locomotion tasks have no scripted one)."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import yaml
from omegaconf import OmegaConf

from dppo.actors import GaussianActor
from policies.checkpoint import CHECKPOINTS_DIR, LATEST, load_tree


class GaussianPolicyExpert:
    """Expert protocol over a trained GaussianActor: executes each predicted chunk open loop.

    ``noise`` adds Gaussian action noise (in env units) on top of the deterministic chunk.
    """

    def __init__(self, run: str | Path, noise: float = 0.0):
        run = Path(run)
        state_dir = run / CHECKPOINTS_DIR / LATEST
        if not (state_dir / "train_state.json").exists() or not (run / "config.yaml").exists():
            raise FileNotFoundError(
                f"{run} is not a finished `dppo finetune algorithm=ppo_gaussian` run"
            )
        cfg = OmegaConf.create(yaml.safe_load((run / "config.yaml").read_text()))
        if cfg.algorithm.actor != "gaussian":
            raise ValueError(
                f"{run} trained a {cfg.algorithm.actor!r} actor, not a Gaussian expert"
            )
        import envs

        env = envs.make_env(cfg.task.name)
        space = env.action_space
        self.task, self.obs_key = cfg.task.name, envs.get_task(cfg.task.name).obs_key
        self.n_obs_steps = cfg.task.n_obs_steps
        self.actor = GaussianActor(
            self.obs_key,
            env.observation_space.shape[0],
            cfg.task.n_obs_steps,
            cfg.task.n_action_steps,
            space.shape[0],
            space.low,
            space.high,
            cfg.algorithm,
            seed=0,
        )
        env.close()
        self.actor.load_state_dict(load_tree(state_dir, "train_state")["actor"])
        self.noise = noise
        self._queue: list[np.ndarray] = []
        self._history: list[np.ndarray] = []

    def reset(self, env: gym.Env, obs: np.ndarray, rng: np.random.Generator) -> None:
        self._rng, self._queue = rng, []
        self._history = [obs] * self.n_obs_steps

    def act(self, env: gym.Env, obs: np.ndarray) -> np.ndarray:
        self._history = [*self._history[1:], obs]
        if not self._queue:
            stacked = np.stack(self._history)[None]
            chunk, _ = self.actor.act({self.obs_key: stacked}, deterministic=True)
            self._queue = list(chunk[0])
        action = self._queue.pop(0)
        if self.noise:
            action = action + self._rng.normal(0.0, self.noise, size=action.shape)
        return np.clip(action, self.actor.low, self.actor.high).astype(np.float32)
