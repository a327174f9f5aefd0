"""Tests of the denoiser networks (policies/denoisers.py) at small sizes."""

import pytest
import torch

from policies.denoisers import DENOISERS, UNet1DDenoiser, build_denoiser

torch.set_num_threads(1)

BATCH, HORIZON, ACTION_DIM, COND_DIM = 3, 8, 4, 6
SMALL = {
    "mlp": {"hidden_dim": 32, "depth": 3, "time_dim": 8},
    "unet": {"down_dims": (16, 32), "kernel_size": 3, "n_groups": 4, "step_embed_dim": 16},
    "transformer": {"n_layer": 2, "n_head": 2, "n_emb": 32},
}
KINDS = sorted(SMALL)


def small(kind: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_denoiser(kind, ACTION_DIM, HORIZON, COND_DIM, **{**SMALL[kind], **overrides})
    return net.eval()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, HORIZON, ACTION_DIM, generator=gen)
    t = torch.randint(0, 100, (BATCH,), generator=gen)
    cond = torch.randn(BATCH, COND_DIM, generator=gen)
    return x, t, cond


def test_factory_covers_every_kind():
    assert set(DENOISERS) == set(SMALL)


@pytest.mark.parametrize("kind", KINDS)
def test_output_shape_with_batch_levels(kind):
    x, t, cond = batch()
    net = small(kind)
    assert net.per_action_levels is False
    eps = net(x, t, cond)
    assert eps.shape == x.shape
    assert torch.isfinite(eps).all()
    # long and float timesteps are the same level
    torch.testing.assert_close(net(x, t.float(), cond), eps)


@pytest.mark.parametrize("kind", KINDS)
def test_per_action_levels(kind):
    x, t, cond = batch()
    net = small(kind, per_action_levels=True)
    levels = t[:, None].expand(BATCH, HORIZON).clone()
    eps = net(x, levels, cond)
    assert eps.shape == x.shape
    # a (B,) t is the same as the broadcast (B, Tp) levels
    torch.testing.assert_close(net(x, t, cond), eps)
    # changing a single action's level changes the prediction
    levels[:, HORIZON // 2] += 30
    assert (net(x, levels, cond) - eps).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_per_action_levels_rejected_without_flag(kind):
    x, t, cond = batch()
    net = small(kind)
    with pytest.raises(ValueError, match="per_action_levels"):
        net(x, t[:, None].expand(BATCH, HORIZON), cond)
    with pytest.raises(ValueError, match="shape"):
        net(x, t[:2], cond)


@pytest.mark.parametrize("kind", KINDS)
def test_cond_changes_output(kind):
    x, t, cond = batch()
    net = small(kind)
    eps = net(x, t, cond)
    other = net(x, t, cond + torch.randn_like(cond))
    assert (other - eps).abs().max() > 1e-4
    # samples are independent: changing one sample's cond leaves the others untouched
    cond2 = cond.clone()
    cond2[0] += 1.0
    torch.testing.assert_close(net(x, t, cond2)[1:], eps[1:])


@pytest.mark.parametrize("kind", KINDS)
def test_training_reduces_loss(kind):
    x, t, cond = batch()
    target = torch.randn_like(x, generator=torch.Generator().manual_seed(2))
    net = small(kind).train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(net(x, t, cond), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_causal_transformer_ignores_later_actions():
    x, t, cond = batch()
    net = small("transformer", causal=True)
    eps = net(x, t, cond)
    x2 = x.clone()
    x2[:, -1] += 1.0
    eps2 = net(x2, t, cond)
    torch.testing.assert_close(eps2[:, :-1], eps[:, :-1])
    assert (eps2[:, -1] - eps[:, -1]).abs().max() > 1e-4
    # without the causal mask the first action sees the last one
    acausal = small("transformer", causal=False)
    assert (acausal(x2, t, cond)[:, 0] - acausal(x, t, cond)[:, 0]).abs().max() > 1e-4


def test_unet_constant_levels_match_global_unet():
    x, t, cond = batch()
    global_net = small("unet")
    streaming = small("unet", per_action_levels=True)
    streaming.load_state_dict(global_net.state_dict())
    torch.testing.assert_close(streaming(x, t, cond), global_net(x, t, cond))


def test_default_unet_size():
    net = UNet1DDenoiser(action_dim=10, horizon=16, cond_dim=2 * 20)
    n_params = sum(p.numel() for p in net.parameters())
    assert 55e6 <= n_params <= 75e6


def test_shape_constraints():
    with pytest.raises(ValueError, match="divisible"):
        build_denoiser("unet", ACTION_DIM, 6, COND_DIM, down_dims=(16, 32, 64))
    with pytest.raises(ValueError, match="odd"):
        build_denoiser("mlp", ACTION_DIM, HORIZON, COND_DIM, depth=4)


def test_factory_errors():
    with pytest.raises(ValueError, match="valid kinds.*mlp.*transformer.*unet"):
        build_denoiser("resnet", ACTION_DIM, HORIZON, COND_DIM)
    with pytest.raises(TypeError, match="n_layers"):
        build_denoiser("transformer", ACTION_DIM, HORIZON, COND_DIM, n_layers=2)
