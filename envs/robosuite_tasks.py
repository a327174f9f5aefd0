"""robosuite manipulation tasks (Lift, PickPlaceCan, NutAssemblySquare) as gymnasium envs + experts.

Every task is a Panda arm driven by robosuite's default OSC_POSE composite controller at 20 Hz.

Action (Da = 7, Box in [-1, 1]): ``[dx, dy, dz, drx, dry, drz, gripper]``. The first six are delta
position / axis-angle commands in the robot base frame, scaled by the controller to at most
``OSC_POS_SCALE`` m and ``OSC_ROT_SCALE`` rad per step; gripper -1 opens, +1 closes.

Observation (flat float32 Box, robomimic low-dim order): the object block, then
``robot0_eef_pos`` (3), ``robot0_eef_quat`` (4, xyzw, hand body as in robomimic datasets) and
``robot0_gripper_qpos`` (2). :func:`observation_layout` gives the (name, size) list per task:

- ``lift`` (19): ``cube_pos`` (3), ``cube_quat`` (4, xyzw), ``gripper_to_cube_pos`` (3, cube - eef,
  world frame).
- ``can`` (23): ``Can_pos`` (3), ``Can_quat`` (4, xyzw), ``Can_to_robot0_eef_pos`` (3),
  ``Can_to_robot0_eef_quat`` (4, xyzw) -- the last two are the object's pose in the frame of
  (``robot0_eef_pos``, ``robot0_eef_quat``), as robosuite defines them.
- ``square`` (23): the same four blocks for ``SquareNut``.

The object block is computed here from the simulator state, not read from robosuite's
observables: robosuite 1.5 evaluates ``*_to_robot0_eef_*`` before the object pose it depends on,
so those entries are zeros right after ``reset`` and one control step stale afterwards.

Rewards: sparse by default (``reward_shaping=False``): 1.0 on the success step, 0 otherwise, the
setting DPPO and DiWA fine-tune with. ``reward_shaping=True`` gives robosuite's staged dense reward.
Episodes end with ``terminated=True`` on success (``info["is_success"]`` comes from the env's own
``_check_success()``) and ``truncated=True`` at ``max_episode_steps`` (only when not successful).

Seeding: the robosuite model is built once, with ``model_seed`` (the Lift cube size is drawn at
build time), and not rebuilt per episode (``hard_reset=False``: resets cost ~5 ms instead of
~200 ms). ``reset(seed=s)`` re-seeds, in place, the generator that robosuite's placement samplers
and robot initialisation noise share, so the episode is a function of ``s`` alone.

Experts (:class:`LiftExpert`, :class:`CanExpert`, :class:`SquareExpert`) are waypoint phase
machines that read privileged simulator state and add Gaussian noise (std ``noise``) to every
action dimension; they re-grasp when the object slips. Measured over 50 seeds: noise 0 succeeds
50/50 on every task (mean length lift 37, can 112, square 126 steps); at the default noise
(lift 0.2, can 0.15, square 0.1) lift 50/50 (mean 94 steps), can 49/50 (144), square 48/50 (155).

Rendering: ``render_mode="rgb_array"`` creates robosuite's offscreen context (only then) and
renders ``camera_name``. Importing robosuite sets ``MUJOCO_GL=egl`` unless it is ``osmesa``/``glx``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.wrappers import TimeLimit

from envs.registry import TaskSpec, register

ROBOT = "Panda"
CONTROL_FREQ = 20
ACTION_DIM = 7
OSC_POS_SCALE = 0.05  # m per step at |action| = 1 (robosuite default OSC_POSE output_max)
OSC_ROT_SCALE = 0.5  # rad per step at |action| = 1
GRIPPER_OPEN = -1.0
GRIPPER_CLOSE = 1.0
DEFAULT_CAMERA = "agentview"
DEFAULT_RENDER_SIZE = 256
DEFAULT_MODEL_SEED = 0
ROBOT_OBS_LAYOUT = (("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2))

# robosuite logs INFO lines per env build and warnings on import about optional extras
# (private macros file, robosuite_models, mink IK) that this project does not use.
_QUIET_PREFIXES = (
    "No private macro file",
    "It is recommended to use a private macro",
    "To setup, run",
)
_QUIET_SUBSTRINGS = ("robosuite_models", "mink-based whole-body IK")


def _robosuite_log_filter(record: logging.LogRecord) -> bool:
    if record.levelno < logging.WARNING:
        return False
    msg = record.getMessage()
    return not (msg.startswith(_QUIET_PREFIXES) or any(s in msg for s in _QUIET_SUBSTRINGS))


@functools.cache
def _robosuite():
    """Import robosuite lazily (importing it takes ~1 s), with its chatter filtered out."""
    logging.getLogger("robosuite_logs").addFilter(_robosuite_log_filter)
    import robosuite

    return robosuite


@dataclass(frozen=True)
class _TaskInfo:
    name: str
    env_name: str
    object_name: str  # prefix of the object block in the observation
    max_episode_steps: int
    default_expert_noise: float
    description: str


_TASK_INFO = {
    "lift": _TaskInfo(
        "lift", "Lift", "cube", 300, 0.2, "robosuite Lift: lift the red cube (Panda, OSC_POSE)."
    ),
    "can": _TaskInfo(
        "can",
        "PickPlaceCan",
        "Can",
        300,
        0.15,
        "robosuite PickPlaceCan: move the can into its bin (Panda, OSC_POSE).",
    ),
    "square": _TaskInfo(
        "square",
        "NutAssemblySquare",
        "SquareNut",
        400,
        0.1,
        "robosuite NutAssemblySquare: put the square nut on its peg (Panda, OSC_POSE).",
    ),
}


def observation_layout(task: str) -> list[tuple[str, int]]:
    """(name, size) of each block of the flat observation of ``task``, in order."""
    obj = _TASK_INFO[task].object_name
    if task == "lift":
        obj_blocks = [(f"{obj}_pos", 3), (f"{obj}_quat", 4), (f"gripper_to_{obj}_pos", 3)]
    else:
        obj_blocks = [
            (f"{obj}_pos", 3),
            (f"{obj}_quat", 4),
            (f"{obj}_to_robot0_eef_pos", 3),
            (f"{obj}_to_robot0_eef_quat", 4),
        ]
    return obj_blocks + list(ROBOT_OBS_LAYOUT)


# ----------------------------------------------------------------------------------------------
# rotation helpers (quaternions xyzw, matrices 3x3)


def _quat_xyzw_from_matrix(rot: np.ndarray) -> np.ndarray:
    return np.asarray(_robosuite().utils.transform_utils.mat2quat(rot), dtype=np.float64)


def _matrix_from_quat_xyzw(quat: np.ndarray) -> np.ndarray:
    return np.asarray(_robosuite().utils.transform_utils.quat2mat(quat), dtype=np.float64)


def _rotvec_from_matrix(rot: np.ndarray) -> np.ndarray:
    """Axis-angle vector (3,) of a rotation matrix (angle in [0, pi])."""
    cos = np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    skew = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    if angle < 1e-6:
        return skew / 2.0
    if np.pi - angle < 1e-4:  # axis from the symmetric part
        axis = np.sqrt(np.clip((np.diag(rot) + 1.0) / 2.0, 0.0, None))
        axis *= np.where(skew >= 0, 1.0, -1.0)
        return axis / np.linalg.norm(axis) * angle
    return skew / (2.0 * np.sin(angle)) * angle


def _rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _yaw_of(rot: np.ndarray) -> float:
    """Heading of a body's x axis about world z."""
    return float(np.arctan2(rot[1, 0], rot[0, 0]))


