"""point_reach (+ two-goal variant) and the gymnasium locomotion tasks: API, determinism, expert."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import point_reach as pr

REPO_ROOT = Path(__file__).resolve().parents[1]
POINT_TASKS = ["point_reach", "point_reach_two_goals"]
GYM_TASKS = ["Hopper-v5", "Walker2d-v5", "HalfCheetah-v5"]
SKIP_EXIT_CODE = 77


def run_expert_episode(task: str, seed: int, noise: float = 0.0, **env_kwargs):
    """One expert episode; returns (expert, list of (obs, reward, terminated, truncated, info))."""
    spec = envs.get_task(task)
    env = envs.make_env(task, seed=seed, **env_kwargs)
    expert = spec.make_expert(noise)
    obs, _ = env.reset()
    expert.reset(env, obs, np.random.default_rng(seed))
    steps = []
    while True:
        obs, reward, terminated, truncated, info = env.step(expert.act(env, obs))
        steps.append((obs, reward, terminated, truncated, info))
        if terminated or truncated:
            return expert, steps


def test_registry_lists_all_tasks_and_default():
    tasks = envs.list_tasks()
    for name in POINT_TASKS + GYM_TASKS:
        assert name in tasks
    assert envs.DEFAULT_TASK == "point_reach"
    spec = envs.get_task("point_reach")
    assert spec.control_freq == pytest.approx(20.0)
    assert spec.make_expert is not None and spec.obs_key == "state"
    with pytest.raises(KeyError, match="point_reach"):
        envs.get_task("no_such_task")


@pytest.mark.parametrize("task", POINT_TASKS)
def test_point_env_passes_check_env(task):
    env = envs.make_env(task)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == env.observation_space.shape
    assert info["is_success"] is False


@pytest.mark.parametrize("task", GYM_TASKS)
def test_gym_task_checks_and_reports_no_success(task):
    env = envs.make_env(task, seed=0)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset()
    assert obs.dtype == np.float32 and env.observation_space.contains(obs)
    assert info["is_success"] is False
    obs, reward, _, _, info = env.step(env.action_space.sample())
    assert obs.dtype == np.float32 and isinstance(reward, float)
    assert info["is_success"] is False
    spec = envs.get_task(task)
    assert spec.make_expert is None
    assert spec.control_freq == pytest.approx(1.0 / env.unwrapped.dt)
    assert spec.max_episode_steps == env.spec.max_episode_steps


@pytest.mark.parametrize("task", POINT_TASKS)
def test_deterministic_under_seed(task):
    def rollout(seed):
        env = envs.make_env(task, seed=seed)
        first, _ = env.reset()
        out = [first]
        for _ in range(30):
            obs, reward, *_ = env.step(env.action_space.sample())
            out.append(np.append(obs, reward))
        return out

    a, b, c = rollout(3), rollout(3), rollout(4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("task", POINT_TASKS)
def test_noiseless_expert_succeeds_and_goes_both_ways(task):
    n_episodes = 20
    successes, sides = 0, set()
    for seed in range(n_episodes):
        expert, steps = run_expert_episode(task, seed)
        successes += steps[-1][4]["is_success"]
        sides.add(expert.side)
        # is_success is reported at every step and is True only at the (terminal) success step
        assert [s[4]["is_success"] for s in steps[:-1]] == [False] * (len(steps) - 1)
    assert successes >= 0.9 * n_episodes
    assert sides == {-1.0, 1.0}, "the expert must go around the pillar on both sides"


def test_success_terminates_with_precision():
    _, steps = run_expert_episode("point_reach", seed=0)
    obs, reward, terminated, truncated, info = steps[-1]
    assert terminated and not truncated and info["is_success"]
    assert np.linalg.norm(obs[pr.POS] - obs[pr.goal_slice(0)]) < pr.GOAL_RADIUS
    assert np.linalg.norm(obs[pr.VEL]) < pr.SUCCESS_SPEED
    assert reward == pytest.approx(pr.SUCCESS_BONUS - info["distance"])
    # dense shaping before success: minus the distance to the goal
    obs0, reward0, *_, info0 = steps[0]
    assert reward0 == pytest.approx(
        -np.linalg.norm(obs0[pr.POS] - obs0[pr.goal_slice(0)]), abs=1e-5
    )
    assert reward0 == pytest.approx(-info0["distance"])


def test_sparse_reward_is_one_only_on_success():
    _, dense = run_expert_episode("point_reach", seed=1)
    _, sparse = run_expert_episode("point_reach", seed=1, reward_type="sparse")
    assert len(dense) == len(sparse)
    assert all(np.array_equal(d[0], s[0]) for d, s in zip(dense, sparse, strict=True))
    rewards = [s[1] for s in sparse]
    assert rewards[-1] == 1.0 and sparse[-1][4]["is_success"]
    assert rewards[:-1] == [0.0] * (len(rewards) - 1)


def test_two_goals_reports_the_goal_reached():
    reached = set()
    for seed in range(6):
        expert, steps = run_expert_episode("point_reach_two_goals", seed=seed)
        assert all(s[4]["goal_reached"] == -1 for s in steps[:-1])
        info = steps[-1][4]
        assert info["is_success"] and info["goal_reached"] == expert.goal_index
        reached.add(info["goal_reached"])
    assert reached == {0, 1}


def test_default_noise_makes_the_expert_imperfect():
    spec = envs.get_task("point_reach")
    successes = sum(
        run_expert_episode("point_reach", seed, noise=spec.default_expert_noise)[1][-1][4][
            "is_success"
        ]
        for seed in range(40)
    )
    assert 0.4 * 40 <= successes <= 0.95 * 40


def test_render_one_frame_when_gl_available():
    script = textwrap.dedent(
        f"""
        import sys
        import mujoco
        try:
            mujoco.GLContext(8, 8).make_current()
        except Exception as exc:
            print("no GL backend:", exc)
            sys.exit({SKIP_EXIT_CODE})
        import envs
        env = envs.make_env("point_reach", seed=0, render_mode="rgb_array", render_size=64)
        env.reset()
        frame = env.render()
        assert frame.shape == (64, 64, 3), frame.shape
        assert frame.std() > 0, "blank frame"
        env.close()
        print("ok")
        """
    )
    env = dict(os.environ)
    env.setdefault("MUJOCO_GL", "egl")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    if proc.returncode == SKIP_EXIT_CODE:
        pytest.skip(proc.stdout.strip()[:200])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok" in proc.stdout
