"""GPU fast path: the whole reverse chain captured as one CUDA graph, optionally in bf16.

``accelerate(sampler, policy, mode=, precision=)`` swaps every ``DiffusionSampler`` inside a chunk
sampler (ddpm, ddim, rti's cold and warm chains, truncated) for a ``StaticChain``: the sampler's
own transitions (``DiffusionSampler.transition`` with its precomputed ``step_table``) with the
noise drawn up front, so a chain runs without host synchronisation and can be captured. On a CPU
the sampler's own loop is already as cheap (same table, same five ops per step). Modes:

- ``graph``: ``torch.cuda.CUDAGraph`` capture of the whole chain, one graph per (start step,
  batch shape), replayed with the inputs copied into static buffers;
- ``compile``: ``torch.compile`` of the whole chain: on CUDA with ``mode="reduce-overhead"``
  (inductor kernels + CUDA graphs), on a CPU with inductor's C++ kernels (the chain's small
  per-step ops fused, one call instead of dozens of dispatches: what a batch-1 CPU controller
  needs). The first call of each (start step, shape) compiles (tens of seconds); outputs match
  the eager chain to float rounding, not bit for bit;
- ``eager``: the static chain run step by step.

``precision="bf16"`` runs the denoiser on a bf16 copy of its weights (half the bytes per network
call: the batch-1 bound is weight bandwidth); the chain arithmetic stays fp32. The bf16 copies are
snapshots: accelerate again after the weights change (so are compiled chains). Without CUDA,
``graph`` falls back to ``eager`` (``active_mode`` says which ran), with outputs identical to the
sampler's own ``run`` in fp32. Hooks and chain recording always take the sampler's own (eager) ``run``.
A static chain calls the policy's networks itself (``network_for`` each step, so a frozen DPPO
copy serves its steps): the ``eps_fn`` handed to ``run`` is used only on those eager fallbacks.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from policies.chunk_samplers import ChunkSampler
from policies.diffusion import DiffusionPolicy
from policies.samplers import ChainResult, DiffusionSampler, Hook
from policies.streaming import StreamingChunkSampler

MODES = ("eager", "graph", "compile")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
WARMUP_ITERS = 3
"""Eager runs on a side stream before capture (cuDNN/cuBLAS handles, autotuning)."""


def check_fast_path(fast_path: str | None, precision: str = "fp32", optional: bool = True) -> None:
    """Raise a ValueError naming the valid values for a bad ``fast_path`` / ``precision``
    (``optional``: None, no fast path, is valid too)."""
    if fast_path not in MODES and not (optional and fast_path is None):
        also = " (or null: the sampler as built)" if optional else ""
        raise ValueError(f"unknown fast_path {fast_path!r}; valid modes: {', '.join(MODES)}{also}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if fast_path is None and precision != "fp32":
        raise ValueError(f"precision={precision} needs a fast_path (eager, graph or compile)")


def _cast_network(net: nn.Module, dtype: torch.dtype, memo: dict) -> nn.Module:
    if dtype == torch.float32:
        return net
    if id(net) not in memo:
        memo[id(net)] = copy.deepcopy(net).to(dtype).eval().requires_grad_(False)
    return memo[id(net)]


class StaticChain:
    """A ``DiffusionSampler`` whose ``run`` is host-free (capturable); other attributes delegate.

    x, noise: (B, Tp, Da); cond: (B, Dc). ``chain(start, x, cond, noise)`` is the pure tensor
    function that is captured; ``noise`` holds one draw per stochastic step, drawn beforehand in
    the order the sampler's own ``run`` draws them.
    """

    def __init__(
        self,
        sampler: DiffusionSampler,
        policy: DiffusionPolicy,
        mode: str = "graph",
        precision: str = "fp32",
        memo: dict | None = None,
    ):
        check_fast_path(mode, precision, optional=False)
        memo = {} if memo is None else memo
        self.sampler = sampler
        self.mode, self.precision = mode, precision
        self.dtype = PRECISIONS[precision]
        self.networks = [
            _cast_network(policy.network_for(t), self.dtype, memo) for t in sampler.timesteps
        ]
        self.active_mode = "eager"
        self._graphs: dict[tuple, tuple] = {}
        self._compiled = None
        self._net_device: torch.device | None = None

    def __getattr__(self, name):
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)

    def chain(
        self, start: int, x: torch.Tensor, cond: torch.Tensor, noise: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Steps ``start..`` of the chain on x (B, Tp, Da): the clean sample.

        The transitions are the sampler's own (``transition`` with its ``step_table``).
        """
        steps = self.sampler.step_table(x).steps
        cond_n = cond.to(self.dtype)
        draws = iter(noise)
        for i in range(start, len(steps)):
            c = steps[i]
            t = torch.full(
                (x.shape[0],), self.sampler.timesteps[i], dtype=torch.long, device=x.device
            )
            eps = self.networks[i](x.to(self.dtype), t, cond_n).to(x.dtype)
            mean, _ = self.sampler.transition(c, x, eps)
            x = mean + c.std * next(draws) if c.stochastic else mean
        return x

    def run(
        self,
        eps_fn,
        x: torch.Tensor,
        cond: torch.Tensor,
        *,
        start: int = 0,
        generator: torch.Generator | None = None,
        hooks: Sequence[Hook] = (),
        obs: dict[str, torch.Tensor] | None = None,
        record_from: int | None = None,
    ) -> ChainResult:
        """Same contract as ``DiffusionSampler.run``; hooks or recording run the eager sampler."""
        if hooks or record_from is not None:
            return self.sampler.run(
                eps_fn,
                x,
                cond,
                start=start,
                generator=generator,
                hooks=hooks,
                obs=obs,
                record_from=record_from,
            )
        noise = self.chain_noise(x, generator, start)
        with torch.no_grad():
            out = self._execute(start, x, cond, noise)
        return ChainResult(x=out, chain=None, nfe=self.sampler.n_steps - start)

    def chain_noise(
        self, x: torch.Tensor, generator: torch.Generator | None, start: int = 0
    ) -> list[torch.Tensor]:
        """The draws ``chain`` takes from step ``start`` on (one like x per stochastic step), in
        the order the sampler's own ``run`` draws them; builds the step table outside ``chain``."""
        steps = self.sampler.step_table(x).steps[start:]
        return [self.sampler.draw_noise(x, generator) for c in steps if c.stochastic]

    def _execute(
        self, start: int, x: torch.Tensor, cond: torch.Tensor, noise: list[torch.Tensor]
    ) -> torch.Tensor:
        if self._net_device != x.device:  # reduced-precision copies follow the inputs
            for net in self.networks:
                net.to(x.device)
            self._net_device = x.device
        cuda = x.device.type == "cuda"
        if self.mode == "eager" or (self.mode == "graph" and not cuda):
            self.active_mode = "eager"
            return self.chain(start, x, cond, noise)
        self.active_mode = self.mode
        if self.mode == "compile":
            if self._compiled is None:
                options = {"mode": "reduce-overhead"} if cuda else {}
                self._compiled = torch.compile(self.chain, dynamic=False, **options)
            out = self._compiled(start, x, cond, noise)
            return out.clone() if cuda else out  # CUDA graphs reuse their output buffers
        return self._replay(start, x, cond, noise)

    def _replay(
        self, start: int, x: torch.Tensor, cond: torch.Tensor, noise: list[torch.Tensor]
    ) -> torch.Tensor:
        key = (start, tuple(x.shape), tuple(cond.shape), x.dtype, str(x.device))
        if key not in self._graphs:
            self._graphs[key] = self._capture(start, x, cond, noise)
        graph, static_x, static_cond, static_noise, out = self._graphs[key]
        static_x.copy_(x)
        static_cond.copy_(cond)
        for dst, src in zip(static_noise, noise, strict=True):
            dst.copy_(src)
        graph.replay()
        return out.clone()

    def _capture(self, start, x, cond, noise):
        static_x, static_cond = x.clone(), cond.clone()
        static_noise = [z.clone() for z in noise]
        self.sampler.step_table(x)  # built (host to device copies) before the capture
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERS):
                self.chain(start, static_x, static_cond, static_noise)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.chain(start, static_x, static_cond, static_noise)
        return graph, static_x, static_cond, static_noise, out


