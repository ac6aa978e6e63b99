"""Wire format shared by the server and the remote client: msgpack with raw numpy arrays.

In ``application/msgpack`` bodies and WebSocket frames every array is a map
``{"dtype": "<f8", "shape": [N, 3], "data": <N*3*8 raw little-endian bytes>}`` instead of nested
lists, so no float is formatted or parsed one by one. ``unpackb`` turns such maps back into
numpy arrays; anything else (numbers, strings, nested lists) passes through unchanged.
This module needs only numpy and msgpack, so the client never imports the server's stack.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

MSGPACK = "application/msgpack"
JSON = "application/json"
ARRAY_KEYS = frozenset({"dtype", "shape", "data"})
ARRAY_DTYPES = {"<f8": np.float64, "<f4": np.float32, "<i8": np.int64, "<i4": np.int32}
MAX_ARRAY_DIMS = 4


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """A numpy array as the raw-bytes map (floats as <f8, integers as <i8)."""
    array = np.asarray(array)
    wire_dtype = "<i8" if np.issubdtype(array.dtype, np.integer) else "<f8"
    data = np.ascontiguousarray(array, dtype=ARRAY_DTYPES[wire_dtype]).tobytes()
    return {"dtype": wire_dtype, "shape": list(array.shape), "data": data}


def decode_array(obj: dict[str, Any]) -> np.ndarray:
    """The raw-bytes map back to a numpy array; ``ValueError`` if dtype, shape and size disagree."""
    dtype = obj["dtype"]
    if dtype not in ARRAY_DTYPES:
        raise ValueError(f"array dtype {dtype!r} not supported; use one of {sorted(ARRAY_DTYPES)}")
    shape = obj["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_ARRAY_DIMS
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise ValueError(f"array shape must be a list of at most {MAX_ARRAY_DIMS} non-negative integers, got {shape!r}")
    data = obj["data"]
    itemsize = np.dtype(ARRAY_DTYPES[dtype]).itemsize
    if not isinstance(data, bytes) or len(data) != math.prod(shape) * itemsize:
        size = len(data) if isinstance(data, bytes) else type(data).__name__
        raise ValueError(f"array data must be {math.prod(shape) * itemsize} raw bytes for shape {shape}, got {size}")
    return np.frombuffer(data, dtype=ARRAY_DTYPES[dtype]).reshape(shape)


def _default(obj: Any) -> Any:
    """msgpack fallback: numpy arrays as raw-bytes maps, numpy scalars as Python numbers."""
    if isinstance(obj, np.ndarray):
        return encode_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__} as msgpack")


def _object_hook(obj: dict[Any, Any]) -> Any:
    """Raw-bytes array maps become numpy arrays while unpacking."""
    return decode_array(obj) if obj.keys() == ARRAY_KEYS else obj


def packb(obj: Any) -> bytes:
    """Encode ``obj`` (dicts, lists, numbers, strings, numpy arrays) as msgpack."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


# Container caps: a body of millions of empty maps would otherwise cost GBs and seconds to decode.
MAX_ARRAY_LEN = 1 << 18  # list items (positions as nested lists: one item per atom)
MAX_MAP_LEN = 64  # keys of one map


def unpackb(data: bytes) -> Any:
    """Decode msgpack; raw-bytes array maps come back as numpy arrays. ``ValueError`` if malformed."""
    try:
        return msgpack.unpackb(
            data, raw=False, object_hook=_object_hook, strict_map_key=True,
            max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN,
        )
    except Exception as err:  # msgpack raises several unrelated types (ExtraData, FormatError, TypeError ...)
        raise ValueError(f"invalid msgpack: {err}") from err
