"""Streaming a replay buffer that does not fit in memory: chunks read on demand, decoded once into an LRU bounded in
bytes, decoded ahead in threads, and read by DataLoader worker processes or a prefetch thread.

The pieces:

- `StoreSource`: where the chunks come from (a directory, a `.zarr.zip`, or a URL that fsspec understands, e.g.
  `s3://bucket/pusht.zarr` or `memory://...`), opened once per process: DataLoader workers each open their own,
  because file handles and zarr's event loop do not survive a fork. It owns the process's chunk slabs and the small
  thread pool that decodes chunks, and splits the cache budget between the arrays streamed from the store.
- `ChunkedArray`: one stored data array, numpy-indexable along time (`a[rows]` with any integer array, slices,
  `a.shape`, `a.dtype`), so the window gather of `SequenceSampler` and everything that reads `PolicyData.arrays`
  works unchanged on it. Its decoded chunks live in a `ChunkSlab`: a preallocated array of chunk slots bounded in
  bytes, least recently used slot reused first, so a gather pins the slots it needs (decoding the missing chunks in
  parallel, straight into their slots) and copies the rows out with one numpy fancy index.
- `DerivedArray`: an observation key built from stored fields (Push-T's `keypoints`), built per gathered batch.
- `PrefetchLoader`: in-process loading (no worker processes): a background thread gathers the next batches while
  the trainer computes, and asks for the chunks of batch i + 1 to be decoded while it gathers batch i.

Chunks are decoded with numcodecs straight from the chunk's bytes when the array is chunked along time only and
uses plain codecs (zarr 2: any numcodecs compressor and filters; zarr 3: bytes + blosc / zstd / gzip): that skips
zarr's per-call machinery, which costs more than decoding a 2 MB lz4 chunk. Any other layout (sharding, chunks split
along other axes, transposes, checksums) is read through zarr itself, correctly but more slowly.

The sampler makes the access pattern chunk-friendly (`datasets/sampler.py`, chunk-aware order): each shuffle group
of chunks is visited once per epoch, so every chunk is decoded about once per epoch per reading process.
"""

from __future__ import annotations

import os
import queue
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from fm_policy.datasets.errors import DatasetError
from fm_policy.datasets.validation import check_finite_rows

DECODE_THREADS = 2  # per reading process: decoding overlaps the gather without oversubscribing small machines
MIN_CACHE_BYTES = 16 * 1024 * 1024


def is_url(path: str) -> bool:
    return "://" in str(path)


