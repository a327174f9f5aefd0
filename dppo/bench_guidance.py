"""``dppo bench-guidance``: does DynaGuide steer a policy toward the chosen behaviour?

On a task whose episodes end in one of several outcomes (``point_reach_two_goals``:
``info["goal_reached"]`` in {-1, 0, 1}), the same policy, sampler and episode seeds are rolled out
once per guidance strength s. Per strength the table reports the share of episodes whose behaviour
is the chosen one (``point_reach_two_goals``: the goal nearest the agent when the episode ends,
whether or not it stopped precisely enough to succeed), the share that stopped at the chosen goal
and at another one (``info[outcome]``), overall success, and the milliseconds per chunk (extra ms:
over the first strength in the list, normally s = 0, the unguided sampler).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import envs
from dppo.config import require, to_container
from dppo.evaluate import final_value
from dppo.pretrain import sampler_options, task_io_spec
from dppo.run_dir import write_json
from policies.checkpoint import load_policy, read_checkpoint_meta, resolve_checkpoint
from policies.chunk_samplers import build_chunk_sampler
from policies.dynaguide import nearest_goal, parse_goal_spec
from policies.guidance import build_hooks
from policies.runtime import PolicyRuntime

NO_OUTCOME = -1
BEHAVIOURS = {"goal_reached": nearest_goal}
"""Per outcome key: final states (N, D) -> the behaviour label (N,) each episode ended in."""


def rollout_outcomes(
    runtime: PolicyRuntime,
    task: str,
    n_episodes: int,
    n_envs: int,
    seed: int,
    outcome: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Per episode: ``info[outcome]`` at its last step, success, final state; and chunk cost.

    Episodes are counted in the order envs finish them, at most ceil(n_episodes / n_envs) per env.
    """
    spec = envs.get_task(task)
    cfg = runtime.cfg
    venv = envs.make_vec_env(
        task, n_envs, seed=seed, n_obs_steps=cfg.n_obs_steps, n_action_steps=cfg.n_action_steps
    )
    quota = math.ceil(n_episodes / n_envs)
    obs, _ = venv.reset(seed=seed)
    runtime.reset()
    outcomes: list[int] = []
    successes: list[bool] = []
    final_states: list[np.ndarray] = []
    chunk_ms, chunk_nfe = [], []
    counts = np.zeros(n_envs, dtype=int)
    bar = tqdm(total=n_episodes, desc=f"bench {task}", disable=not progress, leave=False)
    while len(outcomes) < n_episodes:
        res = runtime.act({spec.obs_key: obs})
        chunk_ms.append(res.ms)
        chunk_nfe.append(res.nfe)
        obs, _, terminated, truncated, info = venv.step(res.actions)
        done = terminated | truncated
        if done.any():
            reached = final_value(info, outcome, done, NO_OUTCOME)
            success = final_value(info, "is_success", done, False)
            last = envs.real_next_obs(obs, info, terminated, truncated)[:, -1]
            for i in np.flatnonzero(done):
                if counts[i] < quota and len(outcomes) < n_episodes:
                    outcomes.append(int(reached[i]))
                    successes.append(bool(success[i]))
                    final_states.append(np.asarray(last[i]))
                    bar.update(1)
                counts[i] += 1
            runtime.reset(done)
    bar.close()
    venv.close()
    return {
        "outcomes": outcomes,
        "final_states": np.stack(final_states),
        "success_rate": float(np.mean(successes)),
        "ms_per_chunk": float(np.median(chunk_ms)),
        "nfe_per_chunk": float(np.mean(chunk_nfe)),
    }


def chosen_outcome(cfg: DictConfig, guidance: dict[str, Any]) -> int:
    if cfg.chosen is not None:
        return int(cfg.chosen)
    spec = parse_goal_spec(str(guidance.get("goals")))
    require(
        spec is not None and spec[0] == cfg.outcome,
        f"chosen=null needs guidance.goals of the form {cfg.outcome}:<value>; "
        f"got {guidance.get('goals')!r}: set chosen=<outcome value>",
    )
    return spec[1]


