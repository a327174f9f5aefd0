"""Small tensor helpers shared by the warm-started chunk samplers (RTI, streaming, truncated)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_WARM_STEPS = (3, 1, 0)
"""RTI-DP's warm step list for simple tasks (train timesteps of a 100-step schedule)."""
DEFAULT_N_STEPS = 2
"""Steps from ``start_step`` down to 0 when ``n_steps`` is not given (DiffusionDrive uses 2)."""


def shift_index(horizon: int, n: int, device=None) -> torch.Tensor:
    """(Tp,) positions a shift by ``n`` reads from: n, n+1, ..., Tp-1, then Tp-1 repeated."""
    if n < 1:
        raise ValueError(f"shift must be >= 1 action, got {n}")
    return torch.arange(n, n + horizon, device=device).clamp(max=horizon - 1)


def shift_chunk(x: torch.Tensor, n: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """Drop the first ``n`` actions of each chunk and repeat the last one: (B, Tp, Da) -> same.

    ``index``: ``shift_index(Tp, n)`` on x's device, precomputed by callers in a hot loop (the
    shift is then one gather).
    """
    if index is None:
        index = shift_index(x.shape[1], n, x.device)
    return x.index_select(1, index)


def step_list(
    num_train_steps: int,
    steps: Sequence[int] | None = None,
    start_step: int | None = None,
    n_steps: int | None = None,
    default: Sequence[int] = DEFAULT_WARM_STEPS,
) -> list[int]:
    """A descending list of train timesteps ending at 0.

    Either ``steps`` explicitly, or ``start_step`` with ``n_steps`` evenly spaced timesteps down
    to 0 (rounded), or ``default`` when neither is given.
    """
    if steps is not None and (start_step is not None or n_steps is not None):
        raise ValueError("give either steps=[...] or start_step (+ n_steps), not both")
    if steps is None and start_step is None:
        if n_steps is not None:
            raise ValueError("n_steps needs start_step")
        steps = default
    if steps is None:
        if not 0 <= start_step < num_train_steps:
            raise ValueError(f"start_step must be in [0, {num_train_steps}), got {start_step}")
        n = DEFAULT_N_STEPS if n_steps is None else int(n_steps)
        if not 1 <= n <= start_step + 1:
            raise ValueError(f"n_steps must be in [1, start_step + 1 = {start_step + 1}], got {n}")
        steps = (
            [start_step]
            if n == 1
            else torch.linspace(float(start_step), 0.0, n).round().long().tolist()
        )
    out = [int(t) for t in steps]
    if not out or any(a <= b for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(f"steps must be a non-empty strictly descending list, got {out}")
    if out[0] >= num_train_steps or out[-1] < 0:
        raise ValueError(f"steps must lie in [0, {num_train_steps}), got {out}")
    return out


def rows(obs: dict[str, torch.Tensor] | None, idx: torch.Tensor):
    """The streams ``idx`` of a batched observation dict (None passes through)."""
    return None if obs is None else {k: v[idx] for k, v in obs.items()}
