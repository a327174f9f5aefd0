import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


TINY_POLICY = ["policy.denoiser_kwargs.hidden_dim=64", "train.batch_size=64"]
"""Overrides that make `dppo pretrain` cheap enough for unit tests."""


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """20 scripted-expert episodes of the default task on disk."""
    from envs.demos import record_demos

    path, _ = record_demos(
        "point_reach", 20, tmp_path_factory.mktemp("demos") / "ds", seed=0, progress=False
    )
    return path


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory, demo_dataset):
    """A tiny pre-trained policy run folder (200 steps, no evaluation)."""
    from dppo.config import load_config
    from dppo.pretrain import pretrain

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "pre"
    cfg = load_config(
        "pretrain",
        [
            f"dataset={demo_dataset}",
            f"out={out}",
            "train.steps=200",
            "train.warmup_steps=10",
            "final_eval_episodes=0",
            "train.threads=1",
            *TINY_POLICY,
        ],
    )
    pretrain(cfg)
    return out
