"""Task registry: names -> factories for gymnasium envs and their scripted experts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import gymnasium as gym
import numpy as np


class Expert(Protocol):
    """A scripted controller. ``reset`` is called after every ``env.reset``."""

    def reset(self, env: gym.Env, obs: np.ndarray, rng: np.random.Generator) -> None: ...

    def act(self, env: gym.Env, obs: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class TaskSpec:
    """Static facts about a task.

    ``make(**kwargs)`` builds one env (gymnasium API, Box obs and action spaces, ``info["is_success"]``,
    a TimeLimit of ``max_episode_steps``). ``make_expert(noise)`` builds its scripted expert, or is
    None where demonstrations come from elsewhere (gym locomotion: a Gaussian-PPO expert).
    ``obs_key`` names the flat state vector in datasets, normalisers and checkpoints.
    """

    name: str
    family: str
    make: Callable[..., gym.Env]
    max_episode_steps: int
    control_freq: float
    make_expert: Callable[[float], Expert] | None = None
    default_expert_noise: float = 0.0
    obs_key: str = "state"
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_TASKS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    if spec.name in _TASKS:
        raise ValueError(f"task {spec.name!r} is already registered")
    _TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    """The spec of ``name``; an unknown name raises a KeyError that lists the known tasks."""
    try:
        return _TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_TASKS))}") from None


def list_tasks() -> list[str]:
    return sorted(_TASKS)
