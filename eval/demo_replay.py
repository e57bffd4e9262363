"""Open-loop replay of stored demonstrations: feed each episode's stored actions to the simulator from the episode's
own start, and compare what the simulator does with what the store recorded.

Why: when a policy falls short of the demonstrations it imitates, the first suspect to rule out is the path between
them. If the env (its version, physics settings, action conversion, reset) does not reproduce a demo under the demo's
own actions, no policy trained on those actions can, and the gap belongs to the env or the data, not to the learner.
Conversely, a store that replays exactly proves the data -> env action path for that suite.

Each suite starts an episode the way its store allows:

- Push-T: `reset_to_state` from the first stored state (agent position and block pose; the store has no velocities,
  so a demo whose agent was already moving at row 0 starts slightly differently). Works for diffusion_policy's human
  demos and for collected ones.
- Franka Kitchen: `reset(seed=meta/env_seed)`; the scene is the same for every seed and the seed drives the
  observation noise, so a collected demo replays bit for bit.
- Robomimic: `reset(seed=meta/env_seed, options={"state": sim_state[0]})` (the seed re-draws the episode's geometry,
  e.g. Lift's cube size); converted robomimic files have no seed and restore the state alone.

Reported per episode: the largest and final gap between the stored and the replayed state trajectories (in the
suite's own units, named in `units`), the first step where the gap exceeds the suite's tolerance, and whether the
replay succeeds. Used by `fm-policy dataset replay` and the diagnosis benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from fm_policy.datasets.replay_buffer import ReplayBuffer

from fm_policy.errors import UserError


@dataclass
class EpisodeReplay:
    index: int
    steps: int
    success: bool  # the replay reaches the task's success criterion
    score: float  # Push-T: max clip(coverage / 0.95); Kitchen: tasks completed; Robomimic: success as 0/1
    gap_max: float  # largest stored-vs-replayed state gap over the episode (units of the suite)
    gap_final: float
    diverged_at: int | None  # first row whose gap exceeds the suite's tolerance (None: never)


@dataclass
class ReplaySummary:
    store: str
    env: str
    units: str
    tolerance: float
    episodes: list[EpisodeReplay] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        n = len(self.episodes)
        gaps = np.array([e.gap_final for e in self.episodes]) if n else np.zeros(0)
        return {
            "store": self.store, "env": self.env, "units": self.units, "tolerance": self.tolerance,
            "episodes": n,
            "success_rate": float(np.mean([e.success for e in self.episodes])) if n else math.nan,
            "mean_score": float(np.mean([e.score for e in self.episodes])) if n else math.nan,
            "diverged_fraction": float(np.mean([e.diverged_at is not None for e in self.episodes])) if n else math.nan,
            "gap_final_median": float(np.median(gaps)) if n else math.nan,
            "gap_final_p90": float(np.quantile(gaps, 0.9)) if n else math.nan,
            "per_episode": [asdict(e) for e in self.episodes],
        }


def _pusht_gap(stored: np.ndarray, replayed: np.ndarray) -> np.ndarray:
    """Per-row gap of Push-T states [agent xy, block xy, angle]: the largest position error in pixels, with the
    angle error counted as the arc it moves the block's far end through (radius 100 px, about the T's size)."""
    pos = np.abs(stored[:, :4] - replayed[:, :4]).max(axis=1)
    dangle = np.abs((stored[:, 4] - replayed[:, 4] + np.pi) % (2 * np.pi) - np.pi)
    return np.maximum(pos, 100.0 * dangle)


def _replay_pusht(buffer: ReplayBuffer, indices: Iterable[int], tolerance: float) -> list[EpisodeReplay]:
    from fm_policy.envs import make_env
    from fm_policy.envs.pusht import SUCCESS_THRESHOLD, reset_state_for_pose
    from fm_policy.envs.pusht_spec import store_goal_pose

    source = buffer.attrs.get("source") if isinstance(buffer.attrs.get("source"), Mapping) else {}
    env = make_env("pusht", goal_pose=store_goal_pose(buffer.attrs), **dict(source.get("env_kwargs") or {}))
    # a DART-style store (collected with action noise) labels the expert's target; the env ran `executed_action`
    executed = "executed_action" if "executed_action" in buffer.keys else "action"
    episodes = _episode_reader(buffer, ["state", executed])
    out = []
    try:
        for index in indices:
            ep = episodes(index)
            ep["action"] = ep[executed]
            state0 = ep["state"][0].astype(np.float64)
            _, info = env.reset(options={"reset_to_state": reset_state_for_pose(state0[:2], state0[2:5])})
            replayed, coverage = [], []
            for action in ep["action"]:
                _, _, _, _, info = env.step(action)
                pose = info["block_pose"]
                replayed.append([*info["agent_pos"], pose[0], pose[1], pose[2]])
                coverage.append(info["coverage"])
            # row t+1 of the store is the state after action t; the last action's outcome is not stored
            gap = _pusht_gap(ep["state"][1:].astype(np.float64), np.asarray(replayed)[:-1])
            cov = np.asarray(coverage)
            out.append(_episode(index, len(ep["action"]), bool((cov > SUCCESS_THRESHOLD).any()),
                                float(np.clip(cov / 0.95, 0, 1).max()), gap, tolerance))
    finally:
        env.close()
    return out


def _replay_kitchen(buffer: ReplayBuffer, indices: Iterable[int], tolerance: float) -> list[EpisodeReplay]:
    from fm_policy.envs import make_env

    source = buffer.attrs.get("source") or {}
    tasks = list(source.get("tasks") or [])
    env = make_env("kitchen", tasks=tasks, max_episode_steps=int(source.get("max_steps", 280)),
                   **dict(source.get("env_kwargs") or {}))
    seeds = _env_seeds(buffer)
    episodes = _episode_reader(buffer, ["state", "action", "completed"])
    out = []
    try:
        for index in indices:
            ep = episodes(index)
            env.reset(seed=int(seeds[index]))
            replayed, done = [], set()
            for action in ep["action"]:
                obs, _, _, _, info = env.step(action)
                replayed.append(obs["state"])
                done |= {t for t in tasks if info.get(f"completed/{t}")}
            gap = np.abs(ep["state"][1:].astype(np.float64) - np.asarray(replayed, np.float64)[:-1]).max(axis=1)
            # success as the recorder defines it: every task the demo completed is completed again
            stored_done = {t for t, flag in zip(tasks, ep["completed"][-1]) if flag}
            out.append(_episode(index, len(ep["action"]), stored_done <= done, float(len(done)), gap, tolerance))
    finally:
        env.close()
    return out


def _replay_robomimic(buffer: ReplayBuffer, indices: Iterable[int], tolerance: float) -> list[EpisodeReplay]:
    from fm_policy.envs.robomimic import RobomimicEnv

    env_args = buffer.attrs.get("env_args") or (buffer.attrs.get("source") or {}).get("env_args")
    if env_args is None:
        raise UserError(f"{buffer.path}: a robomimic store needs its env_args attribute to rebuild the simulator")
    if "sim_state" not in buffer.keys:
        raise UserError(f"{buffer.path}: a robomimic store needs data/sim_state (the MuJoCo states) to be replayed")
    env = RobomimicEnv.from_env_args(env_args, max_episode_steps=10**6)
    seeds = _env_seeds(buffer) if "env_seed" in buffer.meta else None
    episodes = _episode_reader(buffer, ["sim_state", "action"])
    out = []
    try:
        for index in indices:
            ep = episodes(index)
            env.reset(seed=None if seeds is None else int(seeds[index]), options={"state": ep["sim_state"][0]})
            replayed, success = [], False
            for action in ep["action"]:
                _, _, _, _, info = env.step(action)
                replayed.append(env.get_state())
                success = success or bool(info["is_success"])
            # compare positions and velocities, not the time entry (column 0)
            gap = np.abs(ep["sim_state"][1:, 1:] - np.asarray(replayed)[:-1, 1:]).max(axis=1)
            out.append(_episode(index, len(ep["action"]), success, float(success), gap, tolerance))
    finally:
        env.close()
    return out


_SUITES: dict[str, tuple[Callable[..., list[EpisodeReplay]], str, float]] = {
    # suite -> (replay, units of the gap, default tolerance)
    "pusht": (_replay_pusht, "px (angle as arc at 100 px)", 5.0),
    "kitchen": (_replay_kitchen, "max abs difference of the 59-D observation", 1e-3),
    "robomimic": (_replay_robomimic, "max abs difference of MuJoCo qpos/qvel", 1e-3),
}


def _episode(index: int, steps: int, success: bool, score: float, gap: np.ndarray, tolerance: float) -> EpisodeReplay:
    over = np.flatnonzero(gap > tolerance)
    return EpisodeReplay(index=int(index), steps=int(steps), success=bool(success), score=float(score),
                         gap_max=float(gap.max()) if gap.size else 0.0, gap_final=float(gap[-1]) if gap.size else 0.0,
                         diverged_at=int(over[0]) + 1 if over.size else None)


def _episode_reader(buffer: ReplayBuffer, keys: list[str]) -> Callable[[int], dict[str, np.ndarray]]:
    """Episode `i`'s arrays for `keys`, read from one whole-array load: reading episode by episode decompresses the
    same chunks again for every episode (25x slower on diffusion_policy's zipped Push-T store)."""
    buffer.require(keys)
    arrays = buffer.load(keys)
    ends = buffer.episode_ends
    starts = np.concatenate([[0], ends[:-1]])
    return lambda i: {k: v[starts[i]:ends[i]] for k, v in arrays.items()}


def _env_seeds(buffer: ReplayBuffer) -> np.ndarray:
    if "env_seed" not in buffer.meta:
        raise UserError(f"{buffer.path}: meta/env_seed is missing, so the episodes' starts are unknown (collected "
                        "stores record it)")
    return np.asarray(buffer.meta["env_seed"][:])


def store_suite(buffer: ReplayBuffer, env: str | None = None) -> str:
    """The suite a store's episodes come from: `env` if given, else the env the collector or converter recorded."""
    name = env or (buffer.attrs.get("source") or {}).get("env")
    if name is None and buffer.attrs.get("env_args"):
        name = "robomimic"
    if name is None:
        raise UserError(f"{buffer.path}: the store does not record its env; pass it (e.g. --env pusht for "
                        "diffusion_policy's Push-T demos)")
    suite = str(name).split("/")[0]
    if suite not in _SUITES:
        raise UserError(f"no open-loop replay for env '{name}'; known suites: {sorted(_SUITES)}")
    return suite


def replay_store(path: str, env: str | None = None, episodes: int | None = None,
                 tolerance: float | None = None) -> ReplaySummary:
    """Replays the first `episodes` episodes (all by default) of the store at `path` open loop."""
    with ReplayBuffer.open(path) as buffer:
        suite = store_suite(buffer, env)
        replay, units, default_tolerance = _SUITES[suite]
        tol = default_tolerance if tolerance is None else float(tolerance)
        n = buffer.n_episodes if episodes is None else min(int(episodes), buffer.n_episodes)
        return ReplaySummary(store=str(path), env=suite, units=units, tolerance=tol,
                             episodes=replay(buffer, range(n), tol))


def format_replay(summary: ReplaySummary) -> str:
    d = summary.as_dict()
    return (f"{d['store']} ({d['env']}): {d['episodes']} episodes replayed open loop; success {d['success_rate']:.2f}, "
            f"mean score {d['mean_score']:.3f}; diverged (gap > {d['tolerance']:g}) in {d['diverged_fraction']:.0%}; "
            f"final gap median {d['gap_final_median']:.3g}, p90 {d['gap_final_p90']:.3g} [{d['units']}]")
