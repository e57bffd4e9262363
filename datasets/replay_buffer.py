"""Zarr replay buffer in the diffusion_policy layout.

On disk::

    <store>/data/<key>          one array per field, all episodes concatenated along axis 0 (time)
    <store>/meta/episode_ends   int64 (n_episodes,), exclusive cumulative end index of each episode
    <store>/meta/<other>        optional per-episode arrays (n_episodes, ...) such as the seeds that made them

This is exactly what diffusion_policy's `ReplayBuffer` reads, so its public stores (zarr format 2, directory or
`.zarr.zip`) load unchanged, and stores we write in format 2 load in diffusion_policy. Arrays are chunked along time
only, so reading a window of steps touches one or two chunks.

Writing appends the data arrays first and `meta/episode_ends` last: `episode_ends` is the commit point. A writer
killed half-way leaves data arrays longer than `episode_ends[-1]`, which validation reports and which
`truncate_to_committed` repairs for our own partial stores. A user's store opened for reading is never modified.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numcodecs
import numpy as np
import zarr
from fm_policy.datasets.errors import DatasetError
from fm_policy.datasets.validation import (
    check_finite_rows,
    check_required_keys,
    read_rows,
    validate_replay_buffer,
)

CompressorName = Literal["default", "disk", "none"]
TARGET_CHUNK_BYTES = 2 * 1024 * 1024  # diffusion_policy aims at ~2 MB chunks; the same trade-off holds here


def _compressor(name: CompressorName, zarr_format: int) -> Any:
    """Blosc presets of diffusion_policy: 'default' = lz4 no-shuffle (fast), 'disk' = zstd bit-shuffle (small)."""
    if name == "none":
        return None
    if name not in ("default", "disk"):
        raise ValueError(f"unknown compressor '{name}'; choose 'default', 'disk' or 'none'")
    cname, shuffle = ("lz4", "noshuffle") if name == "default" else ("zstd", "bitshuffle")
    if zarr_format == 2:
        shuffle_id = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[shuffle]
        return numcodecs.Blosc(cname=cname, clevel=5, shuffle=shuffle_id)
    return zarr.codecs.BloscCodec(cname=cname, clevel=5, shuffle=shuffle)


def chunk_length(row_shape: tuple[int, ...], dtype: np.dtype, target_bytes: int = TARGET_CHUNK_BYTES) -> int:
    """Steps per chunk so that one chunk holds about `target_bytes` (at least one step)."""
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return max(1, target_bytes // max(row_bytes, 1))


def _is_zip(path: str) -> bool:
    return str(path).endswith(".zip")


class ReplayBuffer:
    """Episodes of time-aligned arrays in one zarr group (see the module docstring for the layout)."""

    def __init__(self, root: zarr.Group, path: str, store: Any = None):
        self._root = root
        self.path = path
        self._store = store  # a ZipStore that must be closed; None for directory stores
        self.storage_options: dict[str, Any] = {}  # fsspec options of a store opened by URL
        self._check_on_read: set[str] = set()  # large float keys whose NaN/inf check runs when they are read

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        mode: Literal["r", "a"] = "r",
        required_keys: Iterable[str] = (),
        check_finite: bool = True,
        storage_options: Mapping[str, Any] | None = None,
    ) -> ReplayBuffer:
        """Open an existing store (format 2 or 3, directory, `.zarr.zip`, or a URL fsspec reads such as
        `s3://bucket/demos.zarr`, with `storage_options` for its filesystem) and validate it.

        `mode="r"` (the default) opens read-only: nothing can write to a user's data. `mode="a"` is for appending to
        our own stores. `required_keys` are data keys a config needs; a missing one is a clear error up front.
        """
        path = str(path)
        remote = "://" in path
        if not remote and not os.path.exists(path):
            raise DatasetError(path, "no such file or directory")
        store = None
        try:
            if remote:
                if mode != "r":
                    raise DatasetError(path, "stores opened by URL are read-only here")
                root = zarr.open_group(path, mode="r", storage_options=dict(storage_options or {}) or None)
            elif _is_zip(path):
                if mode != "r":
                    raise DatasetError(path, "zip stores are read-only here; unzip it to append")
                store = zarr.storage.ZipStore(path, mode="r")
                root = zarr.open_group(store, mode="r")
            else:
                root = zarr.open_group(path, mode=mode)
        except DatasetError:
            raise
        except Exception as exc:  # zarr raises several types for "not a group"; one clear message for all
            raise DatasetError(path, f"not a readable zarr group ({type(exc).__name__}: {exc})") from exc
        deferred = validate_replay_buffer(root, path, required_keys=required_keys, check_finite=check_finite)
        buffer = cls(root, path, store)
        buffer._check_on_read = deferred
        buffer.storage_options = dict(storage_options or {})
        return buffer

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        zarr_format: Literal[2, 3] = 2,
        attrs: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> ReplayBuffer:
        """Create an empty store. Format 2 (the default) is readable by diffusion_policy's zarr-2 loader."""
        path = str(path)
        if zarr_format not in (2, 3):
            raise ValueError(f"zarr_format must be 2 or 3, got {zarr_format}")
        if _is_zip(path):
            raise ValueError(f"{path}: write a directory store; zip stores are read-only here")
        if os.path.exists(path):
            if not overwrite:
                raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        root = zarr.open_group(path, mode="w", zarr_format=zarr_format)
        root.require_group("data")
        meta = root.require_group("meta")
        meta.create_array("episode_ends", shape=(0,), chunks=(4096,), dtype="int64", compressors=None)
        if attrs:
            root.attrs.update(dict(attrs))
        return cls(root, path)

    @classmethod
    def resume(cls, path: str | os.PathLike) -> ReplayBuffer:
        """Reopen one of OUR partial stores for appending after an interruption.

        Arrays written after the last commit (see the module docstring) are cut back first, then the store is
        validated like any other. Never use this on a user's store: it writes.
        """
        path = str(path)
        buffer = cls(zarr.open_group(path, mode="a"), path)
        buffer.truncate_to_committed()
        validate_replay_buffer(buffer._root, path)
        return buffer

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> ReplayBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    @property
    def zarr_format(self) -> int:
        return self._root.metadata.zarr_format

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._root.attrs)

    @property
    def data(self) -> zarr.Group:
        return self._root["data"]

    @property
    def meta(self) -> zarr.Group:
        return self._root["meta"]

    @property
    def keys(self) -> list[str]:
        return sorted(self.data.array_keys())

    @property
    def episode_ends(self) -> np.ndarray:
        return read_rows(self.meta["episode_ends"], slice(None), self.path, "meta/episode_ends").astype(np.int64)

    @property
    def n_episodes(self) -> int:
        return int(self.meta["episode_ends"].shape[0])

    @property
    def n_steps(self) -> int:
        ends = self.meta["episode_ends"]
        return int(ends[-1]) if ends.shape[0] else 0

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self.episode_ends, prepend=0)

    def require(self, keys: Iterable[str]) -> None:
        """Raise `DatasetError` naming the missing keys unless every key in `keys` is stored."""
        check_required_keys(self.keys, keys, self.path)

    def array(self, key: str) -> zarr.Array:
        if key not in self.data:
            raise DatasetError(self.path, f"no such data key; available: {self.keys}", key=key)
        return self.data[key]

    def episode_slice(self, index: int) -> slice:
        ends = self.episode_ends
        if not -len(ends) <= index < len(ends):
            raise IndexError(f"{self.path}: episode {index} out of range ({len(ends)} episodes)")
        index %= len(ends)
        start = 0 if index == 0 else int(ends[index - 1])
        return slice(start, int(ends[index]))

    def get_episode(self, index: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        sl = self.episode_slice(index)
        return {k: self._read(k, sl) for k in (keys or self.keys)}

    def load(self, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Read whole arrays into memory (the default for training: no per-sample reads in the hot loop). A store
        larger than memory is streamed instead (`datasets/streaming.py`, `data.storage`)."""
        n = self.n_steps
        return {k: self._read(k, slice(0, n)) for k in (keys or self.keys)}

    def _read(self, key: str, rows: slice) -> np.ndarray:
        values = read_rows(self.array(key), rows, self.path, f"data/{key}")
        if key in self._check_on_read:  # too large to scan at open: checked now, in memory (see validation.py)
            check_finite_rows(values, rows.start or 0, self.path, key)
        return values

    # ------------------------------------------------------------------ writing
    def add_episode(
        self,
        data: Mapping[str, np.ndarray],
        episode_meta: Mapping[str, Any] | None = None,
        compressor: CompressorName = "default",
        chunks: Mapping[str, int] | None = None,
    ) -> None:
        """Append one episode. Data arrays are written first, `meta/episode_ends` last (the commit point).

        `episode_meta` holds per-episode scalars or small arrays (e.g. the seeds that made the episode), stored as
        `meta/<name>` arrays of length n_episodes. `chunks` overrides the steps per chunk for new keys.
        """
        arrays = {k: np.asarray(v) for k, v in data.items()}
        self._check_episode(arrays)
        n_new = len(next(iter(arrays.values())))
        start = self.n_steps
        for key, value in arrays.items():
            if key not in self.data:
                steps = (chunks or {}).get(key) or chunk_length(value.shape[1:], value.dtype)
                self.data.create_array(
                    key,
                    shape=(0, *value.shape[1:]),
                    chunks=(steps, *value.shape[1:]),
                    dtype=value.dtype,
                    compressors=_compressor(compressor, self.zarr_format),
                )
            target = self.data[key]
            target.resize((start + n_new, *value.shape[1:]))
            target[start : start + n_new] = value
        for name, value in (episode_meta or {}).items():
            value = np.asarray(value)
            if name not in self.meta:
                self.meta.create_array(
                    name, shape=(0, *value.shape), chunks=(4096, *value.shape), dtype=value.dtype, compressors=None
                )
            target = self.meta[name]
            target.resize((self.n_episodes + 1, *value.shape))
            target[self.n_episodes] = value
        ends = self.meta["episode_ends"]
        ends.resize((self.n_episodes + 1,))
        ends[-1] = start + n_new

    def _check_episode(self, arrays: dict[str, np.ndarray]) -> None:
        if not arrays:
            raise DatasetError(self.path, "add_episode got no arrays")
        lengths = {k: len(v) if v.ndim else 0 for k, v in arrays.items()}
        if len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise DatasetError(self.path, f"episode arrays must share one non-zero length along time, got {lengths}")
        existing = set(self.keys)
        if existing and existing != set(arrays):
            raise DatasetError(self.path, f"episode keys {sorted(arrays)} differ from the store's keys {sorted(existing)}")
        for key, value in arrays.items():
            if key in existing:
                stored = self.data[key]
                if stored.shape[1:] != value.shape[1:] or stored.dtype != value.dtype:
                    raise DatasetError(
                        self.path,
                        f"episode array has shape {value.shape[1:]} / dtype {value.dtype}, store has "
                        f"{stored.shape[1:]} / {stored.dtype}",
                        key=key,
                    )
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                bad = np.argwhere(~np.isfinite(value.reshape(len(value), -1)))[0][0]
                raise DatasetError(self.path, f"non-finite value (NaN or inf) at episode step {bad}", key=key)

    def update_attrs(self, **values: Any) -> None:
        self._root.attrs.update(values)

    def truncate_to_committed(self) -> int:
        """Cut data and meta arrays back to the last committed episode; returns how many steps were dropped.

        For resuming our own interrupted writes only (see the module docstring); never called on a user's store.
        """
        n_steps, n_eps, dropped = self.n_steps, self.n_episodes, 0
        for key in self.keys:
            arr = self.data[key]
            if arr.shape[0] != n_steps:
                dropped = max(dropped, arr.shape[0] - n_steps)
                arr.resize((n_steps, *arr.shape[1:]))
        for name in self.meta.array_keys():
            arr = self.meta[name]
            if name != "episode_ends" and arr.shape[0] != n_eps:
                arr.resize((n_eps, *arr.shape[1:]))
        return dropped

