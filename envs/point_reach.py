"""``point_reach``: a planar point mass that must reach a goal behind a pillar and stop on it.

A real MuJoCo simulation driven through raw ``mujoco`` (no gymnasium ``MujocoEnv``) so it runs at
thousands of control steps per second on one core. The agent is a sphere on two damped slide joints
with a motor each (action in [-1, 1]^2) inside a walled square arena with a round pillar in the
middle. It starts on the left side, the goal is on the right side, so the way around the pillar
(over or under it) is a free choice: the scripted expert picks one at random per episode, which
makes the demonstrations multimodal.

Success means being within ``GOAL_RADIUS`` of a goal *and* slower than ``SUCCESS_SPEED``: stopping
precisely is what imitation of noisy demonstrations does poorly and RL fine-tuning fixes.

Observation (float32): agent position (2), agent velocity (2), goal position (2) per goal
(``point_reach``: 1 goal, D = 6; ``point_reach_two_goals``: 2 goals, D = 8).
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from envs.registry import TaskSpec, register

# Geometry (metres).
ARENA_HALF_SIZE = 1.0
WALL_HALF_THICKNESS = 0.05
PILLAR_RADIUS = 0.25
AGENT_RADIUS = 0.05
BODY_HEIGHT = 0.05  # z of the agent's centre and half-height of walls and pillar
# Start region (agent) and goal region (right of the pillar), as (x range, y range).
START_X, START_Y = (-0.75, -0.6), (-0.15, 0.15)
GOAL_X, GOAL_Y = (0.55, 0.75), (-0.15, 0.15)
# Two-goal variant: goal 0 above the x axis, goal 1 below it, |y| in this range.
TWO_GOALS_ABS_Y = (0.3, 0.6)

# Dynamics.
SIM_TIMESTEP = 0.01
FRAME_SKIP = 5  # control at 1 / (0.01 * 5) = 20 Hz
CONTROL_FREQ = 1.0 / (SIM_TIMESTEP * FRAME_SKIP)
AGENT_MASS = 1.0
JOINT_DAMPING = 4.0  # N s / m: top speed = MOTOR_GEAR / JOINT_DAMPING = 1 m/s
MOTOR_GEAR = 4.0  # N at |action| = 1
MAX_EPISODE_STEPS = 80  # 4 s

# Success and reward.
GOAL_RADIUS = 0.05
SUCCESS_SPEED = 0.1
DISTANCE_REWARD_WEIGHT = 1.0  # dense reward per step: -weight * distance to the nearest goal
SUCCESS_BONUS = 10.0

# Observation layout.
POS, VEL = slice(0, 2), slice(2, 4)
GOALS_START = 4
MAX_SPEED_BOUND = np.inf  # velocities are bounded by the damping, but report an open Box

DEFAULT_RENDER_SIZE = 128


def goal_slice(index: int) -> slice:
    """Where goal ``index``'s (x, y) lies in the observation vector."""
    return slice(GOALS_START + 2 * index, GOALS_START + 2 * index + 2)


def _mjcf(n_goals: int, render_size: int) -> str:
    """The MJCF model: arena walls, pillar, agent on slide joints, one visual site per goal."""
    h, t, z = ARENA_HALF_SIZE, WALL_HALF_THICKNESS, BODY_HEIGHT
    outer = h + t
    walls = "\n".join(
        f'<geom name="wall_{name}" type="box" pos="{x} {y} {z}" size="{sx} {sy} {z}" '
        'rgba=".4 .4 .5 1"/>'
        for name, x, y, sx, sy in [
            ("n", 0, outer, outer + t, t),
            ("s", 0, -outer, outer + t, t),
            ("e", outer, 0, t, outer + t),
            ("w", -outer, 0, t, outer + t),
        ]
    )
    goal_colours = ["0.2 0.8 0.2 0.6", "0.9 0.6 0.1 0.6"]
    goals = "\n".join(
        f'<site name="goal{i}" type="cylinder" pos="0 0 0.001" size="{GOAL_RADIUS} 0.001" '
        f'rgba="{goal_colours[i % len(goal_colours)]}"/>'
        for i in range(n_goals)
    )
    return f"""
<mujoco model="point_reach">
  <option timestep="{SIM_TIMESTEP}" integrator="implicitfast" gravity="0 0 0"/>
  <visual><global offwidth="{render_size}" offheight="{render_size}"/></visual>
  <worldbody>
    <light pos="0 0 3" dir="0 0 -1" directional="true" castshadow="false"/>
    <camera name="top" pos="0 0 3.0" xyaxes="1 0 0 0 1 0" fovy="45"/>
    <geom name="floor" type="plane" size="{outer + t} {outer + t} 0.1" rgba=".92 .92 .92 1"
          contype="0" conaffinity="0"/>
    {walls}
    <geom name="pillar" type="cylinder" pos="0 0 {z}" size="{PILLAR_RADIUS} {z}" rgba=".5 .3 .3 1"/>
    {goals}
    <body name="agent" pos="0 0 {z}">
      <joint name="slide_x" type="slide" axis="1 0 0" damping="{JOINT_DAMPING}"/>
      <joint name="slide_y" type="slide" axis="0 1 0" damping="{JOINT_DAMPING}"/>
      <geom name="agent" type="sphere" size="{AGENT_RADIUS}" mass="{AGENT_MASS}" rgba=".1 .3 .9 1"/>
    </body>
  </worldbody>
  <actuator>
    <motor joint="slide_x" gear="{MOTOR_GEAR}" ctrlrange="-1 1" ctrllimited="true"/>
    <motor joint="slide_y" gear="{MOTOR_GEAR}" ctrlrange="-1 1" ctrllimited="true"/>
  </actuator>
</mujoco>
"""


