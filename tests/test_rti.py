"""RTI-DP warm start: cold call = full sampler, warm transitions, shift, gripper, resets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dppo.bench_inference import random_obs, random_policy
from dppo.evaluate import evaluate
from policies.chunk_ops import shift_chunk, step_list
from policies.chunk_samplers import CHUNK_SAMPLERS, build_chunk_sampler
from policies.runtime import PolicyRuntime
from policies.samplers import DDIMSampler, ddim_timesteps

N_TRAIN = 20
TINY = {
    "denoiser": "mlp",
    "denoiser_kwargs": {"hidden_dim": 32, "depth": 3},
    "obs_dim": 3,
    "action_dim": 3,
    "n_obs_steps": 1,
    "horizon": 8,
    "n_action_steps": 4,
    "num_train_steps": N_TRAIN,
}


@pytest.fixture
def policy():
    return random_policy(TINY, seed=0)


def test_shift_keeps_length_and_repeats_last():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    out = shift_chunk(x, 2)
    assert out.shape == x.shape
    torch.testing.assert_close(out[:, :3], x[:, 2:])
    torch.testing.assert_close(out[:, 3], x[:, 4])
    torch.testing.assert_close(out[:, 4], x[:, 4])
    everything = shift_chunk(x, 9)
    assert everything.shape == x.shape
    torch.testing.assert_close(everything, x[:, -1:].expand(-1, 5, -1))
    with pytest.raises(ValueError, match="shift"):
        shift_chunk(x, 0)


def test_first_call_is_the_full_base_sampler(policy):
    obs = random_obs(policy, 3)
    rti = PolicyRuntime(
        policy, build_chunk_sampler("rti", policy, base_steps=10, eta=1.0), 3, seed=5
    )
    ddim = PolicyRuntime(policy, build_chunk_sampler("ddim", policy, steps=10, eta=1.0), 3, seed=5)
    a, b = rti.act(obs), ddim.act(obs)
    np.testing.assert_array_equal(a.chunk, b.chunk)
    assert a.nfe == b.nfe == 10


def test_full_step_list_warm_path_is_the_full_sampler_from_the_same_noise(policy):
    """Warm steps = the whole DDIM-10 list: the warm chain is DDIM-10 from the noised guess."""
    full = ddim_timesteps(N_TRAIN, 10)
    sampler = build_chunk_sampler("rti", policy, steps=full, eta=1.0)
    runtime = PolicyRuntime(policy, sampler, 2, seed=3)
    obs = random_obs(policy, 2)
    first = runtime.act(obs)
    prev = runtime.state["prev"].clone()
    gen_state = runtime.generator.get_state()
    second = runtime.act(obs)
    assert second.nfe == len(full)

    gen = torch.Generator().set_state(gen_state)
    cond = policy.condition({k: torch.as_tensor(v) for k, v in obs.items()})
    guess = shift_chunk(prev, policy.cfg.n_action_steps)
    z = torch.randn(guess.shape, generator=gen)
    a = policy.schedule.alphas_cumprod[full[0]]
    x_start = a.sqrt() * guess + (1 - a).sqrt() * z
    ref = DDIMSampler(policy.schedule, n_steps=10, eta=1.0).run(
        policy.eps_fn(cond), x_start, cond, generator=gen
    )
    expected = policy.normalizer.unnormalize("action", ref.x).detach().numpy()
    np.testing.assert_allclose(second.chunk, expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(first.chunk, second.chunk)


def test_warm_calls_use_the_short_step_list_and_reset_restarts(policy):
    sampler = build_chunk_sampler("rti", policy, steps=[3, 1, 0])
    runtime = PolicyRuntime(policy, sampler, 3, seed=0)
    obs = random_obs(policy, 3)
    assert runtime.act(obs).nfe == 10
    assert runtime.act(obs).nfe == 3
    assert bool(runtime.state["has_prev"].all())
    runtime.reset(np.array([True, False, False]))
    assert runtime.state["has_prev"].tolist() == [False, True, True]
    mixed = runtime.act(obs)
    assert mixed.nfe == 10 + 3  # one cold stream, two warm ones: two sub-batches
    assert mixed.nfe_per_stream == pytest.approx((10 + 2 * 3) / 3)  # what a stream cost
    assert runtime.act(obs).nfe_per_stream == 3
    runtime.reset()
    assert not bool(runtime.state["has_prev"].any())


def test_step_per_observation_resets_the_warm_start():
    policy = random_policy(TINY, seed=1)
    runtime = PolicyRuntime(policy, build_chunk_sampler("rti", policy), 2, seed=0)
    obs = {"state": np.zeros((2, 3), dtype=np.float32)}
    runtime.step(obs)
    runtime.step(obs)
    assert runtime.state["has_prev"].tolist() == [True, True]
    result = runtime.step(obs, reset=np.array([False, True]))
    assert result.nfe == 3 + 10


def test_episodes_restart_cold_in_evaluation():
    """Real point_reach episodes: every new episode's first chunk is a full chain."""
    spec = {**TINY, "obs_dim": 6, "action_dim": 2, "horizon": 4}
    policy = random_policy(spec, seed=0)
    policy.cfg.task = "point_reach"
    runtime = PolicyRuntime(policy, build_chunk_sampler("rti", policy), 2, seed=0)
    result = evaluate(runtime, "point_reach", n_episodes=4, n_envs=2, seed=0, progress=False)
    assert result.n_episodes == 4
    assert 3 < result.nfe_per_chunk < 10


