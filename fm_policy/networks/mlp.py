"""MLP velocity network for small problems: the whole chunk flattened, time and condition concatenated."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fm_policy.networks.base import VelocityNet
from fm_policy.networks.embeddings import SinusoidalTimeEmbedding


@dataclass
class MLPVelocityConfig:
    """Architecture of `MLPVelocityNet` (the I/O sizes horizon, action_dim, cond_dim are passed separately).

    Input = [x flattened (horizon*action_dim), sinusoidal(t * time_scale) (time_embed_dim), cond]; each hidden layer
    is Linear -> [LayerNorm] -> Mish; the output Linear gives horizon*action_dim values, reshaped to the chunk.
    """

    hidden_dims: tuple[int, ...] = (512, 512, 512)
    time_embed_dim: int = 64
    time_scale: float = 1000.0  # t is multiplied by this before the sinusoidal embedding; 1.0 for integer steps
    layer_norm: bool = False
    zero_init_output: bool = False  # True: the output layer starts at zero (the net then outputs 0 at init)


class MLPVelocityNet(VelocityNet):
    """Velocity field v(x, t | cond): x (B, horizon, action_dim) -> (B, horizon, action_dim) through an MLP."""

    kind = "mlp"

    def __init__(self, horizon: int, action_dim: int, cond_dim: int, config: MLPVelocityConfig | None = None) -> None:
        super().__init__(horizon, action_dim, cond_dim)
        config = config if config is not None else MLPVelocityConfig()
        hidden = tuple(int(d) for d in config.hidden_dims)
        config = dataclasses.replace(config, hidden_dims=hidden)
        self.config = config
        if not hidden or any(d < 1 for d in hidden):
            raise ValueError(f"hidden_dims must be a non-empty sequence of positive widths, got {hidden}")
        self.time_embed = SinusoidalTimeEmbedding(config.time_embed_dim, scale=config.time_scale)
        chunk = horizon * action_dim
        layers: list[nn.Module] = []
        width = chunk + config.time_embed_dim + cond_dim
        for h in hidden:
            layers += [nn.Linear(width, h), *([nn.LayerNorm(h)] if config.layer_norm else []), nn.Mish()]
            width = h
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, chunk)
        if config.zero_init_output:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        t, cond = self.check_inputs(x, t, cond)
        parts = [x.flatten(1), self.time_embed(t).to(x.dtype)]
        if cond is not None:
            parts.append(cond.to(x.dtype))
        return self.out(self.body(torch.cat(parts, dim=-1))).reshape(x.shape)
