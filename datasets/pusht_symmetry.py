"""Push-T demonstrations for other goals, made from existing ones by the arena's rotational symmetry.

Why: adapting a policy to a new goal, or training one policy on several goals (docs/gft.md), needs demonstrations of
those goals as good as the original ones, and only diffusion_policy's human demos are that good. Push-T has no
gravity and a square arena, so turning a whole episode by k quarter turns about the arena centre (256, 256), block
angle + k pi/2, gives an episode that the same physics would produce from the turned start: the agent's path, every
contact and the block's motion turn with it. The goal (256, 256, pi/4) turns into (256, 256, pi/4 + k pi/2): the
same place, the T turned, which a policy trained on the usual goal does not solve. gym-pusht's walls are centred on
255.5, not 256, so the turned arena is 1 pixel off its walls; no demo comes that close to a wall.

A turn is a rotation (not a mirror), so the block keypoints keep their order: keypoint i of the turned block is the
turned keypoint i. Every stored field turns: `state` (agent x, y, block x, y, angle), `keypoint`, `action`, `img`
(the 96x96 render, rows = y, turned by `np.rot90`) and `goal`; other fields (`n_contacts`) are copied.

    python -m fm_policy.datasets.pusht_symmetry data/pusht_cchi_v7_replay.zarr.zip data/pusht_cchi_v7_turned.zarr
    python -m fm_policy.datasets.pusht_symmetry SRC DST --quarter-turns 1     # the goal at pi/4 + pi/2
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fm_policy.datasets.errors import DatasetError
from fm_policy.datasets.replay_buffer import ReplayBuffer
from fm_policy.envs.pusht_spec import store_goal_pose
from fm_policy.errors import UserError

__all__ = ["ARENA_CENTRE", "turn_goal_pose", "turn_pusht_episode", "turn_pusht_store"]

ARENA_CENTRE = 256.0
"""The centre of the turns (px): gym-pusht's default goal position, so the goal stays in place."""

_POINT_KEYS = ("keypoint", "action")
"""Stored fields that are (x, y) points (or flat runs of them) and turn as points."""


def _check_turns(quarter_turns: int) -> int:
    if isinstance(quarter_turns, bool) or int(quarter_turns) != quarter_turns or not 1 <= quarter_turns <= 3:
        raise ValueError(f"quarter_turns must be 1, 2 or 3, got {quarter_turns!r}")
    return int(quarter_turns)


def _rotate_xy(xy: np.ndarray, quarter_turns: int) -> np.ndarray:
    """(..., 2) points turned counter-clockwise (x toward y) by `quarter_turns` quarter turns about the centre."""
    x, y = xy[..., 0] - ARENA_CENTRE, xy[..., 1] - ARENA_CENTRE
    for _ in range(quarter_turns):
        x, y = -y, x
    return np.stack([x + ARENA_CENTRE, y + ARENA_CENTRE], axis=-1)


def turn_goal_pose(goal_pose: Sequence[float], quarter_turns: int = 2) -> list[float]:
    """(x, y, angle) of a goal after the turn; the angle is wrapped to (-pi, pi]."""
    k = _check_turns(quarter_turns)
    x, y, angle = (float(v) for v in goal_pose)
    tx, ty = _rotate_xy(np.array([x, y]), k)
    return [float(tx), float(ty), math.remainder(angle + k * math.pi / 2, 2 * math.pi)]


def _turn_points(values: np.ndarray, key: str, quarter_turns: int) -> np.ndarray:
    """Turned points for arrays whose last axis is (x, y) or a flat run of (x, y) pairs."""
    if values.shape[-1] % 2:
        raise DatasetError(key, f"expected (x, y) pairs in the last axis, got shape {values.shape}")
    pairs = values.astype(np.float64).reshape(values.shape[:-1] + (-1, 2))
    return _rotate_xy(pairs, quarter_turns).reshape(values.shape).astype(values.dtype)


