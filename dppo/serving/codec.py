"""MessagePack frames with explicitly encoded numpy arrays (never pickle).

An array travels as the map ``{"__ndarray__": True, "dtype": "float32", "shape": [2, 6],
"data": <bin, little-endian, C order>}``. Decoding checks the dtype against a whitelist, the
shape, and that the byte count equals ``prod(shape) * itemsize`` before any array is built.
Only numpy and msgpack are imported here.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

NDARRAY_TAG = "__ndarray__"
NDARRAY_FIELDS = frozenset({NDARRAY_TAG, "dtype", "shape", "data"})
DTYPES = frozenset(
    {
        "bool",
        "uint8",
        "int8",
        "uint16",
        "int16",
        "uint32",
        "int32",
        "uint64",
        "int64",
        "float16",
        "float32",
        "float64",
    }
)
"""dtype names that may cross the wire (numpy names; bytes are always little-endian)."""
MAX_NDIM = 8
DEFAULT_MAX_BYTES = 2**20
MAX_CONTAINER_LEN = 4096
"""Most items of one msgpack array or map: protocol messages are small maps."""


class CodecError(ValueError):
    """A frame that is not a well-formed MessagePack message of this protocol."""


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """numpy array -> the wire map (dtype name, shape list, little-endian C-order bytes)."""
    a = np.asarray(a)
    if a.dtype.name not in DTYPES:
        raise TypeError(f"dtype {a.dtype} cannot be sent; allowed dtypes: {sorted(DTYPES)}")
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return {NDARRAY_TAG: True, "dtype": a.dtype.name, "shape": list(a.shape), "data": a.tobytes()}


def decode_array(m: dict[str, Any]) -> np.ndarray:
    """The wire map -> a new writable numpy array; malformed maps raise CodecError."""
    if set(m) != NDARRAY_FIELDS or m[NDARRAY_TAG] is not True:
        raise CodecError(f"an ndarray map has exactly the fields {sorted(NDARRAY_FIELDS)}")
    dtype, shape, data = m["dtype"], m["shape"], m["data"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CodecError(f"ndarray dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise CodecError(f"ndarray shape must be a list of at most {MAX_NDIM} sizes")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise CodecError(f"ndarray shape must hold non-negative integers, got {shape!r}")
    if not isinstance(data, bytes):
        raise CodecError("ndarray data must be MessagePack bin (raw bytes)")
    wire = np.dtype(dtype).newbyteorder("<")
    expected = math.prod(shape) * wire.itemsize
    if len(data) != expected:
        raise CodecError(
            f"ndarray data has {len(data)} bytes; dtype {dtype} and shape {shape} need {expected}"
        )
    return np.frombuffer(data, dtype=wire).reshape(shape).astype(np.dtype(dtype))


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return encode_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode an object of type {type(obj).__name__}")


def _object_hook(m: dict[str, Any]) -> Any:
    return decode_array(m) if NDARRAY_TAG in m else m


def pack(message: Any) -> bytes:
    """Message (maps, lists, scalars, strings, bytes, numpy arrays) -> one binary frame."""
    return msgpack.packb(message, default=_default, use_bin_type=True)


def unpack(frame: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """One binary frame -> message, arrays decoded. Anything malformed raises CodecError.

    The frame must hold exactly one MessagePack object (trailing bytes are an error), map keys
    must be strings, and extension types (timestamps included) are refused.
    """
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise CodecError(f"a frame is bytes, got {type(frame).__name__}")
    if len(frame) > max_bytes:
        raise CodecError(f"frame of {len(frame)} bytes exceeds the limit of {max_bytes}")
    try:
        return msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_hook=_object_hook,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN,
            max_ext_len=0,
        )
    except CodecError:
        raise
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        name = type(exc).__name__
        raise CodecError(f"not a single well-formed MessagePack object ({name}: {exc})") from None
