"""Tasks, scripted experts, vectorised chunk-executing envs and demonstration datasets.

Importing the package registers every task: ``point_reach`` (the default) and its two-goal
variant, gymnasium's locomotion tasks and, once present, the robosuite tasks.
"""

from __future__ import annotations

import importlib.util

from envs import gym_tasks, point_reach  # noqa: F401  (register their tasks)
from envs.registry import TaskSpec, get_task, list_tasks
from envs.vector import make_env, make_vec_env, real_next_obs, step_success

if importlib.util.find_spec("envs.robosuite_tasks") is not None:
    from envs import robosuite_tasks  # noqa: F401

DEFAULT_TASK = "point_reach"

__all__ = [
    "DEFAULT_TASK",
    "TaskSpec",
    "get_task",
    "list_tasks",
    "make_env",
    "make_vec_env",
    "real_next_obs",
    "step_success",
]
