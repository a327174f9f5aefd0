"""Success classifier on world-model features: P(success | h_t, z_t).

In imagination it is the reward and the termination signal (DiWA): an imagined step whose success
probability exceeds ``threshold`` earns the success reward and ends the episode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class ClassifierConfig:
    feature_dim: int
    hidden_dim: int = 256
    depth: int = 2
    threshold: float = 0.5

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"classifier threshold must be in (0, 1), got {self.threshold}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SuccessClassifier(nn.Module):
    """MLP features (B, F) -> success logits (B,)."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        d = cfg.feature_dim
        for _ in range(cfg.depth):
            layers += [nn.Linear(d, cfg.hidden_dim), nn.LayerNorm(cfg.hidden_dim), nn.SiLU()]
            d = cfg.hidden_dim
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)

    @torch.no_grad()
    def prob(self, features: torch.Tensor) -> torch.Tensor:
        """(B,) success probabilities."""
        return torch.sigmoid(self(features))

    @torch.no_grad()
    def predict(self, features: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """(B,) bool: probability above ``threshold`` (default: the configured one)."""
        return self.prob(features) > (self.cfg.threshold if threshold is None else threshold)


def fit_classifier(
    classifier: SuccessClassifier,
    features: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    weight_decay: float = 0.0,
) -> list[float]:
    """Train with binary cross-entropy on features (N, F) and bool labels (N,); returns losses."""
    if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError(
            f"need as many labels as features (> 0), got {features.shape} {labels.shape}"
        )
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    target = labels.float()
    losses = []
    classifier.train()
    for _ in range(steps):
        idx = torch.randint(
            0, features.shape[0], (min(batch_size, features.shape[0]),), generator=generator
        )
        loss = F.binary_cross_entropy_with_logits(classifier(features[idx]), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    classifier.eval()
    return losses


def precision_recall(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float | int | None]:
    """Precision, recall, accuracy of bool predictions (N,) against bool labels (N,).

    Precision (recall) is None when nothing was predicted (nothing is) positive.
    """
    predicted, labels = np.asarray(predicted, bool), np.asarray(labels, bool)
    tp = int(np.sum(predicted & labels))
    n_pred, n_pos = int(predicted.sum()), int(labels.sum())
    return {
        "precision": tp / n_pred if n_pred else None,
        "recall": tp / n_pos if n_pos else None,
        "accuracy": float(np.mean(predicted == labels)) if len(labels) else None,
        "n": int(len(labels)),
        "n_positive": n_pos,
        "n_predicted_positive": n_pred,
    }
