"""DynaGuide: steer a diffusion policy toward goal observations with a learned dynamics model.

The dynamics model f(obs, chunk) predicts the embedding z of the observation ``future_steps``
control steps after the chunk's anchor t (obs t-To+1..t, actions t-To+1..t-To+Tp, the policy's
chunk convention). For state observations the embedding is the normalised observation vector
(keys in sorted order, flattened), restricted to ``target_dims`` when given; an image key would
add a frozen encoder here. f predicts the change from the current embedding.

Guidance metric, to increase, over goal embeddings g_i and optional negatives b_j:

    d(a) = logsumexp_i(-||z(s, a) - g_i|| / alpha) - logsumexp_j(-||z(s, a) - b_j|| / alpha)

applied by ``GradientGuidance`` at every denoising step as
eps' = eps - sqrt(1 - alpha-bar_k) * s * grad_x d, optionally with repeated (predict, guide, step)
passes at the same level (``repeats``).

Goal examples (``goals`` / ``negatives``) are observations in env units, embedded with the model:

- a file: ``.npy`` (N, D) flattened observation vectors (or one (D,) vector); ``.npz`` one
  array per observation key (N, *shape), or a single (N, D) array; ``.json`` a list of vectors or
  {key: list}.
- a dataset spec ``<outcome>:<value>`` (``=`` works too where the shell allows): the final
  observation of every dataset episode whose outcome equals the value. Outcomes (``OUTCOMES``):
  ``success`` (0 or 1: the episode's success flag) and ``goal_reached`` (tasks with several goals,
  e.g. ``point_reach_two_goals``: the index of the goal the episode stopped at, -1 for none).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from policies.checkpoint import CHECKPOINTS_DIR, LATEST, POLICY_JSON, atomic_dir
from policies.diffusion import DiffusionPolicy
from policies.guidance import GradientGuidance
from policies.normalizer import ACTION_KEY, Normalizer

DYNAMICS_JSON = "dynamics.json"
WEIGHTS = "model.safetensors"
GOAL_FILE_SUFFIXES = (".npy", ".npz", ".json")
DEFAULT_ALPHA = 0.3
"""Temperature in embedding distance units: DynaGuide's ~30 suits DinoV2 features; distances
between normalised state observations are O(1)."""


@dataclass
class DynamicsConfig:
    """Everything needed to rebuild a dynamics model (saved as JSON next to its weights).

    To = ``n_obs_steps`` and Tp = ``horizon`` must match the policy it guides. ``target_dims``
    index the flattened observation vector (sorted keys); None keeps every dimension.
    """

    task: str
    obs_shapes: dict[str, list[int]]
    action_dim: int
    n_obs_steps: int = 1
    horizon: int = 4
    future_steps: int = 40
    target_dims: list[int] | None = None
    hidden_dim: int = 256
    depth: int = 3

    def __post_init__(self):
        self.obs_shapes = {k: [int(d) for d in v] for k, v in self.obs_shapes.items()}
        if min(self.n_obs_steps, self.horizon, self.future_steps, self.depth, self.hidden_dim) < 1:
            raise ValueError("n_obs_steps, horizon, future_steps, depth, hidden_dim must be >= 1")
        if self.target_dims is not None:
            self.target_dims = [int(d) for d in self.target_dims]
            bad = [d for d in self.target_dims if not 0 <= d < self.obs_dim]
            if bad or not self.target_dims:
                raise ValueError(
                    f"target_dims {self.target_dims} must be non-empty indices into "
                    f"the flattened observation of dimension {self.obs_dim}"
                )

    @property
    def obs_keys(self) -> list[str]:
        return sorted(self.obs_shapes)

    @property
    def obs_dim(self) -> int:
        return sum(math.prod(s) for s in self.obs_shapes.values())

    @property
    def embed_dim(self) -> int:
        return self.obs_dim if self.target_dims is None else len(self.target_dims)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DynamicsModel(nn.Module):
    """Predicts the future observation embedding (B, Dz) from obs (B, To, ...) and a chunk.

    Inputs are raw (env units); the model's own normaliser (fitted on its training data, saved
    with the weights) maps them to [-1, 1].
    """

    def __init__(self, cfg: DynamicsConfig):
        super().__init__()
        self.cfg = cfg
        shapes = {k: tuple(v) for k, v in cfg.obs_shapes.items()}
        shapes[ACTION_KEY] = (cfg.action_dim,)
        self.normalizer = Normalizer(shapes)
        in_dim = cfg.n_obs_steps * cfg.obs_dim + cfg.horizon * cfg.action_dim
        layers: list[nn.Module] = [nn.Linear(in_dim, cfg.hidden_dim), nn.Mish()]
        for _ in range(cfg.depth - 1):
            layers += [nn.Linear(cfg.hidden_dim, cfg.hidden_dim), nn.Mish()]
        layers.append(nn.Linear(cfg.hidden_dim, cfg.embed_dim))
        self.net = nn.Sequential(*layers)
        index = cfg.target_dims if cfg.target_dims is not None else range(cfg.obs_dim)
        self.register_buffer("target_index", torch.tensor(list(index)), persistent=False)

    def _flat_norm(self, obs: dict[str, torch.Tensor], lead: int) -> torch.Tensor:
        """Normalised observations {key: (*lead dims, *shape)} -> (*lead dims, sum of dims)."""
        parts = []
        for k in self.cfg.obs_keys:
            v = self.normalizer.normalize(k, obs[k])
            parts.append(v.flatten(lead))
        return torch.cat(parts, dim=-1)

    def embed(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Single-step raw observations {key: (N, *shape)} -> embeddings (N, Dz)."""
        return self._flat_norm(obs, 1)[:, self.target_index]

    def forward(self, obs: dict[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        """obs {key: (B, To, *shape)} and actions (B, Tp, Da), raw -> predicted z (B, Dz)."""
        flat = self._flat_norm(obs, 2)  # (B, To, D)
        current = flat[:, -1, self.target_index]
        act = self.normalizer.normalize(ACTION_KEY, actions).flatten(1)
        return current + self.net(torch.cat([flat.flatten(1), act], dim=-1))

    def loss(
        self, obs: dict[str, torch.Tensor], actions: torch.Tensor, future: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """MSE between predicted and true embeddings of the future observations {key: (B, ...)}."""
        return nn.functional.mse_loss(self(obs, actions), self.embed(future))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def save_dynamics(
    model: DynamicsModel, path: str | Path, meta: dict[str, Any] | None = None
) -> Path:
    """Write ``dynamics.json`` + ``model.safetensors`` to folder ``path`` atomically."""
    path = Path(path)
    tmp, commit = atomic_dir(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS))
    (tmp / DYNAMICS_JSON).write_text(
        json.dumps({"config": model.cfg.to_dict(), "meta": meta or {}}, indent=2)
    )
    commit()
    return path


def resolve_dynamics(path: str | Path) -> Path:
    """Accept a run folder, a checkpoint folder or its weights file; return the folder."""
    p = Path(path)
    if p.is_file() and p.name == WEIGHTS:
        p = p.parent
    for folder in (p, p / CHECKPOINTS_DIR / LATEST):
        if (folder / DYNAMICS_JSON).is_file():
            return folder
        if (folder / POLICY_JSON).is_file():
            raise ValueError(
                f"{folder} is a policy checkpoint, not a dynamics model; train one "
                "with `dppo train-dynamics task=... dataset=...`"
            )
    raise FileNotFoundError(
        f"no dynamics model at {p}: expected a run folder of `dppo "
        f"train-dynamics` or a folder with {DYNAMICS_JSON} + {WEIGHTS}"
    )


def load_dynamics(path: str | Path) -> tuple[DynamicsModel, dict[str, Any]]:
    """(model in eval mode, metadata such as the training dataset)."""
    folder = resolve_dynamics(path)
    doc = json.loads((folder / DYNAMICS_JSON).read_text())
    model = DynamicsModel(DynamicsConfig(**doc["config"]))
    model.load_state_dict(load_file(str(folder / WEIGHTS), device="cpu"))
    return model.eval(), doc.get("meta", {})


def check_compatible(dynamics: DynamicsConfig, policy: DiffusionPolicy) -> None:
    """Raise a ValueError listing every way the dynamics model does not fit the policy."""
    p = policy.cfg
    problems = []
    if dynamics.obs_shapes != p.obs_shapes:
        problems.append(f"observations {dynamics.obs_shapes} vs the policy's {p.obs_shapes}")
    for name in ("action_dim", "n_obs_steps", "horizon"):
        if getattr(dynamics, name) != getattr(p, name):
            problems.append(f"{name} {getattr(dynamics, name)} vs the policy's {getattr(p, name)}")
    if problems:
        raise ValueError("the dynamics model does not fit the policy: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# The guidance metric
# --------------------------------------------------------------------------------------------
def dynaguide_metric(
    z: torch.Tensor,
    goals: torch.Tensor,
    negatives: torch.Tensor | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> torch.Tensor:
    """d = logsumexp_i(-||z - g_i|| / alpha) - logsumexp_j(-||z - b_j|| / alpha): (B,).

    z: (B, Dz); goals: (N, Dz); negatives: (M, Dz) or None.
    """
    d = torch.logsumexp(-_distances(z, goals) / alpha, dim=1)
    if negatives is not None and len(negatives):
        d = d - torch.logsumexp(-_distances(z, negatives) / alpha, dim=1)
    return d


def _distances(z: torch.Tensor, examples: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (B, N), computed directly (exact near 0, zero gradient at 0)."""
    return torch.cdist(z, examples, compute_mode="donot_use_mm_for_euclid_dist")


class DynaGuideObjective:
    """J(actions, obs) = d(f(obs, actions)); actions (B, Tp, Da) and obs in env units."""

    def __init__(
        self,
        model: DynamicsModel,
        goals: torch.Tensor,
        negatives: torch.Tensor | None = None,
        alpha: float = DEFAULT_ALPHA,
    ):
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        dz = model.cfg.embed_dim
        for name, g in (("goal", goals), ("negative", negatives)):
            if g is not None and (g.dim() != 2 or g.shape[1] != dz or not len(g)):
                raise ValueError(
                    f"{name} embeddings have shape {tuple(g.shape)}; the dynamics "
                    f"model needs (N >= 1, {dz})"
                )
        self.model = model.requires_grad_(False)
        self.goals = goals
        self.negatives = negatives
        self.alpha = float(alpha)

    def __call__(self, actions: torch.Tensor, obs: dict[str, torch.Tensor] | None) -> torch.Tensor:
        if obs is None:
            raise ValueError("DynaGuide needs the observations: pass obs to the sampler's run")
        if self.goals.device != actions.device:
            self.model.to(actions.device)
            self.goals = self.goals.to(actions.device)
            self.negatives = None if self.negatives is None else self.negatives.to(actions.device)
        z = self.model(obs, actions)
        return dynaguide_metric(
            z,
            self.goals.to(z),
            None if self.negatives is None else self.negatives.to(z),
            self.alpha,
        )


class DynaGuide(GradientGuidance):
    """``GradientGuidance`` whose objective is a ``DynaGuideObjective``."""

    objective: DynaGuideObjective

    def describe(self) -> dict[str, Any]:
        o = self.objective
        n_neg = 0 if o.negatives is None else len(o.negatives)
        return {
            **super().describe(),
            "name": "dynaguide",
            "alpha": o.alpha,
            "n_goals": len(o.goals),
            "n_negatives": n_neg,
        }


# --------------------------------------------------------------------------------------------
# Goal examples
# --------------------------------------------------------------------------------------------
def _episode_success(dataset) -> np.ndarray:
    if dataset.success is None:
        raise ValueError(f"dataset {dataset.path} stores no success flags")
    return np.array(
        [
            dataset.success[s:e].any()
            for s, e in zip(dataset.episode_starts, dataset.episode_ends, strict=True)
        ],
        dtype=int,
    )


def nearest_goal(states: np.ndarray) -> np.ndarray:
    """Index (N,) of the goal nearest the agent for point_reach states (N, D) with >= 2 goals."""
    from envs.point_reach import GOALS_START, POS, goal_slice

    n_goals = (states.shape[1] - GOALS_START) // 2
    if n_goals < 2:
        raise ValueError(
            f"goal outcomes need a point_reach task with several goals, got states "
            f"of dimension {states.shape[1]} ({n_goals} goal)"
        )
    dists = [
        np.linalg.norm(states[:, POS] - states[:, goal_slice(i)], axis=1) for i in range(n_goals)
    ]
    return np.stack(dists, axis=1).argmin(axis=1)


def _goal_reached(dataset) -> np.ndarray:
    """Index of the goal each episode stopped at (nearest goal of a successful episode), or -1."""
    from envs.registry import get_task

    task = dataset.meta.get("task")
    if task is None or get_task(task).family != "point":
        raise ValueError(
            f"outcome goal_reached is defined for the point_reach tasks, "
            f"not for dataset task {task!r}"
        )
    final = dataset.obs[get_task(task).obs_key][dataset.episode_ends - 1]
    return np.where(_episode_success(dataset).astype(bool), nearest_goal(final), -1)


OUTCOMES: dict[str, Callable[[Any], np.ndarray]] = {
    "success": _episode_success,
    "goal_reached": _goal_reached,
}
"""Per-episode outcome labels (E,) ints of a ``DemoDataset``, for ``<outcome>:<value>`` specs."""


def parse_goal_spec(source: str) -> tuple[str, int] | None:
    """``"goal_reached:0"`` -> ("goal_reached", 0); None when ``source`` is not a spec."""
    for sep in (":", "="):
        name, found, value = str(source).partition(sep)
        if found and name in OUTCOMES:
            try:
                return name, int(value)
            except ValueError:
                raise ValueError(f"goal spec {source!r}: the value must be an integer") from None
    return None


def _split_flat(flat: np.ndarray, cfg: DynamicsConfig, origin: str) -> dict[str, np.ndarray]:
    flat = np.atleast_2d(np.asarray(flat, dtype=np.float32))
    if flat.ndim != 2 or flat.shape[1] != cfg.obs_dim:
        raise ValueError(
            f"goal examples from {origin} have shape {flat.shape}: the dynamics model "
            f"expects (N, {cfg.obs_dim}) observations ({cfg.obs_shapes})"
        )
    out, start = {}, 0
    for k in cfg.obs_keys:
        size = math.prod(cfg.obs_shapes[k])
        out[k] = flat[:, start : start + size].reshape(-1, *cfg.obs_shapes[k])
        start += size
    return out


def _check_keyed(obs: dict[str, Any], cfg: DynamicsConfig, origin: str) -> dict[str, np.ndarray]:
    missing = [k for k in cfg.obs_keys if k not in obs]
    if missing:
        raise ValueError(
            f"goal examples from {origin} lack observation key(s) {missing}; "
            f"the dynamics model expects {cfg.obs_shapes}"
        )
    out = {}
    for k in cfg.obs_keys:
        arr = np.asarray(obs[k], dtype=np.float32)
        shape = tuple(cfg.obs_shapes[k])
        if arr.shape == shape:
            arr = arr[None]
        if arr.shape[1:] != shape:
            raise ValueError(
                f"goal examples from {origin}: key {k!r} has shape {arr.shape}; the "
                f"dynamics model expects (N, {', '.join(map(str, shape))})"
            )
        out[k] = arr
    return out


def _load_goal_file(path: Path, cfg: DynamicsConfig) -> dict[str, np.ndarray]:
    if path.suffix == ".npy":
        return _split_flat(np.load(path, allow_pickle=False), cfg, str(path))
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        if set(cfg.obs_keys) <= set(arrays):
            return _check_keyed(arrays, cfg, str(path))
        if len(arrays) == 1:
            return _split_flat(next(iter(arrays.values())), cfg, str(path))
        raise ValueError(
            f"{path}: arrays {sorted(arrays)} are neither the observation keys "
            f"{cfg.obs_keys} nor a single (N, {cfg.obs_dim}) array"
        )
    doc = json.loads(path.read_text())
    if isinstance(doc, dict):
        return _check_keyed(doc, cfg, str(path))
    return _split_flat(np.asarray(doc, dtype=np.float32), cfg, str(path))


def goal_observations(
    source: str, cfg: DynamicsConfig, dataset: str | Path | None = None
) -> dict[str, np.ndarray]:
    """Goal observations {key: (N, *shape)} in env units from a file or a dataset spec."""
    path = Path(str(source))
    if path.suffix in GOAL_FILE_SUFFIXES and path.is_file():
        return _load_goal_file(path, cfg)
    spec = parse_goal_spec(source)
    if spec is None:
        raise ValueError(
            f"goals {source!r} is neither an existing {'/'.join(GOAL_FILE_SUFFIXES)} "
            f"file nor a dataset spec <outcome>:<value> with outcome in "
            f"{', '.join(OUTCOMES)} (e.g. goal_reached:0)"
        )
    if dataset is None:
        raise ValueError(
            f"goal spec {source!r} needs a dataset: set guidance.dataset (the "
            "dynamics model records none)"
        )
    from envs.dataset import DemoDataset

    demos = DemoDataset(dataset, obs_keys={k: tuple(v) for k, v in cfg.obs_shapes.items()})
    outcome, value = spec
    chosen = np.flatnonzero(OUTCOMES[outcome](demos) == value)
    if not len(chosen):
        raise ValueError(f"no episode of {dataset} has {outcome} = {value}")
    last = demos.episode_ends[chosen] - 1
    return {k: v[last] for k, v in demos.obs.items()}


def goal_embeddings(
    model: DynamicsModel, source: str, dataset: str | Path | None = None
) -> torch.Tensor:
    """Embeddings (N, Dz) of the goal examples named by ``source`` (see the module docstring)."""
    obs = goal_observations(source, model.cfg, dataset)
    with torch.no_grad():
        return model.embed({k: torch.as_tensor(v) for k, v in obs.items()})


def build_dynaguide(
    policy: DiffusionPolicy,
    dynamics: str,
    goals: str,
    negatives: str | None = None,
    dataset: str | None = None,
    strength: float = 1.0,
    alpha: float = DEFAULT_ALPHA,
    repeats: int = 1,
    schedule: str = "constant",
    guide_on: str = "x",
) -> GradientGuidance:
    """The DynaGuide hook for ``policy``: a dynamics checkpoint and goal (negative) examples.

    ``dataset`` serves ``<outcome>:<value>`` specs; None uses the dynamics model's training data.
    """
    model, meta = load_dynamics(dynamics)
    check_compatible(model.cfg, policy)
    dataset = dataset if dataset is not None else meta.get("dataset")
    positive = goal_embeddings(model, goals, dataset)
    negative = goal_embeddings(model, negatives, dataset) if negatives else None
    objective = DynaGuideObjective(model, positive, negative, alpha)
    return DynaGuide(
        objective,
        strength,
        schedule=schedule,
        normalizer=policy.normalizer,
        units="env",
        guide_on=guide_on,
        repeats=repeats,
    )
