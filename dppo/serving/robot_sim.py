"""``dppo robot-sim``: a simulated MuJoCo robot driven through a policy server.

The simulator stands in for a robot's driver: the ``RobotClient`` control loop runs at the
control rate, gets chunks from the server over the network, and reports success and latency.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm import tqdm

import envs
from dppo.serving.client import connect
from dppo.serving.robot import EpisodeStats, RobotClient, RobotConfig

P50, P99 = 50, 99


class SimRobot:
    """A gymnasium env behind the ``Robot`` interface: one ``apply`` = one env step."""

    def __init__(self, env: gym.Env, obs_key: str):
        self.env = env
        self.obs_key = obs_key
        self.obs: np.ndarray | None = None
        self.episode_return = 0.0
        self.success = False

    def start(self) -> None:
        self.obs, _ = self.env.reset()
        self.episode_return = 0.0
        self.success = False

    def observe(self) -> dict[str, np.ndarray]:
        return {self.obs_key: self.obs}

    def apply(self, action: np.ndarray) -> bool:
        self.obs, reward, terminated, truncated, info = self.env.step(action)
        self.episode_return += float(reward)
        self.success |= bool(info.get("is_success", False))
        return bool(terminated or truncated)


def check_spec(meta: dict[str, Any], env: gym.Env, obs_key: str) -> None:
    """The server's policy must read this env's observation and drive its action space."""
    obs_spec = meta["obs_spec"]
    env_shape = list(env.observation_space.shape)
    if set(obs_spec) != {obs_key} or obs_spec[obs_key]["shape"] != env_shape:
        raise ValueError(
            f"the server's observation spec {obs_spec} does not match the env's "
            f"{{{obs_key!r}: {env_shape}}}"
        )
    if meta["action_spec"]["shape"][-1] != env.action_space.shape[0]:
        raise ValueError(
            f"the server's action dim {meta['action_spec']['shape'][-1]} does not "
            f"match the env's {env.action_space.shape[0]}"
        )


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarise(
    episodes: list[EpisodeStats], successes: list[bool], returns: list[float]
) -> dict[str, Any]:
    rtt = [x for e in episodes for x in e.rtt_ms]
    inference = [x for e in episodes for x in e.inference_ms]
    queue = [x for e in episodes for x in e.queue_ms]
    steps = sum(e.steps for e in episodes)
    return {
        "n_episodes": len(episodes),
        "success_rate": float(np.mean(successes)),
        "mean_return": float(np.mean(returns)),
        "mean_length": float(np.mean([e.steps for e in episodes])),
        "requests": sum(e.requests for e in episodes),
        "rtt_ms_p50": percentile(rtt, P50),
        "rtt_ms_p99": percentile(rtt, P99),
        "inference_ms_p50": percentile(inference, P50),
        "queue_ms_p50": percentile(queue, P50),
        "dropped_actions": sum(e.dropped for e in episodes),
        "held_steps": sum(e.held for e in episodes),
        "overruns": sum(e.overruns for e in episodes),
        "wait_ms_per_step": sum(e.wait_ms for e in episodes) / max(steps, 1),
    }


def run_robot_sim(
    server: str,
    task: str | None = None,
    n_episodes: int = 10,
    seed: int = 0,
    *,
    rate_hz: float | None = None,
    token: str | None = None,
    progress: bool = True,
    **robot_options: Any,
) -> dict[str, Any]:
    """Run ``n_episodes`` of ``task`` (default: the server's) through the server at ``server``.

    ``rate_hz`` None = the control frequency the server announces (else the task's);
    ``robot_options`` are the other RobotConfig fields (low_watermark, blend, ...).
    The env is seeded once, at its first reset, with ``seed``, as ``dppo eval`` seeds its one
    env with ``n_envs=1``: with ``low_watermark=0, on_starve="wait"`` (request a chunk when the
    previous one is used up, pause the simulation while waiting) the episodes are those of the
    in-process evaluation, so the success rates can be compared directly.
    """
    with connect(server, token=token) as client:
        meta = client.metadata
        task = task or meta["task"]
        spec = envs.get_task(task)
        rate = rate_hz or meta.get("control_freq") or spec.control_freq
        robot_cfg = RobotConfig(rate_hz=float(rate), **robot_options)
        env = envs.make_env(task, seed=seed)
        try:
            check_spec(meta, env, spec.obs_key)
            sim = SimRobot(env, spec.obs_key)
            episodes, successes, returns = [], [], []
            with RobotClient(client, robot_cfg) as loop:
                for _ in tqdm(
                    range(n_episodes), desc=f"robot-sim {task}", disable=not progress, leave=False
                ):
                    sim.start()
                    episodes.append(loop.run_episode(sim, spec.max_episode_steps))
                    successes.append(sim.success)
                    returns.append(sim.episode_return)
        finally:
            env.close()
    return {
        "task": task,
        "server": server,
        "rate_hz": robot_cfg.rate_hz,
        "blend": robot_cfg.blend,
        "low_watermark": robot_cfg.low_watermark,
        "on_starve": robot_cfg.on_starve,
        "sampler": meta["sampler"],
        **summarise(episodes, successes, returns),
    }


def robot_sim_command(cfg) -> dict[str, Any]:
    """``dppo robot-sim server=ws://... [task=...]``: run, print and optionally save the report."""
    if cfg.n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {cfg.n_episodes}")
    report = run_robot_sim(
        cfg.server,
        cfg.task,
        cfg.n_episodes,
        cfg.seed,
        rate_hz=cfg.rate_hz,
        token=None if cfg.token is None else str(cfg.token),
        low_watermark=cfg.low_watermark,
        blend=cfg.blend,
        blend_weight=cfg.blend_weight,
        on_starve=cfg.on_starve,
    )
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        report["out"] = str(out)
    return report