class ChunkSlab:
    """The decoded-chunk cache of one array in one process: a preallocated slab of `n_slots` chunk-sized slots.

    A chunk is decoded straight into a free slot (or the least recently used one), so the cache allocates nothing
    after start-up, and a gather is one numpy fancy index over the slab (`slab[slots, rows]`), as cheap as the
    in-memory gather. A read pins the slots it copies from, so a concurrent decode never reuses them; a chunk being
    decoded is decoded once however many threads ask for it. Memory: `n_slots` x the chunk's decoded size, touched
    as the slots fill."""

    def __init__(self, n_slots: int, chunk_shape: tuple[int, ...], dtype: np.dtype):
        self.n_slots = int(n_slots)
        self.data = np.empty((self.n_slots, *chunk_shape), dtype)
        self.slot_of: dict[int, int] = {}  # chunk -> slot, decoded
        self.loading: dict[int, tuple[int, Future]] = {}  # chunk -> (slot, future), being decoded
        self.lru: OrderedDict[int, None] = OrderedDict()  # decoded chunks, least recently used first
        self.chunk_in = [-1] * self.n_slots
        self.pins = [0] * self.n_slots
        self.free = list(range(self.n_slots - 1, -1, -1))
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def used_slots(self) -> int:
        return self.n_slots - len(self.free)

    @property
    def nbytes(self) -> int:
        """Bytes of the slots filled so far (the slab's resident size)."""
        return self.used_slots * (self.data.nbytes // max(self.n_slots, 1))

    def _slot(self) -> int | None:
        """A slot for a new chunk (caller holds the lock): a never-used one, else the least recently used unpinned
        decoded chunk's; None if every slot is pinned or loading."""
        if self.free:
            return self.free.pop()
        for chunk in self.lru:
            slot = self.slot_of[chunk]
            if not self.pins[slot]:
                del self.lru[chunk], self.slot_of[chunk]
                return slot
        return None

    def _start(self, chunk: int, decode: Callable[[int, np.ndarray], None], executor: ThreadPoolExecutor | None,
               pin: bool) -> tuple[Future, Callable[[], None]] | None:
        """Reserve a slot for `chunk` and decode into it: in `executor`, or by the caller calling the returned
        function once it has released the lock (the caller holds it here). None when no slot is free."""
        slot = self._slot()
        if slot is None:
            return None
        self.chunk_in[slot] = chunk
        if pin:
            self.pins[slot] += 1
        future: Future = Future()
        self.loading[chunk] = (slot, future)

        def run() -> None:
            try:
                decode(chunk, self.data[slot])
            except BaseException as exc:
                with self.lock:
                    del self.loading[chunk]
                    self.chunk_in[slot] = -1
                    self.free.append(slot)
                    if pin:
                        self.pins[slot] -= 1
                future.set_exception(exc)
                return
            with self.lock:
                del self.loading[chunk]
                self.slot_of[chunk] = slot
                self.lru[chunk] = None
            future.set_result(slot)

        if executor is not None:
            executor.submit(run)
        return future, run

    def acquire(self, chunks: Sequence[int], decode: Callable[[int, np.ndarray], None],
                executor: ThreadPoolExecutor | None) -> dict[int, int] | None:
        """Pin the slots of `chunks` (decoding the missing ones, in `executor` when several are missing) and return
        {chunk: slot}; release them with `release`. None when the chunks do not all fit in the slab at once."""
        pinned: dict[int, int] = {}
        waiting: dict[int, Future] = {}
        run_here: list[Callable[[], None]] = []
        started: Any = True
        with self.lock:
            missing = [c for c in chunks if c not in self.slot_of and c not in self.loading]
            use_pool = executor if len(missing) > 1 else None
            for chunk in chunks:
                if chunk in self.slot_of:
                    slot = self.slot_of[chunk]
                    self.pins[slot] += 1
                    self.lru.move_to_end(chunk)
                    pinned[chunk] = slot
                    self.hits += 1
                    continue
                self.misses += 1
                if chunk in self.loading:
                    slot, future = self.loading[chunk]
                    self.pins[slot] += 1  # pinned now: it will not be evicted between decode and read
                    waiting[chunk] = future
                    continue
                started = self._start(chunk, decode, use_pool, pin=True)
                if started is None:  # more chunks than slots: the caller reads without the cache
                    break
                waiting[chunk], run = started
                if use_pool is None:
                    run_here.append(run)
        for run in run_here:
            run()
        if started is None:
            for chunk, future in waiting.items():  # let what was started finish, then unpin everything
                try:
                    pinned[chunk] = future.result()
                except BaseException:
                    pass
            self.release(pinned.values())
            return None
        failure = None
        for chunk, future in waiting.items():
            try:
                pinned[chunk] = future.result()
            except BaseException as exc:
                failure = failure or exc
        if failure is not None:
            self.release(pinned.values())
            raise failure
        return pinned

    def release(self, slots: Iterable[int]) -> None:
        with self.lock:
            for slot in slots:
                self.pins[slot] -= 1

    def prefetch(self, chunks: Iterable[int], decode: Callable[[int, np.ndarray], None],
                 executor: ThreadPoolExecutor) -> None:
        """Start decoding the chunks that are neither decoded nor being decoded (as far as unpinned slots allow)."""
        with self.lock:
            for chunk in chunks:
                if chunk not in self.slot_of and chunk not in self.loading:
                    if self._start(chunk, decode, executor, pin=False) is None:
                        return  # every slot is pinned or loading: prefetching further would evict needed chunks


def _reuse_freed_memory() -> None:
    """Let glibc serve allocations of a few MB (a chunk's stored bytes, a gathered batch) from its heap instead of
    fresh mmaps: by default each one is a new mapping whose pages fault in one by one on first write (in a VM that
    costs more than decoding the chunk) and is unmapped again when freed; from the heap, freed memory is reused.
    Called once in each reading process; a no-op where the C library is not glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: allocations below 32 MB come from the heap
        libc.mallopt(-1, 256 * 2**20)  # M_TRIM_THRESHOLD: keep up to 256 MB of freed heap for reuse
    except (OSError, AttributeError):
        pass


class _ProcessState:
    def __init__(self) -> None:
        _reuse_freed_memory()
        self.slabs: dict[str, ChunkSlab] = {}
        self.executor: ThreadPoolExecutor | None = None
        self.group: Any = None
        self.zip: zipfile.ZipFile | None = None
        self.fs: Any = None
        self.root = ""
        self.lock = threading.Lock()


class StoreSource:
    """A store's chunks for the arrays streamed from it, plus the streaming settings shared by those arrays.

    `cache_bytes` bounds the decoded chunks that each reading process (the trainer's, each DataLoader worker's) keeps:
    arrays small enough are cached whole, the rest share the remainder in proportion to their bytes per step.
    `shuffle_chunks` is the number of chunks whose windows are shuffled together (0: as many as a quarter of the
    cache holds); `prefetch_batches` is how many batches are prepared ahead."""

    def __init__(self, path: str, storage_options: Mapping[str, Any] | None = None, cache_bytes: int = 1 << 30,
                 shuffle_chunks: int = 0, prefetch_batches: int = 4):
        self.path = str(path)
        self.storage_options = dict(storage_options or {})
        self.cache_bytes = max(int(cache_bytes), MIN_CACHE_BYTES)
        self.shuffle_chunks = int(shuffle_chunks)
        self.prefetch_batches = max(1, int(prefetch_batches))
        self._pid: int | None = None
        self._state: _ProcessState | None = None
        self.arrays: list[ChunkedArray] = []  # registered by ChunkedArray

    def __getstate__(self) -> dict[str, Any]:  # spawned workers open their own handles and cache
        return {**self.__dict__, "_pid": None, "_state": None}

    @property
    def state(self) -> _ProcessState:
        if self._pid != os.getpid() or self._state is None:
            self._state = _ProcessState()
            self._pid = os.getpid()
        return self._state

    def slots_for(self, array: ChunkedArray) -> int:
        """How many chunks of `array` this process caches (see the class docstring)."""
        whole = {a.key: a.n_chunks * a.chunk_nbytes for a in self.arrays}
        small = {k: v for k, v in whole.items() if v <= self.cache_bytes / (4 * len(self.arrays))}
        if array.key in small or array.key not in whole:
            return array.n_chunks if array.key in small else max(2, self.cache_bytes // array.chunk_nbytes)
        rest = max(self.cache_bytes - sum(small.values()), 0)
        share = rest * array.row_nbytes / sum(a.row_nbytes for a in self.arrays if a.key not in small)
        return int(min(array.n_chunks, max(2, share // array.chunk_nbytes)))

    def slab(self, array: ChunkedArray) -> ChunkSlab:
        state = self.state
        with state.lock:
            if array.key not in state.slabs:
                state.slabs[array.key] = ChunkSlab(self.slots_for(array), (array.chunk_rows, *array.row_shape),
                                                   array.stored_dtype)
            return state.slabs[array.key]

    @property
    def cached_bytes(self) -> int:
        """Decoded chunk bytes this process holds (its slabs' filled slots)."""
        return sum(slab.nbytes for slab in self.state.slabs.values())

    @property
    def executor(self) -> ThreadPoolExecutor:
        state = self.state
        with state.lock:
            if state.executor is None:
                state.executor = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="fm-policy-decode")
            return state.executor

    def group(self) -> Any:
        """The zarr root group, opened read-only in this process (for arrays read through zarr)."""
        import zarr

        state = self.state
        with state.lock:
            if state.group is None:
                if is_url(self.path):
                    state.group = zarr.open_group(self.path, mode="r", storage_options=self.storage_options or None)
                elif self.path.endswith(".zip"):
                    state.group = zarr.open_group(zarr.storage.ZipStore(self.path, mode="r"), mode="r")
                else:
                    state.group = zarr.open_group(self.path, mode="r")
            return state.group

    def read_bytes(self, key: str) -> bytes | None:
        """The stored bytes of `key` (a path inside the store), or None if the store has no such object (a chunk
        never written holds the fill value)."""
        state = self.state
        if is_url(self.path):
            if state.fs is None:
                from fsspec.core import url_to_fs

                state.fs, state.root = url_to_fs(self.path, **self.storage_options)
            try:
                return state.fs.cat_file(f"{state.root.rstrip('/')}/{key}")
            except FileNotFoundError:
                return None
        if self.path.endswith(".zip"):
            with state.lock:
                if state.zip is None:
                    state.zip = zipfile.ZipFile(self.path, "r")
                try:
                    return state.zip.read(key)
                except KeyError:
                    return None
        try:
            with open(os.path.join(self.path, key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None


class _Decoder:
    """How one array's time chunks turn from stored bytes into numpy (None fields: read through zarr)."""

    def __init__(self, array: Any):
        self.fast = False
        self.path = array.path
        self.chunk_rows = int(array.chunks[0])
        self.row_shape = tuple(int(s) for s in array.shape[1:])
        self.fill_value = array.fill_value if array.fill_value is not None else 0
        if tuple(array.chunks[1:]) != self.row_shape:
            return  # chunked along other axes too: several objects per time chunk
        meta = array.metadata
        self.key_prefix = f"{array.path}/"
        self.ndim = array.ndim
        try:
            self.dtype = np.dtype(meta.dtype.to_native_dtype())
        except AttributeError:
            return
        self.order = "C"
        if meta.zarr_format == 2:
            self.key_head, self.separator = "", meta.dimension_separator or "."
            self.codecs = [meta.compressor] if meta.compressor is not None else []
            self.codecs += list(reversed(meta.filters or ()))
            self.order = meta.order
        else:
            import numcodecs
            from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ZstdCodec

            encoding = meta.chunk_key_encoding
            self.separator = encoding.separator
            self.key_head = f"c{self.separator}" if encoding.name == "default" else ""
            codecs = list(meta.codecs)
            if not codecs or not isinstance(codecs[0], BytesCodec):
                return  # transpose, sharding or another array-to-array codec first
            endian = codecs[0].endian
            if endian is not None and self.dtype.itemsize > 1:
                self.dtype = self.dtype.newbyteorder("<" if endian.value == "little" else ">")
            decoders = {BloscCodec: numcodecs.Blosc, ZstdCodec: numcodecs.Zstd, GzipCodec: numcodecs.GZip}
            self.codecs = []
            for codec in reversed(codecs[1:]):
                if type(codec) not in decoders:
                    return  # e.g. crc32c
                self.codecs.append(decoders[type(codec)]())
        probe = (1,) + (0,) * (array.ndim - 1)
        self.fast = self.key_for(1) == self.key_prefix + meta.encode_chunk_key(probe)  # else: an unknown encoding

    def key_for(self, chunk: int) -> str:
        """The store key of time chunk `chunk` (chunk 0 along every other axis)."""
        coords = (str(chunk),) + ("0",) * (self.ndim - 1)
        return self.key_prefix + self.key_head + self.separator.join(coords)

    def decode(self, raw: bytes | None, rows: int, out: np.ndarray | None = None) -> np.ndarray:
        """The chunk's first `rows` rows, decoded from its stored bytes `raw` (None: the fill value); into `out`
        (a (chunk_rows, ...) array of the native dtype) when given, without an intermediate copy where possible."""
        native = self.dtype.newbyteorder("=")
        if out is None:
            out = np.empty((self.chunk_rows, *self.row_shape), native)
        if raw is None:
            out[:rows] = self.fill_value
            return out[:rows]
        direct = self.dtype.isnative and self.order == "C" and out.flags.c_contiguous
        buffer: Any = raw
        for i, codec in enumerate(self.codecs):
            last = i == len(self.codecs) - 1
            buffer = codec.decode(buffer, out=out.reshape(-1).view(np.uint8)) if last and direct else codec.decode(
                buffer)
        if not (direct and self.codecs):
            decoded = np.frombuffer(buffer, dtype=self.dtype).reshape((self.chunk_rows, *self.row_shape),
                                                                      order=self.order)
            out[...] = decoded
        return out[:rows]


class _RowArray:
    """What the sampler reads off an array without loading it: `n_rows` rows of `row_shape` each."""

    n_rows: int
    row_shape: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n_rows, *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)


class ChunkedArray(_RowArray):
    """A stored data array read chunk by chunk on demand; numpy-style reads along time (see the module docstring).

    `dtype` is what reads return: float data as float32 (as the in-memory path converts it), or `cast`."""

    def __init__(self, source: StoreSource, array: Any, n_rows: int, cast: np.dtype | str | None = None):
        self.source = source
        self.key = array.path.rsplit("/", 1)[-1]
        self.n_rows = int(n_rows)
        self._decoder = _Decoder(array)
        self.chunk_rows = self._decoder.chunk_rows
        self.row_shape = self._decoder.row_shape
        self.stored_dtype = np.dtype(array.dtype)
        if cast is not None:
            self.dtype = np.dtype(cast)
        else:
            self.dtype = np.dtype(np.float32) if self.stored_dtype.kind == "f" else self.stored_dtype
        self.row_nbytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.stored_dtype.itemsize
        self.chunk_nbytes = self.row_nbytes * self.chunk_rows
        self.n_chunks = -(-self.n_rows // self.chunk_rows)
        if all(a.key != self.key for a in source.arrays):
            source.arrays.append(self)

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.row_nbytes

    @property
    def fast_path(self) -> bool:
        """Whether chunks are decoded straight from their bytes (True) or read through zarr."""
        return self._decoder.fast

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return (f"ChunkedArray({self.source.path}, data/{self.key}, shape={self.shape}, dtype={self.dtype}, "
                f"chunk_rows={self.chunk_rows})")

    # ------------------------------------------------------------------ chunks
    def _rows_in(self, chunk: int) -> int:
        return min(self.chunk_rows, self.n_rows - chunk * self.chunk_rows)

    def _read_chunk(self, chunk: int, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk `chunk`'s rows, decoded (into `out`, a (chunk_rows, ...) slot, when given)."""
        rows = self._rows_in(chunk)
        first = chunk * self.chunk_rows
        try:
            decoder = self._decoder
            if decoder.fast:
                chunk_data = decoder.decode(self.source.read_bytes(decoder.key_for(chunk)), rows, out)
            else:
                chunk_data = np.asarray(self.source.group()["data"][self.key][first : first + rows])
                if out is not None:
                    out[:rows] = chunk_data
                    chunk_data = out[:rows]
        except (DatasetError, MemoryError):
            raise
        except Exception as exc:  # codec and storage errors come in many types; all mean "this store is damaged"
            raise DatasetError(
                self.source.path, f"chunk {chunk} (rows {first}-{first + rows - 1}) cannot be read: "
                f"{type(exc).__name__}: {str(exc)[:200]}; the store is truncated or corrupt (re-download or "
                "re-collect it)", key=f"data/{self.key}") from None
        if chunk_data.shape[0] != rows:
            raise DatasetError(self.source.path, f"chunk {chunk} holds {chunk_data.shape[0]} rows, expected {rows}",
                               key=f"data/{self.key}")
        # opening a store scans only float arrays small enough (datasets/validation.py); the large ones are checked
        # here, on the chunks a run actually reads (a no-op for the uint8 images collected stores hold)
        check_finite_rows(chunk_data, first, self.source.path, self.key)
        return chunk_data

    def _decode_into(self, chunk: int, slot: np.ndarray) -> None:
        self._read_chunk(chunk, slot)

    def prefetch(self, rows: np.ndarray) -> None:
        """Start decoding (in the background) the chunks that a read of `rows` will need."""
        ids = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1) // self.chunk_rows)
        self.source.slab(self).prefetch(ids.tolist(), self._decode_into, self.source.executor)

    def iter_blocks(self) -> Iterator[np.ndarray]:
        """Every chunk in order, as `dtype`, decoded a few ahead in the thread pool and not kept in the cache (a
        statistics pass over the whole store must not flush the training cache)."""
        executor = self.source.executor
        ahead: list[Future] = []
        next_chunk = 0
        while next_chunk < self.n_chunks or ahead:
            while next_chunk < self.n_chunks and len(ahead) < DECODE_THREADS + 1:
                ahead.append(executor.submit(self._read_chunk, next_chunk))
                next_chunk += 1
            yield ahead.pop(0).result().astype(self.dtype, copy=False)

    # ------------------------------------------------------------------ numpy-style reads
    def take(self, rows: np.ndarray) -> np.ndarray:
        """`array[rows]` for an integer array of any shape: (*rows.shape, *row_shape) of `dtype`."""
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.n_rows):
            bad = int(flat[(flat < 0) | (flat >= self.n_rows)][0])
            raise IndexError(f"row {bad} is out of range for {self!r}")
        chunk_of = flat // self.chunk_rows
        ids = np.unique(chunk_of)
        slab = self.source.slab(self)
        slots = slab.acquire(ids.tolist(), self._decode_into, self.source.executor) if flat.size else {}
        if slots is None:  # the read needs more chunks than the cache holds: chunk by chunk, uncached
            out = np.empty((flat.size, *self.row_shape), self.stored_dtype)
            for chunk in ids.tolist():
                sel = np.flatnonzero(chunk_of == chunk)
                out[sel] = self._read_chunk(chunk)[flat[sel] - chunk * self.chunk_rows]
        else:
            try:  # one fancy index over the slab, as cheap as the in-memory gather
                slot_of_chunk = np.array([slots[c] for c in ids.tolist()], dtype=np.int64)
                out = slab.data[slot_of_chunk[np.searchsorted(ids, chunk_of)], flat - chunk_of * self.chunk_rows]
            finally:
                slab.release(slots.values())
        return out.astype(self.dtype, copy=False).reshape(*rows.shape, *self.row_shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            return self.take(np.arange(*index.indices(self.n_rows)))
        if np.isscalar(index):
            return self.take(np.asarray([index]))[0]
        return self.take(np.asarray(index))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(f"{self!r} is streamed from its store; it is not converted to one in-memory array (read "
                        "rows with a[rows], or whole chunks with iter_blocks())")


class DerivedArray(_RowArray):
    """An observation key built from stored fields by a row-wise recipe (`EnvSpec.derived_keys`), built for the rows
    of each read."""

    def __init__(self, sources: Mapping[str, Any], build: Callable[[Mapping[str, np.ndarray]], np.ndarray]):
        self.sources = dict(sources)
        self.build = build
        self.n_rows = len(next(iter(self.sources.values())))
        probe = np.asarray(build({k: s[np.array([0])] for k, s in self.sources.items()}))
        self.row_shape = tuple(probe.shape[1:])
        self.dtype = np.dtype(np.float32) if probe.dtype.kind == "f" else probe.dtype

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            index = np.arange(*index.indices(self.n_rows))
        rows = np.asarray(index, dtype=np.int64)
        flat = rows.reshape(-1)
        built = np.asarray(self.build({k: s[flat] for k, s in self.sources.items()}))
        return built.astype(self.dtype, copy=False).reshape(*rows.shape, *self.row_shape)

    def prefetch(self, rows: np.ndarray) -> None:
        for source in self.sources.values():
            if hasattr(source, "prefetch"):
                source.prefetch(rows)

    def iter_blocks(self) -> Iterator[np.ndarray]:
        block = max((getattr(s, "chunk_rows", 0) for s in self.sources.values()), default=0) or 65536
        for start in range(0, self.n_rows, block):
            yield self[np.arange(start, min(start + block, self.n_rows))]


def stored_nbytes(buffer: Any, keys: Iterable[str]) -> int:
    """Decoded size of the data arrays `keys` of a replay buffer (what loading them into memory takes)."""
    total = 0
    for key in dict.fromkeys(keys):
        array = buffer.array(key)
        total += int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize
    return total


# ---------------------------------------------------------------------------------------------- in-process loading
_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class PrefetchLoader:
    """Iterates `dataset[indices]` for each index batch of `batches`, gathered in a background thread up to `depth`
    batches ahead of the consumer; before gathering batch i it asks the dataset to start decoding the chunks of
    batch i + depth (`dataset.prefetch`), so decoding runs in the thread pool while batches are gathered. Errors in the thread (e.g. a damaged chunk's `DatasetError`) are raised to the
    consumer. Stopping early (break, an exception in the training step) stops the thread."""

    def __init__(self, dataset: Any, batches: Sequence[np.ndarray], depth: int = 4):
        self.dataset = dataset
        self.batches = list(batches)
        self.depth = max(1, int(depth))

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        results: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    results.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                prefetch = getattr(self.dataset, "prefetch", None)
                ahead = self.depth
                for i, indices in enumerate(self.batches):
                    if stop.is_set():
                        return
                    if prefetch is not None:  # decode the chunks of the batches up to `depth` ahead meanwhile
                        for j in range(i + 1 if i == 0 else i + ahead, min(i + ahead, len(self.batches) - 1) + 1):
                            prefetch(self.batches[j])
                    if not put(self.dataset[indices]):
                        return
                put(_END)
            except BaseException as exc:  # handed to the consumer, which raises it
                put(_Failure(exc))

        thread = threading.Thread(target=work, name="fm-policy-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = results.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            stop.set()
            thread.join(timeout=5.0)
