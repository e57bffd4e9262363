"""The interface every velocity network implements, and small helpers.

A velocity network maps a noisy action chunk x (B, horizon, action_dim), a time t (B,) and a global condition
cond (B, cond_dim) (flattened observation features from an `ObsEncoder`) to a velocity of x's shape:

    v = net(x, t, cond)        # (B, horizon, action_dim)

Time convention: t is flow time in [0, 1] (0 = noise, 1 = data, see `fm_policy.flow_matching`). The networks embed
`t * time_scale` sinusoidally; `time_scale` defaults to 1000 for flow time. The diffusion baseline passes integer
steps 0..99 and builds its network with `time_scale=1`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements in `module` (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


class VelocityNet(nn.Module):
    """Base class: stores the I/O sizes, validates inputs, and records its config so it can be rebuilt.

    Subclasses set `kind` (the name `build_velocity_net` knows them by) and `self.config` (a dataclass), and
    implement `forward(x, t, cond)` calling `self.check_inputs` first.
    """

    kind: ClassVar[str] = ""

    def __init__(self, horizon: int, action_dim: int, cond_dim: int) -> None:
        super().__init__()
        for name, value, low in (("horizon", horizon, 1), ("action_dim", action_dim, 1), ("cond_dim", cond_dim, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.horizon = horizon
        self.action_dim = action_dim
        self.cond_dim = cond_dim
        self.config: Any = None

    def check_inputs(self, x: Tensor, t: Tensor | float, cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Validate shapes; returns t as a (B,) tensor (a scalar t is broadcast) and cond (None if cond_dim == 0)."""
        expected_x = ("B", self.horizon, self.action_dim)
        if x.ndim != 3 or x.shape[1] != self.horizon or x.shape[2] != self.action_dim:
            raise ValueError(f"x: expected shape (B, horizon, action_dim) = {expected_x}, got {_shape(x)}")
        batch = x.shape[0]
        if not isinstance(t, Tensor):
            t = torch.full((batch,), float(t), device=x.device)
        elif t.ndim == 0:
            t = t.expand(batch)
        elif t.ndim != 1 or t.shape[0] != batch:
            raise ValueError(f"t: expected shape ({batch},) (one time per sample) or a scalar, got {_shape(t)}")
        if cond is None:
            if self.cond_dim:
                raise ValueError(f"cond: expected shape ({batch}, {self.cond_dim}), got None")
            return t, None
        if cond.ndim != 2 or cond.shape[0] != batch or cond.shape[1] != self.cond_dim:
            raise ValueError(f"cond: expected shape (B, cond_dim) = ({batch}, {self.cond_dim}), got {_shape(cond)}")
        return t, (cond if self.cond_dim else None)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
