"""Streaming Diffusion Policy: layout checks, buffer bookkeeping, per-call cost, training levels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dppo.bench_inference import random_obs, random_policy
from dppo.config import load_config
from policies.chunk_samplers import build_chunk_sampler
from policies.runtime import PolicyRuntime
from policies.samplers import gaussian_transition
from policies.streaming import (
    StreamingChunkSampler,
    StreamingLayout,
    level_alphas,
    training_levels,
)

N_TRAIN = 8
TINY = {
    "denoiser": "mlp",
    "denoiser_kwargs": {"hidden_dim": 32, "depth": 3},
    "obs_dim": 3,
    "action_dim": 2,
    "n_obs_steps": 1,
    "horizon": 8,
    "n_action_steps": 2,
    "num_train_steps": N_TRAIN,
}


def streaming_policy(**overrides):
    return random_policy({**TINY, **overrides}, "streaming", seed=0)


@pytest.mark.parametrize("n_obs_steps, horizon", [(1, 8), (2, 9)])
def test_buffer_length_pattern_and_nfe_per_call(n_obs_steps, horizon):
    policy = streaming_policy(n_obs_steps=n_obs_steps, horizon=horizon)
    sampler = build_chunk_sampler("streaming", policy)
    layout = sampler.layout
    assert (layout.n_sub_chunks, layout.levels_per_call) == (4, 2)
    pattern = layout.pattern()
    expected = torch.tensor([2] * (n_obs_steps - 1) + [2, 2, 4, 4, 6, 6, 8, 8])
    assert torch.equal(pattern, expected)
    runtime = PolicyRuntime(policy, sampler, 3, seed=0)
    obs = random_obs(policy, 3)
    nfes = []
    for _ in range(5):
        result = runtime.act(obs)
        nfes.append(result.nfe)
        assert runtime.state["buffer"].shape == (3, horizon, 2)
        assert torch.equal(runtime.state["levels"], pattern.expand(3, -1))
        assert result.actions.shape == (3, 2, 2)
    assert nfes == [N_TRAIN] + [N_TRAIN // 4] * 4


def test_executed_actions_are_noise_free():
    policy = streaming_policy()
    sampler = build_chunk_sampler("streaming", policy, eta=1.0)
    layout = sampler.layout
    executed = slice(0, layout.n_obs_steps - 1 + layout.n_action_steps)
    steps = sampler.steps_on("cpu")
    assert len(steps) == layout.levels_per_call
    last_t, last_a, last_a_prev, last_c = steps[-1]
    assert bool((last_t[executed] == 0).all()) and bool((last_t[executed.stop :] > 0).all())
    assert bool((last_a_prev[executed] == 1).all())
    # eta=1: the step into level 0 adds no noise, so the executed slice is the x0 prediction
    x, eps = torch.randn(1, 8, 2), torch.randn(1, 8, 2)
    mean, x0 = gaussian_transition(policy.schedule, last_c, x, eps, eps)
    std = last_c.std
    assert float(std[executed].abs().max()) == 0.0
    assert bool((std[executed.stop :] > 0).all())
    torch.testing.assert_close(mean[:, executed], x0[:, executed], rtol=0, atol=0)
    buffer = torch.randn(2, 8, 2)
    cond = torch.randn(2, policy.cfg.cond_dim)
    with torch.no_grad():
        chunk, denoised = sampler.advance(
            policy, cond, buffer, layout.pattern().expand(2, -1), torch.Generator()
        )
    torch.testing.assert_close(chunk[:, executed], denoised[:, executed], rtol=0, atol=0)
    assert chunk.shape == denoised.shape == (2, 8, 2)


def test_levels_follow_the_schedule():
    policy = streaming_policy()
    t = torch.tensor([[0, 1, 7]])
    a, a_prev = level_alphas(policy.schedule, t)
    ac = policy.schedule.alphas_cumprod
    torch.testing.assert_close(a[0, :, 0], ac[[0, 1, 7]])
    torch.testing.assert_close(a_prev[0, :, 0], torch.stack([torch.tensor(1.0), ac[0], ac[6]]))


def test_corrupted_levels_are_refused():
    policy = streaming_policy()
    sampler = build_chunk_sampler("streaming", policy)
    levels = sampler.layout.pattern().expand(1, -1).clone()
    levels[0, 0] = 5
    with pytest.raises(RuntimeError, match="not the pattern"):
        sampler.advance(policy, torch.zeros(1, 3), torch.zeros(1, 8, 2), levels, None)


def test_first_call_then_steady_state_and_reset():
    policy = streaming_policy()
    runtime = PolicyRuntime(policy, build_chunk_sampler("streaming", policy), 2, seed=0)
    obs = random_obs(policy, 2)
    assert runtime.act(obs).nfe == N_TRAIN
    assert runtime.act(obs).nfe == 2
    runtime.reset(np.array([False, True]))
    assert runtime.state["has_buffer"].tolist() == [True, False]
    mixed = runtime.act(obs)
    assert mixed.nfe == N_TRAIN + 2 and mixed.nfe_per_stream == (N_TRAIN + 2) / 2
    assert runtime.state["has_buffer"].tolist() == [True, True]


def test_training_levels_cover_every_inference_pattern():
    layout = StreamingLayout(horizon=8, n_obs_steps=1, n_action_steps=2, num_train_steps=N_TRAIN)
    levels = training_levels(layout, 20000, torch.Generator().manual_seed(0))
    assert levels.shape == (20000, 8)
    assert int(levels.min()) >= 1 and int(levels.max()) <= N_TRAIN
    seen = {tuple(row) for row in levels.tolist()}
    pattern = layout.pattern()
    steady = [tuple((pattern - c).tolist()) for c in range(layout.levels_per_call)]
    first_call = [tuple([lv] * 8) for lv in range(1, N_TRAIN + 1)]
    missing = [p for p in steady + first_call if p not in seen]
    assert not missing
    constant = (levels == levels[:, :1]).all(1).float().mean()
    assert 0.15 < float(constant) < 0.25


def test_streaming_loss_trains_with_per_action_levels():
    policy = streaming_policy()
    obs = {"state": torch.randn(16, 1, 3)}
    action = torch.rand(16, 8, 2) * 2 - 1
    opt = torch.optim.Adam(policy.denoiser.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss = policy.bc_loss(obs, action, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_layout_validation_errors():
    with pytest.raises(ValueError, match="divisible by Ta"):
        StreamingLayout(horizon=8, n_obs_steps=2, n_action_steps=2, num_train_steps=8)
    with pytest.raises(ValueError, match="divisible by the number of sub-chunks"):
        StreamingLayout(horizon=8, n_obs_steps=1, n_action_steps=2, num_train_steps=10)
    with pytest.raises(ValueError, match="divisible by the number of sub-chunks"):
        build_chunk_sampler("streaming", streaming_policy(num_train_steps=6))


def test_sampler_and_policy_type_must_match():
    diffusion = random_policy(TINY, seed=0)
    with pytest.raises(ValueError, match="valid samplers for this policy: ddpm, ddim"):
        build_chunk_sampler("streaming", diffusion)
    with pytest.raises(ValueError, match="per-action noise levels"):
        StreamingChunkSampler(diffusion)
    streaming = streaming_policy()
    for name in ("ddpm", "ddim", "rti", "truncated"):
        with pytest.raises(ValueError, match="valid samplers for this policy: streaming"):
            build_chunk_sampler(name, streaming)
    sampler = build_chunk_sampler("streaming", streaming)
    state = sampler.init_state(streaming, 1, "cpu")
    with pytest.raises(ValueError, match="guidance"):
        sampler.sample(streaming, torch.zeros(1, 3), state, generator=None, hooks=[print])
    with pytest.raises(ValueError, match="valid options: \\['eta'\\]"):
        build_chunk_sampler("streaming", streaming, steps=3)


def test_pretrain_config_for_streaming():
    cfg = load_config("pretrain", ["policy=streaming"])
    assert cfg.policy.type == "streaming"
    assert cfg.sampler.name == "streaming"
    layout = StreamingLayout(
        cfg.task.horizon,
        cfg.task.n_obs_steps,
        cfg.task.n_action_steps,
        cfg.policy.schedule.num_train_steps,
    )
    ddim_steps = 10
    assert 3 * layout.levels_per_call <= ddim_steps  # <= 1/3 of DDIM-10's NFE per action
