"""World models (issue 6): play data, RSSM + classifier training, imagined env, offline DPPO.

Everything is real: MuJoCo play data, a (tiny) trained world model, the real DPPO loop.
"""

import json

import numpy as np
import pytest
import torch

import envs
from dppo.cli import main
from dppo.config import ConfigError, load_config
from dppo.evaluate import final_value
from dppo.finetune_offline import finetune_offline
from dppo.world_model_train import train_world_model
from envs.dataset import DemoDataset, write_dataset
from envs.play import collect_play, record_play
from envs.point_reach import PointReachEnv
from world_models.checkpoint import load_world_model, save_world_model
from world_models.classifier import (
    ClassifierConfig,
    SuccessClassifier,
    fit_classifier,
    precision_recall,
)
from world_models.ensemble import EnsembleConfig, PriorEnsemble, fit_prior_ensemble
from world_models.imagined_env import make_imagined_vec_env
from world_models.labels import point_reach_success
from world_models.rssm import LatentState, WorldModel, WorldModelConfig

TINY_WM = [
    "model.deter_dim=32",
    "model.stoch_dim=8",
    "model.hidden_dim=32",
    "train.steps=100",
    "train.lr=3e-3",
    "train.warmup_steps=5",
    "train.batch_size=8",
    "train.seq_len=20",
    "train.log_every=20",
    "train.val_fraction=0.2",
    "classifier.hidden_dim=32",
    "classifier.steps=150",
    "classifier.batch_size=128",
    "ensemble.n_heads=3",
    "ensemble.hidden_dim=16",
    "ensemble.steps=150",
    "ensemble.batch_size=128",
    "eval.horizon=30",
    "eval.starts_per_episode=2",
]
SMALL_DPPO = [
    "task.n_envs=4",
    "algorithm.iterations=1",
    "algorithm.n_steps=5",
    "algorithm.ft_denoising_steps=4",
    "algorithm.batch_size=20",
    "algorithm.critic_batch_size=10",
    "algorithm.update_epochs=2",
    "algorithm.critic_warmup_iterations=0",
    "eval_episodes=0",
    "eval_every=0",
]


@pytest.fixture(scope="module")
def play_data(tmp_path_factory):
    """30 play episodes (2400 steps) of point_reach with success labels."""
    path, stats = record_play(
        "point_reach", 2400, tmp_path_factory.mktemp("play") / "play", seed=0, progress=False
    )
    return path


@pytest.fixture(scope="module")
def wm_run(tmp_path_factory, play_data):
    """A tiny world model + classifier trained on ``play_data`` (run folder)."""
    out = tmp_path_factory.mktemp("wm") / "run"
    cfg = load_config("train-world-model", [f"dataset={play_data}", f"out={out}", *TINY_WM])
    train_world_model(cfg)
    return out


