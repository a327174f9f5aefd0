"""DPPO: log-probs, frozen denoiser, update, resume, validation (tiny configs, real envs)."""

import json

import numpy as np
import pytest
import torch

import envs
from dppo.config import ConfigError, load_config
from dppo.finetune import (
    build_learner,
    collect_rollout,
    finetune,
    learn,
    old_log_probs,
)

SMALL = [
    "task.n_envs=4",
    "algorithm.n_steps=5",
    "algorithm.ft_denoising_steps=4",
    "algorithm.batch_size=20",
    "algorithm.critic_batch_size=10",
    "algorithm.update_epochs=2",
    "algorithm.critic_warmup_iterations=0",
    "eval_episodes=0",
    "eval_every=0",
]


def small_cfg(run, *extra):
    return load_config("finetune", [f"checkpoint={run}", *SMALL, *extra])


def rollout(learner, cfg, seed=0):
    venv = envs.make_vec_env(
        "point_reach", cfg.task.n_envs, seed=seed, n_obs_steps=1, n_action_steps=4
    )
    return collect_rollout(learner, venv, "state", cfg.algorithm.n_steps, seed, scale=True)


def test_transition_log_prob_equals_independent_normal(pretrained_run):
    cfg = small_cfg(pretrained_run)
    learner = build_learner(cfg)
    ro = rollout(learner, cfg)
    cond, chain = (x.flatten(0, 1) for x in ro.stacked())
    actor, policy = learner.actor, learner.actor.policy
    k = torch.full((cond.shape[0],), 2)
    lp, _ = actor.log_prob(cond, chain, k)
    # independent: DDPM posterior from the schedule, std floored at 0.1, torch Normal, clamp, mean
    t = policy.schedule.num_train_steps - 1 - (actor.record_from + 2)
    ab = policy.schedule.alphas_cumprod
    a_t, a_prev = ab[t], ab[t - 1] if t > 0 else torch.tensor(1.0)
    x, x_next = chain[:, 2], chain[:, 3]
    with torch.no_grad():
        eps = policy.denoiser(x, torch.full((len(x),), t), cond)
    x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
    beta = 1 - a_t / a_prev
    mean = a_prev.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x
    std = ((1 - a_prev) / (1 - a_t) * beta).sqrt().clamp(min=0.1)
    ref = torch.distributions.Normal(mean, std).log_prob(x_next).clamp(-5, 2).mean(dim=(1, 2))
    torch.testing.assert_close(lp.detach(), ref, rtol=1e-4, atol=1e-5)


def test_frozen_denoiser_serves_early_steps_and_never_changes(pretrained_run):
    cfg = small_cfg(pretrained_run)
    learner = build_learner(cfg)
    policy = learner.actor.policy
    k = cfg.algorithm.ft_denoising_steps
    assert policy.network_for(k - 1) is policy.denoiser
    assert policy.network_for(k) is policy.frozen_denoiser
    assert all(not p.requires_grad for p in policy.frozen_denoiser.parameters())
    frozen_before = {n: p.clone() for n, p in policy.frozen_denoiser.named_parameters()}
    tuned_before = {n: p.clone() for n, p in policy.denoiser.named_parameters()}
    ro = rollout(learner, cfg)
    assert ro.chain[0].shape[1] == k + 1  # only the fine-tuned steps are recorded
    stats, _ = learn(learner, ro, cfg.algorithm, train_actor=True)
    assert np.isfinite(stats["policy_loss"]) and stats["ratio_mean"] > 0
    for n, p in policy.frozen_denoiser.named_parameters():
        assert torch.equal(p, frozen_before[n]), n
    assert any(not torch.equal(p, tuned_before[n]) for n, p in policy.denoiser.named_parameters())


