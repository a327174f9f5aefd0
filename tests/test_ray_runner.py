"""Ray rollout runner: same batch as the local runner, worker restarts, clear config errors.

Starts its own 2-CPU Ray cluster; workers step real MuJoCo point_reach envs.
"""

import json
import os
import re
import signal
import threading
import time

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from dppo.config import ConfigError, load_config  # noqa: E402
from dppo.finetune import build_learner  # noqa: E402
from dppo.runners import build_runner  # noqa: E402

N_ENVS, N_STEPS, SEED = 4, 30, 11
BUSY_CPU_S = 0.03  # worker CPU time that marks its rollout as under way
BLOCK = "runner.denoiser_block_rows=16"  # bit-identical batches whatever the split


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A freshly initialised small point_reach policy (rollouts need no training)."""
    from dppo.pretrain import build_policy, task_io_spec
    from policies.checkpoint import save_policy

    shapes, action_dim = task_io_spec("point_reach")
    cfg = load_config("pretrain", ["policy.denoiser_kwargs.hidden_dim=64"])
    return save_policy(build_policy(cfg, shapes, action_dim), tmp_path_factory.mktemp("p") / "p")


def finetune_cfg(policy_dir, *extra):
    return load_config(
        "finetune",
        [
            f"checkpoint={policy_dir}",
            f"task.n_envs={N_ENVS}",
            f"algorithm.n_steps={N_STEPS}",
            "algorithm.ft_denoising_steps=4",
            "algorithm.batch_size=40",
            "algorithm.critic_batch_size=20",
            BLOCK,
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def cluster():
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_setup(cluster, policy_dir):
    """A 2-worker runner (envs 0-1 and 2-3) and its learner, shared by the tests below."""
    # half a logical CPU each, so the evaluation workers below fit on the 2-CPU cluster too
    cfg = finetune_cfg(
        policy_dir, "runner=ray", "runner.num_workers=2", "runner.cpus_per_worker=0.5"
    )
    learner = build_learner(cfg)
    runner = build_runner(cfg, learner)
    yield runner, learner
    runner.close()


def local_reference(policy_dir, learner, n_steps, seed):
    """What the local runner collects with ``learner``'s weights and reward-scaler state."""
    cfg = finetune_cfg(policy_dir)
    twin = build_learner(cfg)
    twin.actor.policy.denoiser.load_state_dict(learner.actor.policy.denoiser.state_dict())
    twin.reward_scaler.load_state_dict(learner.reward_scaler.state_dict())
    runner = build_runner(cfg, twin)
    ro = runner.collect(twin, n_steps, seed)
    runner.close()
    return ro, twin


def assert_same_batch(a, b):
    for name in ("cond", "chain"):
        assert torch.equal(torch.stack(getattr(a, name)), torch.stack(getattr(b, name))), name
    for name in ("rewards", "raw_rewards", "dones", "terminated"):
        x, y = np.stack(getattr(a, name)), np.stack(getattr(b, name))
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert sorted(a.final_cond) == sorted(b.final_cond)
    assert all(torch.equal(a.final_cond[k], b.final_cond[k]) for k in a.final_cond)
    assert torch.equal(a.last_cond, b.last_cond)
    assert a.episode_returns == b.episode_returns
    assert a.episode_successes == b.episode_successes
    assert a.sim_faults == b.sim_faults


def kill_then_collect(runner, learner, worker, n_steps, seed):
    """Kill worker ``worker``, then run ``runner.collect``: the rollout call finds it dead."""
    ray.kill(runner.workers[worker])
    try:
        return {"rollout": runner.collect(learner, n_steps, seed)}
    except RuntimeError as exc:
        return {"error": exc}