def turn_pusht_episode(episode: Mapping[str, np.ndarray], goal_pose: Sequence[float],
                       quarter_turns: int = 2) -> dict[str, np.ndarray]:
    """One episode's stored fields after the turn (see the module docstring); `goal_pose` is the episode's
    original goal, used to write the turned `goal` observation."""
    from fm_policy.envs.pusht import goal_keypoint_obs

    k = _check_turns(quarter_turns)
    out: dict[str, np.ndarray] = {}
    for key, values in episode.items():
        values = np.asarray(values)
        if key == "state":
            if values.shape[-1] != 5:
                raise DatasetError(key, f"Push-T state must be (agent x, y, block x, y, angle), got shape {values.shape}")
            turned = values.astype(np.float64).copy()
            turned[..., :4] = _turn_points(turned[..., :4], key, k)
            turned[..., 4] = np.remainder(turned[..., 4] + k * np.pi / 2, 2 * np.pi)  # gym-pusht keeps [0, 2 pi)
            out[key] = turned.astype(values.dtype)
        elif key in _POINT_KEYS:
            out[key] = _turn_points(values, key, k)
        elif key in ("img", "image"):
            if values.ndim != 4:
                raise DatasetError(key, f"expected images (T, H, W, C), got shape {values.shape}")
            # rows are y and columns x, so turning x toward y is np.rot90 the other way round on (row, col)
            out[key] = np.ascontiguousarray(np.rot90(values, -k, axes=(1, 2)))
        elif key == "goal":
            continue  # rewritten below from the turned goal pose
        else:
            out[key] = values
    length = len(next(iter(episode.values())))
    goal = goal_keypoint_obs(np.asarray(turn_goal_pose(goal_pose, k), dtype=np.float64)).astype(np.float32)
    out["goal"] = np.repeat(goal[None], length, axis=0)
    return out


def turn_pusht_store(src: str, dst: str, episodes: Sequence[int] | None = None, overwrite: bool = False,
                     zarr_format: int = 2, quarter_turns: int = 2) -> dict[str, Any]:
    """Write the turned copy of Push-T store `src` (all episodes, or the listed ones) to `dst`; returns a summary.
    The new store records its goal (`source.goal_pose`) and where it came from (`source.turned_from`). It is written
    to `<dst>.partial` and renamed when complete, so an interrupted run never leaves a short store under `dst`."""
    k = _check_turns(quarter_turns)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    partial = str(dst) + ".partial"
    with ReplayBuffer.open(src) as buffer:
        attrs = buffer.attrs
        try:
            goal = store_goal_pose(attrs)
        except UserError as exc:
            raise DatasetError(src, f"cannot be turned: {exc}") from None
        missing = [k for k in ("state", "action") if k not in buffer.keys]
        if missing:
            raise DatasetError(src, f"a Push-T store needs {missing} to be turned (has {buffer.keys})")
        chosen = list(range(buffer.n_episodes)) if episodes is None else [int(i) for i in episodes]
        bad = [i for i in chosen if not 0 <= i < buffer.n_episodes]
        if bad:
            raise DatasetError(src, f"episodes {bad} do not exist (the store has {buffer.n_episodes})")
        turned_goal = turn_goal_pose(goal, k)
        source = dict(attrs.get("source") or {}) if isinstance(attrs.get("source"), Mapping) else {}
        source.update({"env": "pusht", "goal_pose": turned_goal, "goal_poses": [turned_goal],
                       "turned_from": {"store": str(src), "goal_pose": goal, "episodes": chosen,
                                       "transform": f"{k} quarter turn(s) counter-clockwise about "
                                                    f"({ARENA_CENTRE:g}, {ARENA_CENTRE:g})"}})
        out = ReplayBuffer.create(partial, zarr_format=zarr_format, attrs={"source": source}, overwrite=True)
        steps = 0
        for i in chosen:
            episode = turn_pusht_episode(buffer.get_episode(i), goal, k)
            out.add_episode(episode, episode_meta={"source_episode": np.int64(i)})
            steps += len(episode["action"])
        out.close()
    if os.path.exists(dst):
        shutil.rmtree(dst) if os.path.isdir(dst) else os.remove(dst)
    os.replace(partial, dst)
    return {"store": dst, "episodes": len(chosen), "steps": steps, "goal_pose": turned_goal, "source_goal": goal}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fm_policy.datasets.pusht_symmetry",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a Push-T replay buffer (zarr directory or .zarr.zip)")
    p.add_argument("dst", help="the turned store to write (a directory)")
    p.add_argument("--episodes", default=None, help="comma-separated episode indices (default: all)")
    p.add_argument("--quarter-turns", type=int, default=2, choices=(1, 2, 3),
                   help="counter-clockwise quarter turns (default 2: the half-turn)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    episodes = None if args.episodes is None else [int(v) for v in args.episodes.split(",") if v.strip()]
    summary = turn_pusht_store(args.src, args.dst, episodes, overwrite=args.overwrite, quarter_turns=args.quarter_turns)
    print(f"{summary['store']}: {summary['episodes']} episodes, {summary['steps']} steps, goal {summary['goal_pose']} "
          f"(turned from {summary['source_goal']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
