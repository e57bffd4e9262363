"""Observation encoders: an obs dict of (B, n_obs_steps, *shape) tensors -> the global condition (B, output_dim).

The encoder is its own module so the policy does not care what it is: `LowDimObsEncoder` flattens already
normalised low-dimensional observations; image encoders (a ResNet with spatial softmax, as in diffusion_policy)
subclass `ObsEncoder` later and expose the same `output_dim`, which the velocity network takes as `cond_dim`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


class ObsEncoder(nn.Module):
    """Base class: `forward(obs: dict[str, Tensor]) -> (B, output_dim)`; subclasses set `output_dim`."""

    output_dim: int
    n_obs_steps: int

    def forward(self, obs: Mapping[str, Tensor]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _as_shape(key: str, shape: Any) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, Sequence) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                  for d in shape):
        raise ValueError(f"obs_shapes['{key}'] must be a tuple of positive ints (per-step shape), got {shape!r}")
    return tuple(int(d) for d in shape)


class LowDimObsEncoder(ObsEncoder):
    """Flattens low-dim observations and concatenates them in sorted key order (no parameters).

    obs_shapes: per-step shape of each key, e.g. {"keypoint": (9, 2), "agent_pos": (2,)} or {"obs": (20,)}.
    forward(obs): each obs[key] is (B, n_obs_steps, *obs_shapes[key]) and already normalised; keys not in
    obs_shapes are ignored (an image key in the same dict, say). Output (B, n_obs_steps * sum(prod(shape))), per key
    time-major: [key_a step 0, key_a step 1, ..., key_b step 0, ...].
    """

    def __init__(self, obs_shapes: Mapping[str, Sequence[int] | int], n_obs_steps: int) -> None:
        super().__init__()
        if not obs_shapes:
            raise ValueError("obs_shapes is empty: a low-dim encoder needs at least one observation key")
        if not isinstance(n_obs_steps, int) or isinstance(n_obs_steps, bool) or n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be an int >= 1, got {n_obs_steps!r}")
        self.obs_shapes: dict[str, tuple[int, ...]] = {k: _as_shape(k, obs_shapes[k]) for k in sorted(obs_shapes)}
        self.keys = tuple(self.obs_shapes)
        self.n_obs_steps = n_obs_steps
        self.output_dim = n_obs_steps * sum(math.prod(s) for s in self.obs_shapes.values())

    def forward(self, obs: Mapping[str, Tensor]) -> Tensor:
        missing = [k for k in self.keys if k not in obs]
        if missing:
            raise ValueError(f"obs is missing key(s) {missing}; expected keys {list(self.keys)}, got {sorted(obs)}")
        batch = None
        parts = []
        for key in self.keys:
            value = obs[key]
            expected = (self.n_obs_steps, *self.obs_shapes[key])
            if value.ndim != len(expected) + 1 or tuple(value.shape[1:]) != expected:
                raise ValueError(
                    f"obs['{key}']: expected shape (B, n_obs_steps, *shape) = (B, {', '.join(map(str, expected))}), "
                    f"got {tuple(value.shape)}"
                )
            if batch is None:
                batch = value.shape[0]
            elif value.shape[0] != batch:
                raise ValueError(f"obs['{key}'] has batch size {value.shape[0]}, but obs['{self.keys[0]}'] has {batch}")
            parts.append(value.reshape(batch, -1))
        out = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return out if out.is_floating_point() else out.float()

    def extra_repr(self) -> str:
        return f"obs_shapes={self.obs_shapes}, n_obs_steps={self.n_obs_steps}, output_dim={self.output_dim}"
