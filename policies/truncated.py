"""Truncated / anchored diffusion (after DiffusionDrive): start from a noised anchor, not noise.

Anchors are the k-means centres of the dataset's normalised action chunks (Tp, Da), fitted by
``fit_anchors`` and stored next to a checkpoint as ``anchors.safetensors`` (``save_anchors``).
A call picks one anchor per stream, noises it to the small level of ``start_step``
(x_s = sqrt(abar_s) anchor + sqrt(1 - abar_s) z) and runs ``n_steps`` DDIM steps down to clean.

Mode selection. DiffusionDrive denoises every anchor in parallel and a learned classifier scores
them; this framework trains no classifier, so it offers two learning-free rules:

- ``selection="x0"`` (default): one network call at the top level on fresh noise gives a rough
  x0 prediction; the nearest anchor (L2, normalised units) is the mode. NFE = 1 + n_steps.
- ``selection="consistency"``: every anchor is noised and denoised (batch B*k); the mode is the
  anchor the denoiser moved least (its result is most consistent with the observation), and
  that denoised chunk is returned. NFE = n_steps, on a k times larger batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from policies.checkpoint import resolve_checkpoint
from policies.chunk_ops import rows, step_list
from policies.chunk_samplers import CHUNK_SAMPLERS, ChunkSampler, SamplerState
from policies.diffusion import DiffusionPolicy
from policies.normalizer import ACTION_KEY
from policies.samplers import ChainResult, DDIMSampler, Hook

ANCHORS_FILE = "anchors.safetensors"
ANCHORS_KEY = "anchors"
DEFAULT_K = 20
DEFAULT_START_FRACTION = 0.2
"""Default start_step as a fraction of the train steps (DiffusionDrive truncates the schedule)."""
KMEANS_ITERS = 100
SELECTIONS = ("x0", "consistency")
SUMMARY_JSON = "summary.json"


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = KMEANS_ITERS):
    """Seeded k-means (k-means++ init, Lloyd steps) of rows x (M, F) -> (centres (k, F), labels (M,))."""
    m = x.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"k-means needs 1 <= k <= number of samples ({m}), got k={k}")
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    first = int(torch.randint(m, (1,), generator=g))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        idx = (
            int(torch.multinomial(d2 / total, 1, generator=g))
            if total > 0
            else int(torch.randint(m, (1,), generator=g))
        )
        centres.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = torch.stack(centres)
    labels = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)[:, None]
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return c.float(), labels


def dataset_chunks(policy: DiffusionPolicy, dataset_path: str | Path) -> torch.Tensor:
    """Every training window's action chunk of a demo dataset, normalised: (M, Tp, Da)."""
    from envs.dataset import DemoDataset, WindowDataset

    cfg = policy.cfg
    demos = DemoDataset(dataset_path, obs_keys=list(cfg.obs_shapes), action_dim=cfg.action_dim)
    windows = WindowDataset(demos, n_obs_steps=cfg.n_obs_steps, horizon=cfg.horizon)
    actions = torch.stack([windows[i]["action"] for i in range(len(windows))])
    with torch.no_grad():
        return policy.normalizer.normalize(ACTION_KEY, actions)


def fit_anchors(
    policy: DiffusionPolicy, dataset_path: str | Path, k: int = DEFAULT_K, seed: int = 0
) -> torch.Tensor:
    """k-means centres of the dataset's normalised action chunks: (k, Tp, Da)."""
    chunks = dataset_chunks(policy, dataset_path)
    centres, _ = kmeans(chunks.flatten(1).cpu(), k, seed)
    return centres.view(k, *chunks.shape[1:])


def save_anchors(folder: str | Path, anchors: torch.Tensor, meta: dict | None = None) -> Path:
    """Write ``<folder>/anchors.safetensors`` (anchors (k, Tp, Da), JSON metadata)."""
    path = Path(folder) / ANCHORS_FILE
    info = {k: json.dumps(v) for k, v in (meta or {}).items()}
    save_file({ANCHORS_KEY: anchors.detach().cpu().contiguous()}, str(path), metadata=info)
    return path


