"""Robot client (action queue, latency compensation, blending), robot-sim, CLI server lifecycle."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed

import envs
from dppo import commands
from dppo.config import load_config
from dppo.evaluate import evaluate
from dppo.serving.client import connect
from dppo.serving.robot import ActionQueue, RobotConfig
from dppo.serving.robot_sim import run_robot_sim
from tests.test_server import (
    OBS_KEY,
    SAMPLER,
    TA,
    TASK,
    env_observations,
    in_process,
    start,
    tiny_checkpoint,
)

DA = 2
SERVER_START_TIMEOUT_S = 60
SHUTDOWN_TIMEOUT_S = 20
FAST_RATE_HZ = 400.0  # a sped-up control loop keeps episodes short


def chunk(start: float, n: int = TA) -> np.ndarray:
    """A recognisable chunk (n, Da): action i is [start + i, -(start + i)]."""
    values = start + np.arange(n, dtype=np.float64)
    return np.stack([values, -values], axis=1)


# -------------------------------------------------------------------------------------------
# Action queue: latency compensation and blending, with made-up control steps
# -------------------------------------------------------------------------------------------
def test_queue_drops_actions_whose_time_has_passed():
    q = ActionQueue("latest")
    assert q.add(chunk(0.0), start_step=10, now_step=10) == 0
    np.testing.assert_array_equal(q.pop(10), [0.0, -0.0])
    assert q.remaining(11) == 3
    # A reply for an observation taken at step 11 arrives at step 13: steps 11, 12 are stale.
    assert q.add(chunk(100.0), start_step=11, now_step=13) == 2
    np.testing.assert_array_equal(q.pop(13), [102.0, -102.0])
    assert q.remaining(14) == 1
    # The loop fell behind to step 15: the action of step 14 is skipped, never executed.
    assert q.pop(15) is None
    assert q.dropped == 3
    assert q.add(chunk(0.0), start_step=0, now_step=50) == TA and q.remaining(50) == 0


def test_latest_blend_executes_only_the_newest_chunk():
    q = ActionQueue("latest")
    q.add(chunk(0.0, n=6), start_step=0, now_step=0)
    q.add(chunk(100.0, n=2), start_step=1, now_step=1)
    np.testing.assert_array_equal(q.pop(1), chunk(100.0, n=2)[0])
    np.testing.assert_array_equal(q.pop(2), chunk(100.0, n=2)[1])
    assert q.pop(3) is None and q.remaining(0) == 0  # the old chunk's tail is gone too


def test_average_blend_mixes_overlapping_steps():
    w = 0.25
    q = ActionQueue("average", blend_weight=w)
    old, new = chunk(0.0), chunk(100.0)
    q.add(old, start_step=0, now_step=0)
    q.pop(0)
    q.pop(1)
    q.add(new, start_step=2, now_step=2)  # overlaps old steps 2, 3; steps 4, 5 only in new
    got = [q.pop(s) for s in range(2, 6)]
    np.testing.assert_allclose(got[0], (1 - w) * old[2] + w * new[0])
    np.testing.assert_allclose(got[1], (1 - w) * old[3] + w * new[1])
    np.testing.assert_array_equal(got[2], new[2])
    np.testing.assert_array_equal(got[3], new[3])
    assert q.dropped == 0


def test_robot_settings_are_validated():
    with pytest.raises(ValueError, match="blend"):
        ActionQueue("median")
    with pytest.raises(ValueError, match="blend_weight"):
        ActionQueue("average", blend_weight=0.0)
    with pytest.raises(ValueError, match="on_starve"):
        RobotConfig(rate_hz=10.0, on_starve="skip")
    with pytest.raises(ValueError, match="rate_hz"):
        RobotConfig(rate_hz=0.0)


# -------------------------------------------------------------------------------------------
# Robot client over a real server
# -------------------------------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path):
    return tiny_checkpoint(tmp_path)


def test_robot_sim_completes_episodes_through_the_server(checkpoint):
    max_steps = envs.get_task(TASK).max_episode_steps
    with start(checkpoint) as server:
        report = run_robot_sim(server.url, n_episodes=2, rate_hz=FAST_RATE_HZ, progress=False)
        sessions = server.server.stats.connections
    assert report["task"] == TASK and report["n_episodes"] == 2
    assert 0.0 <= report["success_rate"] <= 1.0
    assert 1 <= report["mean_length"] <= max_steps
    steps = report["mean_length"] * 2
    assert report["requests"] >= steps / TA  # at least one chunk per Ta executed steps
    assert 0 < report["rtt_ms_p50"] <= report["rtt_ms_p99"]
    assert report["inference_ms_p50"] > 0 and report["held_steps"] == 0
    assert sessions == 1


def test_robot_sim_in_lockstep_reproduces_in_process_evaluation(checkpoint):
    """Chunk by chunk, waiting for each reply, the served policy plays the in-process episodes."""
    seed, n_episodes = 3, 2
    expected = evaluate(
        in_process(checkpoint), TASK, n_episodes, n_envs=1, seed=seed, progress=False
    )
    with start(checkpoint) as server:
        report = run_robot_sim(
            server.url,
            n_episodes=n_episodes,
            seed=seed,
            rate_hz=FAST_RATE_HZ,
            low_watermark=0,
            on_starve="wait",
            progress=False,
        )
    assert report["success_rate"] == expected.success_rate
    assert report["mean_return"] == pytest.approx(expected.mean_return, rel=1e-9)
    assert report["mean_length"] == expected.mean_length
    assert report["dropped_actions"] == 0 and report["held_steps"] == 0
    assert report["requests"] == n_episodes * expected.mean_length / TA


def test_late_replies_are_compensated_by_dropping_and_holding(checkpoint):
    """Asking only when the queue is empty makes every reply late by >= 1 tick, whatever the
    machine's speed: the loop holds the last action meanwhile and drops the reply's stale head."""
    with start(checkpoint) as server:
        report = run_robot_sim(
            server.url,
            n_episodes=1,
            rate_hz=FAST_RATE_HZ,
            on_starve="hold",
            low_watermark=0,
            progress=False,
        )
    later = report["requests"] - 1  # all but the first, which is awaited (nothing to hold yet)
    assert later > 0
    assert report["held_steps"] >= later  # the tick of each later request had no action
    assert report["dropped_actions"] >= later - 1  # the last reply may outlive the episode
    assert report["dropped_actions"] > 0


def test_robot_sim_command_with_average_blending(checkpoint, tmp_path):
    out = tmp_path / "robot-sim.json"
    with start(checkpoint) as server:
        cfg = load_config(
            "robot_sim",
            [
                f"server={server.url}",
                "n_episodes=1",
                "blend=average",
                "low_watermark=2",
                f"rate_hz={FAST_RATE_HZ}",
                f"out={out}",
            ],
        )
        report = commands.robot_sim(cfg)
    saved = json.loads(out.read_text())
    assert saved["blend"] == "average" and saved["low_watermark"] == 2
    assert saved["n_episodes"] == 1
    assert report["rate_hz"] == FAST_RATE_HZ and saved["sampler"]["name"] == SAMPLER["name"]


def test_robot_side_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import dppo.serving.client, dppo.serving.codec, dppo.serving.protocol, "
        "dppo.serving.robot\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -------------------------------------------------------------------------------------------
# `dppo serve` as a process: health check, clean shutdown on SIGINT / SIGTERM
# -------------------------------------------------------------------------------------------
def test_serve_command_shuts_down_cleanly_on_ctrl_c(checkpoint):
    """SIGINT here; SIGTERM ends the servers of the (slow) benchmark test, which checks rc 0."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dppo.cli",
            "serve",
            f"checkpoint={checkpoint}",
            "port=0",
            "threads=1",
            "sampler=ddim",
            "sampler.steps=4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"on (ws://\S+) \(health: (http://\S+)\)", line)
        assert match, f"unexpected first line {line!r}; stderr: {proc.stderr.read()[-2000:]}"
        url, health = match.groups()
        with urllib.request.urlopen(health, timeout=SERVER_START_TIMEOUT_S) as response:
            assert response.status == 200
        client = connect(url)
        assert client.infer({OBS_KEY: env_observations(1)[0]}).actions.shape == (TA, DA)
        proc.send_signal(signal.SIGINT)
        with pytest.raises(ConnectionClosed) as info:
            client.ws.recv(timeout=SHUTDOWN_TIMEOUT_S)
        assert info.value.rcvd.code == 1001  # going away
        out, err = proc.communicate(timeout=SHUTDOWN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "shutting down" in out
    summary = json.loads(out[out.index("{") :])
    assert summary["infer_requests"] == 1 and summary["connections"] == 1
    with pytest.raises(OSError):
        connect(url, open_timeout=2)


def test_bench_serve_reports_overhead_and_throughput(tmp_path):
    cfg = load_config(
        "bench_serve",
        [
            "n_requests=20",
            "warmup=2",
            "concurrency=[1,3]",
            "requests_per_client=8",
            "policy.denoiser_kwargs.hidden_dim=64",
            "sampler.steps=4",
            f"out={tmp_path / 'b.json'}",
        ],
    )
    report = commands.bench_serve(cfg)
    assert json.loads((tmp_path / "b.json").read_text())["task"] == TASK
    assert 0 < report["in_process"]["p50_ms"] <= report["in_process"]["p99_ms"]
    for label in ("no_batching", "batching"):
        r = report[label]
        assert r["loopback"]["p50_ms"] > 0
        assert [row["clients"] for row in r["throughput"]] == [1, 3]
        assert all(row["requests_per_s"] > 0 for row in r["throughput"])
    assert all(row["mean_batch_size"] == 1 for row in report["no_batching"]["throughput"])
    assert report["batching"]["max_batch"] > 1