class PointReachEnv(gym.Env):
    """Point mass around a pillar to a goal; see the module docstring.

    Args:
        n_goals: 1 (``point_reach``) or 2 (``point_reach_two_goals``: success at either goal,
            ``info["goal_reached"]`` in {-1, 0, 1}).
        reward_type: "dense" (-distance to the nearest goal per step + ``SUCCESS_BONUS`` on success)
            or "sparse" (1 on success, else 0).
        render_mode: None or "rgb_array" (offscreen ``mujoco.Renderer``; needs MUJOCO_GL=egl/osmesa
            on a machine without a display).
        render_size: side of the square rendered image in pixels.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": int(CONTROL_FREQ)}

    def __init__(
        self,
        n_goals: int = 1,
        reward_type: str = "dense",
        render_mode: str | None = None,
        render_size: int = DEFAULT_RENDER_SIZE,
    ):
        if n_goals not in (1, 2):
            raise ValueError(f"n_goals must be 1 or 2, got {n_goals}")
        if reward_type not in ("dense", "sparse"):
            raise ValueError(f"reward_type must be 'dense' or 'sparse', got {reward_type!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.n_goals = n_goals
        self.reward_type = reward_type
        self.render_mode = render_mode
        self.render_size = render_size
        self.model = mujoco.MjModel.from_xml_string(_mjcf(n_goals, render_size))
        self.data = mujoco.MjData(self.model)
        self._goal_site_ids = [
            mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_SITE, f"goal{i}")
            for i in range(n_goals)
        ]
        self.goals = np.zeros((n_goals, 2))
        self._goal_list = self.goals.tolist()
        self._obs_buf = np.zeros(GOALS_START + 2 * n_goals, dtype=np.float32)
        self._renderer: mujoco.Renderer | None = None

        pos_bound = np.full(2, ARENA_HALF_SIZE, dtype=np.float32)
        vel_bound = np.full(2, MAX_SPEED_BOUND, dtype=np.float32)
        high = np.concatenate([pos_bound, vel_bound] + [pos_bound] * n_goals)
        self.observation_space = spaces.Box(-high, high, dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)

    # ----------------------------------------------------------------------------------------
    def _sample_goals(self) -> np.ndarray:
        rng = self.np_random
        if self.n_goals == 1:
            return np.array([[rng.uniform(*GOAL_X), rng.uniform(*GOAL_Y)]])
        abs_y = rng.uniform(*TWO_GOALS_ABS_Y, size=2)
        xs = rng.uniform(*GOAL_X, size=2)
        return np.array([[xs[0], abs_y[0]], [xs[1], -abs_y[1]]])

    def _obs(self) -> np.ndarray:
        self._obs_buf[POS] = self.data.qpos
        self._obs_buf[VEL] = self.data.qvel
        return self._obs_buf.copy()

    def _goal_status(self) -> tuple[float, int]:
        """Distance to the nearest goal and the index of the goal reached (-1: none)."""
        x, y = self.data.qpos
        dists = [math.hypot(gx - x, gy - y) for gx, gy in self._goal_list]
        nearest = min(range(self.n_goals), key=dists.__getitem__)
        slow = math.hypot(*self.data.qvel) < SUCCESS_SPEED
        reached = nearest if slow and dists[nearest] < GOAL_RADIUS else -1
        return dists[nearest], reached

    def _info(self, distance: float, reached: int) -> dict[str, Any]:
        info: dict[str, Any] = {"is_success": reached >= 0, "distance": distance}
        if self.n_goals > 1:
            info["goal_reached"] = reached
        return info

    # ----------------------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        self.goals = self._sample_goals()
        self._goal_list = self.goals.tolist()
        self._obs_buf[GOALS_START:] = self.goals.ravel()
        for site_id, goal in zip(self._goal_site_ids, self.goals, strict=True):
            self.model.site_pos[site_id, :2] = goal
        self.data.qpos[:] = [self.np_random.uniform(*START_X), self.np_random.uniform(*START_Y)]
        mujoco.mj_forward(self.model, self.data)
        distance, reached = self._goal_status()
        return self._obs(), self._info(distance, reached)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.data.ctrl[:] = action  # the actuators' ctrlrange clamps it to [-1, 1]
        mujoco.mj_step(self.model, self.data, nstep=FRAME_SKIP)
        distance, reached = self._goal_status()
        success = reached >= 0
        if self.reward_type == "sparse":
            reward = float(success)
        else:
            reward = -DISTANCE_REWARD_WEIGHT * distance + SUCCESS_BONUS * success
        return self._obs(), reward, success, False, self._info(distance, reached)

    def render(self) -> np.ndarray | None:
        """Top-down RGB frame (H, W, 3) uint8 when ``render_mode == "rgb_array"``."""
        if self.render_mode is None:
            return None
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, self.render_size, self.render_size)
        mujoco.mj_forward(self.model, self.data)
        self._renderer.update_scene(self.data, camera="top")
        return self._renderer.render()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


# --------------------------------------------------------------------------------------------
# Scripted expert
# --------------------------------------------------------------------------------------------
WAYPOINT_CLEARANCE = 0.15  # how far beyond pillar + agent radius the detour passes
WAYPOINT_SWITCH_X = -0.05  # head for the goal once the agent is this far right
EXPERT_KP = 6.0  # action per metre of position error
EXPERT_KD = 1.5  # action per m/s of velocity
DEFAULT_EXPERT_NOISE = 0.6  # with the AR(1) correlation below: ~78% expert success
DEFAULT_NOISE_CORRELATION = 0.5


class PointReachExpert:
    """Waypoint + PD controller around the pillar, with Gaussian action noise.

    Per episode it picks a side of the pillar at random (``point_reach``) or one of the two goals
    at random and the side that goal lies on (``point_reach_two_goals``). The action noise is
    ``noise * n_t`` with AR(1) noise ``n_t = rho n_{t-1} + sqrt(1 - rho^2) eps_t`` (``rho =
    noise_correlation``; 0 gives white noise), added before clipping to [-1, 1].
    """

    def __init__(
        self,
        noise: float = DEFAULT_EXPERT_NOISE,
        noise_correlation: float = DEFAULT_NOISE_CORRELATION,
    ):
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        if not 0.0 <= noise_correlation < 1.0:
            raise ValueError(f"noise_correlation must be in [0, 1), got {noise_correlation}")
        self.noise = noise
        self.noise_correlation = noise_correlation
        self.goal_index = 0
        self.side = 1.0
        self._rng = np.random.default_rng()
        self._noise_state = np.zeros(2)

    def reset(self, env: gym.Env, obs: np.ndarray, rng: np.random.Generator) -> None:
        self._rng = rng
        n_goals = (obs.shape[-1] - GOALS_START) // 2
        self.goal_index = int(rng.integers(n_goals))
        goal_y = obs[goal_slice(self.goal_index)][1]
        self.side = float(np.sign(goal_y)) if n_goals > 1 else float(rng.choice([-1.0, 1.0]))
        self._noise_state = rng.standard_normal(2)

    def act(self, env: gym.Env, obs: np.ndarray) -> np.ndarray:
        pos, vel = obs[POS], obs[VEL]
        goal = obs[goal_slice(self.goal_index)]
        if pos[0] < WAYPOINT_SWITCH_X:
            detour_y = self.side * (PILLAR_RADIUS + AGENT_RADIUS + WAYPOINT_CLEARANCE)
            target = np.array([0.0, detour_y])
        else:
            target = goal
        action = EXPERT_KP * (target - pos) - EXPERT_KD * vel
        if self.noise > 0:
            rho = self.noise_correlation
            eps = self._rng.standard_normal(2)
            self._noise_state = rho * self._noise_state + np.sqrt(1.0 - rho**2) * eps
            action = action + self.noise * self._noise_state
        return np.clip(action, -1.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------
def make_point_reach(n_goals: int = 1, **kwargs: Any) -> gym.Env:
    """One env with its TimeLimit of ``MAX_EPISODE_STEPS`` control steps."""
    return gym.wrappers.TimeLimit(PointReachEnv(n_goals=n_goals, **kwargs), MAX_EPISODE_STEPS)


def make_point_reach_two_goals(**kwargs: Any) -> gym.Env:
    return make_point_reach(n_goals=2, **kwargs)


register(
    TaskSpec(
        name="point_reach",
        family="point",
        make=make_point_reach,
        max_episode_steps=MAX_EPISODE_STEPS,
        control_freq=CONTROL_FREQ,
        make_expert=PointReachExpert,
        default_expert_noise=DEFAULT_EXPERT_NOISE,
        description=(
            "Planar point mass (MuJoCo) goes around a pillar (either side) to a random goal and "
            f"must stop on it (within {GOAL_RADIUS} m, speed < {SUCCESS_SPEED} m/s). "
            "Obs: pos, vel, goal (6). Action: 2 motor forces in [-1, 1]."
        ),
    )
)
register(
    TaskSpec(
        name="point_reach_two_goals",
        family="point",
        make=make_point_reach_two_goals,
        max_episode_steps=MAX_EPISODE_STEPS,
        control_freq=CONTROL_FREQ,
        make_expert=PointReachExpert,
        default_expert_noise=DEFAULT_EXPERT_NOISE,
        description=(
            "point_reach with two goals (one above, one below the pillar's axis); success is "
            "stopping at either, info['goal_reached'] in {-1, 0, 1}. Obs: pos, vel, goal0, goal1 "
            "(8). The expert picks one goal at random per episode."
        ),
    )
)
