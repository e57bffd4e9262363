"""End to end on real Push-T: the robot-controller loop driven through the websocket server equals the same loop in
process, and both equal the evaluation harness, action for action, on the same seeds; plus a 10 Hz real-time run."""

from __future__ import annotations

import numpy as np
import pytest
from deploy_utils import tiny_policy

from fm_policy.deploy.client import LocalChunkSource, PolicyClient
from fm_policy.deploy.controller import ControllerConfig, run_controller, summarize
from fm_policy.deploy.scheduler import SchedulerConfig
from fm_policy.deploy.server import PolicyServer, ServerConfig, ServerThread

SEEDS = [100000, 100001, 100002]
MAX_STEPS = 48


@pytest.fixture(scope="module")
def policy():
    return tiny_policy("unet")


@pytest.fixture(scope="module")
def served(policy):
    # action_range="flag": the harness executes raw chunks, so the server reports out-of-range actions, not clamps them
    with ServerThread(PolicyServer(policy, ServerConfig(port=0, log_every=0, action_range="flag"))) as running, \
            PolicyClient(running.url) as client:
        yield client


def test_served_equals_in_process_equals_harness(policy, served):
    from fm_policy.eval.harness import evaluate

    # clamping off: the harness executes raw chunks, and this untrained policy does leave the training action range
    config = ControllerConfig(realtime=False, max_steps=MAX_STEPS, record_actions=True,
                              scheduler=SchedulerConfig(clamp=False))
    remote = run_controller(served, SEEDS, config)
    local = run_controller(LocalChunkSource(policy, action_range="flag"), SEEDS, config)
    for r, lo in zip(remote, local, strict=True):
        assert r.seed == lo.seed and r.steps == lo.steps == MAX_STEPS
        assert np.array_equal(np.array(r.actions), np.array(lo.actions)), r.seed  # bit-identical commands
        assert r.max_reward == lo.max_reward and r.success == lo.success and r.held_ticks == 0
        assert r.queries == MAX_STEPS // 8
    # the evaluation harness (MultiStepWrapper, vectorised env, its own noise streams) scores the same episodes
    report = evaluate(policy, "pusht", {"obs_mode": "keypoints"}, n_episodes=len(SEEDS), seed_start=SEEDS[0],
                      max_episode_steps=MAX_STEPS, n_envs=1, progress=False)
    harness = {e.seed: e for e in report.settings[0].episodes}
    for r in remote:
        assert r.max_reward == pytest.approx(harness[r.seed].max_reward, abs=1e-9)  # pymunk: ~1e-16 history noise
        assert r.success == harness[r.seed].success
    # with the default safety clamp the served and in-process loops still agree bit for bit
    clamped = ControllerConfig(realtime=False, max_steps=MAX_STEPS, record_actions=True)
    remote_c, local_c = run_controller(served, SEEDS[:2], clamped), run_controller(LocalChunkSource(policy, action_range="flag"), SEEDS[:2], clamped)
    assert [e.actions for e in remote_c] == [e.actions for e in local_c]
    assert sum(e.clamped_actions for e in remote_c) > 0  # and the clamp did act on this untrained policy
    success_served = np.mean([e.success for e in remote])
    assert success_served == report.settings[0].success.value
    assert len({round(e.max_reward, 6) for e in remote}) > 1  # the episodes differ: the comparison is not vacuous


@pytest.mark.parametrize("mode", ["receding", "ensemble", "async"])
def test_controller_keeps_10_hz_through_the_server(served, mode):
    config = ControllerConfig(control_hz=10.0, realtime=True, max_steps=15,
                              scheduler=SchedulerConfig(mode=mode, prefetch_steps=3))
    (episode,) = run_controller(served, [SEEDS[0]], config)
    assert episode.steps == 15 and episode.held_ticks == 0
    assert 1.3 <= episode.wall_s <= 2.0  # 14 sleeps of 100 ms; a loop that ignores the rate finishes in ~0.1 s
    assert episode.overruns <= 1  # a tick may overrun on a loaded CI machine, not the loop
    assert summarize([episode])["episodes"] == 1
