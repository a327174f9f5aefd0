"""Play data: scripted exploratory behaviour (not task demonstrations) for world-model training.

A play agent strings together *segments* of random length, each one behaviour drawn at random:

- ``point_reach`` (and its two-goal variant): reach random points of the arena (around the
  pillar), go to a goal and linger there, go near a goal and stop short, rush through a goal,
  wander with random correlated actions.
- ``lift``: reach random gripper poses with the gripper opening and closing, grasp the cube and
  lift it (the scripted Lift expert for a random number of steps, so some lifts complete the task
  and others stop half-way) then release it, push the cube sideways, wander randomly. Some grasps
  aim off the cube (position and yaw errors), so the data shows closing beside the cube and
  lifting nothing: without such misses a world model learns that every close-and-raise lifts.

Episodes start from the task's own reset distribution and are *not* cut at success: the agent
keeps playing until the time limit, so the privileged success signal stored per step (``success``:
the step's ``info["is_success"]``, i.e. success of the observation *after* the action) has
positives and near misses for the success classifier. Written with ``envs.dataset.write_dataset``.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from envs import point_reach as pr
from envs.dataset import Episode, write_dataset
from envs.registry import get_task
from envs.vector import make_env

AR_CORRELATION = 0.8  # AR(1) coefficient of the correlated action noise


class SegmentPlay:
    """Base play agent: draws behaviour segments and their noise; subclasses implement them.

    ``behaviours`` maps a behaviour name to (probability, (min steps, max steps)).
    """

    behaviours: dict[str, tuple[float, tuple[int, int]]] = {}
    noise_range = (0.0, 0.3)  # std of the correlated action noise, drawn per segment

    def __init__(self) -> None:
        self._rng = np.random.default_rng()
        self.behaviour = ""
        self._left = 0
        self._noise_std = 0.0
        self._noise = np.zeros(0)

    def reset(self, env: gym.Env, obs: np.ndarray, rng: np.random.Generator) -> None:
        self._rng = rng
        self._noise = np.zeros(env.action_space.shape)
        self._left = 0

    def act(self, env: gym.Env, obs: np.ndarray) -> np.ndarray:
        """(Da,) float32 action in [-1, 1]."""
        if self._left <= 0:
            self._new_segment(env, obs)
        self._left -= 1
        action = self.segment_action(env, obs)
        rho = AR_CORRELATION
        eps = self._rng.standard_normal(self._noise.shape)
        self._noise = rho * self._noise + math.sqrt(1 - rho**2) * eps
        return np.clip(action + self._noise_std * self._noise, -1.0, 1.0).astype(np.float32)

    def _new_segment(self, env: gym.Env, obs: np.ndarray) -> None:
        names = list(self.behaviours)
        probs = np.array([self.behaviours[n][0] for n in names])
        self.behaviour = names[self._rng.choice(len(names), p=probs / probs.sum())]
        lo, hi = self.behaviours[self.behaviour][1]
        self._left = int(self._rng.integers(lo, hi + 1))
        self._noise_std = float(self._rng.uniform(*self.noise_range))
        self.start_segment(env, obs)

    def start_segment(self, env: gym.Env, obs: np.ndarray) -> None:
        raise NotImplementedError

    def segment_action(self, env: gym.Env, obs: np.ndarray) -> np.ndarray:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# point_reach
# --------------------------------------------------------------------------------------------
TARGET_MARGIN = 0.1  # m between random targets and the walls
# a straight path passing closer than this to the pillar's centre is blocked
PILLAR_BLOCK = pr.PILLAR_RADIUS + pr.AGENT_RADIUS + 0.05
PILLAR_DETOUR = pr.PILLAR_RADIUS + pr.AGENT_RADIUS + pr.WAYPOINT_CLEARANCE
NEAR_GOAL_OFFSET = (0.04, 0.15)  # m, "near a goal" targets miss it by this much
RUSH_BEYOND = 0.3  # m, "rush" targets lie this far past the goal
WANDER_SCALE = 0.8  # action magnitude of the wander behaviour
DETOUR_PROB = 0.6  # share of segments that steer around the pillar; the others run into it, so
# the world model sees collisions (without them it imagines a way through the pillar, which
# fine-tuning in imagination then exploits)


def _closest_on_segment(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The point of segment ab closest to the origin (the pillar's centre)."""
    d = b - a
    t = np.clip(-a @ d / max(d @ d, 1e-12), 0.0, 1.0)
    return a + t * d


