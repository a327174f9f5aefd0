"""Checkpoints: safetensors weights + JSON config, written atomically, never unpickled.

A checkpoint folder holds ``policy.json`` (PolicyConfig + metadata) and ``model.safetensors``
(policy weights, normaliser statistics included). Training state (optimisers, schedulers, RNGs)
is stored by ``save_tree`` as ``<name>.safetensors`` + ``<name>.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from policies.diffusion import DiffusionPolicy, PolicyConfig

POLICY_JSON = "policy.json"
WEIGHTS = "model.safetensors"
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"


def atomic_dir(final: Path):
    """A fresh temporary sibling of ``final`` and a ``commit()`` that swaps it into place."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    def commit() -> None:
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)

    return tmp, commit


def save_policy(
    policy: DiffusionPolicy, path: str | Path, meta: dict[str, Any] | None = None
) -> Path:
    """Write the policy to folder ``path`` atomically (a crash leaves the previous one intact)."""
    path = Path(path)
    tmp, commit = atomic_dir(path)
    write_policy_files(policy, tmp, meta)
    commit()
    return path


def write_policy_files(
    policy: DiffusionPolicy, folder: Path, meta: dict[str, Any] | None = None
) -> None:
    """Write ``model.safetensors`` + ``policy.json`` into an existing folder (not atomic)."""
    state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    save_file(state, str(Path(folder) / WEIGHTS))
    doc = {"config": policy.cfg.to_dict(), "meta": meta or {}}
    (Path(folder) / POLICY_JSON).write_text(json.dumps(doc, indent=2))


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run folder, a checkpoint folder, or its ``model.safetensors``; return the folder."""
    p = Path(path)
    if p.is_file() and p.name == WEIGHTS:
        p = p.parent
    if (p / POLICY_JSON).is_file():
        return p
    if (p / CHECKPOINTS_DIR / LATEST / POLICY_JSON).is_file():
        return p / CHECKPOINTS_DIR / LATEST
    if p.is_file() and p.suffix in (".pt", ".pth", ".pkl", ".ckpt"):
        raise ValueError(
            f"{p}: pickled checkpoints are not loaded; expected a safetensors checkpoint"
        )
    raise FileNotFoundError(
        f"no checkpoint at {p}: expected a run folder with {CHECKPOINTS_DIR}/{LATEST}/, "
        f"a folder with {POLICY_JSON} + {WEIGHTS}, or the {WEIGHTS} file itself"
    )


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((resolve_checkpoint(path) / POLICY_JSON).read_text())


def load_policy(
    path: str | Path,
    *,
    task: str | None = None,
    obs_shapes: dict[str, tuple[int, ...]] | None = None,
    action_dim: int | None = None,
    device: str = "cpu",
) -> DiffusionPolicy:
    """Load a policy; with ``task`` / ``obs_shapes`` / ``action_dim`` given, mismatches raise."""
    folder = resolve_checkpoint(path)
    doc = json.loads((folder / POLICY_JSON).read_text())
    cfg = PolicyConfig(**doc["config"])
    problems = []
    if task is not None and cfg.task != task:
        problems.append(f"checkpoint was trained on task {cfg.task!r}, not {task!r}")
    if obs_shapes is not None:
        want = {k: list(v) for k, v in obs_shapes.items()}
        if want != cfg.obs_shapes:
            problems.append(f"observation spec {cfg.obs_shapes} does not match the task's {want}")
    if action_dim is not None and action_dim != cfg.action_dim:
        problems.append(f"action dim {cfg.action_dim} does not match the task's {action_dim}")
    if problems:
        raise ValueError(f"checkpoint {folder} does not fit: " + "; ".join(problems))
    policy = DiffusionPolicy(cfg)
    policy.load_state_dict(load_file(str(folder / WEIGHTS), device="cpu"))
    return policy.to(device)


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        int_keys = bool(obj) and all(isinstance(k, int) for k in obj)
        body = {str(k): _flatten(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
        return {"__intkeys__": body} if int_keys else body
    if isinstance(obj, list | tuple):
        return [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__intkeys__"}:
            return {int(k): _unflatten(v, tensors) for k, v in obj["__intkeys__"].items()}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_tree(folder: Path, name: str, tree: dict[str, Any]) -> None:
    """Save a nested dict of tensors and JSON scalars (optimiser/RNG state) without pickle."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(tree, name, tensors)
    save_file(tensors, str(Path(folder) / f"{name}.safetensors"))
    (Path(folder) / f"{name}.json").write_text(json.dumps(skeleton))


def load_tree(folder: Path, name: str) -> dict[str, Any]:
    tensors = load_file(str(Path(folder) / f"{name}.safetensors"))
    return _unflatten(json.loads((Path(folder) / f"{name}.json").read_text()), tensors)
