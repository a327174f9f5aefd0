"""Recurrent state-space model (Dreamer's RSSM) over a flat state observation.

The latent state of step t is a deterministic GRU state h_t (B, H) and a stochastic Gaussian
latent z_t (B, Z); the *feature* [h_t, z_t] (B, H + Z) is what heads (decoder, success classifier)
read::

    h_t = GRU(h_{t-1}, MLP([z_{t-1}, a_{t-1}]))      (h_{-1} = 0, z_{-1} = 0, a_{-1} = 0)
    prior      p(z_t | h_t)                          imagination
    posterior  q(z_t | h_t, o_t)                     filtering real observations
    decoder    p(o_t | h_t, z_t) = N(mean, I)        on normalised observations

Loss per step: reconstruction (0.5 squared error summed over dims) + ``kl_scale`` x balanced KL
(DreamerV2): ``kl_balance * KL(sg(q) || p) + (1 - kl_balance) * KL(q || sg(p))``, each term clipped
below at ``free_nats``; plus ``open_loop_scale`` x the same squared error of an *open-loop*
rollout: from the window's first step (filtered exactly as ``encode_start`` does at an imagined
episode's start) the prior alone is rolled under the window's real actions and decoded. The
filtering terms alone train the prior only through a weak KL, so imagined states drift from real
ones within a few steps; this term trains what imagination does (observation overshooting, as
PlaNet's latent overshooting does in latent space). Observations and actions are normalised to
[-1, 1] by a ``Normalizer`` fitted on the training data and saved with the weights; the public
methods take and return env units.

With ``decode_delta`` the decoder predicts the change of the (normalised) observation since the
sequence's first observation, which the imagined env always has (the real observation an episode
starts from): the start is given rather than squeezed through one posterior step, and the model
spends its capacity on how observations change.

``static_dims`` are observation dims that never change within an episode of the training data
(e.g. ``point_reach``'s goal). The decoder still reconstructs them, but ``decode_obs`` copies them
from the episode's first observation, so imagined goals never drift.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from policies.normalizer import ACTION_KEY, Normalizer


@dataclass
class WorldModelConfig:
    """Everything needed to rebuild a world model (saved as JSON next to the weights)."""

    task: str
    obs_key: str
    obs_dim: int
    action_dim: int
    deter_dim: int = 256
    stoch_dim: int = 32
    hidden_dim: int = 256
    min_std: float = 0.1
    kl_balance: float = 0.8
    free_nats: float = 1.0
    kl_scale: float = 1.0
    open_loop_scale: float = 0.0
    decode_delta: bool = False
    static_dims: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not 0.0 <= self.kl_balance <= 1.0:
            raise ValueError(f"kl_balance must be in [0, 1], got {self.kl_balance}")
        if self.open_loop_scale < 0:
            raise ValueError(f"open_loop_scale must be >= 0, got {self.open_loop_scale}")
        if min(self.obs_dim, self.action_dim, self.deter_dim, self.stoch_dim) < 1:
            raise ValueError("obs_dim, action_dim, deter_dim and stoch_dim must be >= 1")
        self.static_dims = sorted(int(d) for d in self.static_dims)
        if any(not 0 <= d < self.obs_dim for d in self.static_dims):
            raise ValueError(
                f"static_dims {self.static_dims} out of range for obs_dim {self.obs_dim}"
            )

    @property
    def obs_shapes(self) -> dict[str, list[int]]:
        """The observation spec in the policy checkpoint's format ({key: shape})."""
        return {self.obs_key: [self.obs_dim]}

    @property
    def feature_dim(self) -> int:
        return self.deter_dim + self.stoch_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LatentState:
    """Batched RSSM state: ``deter`` (B, H), ``stoch`` (B, Z)."""

    deter: torch.Tensor
    stoch: torch.Tensor

    def feature(self) -> torch.Tensor:
        """(B, H + Z) input of the decoder and the success classifier."""
        return torch.cat([self.deter, self.stoch], dim=-1)

    def where(self, mask: torch.Tensor, other: LatentState) -> LatentState:
        """Rows of ``self`` where ``mask`` (B,) is true, of ``other`` elsewhere."""
        m = mask[:, None]
        return LatentState(
            torch.where(m, self.deter, other.deter), torch.where(m, self.stoch, other.stoch)
        )


def mlp(inp: int, hidden: int, out: int, depth: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = inp
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.SiLU()]
        d = hidden
    layers.append(nn.Linear(d, out))
    return nn.Sequential(*layers)


