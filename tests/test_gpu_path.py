"""GPU path: static (capturable) chains reproduce the samplers; CPU falls back to eager cleanly.

The CUDA tests run only where a GPU is present (scripts/bench_inference_gpu.sh runs them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dppo.bench_inference import random_obs, random_policy
from policies.chunk_samplers import build_chunk_sampler
from policies.gpu import StaticChain, accelerate
from policies.runtime import PolicyRuntime

TINY = {
    "denoiser": "mlp",
    "denoiser_kwargs": {"hidden_dim": 32, "depth": 3},
    "obs_dim": 3,
    "action_dim": 2,
    "n_obs_steps": 1,
    "horizon": 8,
    "n_action_steps": 4,
    "num_train_steps": 20,
}
SAMPLERS = [
    ("ddim", {"steps": 10}),
    ("ddim", {"steps": 5, "eta": 1.0}),
    ("ddpm", {"min_std": 0.1, "noise_clip": 3.0}),
    ("rti", {"steps": [3, 1, 0]}),
    ("rti", {"base": "ddpm", "eta": 0.5}),
    ("truncated", {"anchors": torch.linspace(-1, 1, 5 * 8 * 2).view(5, 8, 2)}),
]
CUDA = torch.cuda.is_available()


def chunks(policy, sampler, device="cpu", calls=4, streams=3):
    runtime = PolicyRuntime(policy, sampler, streams, seed=7, device=device)
    obs = random_obs(policy, streams)
    out = []
    for i in range(calls):
        if i == 2:
            runtime.reset(np.array([True] + [False] * (streams - 1)))
        out.append(runtime.act(obs))
    return out


@pytest.mark.parametrize("name, options", SAMPLERS)
@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_cpu_fallback_reproduces_the_sampler(name, options, mode):
    policy = random_policy(TINY, seed=0)
    ref = chunks(policy, build_chunk_sampler(name, policy, **options))
    fast = accelerate(build_chunk_sampler(name, policy, **options), policy, mode=mode)
    got = chunks(policy, fast)
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_array_equal(a.chunk, b.chunk)
        assert a.nfe == b.nfe
    chains = [v for v in vars(fast).values() if isinstance(v, StaticChain)]
    assert chains and all(c.active_mode == "eager" for c in chains)
    # a one-call probe (truncated's anchor choice) runs no chain: it stays a plain sampler
    assert not any(isinstance(getattr(fast, part), StaticChain) for part in fast.eager_parts)


def test_compiled_chains_on_cpu_match_the_sampler():
    """rti: its cold DDIM-10 chain and its 3-step warm chain, each compiled by inductor."""
    policy = random_policy(TINY, seed=0)
    options = {"steps": [3, 1, 0]}
    ref = chunks(policy, build_chunk_sampler("rti", policy, **options))
    fast = accelerate(build_chunk_sampler("rti", policy, **options), policy, mode="compile")
    got = chunks(policy, fast)
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_allclose(a.chunk, b.chunk, rtol=1e-4, atol=1e-5)
        assert a.nfe == b.nfe
    assert fast.warm.active_mode == fast.cold.diffusion.active_mode == "compile"


def test_compiled_truncated_matches_the_sampler():
    """The anchor choice (probe network, nearest anchor, noising) and the 2-step chain."""
    policy = random_policy(TINY, seed=0)
    options = dict(SAMPLERS[-1][1])
    ref = chunks(policy, build_chunk_sampler("truncated", policy, **options))
    fast = accelerate(build_chunk_sampler("truncated", policy, **options), policy, mode="compile")
    for a, b in zip(ref, chunks(policy, fast), strict=True):
        np.testing.assert_allclose(a.chunk, b.chunk, rtol=1e-4, atol=1e-5)
    # one compiled call: the anchor choice and the static chain together
    assert fast.anchored_chunk._torchdynamo_orig_callable.__func__ is type(fast).anchored_chunk


def test_compiled_streaming_levels_match_the_sampler():
    policy = random_policy({**TINY, "num_train_steps": 6}, "streaming", seed=0)  # D = 3
    options = {"eta": 0.5}  # noise drawn before the compiled call, in the eager order
    ref = chunks(policy, build_chunk_sampler("streaming", policy, **options))
    fast = accelerate(build_chunk_sampler("streaming", policy, **options), policy, mode="compile")
    for a, b in zip(ref, chunks(policy, fast), strict=True):
        np.testing.assert_allclose(a.chunk, b.chunk, rtol=1e-4, atol=1e-5)
        assert a.nfe == b.nfe


def test_bf16_runs_on_a_copy_and_stays_close():
    policy = random_policy(TINY, seed=0)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    ref = chunks(policy, build_chunk_sampler("ddim", policy, steps=10))
    fast = accelerate(build_chunk_sampler("ddim", policy, steps=10), policy, precision="bf16")
    got = chunks(policy, fast)
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_allclose(a.chunk, b.chunk, atol=0.1)
    assert fast.diffusion.networks[0] is not policy.denoiser
    assert fast.diffusion.networks[0].net[0].weight.dtype == torch.bfloat16
    for k, v in policy.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


def test_frozen_copy_serves_its_steps():
    policy = random_policy(TINY, seed=0)
    policy.add_frozen_copy(finetuned_below_t=8)
    with torch.no_grad():
        for p in policy.denoiser.parameters():
            p.add_(0.05)
    ref = chunks(policy, build_chunk_sampler("ddim", policy, steps=10))
    fast = accelerate(build_chunk_sampler("ddim", policy, steps=10), policy)
    nets = fast.diffusion.networks
    assert nets[0] is policy.frozen_denoiser and nets[-1] is policy.denoiser
    for a, b in zip(ref, chunks(policy, fast), strict=True):
        np.testing.assert_array_equal(a.chunk, b.chunk)


def test_hooks_take_the_eager_sampler():
    policy = random_policy(TINY, seed=0)

    def shrink(ctx):
        ctx.eps = ctx.eps * 0.9

    ref = PolicyRuntime(policy, build_chunk_sampler("ddim", policy), 2, hooks=[shrink], seed=1)
    fast = PolicyRuntime(
        policy, accelerate(build_chunk_sampler("ddim", policy), policy), 2, hooks=[shrink], seed=1
    )
    obs = random_obs(policy, 2)
    np.testing.assert_array_equal(ref.act(obs).chunk, fast.act(obs).chunk)


def test_bad_requests():
    policy = random_policy(TINY, seed=0)
    with pytest.raises(ValueError, match="valid modes"):
        accelerate(build_chunk_sampler("ddim", policy), policy, mode="jit")
    with pytest.raises(ValueError, match="valid"):
        accelerate(build_chunk_sampler("ddim", policy), policy, precision="fp8")
    streaming = random_policy(TINY, "streaming", seed=0)
    with pytest.raises(ValueError, match="streaming sampler.*only mode='compile'"):
        accelerate(build_chunk_sampler("streaming", streaming), streaming)
    with pytest.raises(ValueError, match="only mode='compile' in fp32"):
        accelerate(
            build_chunk_sampler("streaming", streaming), streaming, "compile", precision="bf16"
        )


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name, options", SAMPLERS)
def test_cuda_graph_matches_eager_on_gpu(name, options):
    policy = random_policy(TINY, seed=0)
    ref = chunks(policy, build_chunk_sampler(name, policy, **options), device="cuda")
    fast = accelerate(build_chunk_sampler(name, policy, **options), policy, mode="graph")
    got = chunks(policy, fast, device="cuda")
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_allclose(a.chunk, b.chunk, atol=1e-5, rtol=1e-5)
    chains = [v for v in vars(fast).values() if isinstance(v, StaticChain)]
    assert all(c.active_mode == "graph" for c in chains)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_streaming_runs_and_trains_on_gpu():
    policy = random_policy(TINY, "streaming", seed=0).to("cuda")
    runtime = PolicyRuntime(
        policy, build_chunk_sampler("streaming", policy), 2, seed=0, device="cuda"
    )
    obs = random_obs(policy, 2)
    nfes = [runtime.act(obs).nfe for _ in range(3)]
    assert nfes == [20, 10, 10]
    loss = policy.bc_loss(
        {"state": torch.randn(4, 1, 3, device="cuda")}, torch.rand(4, 8, 2, device="cuda")
    )
    loss.backward()
    assert torch.isfinite(loss)
