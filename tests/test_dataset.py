"""Zarr demonstration datasets (DP layout), training windows and expert demonstrations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import envs
from envs.dataset import DemoDataset, WindowDataset, write_dataset
from envs.demos import collect_demos, record_demos

META = {"task": "unit", "control_freq": 20.0, "expert_noise": np.float64(0.1), "created_by": "test"}


def make_episodes(lengths, action_dim=2, seed=0):
    """Episodes whose values encode (global step index): easy to check padding by hand."""
    rng = np.random.default_rng(seed)
    episodes, offset = [], 0
    for length in lengths:
        steps = np.arange(offset, offset + length, dtype=np.float32)
        episodes.append(
            {
                "obs": {
                    "state": np.stack([steps, -steps, steps * 2], axis=1),
                    "aux": rng.normal(size=(length, 2, 3)).astype(np.float32),
                },
                "action": np.repeat(steps[:, None], action_dim, axis=1) + 0.5,
                "reward": rng.normal(size=length).astype(np.float32),
                "success": np.arange(length) == length - 1,
            }
        )
        offset += length
    return episodes


def test_round_trip_in_diffusion_policy_layout(tmp_path):
    path = tmp_path / "demos.zarr"
    episodes = make_episodes([3, 5, 4])
    episodes[1]["success"][:] = False
    write_dataset(path, episodes, META)

    root = zarr.open_group(str(path), mode="r")
    assert sorted(root["data"].array_keys()) == ["action", "aux", "reward", "state", "success"]
    assert root["meta"]["episode_ends"][:].tolist() == [3, 8, 12]
    assert root["meta"]["episode_ends"].dtype == np.int64

    ds = DemoDataset(path)
    assert ds.n_episodes == 3 and ds.n_steps == 12 and ds.action_dim == 2
    assert ds.obs_keys == {"state": (3,), "aux": (2, 3)}
    assert ds.meta["task"] == "unit" and ds.meta["expert_noise"] == 0.1
    assert ds.meta["obs_keys"] == {"state": [3], "aux": [2, 3]}
    assert ds.meta["n_episodes"] == 3 and ds.meta["action_dim"] == 2
    assert ds.meta["episode_success"] == [True, False, True]
    for i, ep in enumerate(episodes):
        got = ds.episode(i)
        for key in ("state", "aux"):
            assert np.array_equal(got["obs"][key], ep["obs"][key])
        for key in ("action", "reward", "success"):
            assert np.array_equal(got[key], ep[key])
    assert np.array_equal(ds.episode(-1)["action"], episodes[-1]["action"])


def test_windows_pad_with_first_obs_and_last_action(tmp_path):
    path = tmp_path / "demos.zarr"
    write_dataset(path, make_episodes([3, 4]), META)
    windows = WindowDataset(DemoDataset(path, obs_keys=["state"]), n_obs_steps=2, horizon=4)
    assert len(windows) == 3 + 4  # one window per step

    def obs_steps(item):
        return item["obs"]["state"][:, 0].tolist()

    def act_steps(item):
        return (item["action"][:, 0] - 0.5).tolist()

    # window at t: obs t-1..t, actions t-1..t+2 (global step indices, episode 0 = 0..2)
    first = windows[0]
    assert first["obs"]["state"].dtype == torch.float32 and first["action"].shape == (4, 2)
    assert obs_steps(first) == [0, 0] and act_steps(first) == [0, 0, 1, 2]
    assert obs_steps(windows[1]) == [0, 1] and act_steps(windows[1]) == [0, 1, 2, 2]
    assert obs_steps(windows[2]) == [1, 2] and act_steps(windows[2]) == [1, 2, 2, 2]
    # episode 1 = global 3..6: no window crosses the boundary
    assert obs_steps(windows[3]) == [3, 3] and act_steps(windows[3]) == [3, 3, 4, 5]
    assert obs_steps(windows[6]) == [5, 6] and act_steps(windows[6]) == [5, 6, 6, 6]
    assert windows[3]["obs"]["state"][0].tolist() == [3, -3, 6]


def test_windows_reproduce_diffusion_policy_sampler_range(tmp_path):
    path = tmp_path / "demos.zarr"
    lengths = [20, 9]
    write_dataset(path, make_episodes(lengths), META)
    n_obs, horizon, n_act = 2, 8, 4
    windows = WindowDataset(DemoDataset(path), n_obs, horizon, pad_after=n_act - 1)
    # SequenceSampler: starts from -(To-1) to L - Tp + pad_after per episode
    expected = sum(length - horizon + (n_act - 1) + (n_obs - 1) + 1 for length in lengths)
    assert len(windows) == expected
    last = windows[lengths[0] - horizon + n_act - 1 + n_obs - 1]  # last window of episode 0
    assert (last["action"][:, 0] - 0.5).tolist() == [15, 16, 17, 18, 19, 19, 19, 19]


def test_mismatched_keys_and_shapes_are_named(tmp_path):
    path = tmp_path / "demos.zarr"
    write_dataset(path, make_episodes([3]), META)
    with pytest.raises(ValueError, match=r"'state'.*expected shape \(5,\), found \(3,\)"):
        DemoDataset(path, obs_keys={"state": (5,)})
    with pytest.raises(ValueError, match="'image'"):
        DemoDataset(path, obs_keys=["state", "image"])
    with pytest.raises(ValueError, match="action: expected dim 7, found 2"):
        DemoDataset(path, action_dim=7)
    ds = DemoDataset(path, obs_keys={"state": (3,)}, action_dim=2)
    assert ds.obs_keys == {"state": (3,)}
    with pytest.raises(FileNotFoundError):
        DemoDataset(tmp_path / "missing.zarr")


def test_writer_rejects_inconsistent_episodes(tmp_path):
    episodes = make_episodes([3, 4])
    episodes[1]["obs"]["state"] = episodes[1]["obs"]["state"][:, :2]
    with pytest.raises(ValueError, match=r"episode 1: obs 'state' expected shape \(4, 3\)"):
        write_dataset(tmp_path / "bad.zarr", episodes, META)
    assert not (tmp_path / "bad.zarr").exists()


def test_failed_write_leaves_nothing_behind(tmp_path):
    path = tmp_path / "demos.zarr"
    bad_meta = {**META, "callback": object()}  # fails at the last stage: the attrs
    with pytest.raises(TypeError, match="callback"):
        write_dataset(path, make_episodes([3, 4]), bad_meta)
    assert list(tmp_path.iterdir()) == []

    write_dataset(path, make_episodes([3]), META)
    with pytest.raises(FileExistsError):
        write_dataset(path, make_episodes([5]), META)
    with pytest.raises(TypeError):
        write_dataset(path, make_episodes([5]), bad_meta, overwrite=True)
    assert DemoDataset(path).n_steps == 3  # the old dataset is intact
    assert [p.name for p in tmp_path.iterdir()] == ["demos.zarr"]
    write_dataset(path, make_episodes([5]), META, overwrite=True)
    assert DemoDataset(path).n_steps == 5


def test_record_demos_writes_a_loadable_dataset(tmp_path):
    path, stats = record_demos("point_reach", 3, tmp_path / "pr.zarr", noise=0.0, progress=False)
    assert stats["kept"] == 3 and stats["attempts"] >= 3
    ds = DemoDataset(path, obs_keys={"state": (6,)}, action_dim=2)
    assert ds.n_episodes == 3
    assert ds.meta["task"] == "point_reach" and ds.meta["expert_noise"] == 0.0
    assert ds.meta["control_freq"] == envs.get_task("point_reach").control_freq
    assert ds.meta["episode_success"] == [True] * 3
    for i in range(3):
        ep = ds.episode(i)
        assert ep["success"][-1] and not ep["success"][:-1].any()
        assert np.abs(ep["action"]).max() <= 1.0
    # same seed, same demonstrations
    again, _ = collect_demos("point_reach", 3, noise=0.0, progress=False)
    assert np.array_equal(again[0]["obs"]["state"], ds.episode(0)["obs"]["state"])


def test_collect_demos_errors_are_clear():
    with pytest.raises(ValueError, match="no scripted expert"):
        collect_demos("Hopper-v5", 1, progress=False)
    with pytest.raises(RuntimeError, match="succeeded in only"):
        collect_demos("point_reach", 2, noise=50.0, max_attempts_factor=1, progress=False)
    episodes, stats = collect_demos(
        "point_reach", 2, noise=50.0, only_success=False, progress=False
    )
    assert len(episodes) == 2 and stats["attempts"] == 2