def test_old_log_probs_give_unit_ratio_before_update(pretrained_run):
    cfg = small_cfg(pretrained_run)
    learner = build_learner(cfg)
    ro = rollout(learner, cfg)
    cond, chain = (x.flatten(0, 1) for x in ro.stacked())
    old = old_log_probs(learner.actor, cond, chain, 7)
    again = old_log_probs(learner.actor, cond, chain, 1000)
    torch.testing.assert_close(old, again)


def test_ddim_mode_fine_tunes_all_steps(pretrained_run):
    cfg = small_cfg(pretrained_run, "algorithm.denoising=ddim", "algorithm.ddim_steps=4")
    learner = build_learner(cfg)
    assert learner.actor.n_transitions == 4 and learner.actor.train_sampler.eta == 1.0
    ev = learner.actor.eval_runtime(2, seed=0)
    assert ev.sampler.diffusion.eta == 0.0
    ro = rollout(learner, cfg)
    assert ro.chain[0].shape[1] == 5


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _strip(record):
    return {k: v for k, v in record.items() if not k.startswith("time_")}


def test_resume_reproduces_next_iteration(pretrained_run, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    finetune(small_cfg(pretrained_run, f"out={full}", "algorithm.iterations=3"))
    finetune(small_cfg(pretrained_run, f"out={part}", "algorithm.iterations=2"))
    # a resumed run continues from its last checkpoint, with its saved config (iterations raised)
    finetune(load_config("finetune", [f"resume={part}", "algorithm.iterations=3"]))
    a, b = _metrics(full), _metrics(part)
    assert [r["iteration"] for r in b] == [1, 2, 3]
    full_rec, resumed_rec = _strip(a[2]), _strip(b[2])
    assert full_rec.keys() == resumed_rec.keys()
    for key, value in full_rec.items():
        if value is None:
            assert resumed_rec[key] is None, key
        else:
            assert resumed_rec[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithm.batch_size=7", "must divide"),
        ("algorithm.ft_denoising_steps=50", "ft_denoising_steps"),
        ("task=point_reach_two_goals", "trained on task"),
    ],
)
def test_bad_configs_fail_before_training(pretrained_run, tmp_path, override, message):
    cfg = small_cfg(pretrained_run, f"out={tmp_path / 'x'}", override)
    with pytest.raises(ConfigError, match=message):
        finetune(cfg)
    assert not (tmp_path / "x").exists()


def test_bc_regulariser_uses_demonstrations(pretrained_run, demo_dataset, tmp_path):
    cfg = small_cfg(
        pretrained_run,
        f"out={tmp_path / 'bc'}",
        "algorithm.iterations=1",
        "algorithm.bc_coef=0.1",
        f"algorithm.bc_dataset={demo_dataset}",
        "algorithm.bc_batch_size=16",
    )
    finetune(cfg)
    rec = _metrics(tmp_path / "bc")[-1]
    assert rec["bc_loss"] > 0 and np.isfinite(rec["bc_loss"])


def test_wandb_offline_mirror_writes_locally(tmp_path):
    from dppo.tracking import Tracker

    tracker = Tracker("offline", "dppo-test", str(tmp_path), {"a": 1})
    tracker.log({"loss": 1.0}, step=1)
    tracker.close()
    assert any((tmp_path / "wandb").glob("offline-run-*"))
    with pytest.raises(ValueError, match="wandb.mode"):
        Tracker("cloud", "x", str(tmp_path), {})


@pytest.mark.slow
def test_short_finetuning_improves_success(tmp_path):
    """The quickstart recipe at reduced size: DPPO must beat the pre-trained policy."""
    from dppo.quickstart import quickstart

    cfg = load_config(
        "quickstart",
        [
            f"out={tmp_path / 'qs'}",
            "demo_episodes=60",
            "pretrain_steps=1500",
            "finetune_iterations=12",
            "eval_episodes=50",
        ],
    )
    quickstart(cfg)
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert summary["finetune"]["success_rate"] > summary["pretrain"]["success_rate"] + 0.1
