"""What travels between the learner and rollout workers, as safetensors bytes + JSON scalars.

Weights: a state dict <-> ``safetensors`` bytes (a policy travels as its config dict + bytes).
A worker's rollout slice (its contiguous range of e envs): tensors (T, e, ...) as bytes, scalars
as a JSON-able dict. ``merge_slices`` joins the slices along the env axis into the ``Rollout`` the
in-process runner would have collected, applying the learner's reward scaler to the raw rewards
in the same (time, env) order. Ray carries only these bytes and plain containers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save

from dppo.buffer import Rollout
from policies.diffusion import DiffusionPolicy, PolicyConfig

Slice = tuple[bytes, dict[str, Any]]
"""(safetensors bytes of the slice's tensors, JSON-able scalars)."""


def state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def bytes_to_state(blob: bytes) -> dict[str, torch.Tensor]:
    return load(blob)


def policy_from_bytes(config: dict[str, Any], blob: bytes) -> DiffusionPolicy:
    """A policy from its ``PolicyConfig`` dict and full state (as ``state_to_bytes``)."""
    policy = DiffusionPolicy(PolicyConfig(**config))
    policy.load_state_dict(bytes_to_state(blob))
    return policy


def encode_slice(ro: Rollout, env_steps: int) -> Slice:
    """A worker's rollout (T steps x e envs, raw rewards) -> bytes + scalars.

    Episodes are not indexed: the k-th finished episode is the k-th True of ``dones`` in
    (time, env) order, as ``collect_rollout`` appends them.
    """
    cond, chain = ro.stacked()
    finals = sorted(ro.final_cond)
    tensors = {
        "cond": cond,
        "chain": chain,
        "raw_rewards": torch.as_tensor(np.stack(ro.raw_rewards)),
        "dones": torch.as_tensor(np.stack(ro.dones)),
        "terminated": torch.as_tensor(np.stack(ro.terminated)),
        "last_cond": ro.last_cond,
    }
    if finals:
        tensors["final_cond"] = torch.stack([ro.final_cond[k] for k in finals])
    scalars = {
        "final_index": [list(k) for k in finals],
        "episode_returns": ro.episode_returns,
        "episode_successes": ro.episode_successes,
        "sim_faults": ro.sim_faults,
        "env_steps": env_steps,
    }
    return state_to_bytes(tensors), scalars


def merge_slices(slices: Sequence[Slice], offsets: Sequence[int], learner: Any, scale: bool):
    """Join worker slices (slice w starts at global env ``offsets[w]``) into one ``Rollout``.

    Adds the slices' env steps to ``learner.env_steps``; with ``scale`` the learner's reward
    scaler sees the joined raw rewards (E,) step by step, exactly as in the local runner.
    """
    parts = [(bytes_to_state(blob), scalars) for blob, scalars in slices]
    ro = Rollout()
    joined = {
        key: torch.cat([t[key] for t, _ in parts], dim=1)
        for key in ("cond", "chain", "raw_rewards", "dones", "terminated")
    }
    ro.cond = list(joined["cond"].unbind(0))
    ro.chain = list(joined["chain"].unbind(0))
    ro.raw_rewards = list(joined["raw_rewards"].numpy())
    ro.dones = list(joined["dones"].numpy())
    ro.terminated = list(joined["terminated"].numpy())
    for raw, done in zip(ro.raw_rewards, ro.dones, strict=True):
        ro.rewards.append(learner.reward_scaler(raw, done) if scale else raw.astype(np.float32))
    ro.last_cond = torch.cat([t["last_cond"] for t, _ in parts])
    episodes = []
    for (tensors, scalars), offset in zip(parts, offsets, strict=True):
        for row, (t, e) in enumerate(scalars["final_index"]):
            ro.final_cond[(t, e + offset)] = tensors["final_cond"][row]
        ends = np.argwhere(tensors["dones"].numpy())
        episodes += [
            (int(t), int(e) + offset, ret, success)
            for (t, e), ret, success in zip(
                ends, scalars["episode_returns"], scalars["episode_successes"], strict=True
            )
        ]
        ro.sim_faults += scalars["sim_faults"]
        learner.env_steps += scalars["env_steps"]
    for _, _, ret, success in sorted(episodes, key=lambda ep: ep[:2]):
        ro.episode_returns.append(ret)
        ro.episode_successes.append(success)
    return ro
