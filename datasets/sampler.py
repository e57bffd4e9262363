"""Fixed-length windows over episodes, with diffusion_policy's edge-replication padding, fed to a torch DataLoader.

A window of `horizon` steps may start up to `pad_before` steps before its episode and end up to `pad_after` steps
after it; the missing steps repeat the first / last real frame. With `pad_before = n_obs_steps - 1` every real step can
be the "current" one, and with `pad_after = n_action_steps - 1` the tail of an episode is learned as holding the last
action, which diffusion_policy's authors found important.

Why hand-written rather than diffusion_policy's numba loop: a window is fully described by (window_start,
episode_start, episode_end) in global step indices, so the index table is built with a few numpy ops and a whole batch
is gathered with one `np.clip` + fancy index per key. No per-sample Python runs in the hot path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

PAD_MASK_KEY = "pad_mask"


def episode_split(
    n_episodes: int, val_ratio: float = 0.02, seed: int = 42, max_train_episodes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (train, val) masks over episodes.

    Splitting by episode (not by window) keeps validation windows out of training. With `val_ratio > 0` and at least
    two episodes there is at least one validation and one training episode. `max_train_episodes` subsamples the
    training episodes with the same seed (diffusion_policy's Push-T configs train on 90 of 206).
    """
    if n_episodes <= 0:
        raise ValueError(f"need at least one episode, got {n_episodes}")
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    rng = np.random.default_rng(seed)
    val = np.zeros(n_episodes, dtype=bool)
    n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1) if val_ratio > 0 and n_episodes > 1 else 0
    val[rng.choice(n_episodes, size=n_val, replace=False)] = True
    train = ~val
    if max_train_episodes is not None and train.sum() > max_train_episodes:
        keep = rng.choice(np.flatnonzero(train), size=max_train_episodes, replace=False)
        train = np.zeros(n_episodes, dtype=bool)
        train[keep] = True
    return train, val


