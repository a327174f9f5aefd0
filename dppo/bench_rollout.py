"""Rollout throughput of the DPPO runners: in process, or on 1, 2, ... Ray workers.

For each setting: env-steps/s over ``iterations`` rollouts of ``n_steps`` chunk steps in
``task.n_envs`` envs (after a warm-up), and for Ray the per-iteration time of the weight broadcast
(state dict -> safetensors bytes -> object store) and of gathering the batch (decoding and joining
the workers' slices), timed separately from the rollout itself. The learner's update time on one
collected batch (old log-probs + GAE + PPO epochs) bounds what more workers can buy.

A local Ray instance started here runs its workers at niceness 0 (Ray's default is 15), so that on
a shared machine they compete for the CPU on the same terms as the in-process runner.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dppo.bench_dppo import checkpoint_or_fresh_policy
from dppo.buffer import Rollout
from dppo.finetune import build_learner, learn
from dppo.run_dir import write_json
from dppo.runners import build_runner


def _time_runner(runner, learner, cfg: DictConfig) -> tuple[dict[str, float], Rollout]:
    """Figures of ``cfg.iterations`` timed rollouts, and the last rollout.

    ``env_steps_per_s`` is wall-clock throughput; ``env_steps_per_cpu_s`` divides by the CPU time
    of the processes that stepped the envs (this one, or the Ray workers), which another process
    sharing the cores disturbs far less. Ray also gets the per-worker rate measured inside the
    workers and the broadcast / gather overhead per iteration.
    """
    runner.collect(learner, 2, cfg.seed)  # warm-up
    totals = {"collect_s": 0.0, "cpu_s": 0.0}
    steps = 0
    worker_rates = []
    for itr in range(cfg.iterations):
        before = learner.env_steps
        start, cpu = time.perf_counter(), time.process_time()
        ro = runner.collect(learner, cfg.n_steps, cfg.seed + 1 + itr)
        totals["collect_s"] += time.perf_counter() - start
        steps += learner.env_steps - before
        timing = getattr(runner, "timing", {})  # Ray only: broadcast and gather, timed apart
        if timing:
            totals["cpu_s"] += sum(timing["worker_cpu_s"])
            per_worker = zip(timing["env_steps"], timing["worker_s"], strict=True)
            worker_rates += [n / s for n, s in per_worker]
            for key in ("broadcast_s", "gather_s"):
                totals[key] = totals.get(key, 0.0) + timing[key]
        else:
            totals["cpu_s"] += time.process_time() - cpu
    figures = {
        "env_steps_per_s": round(steps / totals["collect_s"], 1),
        "env_steps_per_cpu_s": round(steps / totals["cpu_s"], 1),
        "env_steps_per_iteration": steps // cfg.iterations,
        "collect_s_per_iteration": round(totals["collect_s"] / cfg.iterations, 4),
    }
    if worker_rates:
        figures["worker_env_steps_per_s"] = round(float(np.median(worker_rates)), 1)
    for key in ("broadcast_s", "gather_s"):
        if key in totals:
            figures[f"{key}_per_iteration"] = round(totals[key] / cfg.iterations, 4)
    return figures, ro


def _update_time(learner, ro, a) -> float:
    """Seconds of the learner's work on one batch: old log-probs, GAE and the PPO epochs."""
    _, times = learn(learner, ro, a, train_actor=True)
    return times["time_logprob"] + times["time_update"]


def project_scale_out(
    worker_rate: float,
    batch_per_worker: int,
    broadcast_s: float,
    gather_s: float,
    learner_rate: float,
    workers: list[int],
) -> dict[str, float]:
    """Modelled env-steps/s of a synchronous DPPO iteration on N workers, each with its own core
    and ``batch_per_worker`` env steps per iteration (weak scaling: the batch grows with N).

    An iteration is the workers' rollout (``batch_per_worker / worker_rate``, in parallel), the
    weight broadcast (once), gathering N slices (``gather_s`` per slice) and the learner's update
    of N x ``batch_per_worker`` steps at ``learner_rate``; throughput tends to ``learner_rate``.
    """
    out = {}
    for n in workers:
        batch = n * batch_per_worker
        seconds = batch_per_worker / worker_rate + broadcast_s + n * gather_s + batch / learner_rate
        out[str(n)] = round(batch / seconds, 1)
    return out


