"""Message schemas of the policy-server protocol and their validation (numpy only, no torch).

Every WebSocket message is one binary MessagePack frame holding a map with a ``"type"`` field
(see ``codec`` for arrays). The full specification, with examples, is docs/PROTOCOL.md.

Client -> server: ``infer`` (an observation; answered by ``action``), ``reset`` (answered by
``reset_done``) and ``ping`` (answered by ``pong``). Server -> client: ``metadata`` once after the
handshake, one reply per request in request order, and ``error`` for a request that could not be
served (the connection stays open).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1

# Client -> server message types.
INFER = "infer"
RESET = "reset"
PING = "ping"
# Server -> client message types.
METADATA = "metadata"
ACTION = "action"
RESET_DONE = "reset_done"
PONG = "pong"
ERROR = "error"

# Error codes of ``error`` messages.
BAD_FRAME = "bad_frame"  # not one binary MessagePack object (text frame, truncated, trailing bytes)
BAD_MESSAGE = "bad_message"  # not a map, unknown type, a field of the wrong type
BAD_OBSERVATION = "bad_observation"  # keys, shapes, dtypes or non-finite values
SERVER_ERROR = "server_error"  # inference failed on the server; the request may be retried
ERROR_CODES = (BAD_FRAME, BAD_MESSAGE, BAD_OBSERVATION, SERVER_ERROR)

MAX_ID_LEN = 128
INT64_MAX = 2**63 - 1
OBS_DTYPE_KINDS = "fiu"
"""Observation arrays may be float, signed or unsigned integer; the server casts to float32."""


class ProtocolError(ValueError):
    """A request the server answers with ``{"type": "error", "code": code, ...}``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ServerError(RuntimeError):
    """Raised on the client side when the server answered a request with an ``error`` message."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class InferRequest:
    """``obs``: {key: ndarray} as received (validated later against the observation spec)."""

    id: int | str | None
    obs: Any
    reset: bool = False
    step: int | None = None
    client_time: float | None = None


@dataclass
class ResetRequest:
    id: int | str | None


@dataclass
class PingRequest:
    id: int | str | None
    client_time: float | None = None


Request = InferRequest | ResetRequest | PingRequest


def _is_int(v: Any) -> bool:
    return type(v) is int


def _valid_id(v: Any) -> bool:
    if v is None:
        return True
    if _is_int(v):
        return -INT64_MAX - 1 <= v <= INT64_MAX
    return isinstance(v, str) and len(v) <= MAX_ID_LEN


def request_id_of(message: Any) -> int | str | None:
    """The ``id`` to echo in a reply (None where the message has no valid one)."""
    if isinstance(message, dict) and _valid_id(message.get("id")):
        return message.get("id")
    return None


def _field(message: dict, name: str, check, expected: str, default: Any = None) -> Any:
    if name not in message or message[name] is None:
        return default
    value = message[name]
    if not check(value):
        raise ProtocolError(BAD_MESSAGE, f"field {name!r} must be {expected}, got {value!r:.80}")
    return value


def _finite_number(v: Any) -> bool:
    return (_is_int(v) or type(v) is float) and math.isfinite(v)


def parse_request(message: Any) -> Request:
    """A decoded frame -> typed request. Unknown fields are ignored (forward compatibility)."""
    if not isinstance(message, dict):
        raise ProtocolError(BAD_MESSAGE, f"a message is a map, got {type(message).__name__}")
    kind = message.get("type")
    req_id = _field(message, "id", _valid_id, f"an integer or a string of <= {MAX_ID_LEN} chars")
    if kind == INFER:
        if "obs" not in message:
            raise ProtocolError(BAD_MESSAGE, "an infer message needs an 'obs' map")
        return InferRequest(
            id=req_id,
            obs=message["obs"],
            reset=_field(message, "reset", lambda v: type(v) is bool, "a boolean", False),
            step=_field(
                message,
                "step",
                lambda v: _is_int(v) and 0 <= v <= INT64_MAX,
                "a non-negative integer",
            ),
            client_time=_field(message, "client_time", _finite_number, "a finite number"),
        )
    if kind == RESET:
        return ResetRequest(id=req_id)
    if kind == PING:
        return PingRequest(
            id=req_id,
            client_time=_field(message, "client_time", _finite_number, "a finite number"),
        )
    raise ProtocolError(
        BAD_MESSAGE, f"unknown message type {kind!r:.40}; expected one of {[INFER, RESET, PING]}"
    )


def validate_observation(
    obs: Any, spec: dict[str, tuple[int, ...]], n_obs_steps: int
) -> dict[str, np.ndarray]:
    """Check ``obs`` against ``spec`` {key: shape}; return {key: float32 (k, *shape)}.

    Each value is one step (``shape``) or the k latest steps, oldest first (``(k, *shape)``,
    1 <= k <= To); all keys carry the same k. Values must be numeric and finite in float32.
    """
    if not isinstance(obs, dict):
        raise ProtocolError(
            BAD_MESSAGE, f"'obs' is a map of key -> ndarray, got {type(obs).__name__}"
        )
    missing, unknown = sorted(set(spec) - set(obs)), sorted(set(obs) - set(spec))
    if missing or unknown:
        raise ProtocolError(
            BAD_OBSERVATION,
            f"observation keys must be exactly {sorted(spec)}; "
            f"missing {missing}, unknown {unknown}",
        )
    out: dict[str, np.ndarray] = {}
    n_steps = None
    for key, shape in spec.items():
        a = obs[key]
        if not isinstance(a, np.ndarray):
            raise ProtocolError(
                BAD_OBSERVATION,
                f"observation {key!r} must be an ndarray map, got {type(a).__name__}",
            )
        if a.dtype.kind not in OBS_DTYPE_KINDS:
            raise ProtocolError(
                BAD_OBSERVATION,
                f"observation {key!r} has dtype {a.dtype}; expected a float or integer dtype",
            )
        if a.shape == shape:
            a = a[None]
        elif not (
            a.ndim == len(shape) + 1 and a.shape[1:] == shape and 1 <= a.shape[0] <= n_obs_steps
        ):
            raise ProtocolError(
                BAD_OBSERVATION,
                f"observation {key!r} has shape {list(a.shape)}; expected "
                f"{list(shape)} or [k, {', '.join(map(str, shape))}] with "
                f"1 <= k <= {n_obs_steps}",
            )
        if n_steps is not None and a.shape[0] != n_steps:
            raise ProtocolError(
                BAD_OBSERVATION, "all observation keys must carry the same number of steps"
            )
        n_steps = a.shape[0]
        with np.errstate(over="ignore", invalid="ignore"):
            a32 = a.astype(np.float32)
        if not np.isfinite(a32).all():
            raise ProtocolError(
                BAD_OBSERVATION,
                f"observation {key!r} has non-finite values (NaN, inf, or beyond float32 range)",
            )
        out[key] = a32
    return out


def error_message(code: str, message: str, req_id: int | str | None = None) -> dict[str, Any]:
    return {"type": ERROR, "id": req_id, "code": code, "message": message}


def expect_reply(message: Any, expected_type: str, req_id: int | str | None) -> dict[str, Any]:
    """Client side: check a reply's type and id; an ``error`` reply raises ServerError."""
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError(BAD_MESSAGE, "the server sent a message that is not a typed map")
    if message["type"] == ERROR:
        raise ServerError(str(message.get("code")), str(message.get("message")))
    if message["type"] != expected_type:
        raise ProtocolError(
            BAD_MESSAGE, f"expected a {expected_type!r} reply, got {message['type']!r}"
        )
    if message.get("id") != req_id:
        raise ProtocolError(
            BAD_MESSAGE, f"reply id {message.get('id')!r} does not match request id {req_id!r}"
        )
    return message