# ----------------------------------------------------------------------------------------------
# the vector-env contract, checked on a real env and on the imagined env
# ----------------------------------------------------------------------------------------------
def check_vector_env(venv, max_episode_steps: int, n_chunks: int, seed: int = 0) -> int:
    """Assert the interface the DPPO loop uses from ``envs.make_vec_env``; returns episodes ended.

    reset(seed) -> (obs (E, To, D) float32 = first obs repeated, info with is_success /
    n_executed / sim_fault + masks), reproducible; step(chunks (E, Ta, Da)) -> obs, reward (E,),
    terminated / truncated (E,) bool, info; SAME_STEP autoreset: an ended env returns its next
    episode's first obs, ``final_obs`` (To, D) and ``final_info`` of the ended episode, and the
    reset's info at top level; success <=> terminated; truncation exactly at the time limit.
    """
    n = venv.num_envs
    n_obs_steps, obs_dim = venv.single_observation_space.shape
    n_action_steps, action_dim = venv.single_action_space.shape
    assert venv.observation_space.shape == (n, n_obs_steps, obs_dim)
    assert venv.action_space.shape == (n, n_action_steps, action_dim)

    def check_info(info):
        for key in ("is_success", "n_executed", "sim_fault"):
            assert np.shape(info[key]) == (n,) and np.shape(info[f"_{key}"]) == (n,)

    obs, info = venv.reset(seed=seed)
    assert obs.shape == (n, n_obs_steps, obs_dim) and obs.dtype == np.float32
    assert np.all(obs == obs[:, :1])
    check_info(info)
    assert not info["is_success"].any() and not info["n_executed"].any()
    again, _ = venv.reset(seed=seed)
    np.testing.assert_array_equal(obs, again)
    with pytest.raises(ValueError):
        venv.step(np.zeros((n, n_action_steps + 1, action_dim), np.float32))
    obs, _ = venv.reset(seed=seed)

    rng = np.random.default_rng(seed)
    low, high = venv.single_action_space.low, venv.single_action_space.high
    elapsed = np.zeros(n, dtype=int)
    ended = 0
    for _ in range(n_chunks):
        chunks = rng.uniform(low, high, size=(n, n_action_steps, action_dim)).astype(np.float32)
        obs, reward, terminated, truncated, info = venv.step(chunks)
        assert obs.shape == (n, n_obs_steps, obs_dim) and obs.dtype == np.float32
        assert np.isfinite(obs).all()
        assert reward.shape == (n,) and np.issubdtype(reward.dtype, np.floating)
        assert terminated.dtype == bool and truncated.dtype == bool
        check_info(info)
        done = terminated | truncated
        executed = final_value(info, "n_executed", done, 0)
        assert np.all(executed[~done] == n_action_steps)
        assert np.all((executed[done] >= 1) & (executed[done] <= n_action_steps))
        elapsed += executed
        assert np.all(elapsed <= max_episode_steps)
        success = envs.step_success(info, terminated, truncated)
        assert np.array_equal(success, terminated)  # success ends the episode, only success does
        timed_out = truncated & ~terminated & ~final_value(info, "sim_fault", done, False)
        assert np.all(elapsed[timed_out] == max_episode_steps)
        if done.any():
            assert info["final_info"]["_is_success"][done].all()
            for i in np.flatnonzero(done):
                assert np.asarray(info["final_obs"][i]).shape == (n_obs_steps, obs_dim)
                assert np.all(obs[i] == obs[i, 0])  # the next episode's first observation
                assert info["n_executed"][i] == 0 and not info["is_success"][i]
            np.testing.assert_array_equal(
                envs.real_next_obs(obs, info, terminated, truncated)[done],
                np.stack([info["final_obs"][i] for i in np.flatnonzero(done)]),
            )
            ended += int(done.sum())
            elapsed[done] = 0
    venv.close()
    return ended


