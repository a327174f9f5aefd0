"""``dppo bench inference``: what each sampler costs per chunk and per action, and how well it does.

One row per (sampler, network): network evaluations (NFE) per chunk and per executed action, ms
per chunk through the policy runtime (median, p99) and per executed action, the overhead ratio
``ms_per_chunk / (NFE x single forward ms)`` and, for trained checkpoints, the success rate on
their task. Networks: the Diffusion-Policy-size U-Net and the DPPO-size MLP with random weights
(timing only: success is null), plus every ``checkpoint`` given. A streaming sampler needs a
streaming policy: on the random networks it gets a per-action-level twin of the same size (its
layout from the network preset's ``streaming`` entry); on checkpoints only the samplers of the
checkpoint's policy type run.

``python -m dppo.bench_inference gpu --out FILE`` is the GPU benchmark of
``scripts/bench_inference_gpu.sh``: DDIM-10 and RTI on the DP U-Net at batch 1, eager vs CUDA graph,
fp32 vs bf16, against the memory-bandwidth bound. This module imports neither hydra nor envs at
the top, so it runs on machines with only torch, diffusers and safetensors.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.chunk_samplers import build_chunk_sampler
from policies.diffusion import DiffusionPolicy, PolicyConfig
from policies.runtime import PolicyRuntime

P50, P99 = 50, 99
MS_PER_S = 1e3
MIN_TIMED_CHUNKS = 3
"""A row stops early at ``max_seconds_per_row`` but never with fewer timed chunks than this."""
OBS_KEY = "state"
HBM_BYTES_PER_S = 4.8e12
"""H200 HBM3e bandwidth (datasheet) for the memory-bandwidth bound of the GPU benchmark."""
ROW_COLUMNS = (
    "sampler",
    "network",
    "path",
    "nfe_per_chunk",
    "nfe_per_action",
    "ms_per_chunk_p50",
    "ms_per_chunk_p99",
    "ms_per_action",
    "forward_ms",
    "overhead_ratio",
    "success_rate",
)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``cpu`` (process CPU time) is robust to other processes sharing the cores; use it with threads=1."""
PATHS = ("plain", "static", "compiled")
"""plain: the chunk sampler as built; static: ``policies.gpu.accelerate`` (eager static chains on
CPU, CUDA graphs on a GPU; streaming has no static path); compiled: ``accelerate(mode="compile")``
(inductor; its rows also time the network compiled alone)."""
NO_GPU = "not yet measured: no CUDA device here (scripts/bench_inference_gpu.sh measures it)"


def plain(value: Any) -> Any:
    """OmegaConf containers (or anything Mapping / Sequence-like) -> plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Policies and timing
# --------------------------------------------------------------------------------------------
def random_policy(
    preset: Mapping[str, Any], policy_type: str = "diffusion", seed: int = 0
) -> DiffusionPolicy:
    """A randomly initialised policy of a network preset; ``streaming`` applies its overrides."""
    spec = dict(preset)
    if policy_type == "streaming":
        spec.update(spec.get("streaming") or {})
    torch.manual_seed(seed)
    return DiffusionPolicy(
        PolicyConfig(
            task="bench",
            obs_shapes={OBS_KEY: [int(spec["obs_dim"])]},
            action_dim=int(spec["action_dim"]),
            n_obs_steps=int(spec["n_obs_steps"]),
            horizon=int(spec["horizon"]),
            n_action_steps=int(spec["n_action_steps"]),
            policy_type=policy_type,
            denoiser=spec["denoiser"],
            denoiser_kwargs=dict(spec.get("denoiser_kwargs") or {}),
            schedule={"num_train_steps": int(spec["num_train_steps"])},
        )
    ).eval()


def n_params(policy: DiffusionPolicy) -> int:
    return sum(p.numel() for p in policy.denoiser.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_obs(policy: DiffusionPolicy, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Observation histories {key: (B, To, *shape)} drawn inside the normaliser's range."""
    rng = np.random.default_rng(seed)
    cfg = policy.cfg
    return {
        k: rng.uniform(-1, 1, (batch, cfg.n_obs_steps, *shape)).astype(np.float32)
        for k, shape in cfg.obs_shapes.items()
    }


