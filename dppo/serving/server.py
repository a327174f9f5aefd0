"""Asyncio WebSocket policy server: sessions, validation, batching, auth, health check.

One ``PolicyRuntime`` serves every connection. Each connection is a ``Session`` with its own
observation history (To steps) and its own sampler state (warm-start chunk, streaming buffer:
tensors with a leading batch dimension of 1). Requests that arrive together are gathered by a
batching task (until ``max_batch`` requests, every connected session, or ``batch_window_ms``)
and go through ONE ``runtime.act`` call on a worker thread: their histories are stacked to
(B, To, ...) and their sampler states concatenated to batch B, then split back. The event loop
never runs inference. Wire protocol: docs/PROTOCOL.md.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import torch
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from dppo.serving import protocol as P
from dppo.serving.codec import DEFAULT_MAX_BYTES, CodecError, pack, unpack
from policies.checkpoint import load_policy
from policies.chunk_samplers import SamplerState, build_chunk_sampler
from policies.gpu import apply_fast_path, check_fast_path
from policies.history import ObsHistory
from policies.runtime import PolicyRuntime

logger = logging.getLogger("dppo.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
HEALTH_PATH = "/healthz"
CLOSE_TRY_AGAIN_LATER = 1013  # WebSocket close code: the server is at max_sessions
SERVER_NAME = "dppo-policy-server"
CLOSE_TIMEOUT_S = 2.0  # how long a closing handshake may take before the TCP connection is cut
MS_PER_S = 1e3


@dataclass
class ServerConfig:
    """Network, batching and limit settings (see cfg/serve.yaml for their meaning)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None
    max_batch: int = 16
    batch_window_ms: float = 2.0
    max_message_bytes: int = DEFAULT_MAX_BYTES
    max_sessions: int = 64
    control_freq: float | None = None

    def __post_init__(self):
        if self.max_batch < 1 or self.max_sessions < 1 or self.max_message_bytes < 1:
            raise ValueError("max_batch, max_sessions and max_message_bytes must all be >= 1")
        if self.batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {self.batch_window_ms}")
        if self.token is not None and not self.token:
            raise ValueError("token must be a non-empty string (or null for no auth)")


@dataclass
class Session:
    """One connection's state: observation history, sampler state, infer count since reset."""

    id: str
    history: ObsHistory
    state: SamplerState
    n_infer: int = 0


@dataclass
class _Pending:
    """A validated infer request waiting for the batching task. ``obs``: {key: (1, To, ...)}."""

    session: Session
    obs: dict[str, np.ndarray]
    future: asyncio.Future
    received: float  # time.perf_counter() when the frame was read


@dataclass
class _Served:
    actions: np.ndarray  # (Ta, Da)
    nfe: int
    inference_ms: float
    queue_ms: float
    batch_size: int


@dataclass
class ServerStats:
    connections: int = 0
    requests: int = 0
    infer_requests: int = 0
    batches: int = 0
    errors: int = 0
    batch_sizes: list[int] = field(default_factory=list)


def stack_states(states: Sequence[SamplerState]) -> SamplerState:
    """Per-session states (each tensor (1, ...)) -> one batched state (B, ...)."""
    return {k: torch.cat([s[k] for s in states]) for k in states[0]}


def split_state(state: SamplerState, n: int) -> list[SamplerState]:
    """Batched state (B, ...) -> B per-session states (1, ...), each owning its memory."""
    return [{k: v[i : i + 1].clone() for k, v in state.items()} for i in range(n)]


def state_signature(state: SamplerState) -> tuple:
    """Sessions whose states share keys, trailing shapes and dtypes can be batched together."""
    return tuple(sorted((k, tuple(v.shape[1:]), str(v.dtype)) for k, v in state.items()))


