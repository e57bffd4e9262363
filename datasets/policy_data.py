"""From a replay buffer to what a policy trains on: observation keys in the env's layout, windows, and splits.

A policy sees the same observation keys in training and in the simulator. Most keys are stored as they are observed
(`state`, `image`); some observations are derived from stored fields, because the stores keep diffusion_policy's
field layout: Push-T's 20-D `keypoints` observation is the 9 block keypoints (`keypoint`, (9, 2)) flattened plus the
agent position (`state[:, :2]`). Each env's spec declares such recipes (`EnvSpec.derived_keys` for built keys,
`EnvSpec.renamed_keys` for plain renames such as Push-T's `image` <- `img`); this module uses the union over all
registered envs (`fm_policy.envs.registry.dataset_key_recipes`), not the recipes of the store's env, because a store
need not record its env (diffusion_policy's Push-T zarr has no attributes). A key stored under its own name always
wins over a recipe. A recipe may also read the store's attributes (`DerivedKey.uses_attrs`): Push-T's `goal` for a
store without one is the single goal the store records, or gym-pusht's default for attribute-less human data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from fm_policy.datasets.errors import DatasetError
from fm_policy.datasets.replay_buffer import ReplayBuffer
from fm_policy.datasets.sampler import SequenceDataset, SequenceSampler, episode_split
from fm_policy.datasets.streaming import ChunkedArray, DerivedArray, StoreSource, stored_nbytes
from fm_policy.envs.registry import dataset_key_recipes
from fm_policy.envs.spec import DerivedKey

from fm_policy.config import ConfigError
from fm_policy.errors import UserError

__all__ = ["DataConfig", "DerivedKey", "PolicyData", "build_policy_data", "load_policy_arrays", "resolve_storage",
           "stored_keys_for", "stream_policy_arrays"]


def stored_keys_for(obs_keys: Sequence[str], action_key: str, available: Sequence[str]) -> list[str]:
    """Store keys needed to build `obs_keys` and the action."""
    derived, renamed = dataset_key_recipes()
    needed: list[str] = []
    for key in obs_keys:
        if key in available:
            needed.append(key)
        elif key in derived:
            needed.extend(derived[key].sources)
        elif renamed.get(key) in available:
            needed.append(renamed[key])
        else:
            needed.append(key)  # missing: ReplayBuffer.require reports it clearly
    return list(dict.fromkeys([*needed, action_key]))


def _recipe_build(recipe: DerivedKey, attrs: dict[str, Any]) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """The recipe as a function of the source arrays only: a recipe that reads the store's attributes gets them bound
    (a `partial`, so streamed views stay picklable for loader worker processes)."""
    return partial(recipe.build, attrs=attrs) if recipe.uses_attrs else recipe.build


def _derive(buffer: ReplayBuffer, key: str, make: Callable[[], Any]) -> Any:
    """Runs `make()` (which builds derived key `key`); a recipe's refusal becomes a `DatasetError` naming the store."""
    try:
        return make()
    except DatasetError:
        raise
    except UserError as exc:
        raise DatasetError(buffer.path, str(exc), key=key) from None


def load_policy_arrays(buffer: ReplayBuffer, obs_keys: Sequence[str], action_key: str = "action") -> dict[str, np.ndarray]:
    """Observation arrays under their env keys plus `action` (float32), all in memory."""
    buffer.require(stored_keys_for(obs_keys, action_key, buffer.keys))
    stored = buffer.load(stored_keys_for(obs_keys, action_key, buffer.keys))
    derived, renamed = dataset_key_recipes()
    arrays: dict[str, np.ndarray] = {}
    for key in obs_keys:
        if key in stored:
            arrays[key] = stored[key]
        elif key in derived:
            build = _recipe_build(derived[key], buffer.attrs)
            arrays[key] = _derive(buffer, key, lambda build=build: build(stored))
        else:
            arrays[key] = stored[renamed[key]]
        if arrays[key].dtype.kind == "f":
            arrays[key] = arrays[key].astype(np.float32, copy=False)
    arrays["action"] = stored[action_key].astype(np.float32, copy=False)
    return arrays


@dataclass
class DataConfig:
    """Which store, which keys, and how episodes are split. `obs_keys` are env observation keys."""

    path: str = "data/pusht_expert.zarr"
    obs_keys: list[str] = field(default_factory=lambda: ["keypoints"])
    action_key: str = "action"
    val_ratio: float = 0.02
    split_seed: int = 42
    max_train_episodes: int | None = None
    loss_mask_padding: bool = False  # diffusion_policy trains on padded (held) actions too; True masks them out
    num_workers: int = 0  # in-memory data: one batched gather beats worker IPC (docs/results/sampler.md)
    # memory: load the keys a run reads into RAM (fastest); stream: read zarr chunks on demand through a bounded
    # cache (datasets/streaming.py); auto: stream when those keys exceed stream_threshold_mb decoded
    storage: str = "auto"
    stream_threshold_mb: int = 8192
    cache_mb: int = 1024  # streaming: decoded-chunk cache of each reading process (trainer, each loader worker)
    shuffle_chunks: int = 0  # streaming: chunks whose windows are shuffled together (0: a quarter of the cache)
    prefetch_batches: int = 4  # streaming: batches prepared ahead (per worker process when num_workers > 0)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for a store given by URL