def gaussian_stats(stats: torch.Tensor, min_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a head's output (..., 2Z) into mean (..., Z) and std (..., Z) >= ``min_std``."""
    mean, raw_std = stats.chunk(2, dim=-1)
    return mean, F.softplus(raw_std) + min_std


def gaussian_kl(
    mean_q: torch.Tensor, std_q: torch.Tensor, mean_p: torch.Tensor, std_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean_q, std_q) || N(mean_p, std_p)) summed over the last dim: (...,)."""
    var_ratio = (std_q / std_p) ** 2
    diff = ((mean_q - mean_p) / std_p) ** 2
    return 0.5 * (var_ratio + diff - 1.0 - var_ratio.log()).sum(-1)


class WorldModel(nn.Module):
    """RSSM + observation decoder; see the module docstring."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.cfg = cfg
        h, z, d = cfg.deter_dim, cfg.stoch_dim, cfg.hidden_dim
        self.normalizer = Normalizer({cfg.obs_key: (cfg.obs_dim,), ACTION_KEY: (cfg.action_dim,)})
        self.encoder = mlp(cfg.obs_dim, d, d)
        self.transition_in = nn.Sequential(
            nn.Linear(z + cfg.action_dim, d), nn.LayerNorm(d), nn.SiLU()
        )
        self.gru = nn.GRUCell(d, h)
        self.prior_net = mlp(h, d, 2 * z, depth=1)
        self.posterior_net = mlp(h + d, d, 2 * z, depth=1)
        self.decoder = mlp(h + z, d, cfg.obs_dim)

    # -- normalisation --------------------------------------------------------------------------
    def fit_normalizer(self, obs, actions) -> None:
        """Fit the [-1, 1] normaliser on observations (N, D) and actions (N, Da)."""
        self.normalizer.fit({self.cfg.obs_key: obs, ACTION_KEY: actions})

    def _norm_obs(self, obs: torch.Tensor) -> torch.Tensor:
        return self.normalizer.normalize(self.cfg.obs_key, obs)

    def _norm_act(self, action: torch.Tensor) -> torch.Tensor:
        return self.normalizer.normalize(ACTION_KEY, action)

    # -- one step -------------------------------------------------------------------------------
    def initial(self, batch: int) -> LatentState:
        p = next(self.parameters())
        zeros = p.new_zeros
        return LatentState(zeros(batch, self.cfg.deter_dim), zeros(batch, self.cfg.stoch_dim))

    def _dist(self, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return gaussian_stats(stats, self.cfg.min_std)

    @staticmethod
    def _sample(mean, std, generator: torch.Generator | None, sample: bool) -> torch.Tensor:
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise

    def _deter(self, state: LatentState, action_norm: torch.Tensor) -> torch.Tensor:
        return self.gru(self.transition_in(torch.cat([state.stoch, action_norm], -1)), state.deter)

    def _observe_step(self, state, action_norm, embed, generator=None, sample=True):
        """(posterior state, posterior (mean, std)) after one real step with encoded obs ``embed``."""
        deter = self._deter(state, action_norm)
        post = self._dist(self.posterior_net(torch.cat([deter, embed], -1)))
        return LatentState(deter, self._sample(*post, generator, sample)), post

    def imagine_step(
        self,
        state: LatentState,
        action: torch.Tensor,
        generator: torch.Generator | None = None,
        sample: bool = True,
    ) -> LatentState:
        """The next state after ``action`` (B, Da) env units, z drawn from the prior."""
        deter = self._deter(state, self._norm_act(action))
        return LatentState(
            deter, self._sample(*self._dist(self.prior_net(deter)), generator, sample)
        )

    def encode_start(
        self, obs: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> LatentState:
        """The state that has seen the first observation ``obs`` (B, D) of an episode."""
        b = obs.shape[0]
        no_action = obs.new_zeros(b, self.cfg.action_dim)
        embed = self.encoder(self._norm_obs(obs))
        state, _ = self._observe_step(self.initial(b), no_action, embed, generator, sample)
        return state

    def _decoder_target(self, obs: torch.Tensor) -> torch.Tensor:
        """What the decoder predicts for sequences obs (B, L, D): the normalised observations, or
        with ``decode_delta`` their change since obs[:, 0]."""
        target = self._norm_obs(obs)
        return target - target[:, :1] if self.cfg.decode_delta else target

    def decode_obs(self, state: LatentState, first_obs: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded observation mean (B, D) in env units; static dims copied from ``first_obs``
        (B, D), the observation the imagined sequence started from (required with
        ``decode_delta``)."""
        out = self.decoder(state.feature())
        if self.cfg.decode_delta:
            if first_obs is None:
                raise ValueError("a world model with decode_delta decodes relative to first_obs")
            out = out + self._norm_obs(first_obs.to(out))
        obs = self.normalizer.unnormalize(self.cfg.obs_key, out)
        if first_obs is not None and self.cfg.static_dims:
            obs = obs.clone()
            obs[:, self.cfg.static_dims] = first_obs[:, self.cfg.static_dims].to(obs)
        return obs

    # -- sequences ------------------------------------------------------------------------------
    def observe(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        generator: torch.Generator | None = None,
        sample: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Filter real sequences obs (B, L, D) with actions (B, L, Da) (a_t taken at o_t).

        Returns, each (B, L, ...): ``deter``, ``stoch`` (posterior samples), ``prior_stoch``
        (one-step prior samples), ``prior_mean``/``prior_std``, ``post_mean``/``post_std``.
        """
        embed = self.encoder(self._norm_obs(obs))  # all steps at once: only h_t is sequential
        act_n = self._norm_act(actions)
        b, length = obs.shape[:2]
        state = self.initial(b)
        prev_action = act_n.new_zeros(b, self.cfg.action_dim)
        deter, stoch, post_mean, post_std = [], [], [], []
        for t in range(length):
            state, post = self._observe_step(state, prev_action, embed[:, t], generator, sample)
            prev_action = act_n[:, t]
            deter.append(state.deter)
            stoch.append(state.stoch)
            post_mean.append(post[0])
            post_std.append(post[1])
        out = {
            "deter": torch.stack(deter, 1),
            "stoch": torch.stack(stoch, 1),
            "post_mean": torch.stack(post_mean, 1),
            "post_std": torch.stack(post_std, 1),
        }
        out["prior_mean"], out["prior_std"] = self._dist(self.prior_net(out["deter"]))
        out["prior_stoch"] = self._sample(out["prior_mean"], out["prior_std"], generator, sample)
        return out

    def loss(
        self, obs: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean per-step loss on sequences obs (B, L, D), actions (B, L, Da) and its parts."""
        seq = self.observe(obs, actions, generator)
        recon_mean = self.decoder(torch.cat([seq["deter"], seq["stoch"]], -1))
        recon = 0.5 * ((recon_mean - self._decoder_target(obs)) ** 2).sum(-1)
        post = (seq["post_mean"], seq["post_std"])
        prior = (seq["prior_mean"], seq["prior_std"])
        sg = [x.detach() for x in (*post, *prior)]
        kl_prior = gaussian_kl(sg[0], sg[1], *prior)  # trains the prior towards the posterior
        kl_post = gaussian_kl(*post, sg[2], sg[3])  # regularises the posterior
        free = self.cfg.free_nats
        balanced = self.cfg.kl_balance * kl_prior.clamp(min=free) + (
            1 - self.cfg.kl_balance
        ) * kl_post.clamp(min=free)
        loss = (recon + self.cfg.kl_scale * balanced).mean()
        parts = {"recon": recon.mean().item(), "kl": kl_post.mean().item()}
        if self.cfg.open_loop_scale > 0:
            start = LatentState(seq["deter"][:, 0], seq["stoch"][:, 0])
            open_loop = self.open_loop_error(start, obs, actions, generator)
            loss = loss + self.cfg.open_loop_scale * open_loop
            parts["open_loop"] = open_loop.item()
        return loss, parts

    def open_loop_error(
        self,
        start: LatentState,
        obs: torch.Tensor,
        actions: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean 0.5 squared error (summed over dims, normalised units) of the prior rolled from
        ``start`` (the state of obs[:, 0]) under actions[:, :-1] against obs[:, 1:] (B, L, D)."""
        target = self._decoder_target(obs)
        state, errors = start, []
        for t in range(1, obs.shape[1]):
            state = self.imagine_step(state, actions[:, t - 1], generator)
            errors.append(0.5 * ((self.decoder(state.feature()) - target[:, t]) ** 2).sum(-1))
        return torch.stack(errors, 1).mean()

    @torch.no_grad()
    def open_loop(
        self,
        first_obs: torch.Tensor,
        actions: torch.Tensor,
        generator: torch.Generator | None = None,
        sample: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Imagine from first observations (B, D) under actions (B, H, Da).

        Returns predicted observations (B, H, D) in env units (o_1..o_H) and the features
        (B, H, H_deter + Z) of the imagined states.
        """
        state = self.encode_start(first_obs, generator, sample)
        preds, feats = [], []
        for t in range(actions.shape[1]):
            state = self.imagine_step(state, actions[:, t], generator, sample)
            preds.append(self.decode_obs(state, first_obs))
            feats.append(state.feature())
        return torch.stack(preds, 1), torch.stack(feats, 1)
