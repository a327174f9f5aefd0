"""Compose hydra configs from ``cfg/`` for each subcommand, with clear errors for bad overrides."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CFG_DIR = Path(os.environ.get("DPPO_CFG_DIR", Path(__file__).resolve().parents[1] / "cfg"))

ALIASES: dict[str, dict[str, str]] = {
    "eval": {"steps": "sampler.steps", "eta": "sampler.eta", "task": "eval_task"},
    "pretrain": {"steps": "train.steps"},
    "finetune": {"n_envs": "task.n_envs", "iterations": "algorithm.iterations"},
    "finetune_offline": {"n_envs": "task.n_envs", "iterations": "algorithm.iterations"},
    "bench_guidance": {"task": "eval_task"},
}
"""Short override names accepted per command, mapped to their full config keys."""


class ConfigError(ValueError):
    """A config that cannot be composed or fails validation; raised before any work starts."""


def _expand_aliases(command: str, overrides: list[str]) -> list[str]:
    table = ALIASES.get(command, {})
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        out.append(f"{table.get(key, key)}={value}")
    return out


def load_config(command: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose ``cfg/<command>.yaml`` (dashes read as underscores) with ``key=value`` overrides."""
    name = config_name(command)
    if not (CFG_DIR / f"{name}.yaml").is_file():
        raise ConfigError(f"no config for command {command!r} in {CFG_DIR}")
    expanded = _expand_aliases(name, list(overrides))
    try:
        with initialize_config_dir(config_dir=str(CFG_DIR), version_base=None):
            cfg = compose(config_name=name, overrides=expanded)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_explain(command, exc)) from None
    OmegaConf.set_struct(cfg, True)
    return cfg


def config_name(command: str) -> str:
    """``robot-sim`` -> ``robot_sim``: the yaml file and the function share this name."""
    return command.replace("-", "_")


def _explain(command: str, exc: Exception) -> str:
    msg = str(exc).strip().split("\nConfig search path")[0]
    msg = "\n".join(line for line in msg.splitlines() if not line.startswith("To append"))
    if "not in struct" in msg or "Could not override" in msg:
        cfg_keys = ", ".join(sorted(_top_keys(config_name(command))))
        msg += f"\nvalid top-level keys for {command!r}: {cfg_keys}"
        if config_name(command) in ALIASES:
            msg += f"; short names: {', '.join(ALIASES[config_name(command)])}"
    return f"bad config for {command!r}: {msg}"


def _top_keys(command: str) -> list[str]:
    with initialize_config_dir(config_dir=str(CFG_DIR), version_base=None):
        return list(compose(config_name=command).keys())


def require(condition: bool, message: str) -> None:
    """Validation helper: raise ConfigError(message) unless ``condition``."""
    if not condition:
        raise ConfigError(message)


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