def test_real_vec_env_meets_the_contract():
    venv = envs.make_vec_env("point_reach", 3, seed=0, n_obs_steps=2, n_action_steps=4)
    limit = envs.get_task("point_reach").max_episode_steps
    assert check_vector_env(venv, limit, n_chunks=limit // 4 + 2) >= 3


def test_imagined_vec_env_meets_the_same_contract(wm_run):
    bundle = load_world_model(wm_run)
    for start_states in ("play", "reset"):
        venv = make_imagined_vec_env(
            bundle, "point_reach", 3, 2, 4, max_episode_steps=10, start_states=start_states, seed=0
        )
        assert check_vector_env(venv, 10, n_chunks=8) >= 3
    # a world model whose classifier fires everywhere: every episode ends with success
    venv = make_imagined_vec_env(bundle, "point_reach", 3, 1, 4, success_threshold=1e-9, seed=0)
    venv.reset(seed=1)
    _, reward, terminated, truncated, info = venv.step(np.zeros((3, 4, 2), np.float32))
    assert terminated.all() and not truncated.any() and np.all(reward == 1.0)
    assert np.all(info["final_info"]["n_executed"] == 1)
    # ... unless success must hold for 6 imagined steps in a row: the 2nd chunk's 2nd step
    venv = make_imagined_vec_env(
        bundle, "point_reach", 3, 1, 4, success_threshold=1e-9, success_steps=6, seed=0
    )
    venv.reset(seed=1)
    _, reward, terminated, _, _ = venv.step(np.zeros((3, 4, 2), np.float32))
    assert not terminated.any() and np.all(reward == 0.0)
    _, reward, terminated, _, info = venv.step(np.zeros((3, 4, 2), np.float32))
    assert terminated.all() and np.all(reward == 1.0)
    assert np.all(info["final_info"]["n_executed"] == 2)


def test_open_loop_trained_delta_world_model_trains_and_imagines(play_data, tmp_path):
    out = tmp_path / "wm"
    overrides = [
        f"dataset={play_data}",
        f"out={out}",
        *TINY_WM,
        "model.open_loop_scale=1.0",
        "model.decode_delta=true",
        "classifier.imagined_starts=2",
        "ensemble.n_heads=0",
    ]
    train_world_model(load_config("train-world-model", overrides))
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    open_loop = [r["open_loop"] for r in metrics if "open_loop" in r]
    assert len(open_loop) == 5 and open_loop[-1] < open_loop[0]
    bundle = load_world_model(out)
    assert bundle.model.cfg.decode_delta and bundle.model.cfg.open_loop_scale == 1.0
    venv = make_imagined_vec_env(bundle, "point_reach", 3, 2, 4, max_episode_steps=10, seed=0)
    assert check_vector_env(venv, 10, n_chunks=8) >= 3


def test_imagined_episodes_halt_where_the_ensemble_disagrees(wm_run):
    bundle = load_world_model(wm_run)
    zeros = np.zeros((3, 4, 2), np.float32)

    def first_step(**kwargs):
        venv = make_imagined_vec_env(bundle, "point_reach", 3, 1, 4, seed=0, **kwargs)
        venv.reset(seed=1)
        return venv, venv.step(zeros)

    # a threshold below any disagreement: every episode halts on its first imagined step
    venv, (_, reward, terminated, truncated, info) = first_step(
        max_disagreement=0.0, halt_penalty=2.0
    )
    assert terminated.all() and not truncated.any() and np.all(reward == -2.0)
    assert not info["final_info"]["is_success"].any()
    assert np.all(info["final_info"]["n_executed"] == 1) and venv.halted == 3
    # an unreachable one changes nothing
    _, plain = first_step()
    _, never = first_step(max_disagreement=float("inf"))
    for a, b in zip(plain[:4], never[:4], strict=True):
        np.testing.assert_array_equal(a, b)
    # success comes before halting
    _, (_, reward, terminated, _, info) = first_step(max_disagreement=0.0, success_threshold=1e-9)
    assert terminated.all() and np.all(reward == 1.0) and info["final_info"]["is_success"].all()
    bundle.ensemble = None
    with pytest.raises(ValueError, match="disagreement ensemble"):
        first_step(max_disagreement=0.0)


def test_disagreement_ensemble_is_trained_calibrated_and_saved(wm_run, play_data, tmp_path):
    from dppo.world_model_train import EpisodeSet, filtered_features, state_success_labels

    bundle = load_world_model(wm_run)
    ensemble = bundle.ensemble
    assert ensemble is not None and ensemble.cfg.n_heads == 3
    quantiles = bundle.meta["disagreement_quantiles"]
    values = [quantiles[q] for q in ("0.5", "0.9", "0.95", "0.99", "0.999")]
    assert values == sorted(values) and values[0] > 0
    summary = json.loads((wm_run / "summary.json").read_text())
    assert summary["open_loop"]["disagreement"]["quantiles"] == quantiles
    assert len(summary["open_loop"]["disagreement"]["mean_per_step"]) == 30
    # the heads agree on states like the play data, not far from them
    dataset = DemoDataset(play_data)
    labels, _ = state_success_labels(dataset, None, "state")
    data = EpisodeSet(dataset, "state", labels, np.arange(5))
    deter = filtered_features(bundle.model, data, torch.Generator().manual_seed(0))["deter"]
    familiar = ensemble.disagreement(deter).median()
    # GRU states lie in (-1, 1): unfamiliar ones are random points of that cube
    gen = torch.Generator().manual_seed(0)
    unfamiliar = ensemble.disagreement(torch.rand(deter.shape, generator=gen) * 2 - 1).median()
    assert unfamiliar > 2 * familiar
    # round trip
    save_world_model(
        tmp_path / "ck", bundle.model, bundle.start_obs, bundle.classifier, bundle.meta, ensemble
    )
    again = load_world_model(tmp_path / "ck").ensemble
    assert again.cfg == ensemble.cfg
    torch.testing.assert_close(again.disagreement(deter), ensemble.disagreement(deter))


def test_open_loop_loss_scores_exactly_what_imagination_predicts():
    torch.manual_seed(0)
    cfg = WorldModelConfig("point_reach", "state", 6, 2, 16, 4, 16, kl_scale=0.5)
    model = WorldModel(cfg)
    obs, actions = torch.randn(3, 7, 6), torch.rand(3, 7, 2) * 2 - 1
    model.fit_normalizer(obs.flatten(0, 1).numpy(), actions.flatten(0, 1).numpy())
    start = model.encode_start(obs[:, 0], torch.Generator().manual_seed(1))
    error = model.open_loop_error(start, obs, actions, torch.Generator().manual_seed(2))
    # the imagined env's path: encode the first observation, then prior steps under the actions
    gen = torch.Generator().manual_seed(1)
    state = model.encode_start(obs[:, 0], gen)
    gen.manual_seed(2)
    sq = []
    for t in range(1, 7):
        state = model.imagine_step(state, actions[:, t - 1], gen)
        pred = model.normalizer.normalize("state", model.decode_obs(state))
        sq.append(0.5 * ((pred - model.normalizer.normalize("state", obs[:, t])) ** 2).sum(-1))
    torch.testing.assert_close(error, torch.stack(sq, 1).mean(), rtol=1e-5, atol=1e-6)
    plain, parts = model.loss(obs, actions, torch.Generator().manual_seed(4))
    assert "open_loop" not in parts  # off by default: the filtering loss alone
    model.cfg.open_loop_scale = 2.0
    with_term, parts = model.loss(obs, actions, torch.Generator().manual_seed(4))
    torch.testing.assert_close(with_term - plain, torch.tensor(2.0 * parts["open_loop"]))
    with pytest.raises(ValueError, match="open_loop_scale"):
        WorldModelConfig("point_reach", "state", 6, 2, open_loop_scale=-1.0)


def test_delta_decoder_decodes_changes_since_the_first_observation():
    torch.manual_seed(0)
    cfg = WorldModelConfig("point_reach", "state", 6, 2, 16, 4, 16, decode_delta=True)
    model = WorldModel(cfg)
    obs, actions = torch.randn(3, 5, 6), torch.rand(3, 5, 2) * 2 - 1
    model.fit_normalizer(obs.flatten(0, 1).numpy(), actions.flatten(0, 1).numpy())
    seq = model.observe(obs, actions, sample=False)
    state = LatentState(seq["deter"][:, 2], seq["stoch"][:, 2])
    change = model.decoder(state.feature())
    norm = model.normalizer.normalize("state", obs[:, 0]) + change
    torch.testing.assert_close(
        model.decode_obs(state, obs[:, 0]), model.normalizer.unnormalize("state", norm)
    )
    with pytest.raises(ValueError, match="first_obs"):
        model.decode_obs(state)
    # the decoder is trained towards the change since the window's first step (zero there)
    torch.nn.init.zeros_(model.decoder[-1].weight)
    torch.nn.init.zeros_(model.decoder[-1].bias)
    torch.testing.assert_close(model.decode_obs(state, obs[:, 0]), obs[:, 0], atol=1e-5, rtol=0)
    target = model._decoder_target(obs)
    assert float(target[:, 0].abs().max()) == 0.0
    normalize = model.normalizer.normalize
    torch.testing.assert_close(
        target[:, 3], normalize("state", obs[:, 3]) - normalize("state", obs[:, 0])
    )


def test_prior_ensemble_fits_a_known_posterior():
    gen = torch.Generator().manual_seed(0)
    deter = torch.randn(2000, 6, generator=gen)
    post_mean = torch.tanh(deter[:, :3] @ torch.randn(3, 4, generator=gen))
    post_std = torch.full((2000, 4), 0.3)
    ensemble = PriorEnsemble(EnsembleConfig(deter_dim=6, stoch_dim=4, n_heads=4, hidden_dim=32))
    losses = fit_prior_ensemble(
        ensemble, deter[:1500], post_mean[:1500], post_std[:1500], 1000, 128, 3e-3, gen
    )
    assert losses[-1] < 0.1 * losses[0]
    with torch.no_grad():
        mean, std = ensemble(deter[1500:])  # held out
    assert mean.shape == std.shape == (4, 500, 4)
    assert float((mean.mean(0) - post_mean[1500:]).abs().mean()) < 0.08
    assert abs(float(std.mean()) - 0.3) < 0.05
    with pytest.raises(ValueError, match="n_heads >= 2"):
        EnsembleConfig(deter_dim=6, stoch_dim=4, n_heads=1)


# ----------------------------------------------------------------------------------------------
# play data
# ----------------------------------------------------------------------------------------------
def test_point_reach_play_explores_and_completes_the_task_sometimes(play_data):
    data = DemoDataset(play_data)
    obs, success = data.obs["state"], data.success
    assert data.meta["kind"] == "play" and data.meta["task"] == "point_reach"
    assert 0.0 < success.mean() < 0.5  # occasional completions, mostly other behaviour
    assert 0 < sum(data.meta["episode_success"]) < data.n_episodes
    assert set(data.meta["behaviour_steps"]) == {"reach", "goal", "near_goal", "rush", "wander"}
    assert (
        np.ptp(obs[:, 0]) > 1.2 and np.ptp(obs[:, 1]) > 1.0
    )  # the arena, both sides of the pillar
    assert np.all(np.abs(data.action) <= 1.0)
    # play does not stop at success: the stored signal equals the task's success of the next obs
    for i in range(data.n_episodes):
        ep = data.episode(i)
        np.testing.assert_array_equal(
            point_reach_success(ep["obs"]["state"][1:]), ep["success"][:-1]
        )


def test_lift_play_records_robosuite_steps_with_success_labels():
    episodes, stats = collect_play("lift", 30, seed=0, episode_steps=30, progress=False)
    assert stats["n_steps"] == 30 and stats["n_episodes"] == 1
    ep = episodes[0]
    assert ep["obs"]["state"].shape == (30, 19) and ep["action"].shape == (30, 7)
    assert ep["success"].dtype == bool and np.all(np.abs(ep["action"]) <= 1.0)


@pytest.mark.slow
def test_lift_play_moves_and_lifts_the_cube():
    episodes, stats = collect_play("lift", 3000, seed=0, progress=False)
    cube_moves = [np.ptp(ep["obs"]["state"][:, :3], axis=0).max() for ep in episodes]
    assert max(cube_moves) > 0.05 and stats["episodes_with_success"] >= 1


def test_play_for_a_task_without_collector_is_rejected():
    with pytest.raises(ValueError, match="no play collector"):
        collect_play("Hopper-v5", 10, progress=False)


# ----------------------------------------------------------------------------------------------
# world model and classifier
# ----------------------------------------------------------------------------------------------
def test_world_model_training_lowers_the_loss_and_reports(wm_run):
    s = json.loads((wm_run / "summary.json").read_text())
    assert s["val_loss"] < s["initial_val_loss"]
    assert s["val_recon"] < 0.5 * s["initial_val_recon"]
    metrics = [json.loads(x) for x in (wm_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in metrics if "loss" in r]
    assert losses[-1] < losses[0]
    assert s["static_dims"] == [4, 5]  # the goal
    assert s["play_steps"] == 2400 and s["success_labels"] == "dataset"
    ol = s["open_loop"]
    assert ol["horizon"] == 30 and len(ol["model_mse_per_step"]) == 30
    assert ol["copy_last_mse"] > 0 and ol["model_mse"] > 0
    for part in (s["classifier_held_out"], ol["classifier"], ol["classifier_episodes"]):
        assert {"precision", "recall", "accuracy"} <= set(part)
    for plot in ("world_model.png", "classifier.png", "open_loop.png"):
        assert (wm_run / "plots" / plot).stat().st_size > 0
    assert not (wm_run / "INCOMPLETE").exists()


def test_imagined_features_are_open_loop_latents_with_the_real_labels(wm_run, play_data):
    from dppo.world_model_train import (
        EpisodeSet,
        imagined_features,
        open_loop_windows,
        state_success_labels,
    )

    model = load_world_model(wm_run).model
    dataset = DemoDataset(play_data)
    labels, _ = state_success_labels(dataset, None, "state")
    data = EpisodeSet(dataset, "state", labels, np.arange(dataset.n_episodes))
    feats, got = imagined_features(model, data, 10, 2, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    ep, start, t, first, actions = open_loop_windows(data, 10, 2, gen)
    _, expected = model.open_loop(first, actions, gen)
    assert len(ep) == 2 * dataset.n_episodes and bool((start[::2] == 0).all())
    assert torch.equal(feats, expected.flatten(0, 1))
    assert torch.equal(got, data.labels[ep[:, None], t].flatten())
    assert bool(got.any()) and not bool(got.all())


def test_classifier_can_also_train_on_imagined_latents(play_data, tmp_path):
    overrides = [f"dataset={play_data}", f"out={tmp_path / 'wm'}", *TINY_WM]
    overrides += ["classifier.imagined_starts=2", "classifier.imagined_horizon=15"]
    s = train_world_model(load_config("train-world-model", overrides))
    counts = s["classifier_train_features"]
    assert counts["imagined"] == 2 * 15 * s["n_train_episodes"] and counts["filtered"] > 0
    with pytest.raises(ConfigError, match="classifier.imagined_starts must be >= 0"):
        train_world_model(
            load_config("train-world-model", [*overrides, "classifier.imagined_starts=-1"])
        )


def test_classifier_separates_a_toy_set():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=gen)
    y = x[:, 0] + 0.5 * x[:, 3] > 0.3
    clf = SuccessClassifier(ClassifierConfig(feature_dim=8, hidden_dim=32))
    losses = fit_classifier(clf, x[:1500], y[:1500], 400, 128, 3e-3, gen)
    assert losses[-1] < 0.5 * losses[0]
    report = precision_recall(clf.predict(x[1500:]).numpy(), y[1500:].numpy())
    assert report["accuracy"] > 0.95 and report["precision"] > 0.9 and report["recall"] > 0.9


def test_world_model_and_classifier_checkpoints_round_trip(wm_run, tmp_path):
    first = load_world_model(wm_run)
    save_world_model(tmp_path / "ck", first.model, first.start_obs, first.classifier, first.meta)
    second = load_world_model(tmp_path / "ck")
    assert second.model.cfg == first.model.cfg and second.meta == first.meta
    for a, b in ((first.model, second.model), (first.classifier, second.classifier)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.testing.assert_close(first.start_obs, second.start_obs)
    actions = torch.rand(5, 6, 2) * 2 - 1
    outs = [
        b.model.open_loop(b.start_obs[:5], actions, torch.Generator().manual_seed(3))
        for b in (first, second)
    ]
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(first.classifier(outs[0][1]), second.classifier(outs[1][1]))
    # the goal (a static dim) is copied from the start observation, never imagined
    torch.testing.assert_close(outs[0][0][:, :, 4:], first.start_obs[:5, None, 4:].expand(5, 6, 2))


def test_play_data_without_success_labels(play_data, tmp_path):
    labelled = DemoDataset(play_data)
    episodes = [
        {k: v for k, v in labelled.episode(i).items() if k != "success"}
        for i in range(labelled.n_episodes)
    ]
    unlabelled = write_dataset(tmp_path / "unlabelled", episodes, {"task": "point_reach"})
    args = [f"dataset={unlabelled}", *TINY_WM, "train.steps=10"]
    with pytest.raises(ValueError, match="label_with"):
        train_world_model(load_config("train-world-model", [*args, f"out={tmp_path / 'a'}"]))
    with pytest.raises(ValueError, match="cannot import"):
        train_world_model(
            load_config(
                "train-world-model", [*args, "label_with=nowhere:f", f"out={tmp_path / 'b'}"]
            )
        )
    predicate = "world_models.labels:point_reach_success"
    s = train_world_model(
        load_config(
            "train-world-model", [*args, f"label_with={predicate}", f"out={tmp_path / 'c'}"]
        )
    )
    reference = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert s["success_labels"] == predicate == reference["success_labels"]
    shifted = np.zeros(labelled.n_steps, bool)  # the dataset's labels, about o_{t+1}, shifted
    shifted[1:] = labelled.success[:-1]
    shifted[labelled.episode_starts] = False
    assert s["success_state_fraction"] == pytest.approx(shifted.mean())


# ----------------------------------------------------------------------------------------------
# offline fine-tuning
# ----------------------------------------------------------------------------------------------
def test_offline_finetuning_takes_no_real_env_step(pretrained_run, wm_run, tmp_path, monkeypatch):
    real_steps = {"n": 0}
    original = PointReachEnv.step

    def counting_step(self, action):
        real_steps["n"] += 1
        return original(self, action)

    monkeypatch.setattr(PointReachEnv, "step", counting_step)
    probe = envs.make_vec_env("point_reach", 2, seed=0, n_action_steps=4)
    probe.reset(seed=0)
    probe.step(np.zeros((2, 4, 2), np.float32))
    assert real_steps["n"] == 8  # the counter sees real steps
    real_steps["n"] = 0

    out = tmp_path / "offline"
    cfg = load_config(
        "finetune-offline",
        [f"checkpoint={pretrained_run}", f"world_model={wm_run}", f"out={out}", *SMALL_DPPO],
    )
    s = finetune_offline(cfg)
    assert real_steps["n"] == 0
    assert s["online_env_steps"] == 0 and 0 < s["imagined_env_steps"] <= 4 * 5 * 4
    assert s["play_data"]["steps"] == 2400 and s["play_data"]["episodes"] == 30
    assert json.loads((out / "summary.json").read_text())["online_env_steps"] == 0
    assert (out / "plots" / "imagination_vs_reality.png").stat().st_size > 0
    assert (out / "checkpoints" / "latest" / "model.safetensors").exists()
    record = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["iteration"] == 1 and "approx_kl" in record
    # successes per env count every env, finished episodes or not (4 envs here)
    successes = round(record["successes_per_env"] * 4)
    assert successes == pytest.approx(record["successes_per_env"] * 4)
    assert 0 <= successes <= record["n_episodes"]
    assert s["imagined_successes_per_env"] == record["successes_per_env"]


def test_world_model_of_another_task_is_rejected(pretrained_run, wm_run, tmp_path):
    other = WorldModel(WorldModelConfig("point_reach_two_goals", "state", 8, 2, 16, 4, 16))
    clf = SuccessClassifier(ClassifierConfig(feature_dim=other.cfg.feature_dim, hidden_dim=8))
    save_world_model(tmp_path / "other", other, torch.zeros(3, 8), clf)
    base = [f"checkpoint={pretrained_run}", *SMALL_DPPO]
    cfg = load_config("finetune-offline", [*base, f"world_model={tmp_path / 'other'}"])
    with pytest.raises(ConfigError, match="point_reach_two_goals.*observations"):
        finetune_offline(cfg)
    cfg = load_config("finetune-offline", [*base, f"world_model={pretrained_run}"])
    with pytest.raises(ConfigError, match="policy checkpoint, not a world model"):
        finetune_offline(cfg)


def test_halting_offline_run_uses_the_calibrated_quantile(pretrained_run, wm_run, tmp_path):
    base = [f"checkpoint={pretrained_run}", *SMALL_DPPO, "imagination.halt_quantile=0.5"]
    cfg = load_config("finetune-offline", [*base, f"world_model={wm_run}", f"out={tmp_path / 'a'}"])
    s = finetune_offline(cfg)
    quantiles = load_world_model(wm_run).meta["disagreement_quantiles"]
    assert s["halt_disagreement"] == quantiles["0.5"] and s["online_env_steps"] == 0
    record = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    # half the imagined play steps are above the median: some of 4 x 20 imagined steps halt
    assert s["imagined_halts_per_env"] == record[-1]["terminal_failures_per_env"] > 0
    bundle = load_world_model(wm_run)  # the same world model without its ensemble
    save_world_model(tmp_path / "plain", bundle.model, bundle.start_obs, bundle.classifier)
    cfg = load_config("finetune-offline", [*base, f"world_model={tmp_path / 'plain'}"])
    with pytest.raises(ConfigError, match="needs a world model with a disagreement ensemble"):
        finetune_offline(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("imagination.success_steps=0", "imagination.success_steps must be >= 1"),
        ("imagination.max_episode_steps=0", "imagination.max_episode_steps must be > 0"),
        ("imagination.start_states=nowhere", "imagination.start_states must be one of"),
        ("imagination.halt_penalty=-1", "imagination.halt_penalty must be >= 0"),
        ("imagination.halt_quantile=0.42", r"not a calibrated quantile.*one of \[0.5, 0.9"),
    ],
)
def test_bad_imagination_settings_fail_before_training(pretrained_run, wm_run, override, message):
    cfg = load_config(
        "finetune-offline",
        [f"checkpoint={pretrained_run}", f"world_model={wm_run}", *SMALL_DPPO, override],
    )
    with pytest.raises(ConfigError, match=message):
        finetune_offline(cfg)


def test_cli_commands_and_their_errors(pretrained_run, tmp_path, capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(c in text for c in ("collect-play", "train-world-model", "finetune-offline"))
    assert main(["collect-play", "n_steps=100", f"out={tmp_path / 'play'}"]) == 0
    assert DemoDataset(tmp_path / "play").n_steps >= 100
    assert main(["collect-play", "task=Hopper-v5", "n_steps=10", f"out={tmp_path / 'x'}"]) == 2
    assert "no play collector" in capsys.readouterr().err
    argv = ["finetune-offline", f"checkpoint={pretrained_run}", f"world_model={tmp_path / 'none'}"]
    assert main(argv) == 2
    assert "no world model" in capsys.readouterr().err
