"""A pool of Ray actors with restart-and-retry: the machinery shared by rollouts and evaluation.

Worker ``i`` is ``worker_cls(specs[i], blob)``: a JSON-able spec and one bytes blob (the policy's
safetensors state) put once into the object store and reused for restarts. ``call_all`` runs one
remote method on every worker; a worker that dies (``RayActorError``) is replaced by a fresh actor
and called again, up to ``runner.max_retries`` times per ``call_all``, then a clear error is
raised. Errors raised *inside* a worker's code propagate unchanged (they are not retried).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray
from omegaconf import DictConfig
from ray.exceptions import GetTimeoutError, RayActorError

from dppo.config import ConfigError

log = logging.getLogger(__name__)


def env_ranges(n_envs: int, n_workers: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) env slices, as equal as possible: 10 envs, 3 workers -> 4, 3, 3."""
    return [(int(s[0]), int(s[-1]) + 1) for s in np.array_split(np.arange(n_envs), n_workers)]


class WorkerPool:
    """``len(specs)`` actors of ``worker_cls`` (which must have ``ready()``) on a Ray cluster.

    Connects to ``runner.address`` (null: starts a local Ray instance) unless Ray is already
    initialised in this process; ``close`` shuts down only an instance it started.
    """

    def __init__(
        self, runner: DictConfig, worker_cls: type, specs: Sequence[dict[str, Any]], blob: bytes
    ):
        self.max_retries = int(runner.max_retries)
        self.start_timeout_s = float(runner.start_timeout_s)
        self.cpus_per_worker = float(runner.cpus_per_worker)
        self.workers: list[Any] = []
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            ray.init(address=runner.address, include_dashboard=False)
        if self.owns_ray and runner.address is None:  # a local instance cannot grow: fail fast
            need, have = len(specs) * self.cpus_per_worker, ray.cluster_resources()["CPU"]
            if need > have:
                self.close()
                raise ConfigError(
                    f"runner.num_workers={len(specs)} x runner.cpus_per_worker="
                    f"{self.cpus_per_worker:g} needs {need:g} CPUs; this machine's Ray instance "
                    f"has {have:g}: lower num_workers, or cpus_per_worker to share cores"
                )
        self.remote_cls = ray.remote(num_cpus=runner.cpus_per_worker)(worker_cls)
        self.specs = list(specs)
        self.blob_ref = ray.put(blob)
        self.workers = [self.remote_cls.remote(spec, self.blob_ref) for spec in self.specs]
        self.restarts = 0
        self._wait_ready(range(len(self.workers)))

    def _wait_ready(self, indices: Sequence[int]) -> None:
        refs = [self.workers[i].ready.remote() for i in indices]
        try:
            ray.get(refs, timeout=self.start_timeout_s)
        except GetTimeoutError:
            raise RuntimeError(
                f"Ray workers did not start within runner.start_timeout_s="
                f"{self.start_timeout_s:g}s; the cluster has {ray.cluster_resources()} and "
                f"{len(self.workers)} workers each ask for {self.cpus_per_worker:g} CPUs "
                f"(runner.cpus_per_worker)"
            ) from None
        except RayActorError as exc:
            raise RuntimeError(f"a Ray worker failed to start: {exc}") from exc

    def _restart(self, i: int) -> None:
        ray.kill(self.workers[i])
        self.workers[i] = self.remote_cls.remote(self.specs[i], self.blob_ref)
        self._wait_ready([i])
        self.restarts += 1

    def call_all(self, call: Callable[[Any], ray.ObjectRef], what: str) -> list[Any]:
        """``[ray.get(call(worker_i))]``; dead workers are restarted and called again."""
        results: list[Any] = [None] * len(self.workers)
        todo, retries = list(range(len(self.workers))), 0
        while True:
            refs = {i: call(self.workers[i]) for i in todo}
            failed: dict[int, RayActorError] = {}
            for i, ref in refs.items():
                try:
                    results[i] = ray.get(ref)
                except RayActorError as exc:
                    failed[i] = exc
            if not failed:
                return results
            lost = ", ".join(f"{i} (envs {self.specs[i]['envs']})" for i in failed)
            if retries == self.max_retries:
                raise RuntimeError(
                    f"Ray worker(s) {lost} died during {what}; gave up after "
                    f"runner.max_retries={self.max_retries} retries. Last error: "
                    f"{next(iter(failed.values()))}"
                )
            retries += 1
            log.warning("Ray worker(s) %s died during %s; restart %d", lost, what, retries)
            for i in failed:
                self._restart(i)
            todo = list(failed)

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
        if self.owns_ray:
            ray.shutdown()