def forward_call(policy: DiffusionPolicy, batch: int, device: str | torch.device = "cpu"):
    """A zero-argument call of one denoiser pass at batch ``batch`` (top timestep; per-action
    levels if streaming), as the samplers make it through ``policy.eps``."""
    device = torch.device(device)
    cfg = policy.cfg
    x = torch.randn(batch, cfg.horizon, cfg.action_dim, device=device)
    cond = torch.randn(batch, cfg.cond_dim, device=device)
    top = policy.schedule.num_train_steps - 1
    t = (
        torch.full((batch, cfg.horizon), top, device=device)
        if cfg.policy_type == "streaming"
        else top
    )

    @torch.no_grad()
    def call() -> torch.Tensor:
        eps = policy.eps(x, t, cond)
        _sync(device)
        return eps  # returned: a compiled call must not drop the forward as dead code

    return call


def timed_ms(call, clock: str = "wall") -> float:
    now = CLOCKS[clock]
    start = now()
    call()
    return (now() - start) * MS_PER_S


def time_chunks(
    runtime: PolicyRuntime,
    obs: dict[str, np.ndarray],
    repeats: int,
    warmup: int,
    max_seconds: float,
    clock: str = "wall",
    forwards: Mapping[str, Any] | None = None,
    forwards_per_chunk: int = 0,
) -> tuple[list[float], list[int], dict[str, list[float]]]:
    """(ms, nfe, {name: forward ms}) of successive ``runtime.act`` calls after ``warmup``
    untimed ones.

    The warm-up includes the first (cold) call of warm-started samplers (and compilation), so
    the timed calls are their steady state. After each timed chunk, ``forwards_per_chunk``
    calls of each single-forward callable in ``forwards`` are timed too, so that chunks and
    forwards see the same load on a shared machine. Stops after ``max_seconds`` once
    ``MIN_TIMED_CHUNKS`` are timed.
    """
    forwards = dict(forwards or {})
    runtime.reset()
    for _ in range(warmup):
        runtime.act(obs)
    for forward in forwards.values():
        forward()
    now = CLOCKS[clock]
    ms, nfe = [], []
    forward_ms: dict[str, list[float]] = {name: [] for name in forwards}
    start = time.perf_counter()
    while len(ms) < repeats:
        begin = now()
        res = runtime.act(obs)
        ms.append((now() - begin) * MS_PER_S)
        nfe.append(res.nfe)
        for name, forward in forwards.items():
            forward_ms[name] += [timed_ms(forward, clock) for _ in range(forwards_per_chunk)]
        if len(ms) >= MIN_TIMED_CHUNKS and time.perf_counter() - start > max_seconds:
            break
    return ms, nfe, forward_ms


def cost_row(
    policy: DiffusionPolicy,
    sampler_name: str,
    options: dict,
    network: str,
    cfg: Mapping[str, Any],
    path: str = "plain",
    device: str = "cpu",
) -> dict[str, Any]:
    """Timing columns of one (sampler, network, path) row at batch ``cfg['batch']``."""
    from policies.gpu import accelerate

    batch = int(cfg["batch"])
    clock = str(cfg.get("clock") or "wall")
    sampler = build_chunk_sampler(sampler_name, policy, **options)
    forwards = {"eager": forward_call(policy, batch, device)}
    if path == "static":
        accelerate(
            sampler, policy, mode="graph" if torch.device(device).type == "cuda" else "eager"
        )
    elif path == "compiled":
        accelerate(sampler, policy, mode="compile")
        forwards["compiled"] = torch.compile(forward_call(policy, batch, device), dynamic=False)
    runtime = PolicyRuntime(policy, sampler, batch, seed=int(cfg["seed"]), device=device)
    ms, nfe, forward_ms = time_chunks(
        runtime,
        random_obs(policy, batch, int(cfg["seed"])),
        int(cfg["repeats"]),
        int(cfg["warmup"]),
        float(cfg["max_seconds_per_row"]),
        clock,
        forwards=forwards,
        forwards_per_chunk=int(cfg["forward_repeats"]),
    )
    forward = float(np.median(forward_ms["eager"]))
    ta = policy.cfg.n_action_steps
    nfe_chunk = float(np.mean(nfe))
    p50 = float(np.percentile(ms, P50))
    compiled = {}
    if "compiled" in forward_ms:  # the same network compiled alone: the stricter baseline
        compiled_forward = float(np.median(forward_ms["compiled"]))
        compiled = {
            "compiled_forward_ms": compiled_forward,
            "overhead_ratio_vs_compiled_forward": p50 / (nfe_chunk * compiled_forward),
        }
    return {
        "sampler": sampler_name,
        "network": network,
        "path": path,
        "clock": clock,
        "params": n_params(policy),
        "batch": batch,
        "horizon": policy.cfg.horizon,
        "n_action_steps": ta,
        "nfe_per_chunk": nfe_chunk,
        "nfe_per_action": nfe_chunk / ta,
        "ms_per_chunk_p50": p50,
        "ms_per_chunk_p99": float(np.percentile(ms, P99)),
        "ms_per_action": p50 / ta,
        "forward_ms": forward,
        "overhead_ratio": p50 / (nfe_chunk * forward),
        **compiled,
        "timed_chunks": len(ms),
        "sampler_config": sampler.describe(),
        "success_rate": None,
    }


