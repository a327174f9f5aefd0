"""``dppo train-world-model``: fit an RSSM world model and a success classifier on play data.

Stages: (1) the RSSM on random windows of ``train.seq_len`` steps of the training episodes;
(2) the success classifier on the frozen model's latent features of every training step (the
posterior features of filtering the real observations and the one-step prior features, the kind
imagination produces); (3) evaluation on held-out play episodes: open-loop prediction error over
the imagination horizon against a copy-the-last-observation baseline, and the classifier's
precision / recall on filtered latents, on every open-loop imagined step and per episode.

Training the classifier on open-loop imagined latents (labelled with the real outcome) was tried
and rejected: it learns "success is likely around here", which DPPO exploits in imagination (real
success fell from 0.71 to 0.11 on point_reach while imagined success rose to 1.0).

Success labels are per *observation*: label t says whether o_t is a success state. From a dataset's
per-step ``success`` (success after action t, i.e. of o_{t+1}) it is that array shifted by one
within each episode (an episode's first observation counts as no success); ``label_with=<module>:
<function>`` computes it from the observations instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from dppo.config import require, to_container
from dppo.pretrain import task_io_spec
from dppo.run_dir import RunDir, default_run_path, plot_curves
from dppo.schedules import warmup_cosine
from dppo.tracking import Tracker
from dppo.train_dynamics import split_episodes
from envs.dataset import DemoDataset
from envs.registry import get_task
from policies.checkpoint import LATEST
from world_models.checkpoint import save_world_model
from world_models.classifier import (
    ClassifierConfig,
    SuccessClassifier,
    fit_classifier,
    precision_recall,
)
from world_models.ensemble import EnsembleConfig, PriorEnsemble, fit_prior_ensemble
from world_models.labels import apply_predicate, load_predicate
from world_models.rssm import WorldModel, WorldModelConfig

STATIC_TOL = 1e-6
"""A dim whose range within every episode is below this is static (copied, not imagined)."""
EPISODE_CHUNK = 256
"""Episodes filtered per batch when computing features for the classifier and evaluation."""
DISAGREEMENT_QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)
"""Quantiles of the ensemble's disagreement on held-out open-loop imagination, stored in the
checkpoint's metadata: the thresholds ``imagination.halt_quantile`` can pick."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def state_success_labels(
    dataset: DemoDataset, label_with: str | None, obs_key: str
) -> tuple[np.ndarray, str]:
    """(N,) bool success of each observation, and where the labels came from."""
    obs = dataset.obs[obs_key]
    if label_with is not None:
        return apply_predicate(load_predicate(label_with), obs, label_with), label_with
    if dataset.success is None:
        raise ValueError(
            f"play data {dataset.path} has no per-step success labels (data/success): record it "
            "with `dppo collect-play`, or label it with a predicate of the observation, "
            "label_with=<module>:<function> (e.g. world_models.labels:point_reach_success)"
        )
    labels = np.zeros(dataset.n_steps, bool)
    labels[1:] = dataset.success[:-1]
    labels[dataset.episode_starts] = False  # success[t] is about o_{t+1}: shift within episodes
    return labels, "dataset"


def find_static_dims(dataset: DemoDataset, obs_key: str) -> list[int]:
    """Dims of the observation that never change within any episode."""
    obs = dataset.obs[obs_key]
    ranges = [
        np.ptp(obs[s:e], axis=0)
        for s, e in zip(dataset.episode_starts, dataset.episode_ends, strict=True)
    ]
    return [int(d) for d in np.flatnonzero(np.max(ranges, axis=0) < STATIC_TOL)]


