"""Demonstration datasets in Diffusion Policy's zarr layout, and training windows over them.

On-disk layout (zarr v2 directory store, readable by Diffusion Policy's ``ReplayBuffer``)::

    data/<obs key>      (N, *shape)  observations, concatenated over episodes
    data/action         (N, Da)      float32
    data/reward         (N,)         float32, optional
    data/success        (N,)         bool, optional (per step)
    meta/episode_ends   (E,)         int64, cumulative episode ends
    .zattrs                          JSON metadata (task, obs key shapes, action dim, ...)

Step t of an episode pairs the observation seen at t with the action taken at t.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

DATA_GROUP, META_GROUP = "data", "meta"
ACTION_KEY, REWARD_KEY, SUCCESS_KEY, EPISODE_ENDS_KEY = (
    "action",
    "reward",
    "success",
    "episode_ends",
)
RESERVED_KEYS = (ACTION_KEY, REWARD_KEY, SUCCESS_KEY)
TIME_CHUNK = 1000  # zarr chunk length along time
FORMAT_VERSION = 1

Episode = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _to_json(value: Any, where: str = "meta") -> Any:
    """``value`` with numpy scalars / arrays turned into Python ones; TypeError if not JSON-able."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string")
            out[k] = _to_json(v, f"{where}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-serialisable")


def _validate_episodes(episodes: Sequence[Episode]) -> tuple[dict[str, tuple[int, ...]], int]:
    """Checks shapes and keys; returns ({obs key: per-step shape}, action dim)."""
    if not episodes:
        raise ValueError("no episodes to write")
    first = episodes[0]
    obs_shapes = {k: tuple(np.shape(v)[1:]) for k, v in first["obs"].items()}
    clashes = set(obs_shapes) & set(RESERVED_KEYS)
    if clashes:
        raise ValueError(f"observation keys {sorted(clashes)} clash with reserved data keys")
    action_dim = int(np.shape(first[ACTION_KEY])[1])
    optional = {k for k in (REWARD_KEY, SUCCESS_KEY) if k in first}
    for i, ep in enumerate(episodes):
        length = len(ep[ACTION_KEY])
        if length == 0:
            raise ValueError(f"episode {i} is empty")
        if set(ep["obs"]) != set(obs_shapes):
            raise ValueError(f"episode {i}: obs keys {sorted(ep['obs'])} != {sorted(obs_shapes)}")
        for key, shape in obs_shapes.items():
            found = np.shape(ep["obs"][key])
            if found != (length, *shape):
                raise ValueError(
                    f"episode {i}: obs {key!r} expected shape {(length, *shape)}, found {found}"
                )
        if np.shape(ep[ACTION_KEY]) != (length, action_dim):
            raise ValueError(
                f"episode {i}: action expected shape {(length, action_dim)}, "
                f"found {np.shape(ep[ACTION_KEY])}"
            )
        if {k for k in (REWARD_KEY, SUCCESS_KEY) if k in ep} != optional:
            raise ValueError(f"episode {i}: reward/success present in some episodes only")
        for key in optional:
            if np.shape(ep[key]) != (length,):
                raise ValueError(
                    f"episode {i}: {key} expected shape {(length,)}, found {np.shape(ep[key])}"
                )
    return obs_shapes, action_dim


def _write_array(group: zarr.Group, name: str, data: np.ndarray) -> None:
    chunks = (min(len(data), TIME_CHUNK), *data.shape[1:])
    group.create_dataset(name, data=data, chunks=chunks)


