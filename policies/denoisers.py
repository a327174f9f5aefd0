"""Denoiser networks eps(x, t, cond) over action chunks.

Every denoiser here is an ``nn.Module`` with the same interface::

    forward(x, t, cond) -> eps
        x:    (B, Tp, Da) noisy action chunk
        t:    (B,) diffusion timestep (float or long), or (B, Tp) one noise level per action
              (Streaming Diffusion Policy); a scalar broadcasts over the batch
        cond: (B, Dc) observation features (the caller flattens the To observations)
        eps:  (B, Tp, Da) predicted noise

``per_action_levels`` says whether a network embeds one level per action. When False, a (B, Tp)
``t`` raises ValueError; when True, a (B,) ``t`` is broadcast to (B, Tp).

- ``MLPDenoiser``: DPPO's ``DiffusionMLP`` with its residual MLP.
- ``UNet1DDenoiser``: Diffusion Policy's ``ConditionalUnet1D`` (FiLM-conditioned temporal U-Net).
- ``TransformerDenoiser``: Diffusion Policy's ``TransformerForDiffusion`` with a flat condition.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SINUSOID_MAX_PERIOD = 10_000.0  # longest wavelength of the sinusoidal step embedding
POS_EMB_INIT_STD = 0.02  # learned position embeddings start near zero (Diffusion Policy)
LAYERNORM_EPS = 1e-6  # DPPO residual MLP


def _levels(t: Tensor | float, x: Tensor, per_action_levels: bool) -> Tensor:
    """Normalise ``t`` to x's dtype: (B, Tp) when ``per_action_levels``, else (B,).

    Accepts a scalar, (B,) or (B, Tp); raises ValueError on anything else, and on (B, Tp) when
    the network has one level per chunk.
    """
    batch, horizon = x.shape[:2]
    t = torch.as_tensor(t, device=x.device).to(x.dtype)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape == (batch, horizon):
        if not per_action_levels:
            raise ValueError(
                "per-action noise levels t of shape (B, Tp) need a denoiser built with "
                "per_action_levels=True"
            )
        return t
    if t.shape != (batch,):
        raise ValueError(
            f"t must have shape (B,)=({batch},) or (B, Tp)=({batch}, {horizon}), "
            f"got {tuple(t.shape)}"
        )
    return t[:, None].expand(batch, horizon) if per_action_levels else t


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of diffusion levels: (...,) -> (..., dim)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"sinusoidal embedding dim must be even and >= 4, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(SINUSOID_MAX_PERIOD) * torch.arange(half) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        angles = t[..., None] * self.freqs.to(t.dtype)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


def _step_encoder(dim: int, hidden_mult: int) -> nn.Sequential:
    """Sinusoid -> Linear -> Mish -> Linear: (...,) levels -> (..., dim)."""
    return nn.Sequential(
        SinusoidalEmbedding(dim),
        nn.Linear(dim, dim * hidden_mult),
        nn.Mish(),
        nn.Linear(dim * hidden_mult, dim),
    )


# ---------------------------------------------------------------------------------------------
# DPPO residual MLP
# ---------------------------------------------------------------------------------------------


class _PreActResidualBlock(nn.Module):
    """x + L2(act(norm2(L1(act(norm1(x)))))), on (B, width). DPPO's two-layer residual block."""

    def __init__(self, width: int, use_layernorm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LAYERNORM_EPS) if use_layernorm else nn.Identity()
        self.norm2 = nn.LayerNorm(width, eps=LAYERNORM_EPS) if use_layernorm else nn.Identity()
        self.l1 = nn.Linear(width, width)
        self.l2 = nn.Linear(width, width)
        self.act = nn.Mish()

    def forward(self, x: Tensor) -> Tensor:
        h = self.l1(self.act(self.norm1(x)))
        return x + self.l2(self.act(self.norm2(h)))


class MLPDenoiser(nn.Module):
    """DPPO's ``DiffusionMLP`` (``residual_style=True``).

    Input: [flattened x (Tp*Da), step embedding (time_dim, or Tp*time_dim with per-action
    levels: each action's level embedded separately), cond (Dc)] -> Linear to ``hidden_dim`` ->
    (depth-1)/2 pre-activation residual blocks (two Linear + Mish each) -> Linear to Tp*Da.
    ``depth`` counts hidden layers as DPPO's ``mlp_dims`` does: depth=3, hidden_dim=512 is
    DPPO's ``mlp_dims: [512, 512, 512]``.
    """

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        cond_dim: int,
        hidden_dim: int = 512,
        depth: int = 3,
        time_dim: int = 16,
        use_layernorm: bool = False,
        per_action_levels: bool = False,
    ):
        super().__init__()
        if depth < 3 or depth % 2 == 0:
            raise ValueError(f"depth (hidden layers) must be odd and >= 3, got {depth}")
        self.per_action_levels = per_action_levels
        self.step_encoder = _step_encoder(time_dim, hidden_mult=2)
        n_levels = horizon if per_action_levels else 1
        in_dim = horizon * action_dim + n_levels * time_dim + cond_dim
        blocks = [_PreActResidualBlock(hidden_dim, use_layernorm) for _ in range((depth - 1) // 2)]
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), *blocks, nn.Linear(hidden_dim, horizon * action_dim)
        )

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor) -> Tensor:
        """x (B, Tp, Da), t (B,) or (B, Tp), cond (B, Dc) -> eps (B, Tp, Da)."""
        batch = x.shape[0]
        step = self.step_encoder(_levels(t, x, self.per_action_levels)).reshape(batch, -1)
        h = torch.cat([x.reshape(batch, -1), step, cond], dim=-1)
        return self.net(h).view_as(x)


