"""Rollout runners: where the DPPO loop's environment rollouts run.

``runner=local`` (default) steps one vector env in this process; ``runner=ray`` spreads the envs
over Ray actors (``pip install -e ".[ray]"``). Both give ``collect(learner, n_steps, seed) ->
Rollout`` and ``close()``, and both draw each env's sampling noise from its own generator
(``dppo.runners.streams``), so the collected batch does not depend on the runner.
``evaluate_with_runner`` does the same for ``dppo eval``.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

import envs
from dppo.config import require
from dppo.evaluate import EvalResult, evaluate

RUNNERS = ("local", "ray")
ADDRESS_FORMS = "null (start a local Ray instance), auto, ray://<host>:<port> or <host>:<port>"
_ADDRESS = re.compile(r"^(auto|ray://[^\s:]+:\d+|[^\s:/]+:\d+)$")


def validate_runner(cfg: DictConfig, n_envs: int) -> None:
    """Check ``cfg.runner`` against ``n_envs`` envs (and ``cfg.algorithm``, when present)."""
    r = cfg.runner
    require(r.name in RUNNERS, f"runner must be one of {', '.join(RUNNERS)}, got {r.name!r}")
    require(
        r.denoiser_block_rows is None
        or (isinstance(r.denoiser_block_rows, int) and r.denoiser_block_rows > 0),
        f"runner.denoiser_block_rows must be null or an integer > 0, got {r.denoiser_block_rows!r}",
    )
    if r.name != "ray":
        return
    require(
        isinstance(r.num_workers, int) and 1 <= r.num_workers <= n_envs,
        f"runner.num_workers must be an integer in [1, {n_envs}] (each worker owns at least one "
        f"of the {n_envs} envs), got {r.num_workers!r}",
    )
    require(
        isinstance(r.max_retries, int) and r.max_retries >= 0,
        f"runner.max_retries must be an integer >= 0, got {r.max_retries!r}",
    )
    require(r.cpus_per_worker > 0, f"runner.cpus_per_worker must be > 0, got {r.cpus_per_worker}")
    require(
        r.address is None or bool(_ADDRESS.match(str(r.address))),
        f"runner.address must be {ADDRESS_FORMS}; got {r.address!r}",
    )
    require(
        "algorithm" not in cfg or cfg.algorithm.actor == "diffusion",
        "runner=ray supports algorithm.actor=diffusion only (the Gaussian baseline's running "
        "observation normaliser is updated during rollouts); use runner=local",
    )


def default_venv(cfg: DictConfig):
    """The task's training vector env (cfg.task), as ``dppo finetune`` builds it."""
    task = cfg.task
    return envs.make_vec_env(
        task.name,
        task.n_envs,
        seed=cfg.seed,
        n_obs_steps=task.n_obs_steps,
        n_action_steps=task.n_action_steps,
        reward_type=task.reward_type,
    )


def build_runner(
    cfg: DictConfig, learner: Any, make_venv: Callable[[DictConfig], Any] | None = None
):
    """The rollout runner named by ``cfg.runner`` (local when the config has no runner group).

    ``make_venv(cfg)`` replaces the task's vector env (local runner only: an imagined env lives
    in the learner's process).
    """
    runner_cfg = cfg.get("runner")
    if runner_cfg is None or runner_cfg.name == "local":
        if runner_cfg is not None:
            validate_runner(cfg, cfg.task.n_envs)
        from dppo.runners.local import LocalRunner

        venv = make_venv(cfg) if make_venv is not None else default_venv(cfg)
        obs_key = envs.get_task(cfg.task.name).obs_key
        block_rows = None if runner_cfg is None else runner_cfg.denoiser_block_rows
        return LocalRunner(venv, obs_key, cfg.algorithm.reward_scaling, block_rows)
    validate_runner(cfg, cfg.task.n_envs)
    require(
        make_venv is None,
        "runner=ray runs the task's real envs on workers; this command's custom env "
        "(e.g. a world model's imagined env) needs runner=local",
    )
    _require_ray()
    from dppo.runners.ray_runner import RayRunner

    return RayRunner(cfg, learner.actor.policy)


def evaluate_with_runner(cfg: DictConfig, runtime, policy, task: str, n_envs: int) -> EvalResult:
    """``dppo eval``: ``cfg.n_episodes`` episodes in ``n_envs`` envs, in this process with
    ``runtime`` (runner=local) or on Ray workers that rebuild it from ``cfg`` (runner=ray)."""
    runner_cfg = cfg.get("runner")
    if runner_cfg is not None:
        validate_runner(cfg, n_envs)
    if runner_cfg is None or runner_cfg.name == "local":
        return evaluate(runtime, task, cfg.n_episodes, n_envs, seed=cfg.seed)
    _require_ray()
    from dppo.runners.ray_eval import evaluate_on_ray

    return evaluate_on_ray(cfg, policy, task, n_envs)


def _require_ray() -> None:
    require(
        importlib.util.find_spec("ray") is not None,
        'runner=ray needs Ray, the optional extra: pip install -e ".[ray]"',
    )
