"""Client library for the policy server: numpy + msgpack + websockets only (no torch).

    from dppo.serving.client import connect
    with connect("ws://127.0.0.1:8765", token=None) as client:
        print(client.metadata["n_action_steps"])
        result = client.infer({"state": obs}, reset=True)     # obs: (6,) or (k, 6) history
        execute(result.actions)                                # (Ta, Da) float32
        client.reset()                                         # new episode

``connect`` gives a blocking client (one request at a time); ``connect_async`` an asyncio one.
A refused handshake (wrong token: HTTP 401) raises ``websockets.exceptions.InvalidStatus``; an
``error`` reply raises ``ServerError`` with the server's code and message.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection as AsyncConnection
from websockets.asyncio.client import connect as ws_connect_async
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from dppo.serving import protocol as P
from dppo.serving.codec import DEFAULT_MAX_BYTES, pack, unpack

DEFAULT_OPEN_TIMEOUT_S = 10.0
MS_PER_S = 1e3


@dataclass
class InferResult:
    """One ``action`` reply. actions: (Ta, Da) to execute from control step ``step`` on.

    rtt_ms: client-measured round trip. inference_ms: the forward batch on the server (shared by
    its ``batch_size`` requests); queue_ms: wait before it; server_ms: receipt to reply.
    """

    actions: np.ndarray
    step: int
    nfe: int
    rtt_ms: float
    inference_ms: float
    queue_ms: float
    server_ms: float
    batch_size: int
    server_time: float


def _headers(token: str | None) -> dict[str, str] | None:
    return None if token is None else {"Authorization": f"Bearer {token}"}


def _wire_obs(obs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Arrays to send: floats as float32 (what the server computes in), integers unchanged."""
    out = {}
    for k, v in obs.items():
        a = np.asarray(v)
        out[k] = np.ascontiguousarray(a, dtype=np.float32 if a.dtype.kind == "f" else a.dtype)
    return out


def _infer_message(req_id: int, obs: dict[str, Any], reset: bool, step: int | None) -> bytes:
    message = {
        "type": P.INFER,
        "id": req_id,
        "obs": _wire_obs(obs),
        "reset": reset,
        "client_time": time.time(),
    }
    if step is not None:
        message["step"] = int(step)
    return pack(message)


def _infer_result(reply: dict[str, Any], sent: float) -> InferResult:
    timing = reply["timing"]
    return InferResult(
        actions=np.asarray(reply["actions"], dtype=np.float32),
        step=int(reply["step"]),
        nfe=int(reply["nfe"]),
        rtt_ms=(time.perf_counter() - sent) * MS_PER_S,
        inference_ms=float(timing["inference_ms"]),
        queue_ms=float(timing["queue_ms"]),
        server_ms=float(timing["server_ms"]),
        batch_size=int(timing["batch_size"]),
        server_time=float(timing["server_time"]),
    )


def _metadata(frame: bytes | str, max_bytes: int) -> dict[str, Any]:
    if isinstance(frame, str):
        raise P.ProtocolError(P.BAD_FRAME, "the server sent a text frame")
    meta = P.expect_reply(unpack(frame, max_bytes), P.METADATA, None)
    if meta.get("protocol_version") != P.PROTOCOL_VERSION:
        raise P.ProtocolError(
            P.BAD_MESSAGE,
            f"server speaks protocol version "
            f"{meta.get('protocol_version')}, this client "
            f"{P.PROTOCOL_VERSION}",
        )
    return meta


