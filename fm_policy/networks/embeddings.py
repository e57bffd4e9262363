"""Time embeddings shared by the velocity networks.

Flow time is a float in [0, 1]; the diffusion baseline passes integer timesteps 0..99. Both go through the same
sinusoidal features after multiplying by `scale`: with scale 1000 a flow time t spans the same phase range as
diffusion steps 0..1000 do at scale 1, so the usual frequency ladder (periods 2*pi .. 2*pi*10000) resolves it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinusoidalTimeEmbedding(nn.Module):
    """(B,) times -> (B, dim) features [sin(s t w_k), cos(s t w_k)], w_k = max_period^(-k / (dim/2 - 1)).

    No parameters. `scale` multiplies t first: 1000 for flow time in [0, 1], 1 for integer diffusion steps.
    """

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"time embedding dim must be even and >= 4, got {dim}")
        self.dim = dim
        self.scale = float(scale)
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        args = (t.float() * self.scale)[:, None] * self.freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale:g}"