def _wrap(angle: float, period: float) -> float:
    """``angle`` modulo ``period``, in [-period/2, period/2)."""
    return float((angle + period / 2.0) % period - period / 2.0)


# ----------------------------------------------------------------------------------------------
# the env


class RobosuiteEnv(gym.Env):
    """One robosuite task behind the gymnasium API (see the module docstring for the contract).

    The privileged accessors (``eef_pos``, ``eef_rotation``, ``robosuite_env``) are for scripted
    experts and tests; policies see only the observation.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_FREQ}

    def __init__(
        self,
        task: str,
        *,
        render_mode: str | None = None,
        reward_shaping: bool = False,
        max_episode_steps: int | None = None,
        camera_name: str = DEFAULT_CAMERA,
        render_size: int = DEFAULT_RENDER_SIZE,
        model_seed: int = DEFAULT_MODEL_SEED,
    ) -> None:
        if task not in _TASK_INFO:
            raise KeyError(f"unknown robosuite task {task!r}; known: {sorted(_TASK_INFO)}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        info = _TASK_INFO[task]
        self.task = task
        self.render_mode = render_mode
        self.camera_name = camera_name
        self.render_size = render_size
        self.max_episode_steps = max_episode_steps or info.max_episode_steps
        rs = _robosuite()
        self._rs = rs.make(
            info.env_name,
            robots=ROBOT,
            controller_configs=rs.load_composite_controller_config(robot=ROBOT),
            has_renderer=False,
            has_offscreen_renderer=render_mode == "rgb_array",
            use_camera_obs=False,
            use_object_obs=True,
            reward_shaping=reward_shaping,
            reward_scale=1.0,
            control_freq=CONTROL_FREQ,
            horizon=self.max_episode_steps,
            ignore_done=False,
            hard_reset=False,
            seed=model_seed,
        )
        self._robot = self._rs.robots[0]
        self._eef_site = self._robot.eef_site_id[self._robot.arms[0]]
        self._object_body = self._rs.sim.model.body_name2id(f"{info.object_name}_main")
        self._layout = observation_layout(task)
        obs_dim = sum(size for _, size in self._layout)
        self.observation_space = spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        if self._rs.action_dim != ACTION_DIM:
            raise RuntimeError(
                f"expected a {ACTION_DIM}-D OSC_POSE action, got {self._rs.action_dim}"
            )
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)

    # -- gymnasium API ---------------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        episode_seed = int(self.np_random.integers(2**63))
        # robosuite's samplers and robot init noise all hold this one Generator: re-seed in place
        self._rs.rng.bit_generator.state = np.random.default_rng(episode_seed).bit_generator.state
        obs = self._rs.reset()
        return self._flat_obs(obs), {"is_success": False}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        obs, reward, done, _ = self._rs.step(action)
        success = bool(self._rs._check_success())
        truncated = bool(done) and not success
        return self._flat_obs(obs), float(reward), success, truncated, {"is_success": success}

    def render(self) -> np.ndarray | None:
        """(H, W, 3) uint8 frame from ``camera_name`` when ``render_mode == "rgb_array"``."""
        if self.render_mode != "rgb_array":
            return None
        size = self.render_size
        frame = self._rs.sim.render(width=size, height=size, camera_name=self.camera_name)
        return np.ascontiguousarray(frame[::-1])  # OpenGL rows are bottom-up

    def close(self) -> None:
        self._rs.close()

    # -- privileged state (experts, tests) -------------------------------------------------------

    @property
    def robosuite_env(self):
        """The wrapped robosuite environment."""
        return self._rs

    def eef_pos(self) -> np.ndarray:
        """(3,) world position of the gripper site (between the fingertips)."""
        return self._rs.sim.data.site_xpos[self._eef_site].copy()

    def eef_rotation(self) -> np.ndarray:
        """(3, 3) world rotation of the gripper site: z points out of the fingers, x is the
        closing direction."""
        return self._rs.sim.data.site_xmat[self._eef_site].reshape(3, 3).copy()

    def base_rotation(self) -> np.ndarray:
        """(3, 3) world rotation of the robot base (the frame of the OSC deltas)."""
        return self._rs.sim.data.get_body_xmat(self._robot.robot_model.root_body).copy()

    # -- internals -------------------------------------------------------------------------------

    def _object_block(self, obs: dict[str, np.ndarray]) -> list[np.ndarray]:
        data = self._rs.sim.data
        obj_pos = data.body_xpos[self._object_body].copy()
        obj_rot = data.body_xmat[self._object_body].reshape(3, 3)
        obj_quat = _quat_xyzw_from_matrix(obj_rot)
        eef_pos = obs["robot0_eef_pos"]
        if self.task == "lift":
            return [obj_pos, obj_quat, obj_pos - eef_pos]
        eef_rot = _matrix_from_quat_xyzw(obs["robot0_eef_quat"])
        rel_pos = eef_rot.T @ (obj_pos - eef_pos)
        rel_quat = _quat_xyzw_from_matrix(eef_rot.T @ obj_rot)
        return [obj_pos, obj_quat, rel_pos, rel_quat]

    def _flat_obs(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        parts = self._object_block(obs) + [obs[name] for name, _ in ROBOT_OBS_LAYOUT]
        return np.concatenate(parts).astype(np.float32)


REWARD_TYPES = ("sparse", "dense")


def make_robosuite_env(
    task: str, max_episode_steps: int | None = None, reward_type: str = "sparse", **kwargs: Any
) -> gym.Env:
    """A :class:`RobosuiteEnv` inside gymnasium's TimeLimit (both cut at ``max_episode_steps``).

    ``reward_type``: "sparse" (1 on success) or "dense" (robosuite's staged reward shaping).
    """
    if reward_type not in REWARD_TYPES:
        raise ValueError(f"reward_type must be one of {REWARD_TYPES}, got {reward_type!r}")
    env = RobosuiteEnv(
        task, max_episode_steps=max_episode_steps, reward_shaping=reward_type == "dense", **kwargs
    )
    return TimeLimit(env, max_episode_steps=env.max_episode_steps)


# ----------------------------------------------------------------------------------------------
# scripted experts

# Orientation of the gripper site pointing straight down with yaw 0 (closing axis = world y).
_GRIPPER_DOWN = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
POS_GAIN = 4.0  # action per (position error / OSC_POS_SCALE)
ROT_GAIN = 2.0  # action per (rotation error / OSC_ROT_SCALE)
YAW_TOL = 0.05  # rad
UNLIMITED = 10**6
LOST_STEPS = 3  # consecutive steps without a grasp that count as a dropped object
CENTRE_TOL = 0.004  # m, horizontal misalignment under which a descent may go on
GRASP_STEPS = 8  # control steps for the Panda gripper to close / open
GRASP_MAX_STEPS = 20  # give up waiting for finger contact (the holding check then restarts)
APPROACH_HEIGHT = 0.08  # m above the grasp point before descending


@dataclass(frozen=True)
class Waypoint:
    """Where one phase of a scripted motion drives the gripper, and when the phase is over.

    The phase ends once ``min_steps`` have passed and the gripper site is within ``pos_tol`` (m)
    of ``goal`` (default: ``pos``) and ``YAW_TOL`` of ``yaw``, or after ``max_steps``.
    """

    pos: np.ndarray  # (3,) world target of the gripper site for this step
    yaw: float  # heading of the closing axis, 0 = world y
    grip: float
    pos_tol: float = 0.01
    min_steps: int = 0
    max_steps: int = UNLIMITED
    goal: np.ndarray | None = None  # (3,) where the phase ends, when ``pos`` is a via point
    speed: float = 1.0  # cap on the position part of the action
    until_grasped: bool = False  # also wait for both finger pads to touch the object


class WaypointExpert:
    """Phase machine over :class:`Waypoint` targets plus Gaussian action noise (std ``noise``).

    Subclasses list ``phases`` and implement ``waypoint(env, phase)`` and ``target(env)`` (the
    object to grasp); targets are recomputed from privileged simulator state every step, so they
    follow objects that move. If the object is dropped during a ``holding_phases`` phase, the
    expert starts over from the first phase (noisy demonstrations then contain re-grasps).
    """

    phases: tuple[str, ...] = ()
    holding_phases: tuple[str, ...] = ()

    def __init__(self, noise: float = 0.0) -> None:
        self.noise = float(noise)
        self._rng = np.random.default_rng()
        self._phase = 0
        self._steps = 0
        self.anchor = np.zeros(3)
        self.anchor_yaw = 0.0
        self._lost = 0

    @property
    def phase(self) -> str:
        return self.phases[self._phase]

    def reset(self, env: gym.Env, obs: np.ndarray, rng: np.random.Generator) -> None:
        self._rng = rng
        self._phase = 0
        self._lost = 0
        self._start_phase(env.unwrapped)

    def act(self, env: gym.Env, obs: np.ndarray) -> np.ndarray:
        """(Da,) float32 action in [-1, 1]."""
        rs_env: RobosuiteEnv = env.unwrapped
        if self.phase in self.holding_phases and not self.holding(rs_env):
            self._lost += 1
            if self._lost >= LOST_STEPS:
                self._phase = 0
                self._start_phase(rs_env)
        else:
            self._lost = 0
        wp = self.waypoint(rs_env, self.phase)
        while self._phase < len(self.phases) - 1 and self._reached(rs_env, wp):
            self._phase += 1
            self._start_phase(rs_env)
            wp = self.waypoint(rs_env, self.phase)
        self._steps += 1
        action = servo_action(rs_env, wp)
        if self.noise > 0:
            action = action + self.noise * self._rng.standard_normal(ACTION_DIM)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def _start_phase(self, env: RobosuiteEnv) -> None:
        self._steps = 0
        self.anchor = env.eef_pos()  # gripper position when the phase began
        self.anchor_yaw = _gripper_yaw(env)
        self.on_phase_start(env, self.phase)

    def on_phase_start(self, env: RobosuiteEnv, phase: str) -> None:
        """Hook for decisions taken once per phase (a subclass may latch a choice here)."""

    def waypoint(self, env: RobosuiteEnv, phase: str) -> Waypoint:
        raise NotImplementedError

    def target(self, env: RobosuiteEnv):
        """The robosuite object (MujocoObject) this expert grasps."""
        raise NotImplementedError

    def holding(self, env: RobosuiteEnv) -> bool:
        """Both finger pads touch the target object."""
        rs = env.robosuite_env
        return bool(rs._check_grasp(gripper=rs.robots[0].gripper, object_geoms=self.target(env)))

    def _reached(self, env: RobosuiteEnv, wp: Waypoint) -> bool:
        if self._steps >= wp.max_steps:
            return True
        if self._steps < wp.min_steps or (wp.until_grasped and not self.holding(env)):
            return False
        goal = wp.pos if wp.goal is None else wp.goal
        pos_err = np.linalg.norm(goal - env.eef_pos())
        yaw_err = abs(_wrap(wp.yaw - _gripper_yaw(env), 2 * np.pi))
        return pos_err <= wp.pos_tol and yaw_err <= YAW_TOL


def _gripper_yaw(env: RobosuiteEnv) -> float:
    """Heading of the gripper's closing axis relative to world y (0 at the home pose)."""
    closing = env.eef_rotation()[:, 0]
    return float(np.arctan2(-closing[0], closing[1]))


def servo_action(env: RobosuiteEnv, wp: Waypoint) -> np.ndarray:
    """(Da,) proportional OSC_POSE action driving the gripper site towards ``wp``."""
    base_rot = env.base_rotation()
    pos_err = base_rot.T @ (wp.pos - env.eef_pos())
    rot_err = base_rot.T @ _rotvec_from_matrix(
        _rot_z(wp.yaw) @ _GRIPPER_DOWN @ env.eef_rotation().T
    )
    action = np.zeros(ACTION_DIM)
    action[:3] = _clip_norm(POS_GAIN * pos_err / OSC_POS_SCALE, wp.speed)
    action[3:6] = _clip_norm(ROT_GAIN * rot_err / OSC_ROT_SCALE, 1.0)
    action[6] = wp.grip
    return action


def _clip_norm(v: np.ndarray, limit: float) -> np.ndarray:
    """Scale ``v`` down so that its largest component is at most ``limit`` (keeps the direction)."""
    peak = np.max(np.abs(v))
    return v * (limit / peak) if peak > limit else v


def _centred_descent(target: np.ndarray, eef_z: float, xy_err: float) -> np.ndarray:
    """(3,) gripper target that goes down to ``target`` only while the thing being lowered is
    centred (``xy_err`` <= CENTRE_TOL); otherwise it holds the height and corrects sideways."""
    if xy_err <= CENTRE_TOL:
        return target
    return np.array([target[0], target[1], max(eef_z, target[2])])


def _descend(eef: np.ndarray, grasp: np.ndarray, yaw: float, pos_tol: float) -> Waypoint:
    """Lower the open gripper onto ``grasp`` (3,) while centred above it, so that a finger does
    not land on the object's rim."""
    pos = _centred_descent(grasp, eef[2], float(np.linalg.norm(grasp[:2] - eef[:2])))
    return Waypoint(pos, yaw, GRIPPER_OPEN, pos_tol=pos_tol, goal=grasp)


def _close(pos: np.ndarray, yaw: float) -> Waypoint:
    """Hold still at ``pos`` while the gripper closes on the object."""
    return Waypoint(
        pos,
        yaw,
        GRIPPER_CLOSE,
        pos_tol=np.inf,
        min_steps=GRASP_STEPS,
        max_steps=GRASP_MAX_STEPS,
        until_grasped=True,
    )


def _open(pos: np.ndarray, yaw: float) -> Waypoint:
    """Hold still at ``pos`` while the gripper opens."""
    return Waypoint(pos, yaw, GRIPPER_OPEN, pos_tol=np.inf, min_steps=GRASP_STEPS)


def _body_pose(env: RobosuiteEnv, body_id: int) -> tuple[np.ndarray, np.ndarray]:
    data = env.robosuite_env.sim.data
    return data.body_xpos[body_id].copy(), data.body_xmat[body_id].reshape(3, 3).copy()


class LiftExpert(WaypointExpert):
    """Above the cube (yaw aligned to a face) -> descend -> close -> lift.

    ``aim_error`` (m, xy) and ``yaw_error`` (rad) shift the grasp off the cube (play data's
    missed grasps); both 0 by default.
    """

    phases = ("above", "descend", "grasp", "lift")
    holding_phases = ("lift",)
    GRASP_DEPTH = 0.005  # m below the cube centre
    LIFT_HEIGHT = 0.15  # m above the table

    def __init__(self, noise: float = 0.0) -> None:
        super().__init__(noise)
        self.aim_error = np.zeros(2)
        self.yaw_error = 0.0

    def target(self, env: RobosuiteEnv):
        return env.robosuite_env.cube

    def waypoint(self, env: RobosuiteEnv, phase: str) -> Waypoint:
        rs = env.robosuite_env
        cube_pos, cube_rot = _body_pose(env, rs.cube_body_id)
        yaw = _wrap(_yaw_of(cube_rot), np.pi / 2) + self.yaw_error
        grasp = cube_pos + [*self.aim_error, -self.GRASP_DEPTH]
        if phase == "above":
            return Waypoint(grasp + [0.0, 0.0, APPROACH_HEIGHT], yaw, GRIPPER_OPEN, pos_tol=0.02)
        if phase == "descend":
            return _descend(env.eef_pos(), grasp, yaw, pos_tol=0.008)
        if phase == "grasp":
            return _close(self.anchor, yaw)
        table_z = rs.model.mujoco_arena.table_offset[2]
        lift = np.array([*self.anchor[:2], table_z + self.LIFT_HEIGHT])
        return Waypoint(lift, self.anchor_yaw, GRIPPER_CLOSE)


class CanExpert(WaypointExpert):
    """Above the can (fingers turned clear of the bin walls) -> descend -> close -> lift over
    the bin walls -> over the target bin -> lower -> open -> retreat upwards (success needs the
    gripper away from the can)."""

    phases = ("above", "descend", "grasp", "lift", "carry", "lower", "release", "retreat")
    holding_phases = ("lift", "carry", "lower")
    GRASP_HEIGHT = 0.02  # m above the can centre: keeps the hand above the bin walls (top 0.9)
    CARRY_Z = 1.02  # m, gripper height for carrying over the bin walls
    PLACE_Z = 0.91  # m, can centre height when released (bin floor at 0.82)
    # The target quadrant's centre is at the edge of the Panda's reach at carrying height:
    # aim 4 cm / 6 cm closer to the robot, still 5 cm inside the quadrant (success region).
    PLACE_SHIFT = np.array([-0.04, -0.06])
    RETREAT = 0.1  # m
    FINGER_REACH = 0.05  # m, open finger's outer face from the gripper axis
    WALL_CLEARANCE = 0.015  # m, wanted between an open finger and a bin wall
    WALL_INSET = 0.01  # m, wall half-thickness (inner faces are this much inside the bin size)
    YAW_CANDIDATES = np.linspace(-np.pi / 2, np.pi / 2, 12, endpoint=False)

    def __init__(self, noise: float = 0.0) -> None:
        super().__init__(noise)
        self._yaw = 0.0

    def target(self, env: RobosuiteEnv):
        rs = env.robosuite_env
        return rs.objects[rs.object_to_id["can"]]

    def on_phase_start(self, env: RobosuiteEnv, phase: str) -> None:
        """At "above", choose the gripper heading once: the one nearest home whose open fingers
        keep ``WALL_CLEARANCE`` from the source bin's walls, else the one with most clearance."""
        if phase != "above":
            return
        rs = env.robosuite_env
        can_xy = _body_pose(env, rs.obj_body_id["Can"])[0][:2]
        half = np.asarray(rs.bin_size[:2]) / 2 - self.WALL_INSET
        lo, hi = rs.bin1_pos[:2] - half, rs.bin1_pos[:2] + half

        def clearance(yaw: float) -> float:
            closing = np.array([-np.sin(yaw), np.cos(yaw)])
            tips = can_xy + np.outer([-1.0, 1.0], closing) * self.FINGER_REACH
            return float(np.min(np.concatenate([tips - lo, hi - tips])))

        clear = [y for y in self.YAW_CANDIDATES if clearance(y) >= self.WALL_CLEARANCE]
        self._yaw = min(clear, key=abs) if clear else max(self.YAW_CANDIDATES, key=clearance)

    def waypoint(self, env: RobosuiteEnv, phase: str) -> Waypoint:
        rs = env.robosuite_env
        can_pos, _ = _body_pose(env, rs.obj_body_id["Can"])
        eef = env.eef_pos()
        yaw = self._yaw
        target = rs.target_bin_placements[rs.object_to_id["can"]][:2] + self.PLACE_SHIFT
        # gripper target that puts the (held) can at target_xy
        held_xy = eef[:2] + (target - can_pos[:2])
        grasp = can_pos + [0.0, 0.0, self.GRASP_HEIGHT]
        if phase == "above":
            return Waypoint(grasp + [0.0, 0.0, APPROACH_HEIGHT], yaw, GRIPPER_OPEN, 0.02)
        if phase == "descend":
            return _descend(eef, grasp, yaw, pos_tol=0.008)
        if phase == "grasp":
            return _close(self.anchor, yaw)
        if phase == "lift":
            return Waypoint(np.array([*self.anchor[:2], self.CARRY_Z]), yaw, GRIPPER_CLOSE, 0.03)
        if phase == "carry":
            return Waypoint(np.array([*held_xy, self.CARRY_Z]), yaw, GRIPPER_CLOSE, 0.02)
        if phase == "lower":
            z = eef[2] + self.PLACE_Z - can_pos[2]
            return Waypoint(np.array([*held_xy, z]), yaw, GRIPPER_CLOSE, 0.01, max_steps=40)
        if phase == "release":
            return _open(self.anchor, yaw)
        return Waypoint(self.anchor + [0.0, 0.0, self.RETREAT], yaw, GRIPPER_OPEN)


class SquareExpert(WaypointExpert):
    """Above the nut handle (closing across the handle) -> descend -> close -> lift over the
    peg -> turn the nut square to the peg and centre it over the peg -> lower -> open -> retreat."""

    phases = ("above", "descend", "grasp", "lift", "align", "lower", "release", "retreat")
    holding_phases = ("lift", "align", "lower")
    GRASP_DEPTH = 0.0  # m below the handle
    HANDLE_OUT = 0.01  # m from the handle site away from the ring
    CARRY_Z = 1.0  # m, gripper height while aligning (peg top at 0.95)
    PLACE_Z = 0.85  # m, nut centre height at release (table at 0.82, success below 0.87)
    ALIGN_TOL = 0.004  # m, nut centre to peg axis
    HANDLE_HEADINGS = (np.pi / 2, np.pi, -np.pi / 2)  # world headings of the nut's handle
    TURN_COST = 0.1  # tie-break between headings: per rad of wrist turn
    LOWER_SPEED = 0.5  # slow descent down the peg
    RETREAT = 0.1  # m

    def __init__(self, noise: float = 0.0) -> None:
        super().__init__(noise)
        self._handle_heading = np.pi

    def on_phase_start(self, env: RobosuiteEnv, phase: str) -> None:
        """At the start of "align", choose once the heading of the handle over the peg: of the
        peg-aligned headings that keep the gripper within reach (handle towards the robot or
        sideways), the one that leaves the gripper nearest its home heading."""
        if phase != "align":
            return
        rs = env.robosuite_env
        nut_yaw = _yaw_of(_body_pose(env, rs.obj_body_id[rs.nuts[0].name])[1])
        gyaw = _gripper_yaw(env)

        def cost(heading: float) -> float:
            turn = _wrap(heading - nut_yaw, 2 * np.pi)
            return abs(gyaw + turn) + self.TURN_COST * abs(turn)

        self._handle_heading = min(self.HANDLE_HEADINGS, key=cost)

    def target(self, env: RobosuiteEnv):
        return env.robosuite_env.nuts[0]

    def waypoint(self, env: RobosuiteEnv, phase: str) -> Waypoint:
        rs = env.robosuite_env
        nut = rs.nuts[0]
        nut_pos, nut_rot = _body_pose(env, rs.obj_body_id[nut.name])
        handle = rs.sim.data.site_xpos[rs.sim.model.site_name2id(nut.important_sites["handle"])]
        nut_yaw = _yaw_of(nut_rot)
        eef = env.eef_pos()
        if phase in ("above", "descend", "grasp"):
            yaw = _wrap(nut_yaw, np.pi)  # closing axis across the handle (nut y)
            # grip the outer part of the handle, clear of the ring
            grasp = handle + self.HANDLE_OUT * nut_rot[:, 0] - [0.0, 0.0, self.GRASP_DEPTH]
            if phase == "above":
                return Waypoint(grasp + [0.0, 0.0, APPROACH_HEIGHT], yaw, GRIPPER_OPEN, 0.02)
            if phase == "descend":
                return _descend(eef, grasp, yaw, pos_tol=0.006)
            return _close(self.anchor, self.anchor_yaw)
        # held: turn the nut (and the gripper with it) to the chosen peg-aligned heading
        yaw = _gripper_yaw(env) + _wrap(self._handle_heading - nut_yaw, 2 * np.pi)
        peg_xy = rs.sim.data.body_xpos[rs.peg1_body_id][:2]
        held_xy = eef[:2] + (peg_xy - nut_pos[:2])
        if phase == "lift":
            lift = np.array([*self.anchor[:2], self.CARRY_Z])
            return Waypoint(lift, self.anchor_yaw, GRIPPER_CLOSE, 0.03)
        if phase == "align":
            return Waypoint(np.array([*held_xy, self.CARRY_Z]), yaw, GRIPPER_CLOSE, self.ALIGN_TOL)
        if phase == "lower":
            goal = np.array([*held_xy, eef[2] + self.PLACE_Z - nut_pos[2]])
            pos = _centred_descent(goal, eef[2], float(np.linalg.norm(peg_xy - nut_pos[:2])))
            return Waypoint(
                pos, yaw, GRIPPER_CLOSE, 0.01, max_steps=60, goal=goal, speed=self.LOWER_SPEED
            )
        if phase == "release":
            return _open(self.anchor, self.anchor_yaw)
        return Waypoint(self.anchor + [0.0, 0.0, self.RETREAT], self.anchor_yaw, GRIPPER_OPEN)


_EXPERTS: dict[str, type[WaypointExpert]] = {
    "lift": LiftExpert,
    "can": CanExpert,
    "square": SquareExpert,
}


for _info in _TASK_INFO.values():
    register(
        TaskSpec(
            name=_info.name,
            family="robosuite",
            make=functools.partial(make_robosuite_env, _info.name),
            max_episode_steps=_info.max_episode_steps,
            control_freq=CONTROL_FREQ,
            make_expert=_EXPERTS[_info.name],
            default_expert_noise=_info.default_expert_noise,
            description=_info.description,
            extra={
                "robosuite_env": _info.env_name,
                "robot": ROBOT,
                "controller": "OSC_POSE",
                "obs_layout": observation_layout(_info.name),
            },
        )
    )