class PolicyClient:
    """Blocking client over one connection (one session on the server). Not thread-safe."""

    def __init__(self, ws: ClientConnection, metadata: dict[str, Any], max_message_bytes: int):
        self.ws = ws
        self.metadata = metadata
        self.max_message_bytes = max_message_bytes
        self._ids = itertools.count()

    def _call(
        self, frame: bytes, req_id: int, expected: str, timeout: float | None
    ) -> dict[str, Any]:
        self.ws.send(frame)
        reply = self.ws.recv(timeout=timeout)
        if isinstance(reply, str):
            raise P.ProtocolError(P.BAD_FRAME, "the server sent a text frame")
        return P.expect_reply(unpack(reply, self.max_message_bytes), expected, req_id)

    def infer(
        self,
        obs: dict[str, Any],
        *,
        reset: bool = False,
        step: int | None = None,
        timeout: float | None = None,
    ) -> InferResult:
        """obs {key: (*shape) or (k, *shape)} -> the next Ta actions (see InferResult)."""
        req_id = next(self._ids)
        sent = time.perf_counter()
        reply = self._call(_infer_message(req_id, obs, reset, step), req_id, P.ACTION, timeout)
        return _infer_result(reply, sent)

    def reset(self, timeout: float | None = None) -> None:
        """Start a new episode: the server forgets this session's history and warm-start state."""
        req_id = next(self._ids)
        self._call(pack({"type": P.RESET, "id": req_id}), req_id, P.RESET_DONE, timeout)

    def ping(self, timeout: float | None = None) -> float:
        """Round trip of a ``ping`` in ms."""
        req_id = next(self._ids)
        sent = time.perf_counter()
        self._call(pack({"type": P.PING, "id": req_id}), req_id, P.PONG, timeout)
        return (time.perf_counter() - sent) * MS_PER_S

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(
    url: str,
    *,
    token: str | None = None,
    open_timeout: float = DEFAULT_OPEN_TIMEOUT_S,
    max_message_bytes: int = DEFAULT_MAX_BYTES,
) -> PolicyClient:
    """Open a session on the server at ``url`` (ws://host:port) and read its metadata."""
    ws = ws_connect(
        url,
        additional_headers=_headers(token),
        open_timeout=open_timeout,
        max_size=max_message_bytes,
        compression=None,
        proxy=None,
    )
    try:
        meta = _metadata(ws.recv(timeout=open_timeout), max_message_bytes)
    except BaseException:
        ws.close()
        raise
    return PolicyClient(ws, meta, max_message_bytes)


class AsyncPolicyClient:
    """asyncio twin of PolicyClient (one request at a time per client)."""

    def __init__(self, ws: AsyncConnection, metadata: dict[str, Any], max_message_bytes: int):
        self.ws = ws
        self.metadata = metadata
        self.max_message_bytes = max_message_bytes
        self._ids = itertools.count()

    async def _call(self, frame: bytes, req_id: int, expected: str) -> dict[str, Any]:
        await self.ws.send(frame)
        reply = await self.ws.recv()
        if isinstance(reply, str):
            raise P.ProtocolError(P.BAD_FRAME, "the server sent a text frame")
        return P.expect_reply(unpack(reply, self.max_message_bytes), expected, req_id)

    async def infer(
        self, obs: dict[str, Any], *, reset: bool = False, step: int | None = None
    ) -> InferResult:
        req_id = next(self._ids)
        sent = time.perf_counter()
        reply = await self._call(_infer_message(req_id, obs, reset, step), req_id, P.ACTION)
        return _infer_result(reply, sent)

    async def reset(self) -> None:
        req_id = next(self._ids)
        await self._call(pack({"type": P.RESET, "id": req_id}), req_id, P.RESET_DONE)

    async def close(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> AsyncPolicyClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def connect_async(
    url: str,
    *,
    token: str | None = None,
    open_timeout: float = DEFAULT_OPEN_TIMEOUT_S,
    max_message_bytes: int = DEFAULT_MAX_BYTES,
) -> AsyncPolicyClient:
    """asyncio version of ``connect``."""
    ws = await ws_connect_async(
        url,
        additional_headers=_headers(token),
        open_timeout=open_timeout,
        max_size=max_message_bytes,
        compression=None,
        proxy=None,
    )
    try:
        meta = _metadata(await ws.recv(), max_message_bytes)
    except BaseException:
        await ws.close()
        raise
    return AsyncPolicyClient(ws, meta, max_message_bytes)
