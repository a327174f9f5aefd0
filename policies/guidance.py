"""Guidance hooks: steer a trained diffusion policy at sampling time, without retraining it.

``DiffusionSampler.run`` calls every hook, in list order, at every denoising step with a
``StepContext`` (step index, train timestep t, noise level sigma = sqrt(1 - alpha-bar_t), noisy
chunk x, predicted eps and x0, conditioning, normalised observations {key: (B, To, ...)}). A hook
changes the step by replacing ``ctx.eps`` and/or ``ctx.x`` (use ``set_eps`` / ``set_x`` so that
``ctx.x0`` stays consistent for the next hook). Optional hook attributes read by ``run``:
``repeats`` (passes of (predict, guide, step) per level) and ``finalize(x, obs) -> x`` (applied to
the final sample, in order).

Hooks run only inside ``run`` and only when passed to it (``PolicyRuntime(hooks=...)``). DPPO
computes log-probabilities through ``DiffusionSampler.gaussian`` directly, which never sees them.
A hook with zero strength (or nothing to enforce) returns without touching ``ctx``, so the guided
sampler reproduces the unguided one bit for bit.

Built-in hooks (shapes: x, eps, x0 (B, Tp, Da) in the policy's normalised action units):

- ``Inpaint``: fix known entries of the chunk (timesteps x action dims), e.g. the executed prefix.
- ``BoxProjection``: keep the predicted clean chunk and the final sample inside [low, high].
- ``GradientGuidance``: eps' = eps - sigma * s(sigma) * grad_x J(actions, obs) for any
  differentiable objective J to maximise, with a strength schedule over noise levels.
  ``policies.dynaguide`` builds DynaGuide on it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from policies.diffusion import DiffusionPolicy
from policies.normalizer import ACTION_KEY, Normalizer
from policies.samplers import Hook, StepContext

UNITS = ("env", "normalized")
"""``env``: actions / observations as the environment sees them; ``normalized``: policy units."""
GUIDE_ON = ("x", "x0")
"""Where J is evaluated: the noisy chunk x, or the predicted clean chunk x0(x) (eps held fixed)."""

MISSING = "???"
"""How a required config value that was not given reaches ``build_hooks``."""

Objective = Callable[[torch.Tensor, dict[str, torch.Tensor] | None], torch.Tensor]
"""J(actions (B, Tp, Da), obs {key: (B, To, ...)} or None) -> (B,) values to increase."""

STRENGTH_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda sigma: 1.0,
    "noise": lambda sigma: sigma,  # strongest at high noise, vanishing on the clean chunk
    "clean": lambda sigma: 1.0 - sigma,  # strongest near the clean chunk
}
"""Multipliers of the strength as a function of the noise level sigma in [0, 1]."""


def refresh_x0(ctx: StepContext) -> None:
    """Recompute ``ctx.x0`` from ``ctx.x`` and ``ctx.eps`` (after a hook changed either)."""
    ctx.x0 = ctx.sampler.predict_x0(ctx.x, ctx.eps, ctx.step_index)


def set_eps(ctx: StepContext, eps: torch.Tensor) -> None:
    ctx.eps = eps
    refresh_x0(ctx)


def set_x(ctx: StepContext, x: torch.Tensor) -> None:
    ctx.x = x
    refresh_x0(ctx)


def alpha_bar(ctx: StepContext, like: torch.Tensor) -> torch.Tensor:
    """alpha-bar at the step's timestep, as a scalar tensor of ``like``'s dtype and device."""
    return ctx.sampler.schedule.alpha_bar(ctx.t).to(like)


def consistent_with_clipped_x0(ctx: StepContext) -> None:
    """Where the sampler clips the predicted x0, re-derive eps from the clipped x0.

    A guided eps can imply an x0 far outside the clip range; DDIM would then combine the clipped
    x0 with the unclipped eps, whose guidance term points the other way. Re-deriving eps from the
    clipped x0 (GLIDE's clipped model output) keeps the step moving the way guidance asks.
    """
    a = alpha_bar(ctx, ctx.x)
    clipped = (ctx.x - ctx.noise_level * ctx.eps) / a.sqrt() != ctx.x0
    if bool(clipped.any()):
        rederived = (ctx.x - a.sqrt() * ctx.x0) / ctx.noise_level
        set_eps(ctx, torch.where(clipped, rederived, ctx.eps))


def _check_units(units: str) -> None:
    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}, got {units!r}")


def _as_tensor(value: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(value, dtype=np.float32))


def _per_dim(value: Any, action_dim: int, what: str) -> torch.Tensor:
    """A scalar expanded to (Da,), or an array whose last dimension is Da."""
    t = _as_tensor(value)
    if t.dim() == 0:
        return t.expand(action_dim).clone()
    if t.shape[-1] != action_dim:
        raise ValueError(
            f"box {what} has shape {tuple(t.shape)}; expected a scalar or a last "
            f"dimension of Da={action_dim}"
        )
    return t


class GuidanceHook:
    """Base class: one pass per level, no final projection, a short description."""

    repeats: int = 1

    def __call__(self, ctx: StepContext) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": type(self).__name__}


class Inpaint(GuidanceHook):
    """Fix the entries of the chunk selected by ``mask`` to ``values``.

    At each step the known entries of x are set to the forward-noised values that the current eps
    prediction implies, x = sqrt(alpha-bar) v + sigma eps, so the step's predicted x0 equals v
    there; ``finalize`` writes v exactly into the final sample. An all-False mask is a no-op.

    Args:
        values: (Tp, Da) or (B, Tp, Da) actions in ``units`` (entries outside the mask ignored).
        mask: bool, broadcastable to ``values``: True where the action is known.
        normalizer: the policy's normaliser, needed for ``units="env"``.
    """

    def __init__(
        self,
        values: Any,
        mask: Any,
        normalizer: Normalizer | None = None,
        units: str = "normalized",
    ):
        self.mask = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
        self.normalizer = normalizer
        self.set_values(values, units)

    @classmethod
    def from_steps(
        cls,
        policy: DiffusionPolicy,
        values: Any,
        steps: Sequence[int] | None = None,
        dims: Sequence[int] | None = None,
        units: str = "env",
    ) -> Inpaint:
        """Fix chunk timesteps ``steps`` (None: all Tp) and action dims ``dims`` (None: all Da).

        ``values`` broadcasts to (len(steps), len(dims)) or (B, len(steps), len(dims)).
        """
        tp, da = policy.cfg.horizon, policy.cfg.action_dim
        steps = list(range(tp)) if steps is None else [int(s) for s in steps]
        dims = list(range(da)) if dims is None else [int(d) for d in dims]
        bad = [s for s in steps if not 0 <= s < tp] + [d for d in dims if not 0 <= d < da]
        if bad or not steps or not dims:
            raise ValueError(
                f"inpaint steps {steps} and dims {dims} must be non-empty indices "
                f"into a chunk of Tp={tp} actions of dimension Da={da}"
            )
        vals = _as_tensor(values)
        batch = tuple(vals.shape[:-2]) if vals.dim() > 2 else ()
        try:
            known = vals.expand(*batch, len(steps), len(dims))
        except RuntimeError:
            raise ValueError(
                f"inpaint values of shape {tuple(vals.shape)} do not broadcast to "
                f"(len(steps), len(dims)) = ({len(steps)}, {len(dims)})"
            ) from None
        full = torch.zeros(*batch, tp, da)
        mask = torch.zeros(tp, da, dtype=torch.bool)
        rows, cols = torch.tensor(steps)[:, None], torch.tensor(dims)[None, :]
        full[..., rows, cols] = known
        mask[rows, cols] = True
        return cls(full, mask, policy.normalizer, units)

    def set_values(self, values: Any, units: str = "normalized") -> None:
        """Replace the known values (same layout as the mask), e.g. for the next chunk."""
        _check_units(units)
        values = _as_tensor(values)
        if units == "env":
            if self.normalizer is None:
                raise ValueError("inpainting values in env units needs the policy's normaliser")
            values = self.normalizer.normalize(ACTION_KEY, values)
        self.values = values

    def _known(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.values.dim() == 3 and self.values.shape[0] not in (1, like.shape[0]):
            raise ValueError(
                f"per-stream inpainting values for {self.values.shape[0]} streams met a batch of "
                f"{like.shape[0]} (a sampler that splits streams, e.g. rti's cold and warm ones); "
                "give values of shape (Tp, Da)"
            )
        return self.mask.to(like.device), self.values.to(like)

    def __call__(self, ctx: StepContext) -> None:
        if not bool(self.mask.any()):
            return
        mask, v = self._known(ctx.x)
        noised = alpha_bar(ctx, ctx.x).sqrt() * v + ctx.noise_level * ctx.eps
        set_x(ctx, torch.where(mask, noised, ctx.x))

    def finalize(self, x: torch.Tensor, obs: Any = None) -> torch.Tensor:
        if not bool(self.mask.any()):
            return x
        mask, v = self._known(x)
        return torch.where(mask, v, x)

    def describe(self) -> dict[str, Any]:
        return {"name": "inpaint", "known_entries": int(self.mask.sum())}


class BoxProjection(GuidanceHook):
    """Keep actions inside the box [low, high].

    At each step the predicted clean chunk x0 is clamped to the box and, where it moved, eps is
    replaced by the one that implies the clamped x0 given x; ``finalize`` clamps the final sample.
    Infinite bounds (or a box that holds already) leave the sampler untouched.

    Args:
        low, high: scalars, (Da,) or (Tp, Da), in ``units``.
        normalizer: the policy's normaliser, needed for ``units="env"``.
    """

    def __init__(
        self,
        low: Any,
        high: Any,
        action_dim: int,
        normalizer: Normalizer | None = None,
        units: str = "env",
    ):
        _check_units(units)
        low, high = _per_dim(low, action_dim, "low"), _per_dim(high, action_dim, "high")
        if bool((low > high).any()):
            raise ValueError(f"box low {low.tolist()} exceeds high {high.tolist()} somewhere")
        if units == "env":
            if normalizer is None:
                raise ValueError("a box in env units needs the policy's normaliser")
            low, high = (normalizer.normalize(ACTION_KEY, b) for b in (low, high))
        self.low, self.high = low, high

    def _bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.low.to(like), self.high.to(like)

    def __call__(self, ctx: StepContext) -> None:
        low, high = self._bounds(ctx.x0)
        projected = torch.maximum(torch.minimum(ctx.x0, high), low)
        outside = projected != ctx.x0
        if not bool(outside.any()):
            return
        eps = (ctx.x - alpha_bar(ctx, ctx.x).sqrt() * projected) / ctx.noise_level
        set_eps(ctx, torch.where(outside, eps, ctx.eps))

    def finalize(self, x: torch.Tensor, obs: Any = None) -> torch.Tensor:
        low, high = self._bounds(x)
        return torch.maximum(torch.minimum(x, high), low)

    def describe(self) -> dict[str, Any]:
        return {
            "name": "box",
            "low_normalized": self.low.tolist(),
            "high_normalized": self.high.tolist(),
        }


class GradientGuidance(GuidanceHook):
    """eps' = eps - sigma * s * m(sigma) * grad_x J(actions, obs), sigma = sqrt(1 - alpha-bar).

    ``J`` is any differentiable objective to increase (``Objective``); ``m`` a strength schedule
    (a name in ``STRENGTH_SCHEDULES`` or a function of sigma). ``guide_on="x"`` evaluates J on the
    noisy chunk; ``"x0"`` on the predicted clean chunk (x - sigma eps) / sqrt(alpha-bar) with eps
    held fixed (no backpropagation through the denoiser). With ``units="env"`` J receives actions
    and observations in env units (through the policy's normaliser). ``repeats > 1`` asks the
    sampler for that many (predict, guide, step) passes per level. Strength 0 is a no-op.
    """

    def __init__(
        self,
        objective: Objective,
        strength: float = 1.0,
        *,
        schedule: str | Callable[[float], float] = "constant",
        normalizer: Normalizer | None = None,
        units: str = "env",
        guide_on: str = "x",
        repeats: int = 1,
    ):
        _check_units(units)
        if units == "env" and normalizer is None:
            raise ValueError("gradient guidance in env units needs the policy's normaliser")
        if guide_on not in GUIDE_ON:
            raise ValueError(f"guide_on must be one of {GUIDE_ON}, got {guide_on!r}")
        if isinstance(schedule, str):
            if schedule not in STRENGTH_SCHEDULES:
                raise ValueError(
                    f"unknown strength schedule {schedule!r}; "
                    f"valid: {', '.join(STRENGTH_SCHEDULES)}"
                )
            schedule = STRENGTH_SCHEDULES[schedule]
        if int(repeats) < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.objective = objective
        self.strength = float(strength)
        self.schedule = schedule
        self.normalizer = normalizer
        self.units = units
        self.guide_on = guide_on
        self._repeats = int(repeats)

    @property
    def repeats(self) -> int:
        return self._repeats if self.strength != 0 else 1

    def scale(self, noise_level: float) -> float:
        return self.strength * float(self.schedule(noise_level))

    def gradient(self, ctx: StepContext) -> torch.Tensor:
        """grad_x of sum_b J_b: (B, Tp, Da), one independent gradient per sample."""
        with torch.enable_grad():
            x = ctx.x.detach().requires_grad_(True)
            actions = x
            if self.guide_on == "x0":
                actions = (x - ctx.noise_level * ctx.eps.detach()) / alpha_bar(ctx, x).sqrt()
            obs = ctx.obs
            if self.units == "env":
                actions = self.normalizer.unnormalize(ACTION_KEY, actions)
                if obs is not None:
                    obs = {k: self.normalizer.unnormalize(k, v) for k, v in obs.items()}
            value = self.objective(actions, obs)
            if value.shape != x.shape[:1]:
                raise ValueError(
                    f"guidance objective must return one value per sample "
                    f"({x.shape[0]},), got shape {tuple(value.shape)}"
                )
            (grad,) = torch.autograd.grad(value.sum(), x)
        return grad

    def __call__(self, ctx: StepContext) -> None:
        s = self.scale(ctx.noise_level)
        if s == 0:
            return
        set_eps(ctx, ctx.eps - ctx.noise_level * s * self.gradient(ctx))
        consistent_with_clipped_x0(ctx)

    def describe(self) -> dict[str, Any]:
        return {
            "name": "gradient",
            "strength": self.strength,
            "units": self.units,
            "guide_on": self.guide_on,
            "repeats": self._repeats,
        }


# --------------------------------------------------------------------------------------------
# Support checks and config
# --------------------------------------------------------------------------------------------
def check_guidance_support(sampler: Any, hooks: Sequence[Hook]) -> None:
    """Raise a ValueError naming ``sampler`` when hooks are asked of one that cannot run them."""
    if hooks and not getattr(sampler, "supports_guidance", True):
        from policies.chunk_samplers import CHUNK_SAMPLERS

        able = [n for n, c in CHUNK_SAMPLERS.items() if getattr(c, "supports_guidance", True)]
        raise ValueError(
            f"sampler {sampler.name!r} does not support guidance hooks; use "
            f"guidance=none or one of the samplers {', '.join(able)}"
        )


def _no_hooks(policy: DiffusionPolicy, task: str | None) -> list[Hook]:
    return []


def _inpaint_hooks(
    policy: DiffusionPolicy,
    task: str | None,
    values: Any = 0.0,
    steps: Sequence[int] | None = None,
    dims: Sequence[int] | None = None,
    units: str = "env",
) -> list[Hook]:
    return [Inpaint.from_steps(policy, values, steps=steps, dims=dims, units=units)]


def _box_hooks(
    policy: DiffusionPolicy, task: str | None, low: Any = None, high: Any = None, units: str = "env"
) -> list[Hook]:
    if low is None or high is None:
        if task is None or units != "env":
            raise ValueError(
                "box guidance without low/high takes the task's action bounds: "
                "give the task and units=env, or set guidance.low and guidance.high"
            )
        from envs import make_env

        env = make_env(task)
        space = env.action_space
        env.close()
        low = space.low if low is None else low
        high = space.high if high is None else high
    return [BoxProjection(low, high, policy.cfg.action_dim, policy.normalizer, units)]


def _dynaguide_hooks(policy: DiffusionPolicy, task: str | None, **options: Any) -> list[Hook]:
    from policies.dynaguide import build_dynaguide

    return [build_dynaguide(policy, **options)]


GUIDANCE_BUILDERS: dict[str, Callable[..., list[Hook]]] = {
    "none": _no_hooks,
    "inpaint": _inpaint_hooks,
    "box": _box_hooks,
    "dynaguide": _dynaguide_hooks,
}


def _options_of(builder: Callable[..., list[Hook]]) -> list[str]:
    if builder is _dynaguide_hooks:
        from policies.dynaguide import build_dynaguide

        builder = build_dynaguide
    params = inspect.signature(builder).parameters
    return [p for p in params if p not in ("policy", "task")]


def build_hooks(
    guidance_cfg: Mapping[str, Any] | None,
    policy: DiffusionPolicy,
    task: str | None = None,
    sampler: Any = None,
) -> list[Hook]:
    """Hooks from a ``guidance`` config group ({name: none|inpaint|box|dynaguide, options...}).

    With ``sampler`` given, a sampler that cannot run hooks raises a ValueError naming it.
    """
    cfg = _plain(guidance_cfg) if guidance_cfg is not None else {}
    name = cfg.pop("name", "none")
    if name not in GUIDANCE_BUILDERS:
        raise ValueError(f"unknown guidance {name!r}; valid: {', '.join(GUIDANCE_BUILDERS)}")
    missing = [k for k, v in cfg.items() if v == MISSING]
    if missing:
        raise ValueError(
            f"guidance {name!r} needs " + ", ".join(f"guidance.{k}=..." for k in missing)
        )
    builder = GUIDANCE_BUILDERS[name]
    valid = _options_of(builder)
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise ValueError(f"guidance {name!r} has no option(s) {unknown}; valid options: {valid}")
    hooks = builder(policy, task, **cfg)
    if sampler is not None:
        check_guidance_support(sampler, hooks)
    return hooks


def _plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict from a dict or an OmegaConf node."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)
