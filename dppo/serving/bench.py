"""``dppo bench serve``: what serving costs over in-process inference, and what batching buys.

1. In-process: ``runtime.act`` on one (1, To, ...) history, p50/p99 ms.
2. Loopback round trip to a server process (same checkpoint, sampler and torch threads), one
   client: p50/p99 ms and the overhead over in-process (difference of the p50s).
3. Throughput with 1, 4, 16, ... concurrent clients (closed loop: each sends its next request
   when the previous reply arrives): requests/s, latency p50/p99 and mean batch size, for a
   server without batching (max_batch=1) and one with batching.

``run_bench`` takes plain arguments (a checkpoint and one observation); ``bench_serve`` is the
command, which builds them from the config.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dppo.serving.client import AsyncPolicyClient, connect, connect_async
from dppo.serving.server import PolicyServer, ServerConfig, load_runtime, run_until_signal
from policies.runtime import PolicyRuntime

P50, P99 = 50, 99
MS_PER_S = 1e3
SERVER_START_TIMEOUT_S = 120.0
SERVER_STOP_TIMEOUT_S = 30.0


def _percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(ms, P50)), "p99_ms": float(np.percentile(ms, P99))}


def in_process(
    runtime: PolicyRuntime, obs: dict[str, np.ndarray], n: int, warmup: int
) -> dict[str, float]:
    """Latency of ``runtime.act`` on the history made of ``obs`` {key: (*shape)} repeated To times."""
    history = {k: np.repeat(v[None, None], runtime.cfg.n_obs_steps, axis=1) for k, v in obs.items()}
    for _ in range(warmup):
        runtime.act(history)
    ms = []
    for _ in range(n):
        start = time.perf_counter()
        runtime.act(history)
        ms.append((time.perf_counter() - start) * MS_PER_S)
    return _percentiles(ms)


def _serve_child(
    checkpoint: str,
    sampler: dict[str, Any],
    seed: int,
    threads: int,
    device: str,
    server_cfg: dict[str, Any],
    conn: Connection,
) -> None:
    torch.set_num_threads(threads)
    runtime = load_runtime(checkpoint, sampler, seed, device)
    server = PolicyServer(runtime, ServerConfig(**server_cfg))
    run_until_signal(server, announce=lambda line: conn.send(server.url))


class ServeProcess:
    """A policy server in a spawned process on a free port; SIGTERM stops it (must exit 0)."""

    def __init__(
        self,
        checkpoint: Path,
        sampler: dict[str, Any],
        *,
        seed: int,
        threads: int,
        device: str,
        max_batch: int,
        batch_window_ms: float,
    ):
        ctx = mp.get_context("spawn")  # a fresh interpreter: no state inherited from this one
        self._conn, child_conn = ctx.Pipe(duplex=False)
        server_cfg = {"port": 0, "max_batch": max_batch, "batch_window_ms": batch_window_ms}
        self.proc = ctx.Process(
            target=_serve_child,
            name="dppo-bench-server",
            args=(str(checkpoint), sampler, seed, threads, device, server_cfg, child_conn),
        )
        self.url = ""

    def __enter__(self) -> ServeProcess:
        self.proc.start()
        if not self._conn.poll(SERVER_START_TIMEOUT_S):
            self.proc.kill()
            raise RuntimeError("the benchmark's policy server did not start")
        self.url = self._conn.recv()
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()  # SIGTERM: the server's clean shutdown
        self.proc.join(SERVER_STOP_TIMEOUT_S)
        if self.proc.exitcode != 0:
            raise RuntimeError(f"the server exited with code {self.proc.exitcode} on SIGTERM")


def round_trip(url: str, obs: dict[str, np.ndarray], n: int, warmup: int) -> dict[str, float]:
    """One client, one request at a time: infer p50/p99 and the bare transport's (ping) p50."""
    with connect(url) as client:
        client.infer(obs, reset=True)
        for _ in range(warmup):
            client.infer(obs)
        ms = [client.infer(obs).rtt_ms for _ in range(n)]
        ping = [client.ping() for _ in range(n)]
    return {**_percentiles(ms), "ping_p50_ms": float(np.percentile(ping, P50))}


async def _closed_loop(
    client: AsyncPolicyClient,
    obs: dict[str, np.ndarray],
    n: int,
    rtt: list[float],
    batch: list[int],
) -> None:
    for _ in range(n):
        reply = await client.infer(obs)
        rtt.append(reply.rtt_ms)
        batch.append(reply.batch_size)