@dataclass
class PolicyData:
    arrays: dict[str, np.ndarray]  # in-memory arrays, or ChunkedArray / DerivedArray views when streamed
    train: SequenceDataset
    val: SequenceDataset | None
    train_mask: np.ndarray
    source: str
    storage: str = "memory"  # memory | stream (what data.storage resolved to)


STORAGE_MODES = ("auto", "memory", "stream")


def resolve_storage(config: DataConfig, buffer: ReplayBuffer) -> str:
    """`memory` or `stream` for `config.storage` (auto: by the decoded size of the keys the run reads; a function of
    the store only, so the choice, and the batch order that follows from it, is the same on every machine)."""
    if config.storage not in STORAGE_MODES:
        raise ConfigError(f"data.storage '{config.storage}' is unknown; choose one of {list(STORAGE_MODES)}")
    if config.storage != "auto":
        return config.storage
    needed = stored_keys_for(config.obs_keys, config.action_key, buffer.keys)
    buffer.require(needed)
    size = stored_nbytes(buffer, needed)
    return "stream" if size > config.stream_threshold_mb * 2**20 else "memory"


def stream_policy_arrays(buffer: ReplayBuffer, config: DataConfig) -> dict[str, Any]:
    """The arrays of `load_policy_arrays`, as views that read the store's chunks on demand (datasets/streaming.py)."""
    needed = stored_keys_for(config.obs_keys, config.action_key, buffer.keys)
    buffer.require(needed)
    source = StoreSource(buffer.path, buffer.storage_options, cache_bytes=config.cache_mb * 2**20,
                         shuffle_chunks=config.shuffle_chunks, prefetch_batches=config.prefetch_batches)
    n = buffer.n_steps
    stored = {k: ChunkedArray(source, buffer.array(k), n) for k in needed}
    derived, renamed = dataset_key_recipes()
    arrays: dict[str, Any] = {}
    for key in config.obs_keys:
        if key in stored:
            arrays[key] = stored[key]
        elif key in derived:
            sources, build = {k: stored[k] for k in derived[key].sources}, _recipe_build(derived[key], buffer.attrs)
            arrays[key] = _derive(buffer, key, lambda sources=sources, build=build: DerivedArray(sources, build))
        else:
            arrays[key] = stored[renamed[key]]
    arrays["action"] = ChunkedArray(source, buffer.array(config.action_key), n, cast=np.float32)
    return arrays


def build_policy_data(config: DataConfig, horizon: int, n_obs_steps: int, n_action_steps: int) -> PolicyData:
    """Open and validate the store, build the arrays (in memory or streamed, `data.storage`), split by episode, and
    wrap train/val windows."""
    if config.cache_mb < 16 or config.prefetch_batches < 1 or config.shuffle_chunks < 0:
        raise ConfigError("data.cache_mb must be >= 16, data.prefetch_batches >= 1 and data.shuffle_chunks >= 0")
    with ReplayBuffer.open(config.path, storage_options=config.storage_options) as buffer:
        storage = resolve_storage(config, buffer)
        if storage == "memory":
            try:
                arrays = load_policy_arrays(buffer, config.obs_keys, config.action_key)
            except MemoryError:
                size = stored_nbytes(buffer, stored_keys_for(config.obs_keys, config.action_key, buffer.keys))
                raise DatasetError(config.path, f"the keys this run reads take {size / 2**30:.1f} GiB decoded and do "
                                   "not fit in memory; stream them from the store with data.storage=stream") from None
        else:
            arrays = stream_policy_arrays(buffer, config)
        ends = buffer.episode_ends
    if ends.size < 1:
        raise DatasetError(config.path, "holds no episodes")
    train_mask, val_mask = episode_split(len(ends), config.val_ratio, config.split_seed, config.max_train_episodes)

    def windows(mask: np.ndarray) -> SequenceDataset:
        return SequenceDataset(
            SequenceSampler(
                arrays,
                ends,
                horizon=horizon,
                pad_before=n_obs_steps - 1,
                pad_after=n_action_steps - 1,
                episode_mask=mask,
                first_k={k: n_obs_steps for k in config.obs_keys},
                pad_mask=config.loss_mask_padding,
            )
        )

    train = windows(train_mask)
    if len(train) == 0:
        raise DatasetError(config.path, f"no training window of horizon {horizon}: episodes are too short")
    return PolicyData(arrays, train, windows(val_mask) if val_mask.any() else None, train_mask, config.path, storage)
