"""Per-key affine normalisation of observations and actions, fitted on a dataset and saved with the policy.

Modes:
- `minmax`: per dimension to [-1, 1]. The flow's Gaussian noise and diffusion's clipping both live on that scale.
  A dimension whose range is below `range_eps` is only centred (scale 1), so a constant input does not blow up to
  +-1e4 and back (diffusion_policy's rule). A key may instead declare its range (`ranges`, e.g. Push-T's goal
  keypoints over the workspace [0, 512]): a key that is constant in one dataset but varies in the next (the goal of a
  single-goal store, then of an adaptation set with another goal) must keep one scale for both, or the new values
  reach the network hundreds of units away from anything it saw.
- `zscore`: per dimension to zero mean and unit variance; a near-constant dimension (std < eps) is only centred.
- `identity`: left as is (e.g. quaternions, or actions already in [-1, 1]).

Each key stores `scale` and `offset` buffers (y = x * scale + offset) plus the fitted statistics, so the inverse
is exact algebra, the normaliser moves with `.to(device)`, lives in the policy's state dict, and saves to
safetensors with no pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

NormMode = Literal["minmax", "zscore", "identity"]
MODES: tuple[str, ...] = ("minmax", "zscore", "identity")
STATS = ("min", "max", "mean", "std")


def streaming_stats(blocks: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """min / max / mean / std over axis 0 of the concatenation of `blocks`, in one pass and the memory of one block:
    the blocks' means and squared deviations are merged pairwise (Chan et al.), in float64, which agrees with
    numpy's two-pass result to rounding."""
    count, mean, m2, low, high = 0, None, None, None, None
    for block in blocks:
        x = np.asarray(block)
        if len(x) == 0:
            continue
        n = len(x)
        if x.dtype.kind in "biu":  # integer data (images): exact sums, no float64 copy of the block
            x = x.astype(np.uint8) if x.dtype.kind == "b" else x
            s1 = x.sum(0, dtype=np.float64)
            small = x.dtype.itemsize == 1  # squares of 8-bit values and their per-block sums are exact in float32
            s2 = np.square(x, dtype=np.float32 if small else np.float64).sum(0, dtype=np.float64)
            block_mean, block_m2 = s1 / n, np.maximum(s2 - s1 * s1 / n, 0.0)
            block_low, block_high = x.min(0).astype(np.float64), x.max(0).astype(np.float64)
        else:
            x = x.astype(np.float64, copy=False)
            block_mean = x.mean(0)
            block_m2 = ((x - block_mean) ** 2).sum(0)
            block_low, block_high = x.min(0), x.max(0)
        if mean is None:
            count, mean, m2, low, high = n, block_mean, block_m2, block_low, block_high
            continue
        delta = block_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + block_m2 + delta**2 * (count * n / total)
        low, high, count = np.minimum(low, block_low), np.maximum(high, block_high), total
    if mean is None:
        raise ValueError("cannot fit a normaliser on an empty array")
    return {"min": low, "max": high, "mean": mean, "std": np.sqrt(m2 / count)}


def _affine(data: Any, mode: str, range_eps: float, bounds: tuple[float, float] | None = None
            ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    if hasattr(data, "iter_blocks"):  # a streamed array (fm_policy.datasets.streaming): one pass over its chunks
        stats = streaming_stats(data.iter_blocks())
    else:
        x = np.asarray(data, dtype=np.float64)
        if x.ndim == 0 or len(x) == 0:
            raise ValueError(f"cannot fit a normaliser on an empty array of shape {x.shape}")
        stats = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0)}
    if bounds is not None:
        if mode != "minmax":
            raise ValueError(f"a declared range applies to the 'minmax' mode only, not '{mode}'")
        low, high = (float(b) for b in bounds)
        if not (np.isfinite(low) and np.isfinite(high) and high - low >= range_eps):
            raise ValueError(f"a declared range must be finite with high > low, got {bounds}")
        scale = np.full_like(stats["mean"], 2.0 / (high - low))
        return scale, -1.0 - scale * low, stats
    if mode == "minmax":
        span = stats["max"] - stats["min"]
        flat = span < range_eps
        scale = np.where(flat, 1.0, 2.0 / np.where(flat, 1.0, span))
        offset = np.where(flat, -(stats["max"] + stats["min"]) / 2, -1.0 - scale * stats["min"])
    elif mode == "zscore":
        flat = stats["std"] < range_eps
        scale = np.where(flat, 1.0, 1.0 / np.where(flat, 1.0, stats["std"]))
        offset = -scale * stats["mean"]
    elif mode == "identity":
        scale, offset = np.ones_like(stats["mean"]), np.zeros_like(stats["mean"])
    else:
        raise ValueError(f"unknown normalisation mode '{mode}'; choose one of {MODES}")
    return scale, offset, stats