# ---------------------------------------------------------------------------------------------
# Diffusion Policy 1-D temporal U-Net
# ---------------------------------------------------------------------------------------------


class _ConvBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish, length preserving: (B, C_in, L) -> (B, C_out, L)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, n_groups: int):
        super().__init__(
            nn.Conv1d(in_ch, out_ch, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_ch),
            nn.Mish(),
        )


def _film_at(feature: Tensor, length: int) -> Tensor:
    """Conditioning feature (B, L0, F) at a U-Net resolution: (B, 1 or length, F).

    A global feature (L0 = 1) passes through; a per-position one is average-pooled to ``length``.
    """
    if feature.shape[1] in (1, length):
        return feature
    return F.adaptive_avg_pool1d(feature.transpose(1, 2), length).transpose(1, 2)


def _downsample(channels: int) -> nn.Conv1d:
    """Halve the length: (B, C, L) -> (B, C, L/2)."""
    return nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1)


def _upsample(channels: int) -> nn.ConvTranspose1d:
    """Double the length: (B, C, L) -> (B, C, 2L)."""
    return nn.ConvTranspose1d(channels, channels, kernel_size=4, stride=2, padding=1)


class _FiLMResBlock(nn.Module):
    """Two conv blocks with FiLM (scale, bias) after the first, plus a 1x1 residual projection.

    x (B, C_in, L), feature (B, 1 or L0, F) -> (B, C_out, L). A per-position feature gives a
    per-position scale and bias.
    """

    def __init__(self, in_ch: int, out_ch: int, film_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.conv1 = _ConvBlock(in_ch, out_ch, kernel_size, n_groups)
        self.conv2 = _ConvBlock(out_ch, out_ch, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(film_dim, 2 * out_ch))
        self.residual = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, feature: Tensor) -> Tensor:
        film = self.film(_film_at(feature, x.shape[-1])).transpose(1, 2)  # (B, 2*C_out, 1 or L)
        scale, bias = film.chunk(2, dim=1)
        h = self.conv2(scale * self.conv1(x) + bias)
        return h + self.residual(x)


class UNet1DDenoiser(nn.Module):
    """Diffusion Policy's ``ConditionalUnet1D`` (``cond_predict_scale=True``, global cond).

    The chunk is a 1-D signal over Tp with Da channels. Down path: per level two FiLM residual
    blocks then a stride-2 conv (none after the last level); two mid blocks; up path: concat the
    skip, two FiLM residual blocks, transposed-conv upsampling; final conv block + 1x1 conv to Da.
    As in Diffusion Policy the finest-level skip is not used. Tp must be divisible by
    2**(len(down_dims) - 1). Every block is FiLM-conditioned on [step embedding, cond].

    Per-action levels: each action's level is embedded on its own, so the FiLM feature becomes
    per position (B, Tp, E + Dc) and every block applies a per-position scale and bias, average-
    pooled to the block's resolution. Weights are the same as without per-action levels, and a
    constant level reproduces the global-level network.
    """

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        cond_dim: int,
        down_dims: tuple[int, ...] | list[int] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        step_embed_dim: int = 256,
        per_action_levels: bool = False,
    ):
        super().__init__()
        n_down = len(down_dims) - 1
        if horizon % 2**n_down:
            raise ValueError(f"horizon {horizon} must be divisible by 2**{n_down} for down_dims")
        self.per_action_levels = per_action_levels
        self.step_encoder = _step_encoder(step_embed_dim, hidden_mult=4)
        film_dim = step_embed_dim + cond_dim

        def block(c_in: int, c_out: int) -> _FiLMResBlock:
            return _FiLMResBlock(c_in, c_out, film_dim, kernel_size, n_groups)

        dims = [action_dim, *down_dims]
        pairs = list(zip(dims[:-1], dims[1:], strict=True))
        self.down = nn.ModuleList(
            nn.ModuleList(
                [
                    block(c_in, c_out),
                    block(c_out, c_out),
                    _downsample(c_out) if i < n_down else nn.Identity(),
                ]
            )
            for i, (c_in, c_out) in enumerate(pairs)
        )
        self.mid = nn.ModuleList([block(dims[-1], dims[-1]), block(dims[-1], dims[-1])])
        self.up = nn.ModuleList(
            nn.ModuleList([block(2 * c_out, c_in), block(c_in, c_in), _upsample(c_in)])
            for c_in, c_out in reversed(pairs[1:])
        )
        self.final = nn.Sequential(
            _ConvBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            nn.Conv1d(down_dims[0], action_dim, 1),
        )

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor) -> Tensor:
        """x (B, Tp, Da), t (B,) or (B, Tp), cond (B, Dc) -> eps (B, Tp, Da)."""
        step = self.step_encoder(_levels(t, x, self.per_action_levels))  # (B, E) or (B, Tp, E)
        if step.dim() == 2:
            step = step[:, None]
        feature = torch.cat([step, cond[:, None].expand(-1, step.shape[1], -1)], dim=-1)
        h = x.transpose(1, 2)  # (B, Da, Tp)
        skips = []
        for block1, block2, downsample in self.down:
            h = block2(block1(h, feature), feature)
            skips.append(h)
            h = downsample(h)
        for mid in self.mid:
            h = mid(h, feature)
        for block1, block2, upsample in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = upsample(block2(block1(h, feature), feature))
        return self.final(h).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Diffusion Policy time-series transformer