def run_bench_rollout(cfg: DictConfig) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    a, task = cfg.algorithm, cfg.task
    with tempfile.TemporaryDirectory() as tmp:
        ft_cfg = OmegaConf.create(
            {
                "task": task,
                "algorithm": a,
                "runner": cfg.runner,
                "checkpoint": checkpoint_or_fresh_policy(cfg, Path(tmp)),
                "seed": cfg.seed,
                "threads": cfg.threads,
            }
        )
        learner = build_learner(ft_cfg)
    result: dict[str, Any] = {
        "task": task.name,
        "n_envs": task.n_envs,
        "n_steps": cfg.n_steps,
        "runner": cfg.runner.name,
    }
    settings: dict[str, dict[str, float]] = {}
    if cfg.runner.name == "local":
        runner = build_runner(ft_cfg, learner)
        settings["local"], last = _time_runner(runner, learner, cfg)
        runner.close()
    else:
        import ray

        start = time.perf_counter()
        owns_ray = not ray.is_initialized()
        if owns_ray and cfg.runner.address is None:  # workers at the learner's priority
            ray.init(include_dashboard=False, _system_config={"worker_niceness": 0})
        elif owns_ray:
            ray.init(address=cfg.runner.address, include_dashboard=False)
        result["ray_init_s"] = round(time.perf_counter() - start, 2)
        for n in cfg.workers:
            ft_cfg.runner.num_workers = int(n)
            start = time.perf_counter()
            runner = build_runner(ft_cfg, learner)
            startup = time.perf_counter() - start
            figures, last = _time_runner(runner, learner, cfg)
            runner.close()
            figures["env_steps_per_s_per_worker"] = round(figures["env_steps_per_s"] / n, 1)
            settings[f"ray_{n}"] = {"workers_start_s": round(startup, 2), **figures}
        if owns_ray:
            ray.shutdown()
    update_s = _update_time(learner, last, a)
    batch_steps = next(iter(settings.values()))["env_steps_per_iteration"]
    result.update(
        {
            "settings": settings,
            "learner_update_s": round(update_s, 3),
            "learner_bound_env_steps_per_s": round(batch_steps / update_s, 1),
        }
    )
    one = settings.get("ray_1")
    if one is not None:
        for n in cfg.workers:  # against n x one worker's rate: 1.0 is linear scaling
            if n != 1:
                row = settings[f"ray_{n}"]
                ideal = n * one["env_steps_per_s"]
                row["scaling_efficiency"] = round(row["env_steps_per_s"] / ideal, 3)
        result["projected_env_steps_per_s"] = project_scale_out(
            one["worker_env_steps_per_s"],
            one["env_steps_per_iteration"],
            one["broadcast_s_per_iteration"],
            one["gather_s_per_iteration"],
            result["learner_bound_env_steps_per_s"],
            [int(n) for n in cfg.projected_workers],
        )
    for name, figures in settings.items():
        print(f"{name:>10}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    print(
        f"learner update on one batch ({batch_steps} env steps): {update_s:.3f}s -> at most "
        f"{result['learner_bound_env_steps_per_s']} env-steps/s however many workers collect"
    )
    if "projected_env_steps_per_s" in result:
        print(
            "modelled synchronous iterations, one worker per core, batch growing with workers "
            "(workers: env-steps/s): "
            + ", ".join(f"{n}: {v}" for n, v in result["projected_env_steps_per_s"].items())
        )
    if cfg.out:
        write_json(Path(cfg.out), result)
    return result