def apply_fast_path(
    sampler: ChunkSampler, policy: DiffusionPolicy, fast_path: str | None, precision: str = "fp32"
) -> ChunkSampler:
    """``accelerate`` when ``fast_path`` is a mode; the sampler unchanged when it is None."""
    check_fast_path(fast_path, precision)
    return sampler if fast_path is None else accelerate(sampler, policy, fast_path, precision)


def accelerate(
    sampler: ChunkSampler,
    policy: DiffusionPolicy,
    mode: str = "graph",
    precision: str = "fp32",
    memo: dict | None = None,
) -> ChunkSampler:
    """Swap the chains of ``sampler`` (in place, also nested chunk samplers) for static chains;
    with ``mode="compile"`` also compile its ``compiled_parts``.

    Streaming's steady-state call has no reverse chain to swap: it takes only ``mode="compile"``
    (fp32), which compiles its ``advance_roll``; its first (cold) call stays eager.
    """
    check_fast_path(mode, precision, optional=False)
    if isinstance(sampler, StreamingChunkSampler) and (mode != "compile" or precision != "fp32"):
        raise ValueError(
            "the streaming sampler's per-action steps take only mode='compile' in fp32 "
            "(graph capture and bf16 cover ddpm, ddim, rti and truncated)"
        )
    if mode == "compile":
        for name in sampler.compiled_parts:
            setattr(sampler, name, torch.compile(getattr(sampler, name), dynamic=False))
    if isinstance(sampler, StreamingChunkSampler):
        return sampler
    memo = {} if memo is None else memo
    for name, value in list(vars(sampler).items()):
        if name in sampler.eager_parts:
            continue
        if isinstance(value, DiffusionSampler):
            if id(value) not in memo:
                memo[id(value)] = StaticChain(value, policy, mode, precision, memo)
            setattr(sampler, name, memo[id(value)])
        elif isinstance(value, ChunkSampler):
            accelerate(value, policy, mode, precision, memo)
    return sampler