def summarise(strength: float, res: dict[str, Any], chosen: int, outcome: str) -> dict[str, Any]:
    """One table row from ``rollout_outcomes``'s result."""
    out = np.asarray(res["outcomes"])
    behaviour = BEHAVIOURS.get(outcome)
    labels = {int(k): int(v) for k, v in zip(*np.unique(out, return_counts=True), strict=True)}
    return {
        "strength": float(strength),
        "behaviour_share": (
            None if behaviour is None else float(np.mean(behaviour(res["final_states"]) == chosen))
        ),
        "reached_share": float(np.mean(out == chosen)),
        "other_reached_share": float(np.mean((out != chosen) & (out != NO_OUTCOME))),
        "success_rate": res["success_rate"],
        "ms_per_chunk": res["ms_per_chunk"],
        "nfe_per_chunk": res["nfe_per_chunk"],
        "n_episodes": len(out),
        "outcome_counts": labels,
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def outcome_line(row: dict[str, Any], chosen: int, outcome: str) -> str:
    return (
        f"ends at {outcome}={chosen} {_pct(row['behaviour_share'])}, stopped there "
        f"{_pct(row['reached_share'])}, success {_pct(row['success_rate'])}, "
        f"{row['ms_per_chunk']:.2f} ms/chunk"
    )


def markdown_table(rows: list[dict[str, Any]], chosen: int, outcome: str) -> str:
    lines = [
        f"| s | ends at {outcome}={chosen} (nearest goal) | stopped there | stopped elsewhere "
        "| success | ms / chunk | extra ms / chunk |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strength']:g} | {_pct(r['behaviour_share'])} | {_pct(r['reached_share'])} "
            f"| {_pct(r['other_reached_share'])} | {_pct(r['success_rate'])} "
            f"| {r['ms_per_chunk']:.2f} | {r['extra_ms_per_chunk']:+.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot_table(path: Path, rows: list[dict[str, Any]], chosen: int, outcome: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [r["strength"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if rows[0]["behaviour_share"] is not None:
        ax.plot(s, [r["behaviour_share"] for r in rows], marker="o", label=f"ends at {chosen}")
    ax.plot(s, [r["reached_share"] for r in rows], marker="^", label=f"stopped at {chosen}")
    ax.plot(s, [r["success_rate"] for r in rows], marker="s", label="success")
    ax.set_xlabel("guidance strength s")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"DynaGuide steering toward {outcome}={chosen}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_bench_guidance(cfg: DictConfig) -> dict[str, Any]:
    """Roll out every strength in ``cfg.strengths``; write JSON, a markdown table and a plot."""
    torch.set_num_threads(cfg.threads)
    require(cfg.n_episodes > 0 and cfg.n_envs > 0, "n_episodes and n_envs must be > 0")
    require(len(cfg.strengths) > 0, "strengths must list at least one guidance strength")
    require(
        not OmegaConf.is_missing(cfg, "dynamics"),
        "dynamics=<run folder of `dppo train-dynamics`> is required",
    )
    folder = resolve_checkpoint(cfg.checkpoint)
    task = cfg.eval_task or read_checkpoint_meta(folder)["config"]["task"]
    shapes, action_dim = task_io_spec(task)
    policy = load_policy(folder, task=task, obs_shapes=shapes, action_dim=action_dim)
    guidance = to_container(cfg.guidance)
    require("strength" in guidance, f"guidance {guidance.get('name')!r} has no strength to vary")
    chosen = chosen_outcome(cfg, guidance)
    name, opts = sampler_options(cfg.sampler)
    n_envs = min(cfg.n_envs, cfg.n_episodes)
    sampler = build_chunk_sampler(name, policy, **opts)
    hooks = build_hooks(guidance, policy, task, sampler=sampler)

    rows = []
    for strength in cfg.strengths:
        for hook in hooks:
            hook.strength = float(strength)
        runtime = PolicyRuntime(
            policy, build_chunk_sampler(name, policy, **opts), n_envs, hooks=hooks, seed=cfg.seed
        )
        res = rollout_outcomes(runtime, task, cfg.n_episodes, n_envs, cfg.seed, cfg.outcome)
        rows.append(summarise(strength, res, chosen, cfg.outcome))
        print(f"s={strength:g}: {outcome_line(rows[-1], chosen, cfg.outcome)}", flush=True)
    for r in rows:
        r["extra_ms_per_chunk"] = r["ms_per_chunk"] - rows[0]["ms_per_chunk"]

    out_dir = Path(cfg.out) if cfg.out else _run_of(folder) / "bench-guidance"
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, chosen, cfg.outcome)
    (out_dir / "table.md").write_text(table)
    plot_table(out_dir / "guidance.png", rows, chosen, cfg.outcome)
    report = {
        "task": task,
        "checkpoint": str(folder),
        "sampler": sampler.describe(),
        "guidance": {k: v for k, v in guidance.items() if k != "strength"},
        "chosen": chosen,
        "outcome": cfg.outcome,
        "n_episodes": cfg.n_episodes,
        "seed": cfg.seed,
        "rows": rows,
    }
    write_json(out_dir / "bench_guidance.json", report)
    print(table)
    return {**report, "table": table, "out": str(out_dir)}


def _run_of(checkpoint_folder: Path) -> Path:
    """The run folder that holds a checkpoint folder (<run>/checkpoints/<name>)."""
    if checkpoint_folder.parent.name == "checkpoints":
        return checkpoint_folder.parent.parent
    return checkpoint_folder