class PointReachPlay(SegmentPlay):
    """Play on ``point_reach``: PD control to behaviour-dependent targets, most segments detouring
    the pillar, the others going straight into it."""

    behaviours = {
        "reach": (0.35, (15, 40)),
        "goal": (0.25, (30, 80)),
        "near_goal": (0.15, (20, 50)),
        "rush": (0.10, (15, 40)),
        "wander": (0.15, (5, 25)),
    }
    noise_range = (0.0, 0.4)

    def __init__(self) -> None:
        super().__init__()
        self.target = np.zeros(2)
        self._side = 1.0
        self._detour = True

    def start_segment(self, env: gym.Env, obs: np.ndarray) -> None:
        rng = self._rng
        n_goals = (obs.shape[-1] - pr.GOALS_START) // 2
        goal = obs[pr.goal_slice(int(rng.integers(n_goals)))].astype(np.float64)
        self._side = float(rng.choice([-1.0, 1.0]))
        self._detour = bool(rng.random() < DETOUR_PROB)
        if self.behaviour == "reach":
            half = pr.ARENA_HALF_SIZE - TARGET_MARGIN
            while True:
                self.target = rng.uniform(-half, half, size=2)
                if np.linalg.norm(self.target) > PILLAR_DETOUR:
                    break
        elif self.behaviour == "goal":
            self.target = goal
        elif self.behaviour == "near_goal":
            angle = rng.uniform(0, 2 * np.pi)
            self.target = goal + rng.uniform(*NEAR_GOAL_OFFSET) * np.array(
                [np.cos(angle), np.sin(angle)]
            )
        elif self.behaviour == "rush":
            pos = obs[pr.POS].astype(np.float64)
            direction = (goal - pos) / max(np.linalg.norm(goal - pos), 1e-6)
            self.target = goal + RUSH_BEYOND * direction
        else:  # wander
            self.target = rng.uniform(-WANDER_SCALE, WANDER_SCALE, size=2)

    def _waypoint(self, pos: np.ndarray) -> np.ndarray:
        """The target, or a detour point beside the pillar when the straight path is blocked."""
        closest = _closest_on_segment(pos, self.target)
        dist = np.linalg.norm(closest)
        if dist >= PILLAR_BLOCK or not self._detour:
            return self.target
        if dist < 1e-6:  # heading straight through the centre: pass on this segment's side
            d = self.target - pos
            closest = self._side * np.array([-d[1], d[0]])
            dist = np.linalg.norm(closest)
        return closest / dist * PILLAR_DETOUR

    def segment_action(self, env: gym.Env, obs: np.ndarray) -> np.ndarray:
        if self.behaviour == "wander":
            return self.target  # a constant random push, made wiggly by the segment's noise
        pos, vel = obs[pr.POS].astype(np.float64), obs[pr.VEL].astype(np.float64)
        return pr.EXPERT_KP * (self._waypoint(pos) - pos) - pr.EXPERT_KD * vel


# --------------------------------------------------------------------------------------------
# lift (robosuite)
# --------------------------------------------------------------------------------------------
LIFT_REACH_BOX = ((-0.15, 0.15), (-0.2, 0.2), (0.03, 0.25))  # m around the cube / above the table
LIFT_YAW_RANGE = np.pi / 4
PUSH_START = 0.08  # m behind the cube (along the push direction)
PUSH_END = 0.1  # m past the cube
PUSH_SPEED = 0.5
RELEASE_STEPS = (5, 30)  # steps with the gripper opening after a grasp segment
GRASP_MISS_PROB = 0.4  # share of grasp segments that aim off the cube
GRASP_AIM_ERROR = 0.04  # m, largest horizontal aim error of such a grasp
GRASP_YAW_ERROR = 0.6  # rad, largest yaw error of such a grasp
PHASE_TOL = 0.015  # m, a push phase ends this close to its target


