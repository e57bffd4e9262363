"""Robot-controller example: drive a simulator at a fixed control rate through the policy server.

    fm-policy serve --checkpoint runs/pusht_keypoints_flow_cpu/checkpoints/step_8000/ema &
    python -m fm_policy.deploy.controller --url ws://127.0.0.1:8000 --episodes 10 --hz 10

This is the loop a real robot runs, with Push-T standing in for the robot: read the observation, ask the
`ChunkScheduler` for this tick's action (it talks to the server and keeps the observation history), command it,
sleep until the next tick. `RateKeeper` holds the period from absolute deadlines (no drift) and counts overruns
instead of trying to catch up with a burst of ticks, which is what a motor controller wants.

With `--no-realtime` the same loop runs as fast as the policy answers (evaluation). With `noise="episode"` the
initial noise of every chunk comes from a per-episode generator seeded exactly like `fm_policy.eval.harness`, so a
served rollout reproduces the in-process evaluation of the same seeds action for action (the end-to-end test).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fm_policy.deploy.scheduler import ChunkScheduler, ChunkSource, SchedulerConfig

__all__ = ["ControllerConfig", "EpisodeLog", "RateKeeper", "run_controller", "run_episode"]


class RateKeeper:
    """Fixed-rate loop timing from absolute deadlines; an overrun re-anchors the schedule instead of bursting."""

    def __init__(self, hz: float) -> None:
        if not hz > 0:
            raise ValueError(f"control rate must be positive, got {hz} Hz")
        self.period = 1.0 / hz
        self.next = time.perf_counter() + self.period
        self.overruns = 0

    def sleep(self) -> None:
        now = time.perf_counter()
        if now < self.next:
            time.sleep(self.next - now)
            self.next += self.period
        else:
            self.overruns += 1
            self.next = now + self.period


@dataclass
class ControllerConfig:
    env: str = "pusht"
    control_hz: float = 10.0
    realtime: bool = True  # keep the control rate; False: as fast as the policy answers
    max_steps: int | None = None  # None: the env's own step limit (Push-T: 300)
    noise: str = "episode"  # episode: harness-identical per-episode noise | server: the server draws it
    torch_seed: int = 0
    record_actions: bool = False
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.noise not in ("episode", "server"):
            raise ValueError(f"noise must be 'episode' or 'server', got {self.noise!r}")


@dataclass
class EpisodeLog:
    seed: int
    max_reward: float
    total_reward: float
    success: bool
    steps: int
    queries: int
    held_ticks: int
    clamped_actions: int
    overruns: int
    tick_ms_p50: float
    tick_ms_p99: float
    wall_s: float
    actions: list[list[float]] | None = None


def _episode_noise(spec: Any, torch_seed: int, env_seed: int):
    """Noise generator identical to the eval harness's per-episode stream (same seed formula, same draws)."""
    import torch

    from fm_policy.datasets.seeds import episode_noise_seed

    generator = torch.Generator().manual_seed(episode_noise_seed(torch_seed, env_seed))
    shape = (spec.horizon, spec.action_dim)
    return lambda: torch.randn(shape, generator=generator).numpy()


def make_env_for(spec: Any, config: ControllerConfig) -> Any:
    from fm_policy.envs import env_kwargs_for_obs_keys, make_env

    kwargs = env_kwargs_for_obs_keys(config.env, list(spec.obs_shapes))
    if config.max_steps is not None:
        kwargs["max_episode_steps"] = int(config.max_steps)
    return make_env(config.env, **kwargs)


