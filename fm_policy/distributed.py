"""Data-parallel training support: the process group (through accelerate), and per-sample random draws that do not
depend on how a batch is split across processes.

Launch any training entry point with `accelerate launch` or `torchrun`; accelerate reads the launcher's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) and initialises the process group (NCCL on GPUs, gloo on CPUs). This
module never starts processes itself.

Why draws are sharded: a flow-matching loss draws noise and a flow time for every sample of a batch. If each of N
processes drew its own (B/N, ...) noise from identically seeded generators, every process would draw the *same*
values for different samples, and the run would differ from a one-process run of the same global batch (and from
itself when resumed with another process count). Inside `sharded_draws(local, start, total)` (the trainer enters it
around every forward pass), `per_sample(draw, n)` with `n == local` draws for the whole global (micro-)batch of
`total` samples and keeps rows `[start, start + local)`: every process consumes the same random numbers as one
process would, keeps its generator state identical to the others', and sample i always gets the draw it would get
in a one-process run. Policy types draw per-sample randomness through `fm_policy.flow_matching.sample_noise`,
`TimeSampler.sample` or `per_sample` to get this for free; a draw with an explicit `generator` is left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _Shard:
    local: int
    start: int
    total: int


_SHARD: _Shard | None = None


@contextlib.contextmanager
def sharded_draws(local: int, start: int, total: int) -> Iterator[None]:
    """Within the block, per-sample draws of `local` rows are rows [start, start + local) of a `total`-row draw."""
    global _SHARD
    previous = _SHARD
    _SHARD = _Shard(local, start, total) if total != local else None
    try:
        yield
    finally:
        _SHARD = previous


def per_sample(draw: Callable[[int], torch.Tensor], n: int) -> torch.Tensor:
    """`draw(n)` (a tensor whose first axis is the sample), or this process's rows of `draw(total)` inside
    `sharded_draws` when `n` is the local batch size."""
    shard = _SHARD
    if shard is None or n != shard.local:
        return draw(n)
    return draw(shard.total)[shard.start : shard.start + shard.local]


def use_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def process_state(device: str = "auto"):
    """accelerate's `PartialState` (a process-wide singleton: the Trainer's Accelerator shares it). Creating it
    initialises the process group when the process was started by `accelerate launch` or `torchrun`."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu(device))


def is_main_process(device: str = "auto") -> bool:
    return process_state(device).is_main_process


@contextlib.contextmanager
def main_process_first(device: str = "auto") -> Iterator[None]:
    """The main process runs the block first (e.g. writes a cache), the others after it (and then read it)."""
    with process_state(device).main_process_first():
        yield


def barrier(device: str = "auto") -> None:
    process_state(device).wait_for_everyone()