class LiftPlay(SegmentPlay):
    """Play on robosuite ``lift`` with privileged state (cube pose, gripper site)."""

    behaviours = {
        "reach": (0.3, (15, 50)),
        "grasp": (0.3, (30, 130)),
        "push": (0.2, (40, 80)),
        "wander": (0.2, (5, 25)),
    }

    def __init__(self) -> None:
        super().__init__()
        from envs.robosuite_tasks import LiftExpert

        self._expert = LiftExpert(noise=0.0)
        self._waypoints: list[np.ndarray] = []
        self._yaw = 0.0
        self._grip = -1.0
        self._release_at = 0

    def start_segment(self, env: gym.Env, obs: np.ndarray) -> None:
        from envs.robosuite_tasks import GRIPPER_CLOSE, GRIPPER_OPEN

        rng, rs_env = self._rng, env.unwrapped
        cube = rs_env.robosuite_env.sim.data.body_xpos[rs_env.robosuite_env.cube_body_id].copy()
        table_z = rs_env.robosuite_env.model.mujoco_arena.table_offset[2]
        self._yaw = float(rng.uniform(-LIFT_YAW_RANGE, LIFT_YAW_RANGE))
        self._grip = float(rng.choice([GRIPPER_OPEN, GRIPPER_CLOSE]))
        if self.behaviour == "reach":
            (x0, x1), (y0, y1), (z0, z1) = LIFT_REACH_BOX
            offset = rng.uniform([x0, y0, z0], [x1, y1, z1])
            self._waypoints = [
                np.array([cube[0] + offset[0], cube[1] + offset[1], table_z + offset[2]])
            ]
        elif self.behaviour == "push":
            angle = rng.uniform(0, 2 * np.pi)
            d = np.array([np.cos(angle), np.sin(angle), 0.0])
            start, end = cube - PUSH_START * d, cube + PUSH_END * d
            self._grip, self._yaw = GRIPPER_CLOSE, 0.0
            self._waypoints = [start + [0.0, 0.0, PUSH_START], start, end]
        elif self.behaviour == "grasp":
            self._expert.reset(env, obs, rng)
            self._release_at = int(rng.integers(*RELEASE_STEPS))
            miss = rng.random() < GRASP_MISS_PROB
            self._expert.aim_error = rng.uniform(-GRASP_AIM_ERROR, GRASP_AIM_ERROR, 2) * miss
            self._expert.yaw_error = float(rng.uniform(-GRASP_YAW_ERROR, GRASP_YAW_ERROR)) * miss
        else:  # wander: random constant push, made wiggly by the segment's noise
            self._waypoints = [rng.uniform(-1.0, 1.0, size=env.action_space.shape)]

    def segment_action(self, env: gym.Env, obs: np.ndarray) -> np.ndarray:
        from envs.robosuite_tasks import GRIPPER_OPEN, Waypoint, servo_action

        rs_env = env.unwrapped
        if self.behaviour == "grasp":
            if self._left >= self._release_at:
                return self._expert.act(env, obs).astype(np.float64)
            hold = Waypoint(rs_env.eef_pos(), self._yaw, GRIPPER_OPEN)  # release the cube
            return servo_action(rs_env, hold)
        if self.behaviour == "wander":
            return self._waypoints[0]
        target = self._waypoints[0]
        if len(self._waypoints) > 1 and np.linalg.norm(target - rs_env.eef_pos()) < PHASE_TOL:
            self._waypoints.pop(0)
            target = self._waypoints[0]
        speed = PUSH_SPEED if self.behaviour == "push" else 1.0
        return servo_action(rs_env, Waypoint(target, self._yaw, self._grip, speed=speed))