class PolicyServer:
    """Serves ``runtime`` over WebSocket; ``start()`` binds, ``close()`` shuts down cleanly."""

    def __init__(self, runtime: PolicyRuntime, cfg: ServerConfig | None = None):
        self.runtime = runtime
        self.cfg = cfg or ServerConfig()
        pcfg = runtime.cfg
        self.obs_spec = {k: tuple(pcfg.obs_shapes[k]) for k in runtime.policy.obs_keys}
        self.stats = ServerStats()
        self._sessions: dict[str, Session] = {}
        self._ids = itertools.count()
        self._pending: list[_Pending] = []
        self._arrived = asyncio.Event()
        # torch's intra-op thread count is per OS thread under OpenMP: carry the caller's setting
        # into the inference thread, which would otherwise use every core.
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="dppo-infer",
            initializer=torch.set_num_threads,
            initargs=(torch.get_num_threads(),),
        )
        self._ws: Server | None = None
        self._batcher: asyncio.Task | None = None

    # ---------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._ws is None:
            raise RuntimeError("the server is not started")
        return self._ws.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://{self.cfg.host}:{self.port}"

    @property
    def n_sessions(self) -> int:
        return len(self._sessions)

    def metadata(self, session: Session) -> dict[str, Any]:
        pcfg = self.runtime.cfg
        return {
            "type": P.METADATA,
            "protocol_version": P.PROTOCOL_VERSION,
            "server": SERVER_NAME,
            "session_id": session.id,
            "task": pcfg.task,
            "policy_type": pcfg.policy_type,
            "obs_spec": {
                k: {"shape": list(s), "dtype": "float32"} for k, s in self.obs_spec.items()
            },
            "action_spec": {"shape": [pcfg.n_action_steps, pcfg.action_dim], "dtype": "float32"},
            "n_obs_steps": pcfg.n_obs_steps,
            "horizon": pcfg.horizon,
            "n_action_steps": pcfg.n_action_steps,
            "control_freq": self.cfg.control_freq,
            "sampler": self.runtime.sampler.describe(),
            "limits": {
                "max_message_bytes": self.cfg.max_message_bytes,
                "max_batch": self.cfg.max_batch,
                "max_sessions": self.cfg.max_sessions,
            },
            "auth_required": self.cfg.token is not None,
        }

    # ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._ws = await serve(
            self._handle,
            self.cfg.host,
            self.cfg.port,
            process_request=self._process_request,
            max_size=self.cfg.max_message_bytes,
            compression=None,  # action chunks are small; deflate only adds latency
            close_timeout=CLOSE_TIMEOUT_S,
        )
        self._batcher = asyncio.create_task(self._batch_loop(), name="dppo-batcher")
        logger.info("serving %s policy on %s", self.runtime.cfg.task, self.url)

    async def close(self) -> None:
        """Stop listening, close open connections (code 1001), then stop the batcher and worker."""
        if self._ws is not None:
            self._ws.close()
            await self._ws.wait_closed()
        if self._batcher is not None:
            self._batcher.cancel()
            await asyncio.gather(self._batcher, return_exceptions=True)
        self._executor.shutdown(wait=True)

    # ---------------------------------------------------------------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == HEALTH_PATH:
            return connection.respond(HTTPStatus.OK, "ok\n")
        if self.cfg.token is not None and not self._authorized(request, url.query):
            return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
        return None

    def _authorized(self, request: Request, query: str) -> bool:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            presented = header.removeprefix("Bearer ")
        else:
            presented = parse_qs(query).get("token", [""])[0]
        return hmac.compare_digest(presented.encode(), self.cfg.token.encode())

    def _new_state(self) -> SamplerState:
        return self.runtime.sampler.init_state(self.runtime.policy, 1, self.runtime.device)

    async def _handle(self, ws: ServerConnection) -> None:
        if len(self._sessions) >= self.cfg.max_sessions:
            await ws.close(CLOSE_TRY_AGAIN_LATER, "server full: too many sessions")
            return
        session = Session(
            f"s{next(self._ids)}", ObsHistory(self.runtime.cfg.n_obs_steps), self._new_state()
        )
        self._sessions[session.id] = session
        self.stats.connections += 1
        try:
            await ws.send(pack(self.metadata(session)))
            async for frame in ws:
                await ws.send(pack(await self._reply(session, frame)))
        except ConnectionClosed:
            pass
        finally:
            del self._sessions[session.id]

    async def _reply(self, session: Session, frame: bytes | str) -> dict[str, Any]:
        received = time.perf_counter()
        self.stats.requests += 1
        message = None
        try:
            if isinstance(frame, str):
                raise P.ProtocolError(
                    P.BAD_FRAME,
                    "text frames are not accepted: send each "
                    "message as one binary MessagePack frame",
                )
            try:
                message = unpack(frame, self.cfg.max_message_bytes)
            except CodecError as exc:
                raise P.ProtocolError(P.BAD_FRAME, str(exc)) from None
            request = P.parse_request(message)
            if isinstance(request, P.InferRequest):
                return await self._infer(session, request, received)
            if isinstance(request, P.ResetRequest):
                self._reset(session)
                return {"type": P.RESET_DONE, "id": request.id}
            return {
                "type": P.PONG,
                "id": request.id,
                "server_time": time.time(),
                "client_time": request.client_time,
            }
        except P.ProtocolError as exc:
            self.stats.errors += 1
            return P.error_message(exc.code, exc.message, P.request_id_of(message))

    def _reset(self, session: Session) -> None:
        session.history = ObsHistory(self.runtime.cfg.n_obs_steps)
        session.state = self._new_state()
        session.n_infer = 0

    async def _infer(
        self, session: Session, req: P.InferRequest, received: float
    ) -> dict[str, Any]:
        obs = P.validate_observation(req.obs, self.obs_spec, self.runtime.cfg.n_obs_steps)
        n_steps = next(iter(obs.values())).shape[0]
        if req.reset or session.history.is_empty:
            self._reset(session)
            session.history.reset({k: v[:1] for k, v in obs.items()})
            first = 1
        else:
            first = 0
        for i in range(first, n_steps):
            session.history.push({k: v[i : i + 1] for k, v in obs.items()})
        step = req.step if req.step is not None else session.n_infer
        session.n_infer += 1
        self.stats.infer_requests += 1
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(session, session.history.stacked(), future, received))
        self._arrived.set()
        try:
            served: _Served = await future
        except Exception as exc:  # inference failed: report it, keep the connection
            self.stats.errors += 1
            return P.error_message(P.SERVER_ERROR, f"inference failed: {exc}", req.id)
        return {
            "type": P.ACTION,
            "id": req.id,
            "actions": served.actions,
            "step": step,
            "nfe": served.nfe,
            "timing": {
                "inference_ms": served.inference_ms,
                "queue_ms": served.queue_ms,
                "server_ms": (time.perf_counter() - received) * MS_PER_S,
                "batch_size": served.batch_size,
                "server_time": time.time(),
                "client_time": req.client_time,
            },
        }

    # ---------------------------------------------------------------------------------------
    def _batch_target(self) -> int:
        """How many requests are worth waiting for: each session has at most one in flight."""
        return max(1, min(self.cfg.max_batch, len(self._sessions)))

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        window = self.cfg.batch_window_ms / MS_PER_S
        while True:
            await self._arrived.wait()
            deadline = loop.time() + window
            while len(self._pending) < self._batch_target():
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            batch = self._pending[: self.cfg.max_batch]
            self._pending = self._pending[self.cfg.max_batch :]
            if not self._pending:
                self._arrived.clear()
            if not batch:
                continue
            try:
                served = await loop.run_in_executor(self._executor, self._infer_batch, batch)
            except Exception as exc:
                logger.exception("inference failed for a batch of %d", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, s in zip(batch, served, strict=True):
                if not p.future.done():
                    p.future.set_result(s)

    def _infer_batch(self, batch: list[_Pending]) -> list[_Served]:
        """Worker thread: one ``runtime.act`` per group of batch-compatible sampler states."""
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(batch):
            groups.setdefault(state_signature(p.session.state), []).append(i)
        served: list[_Served | None] = [None] * len(batch)
        rt = self.runtime
        saved_state, saved_streams = rt.state, rt.n_streams
        try:
            for idx in groups.values():
                items = [batch[i] for i in idx]
                start = time.perf_counter()
                obs = {k: np.concatenate([p.obs[k] for p in items]) for k in items[0].obs}
                rt.state, rt.n_streams = stack_states([p.session.state for p in items]), len(items)
                result = rt.act(obs)
                for j, state in enumerate(split_state(rt.state, len(items))):
                    items[j].session.state = state
                    served[idx[j]] = _Served(
                        actions=result.actions[j],
                        nfe=result.nfe,
                        inference_ms=result.ms,
                        queue_ms=(start - items[j].received) * MS_PER_S,
                        batch_size=len(items),
                    )
                self.stats.batches += 1
                self.stats.batch_sizes.append(len(items))
        finally:
            rt.state, rt.n_streams = saved_state, saved_streams
        return served


# -------------------------------------------------------------------------------------------
class ServerThread:
    """Runs a PolicyServer on its own event loop in a background thread (tests, benchmarks).

    ``with ServerThread(server) as s: connect(s.url)``; leaving the block shuts it down cleanly.
    """

    START_TIMEOUT_S = 30.0

    def __init__(self, server: PolicyServer):
        self.server = server
        self._thread = threading.Thread(target=self._run, name="dppo-server", daemon=True)
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return self.server.url

    def _run(self) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.server.start()
            except BaseException as exc:  # e.g. the port is taken: reported by __enter__
                self._error = exc
                return
            finally:
                self._started.set()
            await self._stop.wait()
            await self.server.close()

        asyncio.run(main())

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._started.wait(self.START_TIMEOUT_S) or self._error is not None:
            raise RuntimeError(f"policy server failed to start: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_until_signal(server: PolicyServer, announce=print) -> ServerStats:
    """Serve until SIGINT or SIGTERM, then shut down cleanly; returns the server's counters."""

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        announce(
            f"serving {server.runtime.cfg.task} policy on {server.url} "
            f"(health: http://{server.cfg.host}:{server.port}{HEALTH_PATH})"
        )
        await stop.wait()
        announce("shutting down")
        await server.close()

    asyncio.run(main())
    return server.stats


# -------------------------------------------------------------------------------------------
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def load_runtime(
    checkpoint: str,
    sampler: dict[str, Any],
    seed: int = 0,
    device: str = "cpu",
    fast_path: str | None = None,
    precision: str = "fp32",
) -> PolicyRuntime:
    """A one-stream runtime for a safetensors checkpoint; pickled files are refused outright.

    ``sampler``: {"name": ..., **options} as in cfg/sampler/*.yaml. ``fast_path`` / ``precision``:
    ``policies.gpu.apply_fast_path`` (CUDA graphs, compiled chains, bf16).
    """
    check_fast_path(fast_path, precision)
    path = Path(checkpoint)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path}: the server loads only safetensors checkpoints (a run folder, a checkpoint "
            f"folder with policy.json + model.safetensors, or that model.safetensors); pickled "
            f"files ({', '.join(PICKLE_SUFFIXES)}) are never loaded"
        )
    policy = load_policy(path, device=device)
    options = dict(sampler)
    chunk_sampler = apply_fast_path(
        build_chunk_sampler(options.pop("name"), policy, **options), policy, fast_path, precision
    )
    return PolicyRuntime(policy, chunk_sampler, 1, seed=seed, device=device)


def task_control_freq(task: str) -> float | None:
    """The registered task's control frequency (Hz), or None for a task this install lacks."""
    import envs

    try:
        return float(envs.get_task(task).control_freq)
    except KeyError:
        return None


def serve_command(cfg) -> dict[str, Any]:
    """``dppo serve``: load the checkpoint, serve until SIGINT/SIGTERM, return the counters."""
    from omegaconf import OmegaConf

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(cfg.threads)
    runtime = load_runtime(
        cfg.checkpoint,
        OmegaConf.to_container(cfg.sampler),
        cfg.seed,
        cfg.device,
        cfg.fast_path,
        cfg.precision,
    )
    control_freq = cfg.control_freq or task_control_freq(runtime.cfg.task)
    server = PolicyServer(
        runtime,
        ServerConfig(
            host=cfg.host,
            port=cfg.port,
            token=None if cfg.token is None else str(cfg.token),
            max_batch=cfg.max_batch,
            batch_window_ms=cfg.batch_window_ms,
            max_message_bytes=cfg.max_message_bytes,
            max_sessions=cfg.max_sessions,
            control_freq=control_freq,
        ),
    )
    try:
        stats = run_until_signal(server, announce=lambda line: print(line, flush=True))
    except OSError as exc:  # typically the port is taken
        raise ValueError(f"cannot serve on {cfg.host}:{cfg.port}: {exc}") from None
    sizes = stats.batch_sizes
    return {
        "connections": stats.connections,
        "requests": stats.requests,
        "infer_requests": stats.infer_requests,
        "errors": stats.errors,
        "forward_batches": stats.batches,
        "mean_batch_size": float(np.mean(sizes)) if sizes else 0.0,
    }
