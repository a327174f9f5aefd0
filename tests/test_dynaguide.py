"""DynaGuide: the metric and its gradient, goal examples, the dynamics model and its training,
and the hook in the sampler (zero-strength identity, steering, bad input)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dppo.config import load_config
from dppo.train_dynamics import dynamics_windows, train_dynamics
from envs.dataset import DemoDataset
from envs.demos import record_demos
from envs.point_reach import POS
from policies.chunk_samplers import build_chunk_sampler
from policies.diffusion import DiffusionPolicy, PolicyConfig
from policies.dynaguide import (
    DynaGuideObjective,
    DynamicsConfig,
    DynamicsModel,
    build_dynaguide,
    dynaguide_metric,
    goal_embeddings,
    load_dynamics,
    save_dynamics,
)
from policies.guidance import build_hooks
from policies.normalizer import ACTION_KEY
from policies.runtime import PolicyRuntime

TASK, OBS_DIM, ACTION_DIM, HORIZON, BATCH = "point_reach_two_goals", 8, 2, 4, 6


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """A small real demonstration dataset of the two-goal task."""
    path = tmp_path_factory.mktemp("demos") / "two_goals"
    record_demos(TASK, 12, path, seed=0, progress=False)
    return path


def make_dynamics(dataset=None, seed=0, **overrides) -> DynamicsModel:
    torch.manual_seed(seed)
    cfg = {
        "task": TASK,
        "obs_shapes": {"state": [OBS_DIM]},
        "action_dim": ACTION_DIM,
        "horizon": HORIZON,
        "future_steps": 6,
        "hidden_dim": 32,
        "depth": 2,
        **overrides,
    }
    model = DynamicsModel(DynamicsConfig(**cfg))
    if dataset is not None:
        model.normalizer.fit({**dataset.obs, ACTION_KEY: dataset.action})
    return model.eval()


def make_policy(dataset: DemoDataset, seed=0) -> DiffusionPolicy:
    torch.manual_seed(seed)
    policy = DiffusionPolicy(
        PolicyConfig(
            task=TASK,
            obs_shapes={"state": [OBS_DIM]},
            action_dim=ACTION_DIM,
            horizon=HORIZON,
            n_action_steps=HORIZON,
            denoiser="mlp",
            denoiser_kwargs={"hidden_dim": 32, "depth": 3},
            schedule={"num_train_steps": 20},
        )
    )
    policy.normalizer.fit({**dataset.obs, ACTION_KEY: dataset.action})
    return policy.eval()


def start_observations(dataset: DemoDataset) -> dict[str, np.ndarray]:
    first = dataset.obs["state"][dataset.episode_starts[:BATCH]]
    return {"state": first[:, None].astype(np.float32)}


def test_metric_matches_its_formula_and_its_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    goals = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    negatives = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    alpha = 0.7
    zn, gn, bn = (t.detach().numpy() for t in (z, goals, negatives))

    def lse(a):
        return np.log(np.exp(a).sum(axis=1))

    want = lse(-np.linalg.norm(zn[:, None] - gn[None], axis=-1) / alpha) - lse(
        -np.linalg.norm(zn[:, None] - bn[None], axis=-1) / alpha
    )
    np.testing.assert_allclose(
        dynaguide_metric(z, goals, negatives, alpha).detach().numpy(), want, rtol=1e-12
    )
    assert torch.autograd.gradcheck(lambda x: dynaguide_metric(x, goals, negatives, alpha), (z,))
    assert torch.autograd.gradcheck(lambda x: dynaguide_metric(x, goals, None, alpha), (z,))


def test_objective_gradient_through_the_dynamics_model_matches_finite_differences(demos):
    dataset = DemoDataset(demos)
    model = make_dynamics(dataset).double()
    goals = goal_embeddings(model, "goal_reached:0", demos).double()
    objective = DynaGuideObjective(model, goals, None, alpha=0.5)
    obs = {"state": torch.as_tensor(start_observations(dataset)["state"], dtype=torch.float64)}
    actions = torch.rand(BATCH, HORIZON, ACTION_DIM, dtype=torch.float64) * 2 - 1
    actions.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: objective(a, obs), (actions,))


def test_goal_specs_select_the_right_episodes(demos):
    dataset = DemoDataset(demos)
    model = make_dynamics(dataset)
    up = goal_embeddings(model, "goal_reached:0", demos)
    down = goal_embeddings(model, "goal_reached=1", demos)
    every = goal_embeddings(model, "success:1", demos)
    assert len(up) + len(down) == len(every) == dataset.n_episodes  # demos keep successes only
    assert len(up) > 0 and len(down) > 0
    # goal 0 lies above the pillar, goal 1 below: the final positions say so (embedding y > 0)
    y_index = POS.start + 1
    zero_y = model.normalizer.normalize("state", torch.zeros(OBS_DIM))[y_index]
    assert (up[:, y_index] > zero_y).all() and (down[:, y_index] < zero_y).all()
    with pytest.raises(ValueError, match="no episode"):
        goal_embeddings(model, "goal_reached:5", demos)
    with pytest.raises(ValueError, match="neither an existing"):
        goal_embeddings(model, "somewhere_else", demos)
    with pytest.raises(ValueError, match="needs a dataset"):
        goal_embeddings(model, "goal_reached:0", None)


def test_goal_files_and_dimension_mismatch(demos, tmp_path):
    dataset = DemoDataset(demos)
    model = make_dynamics(dataset)
    finals = dataset.obs["state"][dataset.episode_ends - 1]
    np.save(tmp_path / "goals.npy", finals)
    np.savez(tmp_path / "goals.npz", state=finals)
    (tmp_path / "goals.json").write_text(json.dumps(finals.tolist()))
    from_spec = goal_embeddings(model, "success:1", demos)
    for name in ("goals.npy", "goals.npz", "goals.json"):
        torch.testing.assert_close(goal_embeddings(model, str(tmp_path / name)), from_spec)
    np.save(tmp_path / "short.npy", finals[:, :5])
    with pytest.raises(ValueError, match=r"expects \(N, 8\) observations"):
        goal_embeddings(model, str(tmp_path / "short.npy"))
    (tmp_path / "keyed.json").write_text(json.dumps({"state": finals[:, :7].tolist()}))
    with pytest.raises(ValueError, match="key 'state' has shape"):
        goal_embeddings(model, str(tmp_path / "keyed.json"))
    with pytest.raises(ValueError, match=r"have shape \(2, 3\); the dynamics model needs"):
        DynaGuideObjective(model, torch.zeros(2, 3))


def test_dynamics_windows_follow_the_chunk_convention(demos):
    dataset = DemoDataset(demos)
    w = dynamics_windows(dataset, n_obs_steps=2, horizon=HORIZON, future_steps=5)
    assert len(w["action"]) == dataset.n_steps
    start, end = int(dataset.episode_starts[1]), int(dataset.episode_ends[1])
    t = start + 3  # anchor 3 of episode 1
    np.testing.assert_array_equal(w["obs"]["state"][t].numpy(), dataset.obs["state"][t - 1 : t + 1])
    np.testing.assert_array_equal(w["action"][t].numpy(), dataset.action[t - 1 : t - 1 + HORIZON])
    np.testing.assert_array_equal(w["future"]["state"][t].numpy(), dataset.obs["state"][t + 5])
    last = end - 1  # the future of the last anchor is clipped to the episode's last observation
    np.testing.assert_array_equal(w["future"]["state"][last].numpy(), dataset.obs["state"][last])


def test_training_reduces_the_loss_and_saves_a_loadable_model(demos, tmp_path):
    cfg = load_config(
        "train_dynamics",
        [
            f"dataset={demos}",
            f"out={tmp_path / 'run'}",
            f"task={TASK}",
            "train.steps=150",
            "train.batch_size=128",
            "train.warmup_steps=10",
            "train.log_every=50",
            "train.threads=1",
            "dynamics.hidden_dim=64",
            "dynamics.depth=2",
            "dynamics.future_steps=10",
        ],
    )
    summary = train_dynamics(cfg)
    assert summary["final_loss"] < 0.5 * summary["initial_loss"]
    assert summary["val_loss"] is not None and summary["n_val_windows"] > 0
    run = Path(summary["run"])
    assert (run / "plots" / "dynamics.png").is_file() and (run / "summary.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [50, 100, 150]
    model, meta = load_dynamics(run)
    assert meta["dataset"] == str(Path(demos).resolve()) and model.cfg.future_steps == 10
    with pytest.raises(ValueError, match="dynamics.future_steps"):
        train_dynamics(
            load_config("train_dynamics", [f"dataset={demos}", "dynamics.future_steps=0"])
        )


def test_checkpoint_roundtrip_and_wrong_folders(demos, tmp_path):
    dataset = DemoDataset(demos)
    model = make_dynamics(dataset)
    save_dynamics(model, tmp_path / "dyn", meta={"dataset": str(demos)})
    loaded, meta = load_dynamics(tmp_path / "dyn" / "model.safetensors")
    obs = {"state": torch.as_tensor(start_observations(dataset)["state"])}
    actions = torch.zeros(BATCH, HORIZON, ACTION_DIM)
    torch.testing.assert_close(loaded(obs, actions), model(obs, actions), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no dynamics model"):
        load_dynamics(tmp_path / "missing")
    from policies.checkpoint import save_policy

    save_policy(make_policy(dataset), tmp_path / "policy")
    with pytest.raises(ValueError, match="policy checkpoint, not a dynamics model"):
        load_dynamics(tmp_path / "policy")


@pytest.fixture(scope="module")
def dynamics_ckpt(demos, tmp_path_factory):
    dataset = DemoDataset(demos)
    path = tmp_path_factory.mktemp("dyn") / "dyn"
    save_dynamics(make_dynamics(dataset), path, meta={"dataset": str(demos)})
    return path


def guidance_cfg(dynamics_ckpt, **overrides):
    return {
        "name": "dynaguide",
        "dynamics": str(dynamics_ckpt),
        "goals": "goal_reached:0",
        "negatives": "goal_reached:1",
        "alpha": 0.3,
        **overrides,
    }


@pytest.mark.parametrize("name", ["ddpm", "ddim", "rti"])
def test_zero_strength_dynaguide_is_bit_identical(demos, dynamics_ckpt, name):
    dataset = DemoDataset(demos)
    policy = make_policy(dataset)
    obs = start_observations(dataset)
    hooks = build_hooks(guidance_cfg(dynamics_ckpt, strength=0.0, repeats=2), policy, TASK)
    chunks = []
    for h in ((), hooks):
        runtime = PolicyRuntime(policy, build_chunk_sampler(name, policy), BATCH, hooks=h, seed=7)
        chunks.append(np.stack([runtime.act(obs).chunk for _ in range(2)]))
    assert np.array_equal(chunks[0], chunks[1])


def test_dynaguide_raises_the_metric_and_repeats_cost_evaluations(demos, dynamics_ckpt):
    dataset = DemoDataset(demos)
    policy = make_policy(dataset)
    obs = start_observations(dataset)
    (hook,) = build_hooks(guidance_cfg(dynamics_ckpt), policy, TASK)
    obs_t = {"state": torch.as_tensor(obs["state"])}
    metric = []
    for strength in (0.0, 2.0):
        hook.strength = strength
        runtime = PolicyRuntime(
            policy, build_chunk_sampler("ddim", policy), BATCH, hooks=[hook], seed=7
        )
        chunk = torch.as_tensor(runtime.act(obs).chunk)
        with torch.no_grad():
            metric.append(float(hook.objective(chunk, obs_t).mean()))
    assert metric[1] > metric[0]
    hook.strength, hook._repeats = 1.0, 3
    runtime = PolicyRuntime(
        policy, build_chunk_sampler("ddim", policy, steps=5), BATCH, hooks=[hook], seed=7
    )
    assert runtime.act(obs).nfe == 15
    assert hook.describe()["name"] == "dynaguide" and hook.describe()["n_negatives"] > 0


def test_dynaguide_bad_input(demos, dynamics_ckpt, tmp_path):
    dataset = DemoDataset(demos)
    policy = make_policy(dataset)
    other = DiffusionPolicy(
        PolicyConfig(
            task=TASK,
            obs_shapes={"state": [OBS_DIM]},
            action_dim=ACTION_DIM,
            horizon=8,
            n_action_steps=4,
            denoiser="mlp",
            denoiser_kwargs={"hidden_dim": 32, "depth": 3},
        )
    )
    with pytest.raises(ValueError, match="horizon 4 vs the policy's 8"):
        build_dynaguide(other, str(dynamics_ckpt), "goal_reached:0")
    np.save(tmp_path / "wrong.npy", np.zeros((3, 6)))
    with pytest.raises(ValueError, match=r"expects \(N, 8\)"):
        build_hooks(guidance_cfg(dynamics_ckpt, goals=str(tmp_path / "wrong.npy")), policy, TASK)
    streaming_cfg = PolicyConfig(**{**policy.cfg.to_dict(), "policy_type": "streaming"})
    streaming = DiffusionPolicy(streaming_cfg)
    with pytest.raises(ValueError, match="sampler 'streaming' does not support guidance"):
        build_hooks(
            guidance_cfg(dynamics_ckpt),
            streaming,
            TASK,
            sampler=build_chunk_sampler("streaming", streaming),
        )


def test_bench_guidance_writes_its_table(demos, dynamics_ckpt, tmp_path):
    from dppo.bench_guidance import run_bench_guidance
    from policies.checkpoint import save_policy

    save_policy(make_policy(DemoDataset(demos)), tmp_path / "policy")
    overrides = [
        f"checkpoint={tmp_path / 'policy'}",
        f"dynamics={dynamics_ckpt}",
        "n_episodes=4",
        "n_envs=2",
        "strengths=[0,1]",
        "threads=1",
        "sampler=ddim",
        "sampler.steps=3",
        f"out={tmp_path / 'bench'}",
    ]
    report = run_bench_guidance(load_config("bench_guidance", overrides))
    assert report["chosen"] == 0 and [r["strength"] for r in report["rows"]] == [0.0, 1.0]
    for row in report["rows"]:
        assert row["n_episodes"] == 4 and 0.0 <= row["behaviour_share"] <= 1.0
        assert sum(row["outcome_counts"].values()) == 4
    assert report["rows"][0]["extra_ms_per_chunk"] == 0.0
    for name in ("table.md", "bench_guidance.json", "guidance.png"):
        assert (tmp_path / "bench" / name).is_file()
    np.save(tmp_path / "goals.npy", np.zeros((2, OBS_DIM)))
    with pytest.raises(ValueError, match="set chosen"):
        run_bench_guidance(
            load_config("bench_guidance", [*overrides, f"guidance.goals={tmp_path}/goals.npy"])
        )
