"""World-model checkpoints: safetensors weights + JSON configs, written atomically, never unpickled.

A checkpoint folder holds ``world_model.json`` ({"world_model": WorldModelConfig, "classifier":
ClassifierConfig or null, "meta": {...}}), ``world_model.safetensors`` (RSSM, decoder and
normaliser), ``classifier.safetensors`` (when trained), ``ensemble.safetensors`` (the disagreement ensemble of
``world_models.ensemble``, when trained; its config under "ensemble") and ``start_states.safetensors``: the real
initial observations (N, D) of the play episodes that imagined episodes start from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from policies.checkpoint import CHECKPOINTS_DIR, LATEST, POLICY_JSON, atomic_dir
from world_models.classifier import ClassifierConfig, SuccessClassifier
from world_models.ensemble import EnsembleConfig, PriorEnsemble
from world_models.rssm import WorldModel, WorldModelConfig

WORLD_MODEL_JSON = "world_model.json"
WORLD_MODEL_WEIGHTS = "world_model.safetensors"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
ENSEMBLE_WEIGHTS = "ensemble.safetensors"
START_STATES = "start_states.safetensors"
START_OBS_KEY = "start_obs"


@dataclass
class WorldModelBundle:
    """A loaded checkpoint: the model (eval mode), its classifier (or None), start observations
    (N, D) float32, the metadata written at training time and the disagreement ensemble (or
    None)."""

    model: WorldModel
    classifier: SuccessClassifier | None
    start_obs: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None
    ensemble: PriorEnsemble | None = None


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_world_model(
    path: str | Path,
    model: WorldModel,
    start_obs: torch.Tensor,
    classifier: SuccessClassifier | None = None,
    meta: dict[str, Any] | None = None,
    ensemble: PriorEnsemble | None = None,
) -> Path:
    """Write the checkpoint folder ``path`` atomically (a crash leaves the previous one)."""
    path = Path(path)
    start_obs = torch.as_tensor(start_obs, dtype=torch.float32)
    if start_obs.ndim != 2 or start_obs.shape[1] != model.cfg.obs_dim:
        raise ValueError(
            f"start_obs must be (N, {model.cfg.obs_dim}), got {tuple(start_obs.shape)}"
        )
    tmp, commit = atomic_dir(path)
    save_file(_state(model), str(tmp / WORLD_MODEL_WEIGHTS))
    save_file({START_OBS_KEY: start_obs.contiguous()}, str(tmp / START_STATES))
    if classifier is not None:
        save_file(_state(classifier), str(tmp / CLASSIFIER_WEIGHTS))
    if ensemble is not None:
        save_file(_state(ensemble), str(tmp / ENSEMBLE_WEIGHTS))
    doc = {
        "world_model": model.cfg.to_dict(),
        "classifier": classifier.cfg.to_dict() if classifier is not None else None,
        "ensemble": ensemble.cfg.to_dict() if ensemble is not None else None,
        "meta": meta or {},
    }
    (tmp / WORLD_MODEL_JSON).write_text(json.dumps(doc, indent=2))
    commit()
    return path


def resolve_world_model(path: str | Path) -> Path:
    """Accept a run folder of ``dppo train-world-model`` or a checkpoint folder; return the folder."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    for folder in (p, p / CHECKPOINTS_DIR / LATEST):
        if (folder / WORLD_MODEL_JSON).is_file():
            return folder
        if (folder / POLICY_JSON).is_file():
            raise ValueError(
                f"{folder} is a policy checkpoint, not a world model; train one with "
                "`dppo train-world-model task=... dataset=<play data>`"
            )
    raise FileNotFoundError(
        f"no world model at {p}: expected a run folder of `dppo train-world-model` or a folder "
        f"with {WORLD_MODEL_JSON} + {WORLD_MODEL_WEIGHTS}"
    )


def read_world_model_doc(path: str | Path) -> dict[str, Any]:
    """The JSON document (configs + meta) of a checkpoint, without loading weights."""
    return json.loads((resolve_world_model(path) / WORLD_MODEL_JSON).read_text())


def load_world_model(path: str | Path, require_classifier: bool = True) -> WorldModelBundle:
    """Load a checkpoint; ``require_classifier`` makes a missing classifier an error."""
    folder = resolve_world_model(path)
    doc = json.loads((folder / WORLD_MODEL_JSON).read_text())
    model = WorldModel(WorldModelConfig(**doc["world_model"]))
    model.load_state_dict(load_file(str(folder / WORLD_MODEL_WEIGHTS), device="cpu"))
    classifier = None
    if doc.get("classifier") is not None:
        classifier = SuccessClassifier(ClassifierConfig(**doc["classifier"]))
        classifier.load_state_dict(load_file(str(folder / CLASSIFIER_WEIGHTS), device="cpu"))
        classifier.eval()
    elif require_classifier:
        raise ValueError(
            f"world model at {folder} has no success classifier (was its training interrupted "
            "before the classifier stage?)"
        )
    ensemble = None
    if doc.get("ensemble") is not None:
        ensemble = PriorEnsemble(EnsembleConfig(**doc["ensemble"]))
        ensemble.load_state_dict(load_file(str(folder / ENSEMBLE_WEIGHTS), device="cpu"))
        ensemble.eval()
    start_obs = load_file(str(folder / START_STATES), device="cpu")[START_OBS_KEY]
    return WorldModelBundle(
        model.eval(), classifier, start_obs, doc.get("meta", {}), folder, ensemble
    )