class EpisodeSet:
    """Selected episodes of a dataset, padded to a common length.

    ``obs`` (E, T, D), ``action`` (E, T, Da), ``labels`` (E, T) bool, ``mask`` (E, T) bool
    (True on real steps), ``lengths`` (E,).
    """

    def __init__(self, dataset: DemoDataset, obs_key: str, labels: np.ndarray, episodes):
        episodes = np.asarray(episodes, dtype=np.int64)
        starts, ends = dataset.episode_starts[episodes], dataset.episode_ends[episodes]
        self.lengths = (ends - starts).astype(np.int64)
        t_max = int(self.lengths.max()) if len(episodes) else 0
        obs, act = dataset.obs[obs_key], dataset.action
        e = len(episodes)
        self.obs = torch.zeros(e, t_max, obs.shape[1])
        self.action = torch.zeros(e, t_max, act.shape[1])
        self.labels = torch.zeros(e, t_max, dtype=torch.bool)
        self.mask = torch.zeros(e, t_max, dtype=torch.bool)
        for i, (s, n) in enumerate(zip(starts, self.lengths, strict=True)):
            self.obs[i, :n] = torch.as_tensor(obs[s : s + n])
            self.action[i, :n] = torch.as_tensor(act[s : s + n])
            self.labels[i, :n] = torch.as_tensor(labels[s : s + n])
            self.mask[i, :n] = True

    def __len__(self) -> int:
        return len(self.lengths)

    def windows(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(episode, start) of every window of ``seq_len`` steps inside an episode."""
        ep, start = [], []
        for i, n in enumerate(self.lengths):
            k = int(n) - seq_len + 1
            if k > 0:
                ep.append(torch.full((k,), i))
                start.append(torch.arange(k))
        if not ep:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        return torch.cat(ep), torch.cat(start)

    def gather(self, ep: torch.Tensor, start: torch.Tensor, seq_len: int):
        """Windows obs (B, L, D) and actions (B, L, Da)."""
        t = start[:, None] + torch.arange(seq_len)
        return self.obs[ep[:, None], t], self.action[ep[:, None], t]


@torch.no_grad()
def filtered_features(
    model: WorldModel, data: EpisodeSet, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Latent features (M, F) of filtering every real step of ``data``, and their labels (M,).

    Keys: ``posterior`` ([h_t, z_t ~ q]), ``prior_mean`` / ``prior_sample`` ([h_t, z_t] from the
    one-step prior p(z_t | h_t): what imagination produces), ``labels``; and for the
    disagreement ensemble ``deter`` (M, H), ``post_mean`` / ``post_std`` (M, Z).
    """
    keys = ("posterior", "prior_mean", "prior_sample", "labels", "deter", "post_mean", "post_std")
    out: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for s in range(0, len(data), EPISODE_CHUNK):
        sl = slice(s, s + EPISODE_CHUNK)
        seq = model.observe(data.obs[sl], data.action[sl], generator)
        mask = data.mask[sl]
        for key, z in (
            ("posterior", seq["stoch"]),
            ("prior_mean", seq["prior_mean"]),
            ("prior_sample", seq["prior_stoch"]),
        ):
            out[key].append(torch.cat([seq["deter"], z], -1)[mask])
        for key in ("deter", "post_mean", "post_std"):
            out[key].append(seq[key][mask])
        out["labels"].append(data.labels[sl][mask])
    return {k: torch.cat(v) for k, v in out.items()}


def imagination_horizon(requested: int | None, task: str, data: EpisodeSet) -> int:
    """Open-loop steps: ``requested`` (None: the task's episode length), at most what the
    longest episode of ``data`` allows after its first step."""
    return min(requested or get_task(task).max_episode_steps, int(data.lengths.max()) - 1)


def open_loop_windows(
    data: EpisodeSet, horizon: int, starts_per_episode: int, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """Start points for ``horizon``-step imagination in the episodes of ``data`` that are long
    enough: every episode's first step plus ``starts_per_episode - 1`` random later ones.

    Returns episode (R,), start step (R,), the imagined steps' indices (R, H), the start
    observations (R, D) and the real actions taken from there (R, H, Da).
    """
    ep, start = [], []
    for i, n in enumerate(data.lengths):
        latest = int(n) - 1 - horizon
        if latest < 0:
            continue
        extra = torch.randint(0, latest + 1, (starts_per_episode - 1,), generator=generator)
        ep += [i] * starts_per_episode
        start += [0, *extra.tolist()]
    ep_t, start_t = torch.as_tensor(ep, dtype=torch.long), torch.as_tensor(start, dtype=torch.long)
    t = start_t[:, None] + torch.arange(1, horizon + 1)
    return ep_t, start_t, t, data.obs[ep_t, start_t], data.action[ep_t[:, None], t - 1]


@torch.no_grad()
def imagined_features(
    model: WorldModel,
    data: EpisodeSet,
    horizon: int,
    starts_per_episode: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (M, F) of states imagined open-loop (prior samples) under the real actions of
    ``data``, each with the real label of its step (M,).

    Imagination drifts away from the filtered latents; a classifier that never saw drifted
    latents calls some of them successes, and DPPO in imagination learns to drift there.
    """
    ep_t, _, t, first, actions = open_loop_windows(data, horizon, starts_per_episode, generator)
    if len(ep_t) == 0:
        return torch.zeros(0, model.cfg.feature_dim), torch.zeros(0, dtype=torch.bool)
    feats = []
    for s in range(0, len(ep_t), EPISODE_CHUNK):
        _, f = model.open_loop(
            first[s : s + EPISODE_CHUNK], actions[s : s + EPISODE_CHUNK], generator
        )
        feats.append(f.flatten(0, 1))
    return torch.cat(feats), data.labels[ep_t[:, None], t].flatten()


@torch.no_grad()
def open_loop_eval(
    model: WorldModel,
    classifier: SuccessClassifier,
    data: EpisodeSet,
    horizon: int,
    starts_per_episode: int,
    generator: torch.Generator,
    sample: bool = True,
    ensemble: PriorEnsemble | None = None,
) -> dict[str, Any]:
    """Imagine ``horizon`` steps from real observations of held-out episodes under their actions.

    Starts: every episode's first step, plus ``starts_per_episode - 1`` random later ones. The
    latents are prior samples (``sample``, the imagined env's default) or prior means. Errors are
    mean squared errors per step in normalised units ([-1, 1] per dim), averaged over dims; the
    baseline predicts the start observation for every future step. ``classifier`` scores every
    imagined step against the real label; ``classifier_episodes`` scores, for the rollouts from
    episode starts, "some imagined step is a success" (what ends an imagined episode) against
    the real episode. With an ``ensemble``, ``disagreement`` holds its quantiles over every
    imagined step (the scale of "as uncertain as imagining play behaviour") and its mean per step.
    """
    ep_t, start_t, t, first, actions = open_loop_windows(
        data, horizon, starts_per_episode, generator
    )
    truth = data.obs[ep_t[:, None], t]
    pred, feats = model.open_loop(first, actions, generator, sample)
    norm = model.normalizer.normalize

    def mse(x: torch.Tensor) -> torch.Tensor:
        key = model.cfg.obs_key
        return ((norm(key, x) - norm(key, truth)) ** 2).mean(dim=(0, 2))

    model_err = mse(pred)
    copy_err = mse(first[:, None].expand_as(truth))
    hits = classifier.predict(feats.flatten(0, 1)).view(len(ep_t), horizon).numpy()
    labels = data.labels[ep_t[:, None], t].numpy()
    from_start = (start_t == 0).numpy()
    result: dict[str, Any] = {}
    if ensemble is not None:
        spread = ensemble.disagreement(feats[..., : model.cfg.deter_dim].flatten(0, 1))
        result["disagreement"] = {
            "quantiles": {
                str(q): float(v)
                for q, v in zip(
                    DISAGREEMENT_QUANTILES,
                    torch.quantile(spread, torch.tensor(DISAGREEMENT_QUANTILES)),
                    strict=True,
                )
            },
            "mean_per_step": [round(float(x), 6) for x in spread.view(len(ep_t), horizon).mean(0)],
        }
    return result | {
        "horizon": horizon,
        "n_rollouts": len(ep_t),
        "model_mse": float(model_err.mean()),
        "copy_last_mse": float(copy_err.mean()),
        "model_mse_final_step": float(model_err[-1]),
        "copy_last_mse_final_step": float(copy_err[-1]),
        "model_mse_per_step": [round(float(x), 6) for x in model_err],
        "copy_last_mse_per_step": [round(float(x), 6) for x in copy_err],
        "classifier": precision_recall(hits.ravel(), labels.ravel()),
        "classifier_episodes": precision_recall(
            hits[from_start].any(axis=1), labels[from_start].any(axis=1)
        ),
    }


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def validate(cfg: DictConfig) -> None:
    t, c = cfg.train, cfg.classifier
    require(t.steps > 0, f"train.steps must be > 0, got {t.steps}")
    require(t.batch_size > 0 and t.seq_len > 1, "train.batch_size must be > 0, train.seq_len > 1")
    require(0 <= t.warmup_steps < t.steps, "train.warmup_steps must be in [0, train.steps)")
    require(0 < t.val_fraction < 1, f"train.val_fraction must be in (0, 1), got {t.val_fraction}")
    require(
        c.steps > 0 and c.batch_size > 0, "classifier.steps and classifier.batch_size must be > 0"
    )
    e = cfg.ensemble
    require(
        e.n_heads == 0 or (e.n_heads >= 2 and e.steps > 0 and e.batch_size > 0),
        f"ensemble.n_heads must be 0 (no ensemble) or >= 2 with ensemble.steps and "
        f"ensemble.batch_size > 0, got n_heads={e.n_heads}",
    )
    require(cfg.eval.starts_per_episode >= 1, "eval.starts_per_episode must be >= 1")
    require(c.imagined_starts >= 0, "classifier.imagined_starts must be >= 0")
    require(
        c.imagined_horizon is None or c.imagined_horizon > 0,
        "classifier.imagined_horizon must be > 0 (or null for the task's limit)",
    )
    require(Path(cfg.dataset).exists(), f"dataset {cfg.dataset} not found")


@torch.no_grad()
def _eval_loss(model: WorldModel, batch, generator) -> dict[str, float]:
    loss, parts = model.loss(*batch, generator=generator)
    return {"val_loss": loss.item(), "val_recon": parts["recon"], "val_kl": parts["kl"]}


def _plot_open_loop(path: Path, result: dict[str, Any], task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, result["horizon"] + 1)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(steps, result["model_mse_per_step"], label="world model (open loop)")
    ax.plot(steps, result["copy_last_mse_per_step"], label="copy last observation")
    ax.set_xlabel("imagined control steps")
    ax.set_ylabel("MSE (normalised obs)")
    ax.set_yscale("log")
    ax.set_title(f"open-loop prediction on held-out play ({task})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_rssm(
    model: WorldModel,
    train_set: EpisodeSet,
    val_set: EpisodeSet,
    start_obs: torch.Tensor,
    t: DictConfig,
    run: RunDir,
    tracker: Tracker,
    meta: dict[str, Any],
    gen: torch.Generator,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Stage 1: the RSSM on random windows; logs, checkpoints (without classifier) as it goes.

    Returns the validation metrics before training and the last logged record.
    """
    windows, val_windows = train_set.windows(t.seq_len), val_set.windows(t.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = warmup_cosine(optimizer, t.warmup_steps, t.steps)
    val_pick = torch.randint(
        0, len(val_windows[0]), (min(t.val_batch_size, len(val_windows[0])),), generator=gen
    )
    val_batch = val_set.gather(val_windows[0][val_pick], val_windows[1][val_pick], t.seq_len)
    eval_gen = torch.Generator()

    def val_metrics() -> dict[str, float]:
        eval_gen.manual_seed(t.seed)
        model.eval()
        out = _eval_loss(model, val_batch, eval_gen)
        model.train()
        return out

    initial = val_metrics()
    history: list[dict[str, float]] = []
    record: dict[str, Any] = {}
    bar = tqdm(range(1, t.steps + 1), desc=f"train-world-model {model.cfg.task}")
    model.train()
    for step in bar:
        pick = torch.randint(0, len(windows[0]), (t.batch_size,), generator=gen)
        loss, parts = model.loss(
            *train_set.gather(windows[0][pick], windows[1][pick], t.seq_len), generator=gen
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        history.append({"loss": loss.item(), **parts})
        if step % t.log_every == 0 or step == t.steps:
            recent = history[-t.log_every :]
            record = {
                "step": step,
                **{k: float(np.mean([h[k] for h in recent])) for k in recent[0]},
                "lr": scheduler.get_last_lr()[0],
                **val_metrics(),
            }
            run.log(record)
            tracker.log(record, step)
            bar.set_postfix(loss=f"{record['loss']:.3f}", val=f"{record['val_loss']:.3f}")
        if step % t.checkpoint_every == 0 and step < t.steps:
            save_world_model(
                run.checkpoints / LATEST, model, start_obs, meta={**meta, "step": step}
            )
    return initial, record


def log_losses(run: RunDir, name: str, losses: list[float], every: int) -> None:
    """Log a finished fit's per-step ``losses`` as ``<name>_step`` / ``<name>_loss`` records,
    one mean per ``every`` steps."""
    for s in range(every, len(losses) + 1, every):
        run.log({f"{name}_step": s, f"{name}_loss": float(np.mean(losses[s - every : s]))})


def train_world_model(cfg: DictConfig) -> dict[str, Any]:
    """Train, evaluate and save; returns the summary written to ``<run>/summary.json``."""
    validate(cfg)
    t, m, c, e = cfg.train, cfg.model, cfg.classifier, cfg.ensemble
    torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    task = cfg.task.name
    obs_shapes, action_dim = task_io_spec(task)
    require(
        len(obs_shapes) == 1, f"the world model takes one flat state key, task has {obs_shapes}"
    )
    ((obs_key, (obs_dim,)),) = obs_shapes.items()
    dataset = DemoDataset(cfg.dataset, obs_keys=obs_shapes, action_dim=action_dim)
    require(
        dataset.meta.get("task") in (None, task),
        f"dataset {cfg.dataset} was recorded on task {dataset.meta.get('task')!r}, "
        f"not {task!r}; pass task={dataset.meta.get('task')}",
    )
    labels, label_source = state_success_labels(dataset, cfg.label_with, obs_key)
    gen = torch.Generator().manual_seed(t.seed)
    val_eps = split_episodes(dataset.n_episodes, t.val_fraction, gen)
    train_eps = np.setdiff1d(np.arange(dataset.n_episodes), val_eps.numpy())
    train_set = EpisodeSet(dataset, obs_key, labels, train_eps)
    val_set = EpisodeSet(dataset, obs_key, labels, val_eps.numpy())
    require(
        len(train_set.windows(t.seq_len)[0]) > 0,
        f"no training episode has train.seq_len={t.seq_len} steps (longest: "
        f"{int(train_set.lengths.max())}); lower train.seq_len",
    )
    require(
        len(val_set.windows(t.seq_len)[0]) > 0,
        f"no held-out episode has train.seq_len={t.seq_len} steps",
    )

    model = WorldModel(
        WorldModelConfig(
            task=task,
            obs_key=obs_key,
            obs_dim=obs_dim,
            action_dim=action_dim,
            deter_dim=m.deter_dim,
            stoch_dim=m.stoch_dim,
            hidden_dim=m.hidden_dim,
            min_std=m.min_std,
            kl_balance=m.kl_balance,
            free_nats=m.free_nats,
            kl_scale=m.kl_scale,
            open_loop_scale=m.open_loop_scale,
            decode_delta=m.decode_delta,
            static_dims=find_static_dims(dataset, obs_key) if m.pin_static_dims else [],
        )
    )
    in_train = np.isin(_step_episode(dataset), train_eps)
    model.fit_normalizer(dataset.obs[obs_key][in_train], dataset.action[in_train])
    start_obs = torch.as_tensor(dataset.obs[obs_key][dataset.episode_starts])

    out = Path(cfg.out) if cfg.out else default_run_path("world-model", task)
    run = RunDir(out, to_container(cfg))
    tracker = Tracker(cfg.wandb.mode, cfg.wandb.project, str(run.path), to_container(cfg))
    meta = {
        "kind": "world_model",
        "task": task,
        "dataset": str(Path(cfg.dataset).resolve()),
        "play_episodes": dataset.n_episodes,
        "play_steps": dataset.n_steps,
        "labels": label_source,
    }
    initial, record = train_rssm(model, train_set, val_set, start_obs, t, run, tracker, meta, gen)
    model.eval()

    # stage 2: the success classifier on the frozen model's latents: filtered (posterior) and
    # one-step-prior features, the kind imagination produces, each with its step's real label
    feats = filtered_features(model, train_set, gen)
    features = torch.cat([feats["posterior"], feats["prior_mean"], feats["prior_sample"]])
    train_labels = feats["labels"].repeat(3)
    n_imagined = 0
    if c.imagined_starts > 0:  # and drifted, open-loop imagined latents with their real labels
        horizon = imagination_horizon(c.imagined_horizon, task, train_set)
        imagined, imagined_labels = imagined_features(
            model, train_set, horizon, c.imagined_starts, gen
        )
        features = torch.cat([features, imagined])
        train_labels = torch.cat([train_labels, imagined_labels])
        n_imagined = len(imagined)
    require(
        bool(train_labels.any()),
        "the training play episodes contain no success state: the classifier cannot learn "
        "what success looks like; collect more play data",
    )
    classifier = SuccessClassifier(
        ClassifierConfig(
            feature_dim=model.cfg.feature_dim,
            hidden_dim=c.hidden_dim,
            depth=c.depth,
            threshold=c.threshold,
        )
    )
    losses = fit_classifier(classifier, features, train_labels, c.steps, c.batch_size, c.lr, gen)
    log_losses(run, "classifier", losses, t.log_every)
    ensemble = None
    if e.n_heads > 0:  # the disagreement ensemble, on the same filtered states
        ensemble = PriorEnsemble(
            EnsembleConfig(
                m.deter_dim, m.stoch_dim, e.n_heads, e.hidden_dim, min_std=model.cfg.min_std
            )
        )
        posterior = (feats["deter"], feats["post_mean"], feats["post_std"])
        ensemble_losses = fit_prior_ensemble(ensemble, *posterior, e.steps, e.batch_size, e.lr, gen)
        log_losses(run, "ensemble", ensemble_losses, t.log_every)
    meta["step"] = t.steps
    save_world_model(run.checkpoints / LATEST, model, start_obs, classifier, meta, ensemble)

    # stage 3: held-out evaluation
    val_feats = filtered_features(model, val_set, gen)
    held_out = precision_recall(
        classifier.predict(val_feats["posterior"]).numpy(), val_feats["labels"].numpy()
    )
    horizon = imagination_horizon(cfg.eval.horizon, task, val_set)
    open_loop = open_loop_eval(
        model,
        classifier,
        val_set,
        horizon,
        cfg.eval.starts_per_episode,
        gen,
        cfg.eval.sample_latent,
        ensemble,
    )
    if ensemble is not None:  # the calibration of imagination.halt_quantile
        meta["disagreement_quantiles"] = open_loop["disagreement"]["quantiles"]
        save_world_model(run.checkpoints / LATEST, model, start_obs, classifier, meta, ensemble)

    metrics = run.read_metrics()
    plot_curves(
        run.plots / "world_model.png",
        metrics,
        "step",
        ["loss", "recon", "kl", "val_loss"],
        f"world model on {task}",
    )
    plot_curves(
        run.plots / "classifier.png",
        metrics,
        "classifier_step",
        ["classifier_loss"],
        f"success classifier on {task}",
    )
    _plot_open_loop(run.plots / "open_loop.png", open_loop, task)
    tracker.close()
    return run.finish(
        {
            "task": task,
            "run": str(run.path),
            "checkpoint": str(run.checkpoints / LATEST),
            "dataset": meta["dataset"],
            "play_episodes": dataset.n_episodes,
            "play_steps": dataset.n_steps,
            "success_labels": label_source,
            "success_state_fraction": float(labels.mean()),
            "n_train_episodes": len(train_set),
            "n_val_episodes": len(val_set),
            "static_dims": model.cfg.static_dims,
            "steps": t.steps,
            "initial_val_loss": initial["val_loss"],
            "initial_val_recon": initial["val_recon"],
            "final_loss": record.get("loss"),
            "val_loss": record.get("val_loss"),
            "val_recon": record.get("val_recon"),
            "classifier_train_features": {
                "filtered": len(train_labels) - n_imagined,
                "imagined": n_imagined,
            },
            "classifier_held_out": held_out,
            "ensemble_heads": e.n_heads,
            "open_loop": open_loop,
        }
    )


def _step_episode(dataset: DemoDataset) -> np.ndarray:
    """(N,) episode index of every step."""
    return np.repeat(
        np.arange(dataset.n_episodes), np.diff(np.concatenate([[0], dataset.episode_ends]))
    )
