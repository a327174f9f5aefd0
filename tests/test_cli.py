"""The `dppo` command line end to end on a tiny config, and its errors for bad input."""

import json
import subprocess
import sys

import pytest

from dppo.cli import main
from tests.conftest import TINY_POLICY


def test_help_lists_commands_and_overrides(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for cmd in ("demos", "pretrain", "eval", "finetune", "quickstart"):
        assert cmd in text
    assert main(["pretrain", "--help"]) == 0
    assert "train: pretrain" in capsys.readouterr().out
    assert main(["finetune", "--help"]) == 0
    assert "resume" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-m", "dppo.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "usage: dppo" in out.stdout


def test_demos_pretrain_eval_finetune_end_to_end(tmp_path, capsys):
    data, pre, ft = tmp_path / "demos", tmp_path / "pre", tmp_path / "ft"
    assert main(["demos", "n_episodes=8", f"out={data}"]) == 0
    assert (data / "meta" / "episode_ends").exists()
    assert (
        main(
            [
                "pretrain",
                f"dataset={data}",
                f"out={pre}",
                "train.steps=60",
                "train.warmup_steps=5",
                "train.checkpoint_every=30",
                "final_eval_episodes=4",
                "task.n_envs=4",
                *TINY_POLICY,
            ]
        )
        == 0
    )
    summary = json.loads((pre / "summary.json").read_text())
    assert 0.0 <= summary["success_rate"] <= 1.0 and summary["n_demo_episodes"] == 8
    assert (pre / "plots" / "pretrain.png").stat().st_size > 0
    assert (pre / "checkpoints" / "latest" / "model.safetensors").exists()
    assert not (pre / "INCOMPLETE").exists()
    losses = [
        json.loads(line)["loss"]
        for line in (pre / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert len(losses) >= 2 and losses[-1] < losses[0]  # the denoising loss falls
    assert (
        main(
            [
                "eval",
                f"checkpoint={pre}",
                "n_episodes=4",
                "n_envs=2",
                "sampler=ddim",
                "steps=3",
                "video=true",
                "video_episodes=1",
                f"out={tmp_path / 'ev'}",
            ]
        )
        == 0
    )
    assert (tmp_path / "ev" / "eval.mp4").stat().st_size > 1000
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    for key in ("success_rate", "mean_return", "n_episodes", "ms_per_chunk", "nfe_per_chunk"):
        assert key in report
    assert report["n_episodes"] == 4 and report["nfe_per_chunk"] == 3
    # the static-chain fast path reproduces the sampler's episodes exactly
    fast = ["eval", f"checkpoint={pre}", "n_episodes=4", "n_envs=2", "sampler=ddim", "steps=3"]
    assert main([*fast, "fast_path=eager", f"out={tmp_path / 'ev-fast'}"]) == 0
    fast_report = json.loads((tmp_path / "ev-fast" / "eval.json").read_text())
    for key in ("success_rate", "mean_return", "mean_length"):
        assert fast_report[key] == report[key], key
    assert (
        main(
            [
                "finetune",
                f"checkpoint={pre}",
                f"out={ft}",
                "iterations=2",
                "n_envs=4",
                "algorithm.n_steps=5",
                "algorithm.batch_size=20",
                "algorithm.critic_batch_size=10",
                "eval_every=2",
                "eval_episodes=4",
                "eval_n_envs=2",
                "algorithm.critic_warmup_iterations=0",
            ]
        )
        == 0
    )
    fs = json.loads((ft / "summary.json").read_text())
    assert fs["iterations"] == 2 and fs["env_steps"] > 0 and fs["success_rate"] is not None
    rec = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()][-1]
    for key in (
        "success_rate",
        "episode_return",
        "value_loss",
        "policy_loss",
        "approx_kl",
        "clip_frac",
        "ratio_mean",
        "explained_variance",
        "exploration_std",
        "time_rollout",
        "time_logprob",
        "time_update",
    ):
        assert key in rec, key
    assert (ft / "plots" / "finetune.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pretrain", "task=nope"], "Available options in 'task'"),
        (["pretrain", "bogus=1"], "valid top-level keys"),
        (["demos", "task=nope"], "Available options in 'task'"),
        (["eval", "checkpoint=x", "task=nope"], "no checkpoint"),
        (["eval", "checkpoint=/nonexistent"], "no checkpoint"),
        (["frobnicate"], "unknown command"),
        (["eval", "checkpoint=/nonexistent", "fast_path=jit"], "unknown fast_path 'jit'"),
        (["eval", "checkpoint=/nonexistent", "precision=bf16"], "needs a fast_path"),
    ],
)
def test_bad_input_fails_before_work(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_dataset_of_another_task_is_rejected(demo_dataset, tmp_path, capsys):
    code = main(
        [
            "pretrain",
            "task=point_reach_two_goals",
            f"dataset={demo_dataset}",
            f"out={tmp_path / 'r'}",
        ]
    )
    assert code == 2
    assert "state" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bench_dppo_reports_throughput(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "dppo",
            "iterations=1",
            "raw_env_steps=400",
            "task.n_envs=4",
            "algorithm.n_steps=5",
            "algorithm.batch_size=20",
            "algorithm.critic_batch_size=10",
            "algorithm.update_epochs=1",
            "policy.denoiser_kwargs.hidden_dim=32",
            f"out={out}",
        ]
    )
    assert code == 0
    figures = json.loads(out.read_text())
    for key in (
        "raw_env_steps_per_s",
        "rollout_env_steps_per_s",
        "update_pairs_per_s",
        "logprob_pairs_per_s",
    ):
        assert figures[key] > 0, key
    assert 0 < figures["rollout_over_raw"] < 1


def test_gaussian_ppo_expert_records_locomotion_demos(tmp_path):
    run, data = tmp_path / "ppo", tmp_path / "hopper-demos"
    assert (
        main(
            [
                "finetune",
                "algorithm=ppo_gaussian",
                "task=Hopper-v5",
                f"out={run}",
                "iterations=1",
                "n_envs=2",
                "algorithm.n_steps=25",
                "algorithm.batch_size=25",
                "algorithm.critic_batch_size=25",
                "eval_every=1",
                "eval_episodes=2",
                "eval_n_envs=2",
            ]
        )
        == 0
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["actor"] == "gaussian" and summary["mean_return"] is not None
    assert main(["demos", "task=Hopper-v5", f"expert={run}", "n_episodes=2", f"out={data}"]) == 0
    from envs.dataset import DemoDataset

    ds = DemoDataset(data)
    assert ds.n_episodes == 2 and ds.action_dim == 3
    assert main(["demos", "task=Hopper-v5", "n_episodes=2", f"out={tmp_path / 'x'}"]) == 2