def window_index(
    episode_ends: np.ndarray,
    horizon: int,
    pad_before: int = 0,
    pad_after: int = 0,
    episode_mask: np.ndarray | None = None,
) -> np.ndarray:
    """(n_windows, 3) int64 rows of (window_start, episode_start, episode_end) in global step indices.

    For an episode [s, e) the window starts run from s - pad_before to e - horizon + pad_after; pads are clamped to
    [0, horizon - 1] so every window holds at least one real step. `window_start` may lie before `s`.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    ends = np.asarray(episode_ends, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    if episode_mask is not None:
        mask = np.asarray(episode_mask, dtype=bool)
        if mask.shape != ends.shape:
            raise ValueError(f"episode_mask has shape {mask.shape}, expected {ends.shape}")
        starts, ends = starts[mask], ends[mask]
    pad_before = int(np.clip(pad_before, 0, horizon - 1))
    pad_after = int(np.clip(pad_after, 0, horizon - 1))
    counts = np.maximum(ends - starts - horizon + pad_after + pad_before + 1, 0)
    first = starts - pad_before
    episode = np.repeat(np.arange(len(ends)), counts)
    offset_in_episode = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.stack([first[episode] + offset_in_episode, starts[episode], ends[episode]], axis=1)


class SequenceSampler:
    """Batched window gathering from in-memory arrays.

    `first_k` maps observation keys to the number of leading frames to load (`n_obs_steps`): only those frames are
    gathered, so e.g. images are read 2 instead of 16 times per window.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        episode_ends: np.ndarray,
        horizon: int,
        pad_before: int = 0,
        pad_after: int = 0,
        episode_mask: np.ndarray | None = None,
        first_k: Mapping[str, int] | None = None,
        pad_mask: bool = False,
    ):
        self.arrays = dict(arrays)
        self.horizon = horizon
        self.first_k = dict(first_k or {})
        self.pad_mask = pad_mask
        for key, k in self.first_k.items():
            if key not in self.arrays:
                raise KeyError(f"first_k names '{key}', which is not among the arrays {sorted(self.arrays)}")
            if not 1 <= k <= horizon:
                raise ValueError(f"first_k['{key}'] = {k} must be in [1, horizon={horizon}]")
        self.index = window_index(episode_ends, horizon, pad_before, pad_after, episode_mask)
        self._offsets = np.arange(horizon)

    def __len__(self) -> int:
        return len(self.index)

    def _steps(self, windows: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = self.index[np.asarray(windows, dtype=np.int64)]
        start, ep_start, ep_end = rows[:, :1], rows[:, 1:2], rows[:, 2:3]
        steps = start + self._offsets  # (B, horizon) global steps, before padding
        return steps, ep_start, ep_end

    def sample(self, windows: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
        """Gather windows `windows` (indices into the index table) as a dict of (B, T, ...) arrays."""
        steps, ep_start, ep_end = self._steps(windows)
        source = np.clip(steps, ep_start, ep_end - 1)  # edge replication
        batch = {}
        for key, array in self.arrays.items():
            k = self.first_k.get(key, self.horizon)
            batch[key] = array[source[:, :k]]
        if self.pad_mask:
            batch[PAD_MASK_KEY] = (steps >= ep_start) & (steps < ep_end)
        return batch

    # ---------------------------------------------------------------- streamed arrays (datasets/streaming.py)
    @property
    def streamed(self) -> list[Any]:
        """The arrays read from their store on demand (empty for in-memory data)."""
        return [a for a in self.arrays.values() if hasattr(a, "prefetch")]

    def prefetch(self, windows: np.ndarray | Sequence[int]) -> None:
        """Start decoding the chunks that `sample(windows)` will read (streamed arrays only; returns at once)."""
        streamed = self.streamed
        if not streamed:
            return
        steps, ep_start, ep_end = self._steps(windows)
        source = np.clip(steps, ep_start, ep_end - 1)
        for key, array in self.arrays.items():
            if hasattr(array, "prefetch"):
                array.prefetch(source[:, : self.first_k.get(key, self.horizon)])

    def chunk_groups(self) -> tuple[np.ndarray, int] | None:
        """For streamed data: each window's home chunk (the chunk of its first frame in the array that a window reads
        the most bytes of) and how many chunks form one shuffle group; None for in-memory data."""
        chunked = [(key, a) for key, a in self.arrays.items() if hasattr(a, "chunk_rows")]
        if not chunked:
            return None
        _, primary = max(chunked, key=lambda item: item[1].row_nbytes * self.first_k.get(item[0], self.horizon))
        first = np.clip(self.index[:, 0], self.index[:, 1], self.index[:, 2] - 1)
        source = primary.source
        group = source.shuffle_chunks or max(1, source.cache_bytes // (4 * primary.chunk_nbytes))
        return first // primary.chunk_rows, int(group)


class SequenceDataset(Dataset):
    """torch Dataset over a `SequenceSampler`; indexing with a list of indices returns a whole batch.

    Use `make_dataloader`, which hands the dataset batches of indices, so one vectorised gather serves a batch
    instead of `batch_size` single reads plus a collate.
    """

    def __init__(self, sampler: SequenceSampler, window_arrays: Mapping[str, torch.Tensor] | None = None):
        """`window_arrays`: extra per-window values (first axis = window index) added to every batch under their
        keys, e.g. fine-tuning's cached noise codes of each training window."""
        self.sampler = sampler
        self.window_arrays = dict(window_arrays or {})
        for key, values in self.window_arrays.items():
            if len(values) != len(sampler):
                raise ValueError(f"window array '{key}' has {len(values)} rows for {len(sampler)} windows")
            if key in sampler.arrays or key == "pad_mask":
                raise ValueError(f"window array '{key}' would shadow the data key of the same name")

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def streaming(self) -> bool:
        """Whether the data is streamed from its store (datasets/streaming.py) rather than held in memory."""
        return bool(self.sampler.streamed)

    def prefetch(self, indices: Sequence[int] | np.ndarray) -> None:
        self.sampler.prefetch(np.atleast_1d(np.asarray(indices, dtype=np.int64)))

    def __getitem__(self, index: int | Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        single = np.isscalar(index)
        indices = np.atleast_1d(np.asarray(index, dtype=np.int64))
        batch = {k: torch.from_numpy(v) for k, v in self.sampler.sample(indices).items()}
        for key, values in self.window_arrays.items():
            batch[key] = values[torch.from_numpy(indices)]
        return {k: v[0] for k, v in batch.items()} if single else batch


def chunk_aware_order(home_chunks: np.ndarray, group_chunks: int, seed: int) -> np.ndarray:
    """A permutation of windows for streamed data. Chunks are cut into runs of consecutive chunks (an eighth of a
    group each, so a window whose frames cross a chunk boundary mostly stays inside its run), the runs are shuffled
    and cut into groups of about `group_chunks` chunks, the windows of one group are shuffled together, and the groups
    follow one another. A stretch of the order then reads a few groups' chunks instead of the whole store, so a cache
    of a few groups decodes every chunk about once per epoch, while consecutive windows still come from 8 random
    places of the store."""
    rng = np.random.default_rng(seed)
    group_chunks = max(1, int(group_chunks))
    run = max(1, group_chunks // 8)
    runs = np.unique(home_chunks // run)
    group_of_run = np.zeros(int(runs.max()) + 1, dtype=np.int64)
    group_of_run[rng.permutation(runs)] = np.arange(len(runs)) // max(1, group_chunks // run)
    return np.lexsort((rng.random(len(home_chunks)), group_of_run[home_chunks // run]))


def epoch_batches(dataset: SequenceDataset, batch_size: int, shuffle: bool = True, seed: int | None = None,
                  drop_last: bool = True, streams: int = 1) -> list[np.ndarray]:
    """The index batches of one epoch: a pure function of the arguments (and of the data's chunk layout when it is
    streamed), whatever the number of processes that will share each batch.

    In-memory data: a uniform shuffle (torch's RandomSampler on a generator seeded by `seed`). Streamed data: the
    chunk-aware order (`chunk_aware_order`) cut into `streams` contiguous segments of whole batches, interleaved so
    that batch i comes from segment i % streams: the DataLoader hands batch i to worker i % num_workers, so with
    streams = num_workers each worker process reads (and caches) only its own segment's chunks."""
    n = len(dataset)
    groups = dataset.sampler.chunk_groups() if shuffle and isinstance(dataset, SequenceDataset) else None
    if groups is None:
        if shuffle:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            base = RandomSampler(dataset, generator=generator)
        else:
            base = SequentialSampler(dataset)
        return [np.asarray(b, dtype=np.int64) for b in BatchSampler(base, batch_size=batch_size, drop_last=drop_last)]
    home, group_chunks = groups
    order = chunk_aware_order(home, group_chunks, seed if seed is not None else int(torch.randint(2**31, ()).item()))
    n_batches = n // batch_size
    streams = max(1, min(int(streams), max(n_batches, 1)))
    counts = [n_batches // streams + (s < n_batches % streams) for s in range(streams)]
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    batches = [order[(first[i % streams] + i // streams) * batch_size:][:batch_size] for i in range(n_batches)]
    if not drop_last and n % batch_size:
        batches.append(order[n_batches * batch_size :])
    # each batch sorted by chunk: the shards of a data-parallel run (and the micro-batches of an accumulated step)
    # are contiguous slices of it, so they read mostly different chunks (a batch's samples are the same in any order)
    return [b[np.argsort(home[b], kind="stable")] for b in batches]


def shard_batch(batch: np.ndarray, shard: int, num_shards: int, micro_batches: int = 1) -> np.ndarray:
    """This process's part of a global batch: the batch is cut into `micro_batches` consecutive micro-batches (for
    gradient accumulation) and each of those into `num_shards` consecutive shards; the result is shard `shard` of
    every micro-batch, in micro-batch order. Concatenating the shards of all processes micro-batch by micro-batch
    gives back the global batch, so a data-parallel step sees exactly the samples of a one-process step."""
    parts = micro_batches * num_shards
    if len(batch) % parts:
        raise ValueError(f"a batch of {len(batch)} does not split into {micro_batches} micro-batches x "
                         f"{num_shards} processes")
    return np.asarray(batch).reshape(micro_batches, num_shards, -1)[:, shard].reshape(-1)


def make_dataloader(
    dataset: SequenceDataset,
    batch_size: int,
    shuffle: bool = True,
    num_workers: int = 0,
    drop_last: bool = True,
    seed: int | None = None,
    pin_memory: bool = False,
    skip_batches: int = 0,
    shard: int = 0,
    num_shards: int = 1,
    micro_batches: int = 1,
    streams: int | None = None,
):
    """A loader that fetches whole batches from `dataset` (see `SequenceDataset`).

    With a `seed` the batch order is a pure function of it; `skip_batches` drops the first batches of that order
    without gathering them, which is how a resumed training run continues mid-epoch exactly. With `num_shards` > 1
    (data-parallel training) each loader yields only shard `shard` of every global batch (`shard_batch`), so the
    processes see disjoint parts of the same global batches in the same order, whatever their number.

    Streamed data (datasets/streaming.py) is read in the chunk-aware order of `epoch_batches` with `streams`
    segments (default: one per worker); without worker processes a background thread prepares
    `prefetch_batches` batches ahead (`PrefetchLoader`).
    """
    streaming = isinstance(dataset, SequenceDataset) and dataset.streaming
    if streams is None:
        streams = max(1, num_workers)
    batches = epoch_batches(dataset, batch_size, shuffle, seed, drop_last, streams)[skip_batches:]
    if num_shards > 1 or micro_batches > 1:
        batches = [shard_batch(b, shard, num_shards, micro_batches) for b in batches]
    depth = dataset.sampler.streamed[0].source.prefetch_batches if streaming else 2
    if streaming and num_workers == 0:
        from fm_policy.datasets.streaming import PrefetchLoader

        return PrefetchLoader(dataset, batches, depth=depth)
    # The DataLoader draws its workers' base seed when an iterator is created: from the global torch RNG unless it
    # has a generator. A resumed run creates one iterator more than the uninterrupted run did at that point, so
    # without a generator every later noise / time draw would shift and resume would not be exact.
    loader_generator = torch.Generator().manual_seed(seed + 1) if seed is not None else None
    return DataLoader(
        dataset,
        sampler=batches,
        generator=loader_generator,
        batch_size=None,  # the sampler yields index batches; no per-sample collate
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=depth if num_workers > 0 else None,
    )
