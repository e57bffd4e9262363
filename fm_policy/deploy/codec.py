"""Wire format of the policy server: msgpack with numpy arrays encoded explicitly, never pickle.

Why msgpack and not pickle (what LeRobot's async inference sends): unpickling runs arbitrary code, so a pickle
endpoint hands the robot's computer to anyone who can reach the port. msgpack only ever yields plain data
(dicts, lists, strings, numbers, bytes), is readable from C++/Rust/Go controllers, and moves large arrays as one
`bin` blob (no per-element cost). The array encoding follows openpi's `msgpack_numpy` convention so clients of
either stack are easy to port:

    ndarray      -> {"__ndarray__": True, "data": <raw bytes, C order>, "dtype": "<f4", "shape": [2, 20]}
    numpy scalar -> {"__npgeneric__": True, "data": <raw bytes>, "dtype": "<f8"}

openpi's own `msgpack_numpy` writes the tag maps with *bytes* keys (`b"__ndarray__"`, `b"data"`, ...) and numpy scalars
with a plain number as `data`; `unpackb` reads both spellings, and `packb(..., openpi=True)` writes the bytes-key
spelling that openpi's decoder (`openpi_client.msgpack_numpy.unpackb`) turns back into arrays.

Decoding is bounded: a frame may hold at most `MAX_CONTAINERS` maps and lists, each of at most `MAX_CONTAINER_LEN`
entries (a real request has a handful), so a small frame of millions of empty lists is refused after a few thousand
objects instead of allocating hundreds of MiB on the server. Error texts never echo more than a short prefix of
what was received (`short_repr`).

Object, void (structured) and complex dtypes are refused on both sides: object arrays cannot be rebuilt without
pickle, and no policy input or output is structured or complex, so accepting them only widens the attack surface.
Decoding checks that the byte count matches dtype x shape before touching the buffer, so a lying header is a
clear `CodecError`, not a numpy exception deep inside the server.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

__all__ = ["MAX_CONTAINERS", "MAX_CONTAINER_LEN", "MAX_NDIM", "CodecError", "check_dtype", "packb", "short_repr",
           "unpackb"]

MAX_NDIM = 32  # numpy's own limit is 64; no observation needs more than a handful
MAX_CONTAINERS = 4096  # maps + lists in one frame (a request with K observation keys has about 2 K + 3)
MAX_CONTAINER_LEN = 4096  # entries of one map or list
_SHORT = 60  # characters of received text an error message may quote
_REFUSED_KINDS = {"O": "object", "V": "void/structured", "c": "complex"}


class CodecError(ValueError):
    """A value cannot be encoded, or received bytes are not a valid message (the text says which part and why)."""


def short_repr(value: Any, limit: int = _SHORT) -> str:
    """repr() of received data cut to `limit` characters: error replies and logs never echo attacker input at length."""
    if isinstance(value, (list, tuple)) and len(value) > 8:
        text = f"{type(value).__name__} of {len(value)} items starting {value[:4]!r}"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_dtype(dtype: np.dtype | str) -> np.dtype:
    """The numpy dtype for `dtype`, or CodecError if it is malformed or of a refused kind."""
    if not isinstance(dtype, (str, np.dtype)) or (isinstance(dtype, str) and len(dtype) > 16):
        raise CodecError(f"unknown dtype {short_repr(dtype)}")
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"unknown dtype {short_repr(dtype)} ({short_repr(str(exc))})") from None
    if dt.kind in _REFUSED_KINDS or dt.fields is not None or dt.subdtype is not None:
        kind = _REFUSED_KINDS.get(dt.kind, "structured/sub-array")
        raise CodecError(f"dtype {dt.str!r} ({kind}) is not allowed on the wire; send numeric or bool arrays")
    return dt


def _encode(obj: Any) -> Any:
    """msgpack `default` hook: numpy arrays/scalars (and torch tensors, converted on the CPU) become tagged maps."""
    if type(obj).__module__ == "torch" and hasattr(obj, "detach"):  # no torch import for numpy-only clients
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        dt = check_dtype(obj.dtype)
        return {"__ndarray__": True, "data": np.ascontiguousarray(obj).tobytes(), "dtype": dt.str,
                "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        dt = check_dtype(obj.dtype)
        return {"__npgeneric__": True, "data": obj.tobytes(), "dtype": dt.str}
    raise CodecError(f"cannot encode {type(obj).__name__!r}; send dicts, lists, str, numbers, bytes or numpy arrays")


def _encode_openpi(obj: Any) -> Any:
    """The same tags in openpi's spelling: bytes keys, a numpy scalar's value as a plain number."""
    tagged = _encode(obj)
    if "__npgeneric__" in tagged:
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": tagged["dtype"]}
    return {k.encode(): v for k, v in tagged.items()}


def _field(obj: dict, name: str, raw: bool) -> Any:
    return obj.get(name.encode() if raw else name)


def _decode(obj: dict[Any, Any]) -> Any:
    """msgpack `object_hook`: tagged maps (str or openpi's bytes keys) back into numpy, every header field checked."""
    raw = b"__ndarray__" in obj or b"__npgeneric__" in obj
    if "__ndarray__" in obj or b"__ndarray__" in obj:
        dt, data = check_dtype(_field(obj, "dtype", raw)), _field(obj, "data", raw)
        shape = _field(obj, "shape", raw)
        if not isinstance(data, bytes):
            raise CodecError("ndarray 'data' must be bytes")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise CodecError(f"ndarray 'shape' must be a list of at most {MAX_NDIM} non-negative ints, "
                             f"got {short_repr(shape)}")
        expected = math.prod(shape) * dt.itemsize
        if len(data) != expected:
            raise CodecError(f"ndarray of dtype {dt.str} and shape {tuple(shape)} needs {expected} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=dt).reshape(shape)
    if "__npgeneric__" in obj or b"__npgeneric__" in obj:
        dt, data = check_dtype(_field(obj, "dtype", raw)), _field(obj, "data", raw)
        if raw and isinstance(data, (bool, int, float)):  # openpi: the value itself
            try:
                return dt.type(data)
            except (OverflowError, ValueError, TypeError):
                raise CodecError(f"numpy scalar {short_repr(data)} does not fit dtype {dt.str}") from None
        if not isinstance(data, bytes) or len(data) != dt.itemsize:
            raise CodecError(f"numpy scalar of dtype {dt.str} needs {dt.itemsize} bytes of 'data'")
        return np.frombuffer(data, dtype=dt)[0]
    return obj


def packb(obj: Any, openpi: bool = False) -> bytes:
    """Serialise `obj` (nested dicts/lists of plain values and numpy arrays) to msgpack bytes.

    `openpi=True` writes the array tags with bytes keys, as `openpi_client.msgpack_numpy` does and expects.
    """
    try:
        return msgpack.packb(obj, default=_encode_openpi if openpi else _encode, use_bin_type=True)
    except CodecError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"cannot encode message: {exc}") from None


def unpackb(data: bytes) -> Any:
    """Parse msgpack bytes produced by `packb` (or any msgpack peer); CodecError on anything malformed.

    Map keys must be strings or bytes (`strict_map_key`), and trailing bytes after the first object are an error,
    so a truncated or concatenated frame is reported instead of half-read. At most `MAX_CONTAINERS` maps and lists
    of at most `MAX_CONTAINER_LEN` entries each are built: past that the frame is refused, not decoded.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected a binary frame, got {type(data).__name__}")
    budget = [MAX_CONTAINERS]

    def spend() -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise CodecError(f"frame holds more than {MAX_CONTAINERS} maps and lists; no request needs that many")

    def object_hook(obj: dict) -> Any:
        spend()
        return _decode(obj)

    def list_hook(obj: list) -> list:
        spend()
        return obj

    try:
        return msgpack.unpackb(data, object_hook=object_hook, list_hook=list_hook, raw=False, strict_map_key=True,
                               max_array_len=MAX_CONTAINER_LEN, max_map_len=MAX_CONTAINER_LEN)
    except CodecError:
        raise
    except msgpack.ExtraData:
        raise CodecError("frame holds trailing bytes after the first msgpack object") from None
    except (msgpack.UnpackException, ValueError, TypeError, RecursionError) as exc:
        raise CodecError(f"frame is not valid msgpack ({type(exc).__name__}: {short_repr(str(exc), 120)})") from None