def load_anchors(path: str | Path) -> torch.Tensor:
    """Anchors (k, Tp, Da) from an anchors file, or a checkpoint / run folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = resolve_checkpoint(p) / ANCHORS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no {ANCHORS_FILE} at {p}")
    return load_file(str(p))[ANCHORS_KEY]


def training_dataset(checkpoint: str | Path) -> Path | None:
    """The dataset a checkpoint's run was trained on (from the run's summary.json), if known."""
    folder = resolve_checkpoint(checkpoint)
    run = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    summary = run / SUMMARY_JSON
    if not summary.is_file():
        return None
    dataset = json.loads(summary.read_text()).get("dataset")
    return Path(dataset) if dataset and Path(dataset).exists() else None


def resolve_anchors(
    policy: DiffusionPolicy,
    anchors: str | Path | torch.Tensor | None,
    dataset: str | Path | None,
    k: int,
    seed: int,
) -> torch.Tensor:
    """Anchors given directly, read from a file/checkpoint, or fitted on a dataset (in that order).

    A checkpoint without an anchors file falls back to the dataset its run was trained on.
    """
    if isinstance(anchors, torch.Tensor):
        return anchors.float()
    tried = []
    if anchors is not None:
        try:
            return load_anchors(anchors)
        except FileNotFoundError as exc:
            tried.append(str(exc))
            if dataset is None and Path(anchors).is_dir():
                dataset = training_dataset(anchors)
    if dataset is not None:
        return fit_anchors(policy, dataset, k, seed)
    raise ValueError(
        "sampler 'truncated' needs anchors: anchors=<anchors.safetensors or a checkpoint holding "
        "one> or dataset=<demos> (k-means of its action chunks)"
        + (f"; tried: {'; '.join(tried)}" if tried else "")
    )


class TruncatedChunkSampler(ChunkSampler):
    """Anchored diffusion: nearest anchor, noised to ``start_step``, ``n_steps`` DDIM steps."""

    name = "truncated"
    eager_parts = ("probe",)
    compiled_parts = ("anchored_chunk",)

    def __init__(
        self,
        policy: DiffusionPolicy,
        anchors: str | torch.Tensor | None = None,
        dataset: str | None = None,
        k: int = DEFAULT_K,
        start_step: int | None = None,
        n_steps: int = 2,
        selection: str = "x0",
        eta: float = 0.0,
        seed: int = 0,
    ):
        if selection not in SELECTIONS:
            raise ValueError(f"truncated selection must be one of {SELECTIONS}, got {selection!r}")
        n_train = policy.schedule.num_train_steps
        if start_step is None:
            start_step = round(DEFAULT_START_FRACTION * (n_train - 1))
        super().__init__(
            DDIMSampler(
                policy.schedule, eta=eta, timesteps=step_list(n_train, None, start_step, n_steps)
            )
        )
        cfg = policy.cfg
        found = resolve_anchors(policy, anchors, dataset, k, seed)
        if tuple(found.shape[1:]) != (cfg.horizon, cfg.action_dim):
            raise ValueError(
                f"anchors of shape {tuple(found.shape)} do not fit chunks "
                f"(Tp, Da) = ({cfg.horizon}, {cfg.action_dim})"
            )
        self.anchors = found
        self._anchors_on: dict[tuple, tuple[torch.Tensor, ...]] = {}
        a_start = policy.schedule.alpha_bar(self.start_timestep)
        self.sqrt_a_start, self.sqrt_1ma_start = a_start.sqrt(), (1 - a_start).sqrt()
        """q(x_s | anchor) at the start step: 0-dim CPU tensors (scalars on any device)."""
        self.selection = selection
        self.probe = DDIMSampler(policy.schedule, timesteps=[n_train - 1])
        """One network call at the top level whose x0 picks the anchor (no chain is run)."""

    @property
    def start_timestep(self) -> int:
        return self.diffusion.timesteps[0]

    @property
    def start_noise_level(self) -> float:
        """sqrt(1 - alpha-bar) at the start step: the std of the noise added to an anchor."""
        return self.diffusion.noise_level(0)

    def noise_anchor(self, anchor: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """q(x_s | anchor) with given standard-normal z: (M, Tp, Da) -> (M, Tp, Da)."""
        return torch.addcmul(anchor * self.sqrt_a_start, z, self.sqrt_1ma_start)

    def anchors_on(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Anchors on ``like``'s device and dtype, cached: (k, Tp, Da), their flat transpose
        (Tp*Da, k) and squared norms (1, k)."""
        key = (like.device, like.dtype)
        if key not in self._anchors_on:
            anchors = self.anchors.to(like)
            flat = anchors.flatten(1)
            self._anchors_on[key] = (anchors, flat.T.contiguous(), (flat**2).sum(1)[None])
        return self._anchors_on[key]

    def nearest_anchor(self, x0: torch.Tensor) -> torch.Tensor:
        """Index (B,) of the anchor closest (L2) to each chunk x0 (B, Tp, Da):
        argmin_k |a_k|^2 - 2 x0 . a_k (|x0|^2 is the same for every k)."""
        _, flat_t, sq_norms = self.anchors_on(x0)
        return torch.addmm(sq_norms, x0.flatten(1), flat_t, alpha=-2.0).argmin(1)

    def sample(
        self,
        policy: DiffusionPolicy,
        cond: torch.Tensor,
        state: SamplerState,
        *,
        generator: torch.Generator | None,
        hooks: Sequence[Hook] = (),
        obs: dict[str, torch.Tensor] | None = None,
        record_from: int | None = None,
    ) -> ChainResult:
        if record_from is not None:
            raise ValueError("sampler 'truncated' does not record chains; DPPO uses ddpm or ddim")
        if self.selection == "consistency":
            return self._sample_all(policy, cond, generator, hooks, obs)
        cfg = policy.cfg
        b = cond.shape[0]
        z = torch.randn(
            (b, cfg.horizon, cfg.action_dim),
            generator=generator,
            device=cond.device,
            dtype=cond.dtype,
        )
        z_anchor = self.diffusion.draw_noise(z, generator)
        nfe = self.diffusion.n_steps + 1
        if not hooks and getattr(self.diffusion, "mode", None) == "compile":
            # a compiled static chain (policies.gpu): anchor choice and chain in one call
            self.probe.step_table(z)  # tables are built outside: building reads values back
            noise = self.diffusion.chain_noise(z, generator)
            with torch.no_grad():
                x = self.anchored_chunk(policy, z, z_anchor, cond, noise)
            return ChainResult(x=x, chain=None, nfe=nfe)
        x = self.start_from_anchor(policy, z, z_anchor, cond)
        res = self.diffusion.run(
            policy.eps_fn(cond), x, cond, generator=generator, hooks=hooks, obs=obs
        )
        return ChainResult(x=res.x, chain=None, nfe=nfe)

    def anchored_chunk(
        self,
        policy: DiffusionPolicy,
        z: torch.Tensor,
        z_anchor: torch.Tensor,
        cond: torch.Tensor,
        noise: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """``start_from_anchor`` then the static chain's steps (``self.diffusion`` is a
        ``policies.gpu.StaticChain``; ``noise``: one draw per stochastic step): the clean chunk
        (B, Tp, Da). A pure tensor function, compiled as one by ``accelerate(mode="compile")``."""
        return self.diffusion.chain(
            0, self.start_from_anchor(policy, z, z_anchor, cond), cond, noise
        )

    def start_from_anchor(
        self, policy: DiffusionPolicy, z: torch.Tensor, z_anchor: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        """The chain's start (B, Tp, Da): the anchor nearest the probe's x0 from noise z, noised
        with the draw ``z_anchor`` (both (B, Tp, Da)). One network call."""
        rough = self.probe.predict_x0(z, policy.eps(z, self.probe.timesteps[0], cond), 0)
        anchor = self.anchors_on(cond)[0].index_select(0, self.nearest_anchor(rough))
        return self.noise_anchor(anchor, z_anchor)

    def _sample_all(self, policy, cond, generator, hooks, obs) -> ChainResult:
        """Denoise all k anchors per stream; keep the one that moved least."""
        k, b = self.anchors.shape[0], cond.shape[0]
        anchors = self.anchors_on(cond)[0].repeat(b, 1, 1)
        cond_k = cond.repeat_interleave(k, 0)
        idx = torch.arange(b, device=cond.device).repeat_interleave(k)
        x = self.noise_anchor(anchors, self.diffusion.draw_noise(anchors, generator))
        res = self.diffusion.run(
            policy.eps_fn(cond_k), x, cond_k, generator=generator, hooks=hooks, obs=rows(obs, idx)
        )
        moved = (res.x - anchors).flatten(1).norm(dim=1).view(b, k)
        best = moved.argmin(1) + torch.arange(b, device=cond.device) * k
        return ChainResult(x=res.x[best], chain=None, nfe=res.nfe)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "n_steps": self.diffusion.n_steps,
            "timesteps": list(self.diffusion.timesteps),
            "k": int(self.anchors.shape[0]),
            "start_noise_level": self.start_noise_level,
            "selection": self.selection,
            "eta": self.diffusion.eta,
        }


CHUNK_SAMPLERS[TruncatedChunkSampler.name] = TruncatedChunkSampler
