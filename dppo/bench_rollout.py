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

import torch
from omegaconf import DictConfig, OmegaConf

from dppo.bench_dppo import checkpoint_or_fresh_policy
from dppo.buffer import Rollout
from dppo.finetune import build_learner, learn
from dppo.run_dir import write_json
from dppo.runners import build_runner


def _time_runner(runner, learner, cfg: DictConfig) -> tuple[dict[str, float], Rollout]:
    """Figures of ``cfg.iterations`` timed rollouts, and the last rollout."""
    runner.collect(learner, 2, cfg.seed)  # warm-up
    totals = {"collect_s": 0.0}
    steps = 0
    for itr in range(cfg.iterations):
        before = learner.env_steps
        start = time.perf_counter()
        ro = runner.collect(learner, cfg.n_steps, cfg.seed + 1 + itr)
        totals["collect_s"] += time.perf_counter() - start
        steps += learner.env_steps - before
        timing = getattr(runner, "timing", {})  # Ray only: broadcast and gather, timed apart
        for key in ("broadcast_s", "gather_s"):
            if key in timing:
                totals[key] = totals.get(key, 0.0) + timing[key]
    figures = {
        "env_steps_per_s": round(steps / totals["collect_s"], 1),
        "env_steps_per_iteration": steps // cfg.iterations,
    }
    figures.update({f"{k}_per_iteration": round(v / cfg.iterations, 4) for k, v in totals.items()})
    return figures, ro


def _update_time(learner, ro, a) -> float:
    """Seconds of the learner's work on one batch: old log-probs, GAE and the PPO epochs."""
    _, times = learn(learner, ro, a, train_actor=True)
    return times["time_logprob"] + times["time_update"]


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
        if cfg.runner.address is None:  # workers at the learner's priority, not Ray's nice 15
            ray.init(include_dashboard=False, _system_config={"worker_niceness": 0})
        else:
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
    for name, figures in settings.items():
        print(f"{name:>10}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    print(
        f"learner update on one batch ({batch_steps} env steps): {update_s:.3f}s -> at most "
        f"{result['learner_bound_env_steps_per_s']} env-steps/s however many workers collect"
    )
    if cfg.out:
        write_json(Path(cfg.out), result)
    return result
