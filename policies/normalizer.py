"""Min-max normaliser to [-1, 1] for named observations and actions, stored with the weights."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

ACTION_KEY = "action"
CONSTANT_RANGE = 1e-4
"""Dimensions whose range is below this are treated as constant: they map to 0, not to +-inf."""


class Normalizer(nn.Module):
    """Per-key, per-dimension affine map ``x -> 2 (x - lo) / (hi - lo) - 1``.

    Statistics live in buffers named ``<key>__lo`` / ``<key>__hi`` so they are saved in the same
    safetensors file as the network. Arrays are (..., *shape) with the key's shape trailing.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self._affines: dict[tuple, tuple] = {}
        for k, shape in self.shapes.items():
            self.register_buffer(f"{k}__lo", -torch.ones(shape))
            self.register_buffer(f"{k}__hi", torch.ones(shape))

    def fit(self, data: dict[str, np.ndarray]) -> Normalizer:
        """Set statistics from arrays of shape (N, *shape) per key."""
        for k, shape in self.shapes.items():
            if k not in data:
                raise KeyError(f"normaliser fit: missing key {k!r}")
            x = torch.as_tensor(np.asarray(data[k]), dtype=torch.float32).reshape(-1, *shape)
            lo, hi = x.min(0).values, x.max(0).values
            const = (hi - lo) < CONSTANT_RANGE
            getattr(self, f"{k}__lo").copy_(torch.where(const, lo - 1.0, lo))
            getattr(self, f"{k}__hi").copy_(torch.where(const, lo + 1.0, hi))
        return self

    def _affine(self, key: str, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(scale, offset, inverse scale, inverse offset) of ``key`` on ``like``'s device/dtype.

        Cached until the statistics change (``fit``, ``load_state_dict`` and ``.to`` all bump the
        buffers' version or replace them), so each map is one fused op per call.
        """
        lo, hi = getattr(self, f"{key}__lo"), getattr(self, f"{key}__hi")
        stamp = (id(lo), lo._version, id(hi), hi._version)
        cache_key = (key, like.device, like.dtype)
        found = self._affines.get(cache_key)
        if found is None or found[0] != stamp:
            lo, hi = lo.to(like), hi.to(like)
            scale = 2 / (hi - lo)
            found = (stamp, (scale, -lo * scale - 1, (hi - lo) / 2, (hi + lo) / 2))
            self._affines[cache_key] = found
        return found[1]

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        scale, offset, _, _ = self._affine(key, x)
        return torch.addcmul(offset, x, scale)

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        _, _, inv_scale, inv_offset = self._affine(key, x)
        return torch.addcmul(inv_offset, x, inv_scale)

    def normalize_obs(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.normalize(k, v) for k, v in obs.items()}
