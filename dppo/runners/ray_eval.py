"""Evaluation on Ray actors (``dppo eval ... runner=ray``): the envs split over workers.

Worker ``w`` owns envs [lo, hi) (env ``i`` reset with ``seed + i``, as in the local evaluation),
builds the eval runtime (sampler + guidance of the eval config) and runs ``dppo.evaluate.evaluate``
for ``n_episodes / n_envs`` episodes per env: exactly the episodes the local evaluation counts. The
per-worker results are pooled, weighted by episodes. Sampling noise comes from one generator per
worker (the eval seed for the worker of env 0, as the local runtime; one derived from the seed and
the first env for the others), so with one worker the result is the local one bit for bit, and
with more it matches statistically.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import envs
from dppo.config import require, to_container
from dppo.evaluate import EvalResult, evaluate
from dppo.runners.pool import WorkerPool, env_ranges
from dppo.runners.streams import stream_seed
from dppo.runners.transport import policy_from_bytes, state_to_bytes
from policies.chunk_samplers import build_chunk_sampler
from policies.diffusion import DiffusionPolicy
from policies.guidance import build_hooks
from policies.runtime import PolicyRuntime


class EvalWorker:
    """A Ray actor evaluating a policy on envs ``spec["envs"]`` = [lo, hi) of ``spec["task"]``."""

    def __init__(self, spec: dict[str, Any], policy_blob: bytes):
        torch.set_num_threads(spec["threads"])
        policy = policy_from_bytes(spec["policy_config"], policy_blob)
        options = dict(spec["sampler"])
        sampler = build_chunk_sampler(options.pop("name"), policy, **options)
        hooks = build_hooks(OmegaConf.create(spec["guidance"]), policy, spec["task"], sampler)
        lo, hi = spec["envs"]
        self.env_ids = list(range(lo, hi))
        self.spec = spec
        seed = spec["seed"] if lo == 0 else stream_seed(spec["seed"], lo)
        self.runtime = PolicyRuntime(policy, sampler, len(self.env_ids), hooks=hooks, seed=seed)
        self.venv = envs.make_vec_env(
            spec["task"],
            len(self.env_ids),
            n_obs_steps=policy.cfg.n_obs_steps,
            n_action_steps=policy.cfg.n_action_steps,
        )

    def ready(self) -> int:
        return os.getpid()

    def evaluate(self) -> dict[str, Any]:
        """``episodes_per_env`` episodes in each of the worker's envs: EvalResult as a dict."""
        n_envs = len(self.env_ids)
        result = evaluate(
            self.runtime,
            self.spec["task"],
            self.spec["episodes_per_env"] * n_envs,
            n_envs,
            seed=[self.spec["seed"] + e for e in self.env_ids],  # one reset seed per env
            progress=False,
            vec_env=self.venv,
        )
        return result.to_dict()


def pool_results(results: list[dict[str, Any]]) -> EvalResult:
    """Episode-weighted means of the workers' results (sim faults summed; ms_per_chunk is the
    weighted mean of the workers' medians)."""
    n = sum(r["n_episodes"] for r in results)

    def mean(key: str) -> float:
        return sum(r[key] * r["n_episodes"] for r in results) / n

    return EvalResult(
        success_rate=mean("success_rate"),
        mean_return=mean("mean_return"),
        n_episodes=n,
        mean_length=mean("mean_length"),
        ms_per_chunk=mean("ms_per_chunk"),
        nfe_per_chunk=mean("nfe_per_chunk"),
        sim_faults=sum(r["sim_faults"] for r in results),
    )


def evaluate_on_ray(cfg: DictConfig, policy: DiffusionPolicy, task: str, n_envs: int) -> EvalResult:
    """``cfg.n_episodes`` episodes of ``task`` in ``n_envs`` envs spread over Ray workers."""
    require(
        cfg.n_episodes % n_envs == 0,
        f"runner=ray evaluates n_episodes / n_envs episodes in every env: n_episodes="
        f"{cfg.n_episodes} must be a multiple of n_envs={n_envs}",
    )
    base = {
        "task": task,
        "policy_config": policy.cfg.to_dict(),
        "sampler": to_container(cfg.sampler),
        "guidance": to_container(cfg.guidance),
        "seed": int(cfg.seed),
        "episodes_per_env": cfg.n_episodes // n_envs,
        "threads": int(cfg.threads),
    }
    specs = [{**base, "envs": list(rng)} for rng in env_ranges(n_envs, cfg.runner.num_workers)]
    pool = WorkerPool(cfg.runner, EvalWorker, specs, state_to_bytes(policy.state_dict()))
    try:
        results = pool.call_all(lambda w: w.evaluate.remote(), "evaluation")
    finally:
        pool.close()
    return pool_results(results)
