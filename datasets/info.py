"""`fm-policy dataset info`: what a replay buffer holds, in a form a person can check at a glance."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import zarr
from fm_policy.datasets.replay_buffer import ReplayBuffer

STATS_BLOCK_STEPS = 8192  # rows per read while computing statistics: bounded memory on image stores
MAX_PER_DIM = 12  # per-dimension statistics for features up to this size; larger ones (images) get one summary


def _running_stats(array: zarr.Array) -> dict[str, np.ndarray]:
    """Per-element min/max/mean/std over time, read block by block (float64 accumulators)."""
    count, total, total_sq = 0, 0.0, 0.0
    low = high = None
    for start in range(0, array.shape[0], STATS_BLOCK_STEPS):
        block = np.asarray(array[start : start + STATS_BLOCK_STEPS]).reshape(-1, *array.shape[1:])
        block = block.reshape(len(block), -1).astype(np.float64)
        count += len(block)
        total = total + block.sum(0)
        total_sq = total_sq + np.square(block).sum(0)
        low = block.min(0) if low is None else np.minimum(low, block.min(0))
        high = block.max(0) if high is None else np.maximum(high, block.max(0))
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean**2, 0.0))
    return {"min": low, "max": high, "mean": mean, "std": std}


def _summarise(stats: dict[str, np.ndarray], per_dim: bool) -> dict[str, Any]:
    """Per-dimension lists for small features; one pooled figure per statistic for large ones (images)."""
    if per_dim:
        return {name: np.round(value, 4).tolist() for name, value in stats.items()}
    mean = float(stats["mean"].mean())  # every element has the same count, so pooling is exact
    var = float(np.mean(stats["std"] ** 2 + stats["mean"] ** 2)) - mean**2
    pooled = {"min": stats["min"].min(), "max": stats["max"].max(), "mean": mean, "std": np.sqrt(max(var, 0.0))}
    return {name: round(float(value), 4) for name, value in pooled.items()}


def _codec_name(array: zarr.Array) -> str:
    codecs = array.compressors
    if not codecs:
        return "none"
    parts = []
    for codec in codecs:
        config = codec.get_config() if hasattr(codec, "get_config") else codec.to_dict().get("configuration", {})
        name = config.get("id") or type(codec).__name__
        detail = ", ".join(f"{k}={config[k]}" for k in ("cname", "clevel", "shuffle") if k in config)
        parts.append(f"{name}({detail})" if detail else name)
    return " + ".join(parts)


def dataset_summary(path: str) -> dict[str, Any]:
    """Structured description of a store (also what `--json` prints)."""
    with ReplayBuffer.open(path) as buffer:
        lengths = buffer.episode_lengths
        keys = {}
        for key in buffer.keys:
            array = buffer.array(key)
            per_dim = int(np.prod(array.shape[1:], dtype=np.int64)) <= MAX_PER_DIM
            keys[key] = {
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "chunks": list(array.chunks),
                "compressor": _codec_name(array),
                "stats": _summarise(_running_stats(array), per_dim),
            }
        return {
            "path": path,
            "zarr_format": buffer.zarr_format,
            "episodes": buffer.n_episodes,
            "steps": buffer.n_steps,
            "episode_length": {
                "min": int(lengths.min()),
                "mean": round(float(lengths.mean()), 2),
                "max": int(lengths.max()),
            },
            "keys": keys,
            "meta": sorted(buffer.meta.array_keys()),
            "attrs": buffer.attrs,
        }


def format_summary(summary: dict[str, Any]) -> str:
    length = summary["episode_length"]
    lines = [
        f"store      {summary['path']} (zarr format {summary['zarr_format']})",
        f"episodes   {summary['episodes']}   steps {summary['steps']}   "
        f"episode length min/mean/max {length['min']}/{length['mean']}/{length['max']}",
        f"meta       {', '.join(summary['meta'])}",
        "",
    ]
    w = max([12, *(len(k) + 2 for k in summary["keys"])])  # robomimic names such as robot0_gripper_qpos are long
    lines.append(f"{'key':<{w}}{'shape':<20}{'dtype':<10}{'chunks':<20}compressor")
    for key, info in summary["keys"].items():
        lines.append(
            f"{key:<{w}}{str(tuple(info['shape'])):<20}{info['dtype']:<10}{str(tuple(info['chunks'])):<20}"
            f"{info['compressor']}"
        )
    lines += ["", "statistics (per dimension where the feature has <= 12 elements, else over all elements)"]
    for key, info in summary["keys"].items():
        for name, value in info["stats"].items():
            lines.append(f"  {key:<{w}}{name:<6}{value}")
    if summary["attrs"]:
        lines += ["", "attributes", json.dumps(summary["attrs"], indent=2, default=str)]
    return "\n".join(lines)