class Normalizer(nn.Module):
    """Per-key affine maps (see the module docstring); keys are dataset keys such as 'action' or 'state'."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: dict[str, str] = {}

    @classmethod
    def fit(
        cls, data: Mapping[str, np.ndarray], modes: Mapping[str, NormMode] | NormMode = "minmax", range_eps: float = 1e-4,
        ranges: Mapping[str, Sequence[float]] | None = None,
    ) -> Normalizer:
        """Fit on arrays of shape (N, ...) (statistics over axis 0, per remaining element). A streamed array (one
        with `iter_blocks()`, e.g. `fm_policy.datasets.streaming.ChunkedArray`) is read in one pass, chunk by
        chunk, never whole. `ranges` maps a key to a declared (low, high) that replaces the data's min/max for every
        dimension of that key (minmax mode); the data's statistics are still recorded."""
        norm = cls()
        ranges = dict(ranges or {})
        for key, values in data.items():
            mode = modes if isinstance(modes, str) else modes.get(key, "minmax")
            bounds = ranges.get(key)
            if bounds is not None and len(bounds) != 2:
                raise ValueError(f"the declared range of '{key}' must be [low, high], got {list(bounds)}")
            scale, offset, stats = _affine(values, mode, range_eps, None if bounds is None else tuple(bounds))
            norm._set(key, mode, {"scale": scale, "offset": offset, **stats})
        return norm

    def _set(self, key: str, mode: str, tensors: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        self.modes[key] = mode
        for name, value in tensors.items():
            self.register_buffer(self._buffer(key, name), torch.as_tensor(np.asarray(value), dtype=torch.float32))

    @staticmethod
    def _buffer(key: str, name: str) -> str:
        return f"{key.replace('.', '__')}__{name}"  # nn.Module buffer names may not contain '.'

    def _get(self, key: str, name: str) -> torch.Tensor:
        if key not in self.modes:
            raise KeyError(f"normaliser has no key '{key}'; fitted keys: {sorted(self.modes)}")
        return getattr(self, self._buffer(key, name))

    def __contains__(self, key: str) -> bool:
        return key in self.modes

    def stats(self, key: str) -> dict[str, torch.Tensor]:
        return {name: self._get(key, name) for name in STATS}

    def _check_shape(self, key: str, x: torch.Tensor) -> None:
        feature = self._get(key, "scale").shape
        if tuple(x.shape[x.ndim - len(feature) :]) != tuple(feature) or x.ndim < len(feature):
            raise ValueError(f"'{key}' has shape {tuple(x.shape)}; the normaliser expects (..., {', '.join(map(str, feature))})")

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        self._check_shape(key, x)
        return x * self._get(key, "scale") + self._get(key, "offset")

    def unnormalize(self, key: str, y: torch.Tensor) -> torch.Tensor:
        self._check_shape(key, y)
        return (y - self._get(key, "offset")) / self._get(key, "scale")

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file; the modes travel in its metadata. Atomic: a crash never leaves half a file."""
        path = os.fspath(path)
        tmp = f"{path}.tmp"
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, tmp, metadata={"modes": json.dumps(self.modes)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Normalizer:
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if "modes" not in metadata:
            raise ValueError(f"{path}: not a normaliser file (no 'modes' in its safetensors metadata)")
        tensors = load_file(os.fspath(path))
        norm = cls()
        for key, mode in json.loads(metadata["modes"]).items():
            names = ("scale", "offset", *STATS)
            missing = [n for n in names if cls._buffer(key, n) not in tensors]
            if missing:
                raise ValueError(f"{path}: key '{key}' lacks tensors {missing}")
            norm._set(key, mode, {n: tensors[cls._buffer(key, n)] for n in names})
        return norm

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {m}" for k, m in self.modes.items())