# ---------------------------------------------------------------------------------------------


class TransformerDenoiser(nn.Module):
    """Diffusion Policy's ``TransformerForDiffusion`` with a flattened observation condition.

    Action tokens (B, Tp, n_emb) = Linear(x) + learned positions. Memory tokens: [step, cond]
    (B, 2, n_emb) plus learned positions through an MLP; with per-action levels the memory is
    [cond] only and each action token gets its own level embedding added instead. A stack of
    pre-norm decoder layers (self-attention over actions, optionally causal; cross-attention to
    the memory) -> LayerNorm -> Linear to Da. ``dropout`` applies to attention and feed-forward
    layers (Diffusion Policy trains with 0.3); it is inactive in eval mode.
    """

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        cond_dim: int,
        n_layer: int = 8,
        n_head: int = 4,
        n_emb: int = 256,
        causal: bool = True,
        dropout: float = 0.0,
        per_action_levels: bool = False,
    ):
        super().__init__()
        self.per_action_levels = per_action_levels
        self.step_encoder = _step_encoder(n_emb, hidden_mult=4)
        self.input_emb = nn.Linear(action_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.randn(1, horizon, n_emb) * POS_EMB_INIT_STD)
        self.cond_emb = nn.Linear(cond_dim, n_emb)
        n_memory = 1 if per_action_levels else 2
        self.memory_pos_emb = nn.Parameter(torch.randn(1, n_memory, n_emb) * POS_EMB_INIT_STD)
        self.memory_mlp = nn.Sequential(
            nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb)
        )
        layer = nn.TransformerDecoderLayer(
            n_emb,
            n_head,
            dim_feedforward=4 * n_emb,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, n_layer)
        self.causal = causal
        mask = torch.triu(torch.full((horizon, horizon), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)
        self.ln_f = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, action_dim)

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor) -> Tensor:
        """x (B, Tp, Da), t (B,) or (B, Tp), cond (B, Dc) -> eps (B, Tp, Da)."""
        step = self.step_encoder(_levels(t, x, self.per_action_levels))  # (B, E) or (B, Tp, E)
        tokens = self.input_emb(x) + self.pos_emb
        memory = self.cond_emb(cond)[:, None]  # (B, 1, E)
        if self.per_action_levels:
            tokens = tokens + step
        else:
            memory = torch.cat([step[:, None], memory], dim=1)
        memory = self.memory_mlp(memory + self.memory_pos_emb)
        mask = self.causal_mask.to(x.dtype) if self.causal else None
        h = self.decoder(tokens, memory, tgt_mask=mask, tgt_is_causal=self.causal)
        return self.head(self.ln_f(h))


# ---------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------

DENOISERS: dict[str, type[nn.Module]] = {
    "mlp": MLPDenoiser,
    "unet": UNet1DDenoiser,
    "transformer": TransformerDenoiser,
}


def build_denoiser(
    kind: str, action_dim: int, horizon: int, cond_dim: int, **kwargs: object
) -> nn.Module:
    """Build the denoiser ``kind`` (one of ``DENOISERS``) with its size arguments ``kwargs``.

    Raises ValueError for an unknown kind and TypeError naming any argument the class lacks.
    """
    if kind not in DENOISERS:
        raise ValueError(f"unknown denoiser kind {kind!r}; valid kinds: {sorted(DENOISERS)}")
    cls = DENOISERS[kind]
    accepted = set(inspect.signature(cls.__init__).parameters) - {
        "self",
        "action_dim",
        "horizon",
        "cond_dim",
    }
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(
            f"{cls.__name__} got unknown arguments {unknown}; accepted: {sorted(accepted)}"
        )
    return cls(action_dim=action_dim, horizon=horizon, cond_dim=cond_dim, **kwargs)
