"""DDPM / DDIM transitions against diffusers, log-prob form, and chain recording."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from policies.samplers import DDIMSampler, DDPMSampler, ddim_timesteps
from policies.schedule import NoiseSchedule, ScheduleConfig

N = 100


@pytest.fixture
def schedule():
    return NoiseSchedule(ScheduleConfig(num_train_steps=N))


def fixed_eps(x, t, i):
    """A deterministic stand-in network: any function of (x, t) exercises the step maths."""
    return torch.sin(x * 3.0 + 0.01 * t)


def test_ddpm_steps_match_diffusers(schedule):
    ref = DDPMScheduler(num_train_timesteps=N, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    ref.set_timesteps(N)
    ours = DDPMSampler(schedule)
    assert ours.timesteps == ref.timesteps.tolist()
    x = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(ours.timesteps):
        eps = fixed_eps(x, t, i)
        # diffusers draws its variance noise as randn(shape, generator): seed both the same way
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        mean, std, _ = ours.gaussian(x, eps, i)
        ours_next = mean + std * noise
        ref_next = ref.step(eps, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        torch.testing.assert_close(ours_next, ref_next, rtol=1e-5, atol=1e-6)
        if t == 0:
            assert float(std.max()) == 0.0
        x = ours_next


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_steps_match_diffusers(schedule, eta):
    ref = DDIMScheduler(num_train_timesteps=N, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    ref.set_timesteps(10)
    ours = DDIMSampler(schedule, n_steps=10, eta=eta)
    assert ours.timesteps == ref.timesteps.tolist() == ddim_timesteps(N, 10)
    x = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(ours.timesteps):
        eps = fixed_eps(x, t, i)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        mean, std, _ = ours.gaussian(x, eps, i)
        ours_next = mean + std * noise
        ref_next = ref.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours_next, ref_next, rtol=1e-5, atol=1e-6)
        x = ours_next


def test_ddim_eta0_is_deterministic_and_uses_no_noise(schedule):
    ours = DDIMSampler(schedule, n_steps=5, eta=0.0)
    x = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(2))
    a = ours.run(fixed_eps, x, cond=None, generator=torch.Generator().manual_seed(3))
    b = ours.run(fixed_eps, x, cond=None, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    for i in range(ours.n_steps):
        assert float(ours.gaussian(x, fixed_eps(x, 0, i), i)[1].max()) == 0.0


def test_min_std_floor_and_noise_clip(schedule):
    ours = DDIMSampler(schedule, n_steps=5, eta=0.0, min_std=0.1, noise_clip=3.0)
    x = torch.randn(2, 4, 2)
    _, std, _ = ours.gaussian(x, fixed_eps(x, 0, 4), 4)
    assert torch.allclose(std, torch.full_like(std, 0.1))
    z = ours.draw_noise(torch.zeros(10000), torch.Generator().manual_seed(0))
    assert float(z.abs().max()) <= 3.0


def test_chain_recording_shape_and_consistency(schedule):
    ours = DDPMSampler(schedule, min_std=0.1)
    x = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(5))
    res = ours.run(
        fixed_eps, x, cond=None, generator=torch.Generator().manual_seed(6), record_from=N - 10
    )
    assert res.chain.shape == (3, 11, 4, 2)
    torch.testing.assert_close(res.chain[:, -1], res.x)
    assert res.nfe == N


def test_bad_timesteps_rejected(schedule):
    with pytest.raises(ValueError, match="descending"):
        DDIMSampler(schedule, timesteps=[3, 5, 0])
    with pytest.raises(ValueError, match="DDIM steps"):
        DDIMSampler(schedule, n_steps=0)
