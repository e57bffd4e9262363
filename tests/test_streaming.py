"""Streamed data (datasets/streaming.py): chunk reads equal zarr's in every store layout, the cache is bounded, the
policy data path and normaliser give what the in-memory path gives, the chunk-aware order is a sharded, resumable
permutation, training resumes exactly, and a store given by URL (fsspec's in-memory filesystem) trains."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from fm_policy.datasets.errors import DatasetError
from fm_policy.datasets.policy_data import DataConfig, build_policy_data
from fm_policy.datasets.replay_buffer import ReplayBuffer
from fm_policy.datasets.sampler import chunk_aware_order, epoch_batches, make_dataloader, shard_batch
from fm_policy.datasets.streaming import ChunkedArray, ChunkSlab, StoreSource

from fm_policy.factory import load_policy
from fm_policy.normalizer import Normalizer, streaming_stats
from fm_policy.train import load_train_config, train


def _episodes(n: int = 9, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        length = int(rng.integers(20, 45))
        start = rng.uniform(100, 400, 5)
        state = (start + 3.0 * np.arange(length)[:, None] * np.array([1, -1, 0.5, 0.2, 0.0])).astype(np.float32)
        yield {
            "state": state,
            "keypoint": rng.uniform(0, 512, (length, 9, 2)).astype(np.float32),
            "img": rng.integers(0, 255, (length, 6, 6, 3), dtype=np.uint8),
            "action": (state[:, :2] + 20.0).astype(np.float32),
        }


def _store(path: str, zarr_format: int = 2, chunks: dict | None = None) -> str:
    buffer = ReplayBuffer.create(path, zarr_format=zarr_format)
    for episode in _episodes():
        buffer.add_episode(episode, chunks=chunks or {"img": 7, "state": 16, "keypoint": 11, "action": 32})
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return _store(str(tmp_path_factory.mktemp("stream") / "store.zarr"))


def _zip(directory: str, target: str) -> str:
    import zipfile

    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as z:
        for file in sorted(Path(directory).rglob("*")):
            if file.is_file():
                z.write(file, file.relative_to(directory).as_posix())
    return target


@pytest.mark.parametrize("layout", ["v2", "v3", "zip", "memory-url", "v3-sharded"])
def test_chunk_reads_equal_zarr(tmp_path, layout):
    path = str(tmp_path / "s.zarr")
    if layout == "v3-sharded":  # sharding: not decoded by the fast path, read through zarr
        root = zarr.open_group(path, mode="w", zarr_format=3)
        data = np.random.default_rng(1).integers(0, 255, (50, 4, 3), dtype=np.uint8)
        root.require_group("data").create_array("img", shape=data.shape, chunks=(5, 4, 3), shards=(10, 4, 3),
                                                dtype="uint8")[:] = data
        root.require_group("meta").create_array("episode_ends", data=np.array([20, 50], dtype=np.int64))
    elif layout == "memory-url":
        path = f"memory://{tmp_path.name}/s.zarr"
        _store(path)
    else:
        _store(path, zarr_format=3 if layout == "v3" else 2)
        if layout == "zip":
            path = _zip(path, str(tmp_path / "s.zarr.zip"))
    with ReplayBuffer.open(path) as buffer:
        source = StoreSource(path, cache_bytes=1 << 20)
        for key in buffer.keys:
            stored = buffer.load([key])[key]
            array = ChunkedArray(source, buffer.array(key), buffer.n_steps)
            assert array.fast_path == (layout != "v3-sharded")
            rows = np.random.default_rng(0).integers(0, len(stored), (13, 3))
            expected = stored[rows].astype(array.dtype)
            np.testing.assert_array_equal(array[rows], expected)
            np.testing.assert_array_equal(array[3:40], stored[3:40].astype(array.dtype))
            assert array.shape == stored.shape
            blocks = np.concatenate(list(array.iter_blocks()))
            np.testing.assert_array_equal(blocks, stored.astype(array.dtype))


def test_slab_is_bounded_decodes_each_chunk_once_and_never_reuses_a_pinned_slot():
    from concurrent.futures import ThreadPoolExecutor

    decoded: list[int] = []
    lock = threading.Lock()

    def decode(chunk, slot):
        time.sleep(0.01)
        with lock:
            decoded.append(chunk)
        slot[...] = chunk

    slab = ChunkSlab(3, (4,), np.int64)
    with ThreadPoolExecutor(4) as pool:
        slab.prefetch([0, 1], decode, pool)
        got = []
        threads = [threading.Thread(target=lambda: got.append(slab.acquire([0, 1, 2], decode, pool)))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(decoded) == [0, 1, 2]  # four threads asked; each chunk was decoded once
        for slots in got:
            assert all((slab.data[slot] == chunk).all() for chunk, slot in slots.items())
        assert slab.acquire([3], decode, pool) is None  # every slot pinned: no room, the caller reads uncached
        for slots in got:
            slab.release(slots.values())
        pinned = slab.acquire([0], decode, pool)
        slots = slab.acquire([3, 4], decode, pool)  # evicts 1 and 2 (least recently used, unpinned), never 0
        assert set(slots) == {3, 4} and 0 in slab.slot_of and slab.slot_of[0] not in slots.values()
        assert slab.used_slots == 3 and slab.nbytes == 3 * 4 * 8
        slab.release(slots.values())
        slab.release(pinned.values())


@pytest.mark.parametrize("dtype", ["float64", "uint8", "int16"])
def test_streaming_stats_equal_numpy(dtype):
    x = (np.random.default_rng(0).normal(3.0, 2.0, (1001, 4, 2)) * (1 if dtype == "float64" else 40)).astype(dtype)
    stats = streaming_stats(np.array_split(x, 17))
    x = x.astype(np.float64)
    for name, value in {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0)}.items():
        np.testing.assert_allclose(stats[name], value, rtol=1e-12, atol=1e-12)


def test_streamed_policy_data_equals_in_memory(store):
    keys = ["state", "keypoints", "image"]
    datas = {mode: build_policy_data(DataConfig(path=store, obs_keys=keys, storage=mode, cache_mb=16), 8, 2, 4)
             for mode in ("memory", "stream")}
    assert datas["stream"].storage == "stream" and datas["memory"].storage == "memory"
    auto = build_policy_data(DataConfig(path=store, obs_keys=keys, stream_threshold_mb=0), 8, 2, 4)
    assert auto.storage == "stream"  # above the threshold
    assert build_policy_data(DataConfig(path=store, obs_keys=keys), 8, 2, 4).storage == "memory"
    for split in ("train", "val"):
        a, b = getattr(datas["memory"], split), getattr(datas["stream"], split)
        indices = np.random.default_rng(0).permutation(len(a))
        batch_a, batch_b = a[indices], b[indices]
        for key in batch_a:
            assert batch_a[key].dtype == batch_b[key].dtype
            torch.testing.assert_close(batch_a[key], batch_b[key], rtol=0, atol=0)
    fitted = {mode: Normalizer.fit({k: datas[mode].arrays[k] for k in [*keys, "action"]}) for mode in datas}
    for key in [*keys, "action"]:
        for name, value in fitted["memory"].stats(key).items():
            torch.testing.assert_close(fitted["stream"].stats(key)[name], value, rtol=1e-6, atol=1e-5)
    with pytest.raises(TypeError, match="streamed"):
        np.asarray(datas["stream"].arrays["image"])


def test_chunk_aware_order_is_a_local_sharded_resumable_permutation(store):
    data = build_policy_data(DataConfig(path=store, obs_keys=["image"], storage="stream", shuffle_chunks=2,
                                        val_ratio=0.0), 8, 2, 4)
    dataset = data.train
    home, group = dataset.sampler.chunk_groups()
    assert group == 2
    order = chunk_aware_order(home, group, seed=5)
    assert sorted(order.tolist()) == list(range(len(dataset)))
    # consecutive windows come from one group of 2 chunks (plus its neighbour where groups meet)
    assert len(np.unique(home[order[:16]])) <= 4
    n_batches = len(dataset) // 8
    for streams in (1, 3):
        batches = epoch_batches(dataset, 8, seed=5, streams=streams)
        assert len(batches) == n_batches
        flat = np.concatenate(batches)
        assert len(set(flat.tolist())) == len(flat)  # no window twice in an epoch
        again = epoch_batches(dataset, 8, seed=5, streams=streams)  # a pure function of the seed
        assert all(np.array_equal(x, y) for x, y in zip(again, batches))
        if streams == 3:  # batch i from segment i % 3: segments are contiguous stretches of the order
            segment = {i: i % 3 for i in range(n_batches)}
            positions = {int(w): p for p, w in enumerate(chunk_aware_order(home, group, seed=5))}
            for i in range(3, n_batches):
                if segment[i] == segment[i - 3]:
                    now, before = ([positions[int(w)] for w in batches[j]] for j in (i, i - 3))
                    assert min(now) == max(before) + 1 and max(now) - min(now) == 7
        assert all((np.diff(home[b]) >= 0).all() for b in batches)  # each batch sorted by chunk
    loader = list(make_dataloader(dataset, 8, seed=5, skip_batches=3))
    full = list(make_dataloader(dataset, 8, seed=5))
    assert len(loader) == n_batches - 3
    for a, b in zip(loader, full[3:]):
        torch.testing.assert_close(a["image"], b["image"])
    halves = [make_dataloader(dataset, 8, seed=5, shard=r, num_shards=2) for r in (0, 1)]
    for batch, first, second in zip(full, *halves):
        torch.testing.assert_close(torch.cat([first["image"], second["image"]]), batch["image"])
    assert shard_batch(np.arange(8), 1, 2).tolist() == [4, 5, 6, 7]


def test_worker_processes_read_the_same_batches_as_the_prefetch_thread(store):
    data = build_policy_data(DataConfig(path=store, obs_keys=["state", "image"], storage="stream", cache_mb=16,
                                        val_ratio=0.0), 8, 2, 4)
    threaded = list(make_dataloader(data.train, 8, seed=3, streams=2))
    workers = list(make_dataloader(data.train, 8, seed=3, num_workers=2))
    assert len(threaded) == len(workers) == len(data.train) // 8
    for a, b in zip(threaded, workers):
        for key in a:
            torch.testing.assert_close(a[key], b[key])


def test_a_damaged_chunk_is_named_when_streamed(tmp_path):
    path = _store(str(tmp_path / "s.zarr"))
    Path(path, "data", "img", "2.0.0.0").write_bytes(b"not a blosc frame")
    data = build_policy_data(DataConfig(path=path, obs_keys=["image"], storage="stream", val_ratio=0.0), 8, 2, 4)
    with pytest.raises(DatasetError, match=r"key 'data/img': chunk 2 \(rows 14-20\) cannot be read"):
        for _ in make_dataloader(data.train, 8, seed=0):
            pass


def test_a_nan_in_a_streamed_float_chunk_is_named(tmp_path):
    """Float arrays too large to scan at open are checked on the chunks the streaming reader decodes."""
    path = _store(str(tmp_path / "s.zarr"))
    root = zarr.open_group(path, mode="a")
    state = root["data/state"][:]
    state[17, 0] = np.nan
    root["data/state"][:] = state
    with ReplayBuffer.open(path, check_finite=False) as buffer:
        source = StoreSource(path, cache_bytes=1 << 20)
        array = ChunkedArray(source, buffer.array("state"), buffer.n_steps)
        np.testing.assert_array_equal(array[:10], state[:10])  # clean chunks read as before
        with pytest.raises(DatasetError, match=r"key 'data/state': contains NaN or inf \(first at step 17\)"):
            list(array.iter_blocks())


def _config(store: str, run_dir: Path, *overrides: str):
    return load_train_config(None, [
        f"data.path={store}", "data.obs_keys=[state]", "data.val_ratio=0.2", "data.storage=stream",
        "data.cache_mb=16", "data.shuffle_chunks=2", f"run_dir={run_dir}", "policy.network.kind=mlp",
        "policy.network.hidden_dims=[32,32]", "policy.network.time_embed_dim=16", "policy.horizon=8",
        "policy.n_action_steps=4", "loop.batch_size=16", "loop.steps=24", "loop.log_every=6", "loop.val_every=12",
        "loop.checkpoint_every=12", "loop.progress=false", "optim.lr=3e-3", "optim.warmup_steps=5", *overrides,
    ])


def test_streamed_training_resumes_exactly(store, tmp_path, monkeypatch):
    from fm_policy.trainer import Trainer

    straight = train(_config(store, tmp_path / "straight"))
    save = Trainer.save_checkpoint

    def save_then_die(self):
        path = save(self)
        if self.step == 12:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_config(store, tmp_path / "resumed"))
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    resumed = train(_config(store, tmp_path / "resumed"))
    for part in ("policy", "ema"):
        a, b = load_policy(straight / part).state_dict(), load_policy(resumed / part).state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{part}/{key} differs after resume"
    session = json.loads((tmp_path / "straight" / "training_sessions.json").read_text())[-1]
    assert session["data_storage"] == "stream"


def test_a_store_given_by_url_trains(tmp_path):
    url = f"memory://{tmp_path.name}/remote.zarr"
    _store(url)
    checkpoint = train(_config(url, tmp_path / "run", "loop.steps=4", "loop.checkpoint_every=4", "loop.val_every=0"))
    assert load_policy(checkpoint / "ema").obs_shapes == {"state": (5,)}
    with pytest.raises(DatasetError, match="read-only"):
        ReplayBuffer.open(url, mode="a")
