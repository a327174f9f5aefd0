"""Truncated / anchored diffusion: start level, k-means anchors from a real dataset, storage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dppo.bench_inference import random_obs, random_policy
from envs.dataset import write_dataset
from policies.checkpoint import save_policy
from policies.chunk_samplers import build_chunk_sampler
from policies.runtime import PolicyRuntime
from policies.truncated import (
    ANCHORS_FILE,
    dataset_chunks,
    fit_anchors,
    kmeans,
    load_anchors,
    save_anchors,
)

N_TRAIN = 50
TINY = {
    "denoiser": "mlp",
    "denoiser_kwargs": {"hidden_dim": 32, "depth": 3},
    "obs_dim": 3,
    "action_dim": 2,
    "n_obs_steps": 1,
    "horizon": 4,
    "n_action_steps": 2,
    "num_train_steps": N_TRAIN,
}
MODES = np.array([[0.5, -0.5], [-0.8, 0.2], [0.1, 0.9]], dtype=np.float32)


@pytest.fixture
def policy():
    p = random_policy(TINY, seed=0)
    p.normalizer.fit(
        {
            "state": np.random.default_rng(0).normal(size=(50, 3)),
            "action": np.array([[-1.0, -1.0], [1.0, 1.0]]),
        }
    )
    return p


@pytest.fixture
def dataset(tmp_path):
    """Three constant-action behaviours, two episodes each: three distinct action chunks."""
    rng = np.random.default_rng(0)
    episodes = []
    for i in range(6):
        length = 5 + i
        episodes.append(
            {
                "obs": {"state": rng.normal(size=(length, 3)).astype(np.float32)},
                "action": np.repeat(MODES[i % 3][None], length, axis=0),
            }
        )
    return write_dataset(tmp_path / "demos", episodes, meta={"task": "bench"})


def test_start_level_is_the_schedule_value(policy):
    anchors = torch.rand(5, 4, 2) * 2 - 1
    sampler = build_chunk_sampler("truncated", policy, anchors=anchors, start_step=7)
    a_bar = policy.schedule.alphas_cumprod[7]
    assert sampler.start_timestep == 7
    assert sampler.diffusion.timesteps == [7, 0]
    assert sampler.start_noise_level == pytest.approx(float((1 - a_bar).sqrt()), rel=1e-6)
    z = torch.randn(5, 4, 2)
    noised = sampler.noise_anchor(anchors, z)
    torch.testing.assert_close(noised, a_bar.sqrt() * anchors + (1 - a_bar).sqrt() * z)
    default = build_chunk_sampler("truncated", policy, anchors=anchors)
    assert default.start_timestep == round(0.2 * (N_TRAIN - 1))


def test_anchors_come_from_the_dataset(policy, dataset):
    chunks = dataset_chunks(policy, dataset)
    assert chunks.shape[1:] == (4, 2)
    anchors = fit_anchors(policy, dataset, k=3, seed=0)
    expected = policy.normalizer.normalize("action", torch.as_tensor(MODES))
    found = sorted(anchors[:, 0].tolist())
    assert np.allclose(found, sorted(expected.tolist()), atol=1e-6)
    for anchor in anchors:  # constant chunks: every action of an anchor is its mode
        torch.testing.assert_close(anchor, anchor[:1].expand(4, -1))
    assert torch.equal(anchors, fit_anchors(policy, dataset, k=3, seed=0))


def test_kmeans_centres_are_member_means():
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(1))
    centres, labels = kmeans(x, 5, seed=3)
    for j in range(5):
        torch.testing.assert_close(centres[j], x[labels == j].mean(0), atol=1e-5, rtol=1e-5)
    assert torch.equal(labels, torch.cdist(x, centres).argmin(1))
    with pytest.raises(ValueError, match="k-means needs"):
        kmeans(x, 0)


def test_anchors_stored_with_a_checkpoint_and_found_from_its_run(policy, dataset, tmp_path):
    folder = save_policy(policy, tmp_path / "run" / "checkpoints" / "latest")
    with pytest.raises(ValueError, match="needs anchors"):
        build_chunk_sampler("truncated", policy, anchors=str(folder))
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"dataset": str(dataset)}))
    from_run = build_chunk_sampler("truncated", policy, anchors=str(tmp_path / "run"), k=3)
    assert from_run.anchors.shape == (3, 4, 2)
    anchors = fit_anchors(policy, dataset, k=2)
    path = save_anchors(folder, anchors, meta={"k": 2, "dataset": str(dataset)})
    assert path.name == ANCHORS_FILE
    torch.testing.assert_close(load_anchors(tmp_path / "run"), anchors)
    sampler = build_chunk_sampler("truncated", policy, anchors=str(folder))
    torch.testing.assert_close(sampler.anchors, anchors)


@pytest.mark.parametrize("selection, nfe", [("x0", 3), ("consistency", 2)])
def test_sampling_cost_and_shapes(policy, selection, nfe):
    anchors = torch.rand(6, 4, 2) * 2 - 1
    sampler = build_chunk_sampler("truncated", policy, anchors=anchors, selection=selection)
    runtime = PolicyRuntime(policy, sampler, 3, seed=0)
    result = runtime.act(random_obs(policy, 3))
    assert result.nfe == nfe
    assert result.chunk.shape == (3, 4, 2)
    assert np.isfinite(result.chunk).all()


def test_nearest_anchor(policy):
    anchors = torch.stack([torch.full((4, 2), v) for v in (-0.5, 0.0, 0.5)])
    sampler = build_chunk_sampler("truncated", policy, anchors=anchors)
    x0 = torch.stack([torch.full((4, 2), v) for v in (0.4, -0.9, 0.1)])
    assert sampler.nearest_anchor(x0).tolist() == [2, 0, 1]
    gen = torch.Generator().manual_seed(0)
    many = torch.rand(20, 4, 2, generator=gen) * 2 - 1
    sampler = build_chunk_sampler("truncated", policy, anchors=many)
    chunks = torch.rand(50, 4, 2, generator=gen) * 2 - 1
    brute = torch.cdist(chunks.flatten(1), many.flatten(1)).argmin(1)
    assert torch.equal(sampler.nearest_anchor(chunks), brute)


def test_bad_options(policy):
    anchors = torch.rand(6, 4, 2)
    with pytest.raises(ValueError, match="selection"):
        build_chunk_sampler("truncated", policy, anchors=anchors, selection="vote")
    with pytest.raises(ValueError, match="do not fit"):
        build_chunk_sampler("truncated", policy, anchors=torch.rand(6, 5, 2))
    with pytest.raises(ValueError, match="needs anchors"):
        build_chunk_sampler("truncated", policy)
    with pytest.raises(ValueError, match="valid options"):
        build_chunk_sampler("truncated", policy, anchors=anchors, classifier="mlp")
