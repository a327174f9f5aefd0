"""Observation history of the last To steps, shared by the chunk wrapper and the policy runtime."""

from __future__ import annotations

import numpy as np


class ObsHistory:
    """Keeps the last ``n_obs_steps`` observations of ``n_envs`` parallel streams.

    Observations are dicts of named arrays. ``push(obs)`` takes ``{key: (B, *shape)}`` and
    ``stacked()`` returns ``{key: (B, To, *shape)}``. After ``reset(mask, obs)`` the selected
    streams are filled with ``obs`` repeated To times (the usual start-of-episode padding).
    """

    def __init__(self, n_obs_steps: int):
        if n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {n_obs_steps}")
        self.n_obs_steps = n_obs_steps
        self._buf: dict[str, np.ndarray] | None = None

    def reset(self, obs: dict[str, np.ndarray], mask: np.ndarray | None = None) -> None:
        """Pad the streams selected by ``mask`` (all when None) with ``obs`` (B, *shape)."""
        if self._buf is None or mask is None:
            self._buf = {
                k: np.repeat(np.asarray(v)[:, None], self.n_obs_steps, axis=1).copy()
                for k, v in obs.items()
            }
            return
        mask = np.asarray(mask, dtype=bool)
        for k, v in obs.items():
            self._buf[k][mask] = np.asarray(v)[mask][:, None]

    def push(self, obs: dict[str, np.ndarray]) -> None:
        """Append one step (B, *shape) per key, dropping the oldest."""
        if self._buf is None:
            self.reset(obs)
            return
        for k, v in obs.items():
            buf = self._buf[k]
            buf[:, :-1] = buf[:, 1:]
            buf[:, -1] = v

    def stacked(self) -> dict[str, np.ndarray]:
        """Copy of the history: ``{key: (B, To, *shape)}``, oldest first."""
        if self._buf is None:
            raise RuntimeError("ObsHistory is empty: call reset() with the first observation")
        return {k: v.copy() for k, v in self._buf.items()}

    @property
    def is_empty(self) -> bool:
        return self._buf is None