PLAY_AGENTS: dict[str, type[SegmentPlay]] = {
    "point_reach": PointReachPlay,
    "point_reach_two_goals": PointReachPlay,
    "lift": LiftPlay,
}


def make_play_agent(task: str) -> SegmentPlay:
    if task not in PLAY_AGENTS:
        raise ValueError(
            f"no play collector for task {task!r}; tasks with one: {', '.join(sorted(PLAY_AGENTS))}"
        )
    return PLAY_AGENTS[task]()


# --------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------
def _play_episode(
    env, agent: SegmentPlay, rng, obs_key: str, max_steps: int
) -> tuple[Episode, Counter]:
    obs, _ = env.reset(seed=int(rng.integers(2**31)))
    agent.reset(env, obs, rng)
    observations, actions, rewards, successes = [], [], [], []
    behaviour_steps: Counter = Counter()
    for _ in range(max_steps):
        action = agent.act(env, obs)
        behaviour_steps[agent.behaviour] += 1
        observations.append(obs)
        actions.append(action)
        obs, reward, _, truncated, info = env.step(action)  # success does not end play
        rewards.append(reward)
        successes.append(bool(info.get("is_success", False)))
        if truncated:
            break
    episode = {
        "obs": {obs_key: np.asarray(observations, dtype=np.float32)},
        "action": np.asarray(actions, dtype=np.float32),
        "reward": np.asarray(rewards, dtype=np.float32),
        "success": np.asarray(successes, dtype=bool),
    }
    return episode, behaviour_steps


def collect_play(
    task: str,
    n_steps: int,
    seed: int = 0,
    episode_steps: int | None = None,
    progress: bool = True,
) -> tuple[list[Episode], dict[str, Any]]:
    """Play episodes of ``task`` until at least ``n_steps`` control steps are recorded.

    ``episode_steps`` caps an episode's length (default and maximum: the task's time limit).
    Returns (episodes, stats) with ``n_episodes``, ``n_steps``, ``success_steps``,
    ``episodes_with_success`` and ``behaviour_steps`` ({behaviour: steps}).
    """
    spec = get_task(task)
    agent = make_play_agent(task)
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    max_steps = min(episode_steps or spec.max_episode_steps, spec.max_episode_steps)
    if max_steps < 2:
        raise ValueError(f"episode_steps must be >= 2, got {episode_steps}")
    env = make_env(task)
    rng = np.random.default_rng(seed)
    episodes: list[Episode] = []
    behaviour_steps: Counter = Counter()
    total = 0
    with tqdm(total=n_steps, desc=f"play {task}", disable=not progress) as bar:
        while total < n_steps:
            episode, counts = _play_episode(env, agent, rng, spec.obs_key, max_steps)
            episodes.append(episode)
            behaviour_steps.update(counts)
            total += len(episode["action"])
            bar.update(len(episode["action"]))
    env.close()
    stats = {
        "n_episodes": len(episodes),
        "n_steps": total,
        "success_steps": int(sum(ep["success"].sum() for ep in episodes)),
        "episodes_with_success": int(sum(ep["success"].any() for ep in episodes)),
        "behaviour_steps": dict(sorted(behaviour_steps.items())),
        "seed": seed,
    }
    return episodes, stats


def record_play(
    task: str,
    n_steps: int,
    out: str | os.PathLike,
    seed: int = 0,
    episode_steps: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """``collect_play`` then ``write_dataset`` to ``out`` with the task's metadata; (path, stats)."""
    spec = get_task(task)
    episodes, stats = collect_play(task, n_steps, seed, episode_steps, progress)
    meta = {
        "task": task,
        "kind": "play",
        "control_freq": spec.control_freq,
        "max_episode_steps": spec.max_episode_steps,
        "success_steps": stats["success_steps"],
        "episodes_with_success": stats["episodes_with_success"],
        "behaviour_steps": stats["behaviour_steps"],
        "seed": seed,
        "created_by": "envs.play.record_play",
    }
    return write_dataset(out, episodes, meta, overwrite=overwrite), stats
