"""Normaliser, EMA, checkpoints and the policy runtime."""

import numpy as np
import pytest
import torch

from policies.checkpoint import (
    load_policy,
    load_tree,
    resolve_checkpoint,
    save_policy,
    save_tree,
)
from policies.chunk_samplers import build_chunk_sampler
from policies.diffusion import DiffusionPolicy, PolicyConfig
from policies.ema import EMA
from policies.normalizer import Normalizer
from policies.runtime import PolicyRuntime


def tiny_policy(**kw) -> DiffusionPolicy:
    cfg = dict(
        task="point_reach",
        obs_shapes={"state": [6]},
        action_dim=2,
        n_obs_steps=2,
        horizon=4,
        n_action_steps=2,
        denoiser="mlp",
        denoiser_kwargs={"hidden_dim": 32},
        schedule={"num_train_steps": 10},
    )
    cfg.update(kw)
    return DiffusionPolicy(PolicyConfig(**cfg))


def test_normalizer_round_trip_and_constant_dims():
    data = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    data[:, 2] = 5.0  # constant dimension
    norm = Normalizer({"x": (3,)}).fit({"x": data})
    x = torch.as_tensor(data)
    y = norm.normalize("x", x)
    assert float(y[:, :2].min()) == pytest.approx(-1) and float(y[:, :2].max()) == pytest.approx(1)
    assert torch.isfinite(y).all() and torch.allclose(y[:, 2], torch.zeros(100))
    torch.testing.assert_close(norm.unnormalize("x", y), x, rtol=1e-5, atol=1e-5)


def test_ema_warmup_decay_and_tracking():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, power=0.75, max_decay=0.9999)
    assert ema.decay(0) == 0.0
    assert 0 < ema.decay(10) < ema.decay(1000) <= 0.9999
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # decay 0 at step 0: copies
    torch.testing.assert_close(ema.model.weight, net.weight)


def test_checkpoint_round_trip_gives_identical_actions(tmp_path):
    policy = tiny_policy()
    policy.normalizer.fit({"state": np.random.rand(50, 6), "action": np.random.rand(50, 2)})
    save_policy(policy, tmp_path / "ckpt", meta={"step": 1})
    loaded = load_policy(tmp_path / "ckpt" / "model.safetensors")
    obs = {"state": np.random.rand(3, 2, 6).astype(np.float32)}
    outs = []
    for p in (policy, loaded):
        rt = PolicyRuntime(p, build_chunk_sampler("ddpm", p), 3, seed=7)
        outs.append(rt.act(obs).actions)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert resolve_checkpoint(tmp_path / "ckpt") == tmp_path / "ckpt"


def test_checkpoint_mismatch_and_pickle_errors(tmp_path):
    save_policy(tiny_policy(), tmp_path / "c")
    with pytest.raises(ValueError, match="trained on task 'point_reach', not 'lift'"):
        load_policy(tmp_path / "c", task="lift")
    with pytest.raises(ValueError, match="action dim 2 does not match the task's 7"):
        load_policy(tmp_path / "c", action_dim=7)
    with pytest.raises(ValueError, match="observation spec"):
        load_policy(tmp_path / "c", obs_shapes={"state": (9,)})
    (tmp_path / "model.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickled checkpoints are not loaded"):
        resolve_checkpoint(tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_checkpoint(tmp_path / "missing")


def test_save_tree_round_trips_optimizer_state(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_tree(tmp_path, "state", {"opt": opt.state_dict(), "n": 3, "rng": torch.get_rng_state()})
    back = load_tree(tmp_path, "state")
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    opt2.load_state_dict(back["opt"])
    assert opt2.param_groups[0]["lr"] == 1e-3 and back["n"] == 3
    torch.testing.assert_close(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


def test_runtime_executes_slice_and_keeps_history():
    policy = tiny_policy()
    rt = PolicyRuntime(policy, build_chunk_sampler("ddim", policy, steps=3), 2, seed=0)
    res = rt.step({"state": np.zeros((2, 6), np.float32)})
    assert res.actions.shape == (2, 2, 2) and res.chunk.shape == (2, 4, 2) and res.nfe == 3
    np.testing.assert_array_equal(res.actions, res.chunk[:, 1:3])  # [To-1, To-1+Ta)
    rt.step({"state": np.ones((2, 6), np.float32)}, reset=np.array([True, False]))
    hist = rt.history.stacked()["state"]
    assert hist[0].tolist() == [[1.0] * 6] * 2 and hist[1].tolist() == [[0.0] * 6, [1.0] * 6]
    with pytest.raises(ValueError, match="expected"):
        rt.act({"state": np.zeros((2, 3, 6), np.float32)})
    with pytest.raises(KeyError, match="lacks key"):
        rt.act({"image": np.zeros((2, 2, 6), np.float32)})


def test_sampler_errors_list_valid_options():
    policy = tiny_policy()
    with pytest.raises(ValueError, match="valid samplers"):
        build_chunk_sampler("nope", policy)
    with pytest.raises(ValueError, match="valid options"):
        build_chunk_sampler("ddim", policy, stepz=3)


def test_policy_config_rejects_slice_outside_horizon():
    with pytest.raises(ValueError, match="does not fit"):
        tiny_policy(n_obs_steps=3, horizon=4, n_action_steps=4)