def success_rate(
    policy: DiffusionPolicy,
    sampler_name: str,
    options: dict,
    task: str,
    n_episodes: int,
    n_envs: int,
    seed: int,
) -> dict[str, Any]:
    """Success rate (and mean return) of ``policy`` with a sampler over ``n_episodes``."""
    from dppo.evaluate import evaluate

    n_envs = min(n_envs, n_episodes)
    runtime = PolicyRuntime(
        policy, build_chunk_sampler(sampler_name, policy, **options), n_envs, seed=seed
    )
    result = evaluate(runtime, task, n_episodes, n_envs, seed=seed, progress=False)
    return {
        "success_rate": result.success_rate,
        "mean_return": result.mean_return,
        "n_episodes": result.n_episodes,
        "task": task,
    }


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------
def _sampler_options(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    options = plain(cfg.get("sampler_options") or {})
    found = dict(options.get(name) or {})
    found.pop("name", None)
    return found


def _paths(cfg: Mapping[str, Any], sampler_name: str) -> list[str]:
    paths = plain(cfg.get("paths") or ["plain"])
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"unknown path(s) {unknown}; valid paths: {', '.join(PATHS)}")
    return [p for p in paths if not (p == "static" and sampler_name == "streaming")]


def _random_network_rows(cfg: Mapping[str, Any], samplers: list[str]) -> list[dict]:
    presets = plain(cfg["network_presets"])
    rows = []
    for network in plain(cfg["networks"]):
        if network not in presets:
            raise ValueError(f"unknown network {network!r}; presets: {', '.join(presets)}")
        policies: dict[str, DiffusionPolicy] = {}
        for name in samplers:
            kind = "streaming" if name == "streaming" else "diffusion"
            if kind not in policies:
                policies[kind] = random_policy(presets[network], kind, int(cfg["seed"]))
            policy = policies[kind]
            options = _sampler_options(cfg, name)
            if name == "truncated" and "anchors" not in options and "dataset" not in options:
                gen = torch.Generator().manual_seed(int(cfg["seed"]))
                shape = (int(options.get("k", 20)), policy.cfg.horizon, policy.cfg.action_dim)
                options["anchors"] = torch.rand(shape, generator=gen) * 2 - 1
            for path in _paths(cfg, name):
                rows.append(cost_row(policy, name, options, network, cfg, path))
                _progress(rows[-1])
    return rows


def _checkpoint_rows(cfg: Mapping[str, Any], samplers: list[str]) -> list[dict]:
    """Rows on each checkpoint; success is measured once per sampler (the static path
    reproduces the plain sampler's outputs exactly in fp32, tests/test_gpu_path.py)."""
    from policies.checkpoint import load_policy, resolve_checkpoint

    given = cfg.get("checkpoint")
    checkpoints = [] if given is None else [given] if isinstance(given, str) else plain(given)
    rows = []
    for ckpt in checkpoints:
        folder = resolve_checkpoint(ckpt)
        policy = load_policy(folder).eval()
        task = cfg.get("task") or policy.cfg.task
        run_name = folder.parent.parent.name if folder.parent.name == "checkpoints" else folder.name
        network = f"{policy.cfg.denoiser}:{run_name}"
        for name in samplers:
            options = _sampler_options(cfg, name)
            if name == "truncated" and "anchors" not in options:
                options["anchors"] = str(folder)
                if cfg.get("dataset") and "dataset" not in options:
                    options["dataset"] = str(cfg["dataset"])
            try:
                build_chunk_sampler(name, policy, **options)
            except ValueError as exc:
                print(f"skip {name} on {network}: {exc}", file=sys.stderr)
                continue
            success = {}
            if int(cfg["n_episodes"]) > 0:
                success = success_rate(
                    policy,
                    name,
                    options,
                    task,
                    int(cfg["n_episodes"]),
                    int(cfg["n_envs"]),
                    int(cfg["seed"]),
                )
            for path in _paths(cfg, name):
                rows.append({**cost_row(policy, name, options, network, cfg, path), **success})
                _progress(rows[-1])
    return rows