def cpu_seconds(pid):
    """User + system CPU time of process ``pid`` (Linux ``/proc``)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sigkill_mid_rollout(runner, learner, worker, n_steps, seed):
    """``runner.collect`` in a thread; SIGKILL worker ``worker``'s process once it is busy.

    "Busy" is read from the worker's own CPU time (it rises once the rollout call runs), not
    from a timer, so the kill lands inside the rollout on a fast or a loaded machine alike.
    """
    pid = ray.get(runner.workers[worker].ready.remote())
    idle_cpu = cpu_seconds(pid)
    out = {}

    def run():
        out["rollout"] = runner.collect(learner, n_steps, seed)

    thread = threading.Thread(target=run)
    thread.start()
    while cpu_seconds(pid) - idle_cpu < BUSY_CPU_S and thread.is_alive():
        time.sleep(0.001)
    os.kill(pid, signal.SIGKILL)
    thread.join()
    return out


def test_ray_batch_is_identical_to_the_local_runners(ray_setup, policy_dir):
    runner, learner = ray_setup
    expected, twin = local_reference(policy_dir, learner, N_STEPS, SEED)
    ro = runner.collect(learner, N_STEPS, SEED)
    cond, chain = ro.stacked()
    assert cond.shape == (N_STEPS, N_ENVS, learner.actor.policy.cfg.cond_dim)
    assert chain.shape[:3] == (N_STEPS, N_ENVS, learner.actor.n_transitions + 1)
    assert ro.final_cond, "some episodes must be truncated so final observations are compared"
    assert_same_batch(expected, ro)
    assert learner.env_steps == twin.env_steps > 0
    assert learner.reward_scaler.state_dict()["m2"] == twin.reward_scaler.state_dict()["m2"]
    assert {"broadcast_s", "rollout_s", "gather_s"} <= set(runner.timing)
    assert sum(runner.timing["env_steps"]) == twin.env_steps  # per worker, in worker order
    assert all(0 < s <= runner.timing["rollout_s"] for s in runner.timing["worker_s"])
    assert all(c > 0 for c in runner.timing["worker_cpu_s"])


def test_workers_sample_with_the_broadcast_weights(ray_setup, policy_dir):
    runner, learner = ray_setup
    with torch.no_grad():  # stands in for a PPO update of the learner's denoiser
        for p in learner.actor.policy.denoiser.parameters():
            p.mul_(1.5)
    expected, _ = local_reference(policy_dir, learner, 3, SEED + 1)
    assert_same_batch(expected, runner.collect(learner, 3, SEED + 1))


def test_killed_worker_is_restarted_and_the_batch_unchanged(ray_setup, policy_dir):
    runner, learner = ray_setup
    expected, _ = local_reference(policy_dir, learner, N_STEPS, SEED + 2)
    restarts = runner.restarts
    out = sigkill_mid_rollout(runner, learner, 0, N_STEPS, SEED + 2)
    assert runner.restarts == restarts + 1
    assert_same_batch(expected, out["rollout"])


def test_worker_found_dead_is_restarted(ray_setup, policy_dir):
    runner, learner = ray_setup
    expected, _ = local_reference(policy_dir, learner, 3, SEED + 3)
    restarts = runner.restarts
    out = kill_then_collect(runner, learner, 1, 3, SEED + 3)
    assert "error" not in out, out.get("error")
    assert runner.restarts == restarts + 1
    assert_same_batch(expected, out["rollout"])


def test_gives_up_with_a_clear_error_after_max_retries(ray_setup):
    runner, learner = ray_setup
    runner.pool.max_retries = 0
    try:
        out = kill_then_collect(runner, learner, 1, N_STEPS, SEED)
    finally:
        runner.pool.max_retries = 2
    assert isinstance(out.get("error"), RuntimeError)
    assert "max_retries=0" in str(out["error"]) and "envs [2, 4]" in str(out["error"])
    restarts = runner.restarts
    ro = runner.collect(learner, 2, SEED)  # the next iteration restarts the dead worker
    assert runner.restarts == restarts + 1 and len(ro.cond) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["runner.num_workers=0"], "runner.num_workers must be an integer in [1, 4]"),
        (["runner.num_workers=5"], "runner.num_workers must be an integer in [1, 4]"),
        (["runner.max_retries=-1"], "runner.max_retries must be an integer >= 0"),
        (["runner.address=not an address"], "runner.address must be"),
        (["runner.denoiser_block_rows=0"], "runner.denoiser_block_rows must be null"),
        (["algorithm=ppo_gaussian"], "algorithm.actor=diffusion only"),
    ],
)
def test_bad_ray_config_is_a_clear_error(policy_dir, overrides, message):
    cfg = finetune_cfg(policy_dir, "runner=ray", *overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_runner(cfg, learner=None)


def test_ray_refuses_a_custom_env(policy_dir):
    cfg = finetune_cfg(policy_dir, "runner=ray")
    with pytest.raises(ConfigError, match="needs runner=local"):
        build_runner(cfg, learner=None, make_venv=lambda c: None)


def test_unknown_runner_is_a_config_error(policy_dir):
    with pytest.raises(ConfigError, match="runner"):
        finetune_cfg(policy_dir, "runner=threads")


def test_ray_evaluation_on_one_worker_is_the_local_evaluation(cluster, policy_dir):
    """The worker rebuilds the sampler from the eval config, seeds and counts as ``evaluate``."""
    from dppo.commands import eval as eval_command

    common = [f"checkpoint={policy_dir}", "sampler=ddim", "n_episodes=4", "n_envs=2"]
    local = eval_command(load_config("eval", [*common, f"out={policy_dir}/local"]))
    remote = eval_command(
        load_config(
            "eval",
            [*common, f"out={policy_dir}/ray", "runner=ray", "runner.num_workers=1"]
            + ["runner.cpus_per_worker=0.5"],
        )
    )
    assert remote["n_episodes"] == 4
    for key in ("success_rate", "mean_return", "mean_length", "nfe_per_chunk", "sampler"):
        assert remote[key] == local[key], key


def test_ray_evaluation_needs_whole_episodes_per_env(cluster, policy_dir):
    from dppo.commands import eval as eval_command

    cfg = load_config(
        "eval", [f"checkpoint={policy_dir}", "n_episodes=5", "n_envs=2", "runner=ray"]
    )
    with pytest.raises(ConfigError, match="must be a multiple of n_envs=2"):
        eval_command(cfg)


def test_bench_rollout_reports_ray_and_local_figures(cluster, tmp_path):
    from dppo.bench_rollout import run_bench_rollout

    common = ["task=point_reach", "task.n_envs=2", "iterations=1", "n_steps=3"]
    common += ["projected_workers=[1,4]"]
    local = run_bench_rollout(load_config("bench_rollout", common))
    out = tmp_path / "rollout.json"
    remote = run_bench_rollout(
        load_config(
            "bench_rollout",
            [*common, "runner=ray", "runner.cpus_per_worker=0.5", f"out={out}"],
        )
    )
    assert json.loads(out.read_text()) == remote
    assert set(remote["settings"]) == {"ray_1", "ray_2"}
    one, two = remote["settings"]["ray_1"], remote["settings"]["ray_2"]
    # the same seeds and envs: both settings collect the batch the local runner collects
    for figures in (one, two):
        assert (
            figures["env_steps_per_iteration"]
            == local["settings"]["local"]["env_steps_per_iteration"]
        )
        assert figures["worker_env_steps_per_s"] > 0 and figures["env_steps_per_cpu_s"] > 0
    assert two["scaling_efficiency"] == pytest.approx(
        two["env_steps_per_s"] / (2 * one["env_steps_per_s"]), abs=1e-3
    )
    projected = remote["projected_env_steps_per_s"]
    assert 0 < projected["1"] < projected["4"] < remote["learner_bound_env_steps_per_s"]


@pytest.mark.slow
def test_ray_evaluation_over_two_workers(cluster, policy_dir):
    from dppo.commands import eval as eval_command

    cfg = load_config(
        "eval",
        [f"checkpoint={policy_dir}", "n_episodes=6", "n_envs=3", f"out={policy_dir}/ray2"]
        + ["runner=ray", "runner.cpus_per_worker=0.5"],
    )
    result = eval_command(cfg)
    assert result["n_episodes"] == 6 and 0.0 <= result["success_rate"] <= 1.0
    assert result["mean_length"] > 0 and np.isfinite(result["mean_return"])


@pytest.mark.slow
def test_finetune_on_ray_reproduces_the_local_run(cluster, policy_dir, tmp_path):
    """Bit-identical batches + seeded updates: the two runs log the same metrics."""
    from dppo.finetune import finetune

    extra = ["algorithm.iterations=2", "algorithm.critic_warmup_iterations=0", "eval_every=0"]
    extra += ["eval_episodes=0"]
    runs = {}
    for name, runner in (("local", []), ("ray", ["runner=ray", "runner.cpus_per_worker=0.5"])):
        cfg = finetune_cfg(policy_dir, f"out={tmp_path / name}", *extra, *runner)
        finetune(cfg)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        runs[name] = [
            {k: v for k, v in json.loads(line).items() if not k.startswith("time_")}
            for line in lines
        ]
    assert len(runs["ray"]) == 2
    assert runs["ray"] == runs["local"]