def test_step_list_options():
    assert step_list(100) == [3, 1, 0]
    assert step_list(100, start_step=30, n_steps=4) == [30, 20, 10, 0]
    assert step_list(100, start_step=5, n_steps=1) == [5]
    with pytest.raises(ValueError, match="either steps"):
        step_list(100, steps=[3, 1, 0], start_step=5)
    with pytest.raises(ValueError, match="descending"):
        step_list(100, steps=[1, 3, 0])
    with pytest.raises(ValueError, match="lie in"):
        step_list(20, steps=[25, 0])
    with pytest.raises(ValueError, match="n_steps"):
        step_list(100, start_step=2, n_steps=5)


def test_gripper_clip_and_binarisation(policy):
    sampler = build_chunk_sampler("rti", policy, gripper_dims=[2], gripper_clip=10)
    prev = torch.zeros(1, 8, 3)
    prev[0, :, 0] = torch.arange(8.0) / 8
    prev[0, :, 2] = torch.tensor([1.0, -1.0, 0.05, -0.5, 1.0, -1.0, 0.5, 0.07])
    guess = sampler.warm_guess(prev)
    torch.testing.assert_close(
        guess[0, :, 2], torch.tensor([0.1, -0.1, 0.1, 0.07, 0.07, 0.07, 0.07, 0.07])
    )
    torch.testing.assert_close(guess[0, :, 0], shift_chunk(prev, 4)[0, :, 0])
    actions = np.array([[[0.3, -0.2, -0.3], [0.3, -0.2, 0.0], [0.3, -0.2, 0.7]]])
    out = sampler.postprocess(actions)
    np.testing.assert_array_equal(out[..., 2], [[-1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(out[..., :2], actions[..., :2])
    plain = build_chunk_sampler("rti", policy)
    np.testing.assert_array_equal(plain.postprocess(actions), actions)
    with pytest.raises(ValueError, match="gripper_dims"):
        build_chunk_sampler("rti", policy, gripper_dims=[5])
    with pytest.raises(ValueError, match="gripper_clip"):
        build_chunk_sampler("rti", policy, gripper_clip=10)


def test_binarised_gripper_leaves_the_runtime(policy):
    sampler = build_chunk_sampler("rti", policy, gripper_dims=[1])
    runtime = PolicyRuntime(policy, sampler, 2, seed=0)
    result = runtime.act(random_obs(policy, 2))
    assert set(np.unique(result.actions[..., 1])) <= {-1.0, 1.0}


def test_switching_samplers_never_changes_the_weights(policy):
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    obs = random_obs(policy, 2)
    anchors = torch.rand(4, 8, 3) * 2 - 1
    for name, opts in [
        ("ddpm", {}),
        ("ddim", {}),
        ("rti", {}),
        ("truncated", {"anchors": anchors}),
    ]:
        runtime = PolicyRuntime(policy, build_chunk_sampler(name, policy, **opts), 2, seed=0)
        for _ in range(2):
            runtime.act(obs)
    after = policy.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_unknown_sampler_and_option_errors_list_valid_ones(policy):
    assert {"rti", "streaming", "truncated"} <= set(CHUNK_SAMPLERS)
    with pytest.raises(ValueError, match="valid samplers: .*rti"):
        build_chunk_sampler("warp", policy)
    with pytest.raises(ValueError, match="valid options: .*start_step"):
        build_chunk_sampler("rti", policy, strat_step=3)
    with pytest.raises(ValueError, match="base sampler"):
        build_chunk_sampler("rti", policy, base="euler")
    with pytest.raises(ValueError, match="record"):
        build_chunk_sampler("rti", policy).sample(
            policy,
            torch.zeros(1, 3),
            {"has_prev": torch.zeros(1, dtype=torch.bool)},
            generator=None,
            record_from=0,
        )
