"""DPPO fine-tuning (and the Gaussian-PPO baseline) in vectorised environments.

Read top to bottom: set-up, then per iteration rollout -> old log-probs -> GAE -> PPO update ->
evaluation -> checkpoint. The maths lives in ``dppo.ppo_math``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import envs
from dppo.actors import DiffusionActor, GaussianActor
from dppo.buffer import Rollout
from dppo.config import require, to_container
from dppo.critic import Critic
from dppo.evaluate import evaluate, final_value
from dppo.ppo_math import (
    RunningRewardScaler,
    clip_schedule,
    denoising_discount,
    explained_variance,
    gae,
)
from dppo.run_dir import RunDir, default_run_path, plot_curves
from dppo.runners import build_runner, validate_runner
from dppo.schedules import warmup_cosine
from dppo.tracking import Tracker
from policies.checkpoint import (
    LATEST,
    atomic_dir,
    load_policy,
    load_tree,
    read_checkpoint_meta,
    save_tree,
    write_policy_files,
)

TRAIN_STATE = "train_state"
ENV_SEED_STRIDE = 10_007
"""Iteration i resets its envs with seed + i * stride, so a resumed run sees the same episodes."""


def validate(cfg: DictConfig) -> None:
    """Every check that can fail runs here, before any rollout."""
    a = cfg.algorithm
    if cfg.get("runner") is not None:
        validate_runner(cfg, cfg.task.n_envs)
    require(a.iterations > 0, f"algorithm.iterations must be > 0, got {a.iterations}")
    require(a.n_steps > 0 and cfg.task.n_envs > 0, "algorithm.n_steps and task.n_envs must be > 0")
    require(a.update_epochs > 0, "algorithm.update_epochs must be > 0")
    require(
        a.actor in ("diffusion", "gaussian"),
        f"algorithm.actor must be diffusion|gaussian, got {a.actor!r}",
    )
    k = (
        1
        if a.actor == "gaussian"
        else (a.ft_denoising_steps if a.denoising == "ddpm" else a.ddim_steps)
    )
    pairs = a.n_steps * cfg.task.n_envs * k
    require(
        pairs % a.batch_size == 0,
        f"algorithm.batch_size={a.batch_size} must divide the {pairs} (env step x denoising step) "
        f"pairs per iteration (n_steps={a.n_steps} x n_envs={cfg.task.n_envs} x K={k})",
    )
    env_steps = a.n_steps * cfg.task.n_envs
    require(
        env_steps % a.critic_batch_size == 0,
        f"algorithm.critic_batch_size={a.critic_batch_size} must divide the {env_steps} env steps",
    )
    if a.actor == "diffusion":
        require(cfg.checkpoint is not None, "checkpoint=<pre-trained run> is required for DPPO")
        meta = read_checkpoint_meta(cfg.checkpoint)["config"]
        require(
            meta["task"] == cfg.task.name,
            f"checkpoint was trained on task {meta['task']!r}, not {cfg.task.name!r}",
        )
        n_train = meta["schedule"].get("num_train_steps", 100)
        if a.denoising == "ddpm":
            require(
                1 <= a.ft_denoising_steps <= n_train,
                f"algorithm.ft_denoising_steps={a.ft_denoising_steps} must be in [1, {n_train}] "
                f"(the checkpoint's denoising steps)",
            )
        else:
            require(1 <= a.ddim_steps <= n_train, f"algorithm.ddim_steps must be in [1, {n_train}]")
        require(
            meta["n_obs_steps"] == cfg.task.n_obs_steps
            and meta["n_action_steps"] == cfg.task.n_action_steps,
            "task.n_obs_steps / task.n_action_steps must match the checkpoint's To / Ta "
            f"({meta['n_obs_steps']} / {meta['n_action_steps']})",
        )


@dataclass
class Learner:
    """Everything that changes during training and is checkpointed."""

    actor: Any
    critic: Critic
    actor_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer
    actor_sched: Any
    critic_sched: Any
    reward_scaler: RunningRewardScaler
    update_gen: torch.Generator
    iteration: int = 0
    env_steps: int = 0


def build_learner(cfg: DictConfig) -> Learner:
    a, task = cfg.algorithm, cfg.task
    env = envs.make_env(task.name)
    obs_dim, action_space = env.observation_space.shape[0], env.action_space
    env.close()
    obs_key = envs.get_task(task.name).obs_key
    if a.actor == "diffusion":
        from dppo.pretrain import task_io_spec

        shapes, action_dim = task_io_spec(task.name)
        policy = load_policy(
            cfg.checkpoint, task=task.name, obs_shapes=shapes, action_dim=action_dim
        )
        actor = DiffusionActor(policy, a, task.n_envs, seed=cfg.seed)
        cond_dim = policy.cfg.cond_dim
    else:
        actor = GaussianActor(
            obs_key,
            obs_dim,
            task.n_obs_steps,
            task.n_action_steps,
            action_space.shape[0],
            action_space.low,
            action_space.high,
            a,
            cfg.seed,
        )
        cond_dim = obs_dim * task.n_obs_steps
    critic = Critic(cond_dim, hidden=a.critic_hidden, depth=a.critic_depth)
    actor_opt = torch.optim.AdamW(actor.parameters(), lr=a.actor_lr, weight_decay=a.weight_decay)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=a.critic_lr, weight_decay=a.weight_decay)
    return Learner(
        actor=actor,
        critic=critic,
        actor_opt=actor_opt,
        critic_opt=critic_opt,
        actor_sched=warmup_cosine(actor_opt, a.lr_warmup_iterations, a.iterations, a.min_lr_ratio),
        critic_sched=warmup_cosine(
            critic_opt, a.lr_warmup_iterations, a.iterations, a.min_lr_ratio
        ),
        reward_scaler=RunningRewardScaler(task.n_envs, a.gamma),
        update_gen=torch.Generator().manual_seed(cfg.seed),
    )


def collect_rollout(
    learner: Learner, venv, obs_key: str, n_steps: int, seed: int, scale: bool
) -> Rollout:
    """Run ``n_steps`` chunk steps in every env with the training sampler; episodes restart at reset."""
    actor, ro = learner.actor, Rollout()
    obs, _ = venv.reset(seed=seed)
    if isinstance(actor, DiffusionActor):
        actor.runtime.reset()
    ep_return = np.zeros(venv.num_envs)
    for t in range(n_steps):
        actions, record = actor.act({obs_key: obs})
        obs, reward, terminated, truncated, info = venv.step(actions)
        done = terminated | truncated
        faults = final_value(info, "sim_fault", done, False).astype(bool) & done
        ro.sim_faults += int(faults.sum())
        reward = np.where(faults, 0.0, reward)
        ro.cond.append(record["cond"])
        ro.chain.append(record["chain"])
        ro.raw_rewards.append(reward)
        ro.rewards.append(
            learner.reward_scaler(reward, done) if scale else reward.astype(np.float32)
        )
        ro.dones.append(done)
        ro.terminated.append(terminated & ~faults)
        ep_return += reward
        learner.env_steps += int(final_value(info, "n_executed", done, 0).sum())
        if done.any():
            success = final_value(info, "is_success", done, False)
            for e in np.flatnonzero(done):
                if truncated[e] and not terminated[e]:
                    final = {obs_key: np.asarray(info["final_obs"][e])[None]}
                    ro.final_cond[(t, e)] = actor.condition(final)[0]
                ro.episode_returns.append(float(ep_return[e]))
                ro.episode_successes.append(bool(success[e]))
            ep_return[done] = 0.0
            if isinstance(actor, DiffusionActor):
                actor.runtime.reset(done)
    ro.last_cond = actor.condition({obs_key: obs})
    return ro


def compute_advantages(learner: Learner, ro: Rollout, gamma: float, lam: float):
    """Values, advantages and returns (T, E); bootstrap from real final obs of truncated episodes."""
    cond, _ = ro.stacked()
    T, E = cond.shape[:2]
    critic = learner.critic
    values = critic.values(cond.flatten(0, 1)).view(T, E).numpy()
    next_values = np.concatenate([values[1:], critic.values(ro.last_cond)[None].numpy()], axis=0)
    dones, terminated = ro.arrays("dones"), ro.arrays("terminated")
    next_values = np.where(dones > 0, 0.0, next_values)
    for (t, e), c in ro.final_cond.items():
        next_values[t, e] = critic.values(c[None]).item()
    next_values = np.where(terminated > 0, 0.0, next_values)
    adv, ret = gae(ro.arrays("rewards"), values, next_values, dones, gamma, lam)
    return values, adv, ret


@torch.no_grad()
def old_log_probs(actor, cond: torch.Tensor, chain: torch.Tensor, batch: int) -> torch.Tensor:
    """Log-probs (N, K) of every recorded transition under the policy that sampled them."""
    n, k = chain.shape[0], actor.n_transitions
    pair_env = torch.arange(n).repeat_interleave(k)
    pair_k = torch.arange(k).repeat(n)
    out = [
        actor.log_prob(cond[pair_env[s]], chain[pair_env[s]], pair_k[s])[0]
        for s in torch.arange(n * k).split(batch)
    ]
    return torch.cat(out).view(n, k)


def ppo_update(
    learner: Learner, cond, chain, old_lp, adv, ret, values, a, train_actor: bool, bc_batches=None
) -> dict[str, float]:
    """PPO epochs over (env step, denoising step) pairs for the actor and env steps for the critic."""
    actor, critic = learner.actor, learner.critic
    n, k = old_lp.shape
    adv = torch.as_tensor(adv)
    if a.normalize_advantages:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    disc = torch.as_tensor(denoising_discount(k, a.gamma_denoising))
    clips = torch.as_tensor(clip_schedule(k, a.clip, a.clip_base))
    ret_t = torch.as_tensor(ret)
    stats: dict[str, list[float]] = {
        key: []
        for key in (
            "policy_loss",
            "value_loss",
            "approx_kl",
            "clip_frac",
            "ratio_mean",
            "ratio_max",
            "ratio_min",
            "exploration_std",
            "bc_loss",
        )
    }
    n_actor_mb = n * k // a.batch_size
    stopped_early = False
    for _ in range(a.update_epochs):
        critic_perm = torch.randperm(n, generator=learner.update_gen)
        for idx in critic_perm.split(a.critic_batch_size):
            v_loss = 0.5 * ((critic(cond[idx]) - ret_t[idx]) ** 2).mean()
            learner.critic_opt.zero_grad(set_to_none=True)
            v_loss.backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), a.max_grad_norm)
            learner.critic_opt.step()
            stats["value_loss"].append(v_loss.item())
        if not train_actor or stopped_early:
            continue
        perm = torch.randperm(n * k, generator=learner.update_gen)
        epoch_kl = []
        for mb, pairs in enumerate(perm.split(a.batch_size)):
            env_i, k_i = pairs // k, pairs % k
            new_lp, std = actor.log_prob(cond[env_i], chain[env_i], k_i)
            log_ratio = new_lp - old_lp[env_i, k_i]
            ratio = log_ratio.exp()
            mb_adv = adv[env_i] * disc[k_i]
            clip_i = clips[k_i]
            pg_loss = torch.max(
                -mb_adv * ratio, -mb_adv * torch.clamp(ratio, 1 - clip_i, 1 + clip_i)
            ).mean()
            loss = pg_loss
            if bc_batches is not None:
                bc = actor.bc_loss(*next(bc_batches))
                loss = loss + a.bc_coef * bc
                stats["bc_loss"].append(bc.item())
            learner.actor_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(actor.parameters(), a.max_grad_norm)
            learner.actor_opt.step()
            with torch.no_grad():
                kl = ((ratio - 1) - log_ratio).mean().item()
                epoch_kl.append(kl)
                stats["policy_loss"].append(pg_loss.item())
                stats["approx_kl"].append(kl)
                stats["clip_frac"].append(((ratio - 1).abs() > clip_i).float().mean().item())
                stats["ratio_mean"].append(ratio.mean().item())
                stats["ratio_max"].append(ratio.max().item())
                stats["ratio_min"].append(ratio.min().item())
                stats["exploration_std"].append(std.mean().item())
            if a.target_kl is not None and kl > a.target_kl and mb >= n_actor_mb // 4:
                stopped_early = True
                break
    out = {key: float(np.mean(v)) for key, v in stats.items() if v}
    if stats["ratio_max"]:
        out["ratio_max"], out["ratio_min"] = max(stats["ratio_max"]), min(stats["ratio_min"])
    out["explained_variance"] = explained_variance(values, ret)
    out["kl_early_stop"] = float(stopped_early)
    return out


def learn(learner: Learner, ro: Rollout, a, train_actor: bool, bc_batches=None):
    """One iteration's learning on a rollout: old log-probs, GAE, PPO epochs.

    Returns (update stats, {"time_logprob": s, "time_update": s}).
    """
    start = time.perf_counter()
    cond, chain = (x.flatten(0, 1) for x in ro.stacked())
    old_lp = old_log_probs(learner.actor, cond, chain, a.logprob_batch_size)
    mid = time.perf_counter()
    values, adv, ret = compute_advantages(learner, ro, a.gamma, a.gae_lambda)
    stats = ppo_update(
        learner,
        cond,
        chain,
        old_lp,
        adv.reshape(-1),
        ret.reshape(-1),
        values.reshape(-1),
        a,
        train_actor=train_actor,
        bc_batches=bc_batches,
    )
    stats["n_pairs"] = old_lp.numel()
    return stats, {"time_logprob": mid - start, "time_update": time.perf_counter() - mid}


class GaussianRuntime:
    """Adapter so ``dppo.evaluate`` can run the Gaussian baseline deterministically."""

    def __init__(self, actor: GaussianActor, n_obs_steps: int, n_action_steps: int):
        self.actor = actor
        self.cfg = SimpleNamespace(n_obs_steps=n_obs_steps, n_action_steps=n_action_steps)

    def reset(self, mask=None) -> None:
        """The Gaussian policy keeps no per-episode state."""

    def act(self, obs):
        start = time.perf_counter()
        actions, _ = self.actor.act(obs, deterministic=True)
        ms = (time.perf_counter() - start) * 1e3
        return SimpleNamespace(actions=actions, ms=ms, nfe=1, nfe_per_stream=1.0)


def eval_runtime(learner: Learner, cfg: DictConfig, n_envs: int, seed: int):
    if isinstance(learner.actor, DiffusionActor):
        return learner.actor.eval_runtime(n_envs, seed)
    return GaussianRuntime(learner.actor, cfg.task.n_obs_steps, cfg.task.n_action_steps)


def save_checkpoint(learner: Learner, run: RunDir) -> None:
    """Policy + learner state in ``checkpoints/latest`` (atomic: a kill leaves the previous one)."""
    final = run.checkpoints / LATEST
    tmp, commit = atomic_dir(final)
    meta = {"kind": "finetune", "iteration": learner.iteration, "env_steps": learner.env_steps}
    if isinstance(learner.actor, DiffusionActor):
        write_policy_files(learner.actor.policy, tmp, meta)
        actor_state = {"sampler_rng": learner.actor.runtime.generator.get_state()}
    else:
        actor_state = learner.actor.state_dict()
    save_tree(
        tmp,
        TRAIN_STATE,
        {
            "actor": actor_state,
            "critic": learner.critic.state_dict(),
            "actor_opt": learner.actor_opt.state_dict(),
            "critic_opt": learner.critic_opt.state_dict(),
            "actor_sched": learner.actor_sched.state_dict(),
            "critic_sched": learner.critic_sched.state_dict(),
            "reward_scaler": learner.reward_scaler.state_dict(),
            "update_gen": learner.update_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "iteration": learner.iteration,
            "env_steps": learner.env_steps,
        },
    )
    commit()


def restore_checkpoint(learner: Learner, folder: Path) -> None:
    state = load_tree(folder, TRAIN_STATE)
    if isinstance(learner.actor, DiffusionActor):
        fine_tuned = load_policy(folder)
        learner.actor.policy.load_state_dict(fine_tuned.state_dict())
        learner.actor.runtime.generator.set_state(state["actor"]["sampler_rng"])
    else:
        learner.actor.load_state_dict(state["actor"])
    learner.critic.load_state_dict(state["critic"])
    learner.actor_opt.load_state_dict(state["actor_opt"])
    learner.critic_opt.load_state_dict(state["critic_opt"])
    learner.actor_sched.load_state_dict(state["actor_sched"])
    learner.critic_sched.load_state_dict(state["critic_sched"])
    learner.reward_scaler.load_state_dict(state["reward_scaler"])
    learner.update_gen.set_state(state["update_gen"])
    torch.set_rng_state(state["torch_rng"])
    learner.iteration, learner.env_steps = int(state["iteration"]), int(state["env_steps"])


def resume_config(cfg: DictConfig) -> DictConfig:
    """The saved config of the run being resumed (its ``iterations`` may be raised)."""
    saved = OmegaConf.create(yaml.safe_load((Path(cfg.resume) / "config.yaml").read_text()))
    saved.resume = cfg.resume
    saved.out = cfg.resume
    saved.algorithm.iterations = max(saved.algorithm.iterations, cfg.algorithm.iterations)
    return saved


def bc_batch_stream(cfg: DictConfig, policy, seed: int):
    """Endless random minibatches of demonstration windows for the BC regulariser."""
    from dppo.pretrain import materialise_windows
    from envs.dataset import DemoDataset

    require(
        cfg.algorithm.bc_dataset is not None, "algorithm.bc_coef > 0 needs algorithm.bc_dataset"
    )
    data = DemoDataset(
        cfg.algorithm.bc_dataset,
        obs_keys={k: tuple(v) for k, v in policy.cfg.obs_shapes.items()},
        action_dim=policy.cfg.action_dim,
    )
    obs, actions = materialise_windows(data, policy.cfg.n_obs_steps, policy.cfg.horizon)
    gen = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, actions.shape[0], (cfg.algorithm.bc_batch_size,), generator=gen)
        yield {k: v[idx] for k, v in obs.items()}, actions[idx]


def finetune(
    cfg: DictConfig, make_venv: Callable[[DictConfig], Any] | None = None
) -> dict[str, Any]:
    """Fine-tune with PPO (DPPO for diffusion actors); returns the run summary.

    Rollouts run on ``cfg.runner`` (``dppo.runners``: in-process or Ray workers). ``make_venv(cfg)``
    builds the training vector env (default: ``envs.make_vec_env`` of the task;
    ``dppo.finetune_offline`` passes a world model's imagined env). Evaluation stays real.
    """
    if cfg.resume:
        cfg = resume_config(cfg)
    validate(cfg)
    a, task = cfg.algorithm, cfg.task
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out) if cfg.out else default_run_path("finetune", task.name)
    run = RunDir(out, to_container(cfg), resume=bool(cfg.resume))
    learner = build_learner(cfg)
    if cfg.resume and (run.checkpoints / LATEST / f"{TRAIN_STATE}.json").exists():
        restore_checkpoint(learner, run.checkpoints / LATEST)
        run.truncate_metrics(lambda r: r.get("iteration", 0) <= learner.iteration)
    tracker = Tracker(cfg.wandb.mode, cfg.wandb.project, str(run.path), to_container(cfg))
    runner = build_runner(cfg, learner, make_venv)
    bc = bc_batch_stream(cfg, learner.actor.policy, cfg.seed) if a.bc_coef > 0 else None
    initial = None
    if learner.iteration == 0 and cfg.eval_episodes:
        initial = evaluate(
            eval_runtime(learner, cfg, cfg.eval_n_envs, cfg.seed),
            task.name,
            cfg.eval_episodes,
            cfg.eval_n_envs,
            seed=cfg.eval_seed,
            progress=False,
        )
        run.log(
            {
                "iteration": 0,
                "env_steps": 0,
                "eval/success_rate": initial.success_rate,
                "eval/mean_return": initial.mean_return,
            }
        )
    bar = tqdm(
        range(learner.iteration, a.iterations),
        desc=f"finetune {task.name}",
        initial=learner.iteration,
        total=a.iterations,
    )
    for itr in bar:
        t0 = time.perf_counter()
        ro = runner.collect(learner, a.n_steps, cfg.seed + itr * ENV_SEED_STRIDE)
        t1 = time.perf_counter()
        stats, times = learn(
            learner, ro, a, train_actor=itr >= a.critic_warmup_iterations, bc_batches=bc
        )
        if itr >= a.critic_warmup_iterations:
            learner.actor_sched.step()
        learner.critic_sched.step()
        learner.iteration = itr + 1
        raw_rewards = ro.arrays("raw_rewards")  # (T, E)
        n_successes = sum(ro.episode_successes)
        record = {
            "iteration": learner.iteration,
            "env_steps": learner.env_steps,
            "success_rate": float(np.mean(ro.episode_successes)) if ro.episode_successes else None,
            "episode_return": float(np.mean(ro.episode_returns)) if ro.episode_returns else None,
            "n_episodes": len(ro.episode_returns),
            # unbiased where episodes outlast a rollout (success_rate counts finished ones only)
            "successes_per_env": n_successes / raw_rewards.shape[1],
            # episodes ended by a termination that is no success (a fall; in imagination, a halt)
            "terminal_failures_per_env": (ro.arrays("terminated").sum() - n_successes)
            / raw_rewards.shape[1],
            "sim_faults": ro.sim_faults,
            "reward_mean": float(raw_rewards.mean()),
            "time_rollout": t1 - t0,
            **times,
            **stats,
        }
        if cfg.eval_every and (
            learner.iteration % cfg.eval_every == 0 or learner.iteration == a.iterations
        ):
            res = evaluate(
                eval_runtime(learner, cfg, cfg.eval_n_envs, cfg.seed),
                task.name,
                cfg.eval_episodes,
                cfg.eval_n_envs,
                seed=cfg.eval_seed,
                progress=False,
            )
            record.update(
                {"eval/success_rate": res.success_rate, "eval/mean_return": res.mean_return}
            )
        run.log(record)
        tracker.log(record, learner.iteration)
        bar.set_postfix(success=record["success_rate"], kl=f"{stats.get('approx_kl', 0):.3g}")
        if learner.iteration % cfg.checkpoint_every == 0 or learner.iteration == a.iterations:
            save_checkpoint(learner, run)
    runner.close()
    tracker.close()
    metrics = run.read_metrics()
    plot_curves(
        run.plots / "finetune.png",
        metrics,
        "env_steps",
        ["success_rate", "eval/success_rate", "episode_return", "value_loss", "approx_kl"],
        f"fine-tuning on {task.name}",
    )
    evals = [r for r in metrics if "eval/success_rate" in r]
    return run.finish(
        {
            "task": task.name,
            "run": str(run.path),
            "actor": a.actor,
            "iterations": learner.iteration,
            "env_steps": learner.env_steps,
            "initial_success_rate": evals[0]["eval/success_rate"] if evals else None,
            "success_rate": evals[-1]["eval/success_rate"] if evals else None,
            "initial_mean_return": evals[0]["eval/mean_return"] if evals else None,
            "mean_return": evals[-1]["eval/mean_return"] if evals else None,
            "initial_eval": initial.to_dict() if initial else None,
        }
    )
