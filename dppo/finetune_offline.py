"""``dppo finetune-offline``: DPPO inside a learned world model, with zero environment steps.

The DPPO loop of ``dppo.finetune`` runs unchanged; only its training vector env is the world
model's ``ImaginedVecEnv`` (passed through ``finetune(cfg, make_venv=...)``). Rollouts, rewards
and terminations are imagined; real simulators only *evaluate* the policy (``eval_every``
iterations, ``eval_episodes`` episodes) so the run shows when imagination and reality diverge.

The policy acts on decoded observations, in the task's own observation layout: the pre-trained
checkpoint is fine-tuned as it is and the fine-tuned one runs unchanged in the real simulator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dppo.config import ConfigError, require
from dppo.finetune import finetune, resume_config
from dppo.run_dir import default_run_path, write_json
from policies.checkpoint import read_checkpoint_meta
from world_models.checkpoint import load_world_model, read_world_model_doc
from world_models.imagined_env import START_STATE_SOURCES, make_imagined_vec_env

METRICS = "metrics.jsonl"
ONLINE_ENV_STEPS = 0
"""Real env steps taken by the training rollouts: they all run in the imagined env."""


def check_compatible(cfg: DictConfig) -> None:
    """Raise a ConfigError listing every way the world model does not fit the policy or task."""
    require(cfg.world_model is not None, "world_model=<run of dppo train-world-model> is required")
    require(cfg.checkpoint is not None, "checkpoint=<pre-trained policy run> is required")
    try:
        doc = read_world_model_doc(cfg.world_model)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    wm = doc["world_model"]
    policy = read_checkpoint_meta(cfg.checkpoint)["config"]
    problems = []
    if wm["task"] != policy["task"]:
        problems.append(f"world model task {wm['task']!r} vs the policy's {policy['task']!r}")
    if wm["task"] != cfg.task.name:
        problems.append(f"world model task {wm['task']!r} vs task={cfg.task.name}")
    wm_obs = {wm["obs_key"]: [wm["obs_dim"]]}
    if wm_obs != policy["obs_shapes"]:
        problems.append(f"world model observations {wm_obs} vs the policy's {policy['obs_shapes']}")
    if wm["action_dim"] != policy["action_dim"]:
        problems.append(
            f"world model action dim {wm['action_dim']} vs the policy's {policy['action_dim']}"
        )
    require(
        not problems,
        f"world model {cfg.world_model} does not fit policy {cfg.checkpoint}: "
        + "; ".join(problems),
    )
    require(
        doc.get("classifier") is not None,
        f"world model {cfg.world_model} has no success classifier (unfinished training?)",
    )
    im = cfg.imagination
    require(
        im.start_states in START_STATE_SOURCES,
        f"imagination.start_states must be one of {START_STATE_SOURCES}, got {im.start_states!r}",
    )
    require(
        im.max_episode_steps is None or im.max_episode_steps > 0,
        "imagination.max_episode_steps must be > 0 (or null for the task's limit)",
    )
    require(
        im.success_steps >= 1, f"imagination.success_steps must be >= 1, got {im.success_steps}"
    )
    require(im.halt_penalty >= 0, f"imagination.halt_penalty must be >= 0, got {im.halt_penalty}")
    if im.halt_quantile is not None:
        require(
            doc.get("ensemble") is not None,
            f"imagination.halt_quantile needs a world model with a disagreement ensemble; "
            f"{cfg.world_model} has none (train it with ensemble.n_heads >= 2)",
        )
        known = doc["meta"].get("disagreement_quantiles", {})
        require(
            str(im.halt_quantile) in known,
            f"imagination.halt_quantile={im.halt_quantile} is not a calibrated quantile of "
            f"{cfg.world_model}; choose one of {sorted(float(q) for q in known)}",
        )


def halt_threshold(cfg: DictConfig, meta: dict[str, Any]) -> float | None:
    """The disagreement above which imagined episodes halt (None: no halting)."""
    q = cfg.imagination.halt_quantile
    return None if q is None else float(meta["disagreement_quantiles"][str(q)])


def make_imagined_venv(cfg: DictConfig):
    """The training vector env of an offline run: the world model's imagined env."""
    im, task = cfg.imagination, cfg.task
    bundle = load_world_model(cfg.world_model)
    return make_imagined_vec_env(
        bundle,
        task.name,
        task.n_envs,
        task.n_obs_steps,
        task.n_action_steps,
        max_episode_steps=im.max_episode_steps,
        start_states=im.start_states,
        seed=cfg.seed,
        success_threshold=im.success_threshold,
        success_reward=im.success_reward,
        sample_latent=im.sample_latent,
        success_steps=im.success_steps,
        max_disagreement=halt_threshold(cfg, bundle.meta),
        halt_penalty=im.halt_penalty,
    )


