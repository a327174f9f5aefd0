"""GAE, clip schedule, denoising discount, log-prob and reward scaling against hand computations."""

import math

import numpy as np
import torch

from dppo.ppo_math import (
    RunningRewardScaler,
    clip_schedule,
    denoising_discount,
    explained_variance,
    gae,
    gaussian_log_prob,
)


def test_gae_hand_computed_with_truncation_and_termination():
    gamma, lam = 0.9, 0.5
    # one env, 4 steps: step 1 truncates (bootstrap from V(final obs) = 2.0), step 3 terminates
    rewards = np.array([[1.0], [2.0], [0.5], [3.0]])
    values = np.array([[0.4], [0.3], [0.2], [0.1]])
    dones = np.array([[0.0], [1.0], [0.0], [1.0]])
    next_values = np.array([[0.3], [2.0], [0.1], [0.0]])
    adv, ret = gae(rewards, values, next_values, dones, gamma, lam)
    d3 = 3.0 + 0 - 0.1
    d2 = 0.5 + gamma * 0.1 - 0.2
    a3, a2 = d3, d2 + gamma * lam * d3
    d1 = 2.0 + gamma * 2.0 - 0.3
    a1 = d1  # episode ended: no recursion across the boundary
    d0 = 1.0 + gamma * 0.3 - 0.4
    a0 = d0 + gamma * lam * a1
    np.testing.assert_allclose(adv[:, 0], [a0, a1, a2, a3], rtol=1e-6)
    np.testing.assert_allclose(ret, adv + values, rtol=1e-6)


def test_clip_schedule_values_and_single_step():
    k, clip, base = 10, 0.01, 0.001
    got = clip_schedule(k, clip, base)
    expected = [
        base + (clip - base) * (math.exp(3 * i / (k - 1)) - 1) / (math.exp(3) - 1) for i in range(k)
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[0] == np.float32(base) and abs(got[-1] - clip) < 1e-7
    assert np.all(np.diff(got) > 0)
    single = clip_schedule(1, clip, base)
    assert single.tolist() == [np.float32(clip)] and np.isfinite(single).all()


def test_denoising_discount_shares_advantage_across_steps():
    disc = denoising_discount(4, 0.99)
    np.testing.assert_allclose(disc, [0.99**3, 0.99**2, 0.99, 1.0], rtol=1e-6)


def test_gaussian_log_prob_matches_torch_normal():
    x, mean, std = torch.randn(5, 3), torch.randn(5, 3), torch.rand(5, 3) + 0.1
    ours = gaussian_log_prob(x, mean, std, clamp=None)
    ref = torch.distributions.Normal(mean, std).log_prob(x)
    torch.testing.assert_close(ours, ref)
    clamped = gaussian_log_prob(x * 100, mean, std)
    assert float(clamped.min()) >= -5.0 and float(clamped.max()) <= 2.0


def test_reward_scaler_divides_by_return_std_and_round_trips():
    scaler = RunningRewardScaler(n_envs=2, gamma=0.99)
    rng = np.random.default_rng(0)
    for _ in range(50):
        out = scaler(rng.normal(5.0, 2.0, size=2), np.zeros(2))
    assert scaler.std > 1.0 and np.all(np.abs(out) < 5.0)
    clone = RunningRewardScaler(n_envs=2, gamma=0.99)
    clone.load_state_dict(scaler.state_dict())
    r = np.array([1.0, -1.0])
    np.testing.assert_allclose(clone(r, np.zeros(2)), scaler(r, np.zeros(2)))


def test_explained_variance():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(y, y) == 1.0
    assert explained_variance(np.full(4, y.mean()), y) == 0.0
