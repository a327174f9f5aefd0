"""Env throughput and expert quality on one core.

    python scripts/bench_envs.py [--steps 20000] [--episodes 200]

Prints single-env control steps/s (random actions, TimeLimit included) for every registered
state task, the chunked vector env's env steps/s on point_reach, and the scripted experts'
success rates at noise 0 and at each task's default noise. Rates use this process's CPU time,
so that other processes sharing the cores do not distort them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import envs

VEC_ENVS, VEC_OBS_STEPS, VEC_ACTION_STEPS = 8, 2, 8


def single_env_steps_per_s(task: str, n_steps: int) -> float:
    env = envs.make_env(task, seed=0)
    env.reset()
    actions = [env.action_space.sample() for _ in range(1000)]
    start = time.process_time()
    for i in range(n_steps):
        _, _, terminated, truncated, _ = env.step(actions[i % len(actions)])
        if terminated or truncated:
            env.reset()
    return n_steps / (time.process_time() - start)


def vec_env_steps_per_s(task: str, n_steps: int) -> float:
    vec = envs.make_vec_env(
        task, VEC_ENVS, seed=0, n_obs_steps=VEC_OBS_STEPS, n_action_steps=VEC_ACTION_STEPS
    )
    vec.reset()
    n_calls = max(1, n_steps // (VEC_ENVS * VEC_ACTION_STEPS))
    executed = 0
    start = time.process_time()
    for _ in range(n_calls):
        _, _, _, _, info = vec.step(vec.action_space.sample())
        executed += int(info["n_executed"].sum())
    elapsed = time.process_time() - start
    vec.close()
    return executed / elapsed


def expert_success(task: str, noise: float, n_episodes: int) -> float:
    spec = envs.get_task(task)
    env = envs.make_env(task, seed=12345)
    expert = spec.make_expert(noise)
    rng = np.random.default_rng(12345)
    successes = 0
    for _ in range(n_episodes):
        obs, _ = env.reset()
        expert.reset(env, obs, rng)
        while True:
            obs, _, terminated, truncated, info = env.step(expert.act(env, obs))
            if terminated or truncated:
                successes += bool(info["is_success"])
                break
    return successes / n_episodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--episodes", type=int, default=200)
    args = parser.parse_args()

    for task in envs.list_tasks():
        spec = envs.get_task(task)
        if spec.family not in ("point", "gym"):
            continue
        print(f"{task:24s} single env: {single_env_steps_per_s(task, args.steps):9.0f} steps/s")
    rate = vec_env_steps_per_s(envs.DEFAULT_TASK, args.steps)
    print(
        f"{envs.DEFAULT_TASK:24s} vec env ({VEC_ENVS} envs, To={VEC_OBS_STEPS}, "
        f"Ta={VEC_ACTION_STEPS}): {rate:9.0f} env steps/s"
    )
    for task in envs.list_tasks():
        spec = envs.get_task(task)
        if spec.make_expert is None or spec.family != "point":
            continue
        for noise in (0.0, spec.default_expert_noise):
            rate = expert_success(task, noise, args.episodes)
            print(f"{task:24s} expert success at noise {noise:.2f}: {rate:.3f}")


if __name__ == "__main__":
    main()