def _progress(row: dict) -> None:
    print(
        f"  {row['sampler']:<10} {row['network']:<16} {row['path']:<6} "
        f"{row['ms_per_chunk_p50']:9.2f} ms/chunk "
        f"nfe {row['nfe_per_chunk']:.1f}",
        file=sys.stderr,
        flush=True,
    )


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of the row columns."""

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    cells = [list(ROW_COLUMNS)] + [[cell(r.get(c)) for c in ROW_COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(ROW_COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_bench_inference(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Run the benchmark of the module docstring; print the table, write the JSON report."""
    torch.set_num_threads(int(cfg["threads"]))
    samplers = plain(cfg["samplers"])
    from policies.chunk_samplers import CHUNK_SAMPLERS

    unknown = [s for s in samplers if s not in CHUNK_SAMPLERS]
    if unknown:
        raise ValueError(
            f"unknown sampler(s) {unknown}; valid samplers: {', '.join(CHUNK_SAMPLERS)}"
        )
    for key in ("repeats", "batch"):
        if int(cfg[key]) < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    rows = _random_network_rows(cfg, samplers) + _checkpoint_rows(cfg, samplers)
    table = format_table(rows)
    print(table)
    report = {
        "rows": rows,
        "threads": int(cfg["threads"]),
        "torch": torch.__version__,
        "gpu": NO_GPU if not torch.cuda.is_available() else "see scripts/bench_inference_gpu.sh",
        "config": plain(dict(cfg)),
    }
    out = Path(cfg.get("out") or "runs/bench_inference.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return {"out": str(out), "n_rows": len(rows), "report": report}


# --------------------------------------------------------------------------------------------
# GPU benchmark (scripts/bench_inference_gpu.sh)
# --------------------------------------------------------------------------------------------
DP_UNET = {
    "denoiser": "unet",
    "denoiser_kwargs": {"down_dims": [256, 512, 1024], "kernel_size": 5, "n_groups": 8},
    "obs_dim": 23,
    "action_dim": 7,
    "n_obs_steps": 2,
    "horizon": 16,
    "n_action_steps": 8,
    "num_train_steps": 100,
}
"""Diffusion Policy's robomimic low-dim U-Net (To=2, Tp=16, Ta=8)."""
GPU_SAMPLERS = {"ddim10": ("ddim", {"steps": 10}), "rti": ("rti", {"steps": [3, 1, 0]})}
GPU_VARIANTS = (
    ("baseline", "fp32"),
    ("eager", "fp32"),
    ("graph", "fp32"),
    ("eager", "bf16"),
    ("graph", "bf16"),
)
"""(mode, precision); ``baseline`` is the sampler without ``accelerate`` (DiffusionSampler.run)."""
GPU_TARGET_MS = {"ddim10": 1.5, "rti": 0.5}


@torch.no_grad()
def _time_sample(policy, sampler, device, repeats: int) -> tuple[list[float], list[float]]:
    """(chain ms via sampler.sample, runtime ms via act) at batch 1, steady state."""
    runtime = PolicyRuntime(policy, sampler, 1, seed=0, device=str(device))
    obs = random_obs(policy, 1)
    for _ in range(3):
        runtime.act(obs)
    act_ms = [runtime.act(obs).ms for _ in range(repeats)]
    cond = runtime.policy.condition({k: torch.as_tensor(v, device=device) for k, v in obs.items()})
    chain_ms = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        res = sampler.sample(policy, cond, runtime.state, generator=runtime.generator)
        _sync(device)
        chain_ms.append((time.perf_counter() - start) * MS_PER_S)
        sampler.after_chunk(policy, res, runtime.state)
    return chain_ms, act_ms


def gpu_bench(out: Path, repeats: int = 50, compile_too: bool = False) -> dict[str, Any]:
    """DDIM-10 and RTI on the DP U-Net at batch 1: eager vs graph, fp32 vs bf16 (JSON to ``out``)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    policy = random_policy(DP_UNET).to(device)
    params = n_params(policy)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (fallback: eager only)",
        "torch": torch.__version__,
        "params": params,
        "hbm_bytes_per_s": HBM_BYTES_PER_S,
        "targets_ms": GPU_TARGET_MS,
        "rows": [],
    }
    report["forward_ms"] = {
        precision: _time_forward_dtype(
            copy.deepcopy(policy.denoiser).to(dtype), policy.cfg, dtype, device, repeats
        )
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    variants = list(GPU_VARIANTS) + ([("compile", "bf16")] if compile_too else [])
    for label, (name, options) in GPU_SAMPLERS.items():
        for mode, precision in variants:
            try:
                row = _gpu_row(policy, label, name, options, mode, precision, device, repeats)
            except Exception as exc:  # one failed variant must not end the run
                row = {
                    "sampler": label,
                    "mode": mode,
                    "precision": precision,
                    "error": f"{type(exc).__name__}: {exc}",
                }
                print(f"{label:<7} {mode:<8} {precision}  FAILED {row['error']}", flush=True)
            else:
                row["overhead_ratio"] = row["chain_ms_p50"] / (
                    row["nfe"] * report["forward_ms"][precision]
                )
                print(
                    f"{label:<7} {mode:<8} {precision}  chain {row['chain_ms_p50']:8.3f} ms  "
                    f"act {row['act_ms_p50']:8.3f} ms  bound {row['bandwidth_bound_ms']:6.3f} ms"
                    f"  x{row['gap_to_bound']:.1f}  ({row['active_mode']})",
                    flush=True,
                )
            report["rows"].append(row)
            out.write_text(json.dumps(report, indent=2))
    return report


def _gpu_row(policy, label, name, options, mode, precision, device, repeats) -> dict[str, Any]:
    """One GPU benchmark variant: chain and runtime ms, and the memory-bandwidth bound."""
    from policies.gpu import accelerate

    sampler = build_chunk_sampler(name, policy, **options)
    if mode != "baseline":
        accelerate(sampler, policy, mode=mode, precision=precision)
    start = time.perf_counter()
    chain_ms, act_ms = _time_sample(policy, sampler, device, repeats)
    nfe = sampler.warm.n_steps if name == "rti" else sampler.diffusion.n_steps
    bytes_per_call = n_params(policy) * (2 if precision == "bf16" else 4)
    bound_ms = bytes_per_call * nfe / HBM_BYTES_PER_S * MS_PER_S
    act_p50 = float(np.median(act_ms))
    return {
        "sampler": label,
        "mode": mode,
        "active_mode": _active_mode(sampler),
        "precision": precision,
        "nfe": nfe,
        "chain_ms_p50": float(np.median(chain_ms)),
        "chain_ms_p99": float(np.percentile(chain_ms, P99)),
        "act_ms_p50": act_p50,
        "act_ms_p99": float(np.percentile(act_ms, P99)),
        "bandwidth_bound_ms": bound_ms,
        "gap_to_bound": act_p50 / bound_ms,
        "meets_target": act_p50 <= GPU_TARGET_MS[label],
        "setup_and_timing_s": time.perf_counter() - start,
    }


def _active_mode(sampler) -> str:
    """How the sampler's chains last ran: graph / compile / eager, or plain (not accelerated)."""
    from policies.gpu import StaticChain

    modes = {v.active_mode for v in vars(sampler).values() if isinstance(v, StaticChain)}
    return "/".join(sorted(modes)) if modes else "plain"


@torch.no_grad()
def _time_forward_dtype(
    denoiser: torch.nn.Module, cfg: PolicyConfig, dtype: torch.dtype, device, repeats: int
) -> float:
    """Median ms of one call of ``denoiser`` in ``dtype`` at batch 1."""
    x = torch.randn(1, cfg.horizon, cfg.action_dim, device=device, dtype=dtype)
    cond = torch.randn(1, cfg.cond_dim, device=device, dtype=dtype)
    t = torch.full((1,), 50, device=device, dtype=torch.long)

    def call():
        denoiser(x, t, cond)
        _sync(device)

    for _ in range(3):
        call()
    return float(np.median([timed_ms(call) for _ in range(repeats)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dppo.bench_inference")
    parser.add_argument("mode", choices=["gpu"], help="gpu: the GPU benchmark")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (slow start)")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = gpu_bench(args.out, max(MIN_TIMED_CHUNKS, args.repeats), args.compile)
    best = {}
    for row in report["rows"]:
        if math.isfinite(row.get("act_ms_p50", math.inf)):
            key = row["sampler"]
            best[key] = min(best.get(key, math.inf), row["act_ms_p50"])
    print(json.dumps({"best_act_ms_p50": best, "targets_ms": GPU_TARGET_MS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
