"""An ensemble of prior heads on a frozen RSSM: where the heads disagree, imagination is unreliable.

Each head maps the deterministic state h_t (B, H) to a Gaussian over z_t, like the RSSM's own
prior, and is trained on its own random minibatches of the frozen model's filtered states towards
the posterior q(z_t | h_t, o_t). On states like the play data the heads agree; away from them
(where DPPO in imagination finds spurious successes) they disagree. The *disagreement* of a state
is the standard deviation of the heads' predicted means across heads, averaged over the Z dims
(Plan2Explore's epistemic signal; MOReL halts imagined episodes there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from world_models.rssm import gaussian_kl, gaussian_stats, mlp


@dataclass
class EnsembleConfig:
    deter_dim: int
    stoch_dim: int
    n_heads: int = 5
    hidden_dim: int = 128
    min_std: float = 0.1

    def __post_init__(self):
        if self.n_heads < 2:
            raise ValueError(f"a disagreement ensemble needs n_heads >= 2, got {self.n_heads}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PriorEnsemble(nn.Module):
    """``n_heads`` MLPs h (B, H) -> (mean, std) of z, each (K, B, Z)."""

    def __init__(self, cfg: EnsembleConfig):
        super().__init__()
        self.cfg = cfg
        self.heads = nn.ModuleList(
            mlp(cfg.deter_dim, cfg.hidden_dim, 2 * cfg.stoch_dim, depth=1)
            for _ in range(cfg.n_heads)
        )

    def forward(self, deter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return gaussian_stats(torch.stack([head(deter) for head in self.heads]), self.cfg.min_std)

    @torch.no_grad()
    def disagreement(self, deter: torch.Tensor) -> torch.Tensor:
        """(B,) std of the heads' means across heads, averaged over the latent dims."""
        return self(deter)[0].std(dim=0).mean(dim=-1)


def fit_prior_ensemble(
    ensemble: PriorEnsemble,
    deter: torch.Tensor,
    post_mean: torch.Tensor,
    post_std: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
) -> list[float]:
    """Train every head on its own minibatches of filtered states: deter (N, H) with posterior
    mean / std (N, Z), minimising KL(q || head). Returns the mean loss over heads per step."""
    n = deter.shape[0]
    if n == 0 or not deter.shape[0] == post_mean.shape[0] == post_std.shape[0]:
        raise ValueError(
            f"need as many posteriors as states (> 0), got {deter.shape} {post_mean.shape} "
            f"{post_std.shape}"
        )
    opt = torch.optim.AdamW(ensemble.parameters(), lr=lr)
    k, b = ensemble.cfg.n_heads, min(batch_size, n)
    losses = []
    ensemble.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (k, b), generator=generator)  # one minibatch per head
        stats = torch.stack([head(deter[i]) for head, i in zip(ensemble.heads, idx, strict=True)])
        mean, std = gaussian_stats(stats, ensemble.cfg.min_std)
        loss = gaussian_kl(post_mean[idx], post_std[idx], mean, std).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    ensemble.eval()
    return losses
