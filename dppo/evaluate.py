"""Roll a policy runtime out in vectorised environments and report success and cost."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

import envs
from policies.runtime import PolicyRuntime


@dataclass
class EvalResult:
    success_rate: float
    mean_return: float
    n_episodes: int
    mean_length: float
    ms_per_chunk: float
    nfe_per_chunk: float
    """Network evaluations per chunk of one env (a starting episode's full chain included)."""
    sim_faults: int

    def to_dict(self) -> dict:
        return asdict(self)


def final_value(info: dict, key: str, done: np.ndarray, default=0.0) -> np.ndarray:
    """Per-env value of ``key`` at the step that ended each episode (SAME_STEP autoreset)."""
    n = len(done)
    now = np.asarray(info.get(key, np.full(n, default)))
    final = info.get("final_info", {})
    if key in final:
        ended = np.asarray(final.get(f"_{key}", done)) & done
        now = np.where(ended, np.asarray(final[key]), now)
    return now


def evaluate(
    runtime: PolicyRuntime,
    task: str,
    n_episodes: int,
    n_envs: int,
    seed: int = 0,
    progress: bool = True,
    vec_env=None,
) -> EvalResult:
    """Run ``n_episodes`` episodes (each env runs its share) with ``runtime`` on ``task``.

    The runtime must have been built for ``n_envs`` streams. Episodes are counted in the order
    each env finishes them, up to ceil(n_episodes / n_envs) per env, so short episodes are not
    over-represented.
    """
    cfg = runtime.cfg
    spec = envs.get_task(task)
    venv = vec_env or envs.make_vec_env(
        task, n_envs, seed=seed, n_obs_steps=cfg.n_obs_steps, n_action_steps=cfg.n_action_steps
    )
    quota = math.ceil(n_episodes / n_envs)
    obs, _ = venv.reset(seed=seed)
    runtime.reset()
    returns, lengths, successes = [], [], []
    counts = np.zeros(n_envs, dtype=int)
    ep_return = np.zeros(n_envs)
    ep_len = np.zeros(n_envs, dtype=int)
    chunk_ms, chunk_nfe, faults = [], [], 0
    bar = tqdm(total=n_episodes, desc=f"eval {task}", disable=not progress, leave=False)
    while len(returns) < n_episodes:
        res = runtime.act({spec.obs_key: obs})
        chunk_ms.append(res.ms)
        chunk_nfe.append(res.nfe_per_stream)
        obs, reward, terminated, truncated, info = venv.step(res.actions)
        ep_return += reward
        ep_len += 1
        done = terminated | truncated
        faults += int(np.sum(final_value(info, "sim_fault", done, False) & done))
        if done.any():
            success = final_value(info, "is_success", done, False)
            for i in np.flatnonzero(done):
                if counts[i] < quota and len(returns) < n_episodes:
                    returns.append(ep_return[i])
                    lengths.append(ep_len[i])
                    successes.append(bool(success[i]))
                    bar.update(1)
                counts[i] += 1
            ep_return[done] = 0
            ep_len[done] = 0
            runtime.reset(done)
    bar.close()
    if vec_env is None:
        venv.close()
    return EvalResult(
        success_rate=float(np.mean(successes)),
        mean_return=float(np.mean(returns)),
        n_episodes=len(returns),
        mean_length=float(np.mean(lengths)) * cfg.n_action_steps,
        ms_per_chunk=float(np.median(chunk_ms)),
        nfe_per_chunk=float(np.mean(chunk_nfe)),
        sim_faults=faults,
    )