def plot_imagination_vs_reality(path: Path, metrics: list[dict[str, Any]], task: str) -> None:
    """Imagined success and return per iteration next to real success at evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str):
        pts = [(r["iteration"], r[key]) for r in metrics if r.get(key) is not None]
        return list(zip(*pts, strict=True)) if pts else ([], [])

    fig, (ax_s, ax_r) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_s.plot(*series("success_rate"), label="imagined, of finished episodes")
    ax_s.plot(*series("successes_per_env"), label="imagined successes per env and rollout")
    if any(r.get("terminal_failures_per_env") for r in metrics):
        ax_s.plot(*series("terminal_failures_per_env"), label="imagined halts per env and rollout")
    ax_s.plot(*series("eval/success_rate"), marker="o", label="real simulator")
    per_env = [r["successes_per_env"] for r in metrics if r.get("successes_per_env") is not None]
    ax_s.set_ylim(-0.02, 1.02 * max([1.0, *per_env]))  # successes per env can exceed 1
    ax_s.set_ylabel("success rate / successes per env")
    ax_r.plot(*series("episode_return"), label="imagined return")
    ax_r.set_ylabel("episode return (imagined)")
    for ax in (ax_s, ax_r):
        ax.set_xlabel("fine-tuning iteration")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"offline fine-tuning in a world model on {task}: imagination vs reality")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _last(metrics: list[dict[str, Any]], key: str) -> Any:
    """The last value of ``key`` in the metric records (None when never logged)."""
    return next((r[key] for r in reversed(metrics) if key in r), None)


def finetune_offline(cfg: DictConfig) -> dict[str, Any]:
    """Run DPPO in imagination; returns the summary written to ``<run>/summary.json``."""
    if cfg.resume:
        cfg = resume_config(cfg)
    check_compatible(cfg)
    if cfg.out is None:
        cfg.out = str(default_run_path("finetune-offline", cfg.task.name))
    summary = finetune(cfg, make_venv=make_imagined_venv)
    run = Path(summary["run"])
    metrics = [json.loads(line) for line in (run / METRICS).read_text().splitlines() if line]
    figure = run / "plots" / "imagination_vs_reality.png"
    plot_imagination_vs_reality(figure, metrics, cfg.task.name)
    imagined = [r for r in metrics if r.get("success_rate") is not None]
    wm_meta = read_world_model_doc(cfg.world_model)["meta"]
    imagined_steps = summary.pop("env_steps")
    summary = {
        **summary,
        "online_env_steps": ONLINE_ENV_STEPS,
        "imagined_env_steps": imagined_steps,
        "world_model": str(Path(cfg.world_model).resolve()),
        "play_data": {
            "dataset": wm_meta.get("dataset"),
            "episodes": wm_meta.get("play_episodes"),
            "steps": wm_meta.get("play_steps"),
        },
        "halt_disagreement": halt_threshold(cfg, wm_meta),
        "imagined_success_rate": imagined[-1]["success_rate"] if imagined else None,
        "imagined_successes_per_env": _last(metrics, "successes_per_env"),
        "imagined_halts_per_env": _last(metrics, "terminal_failures_per_env"),
        "real_eval_episodes": cfg.eval_episodes,
        "real_success_per_eval": {
            r["iteration"]: r["eval/success_rate"] for r in metrics if "eval/success_rate" in r
        },
        "figure": str(figure),
    }
    write_json(run / "summary.json", summary)
    return summary
