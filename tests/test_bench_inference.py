"""`dppo bench inference`: one row per (sampler, network) with the cost columns and success."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dppo.bench_inference import (
    ROW_COLUMNS,
    format_table,
    forward_call,
    random_policy,
    run_bench_inference,
)
from dppo.config import load_config
from policies.checkpoint import save_policy

TINY = {
    "denoiser": "mlp",
    "denoiser_kwargs": {"hidden_dim": 32, "depth": 3},
    "obs_dim": 6,
    "action_dim": 2,
    "n_obs_steps": 1,
    "horizon": 4,
    "n_action_steps": 4,
    "num_train_steps": 20,
    "streaming": {"horizon": 16, "num_train_steps": 12},
}
SAMPLERS = ["ddpm", "ddim", "rti", "streaming", "truncated"]


def bench_cfg(tmp_path, **overrides):
    cfg = load_config("bench_inference", [f"out={tmp_path / 'bench.json'}"])
    plain = {k: cfg[k] for k in cfg}
    plain.update(
        {
            "network_presets": {"tiny": TINY},
            "networks": ["tiny"],
            "repeats": 3,
            "warmup": 2,
            "forward_repeats": 3,
            "threads": 1,
            **overrides,
        }
    )
    return plain


def test_rows_on_random_networks(tmp_path):
    result = run_bench_inference(bench_cfg(tmp_path, paths=["plain", "static"], clock="cpu"))
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    plain_rows = [r for r in rows if r["path"] == "plain"]
    assert [r["sampler"] for r in plain_rows] == SAMPLERS
    static = [r["sampler"] for r in rows if r["path"] == "static"]
    assert static == [s for s in SAMPLERS if s != "streaming"]  # no static streaming path
    assert result["n_rows"] == len(rows)
    nfe = {r["sampler"]: r["nfe_per_chunk"] for r in rows}
    assert nfe == {"ddpm": 20, "ddim": 10, "rti": 3, "streaming": 3, "truncated": 3}
    for row in rows:
        assert set(ROW_COLUMNS) <= set(row)
        assert row["success_rate"] is None
        assert row["ms_per_chunk_p99"] >= row["ms_per_chunk_p50"] > 0
        assert row["nfe_per_action"] == pytest.approx(row["nfe_per_chunk"] / row["n_action_steps"])
        assert row["overhead_ratio"] == pytest.approx(
            row["ms_per_chunk_p50"] / (row["nfe_per_chunk"] * row["forward_ms"])
        )
    assert "sampler" in format_table(rows).splitlines()[0]


def test_compiled_rows_also_time_the_compiled_network(tmp_path):
    policy = random_policy(TINY, seed=0)
    call = forward_call(policy, 2)
    compiled = torch.compile(call, dynamic=False)  # as the bench does: the result is returned,
    torch.testing.assert_close(compiled(), call())  # so the forward is not dead code
    assert call().shape == (2, TINY["horizon"], TINY["action_dim"])
    run_bench_inference(bench_cfg(tmp_path, samplers=["ddim"], paths=["compiled"], clock="cpu"))
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert row["path"] == "compiled" and row["nfe_per_chunk"] == 10
    assert row["overhead_ratio_vs_compiled_forward"] == pytest.approx(
        row["ms_per_chunk_p50"] / (10 * row["compiled_forward_ms"])
    )


def test_checkpoint_rows_report_success(tmp_path):
    policy = random_policy(TINY, seed=0)
    policy.cfg.task = "point_reach"
    folder = save_policy(policy, tmp_path / "ckpt")
    cfg = bench_cfg(
        tmp_path,
        networks=[],
        checkpoint=str(folder),
        n_episodes=2,
        n_envs=2,
        samplers=["ddim", "rti", "streaming"],
    )
    run_bench_inference(cfg)
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["sampler"] for r in rows] == ["ddim", "rti"]  # streaming needs a streaming policy
    for row in rows:
        assert 0.0 <= row["success_rate"] <= 1.0
        assert row["n_episodes"] == 2 and row["task"] == "point_reach"
        assert np.isfinite(row["ms_per_chunk_p50"])


def test_unknown_sampler_or_path_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="valid samplers"):
        run_bench_inference(bench_cfg(tmp_path, samplers=["ddim", "turbo"]))
    with pytest.raises(ValueError, match="valid paths"):
        run_bench_inference(bench_cfg(tmp_path, samplers=["ddim"], paths=["jit"]))