def write_dataset(
    path: str | os.PathLike,
    episodes: Sequence[Episode],
    meta: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write ``episodes`` to the zarr directory ``path`` atomically and return the path.

    Each episode is ``{"obs": {key: (T, *shape)}, "action": (T, Da)}`` with optional ``"reward"``
    (T,) and ``"success"`` (T,). ``meta`` (JSON-serialisable; numpy scalars are converted) goes to
    the root attrs together with the derived ``obs_keys`` ({key: shape}), ``action_dim``,
    ``n_episodes``, ``episode_success`` (per episode, when success is given) and
    ``format_version``. The data is written into ``<path>.tmp-<pid>`` and renamed into place, so a
    failure leaves nothing at ``path`` (nor a changed dataset when overwriting).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    obs_shapes, action_dim = _validate_episodes(episodes)
    derived: dict[str, Any] = {
        "obs_keys": {k: list(s) for k, s in obs_shapes.items()},
        "action_dim": action_dim,
        "n_episodes": len(episodes),
        "format_version": FORMAT_VERSION,
    }
    if SUCCESS_KEY in episodes[0]:
        derived["episode_success"] = [bool(np.any(ep[SUCCESS_KEY])) for ep in episodes]
    conflicts = [k for k in derived if k in meta and _to_json(meta[k]) != derived[k]]
    if conflicts:
        raise ValueError(f"meta entries {conflicts} contradict the episodes")

    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        root = zarr.open_group(str(tmp), mode="w")
        data = root.create_group(DATA_GROUP)
        for key in obs_shapes:
            _write_array(data, key, np.concatenate([np.asarray(ep["obs"][key]) for ep in episodes]))
        actions = np.concatenate([np.asarray(ep[ACTION_KEY], np.float32) for ep in episodes])
        _write_array(data, ACTION_KEY, actions)
        if REWARD_KEY in episodes[0]:
            rewards = np.concatenate([np.asarray(ep[REWARD_KEY], np.float32) for ep in episodes])
            _write_array(data, REWARD_KEY, rewards)
        if SUCCESS_KEY in episodes[0]:
            successes = np.concatenate([np.asarray(ep[SUCCESS_KEY], bool) for ep in episodes])
            _write_array(data, SUCCESS_KEY, successes)
        ends = np.cumsum([len(ep[ACTION_KEY]) for ep in episodes]).astype(np.int64)
        root.create_group(META_GROUP).create_dataset(EPISODE_ENDS_KEY, data=ends)
        root.attrs.update(_to_json({**meta, **derived}))
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _move_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
        return
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
class DemoDataset:
    """A demonstration dataset loaded into memory (numpy).

    Args:
        path: zarr directory in the layout of the module docstring (ours or Diffusion Policy's).
        obs_keys: which observation keys to load: None (all), a list of keys, or
            ``{key: per-step shape}`` to also check shapes. A missing key or a wrong shape raises
            a ValueError naming the key with the expected and found shapes.
        action_dim: expected action dimension Da (checked when given).

    Attributes: ``obs`` {key: (N, *shape)}, ``action`` (N, Da), ``reward`` / ``success`` (N,) or
    None, ``episode_ends`` (E,), ``meta`` (the JSON attrs).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        obs_keys: Sequence[str] | Mapping[str, Sequence[int]] | None = None,
        action_dim: int | None = None,
    ):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no dataset at {self.path}")
        root = zarr.open_group(str(self.path), mode="r")
        if DATA_GROUP not in root or META_GROUP not in root:
            raise ValueError(f"{self.path}: expected groups 'data' and 'meta' (zarr DP layout)")
        data = root[DATA_GROUP]
        self.meta: dict[str, Any] = root.attrs.asdict()
        available = {
            k: tuple(data[k].shape[1:]) for k in data.array_keys() if k not in RESERVED_KEYS
        }
        if obs_keys is None:
            wanted: dict[str, tuple[int, ...] | None] = dict.fromkeys(available)
        elif isinstance(obs_keys, Mapping):
            wanted = {k: tuple(s) for k, s in obs_keys.items()}
        else:
            wanted = dict.fromkeys(obs_keys)
        for key, shape in wanted.items():
            if key not in available:
                raise ValueError(
                    f"{self.path}: obs key {key!r} (expected shape {shape}) not found; "
                    f"found keys {available}"
                )
            if shape is not None and available[key] != shape:
                raise ValueError(
                    f"{self.path}: obs key {key!r}: expected shape {shape}, found {available[key]}"
                )
        if ACTION_KEY not in data:
            raise ValueError(f"{self.path}: no data/action array")
        found_dim = int(data[ACTION_KEY].shape[1])
        if action_dim is not None and found_dim != action_dim:
            raise ValueError(
                f"{self.path}: action: expected dim {action_dim}, found {found_dim} "
                f"(shape {data[ACTION_KEY].shape})"
            )

        self.obs = {k: np.asarray(data[k][:]) for k in wanted}
        self.action = np.asarray(data[ACTION_KEY][:], dtype=np.float32)
        self.reward = np.asarray(data[REWARD_KEY][:]) if REWARD_KEY in data else None
        self.success = np.asarray(data[SUCCESS_KEY][:], dtype=bool) if SUCCESS_KEY in data else None
        self.episode_ends = np.asarray(root[META_GROUP][EPISODE_ENDS_KEY][:], dtype=np.int64)
        self._check_lengths()

    def _check_lengths(self) -> None:
        n = len(self.action)
        ends = self.episode_ends
        if len(ends) == 0 or ends[-1] != n or np.any(np.diff(ends) <= 0) or ends[0] <= 0:
            raise ValueError(
                f"{self.path}: meta/episode_ends must increase strictly up to {n} steps, "
                f"found {ends[:3]}...{ends[-3:]}"
            )
        arrays = {**self.obs, REWARD_KEY: self.reward, SUCCESS_KEY: self.success}
        for key, arr in arrays.items():
            if arr is not None and len(arr) != n:
                raise ValueError(f"{self.path}: {key} has {len(arr)} steps, action has {n}")

    @property
    def obs_keys(self) -> dict[str, tuple[int, ...]]:
        """{key: per-step shape} of the loaded observations."""
        return {k: tuple(v.shape[1:]) for k, v in self.obs.items()}

    @property
    def action_dim(self) -> int:
        return int(self.action.shape[1])

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def n_steps(self) -> int:
        return len(self.action)

    @property
    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], self.episode_ends[:-1]])

    def episode(self, i: int) -> Episode:
        """Episode ``i``: ``{"obs": {key: (T, *shape)}, "action": (T, Da)}`` (+ reward, success)."""
        if not -self.n_episodes <= i < self.n_episodes:
            raise IndexError(f"episode {i} out of range ({self.n_episodes} episodes)")
        i %= self.n_episodes
        sl = slice(int(self.episode_starts[i]), int(self.episode_ends[i]))
        ep: Episode = {"obs": {k: v[sl] for k, v in self.obs.items()}, ACTION_KEY: self.action[sl]}
        if self.reward is not None:
            ep[REWARD_KEY] = self.reward[sl]
        if self.success is not None:
            ep[SUCCESS_KEY] = self.success[sl]
        return ep


class WindowDataset(Dataset):
    """Training windows over a ``DemoDataset`` in the chunk convention of Diffusion Policy.

    The window anchored at step t of an episode holds observations t-To+1..t and actions
    t-To+1..t-To+Tp (Tp = ``horizon``). Indices before the episode start take the episode's first
    element, indices after its end take its last action. Windows never cross episodes.

    Anchors: every step t of every episode when ``pad_after`` is None; otherwise exactly Diffusion
    Policy's ``SequenceSampler`` (pad_before = To-1, window starts up to L - Tp + pad_after,
    usually pad_after = Ta-1).

    Item: ``{"obs": {key: float32 (To, *shape)}, "action": float32 (Tp, Da)}`` (torch tensors).
    """

    def __init__(
        self,
        demos: DemoDataset,
        n_obs_steps: int,
        horizon: int,
        pad_after: int | None = None,
    ):
        if not 1 <= n_obs_steps <= horizon:
            raise ValueError(f"need 1 <= n_obs_steps <= horizon, got {n_obs_steps}, {horizon}")
        self.demos = demos
        self.n_obs_steps = n_obs_steps
        self.horizon = horizon
        obs_idx, act_idx = [], []
        for start, end in zip(demos.episode_starts, demos.episode_ends, strict=True):
            length = int(end - start)
            last_anchor = length - 1
            if pad_after is not None:
                last_anchor = min(last_anchor, length - horizon + pad_after + n_obs_steps - 1)
            anchors = np.arange(last_anchor + 1)
            obs_offsets = anchors[:, None] + np.arange(-n_obs_steps + 1, 1)
            act_offsets = anchors[:, None] + np.arange(-n_obs_steps + 1, horizon - n_obs_steps + 1)
            obs_idx.append(start + np.clip(obs_offsets, 0, length - 1))
            act_idx.append(start + np.clip(act_offsets, 0, length - 1))
        self._obs_idx = np.concatenate(obs_idx).astype(np.int64)
        self._act_idx = np.concatenate(act_idx).astype(np.int64)

    def __len__(self) -> int:
        return len(self._obs_idx)

    def __getitem__(self, index: int) -> dict[str, Any]:
        oi, ai = self._obs_idx[index], self._act_idx[index]
        obs = {
            k: torch.from_numpy(np.asarray(v[oi], dtype=np.float32))
            for k, v in self.demos.obs.items()
        }
        return {"obs": obs, "action": torch.from_numpy(self.demos.action[ai])}
