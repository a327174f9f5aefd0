"""Guidance hooks: zero-strength identity, inpainting, box projection, gradient guidance,
composition, config building, and that hooks stay out of DPPO's log-probabilities."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from policies.chunk_samplers import CHUNK_SAMPLERS, build_chunk_sampler
from policies.diffusion import DiffusionPolicy, PolicyConfig
from policies.guidance import (
    BoxProjection,
    GradientGuidance,
    Inpaint,
    build_hooks,
    check_guidance_support,
)
from policies.normalizer import ACTION_KEY
from policies.runtime import PolicyRuntime

CFG_GUIDANCE = Path(__file__).resolve().parents[1] / "cfg" / "guidance"
OBS_DIM, ACTION_DIM, HORIZON, BATCH = 3, 2, 4, 8
SAMPLER_OPTIONS = {  # every sampler that runs hooks, with the options it needs here
    "ddpm": {},
    "ddim": {},
    "rti": {},
    "truncated": {"anchors": torch.randn(3, HORIZON, ACTION_DIM, generator=torch.Generator())},
}
GUIDED_SAMPLERS = [n for n, c in CHUNK_SAMPLERS.items() if c.supports_guidance]
TARGET = torch.tensor([0.5, -1.5])  # env units, inside the fitted action range


def make_policy(seed: int = 0) -> DiffusionPolicy:
    torch.manual_seed(seed)
    policy = DiffusionPolicy(
        PolicyConfig(
            task="point_reach",
            obs_shapes={"state": [OBS_DIM]},
            action_dim=ACTION_DIM,
            horizon=HORIZON,
            n_action_steps=HORIZON,
            denoiser="mlp",
            denoiser_kwargs={"hidden_dim": 32, "depth": 3},
            schedule={"num_train_steps": 20},
        )
    )
    rng = np.random.default_rng(seed)
    policy.normalizer.fit(
        {
            "state": rng.normal(size=(64, OBS_DIM)) * 2.0,
            ACTION_KEY: rng.uniform([-1.0, -3.0], [2.0, 1.0], size=(64, ACTION_DIM)),
        }
    )
    return policy.eval()


def observations(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"state": rng.normal(size=(BATCH, 1, OBS_DIM)).astype(np.float32)}


def act(policy, sampler_name, hooks=(), seed=3, calls=2, **opts):
    """Chunks (calls, B, Tp, Da) from a fresh runtime (several calls: warm-start state evolves)."""
    sampler = build_chunk_sampler(sampler_name, policy, **opts)
    runtime = PolicyRuntime(policy, sampler, BATCH, hooks=hooks, seed=seed)
    return np.stack([runtime.act(observations(1 + c)).chunk for c in range(calls)])


def quadratic(actions: torch.Tensor, obs) -> torch.Tensor:
    """J = -||a - TARGET||^2 summed over the chunk: (B,)."""
    return -((actions - TARGET.to(actions)) ** 2).sum(dim=(1, 2))


def zero_strength_hooks(policy) -> list:
    return [
        GradientGuidance(quadratic, 0.0, normalizer=policy.normalizer, repeats=3),
        Inpaint(torch.zeros(HORIZON, ACTION_DIM), torch.zeros(HORIZON, ACTION_DIM, dtype=bool)),
        BoxProjection(-np.inf, np.inf, ACTION_DIM, policy.normalizer),
    ]


def test_every_sampler_that_runs_hooks_is_covered():
    assert set(GUIDED_SAMPLERS) <= set(SAMPLER_OPTIONS)
    assert {"ddpm", "ddim", "rti"} <= set(GUIDED_SAMPLERS)


@pytest.mark.parametrize("name", GUIDED_SAMPLERS)
def test_zero_strength_hooks_reproduce_the_sampler_bit_for_bit(name):
    policy = make_policy()
    plain = act(policy, name, **SAMPLER_OPTIONS[name])
    hooked = act(policy, name, hooks=zero_strength_hooks(policy), **SAMPLER_OPTIONS[name])
    assert np.array_equal(plain, hooked)


def test_zero_strength_identity_with_stochastic_ddim():
    policy = make_policy()
    plain = act(policy, "ddim", eta=1.0, steps=5)
    assert np.array_equal(
        plain, act(policy, "ddim", hooks=zero_strength_hooks(policy), eta=1.0, steps=5)
    )


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_inpainted_entries_equal_the_given_values(name):
    policy = make_policy()
    known = np.array([[0.7, -2.5], [1.5, 0.25]], dtype=np.float32)  # env units, (steps, dims)
    hook = Inpaint.from_steps(policy, known, steps=[0, 2], dims=[0, 1], units="env")
    sampler = build_chunk_sampler(name, policy)
    runtime = PolicyRuntime(policy, sampler, BATCH, hooks=[hook], seed=0)
    chunk = runtime.act(observations()).chunk
    np.testing.assert_allclose(chunk[:, [0, 2]], np.broadcast_to(known, (BATCH, 2, 2)), atol=1e-6)
    # in normalised units, straight out of the sampler, the entries are exact
    cond = policy.condition({"state": torch.as_tensor(observations()["state"])})
    x = torch.randn(BATCH, HORIZON, ACTION_DIM, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = sampler.diffusion.run(policy.eps_fn(cond), x, cond, hooks=[hook]).x
    assert torch.equal(out[:, [0, 2]], hook.values[[0, 2]].expand(BATCH, 2, 2))
    # the free steps were denoised, not copied
    assert not np.allclose(chunk[:, 1], chunk[:, 0])


def test_inpaint_one_dimension_of_every_step_and_bad_indices():
    policy = make_policy()
    hook = Inpaint.from_steps(policy, -0.5, dims=[1])
    chunk = act(policy, "ddim", hooks=[hook], calls=1)[0]
    np.testing.assert_allclose(chunk[..., 1], -0.5, atol=1e-6)
    assert chunk[..., 0].std() > 0
    with pytest.raises(ValueError, match="Tp=4"):
        Inpaint.from_steps(policy, 0.0, steps=[4])
    with pytest.raises(ValueError, match="broadcast"):
        Inpaint.from_steps(policy, np.zeros(3), steps=[0, 1], dims=[0, 1])


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_projected_actions_respect_the_box(name):
    policy = make_policy()
    low, high = np.array([-0.2, -1.0]), np.array([0.6, -0.5])
    unguided = act(policy, name)
    assert ((unguided < low) | (unguided > high)).any(), "the box must bind for a real test"
    boxed = act(policy, name, hooks=[BoxProjection(low, high, ACTION_DIM, policy.normalizer)])
    eps = 1e-5
    assert (boxed >= low - eps).all() and (boxed <= high + eps).all()
    # inside the box the chain is not just clamped at the end: x0 was projected at every step
    inside = act(policy, name, hooks=[BoxProjection(-10.0, 10.0, ACTION_DIM, policy.normalizer)])
    assert np.array_equal(inside, unguided)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_gradient_guidance_moves_a_quadratic_objective_up(name):
    policy = make_policy()
    values = []
    for strength in (0.0, 0.5, 2.0):
        hook = GradientGuidance(quadratic, strength, normalizer=policy.normalizer)
        chunks = torch.as_tensor(act(policy, name, hooks=[hook], calls=1)[0])
        values.append(float(quadratic(chunks, None).mean()))
    assert values[0] < values[1] < values[2]
    assert values[2] > 0.1 * values[0]  # strong guidance lands near the target
    # and in normalised units with the x0 variant and a schedule
    hook = GradientGuidance(
        lambda a, o: -(a**2).sum(dim=(1, 2)),
        1.0,
        units="normalized",
        guide_on="x0",
        schedule="noise",
    )
    base = act(policy, "ddim", calls=1)[0]
    guided = act(policy, "ddim", hooks=[hook], calls=1)[0]
    to_norm = lambda c: policy.normalizer.normalize(ACTION_KEY, torch.as_tensor(c))  # noqa: E731
    assert float((to_norm(guided) ** 2).sum()) < float((to_norm(base) ** 2).sum())


def test_repeated_passes_cost_more_evaluations_and_cannot_be_recorded():
    policy = make_policy()
    sampler = build_chunk_sampler("ddim", policy, steps=5)
    hook = GradientGuidance(quadratic, 1.0, normalizer=policy.normalizer, repeats=3)
    runtime = PolicyRuntime(policy, sampler, BATCH, hooks=[hook], seed=0)
    assert runtime.act(observations()).nfe == 15
    with pytest.raises(ValueError, match="repeated passes"):
        runtime.act(observations(), record_from=0)


def test_hooks_compose_in_order_and_see_each_others_changes():
    policy = make_policy()
    calls = []

    def first(ctx):
        calls.append(("first", ctx.step_index))
        ctx.eps = ctx.eps + 1.0

    def second(ctx):
        calls.append(("second", ctx.step_index))
        ctx.extra["seen_eps"] = ctx.eps.clone()

    seen = []
    sampler = build_chunk_sampler("ddim", policy, steps=3)
    original = sampler.diffusion.transition

    def spy(c, x, eps):
        seen.append(eps)
        return original(c, x, eps)

    sampler.diffusion.transition = spy
    PolicyRuntime(policy, sampler, BATCH, hooks=[first, second], seed=0).act(observations())
    assert calls == [(n, i) for i in range(3) for n in ("first", "second")]
    assert len(seen) == 3  # the transition used the eps the hooks left behind


def test_hooks_do_not_leak_into_dppo_log_probabilities():
    """DPPO recomputes log-probs with ``gaussian`` on a recorded chain: hooks never run there,
    and a runtime configured with zero-strength hooks records the very same chain."""
    policy = make_policy()
    counter = {"n": 0}

    def counting(ctx):
        counter["n"] += 1

    sampler = build_chunk_sampler("ddpm", policy, min_std=0.1)
    plain = PolicyRuntime(policy, sampler, BATCH, seed=5).act(observations(), record_from=10)
    runtime = PolicyRuntime(
        policy, sampler, BATCH, hooks=[counting, *zero_strength_hooks(policy)], seed=5
    )
    hooked = runtime.act(observations(), record_from=10)
    assert counter["n"] == 20  # once per denoising step, inside run
    assert torch.equal(plain.chain, hooked.chain)

    diffusion = sampler.diffusion
    log_probs = []
    with torch.no_grad():
        for k in range(hooked.chain.shape[1] - 1):
            i = 10 + k
            x, nxt = hooked.chain[:, k], hooked.chain[:, k + 1]
            mean, std, _ = diffusion.gaussian(
                x, policy.eps(x, diffusion.timesteps[i], hooked.cond), i
            )
            log_probs.append(torch.distributions.Normal(mean, std).log_prob(nxt).sum(dim=(1, 2)))
    assert counter["n"] == 20
    assert torch.isfinite(torch.stack(log_probs)).all()


def test_guidance_with_a_sampler_that_cannot_run_it_names_the_sampler():
    policy = make_policy()
    policy.cfg.policy_type = "streaming"
    streaming = DiffusionPolicy(policy.cfg)
    sampler = build_chunk_sampler("streaming", streaming)
    box = {"name": "box", "low": -1.0, "high": 1.0}
    with pytest.raises(ValueError, match="'streaming' does not support guidance"):
        build_hooks(box, streaming, sampler=sampler)
    with pytest.raises(ValueError, match="'streaming'"):
        check_guidance_support(sampler, [lambda ctx: None])
    assert build_hooks({"name": "none"}, streaming, sampler=sampler) == []


def test_build_hooks_from_the_config_group():
    policy = make_policy()
    load = lambda name: OmegaConf.load(CFG_GUIDANCE / f"{name}.yaml")  # noqa: E731
    assert build_hooks(load("none"), policy) == []
    (inpaint,) = build_hooks(load("inpaint"), policy)
    assert isinstance(inpaint, Inpaint) and int(inpaint.mask.sum()) == HORIZON
    (box,) = build_hooks(load("box"), policy, task="point_reach")
    env_low = policy.normalizer.unnormalize(ACTION_KEY, box.low)
    np.testing.assert_allclose(env_low.numpy(), [-1.0, -1.0], atol=1e-6)  # the action space
    with pytest.raises(ValueError, match="valid: none"):
        build_hooks({"name": "magic"}, policy)
    with pytest.raises(ValueError, match="no option"):
        build_hooks({"name": "box", "lo": 0.0}, policy)
    with pytest.raises(ValueError, match="low/high"):
        build_hooks({"name": "box"}, policy)