async def throughput(
    url: str, obs: dict[str, np.ndarray], n_clients: int, requests_per_client: int
) -> dict[str, float]:
    clients = [await connect_async(url) for _ in range(n_clients)]
    try:
        await asyncio.gather(*(c.infer(obs, reset=True) for c in clients))
        rtt: list[float] = []
        batch: list[int] = []
        start = time.perf_counter()
        await asyncio.gather(
            *(_closed_loop(c, obs, requests_per_client, rtt, batch) for c in clients)
        )
        wall = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return {
        "clients": n_clients,
        "requests_per_s": len(rtt) / wall,
        **_percentiles(rtt),
        "mean_batch_size": float(np.mean(batch)),
    }


def run_bench(
    checkpoint: Path,
    sampler: dict[str, Any],
    obs: dict[str, np.ndarray],
    *,
    seed: int = 0,
    threads: int = 1,
    device: str = "cpu",
    n_requests: int = 200,
    warmup: int = 20,
    concurrency: Sequence[int] = (1, 4, 16),
    requests_per_client: int = 50,
    max_batch: int = 16,
    batch_window_ms: float = 2.0,
) -> dict[str, Any]:
    """The whole benchmark for one checkpoint + sampler; ``obs``: one observation {key: shape}."""
    torch.set_num_threads(threads)
    runtime = load_runtime(str(checkpoint), sampler, seed, device)
    report: dict[str, Any] = {
        "task": runtime.cfg.task,
        "sampler": runtime.sampler.describe(),
        "device": device,
        "threads": threads,
        "in_process": in_process(runtime, obs, n_requests, warmup),
    }
    for label, batch in (("no_batching", 1), ("batching", max_batch)):
        with ServeProcess(
            checkpoint,
            sampler,
            seed=seed,
            threads=threads,
            device=device,
            max_batch=batch,
            batch_window_ms=batch_window_ms,
        ) as server:
            loopback = round_trip(server.url, obs, n_requests, warmup)
            loopback["overhead_p50_ms"] = loopback["p50_ms"] - report["in_process"]["p50_ms"]
            rows = [
                asyncio.run(throughput(server.url, obs, c, requests_per_client))
                for c in concurrency
            ]
        report[label] = {"max_batch": batch, "loopback": loopback, "throughput": rows}
    return report


def format_report(report: dict[str, Any]) -> str:
    ip = report["in_process"]
    lines = [
        f"bench serve: {report['task']}, sampler {report['sampler']['name']} "
        f"({report['sampler']['n_steps']} steps), {report['device']}, "
        f"{report['threads']} torch thread(s)",
        f"  in-process     p50 {ip['p50_ms']:.2f} ms  p99 {ip['p99_ms']:.2f} ms",
    ]
    for label in ("no_batching", "batching"):
        r = report[label]
        lb = r["loopback"]
        lines.append(
            f"  {label} (max_batch={r['max_batch']}): loopback p50 {lb['p50_ms']:.2f} ms "
            f"p99 {lb['p99_ms']:.2f} ms, overhead {lb['overhead_p50_ms']:+.2f} ms "
            f"(ping p50 {lb['ping_p50_ms']:.2f} ms)"
        )
        for row in r["throughput"]:
            lines.append(
                f"    {row['clients']:>3} clients: {row['requests_per_s']:8.1f} req/s  "
                f"p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  "
                f"batch {row['mean_batch_size']:.2f}"
            )
    return "\n".join(lines)


def bench_serve(cfg) -> dict[str, Any]:
    """``dppo bench serve``: the config's checkpoint (or a random task + policy model)."""
    from omegaconf import OmegaConf

    import envs
    from dppo.pretrain import build_policy, task_io_spec
    from policies.checkpoint import read_checkpoint_meta, save_policy

    with tempfile.TemporaryDirectory() as tmp:
        if cfg.checkpoint:
            checkpoint = Path(cfg.checkpoint)
        else:  # random weights cost the same as trained ones
            torch.manual_seed(cfg.seed)
            shapes, action_dim = task_io_spec(cfg.task.name)
            policy = build_policy(cfg, shapes, action_dim)
            checkpoint = save_policy(policy, Path(tmp) / "random-policy")
        task = read_checkpoint_meta(checkpoint)["config"]["task"]
        env = envs.make_env(task, seed=cfg.seed)
        obs = {envs.get_task(task).obs_key: env.reset()[0]}
        env.close()
        report = run_bench(
            checkpoint,
            OmegaConf.to_container(cfg.sampler),
            obs,
            seed=cfg.seed,
            threads=cfg.threads,
            device=cfg.device,
            n_requests=cfg.n_requests,
            warmup=cfg.warmup,
            concurrency=list(cfg.concurrency),
            requests_per_client=cfg.requests_per_client,
            max_batch=cfg.max_batch,
            batch_window_ms=cfg.batch_window_ms,
        )
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        report["out"] = str(out)
    print(format_report(report))
    return report
