"""ChunkScheduler: receding horizon, temporal ensembling, async prefetch with blending, clamping, and the guard that
holds the last safe action on NaN chunks, timeouts and server errors. A scripted chunk source makes every expected
action computable by hand."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from fm_policy.deploy.client import ServerError
from fm_policy.deploy.protocol import PolicySpec
from fm_policy.deploy.scheduler import ChunkScheduler, SchedulerConfig


def _spec(**overrides) -> PolicySpec:
    values: dict = {"obs_shapes": {"state": [1]}, "obs_dtypes": {"state": "<f4"}, "action_dim": 1, "horizon": 8,
                    "n_obs_steps": 2, "n_action_steps": 4, "policy_type": "flow", "num_steps": 4, "max_num_steps": 16,
                    "solver": "euler", "solvers": ["euler"], "action_low": [-1000.0], "action_high": [1000.0]}
    values.update(overrides)
    return PolicySpec(**values)


class ScriptedSource:
    """Call k answers chunk[j] = 100 k + j (j = 0 .. chunk_len - 1), unless `script[k]` says otherwise.

    script[k] may be an array (returned), an exception (raised), or a threading.Event (wait for it, then answer).
    """

    def __init__(self, spec: PolicySpec | None = None, script: dict | None = None) -> None:
        self.spec = spec or _spec()
        self.script = script or {}
        self.calls: list[dict] = []

    def infer(self, observation, num_steps=None, solver=None, noise=None, timeout_s=None):
        k = len(self.calls)
        self.calls.append({"observation": {key: v.copy() for key, v in observation.items()}, "noise": noise,
                           "num_steps": num_steps})
        item = self.script.get(k)
        if isinstance(item, threading.Event):
            if not item.wait(10):
                raise TimeoutError("test event never set")
            item = None
        if isinstance(item, BaseException):
            raise item
        chunk = item if item is not None else (100.0 * k + np.arange(self.spec.chunk_len))[:, None]
        return SimpleNamespace(actions=np.asarray(chunk, dtype=np.float32))


def _obs(t: float) -> dict[str, np.ndarray]:
    return {"state": np.array([t], np.float32)}


def _run(scheduler: ChunkScheduler, ticks: int) -> list:
    return [scheduler.step(_obs(t)) for t in range(ticks)]


def test_receding_horizon_executes_n_action_steps_then_requeries_with_history():
    source = ScriptedSource()
    scheduler = ChunkScheduler(source, SchedulerConfig(num_steps=3), noise_fn=lambda: np.zeros((8, 1), np.float32))
    steps = _run(scheduler, 10)
    assert [float(s.action[0]) for s in steps] == [0, 1, 2, 3, 100, 101, 102, 103, 200, 201]
    assert [s.queried for s in steps] == [True, False, False, False, True, False, False, False, True, False]
    assert len(source.calls) == 3 and source.calls[0]["num_steps"] == 3
    # history: the first observation repeated after reset, then the last n_obs_steps observations
    assert source.calls[0]["observation"]["state"].ravel().tolist() == [0, 0]
    assert source.calls[1]["observation"]["state"].ravel().tolist() == [3, 4]
    assert source.calls[0]["noise"].shape == (8, 1)
    assert not any(s.held for s in steps) and scheduler.stats.chunks_used == 3


def test_reset_forgets_history_and_queue():
    source = ScriptedSource()
    scheduler = ChunkScheduler(source)
    _run(scheduler, 2)
    scheduler.reset()
    assert float(scheduler.step(_obs(7)).action[0]) == 100  # a fresh query, not the old chunk's third action
    assert source.calls[1]["observation"]["state"].ravel().tolist() == [7, 7]


def test_temporal_ensembling_uses_act_weights_oldest_first():
    decay = 0.5
    source = ScriptedSource()
    scheduler = ChunkScheduler(source, SchedulerConfig(mode="ensemble", ensemble_decay=decay))
    steps = _run(scheduler, 9)
    for t, step in enumerate(steps):
        # predictions for tick t: chunk k (queried at tick k) holds 100 k + (t - k), for k = max(0, t - 6) .. t
        ks = [k for k in range(t + 1) if t - k < 7]
        values = np.array([100.0 * k + (t - k) for k in ks])
        weights = np.exp(-decay * np.arange(len(ks)))  # index 0: the oldest prediction gets the largest weight
        expected = (weights * values).sum() / weights.sum()
        assert step.action[0] == pytest.approx(expected, rel=1e-6), t
    assert len(source.calls) == 9
    assert np.allclose(ChunkScheduler.ensemble_weights(3, 0.01).sum(), 1.0)


def test_ensembling_survives_a_failed_query_without_holding():
    source = ScriptedSource(script={1: ServerError("internal_error", "boom")})
    scheduler = ChunkScheduler(source, SchedulerConfig(mode="ensemble", ensemble_decay=0.0))
    steps = _run(scheduler, 3)
    assert float(steps[1].action[0]) == 1.0 and not steps[1].held and "boom" in steps[1].reason
    assert scheduler.stats.errors == 1


def test_async_prefetch_aligns_late_chunk_and_blends_overlap():
    release = threading.Event()
    source = ScriptedSource(script={1: release})
    scheduler = ChunkScheduler(source, SchedulerConfig(mode="async", prefetch_steps=1, blend_steps=2))
    try:
        steps = [scheduler.step(_obs(t)) for t in range(4)]  # tick 0 blocks for chunk 0; tick 3 prefetches
        assert [float(s.action[0]) for s in steps] == [0, 1, 2, 3]
        assert [s.queried for s in steps] == [True, False, False, True]
        assert float(scheduler.step(_obs(4)).action[0]) == 4  # chunk 1 not there yet: executes chunk 0's reserve
        release.set()
        deadline = time.monotonic() + 5
        while not scheduler._pending.done() and time.monotonic() < deadline:
            time.sleep(0.001)
        # chunk 1 was computed from tick 3's observation: 2 ticks old at tick 5, so its actions 102, 103, ... are due;
        # the first two are cross-faded with the old plan (5, 6) with new-chunk weights 1/3, 2/3
        got = [float(scheduler.step(_obs(t)).action[0]) for t in range(5, 9)]
        assert got == pytest.approx([2 / 3 * 5 + 1 / 3 * 102, 1 / 3 * 6 + 2 / 3 * 103, 104, 105])
        assert source.calls[1]["observation"]["state"].ravel().tolist() == [2, 3]
        assert scheduler.stats.held_ticks == 0
    finally:
        scheduler.close()


def test_async_hides_latency_at_a_fixed_rate():
    """With 30 ms inference and 10 ms ticks, prefetching keeps every tick supplied after the first chunk."""

    class Slow(ScriptedSource):
        def infer(self, *args, **kwargs):
            time.sleep(0.03)
            return super().infer(*args, **kwargs)

    source = Slow(_spec(horizon=16, n_action_steps=8))
    scheduler = ChunkScheduler(source, SchedulerConfig(mode="async", prefetch_steps=4))
    try:
        for t in range(40):
            step = scheduler.step(_obs(t))
            assert not step.held, (t, step.reason)
            time.sleep(0.01)
        assert scheduler.stats.queries >= 5
    finally:
        scheduler.close()


def test_actions_are_clamped_to_the_training_range():
    spec = _spec(action_low=[0.0], action_high=[150.0])
    scheduler = ChunkScheduler(ScriptedSource(spec), SchedulerConfig(n_action_steps=4))
    steps = _run(scheduler, 8)
    assert [float(s.action[0]) for s in steps] == [0, 1, 2, 3, 100, 101, 102, 103]
    source = ScriptedSource(spec, script={0: np.array([[-5.0], [200.0], [7.0], [8.0], [9.0], [10.0], [11.0]])})
    scheduler = ChunkScheduler(source, SchedulerConfig(clamp_margin=0.1))  # range widened by 15 on each side
    got = _run(scheduler, 3)
    assert [float(s.action[0]) for s in got] == [-5.0, 165.0, 7.0] and [s.clamped for s in got] == [False, True, False]
    assert scheduler.stats.clamped_actions == 1


@pytest.mark.parametrize("failure, words", [
    (np.full((7, 1), np.nan), "NaN"),
    (np.zeros((7, 3)), "shape"),
    (TimeoutError(), "timeout"),
    (ServerError("bad_shape", "observation/state has shape"), "bad_shape"),
    (ConnectionError("connection closed"), "connection closed"),
])
def test_guard_holds_last_safe_action_and_reports(failure, words):
    source = ScriptedSource(script={1: failure})
    scheduler = ChunkScheduler(source)
    steps = _run(scheduler, 6)
    assert [float(s.action[0]) for s in steps[:4]] == [0, 1, 2, 3]
    held = steps[4]
    assert held.held and float(held.action[0]) == 3.0 and words in held.reason
    assert float(steps[5].action[0]) == 200.0 and not steps[5].held  # re-queried on the next tick
    assert scheduler.stats.held_ticks == 1 and sum(scheduler.stats.reasons.values()) == 1


def test_guard_uses_the_fallback_before_any_chunk():
    source = ScriptedSource(script={0: np.full((7, 1), np.inf)})
    scheduler = ChunkScheduler(source)
    scheduler.reset(fallback_action=np.array([42.0]))
    step = scheduler.step(_obs(0))
    assert step.held and float(step.action[0]) == 42.0
    scheduler.reset()
    source.script = {0: np.full((7, 1), np.nan)}
    source.calls.clear()
    step = scheduler.step(_obs(0))
    assert step.held and step.action is None  # nothing safe exists: say so instead of inventing an action


def test_async_tick_never_waits_longer_than_timeout():
    stuck = threading.Event()
    source = ScriptedSource(script={1: stuck})
    scheduler = ChunkScheduler(source, SchedulerConfig(mode="async", prefetch_steps=1, timeout_s=0.05))
    try:
        _run(scheduler, 8)  # executes chunk 0 to its end (actions 0..6); chunk 1 is stuck
        start = time.perf_counter()
        step = scheduler.step(_obs(8))
        assert time.perf_counter() - start < 0.5
        assert step.held and float(step.action[0]) == 6.0 and "timeout" in step.reason
    finally:
        stuck.set()
        scheduler.close()


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="mode"):
        SchedulerConfig(mode="streaming")
    with pytest.raises(ValueError, match="n_action_steps"):
        ChunkScheduler(ScriptedSource(), SchedulerConfig(n_action_steps=99))
    with pytest.raises(ValueError, match="prefetch_steps"):
        ChunkScheduler(ScriptedSource(), SchedulerConfig(mode="async", prefetch_steps=4))
    with pytest.raises(KeyError, match="state"):
        ChunkScheduler(ScriptedSource()).step({"image": np.zeros(1)})
