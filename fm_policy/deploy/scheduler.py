"""Controller-side action-chunk scheduling: one safe action per control tick from a chunk-predicting policy.

A chunk policy answers an observation history with a chunk of future actions; a controller needs one action per
tick, on time. `ChunkScheduler.step(obs)` bridges the two with one of three strategies (docs/deploy.md, section 3):

- `receding` (Diffusion Policy): execute the first `n_action_steps` actions of a chunk open loop, then re-query
  with the newest observations. Deterministic given the noise, so it is what evaluations and the end-to-end test use.
- `ensemble` (ACT's temporal ensembling): query every `ensemble_every` ticks and execute, for the current tick, the
  weighted mean of every prediction made for it, w_i = exp(-m i) with i = 0 the OLDEST prediction (m =
  `ensemble_decay`, 0.01 in ACT). Smooths the boundaries between chunks (the rollback/oscillation reported in
  RDP#18 and Data-Scaling-Laws#1) at the price of one inference per tick.
- `async` (LeRobot-style asynchronous inference): while a chunk executes, the next one is requested in the
  background once only `prefetch_steps` of its planned actions are left, so inference latency hides behind
  execution. A late chunk was computed from an observation k ticks old, so it is aligned (its first k actions are
  already in the past and dropped) and its first `blend_steps` actions are cross-faded linearly with the old plan,
  w_new = (j + 1) / (blend_steps + 1), so the commanded action never jumps at a chunk boundary.

Safety, whatever the strategy:
- every action is clamped to the training action range (the policy normaliser's min/max, sent in the server
  metadata), optionally widened by `clamp_margin` x range; a flow sampled with too few steps, or a misbehaving
  network, can overshoot it, and no training data says what a robot does out there;
- a chunk with a NaN/inf, a wrong shape, an error reply or no reply within `timeout_s` is rejected; the scheduler
  then holds the last safe action (or the `fallback_action` given at `reset`, e.g. the robot's current position),
  reports it in the returned `StepInfo` (held=True, with the reason) and in `stats`, logs a warning, and re-queries
  on the next tick. It never blocks a tick for longer than `timeout_s` waiting for a chunk.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fm_policy.deploy.protocol import PolicySpec

__all__ = ["ChunkScheduler", "ChunkSource", "SchedulerConfig", "SchedulerStats", "StepInfo"]

log = logging.getLogger("fm_policy.deploy.scheduler")

MODES = ("receding", "ensemble", "async")


class ChunkSource(Protocol):
    """Where chunks come from: `PolicyClient` (over the socket) or `LocalChunkSource` (in process)."""

    spec: PolicySpec

    def infer(self, observation: Mapping[str, Any], num_steps: int | None = None, solver: str | None = None,
              noise: np.ndarray | None = None, timeout_s: float | None = None) -> Any:
        """Reply with `.actions` (chunk_len, action_dim) from the current step on."""
        ...


@dataclass
class SchedulerConfig:
    """How chunks become per-tick actions; see the module docstring for each strategy."""

    mode: str = "receding"  # receding | ensemble | async
    n_action_steps: int | None = None  # actions executed per chunk (receding / async); None: the policy's
    ensemble_decay: float = 0.01  # ACT's m
    ensemble_every: int = 1  # ensemble: query every N ticks
    prefetch_steps: int = 2  # async: request the next chunk when this many planned actions are left
    blend_steps: int = 4  # async: actions of the overlap that are cross-faded (0: switch to the new chunk at once)
    clamp: bool = True
    clamp_margin: float = 0.0  # allowed excess beyond the training range, as a fraction of the range
    timeout_s: float | None = 2.0  # longest a tick waits for a chunk it needs now (None: wait forever)
    num_steps: int | None = None  # sampler steps per request (None: the server's default)
    solver: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"scheduler mode '{self.mode}' is unknown; choose one of {MODES}")
        if self.ensemble_decay < 0 or self.ensemble_every < 1 or self.prefetch_steps < 0 or self.blend_steps < 0:
            raise ValueError("ensemble_decay, prefetch_steps and blend_steps must be >= 0, ensemble_every >= 1")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive or None, got {self.timeout_s}")


@dataclass
class StepInfo:
    """What one tick produced; `action` is None only when nothing safe exists yet (no chunk, no fallback)."""

    action: np.ndarray | None
    held: bool = False  # the guard held the last safe action instead of a fresh one
    reason: str | None = None  # why (rejected chunk, timeout, server error), also set when a query failed
    clamped: bool = False
    queried: bool = False  # a chunk was requested this tick


@dataclass
class SchedulerStats:
    ticks: int = 0
    queries: int = 0
    chunks_used: int = 0
    held_ticks: int = 0
    rejected_chunks: int = 0  # non-finite or wrongly shaped
    timeouts: int = 0
    errors: int = 0  # error replies and lost connections
    clamped_actions: int = 0
    stale_chunks: int = 0  # async: arrived after all of its actions were in the past
    reasons: dict[str, int] = field(default_factory=dict)


class ChunkScheduler:
    """Turns a `ChunkSource` into one action per `step(observation)`; see the module docstring."""

    def __init__(self, source: ChunkSource, config: SchedulerConfig | None = None,
                 noise_fn: Callable[[], np.ndarray | None] | None = None) -> None:
        self.source = source
        self.spec = source.spec
        self.config = config or SchedulerConfig()
        self.n_exec = int(self.config.n_action_steps or self.spec.n_action_steps)
        if not 1 <= self.n_exec <= self.spec.chunk_len:
            raise ValueError(f"n_action_steps={self.n_exec} must be in [1, {self.spec.chunk_len}] (actions per chunk "
                             f"from the current step: horizon {self.spec.horizon} - n_obs_steps {self.spec.n_obs_steps} + 1)")
        if self.config.mode == "async" and self.config.prefetch_steps >= self.n_exec:
            raise ValueError(f"prefetch_steps={self.config.prefetch_steps} must be < n_action_steps={self.n_exec}")
        self.noise_fn = noise_fn
        low, high = np.asarray(self.spec.action_low, np.float64), np.asarray(self.spec.action_high, np.float64)
        margin = self.config.clamp_margin * (high - low)
        self.low, self.high = (low - margin).astype(np.float32), (high + margin).astype(np.float32)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fm-policy-prefetch") \
            if self.config.mode == "async" else None
        self.stats = SchedulerStats()
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self, fallback_action: np.ndarray | None = None) -> None:
        """Start an episode: forget history and chunks; `fallback_action` is held until a first chunk arrives."""
        self._history: dict[str, deque[np.ndarray]] = {}
        self._queue: deque[np.ndarray] = deque()  # receding / async: actions for the coming ticks
        self._predictions: list[tuple[int, np.ndarray]] = []  # ensemble: (tick of the observation, chunk)
        self._pending: Future | None = None  # async: (tick, future)
        self._pending_tick = 0
        self._chunk_tick = 0  # async: tick whose observation produced the executing chunk
        self._tick = 0
        self._held = False
        self._last_safe = None if fallback_action is None else self._clamp(np.asarray(fallback_action))[0]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def _push(self, observation: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Add this tick's observation; returns the history (n_obs_steps, ...) per key, first frame repeated."""
        n = self.spec.n_obs_steps
        for key in self.spec.obs_shapes:
            if key not in observation:
                raise KeyError(f"observation lacks key '{key}'; the policy needs {list(self.spec.obs_shapes)}")
            frame = np.asarray(observation[key], dtype=np.dtype(self.spec.obs_dtypes[key]))
            queue = self._history.setdefault(key, deque(maxlen=n))
            while len(queue) < n - 1:
                queue.append(frame)
            queue.append(frame)
        return {k: np.stack(q) for k, q in self._history.items()}

    # ------------------------------------------------------------------ chunks
    def _request(self, history: dict[str, np.ndarray]) -> np.ndarray:
        noise = self.noise_fn() if self.noise_fn is not None else None
        return self._call(history, noise)

    def _call(self, history: dict[str, np.ndarray], noise: np.ndarray | None) -> np.ndarray:
        reply = self.source.infer(history, num_steps=self.config.num_steps, solver=self.config.solver, noise=noise,
                                  timeout_s=self.config.timeout_s)
        return np.asarray(reply.actions)

    def _accept(self, chunk: Any) -> tuple[np.ndarray | None, str | None]:
        """The chunk if usable, else (None, why)."""
        chunk = np.asarray(chunk)
        if chunk.ndim != 2 or chunk.shape[1] != self.spec.action_dim or len(chunk) == 0:
            self.stats.rejected_chunks += 1
            return None, f"chunk of shape {chunk.shape} rejected (expected (T, {self.spec.action_dim}))"
        if not np.isfinite(chunk).all():
            self.stats.rejected_chunks += 1
            return None, "chunk with NaN/inf rejected"
        self.stats.chunks_used += 1
        return chunk.astype(np.float32, copy=False), None

    def _query_now(self, history: dict[str, np.ndarray]) -> tuple[np.ndarray | None, str | None]:
        """A blocking request (receding / ensemble), with every failure turned into (None, reason)."""
        self.stats.queries += 1
        try:
            return self._accept(self._request(history))
        except TimeoutError:
            self.stats.timeouts += 1
            return None, f"no chunk within timeout_s={self.config.timeout_s}"
        except Exception as exc:  # noqa: BLE001 - whatever failed, the robot must keep a safe command
            self.stats.errors += 1
            return None, f"chunk request failed: {exc}"

    def _clamp(self, action: np.ndarray) -> tuple[np.ndarray, bool]:
        action = np.asarray(action, dtype=np.float32)
        if not self.config.clamp:
            return action, False
        clipped = np.clip(action, self.low, self.high)
        return clipped, bool(np.any(clipped != action))

    # ------------------------------------------------------------------ strategies
    def _receding(self, history: dict[str, np.ndarray], info: StepInfo) -> np.ndarray | None:
        if not self._queue:
            info.queried = True
            chunk, info.reason = self._query_now(history)
            if chunk is not None:
                self._queue.extend(chunk[: self.n_exec])
        return self._queue.popleft() if self._queue else None

    def _ensemble(self, history: dict[str, np.ndarray], info: StepInfo) -> np.ndarray | None:
        t = self._tick
        if t % self.config.ensemble_every == 0 or not self._predictions:
            info.queried = True
            chunk, info.reason = self._query_now(history)
            if chunk is not None:
                self._predictions.append((t, chunk))
        self._predictions = [(s, c) for s, c in self._predictions if t - s < len(c)]  # oldest first
        if not self._predictions:
            return None
        actions = np.stack([c[t - s] for s, c in self._predictions]).astype(np.float64)
        weights = np.exp(-self.config.ensemble_decay * np.arange(len(actions)))  # w_0: the oldest prediction
        return (weights[:, None] * actions).sum(0) / weights.sum()

    def _collect(self, future: Future, wait_s: float | None, info: StepInfo) -> None:
        """Async: take a finished (or, with wait_s, soon finishing) prefetch and merge it into the plan."""
        try:
            chunk = future.result(timeout=wait_s)
        except FutureTimeout:
            self.stats.timeouts += 1
            info.reason = f"no chunk within timeout_s={self.config.timeout_s}"
            return  # keep it pending: it may still arrive and be aligned on a later tick
        except Exception as exc:  # noqa: BLE001 - as in _query_now
            self.stats.errors += 1
            info.reason = f"chunk request failed: {exc}"
            self._pending = None
            return
        self._pending = None
        chunk, info.reason = self._accept(chunk)
        if chunk is None:
            return
        age = self._tick - self._pending_tick  # ticks that passed since its observation
        aligned = chunk[age:]
        if len(aligned) == 0:
            self.stats.stale_chunks += 1
            info.reason = f"chunk arrived {age} ticks late, after all of its actions"
            return
        old = np.array(self._queue) if self._queue else np.empty((0, chunk.shape[1]), np.float32)
        overlap = min(len(old), len(aligned), self.config.blend_steps)
        weights = (np.arange(overlap) + 1.0) / (overlap + 1.0)  # linear cross-fade toward the new chunk
        merged = aligned.copy()
        merged[:overlap] = (1 - weights[:, None]) * old[:overlap] + weights[:, None] * aligned[:overlap]
        self._queue = deque(merged)
        self._chunk_tick = self._pending_tick

    def _async(self, history: dict[str, np.ndarray], info: StepInfo) -> np.ndarray | None:
        assert self._executor is not None
        if self._pending is not None and self._pending.done():
            self._collect(self._pending, 0, info)
        planned_left = self.n_exec - (self._tick - self._chunk_tick)
        if self._pending is None and (not self._queue or planned_left <= self.config.prefetch_steps):
            info.queried = True
            self.stats.queries += 1
            noise = self.noise_fn() if self.noise_fn is not None else None
            snapshot = {k: v.copy() for k, v in history.items()}
            self._pending = self._executor.submit(self._call, snapshot, noise)
            self._pending_tick = self._tick
        if not self._queue and self._pending is not None:
            self._collect(self._pending, self.config.timeout_s, info)  # nothing left to execute: wait, bounded
        return self._queue.popleft() if self._queue else None

    # ------------------------------------------------------------------ the tick
    def step(self, observation: Mapping[str, Any]) -> StepInfo:
        """This tick's action from the newest observation {key: per-step array}; never raises on a bad chunk."""
        history = self._push(observation)
        info = StepInfo(action=None)
        strategy = {"receding": self._receding, "ensemble": self._ensemble, "async": self._async}[self.config.mode]
        action = strategy(history, info)
        if action is not None and np.all(np.isfinite(action)):
            action, info.clamped = self._clamp(action)
            self.stats.clamped_actions += int(info.clamped)
            self._last_safe = action
            info.action = action
            self._held = False
        else:
            info.held = True
            info.action = self._last_safe
            info.reason = info.reason or "no action available"
            self.stats.held_ticks += 1
            self.stats.reasons[info.reason] = self.stats.reasons.get(info.reason, 0) + 1
            if not self._held:
                log.warning("tick %d: holding the last safe action (%s)", self._tick, info.reason)
            self._held = True
        self.stats.ticks += 1
        self._tick += 1
        return info

    @staticmethod
    def ensemble_weights(n: int, decay: float) -> np.ndarray:
        """Normalised ACT weights for n predictions of one tick, oldest first (documentation and tests)."""
        w = np.exp(-decay * np.arange(n))
        return w / w.sum() if n else w

