"""ChunkWrapper and the SAME_STEP vector env on the real point_reach simulation."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, SyncVectorEnv

import envs
from envs import point_reach as pr
from envs.chunk import ChunkWrapper

TASK = "point_reach"
MAX_STEPS = envs.get_task(TASK).max_episode_steps
SIM_STEPS_PER_CONTROL_STEP = pr.FRAME_SKIP


def sim_steps(env: gym.Env) -> int:
    """Physics steps run since the last reset, from the simulator's own clock."""
    unwrapped = env.unwrapped
    return round(unwrapped.data.time / unwrapped.model.opt.timestep)


def expert_actions(seed: int) -> tuple[np.ndarray, list]:
    """The noiseless expert's actions (K, 2) of one successful episode, and its step results."""
    env = envs.make_env(TASK, seed=seed)
    expert = envs.get_task(TASK).make_expert(0.0)
    obs, _ = env.reset()
    expert.reset(env, obs, np.random.default_rng(seed))
    actions, results = [], []
    while True:
        action = expert.act(env, obs)
        obs, reward, terminated, truncated, info = env.step(action)
        actions.append(action)
        results.append((obs, reward, terminated, truncated, info))
        if terminated or truncated:
            assert terminated and info["is_success"]
            return np.asarray(actions), results


def chunks_of(actions: np.ndarray, n_action_steps: int) -> list[np.ndarray]:
    """Split (K, Da) into chunks (Ta, Da), zero-padding the last one."""
    n_chunks = -(-len(actions) // n_action_steps)
    padded = np.zeros((n_chunks * n_action_steps, actions.shape[1]), np.float32)
    padded[: len(actions)] = actions
    return list(padded.reshape(n_chunks, n_action_steps, -1))


def test_reset_pads_history_with_first_observation():
    raw = envs.make_env(TASK, seed=5)
    wrapped = ChunkWrapper(envs.make_env(TASK, seed=5), n_obs_steps=3, n_action_steps=2)
    first, _ = raw.reset()
    stacked, info = wrapped.reset()
    assert stacked.shape == (3, first.shape[0]) == wrapped.observation_space.shape
    assert wrapped.action_space.shape == (2, 2)
    assert np.array_equal(stacked, np.stack([first] * 3))
    assert info == {**info, "is_success": False, "n_executed": 0, "sim_fault": False}


def test_chunk_executes_ta_steps_and_sums_rewards():
    n_obs, n_act = 2, 4
    raw = envs.make_env(TASK, seed=7)
    wrapped = ChunkWrapper(envs.make_env(TASK, seed=7), n_obs, n_act)
    obs0, _ = raw.reset()
    wrapped.reset()
    rng = np.random.default_rng(0)
    history = [obs0]
    for k in range(3):
        chunk = rng.uniform(-1, 1, size=(n_act, 2)).astype(np.float32)
        single_rewards = []
        for a in chunk:
            obs, reward, *_ = raw.step(a)
            history.append(obs)
            single_rewards.append(reward)
        stacked, reward, terminated, truncated, info = wrapped.step(chunk)
        assert sim_steps(wrapped) == (k + 1) * n_act * SIM_STEPS_PER_CONTROL_STEP
        assert info["n_executed"] == n_act
        assert reward == pytest.approx(sum(single_rewards), rel=1e-12)
        assert np.array_equal(stacked, np.stack(history[-n_obs:]))
        assert not (terminated or truncated)


def test_wrong_chunk_shape_is_rejected():
    wrapped = ChunkWrapper(envs.make_env(TASK, seed=0), 1, 4)
    wrapped.reset()
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        wrapped.step(np.zeros((3, 2), np.float32))


def test_success_stops_the_chunk_early_and_terminates():
    actions, results = expert_actions(seed=2)
    n_steps = len(actions)
    n_act = next(ta for ta in range(5, 12) if n_steps % ta)  # success falls inside a chunk
    wrapped = ChunkWrapper(envs.make_env(TASK, seed=2), n_obs_steps=2, n_action_steps=n_act)
    wrapped.reset()
    chunks = chunks_of(actions, n_act)
    for chunk in chunks[:-1]:
        _, _, terminated, truncated, info = wrapped.step(chunk)
        assert not (terminated or truncated or info["is_success"])
    stacked, reward, terminated, truncated, info = wrapped.step(chunks[-1])
    assert terminated and not truncated and info["is_success"]
    assert info["n_executed"] == n_steps % n_act < n_act
    assert sim_steps(wrapped) == n_steps * SIM_STEPS_PER_CONTROL_STEP  # padding not applied
    tail = results[-(n_steps % n_act) :]
    assert reward == pytest.approx(sum(r[1] for r in tail), rel=1e-12)
    assert np.array_equal(stacked[-1], results[-1][0])


def test_time_limit_truncates_inside_a_chunk():
    n_act = 7  # MAX_STEPS = 80 is not a multiple of 7: the last chunk runs 3 steps
    wrapped = ChunkWrapper(envs.make_env(TASK, seed=1), 1, n_act)
    wrapped.reset()
    zeros = np.zeros((n_act, 2), np.float32)
    for _ in range(MAX_STEPS // n_act):
        _, _, terminated, truncated, _ = wrapped.step(zeros)
        assert not (terminated or truncated)
    _, _, terminated, truncated, info = wrapped.step(zeros)
    assert truncated and not terminated and not info["is_success"]
    assert info["n_executed"] == MAX_STEPS % n_act
    assert sim_steps(wrapped) == MAX_STEPS * SIM_STEPS_PER_CONTROL_STEP


def test_vector_env_gives_the_real_final_observation():
    n_envs, n_obs, n_act = 2, 2, 7
    vec = envs.make_vec_env(TASK, n_envs, seed=10, n_obs_steps=n_obs, n_action_steps=n_act)
    assert vec.observation_space.shape == (n_envs, n_obs, 6)
    assert vec.action_space.shape == (n_envs, n_act, 2)
    vec.reset()
    zeros = np.zeros((n_envs, n_act, 2), np.float32)
    n_chunks = -(-MAX_STEPS // n_act)
    for _ in range(n_chunks):
        obs, _, terminated, truncated, info = vec.step(zeros)
    # reference: sub-env i is seeded with seed + i; the same zero actions until the time limit
    ref_obs = []
    for i in range(n_envs):
        ref = envs.make_env(TASK, seed=10 + i)
        ref_obs.append([ref.reset()[0]] + [ref.step(zeros[i, 0])[0] for _ in range(MAX_STEPS)])
    assert truncated.all() and not terminated.any()
    assert info["_final_obs"].all()
    next_obs = envs.real_next_obs(obs, info, terminated, truncated)
    for i in range(n_envs):
        final = np.stack(ref_obs[i][-n_obs:])
        assert np.array_equal(info["final_obs"][i], final)
        assert np.array_equal(next_obs[i], final)
        # the returned observation already belongs to the next episode (padded reset obs)
        assert np.array_equal(obs[i][0], obs[i][1])
        assert not np.array_equal(obs[i], final)
    assert not envs.step_success(info, terminated, truncated).any()


def test_vector_env_step_success_reads_final_info():
    actions, _ = expert_actions(seed=3)
    n_act = 8
    vec = envs.make_vec_env(TASK, 1, seed=3, n_obs_steps=1, n_action_steps=n_act)
    vec.reset()
    for chunk in chunks_of(actions, n_act):
        _, _, terminated, truncated, info = vec.step(chunk[None])
    assert terminated[0]
    assert not info["is_success"][0]  # the top-level info is the reset's
    assert info["final_info"]["is_success"][0]
    assert envs.step_success(info, terminated, truncated)[0]


class FaultyEnv(gym.Env):
    """Counts steps; returns a non-finite observation or reward at step ``fault_step``."""

    observation_space = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
    action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def __init__(self, fault_step: int, fault: str = "obs"):
        self.fault_step, self.fault, self.t = fault_step, fault, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {"is_success": False}

    def step(self, action):
        self.t += 1
        obs = np.full(2, self.t, np.float32)
        reward = float(self.t)
        if self.t == self.fault_step:
            if self.fault == "obs":
                obs[1] = np.nan
            else:
                reward = np.inf
        return obs, reward, False, False, {"is_success": False}


@pytest.mark.parametrize("fault", ["obs", "reward"])
def test_sim_fault_returns_last_finite_history_and_truncates(fault):
    wrapped = ChunkWrapper(FaultyEnv(fault_step=3, fault=fault), n_obs_steps=2, n_action_steps=5)
    wrapped.reset()
    stacked, reward, terminated, truncated, info = wrapped.step(np.zeros((5, 1), np.float32))
    assert np.array_equal(stacked, [[1, 1], [2, 2]])  # steps 1 and 2; step 3 is dropped
    assert np.isfinite(stacked).all()
    assert reward == 1.0 + 2.0  # the faulty step counts 0
    assert truncated and not terminated
    assert info["sim_fault"] and info["n_executed"] == 3
    assert wrapped.n_sim_faults == 1


def test_sim_fault_is_reset_by_the_vector_env():
    vec = SyncVectorEnv(
        [lambda: ChunkWrapper(FaultyEnv(fault_step=2), 1, 3)],
        autoreset_mode=AutoresetMode.SAME_STEP,
    )
    vec.reset(seed=0)
    obs, reward, terminated, truncated, info = vec.step(np.zeros((1, 3, 1), np.float32))
    assert truncated[0] and info["final_info"]["sim_fault"][0]
    assert np.array_equal(info["final_obs"][0], [[1, 1]])
    assert np.array_equal(obs[0], [[0, 0]])  # reset observation of the next episode
    obs, reward, *_ = vec.step(np.zeros((1, 3, 1), np.float32))
    assert reward[0] == 1.0  # first step of the new episode, then the fault at step 2


def test_async_vector_env_matches_sync():
    kwargs = dict(seed=0, n_obs_steps=2, n_action_steps=4)
    sync = envs.make_vec_env(TASK, 2, **kwargs)
    async_ = envs.make_vec_env(TASK, 2, async_=True, **kwargs)
    try:
        assert np.array_equal(sync.reset()[0], async_.reset()[0])
        rng = np.random.default_rng(0)
        ended = False
        for _ in range(MAX_STEPS // 4 + 1):
            action = rng.uniform(-1, 1, size=(2, 4, 2)).astype(np.float32)
            s_obs, s_rew, s_term, s_trunc, s_info = sync.step(action)
            a_obs, a_rew, a_term, a_trunc, a_info = async_.step(action)
            assert np.array_equal(s_obs, a_obs) and np.array_equal(s_rew, a_rew)
            assert np.array_equal(s_term | s_trunc, a_term | a_trunc)
            if (s_term | s_trunc).any():
                ended = True
                for i in np.flatnonzero(s_term | s_trunc):
                    assert np.array_equal(s_info["final_obs"][i], a_info["final_obs"][i])
        assert ended
    finally:
        async_.close()
        sync.close()
