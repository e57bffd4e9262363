"""Checks that a zarr group is a well-formed replay buffer, with errors that name the store, the key and the problem.

Every check only reads. A malformed store is reported before training starts, not as an index error an hour in.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import zarr
from fm_policy.datasets.errors import DatasetError

FINITE_CHECK_STEPS = 65536  # rows per read while scanning float arrays for NaN/inf: bounded memory on big stores
FINITE_CHECK_AT_OPEN_BYTES = 256 * 2**20
"""Float arrays up to this decoded size are scanned for NaN/inf when a store is opened; larger ones (float images,
e.g. diffusion_policy's Push-T `img`, 2.8 GB: 56 s to scan from its zip) are checked when they are read instead
(`ReplayBuffer.load` / `get_episode`, and each chunk the streaming reader decodes), so opening a store for its low-dim keys stays instant."""


def validate_episode_ends(ends: np.ndarray, store: str) -> None:
    """`episode_ends` must be a non-empty, strictly increasing, positive integer array (exclusive ends)."""
    key = "meta/episode_ends"
    if ends.dtype.kind not in "iu":
        raise DatasetError(store, f"must hold integers (diffusion_policy writes int64), found dtype {ends.dtype}", key)
    if ends.ndim != 1:
        raise DatasetError(store, f"must be 1-D, found shape {ends.shape}", key)
    if len(ends) == 0:
        raise DatasetError(store, "is empty: the store holds no episodes", key)
    steps = np.diff(ends, prepend=0)
    if (steps <= 0).any():
        bad = int(np.argmax(steps <= 0))
        prev = 0 if bad == 0 else int(ends[bad - 1])
        raise DatasetError(
            store,
            f"is not strictly increasing: episode {bad} ends at {int(ends[bad])} after the previous end {prev} "
            "(every episode needs at least one step)",
            key,
        )


def read_rows(array: zarr.Array, rows: slice, store: str, key: str) -> np.ndarray:
    """`array[rows]`, with a chunk that cannot be decoded reported as a `DatasetError` naming store, key and chunk.

    A truncated download or a disk error leaves chunks that the codec (blosc, zstd, ...) refuses with its own
    low-level error; the user needs to know which file of the store is broken, so the failing read is retried
    chunk by chunk to find it (only on the error path: normal reads stay one call)."""
    try:
        return np.asarray(array[rows])
    except MemoryError:  # not the store's fault (datasets/policy_data.py suggests streaming)
        raise
    except Exception as exc:  # codec and storage errors come in many types; all mean "this store is damaged"
        start, stop, _ = rows.indices(array.shape[0])
        step = array.chunks[0]
        for first in range(start - start % step, stop, step):
            try:
                array[first : first + step]
            except Exception as chunk_exc:
                raise DatasetError(
                    store, f"chunk {first // step} (rows {first}-{min(first + step, array.shape[0]) - 1}) cannot be "
                    f"read: {type(chunk_exc).__name__}: {str(chunk_exc)[:200]}; the store is truncated or corrupt "
                    "(re-download or re-collect it)", key=key) from None
        raise DatasetError(store, f"cannot be read: {type(exc).__name__}: {str(exc)[:200]}", key=key) from None


def _check_finite(array: zarr.Array, store: str, key: str) -> None:
    for start in range(0, array.shape[0], FINITE_CHECK_STEPS):
        check_finite_rows(read_rows(array, slice(start, start + FINITE_CHECK_STEPS), store, f"data/{key}"), start,
                          store, key)


def check_finite_rows(block: np.ndarray, first_step: int, store: str, key: str) -> None:
    """Raise `DatasetError` naming the first step of `block` (rows `first_step`.. of data/`key`) with NaN or inf."""
    if block.dtype.kind != "f" or not len(block):
        return
    finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
    if not finite.all():
        step = first_step + int(np.argmin(finite))
        raise DatasetError(store, f"contains NaN or inf (first at step {step})", key=f"data/{key}")


def validate_replay_buffer(
    root: zarr.Group, store: str, required_keys: Iterable[str] = (), check_finite: bool = True
) -> set[str]:
    """Raise `DatasetError` unless `root` has the diffusion_policy layout and holds `required_keys`.

    Checks: `data` and `meta/episode_ends` exist; episode ends are valid; every data array has a numeric dtype and
    exactly `episode_ends[-1]` steps; float arrays are finite (`check_finite`); `required_keys` are present.
    Returns the float keys too large to scan here (`FINITE_CHECK_AT_OPEN_BYTES`), which the reader checks on read.
    """
    deferred: set[str] = set()
    for group in ("data", "meta"):
        if group not in root or not isinstance(root[group], zarr.Group):
            raise DatasetError(store, f"missing the '{group}' group (expected data/<key> and meta/episode_ends)")
    meta = root["meta"]
    if "episode_ends" not in meta:
        raise DatasetError(store, "missing; it marks where each episode ends", key="meta/episode_ends")
    ends = read_rows(meta["episode_ends"], slice(None), store, "meta/episode_ends")
    validate_episode_ends(ends, store)
    n_steps = int(ends[-1])

    data = root["data"]
    keys = sorted(data.array_keys())
    if not keys:
        raise DatasetError(store, "the 'data' group holds no arrays")
    for key in keys:
        array = data[key]
        if array.dtype.kind not in "biuf":
            raise DatasetError(store, f"has dtype {array.dtype}; only bool, integer and float data load", f"data/{key}")
        if array.ndim == 0 or array.shape[0] != n_steps:
            raise DatasetError(
                store,
                f"has {array.shape[0] if array.ndim else 0} steps but meta/episode_ends[-1] is {n_steps} "
                "(an interrupted write, or arrays from different recordings)",
                f"data/{key}",
            )
        if check_finite and array.dtype.kind == "f":
            if int(np.prod(array.shape, dtype=np.int64)) * array.dtype.itemsize > FINITE_CHECK_AT_OPEN_BYTES:
                deferred.add(key)
            else:
                _check_finite(array, store, key)

    check_required_keys(keys, required_keys, store)
    return deferred


def check_required_keys(available: Iterable[str], required: Iterable[str], store: str) -> None:
    available = sorted(available)
    missing = [k for k in required if k not in available]
    if missing:
        raise DatasetError(store, f"the config needs data keys {missing}, but the store has only {available}")
