"""Success predicates on observations, for play data recorded without success labels.

``dppo train-world-model label_with=<module>:<function>`` labels every observation with
``function(obs)``: obs (N, D) float32 in the task's flat layout -> (N,) bool. The functions here
reproduce the simulators' success checks from the observation alone and serve as examples; any
importable function with that signature works.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np

from envs import point_reach as pr

Predicate = Callable[[np.ndarray], np.ndarray]

LIFT_TABLE_Z = 0.8  # m, robosuite Lift's table top (``mujoco_arena.table_offset[2]``)
LIFT_SUCCESS_HEIGHT = 0.04  # m above the table (robosuite Lift's ``_check_success``)
LIFT_CUBE_Z = 2  # index of cube_pos z in the lift observation


def point_reach_success(obs: np.ndarray) -> np.ndarray:
    """``point_reach`` / ``point_reach_two_goals``: within the goal radius of a goal and slow."""
    obs = np.asarray(obs)
    pos, speed = obs[:, pr.POS], np.linalg.norm(obs[:, pr.VEL], axis=1)
    n_goals = (obs.shape[1] - pr.GOALS_START) // 2
    near = np.zeros(len(obs), bool)
    for g in range(n_goals):
        near |= np.linalg.norm(obs[:, pr.goal_slice(g)] - pos, axis=1) < pr.GOAL_RADIUS
    return near & (speed < pr.SUCCESS_SPEED)


def lift_success(obs: np.ndarray) -> np.ndarray:
    """robosuite ``lift``: the cube more than 4 cm above the table."""
    return np.asarray(obs)[:, LIFT_CUBE_Z] > LIFT_TABLE_Z + LIFT_SUCCESS_HEIGHT


def load_predicate(spec: str) -> Predicate:
    """Import ``"package.module:function"``; clear errors for a malformed or missing name."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"label_with={spec!r} must name a function as <module>:<function>, e.g. "
            "world_models.labels:point_reach_success"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"label_with={spec!r}: cannot import {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"label_with={spec!r}: {module_name} has no function {attr!r}")
    return fn


def apply_predicate(predicate: Predicate, obs: np.ndarray, name: str) -> np.ndarray:
    """(N,) bool labels from ``predicate(obs)``, checked for shape."""
    labels = np.asarray(predicate(obs))
    if labels.shape != (len(obs),):
        raise ValueError(
            f"label_with={name} returned shape {labels.shape}, expected ({len(obs)},) for obs "
            f"{obs.shape}"
        )
    return labels.astype(bool)
