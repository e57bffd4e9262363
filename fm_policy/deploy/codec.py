"""Wire format of the policy server: msgpack with numpy arrays encoded explicitly, never pickle.

Why msgpack and not pickle (what LeRobot's async inference sends): unpickling runs arbitrary code, so a pickle
endpoint hands the robot's computer to anyone who can reach the port. msgpack only ever yields plain data
(dicts, lists, strings, numbers, bytes), is readable from C++/Rust/Go controllers, and moves large arrays as one
`bin` blob (no per-element cost). The array encoding follows openpi's `msgpack_numpy` convention so clients of
either stack are easy to port:

    ndarray      -> {"__ndarray__": True, "data": <raw bytes, C order>, "dtype": "<f4", "shape": [2, 20]}
    numpy scalar -> {"__npgeneric__": True, "data": <raw bytes>, "dtype": "<f8"}

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

__all__ = ["MAX_NDIM", "CodecError", "check_dtype", "packb", "unpackb"]

MAX_NDIM = 32  # numpy's own limit is 64; no observation needs more than a handful
_REFUSED_KINDS = {"O": "object", "V": "void/structured", "c": "complex"}


class CodecError(ValueError):
    """A value cannot be encoded, or received bytes are not a valid message (the text says which part and why)."""


def check_dtype(dtype: np.dtype | str) -> np.dtype:
    """The numpy dtype for `dtype`, or CodecError if it is malformed or of a refused kind."""
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"unknown dtype {dtype!r} ({exc})") from None
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


def _decode(obj: dict[str, Any]) -> Any:
    """msgpack `object_hook`: tagged maps back into numpy, after checking every field of the header."""
    if "__ndarray__" in obj:
        dt, data = check_dtype(obj.get("dtype")), obj.get("data")
        shape = obj.get("shape")
        if not isinstance(data, bytes):
            raise CodecError("ndarray 'data' must be bytes")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise CodecError(f"ndarray 'shape' must be a list of at most {MAX_NDIM} non-negative ints, got {shape!r}")
        expected = math.prod(shape) * dt.itemsize
        if len(data) != expected:
            raise CodecError(f"ndarray of dtype {dt.str} and shape {tuple(shape)} needs {expected} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=dt).reshape(shape)
    if "__npgeneric__" in obj:
        dt, data = check_dtype(obj.get("dtype")), obj.get("data")
        if not isinstance(data, bytes) or len(data) != dt.itemsize:
            raise CodecError(f"numpy scalar of dtype {dt.str} needs {dt.itemsize} bytes of 'data'")
        return np.frombuffer(data, dtype=dt)[0]
    return obj


def packb(obj: Any) -> bytes:
    """Serialise `obj` (nested dicts/lists of plain values and numpy arrays) to msgpack bytes."""
    try:
        return msgpack.packb(obj, default=_encode, use_bin_type=True)
    except CodecError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"cannot encode message: {exc}") from None


def unpackb(data: bytes) -> Any:
    """Parse msgpack bytes produced by `packb` (or any msgpack peer); CodecError on anything malformed.

    Map keys must be strings or bytes (`strict_map_key`), and trailing bytes after the first object are an error,
    so a truncated or concatenated frame is reported instead of half-read.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected a binary frame, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, object_hook=_decode, raw=False, strict_map_key=True)
    except CodecError:
        raise
    except msgpack.ExtraData:
        raise CodecError("frame holds trailing bytes after the first msgpack object") from None
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise CodecError(f"frame is not valid msgpack ({type(exc).__name__}: {exc})") from None
