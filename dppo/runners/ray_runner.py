"""Rollouts on Ray actors: N workers, each owning a vector env over a contiguous slice of the envs.

Per iteration the learner puts the fine-tuned denoiser's weights (safetensors bytes) into the
object store once; every worker loads them, runs ``collect_rollout`` on its envs (env ``i``
reset with ``seed + i``, per-env sampling noise from ``dppo.runners.streams``) and returns its
slice with raw rewards; the learner joins the slices and scales rewards as the local runner does.
The critic, the optimisers and the checkpoints stay with the learner.

A worker that dies mid-rollout is replaced and its slice collected again (``WorkerPool``): the
slice depends only on the weights, the seed and the env range, so the batch is unchanged. After
``runner.max_retries`` failed retries the run stops; the last checkpoint is untouched.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch
from omegaconf import DictConfig, OmegaConf

import envs
from dppo.actors import DiffusionActor
from dppo.buffer import Rollout
from dppo.config import to_container
from dppo.finetune import Learner, collect_rollout
from dppo.runners.pool import WorkerPool, env_ranges
from dppo.runners.streams import use_stream_noise
from dppo.runners.transport import (
    Slice,
    bytes_to_state,
    encode_slice,
    merge_slices,
    policy_from_bytes,
    state_to_bytes,
)
from policies.diffusion import DiffusionPolicy


@dataclass
class WorkerCollector:
    """The part of a ``Learner`` that ``collect_rollout`` touches when rewards stay raw."""

    actor: DiffusionActor
    reward_scaler: None = None
    env_steps: int = 0


class RolloutWorker:
    """A Ray actor: envs ``spec["envs"]`` = [lo, hi) of the task and a copy of the policy.

    ``spec`` is JSON-able (task, To/Ta, reward type, algorithm, policy config, threads, block
    rows); ``policy_blob`` is the full policy state (frozen denoiser and normaliser included).
    """

    def __init__(self, spec: dict[str, Any], policy_blob: bytes):
        torch.set_num_threads(spec["threads"])
        policy = policy_from_bytes(spec["policy_config"], policy_blob)
        lo, hi = spec["envs"]
        self.env_ids = list(range(lo, hi))
        self.actor = DiffusionActor(
            policy, OmegaConf.create(spec["algorithm"]), len(self.env_ids), seed=lo
        )
        self.collector = WorkerCollector(self.actor)
        self.block_rows = spec["block_rows"]
        self.obs_key = envs.get_task(spec["task"]).obs_key
        self.venv = envs.make_vec_env(
            spec["task"],
            len(self.env_ids),
            n_obs_steps=spec["n_obs_steps"],
            n_action_steps=spec["n_action_steps"],
            reward_type=spec["reward_type"],
        )

    def ready(self) -> int:
        return os.getpid()

    def rollout(self, weights: bytes, n_steps: int, seed: int) -> Slice:
        """Load the denoiser ``weights`` and collect ``n_steps`` chunk steps in every env."""
        self.actor.policy.denoiser.load_state_dict(bytes_to_state(weights))
        use_stream_noise(self.actor, seed, self.env_ids, self.block_rows)
        before = self.collector.env_steps
        wall, cpu = time.perf_counter(), time.process_time()
        seeds = [seed + e for e in self.env_ids]  # gymnasium's vector reset takes one per env
        ro = collect_rollout(self.collector, self.venv, self.obs_key, n_steps, seeds, scale=False)
        blob, scalars = encode_slice(ro, self.collector.env_steps - before)
        scalars["worker_s"] = time.perf_counter() - wall
        scalars["worker_cpu_s"] = time.process_time() - cpu
        return blob, scalars


class RayRunner:
    """``cfg.runner.num_workers`` Ray actors sharing ``cfg.task.n_envs`` envs (contiguous slices).

    ``timing`` holds the last iteration's ``broadcast_s`` (weights into the object store),
    ``rollout_s`` (workers, retries included) and ``gather_s`` (decoding and joining slices), and
    per worker (lists) its ``env_steps``, ``worker_s`` (wall time inside its rollout call) and
    ``worker_cpu_s`` (that process's CPU time for it).
    """

    def __init__(self, cfg: DictConfig, policy: DiffusionPolicy):
        r, task = cfg.runner, cfg.task
        self.reward_scaling = bool(cfg.algorithm.reward_scaling)
        self.ranges = env_ranges(task.n_envs, r.num_workers)
        base = {
            "task": task.name,
            "n_obs_steps": task.n_obs_steps,
            "n_action_steps": task.n_action_steps,
            "reward_type": task.reward_type,
            "algorithm": to_container(cfg.algorithm),
            "policy_config": policy.cfg.to_dict(),
            "threads": int(cfg.threads),
            "block_rows": r.denoiser_block_rows,
        }
        specs = [{**base, "envs": list(rng)} for rng in self.ranges]
        self.pool = WorkerPool(r, RolloutWorker, specs, state_to_bytes(policy.state_dict()))
        self.timing: dict[str, float] = {}

    @property
    def workers(self) -> list[Any]:
        return self.pool.workers

    @property
    def restarts(self) -> int:
        return self.pool.restarts

    def collect(self, learner: Learner, n_steps: int, seed: int) -> Rollout:
        """``n_steps`` chunk steps in every env (env i reset with ``seed + i``), joined in order."""
        t0 = time.perf_counter()
        weights = ray.put(state_to_bytes(learner.actor.policy.denoiser.state_dict()))
        t1 = time.perf_counter()
        slices = self.pool.call_all(
            lambda w: w.rollout.remote(weights, n_steps, seed), "this iteration's rollout"
        )
        t2 = time.perf_counter()
        ro = merge_slices(slices, [lo for lo, _ in self.ranges], learner, self.reward_scaling)
        t3 = time.perf_counter()
        self.timing = {"broadcast_s": t1 - t0, "rollout_s": t2 - t1, "gather_s": t3 - t2}
        for key in ("env_steps", "worker_s", "worker_cpu_s"):
            self.timing[key] = [scalars[key] for _, scalars in slices]
        return ro

    def close(self) -> None:
        self.pool.close()