def run_episode(source: ChunkSource, env: Any, seed: int, config: ControllerConfig) -> EpisodeLog:
    """One episode of the control loop on `env` (a single, non-vectorised env) with chunks from `source`."""
    noise_fn = _episode_noise(source.spec, config.torch_seed, seed) if config.noise == "episode" else None
    scheduler = ChunkScheduler(source, config.scheduler, noise_fn=noise_fn)
    try:
        obs, info = env.reset(seed=int(seed))
        scheduler.reset(fallback_action=info.get("agent_pos"))  # Push-T: hold the pusher where it is
        rate = RateKeeper(config.control_hz) if config.realtime else None
        max_reward, total, success, steps, ticks, actions = -np.inf, 0.0, False, 0, [], []
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            step = scheduler.step(obs)
            action = step.action
            if action is None:  # nothing safe to command yet: the env's own no-op (Push-T: stay in place)
                action = np.asarray(info.get("agent_pos"), dtype=np.float32)
            if config.record_actions:
                actions.append([float(a) for a in action])
            obs, reward, terminated, truncated, info = env.step(action)
            ticks.append((time.perf_counter() - t0) * 1e3)
            steps += 1
            max_reward, total = max(max_reward, float(reward)), total + float(reward)
            success = success or bool(info.get("is_success", False))
            if terminated or truncated:
                break
            if rate is not None:
                rate.sleep()
        stats = scheduler.stats
        return EpisodeLog(
            seed=int(seed), max_reward=float(max_reward), total_reward=total, success=success, steps=steps,
            queries=stats.queries, held_ticks=stats.held_ticks, clamped_actions=stats.clamped_actions,
            overruns=rate.overruns if rate is not None else 0, tick_ms_p50=float(np.percentile(ticks, 50)),
            tick_ms_p99=float(np.percentile(ticks, 99)), wall_s=time.perf_counter() - start,
            actions=actions if config.record_actions else None,
        )
    finally:
        scheduler.close()


def run_controller(source: ChunkSource, seeds: Sequence[int], config: ControllerConfig | None = None) -> list[EpisodeLog]:
    """Episodes for `seeds`, one after the other, on one env built to emit the policy's observation keys."""
    config = config or ControllerConfig()
    env = make_env_for(source.spec, config)
    try:
        return [run_episode(source, env, seed, config) for seed in seeds]
    finally:
        env.close()


def summarize(logs: Sequence[EpisodeLog]) -> dict[str, Any]:
    return {
        "episodes": len(logs), "success_rate": float(np.mean([e.success for e in logs])),
        "mean_max_reward": float(np.mean([e.max_reward for e in logs])),
        "held_ticks": int(sum(e.held_ticks for e in logs)), "overruns": int(sum(e.overruns for e in logs)),
        "tick_ms_p99": float(max(e.tick_ms_p99 for e in logs)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Drive Push-T at a fixed control rate through a policy server.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="policy server, e.g. ws://127.0.0.1:8000")
    src.add_argument("--checkpoint", help="run the policy in this process instead (same scheduler and loop)")
    parser.add_argument("--api-key")
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--seed-start", type=int, default=100000)
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--no-realtime", action="store_true", help="do not sleep between ticks")
    parser.add_argument("--mode", choices=("receding", "ensemble", "async"), default="receding")
    parser.add_argument("--num-steps", type=int, help="sampler steps per chunk (default: the server's)")
    parser.add_argument("--max-steps", type=int, help="episode step limit (default: the env's)")
    parser.add_argument("--noise", choices=("episode", "server"), default="episode")
    args = parser.parse_args(argv)
    if args.url:
        from fm_policy.deploy.client import PolicyClient

        source: Any = PolicyClient(args.url, api_key=args.api_key)
    else:
        from fm_policy.deploy.client import LocalChunkSource
        from fm_policy.factory import load_policy

        source = LocalChunkSource(load_policy(args.checkpoint), num_steps=args.num_steps)
    config = ControllerConfig(control_hz=args.hz, realtime=not args.no_realtime, max_steps=args.max_steps,
                              noise=args.noise, scheduler=SchedulerConfig(mode=args.mode, num_steps=args.num_steps))
    try:
        logs = run_controller(source, range(args.seed_start, args.seed_start + args.episodes), config)
    finally:
        source.close()
    for e in logs:
        print(json.dumps({k: v for k, v in asdict(e).items() if k != "actions"}))
    print(json.dumps(summarize(logs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
