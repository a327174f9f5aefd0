"""One command from nothing to a fine-tuned policy on the default task."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dppo.config import load_config, require
from dppo.run_dir import write_json


def quickstart(cfg: DictConfig) -> dict[str, Any]:
    """demos -> pretrain -> finetune -> table + ``<out>/summary.json`` + learning curve."""
    from dppo.finetune import finetune
    from dppo.pretrain import pretrain
    from envs.demos import record_demos

    require(
        cfg.demo_episodes > 0 and cfg.pretrain_steps > 0 and cfg.finetune_iterations > 0,
        "demo_episodes, pretrain_steps and finetune_iterations must be > 0",
    )
    start = time.time()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; pick another out=")
    pre_cfg = load_config(
        "pretrain",
        [
            f"task={cfg.task}",
            f"out={out / 'pretrain'}",
            f"dataset={out / 'demos'}",
            f"train.steps={cfg.pretrain_steps}",
            f"train.seed={cfg.seed}",
            "train.eval_every=0",
            f"final_eval_episodes={cfg.eval_episodes}",
            *cfg.pretrain_overrides,
        ],
    )
    ft_cfg = load_config(
        "finetune",
        [
            f"task={cfg.task}",
            f"checkpoint={out / 'pretrain'}",
            f"out={out / 'finetune'}",
            f"algorithm.iterations={cfg.finetune_iterations}",
            f"seed={cfg.seed}",
            f"eval_episodes={cfg.eval_episodes}",
            *cfg.finetune_overrides,
        ],
    )
    _, demo_stats = record_demos(cfg.task, cfg.demo_episodes, out / "demos", seed=cfg.seed)
    pre = pretrain(pre_cfg)
    ft = finetune(ft_cfg)
    shutil.copy(Path(ft["run"]) / "plots" / "finetune.png", out / "learning_curve.png")
    summary = {
        "task": cfg.task,
        "demos": {
            "n_episodes": cfg.demo_episodes,
            "expert_success_rate": demo_stats["expert_success_rate"],
        },
        "pretrain": {
            "success_rate": pre["success_rate"],
            "steps": cfg.pretrain_steps,
            "wall_time_s": pre["wall_time_s"],
            "run": pre["run"],
        },
        "finetune": {
            "success_rate": ft["success_rate"],
            "env_steps": ft["env_steps"],
            "iterations": ft["iterations"],
            "wall_time_s": ft["wall_time_s"],
            "run": ft["run"],
        },
        "eval_episodes": cfg.eval_episodes,
        "wall_time_s": round(time.time() - start, 1),
        "learning_curve": str(out / "learning_curve.png"),
    }
    write_json(out / "summary.json", summary)
    print_table(summary)
    return {"summary": str(out / "summary.json"), "wall_time_s": summary["wall_time_s"]}


def print_table(s: dict[str, Any]) -> None:
    rows = [
        ("expert demos (noisy)", s["demos"]["expert_success_rate"], "-"),
        ("pre-trained (imitation)", s["pretrain"]["success_rate"], "-"),
        ("fine-tuned (DPPO)", s["finetune"]["success_rate"], s["finetune"]["env_steps"]),
    ]
    print(f"\n{s['task']}: success over {s['eval_episodes']} episodes")
    print(f"{'stage':<26}{'success':>9}{'env steps':>12}")
    for name, rate, steps in rows:
        print(f"{name:<26}{rate:>9.2f}{steps!s:>12}")
    print(f"wall time {s['wall_time_s']:.0f} s\n")
