"""Conditional 1-D temporal U-Net over an action chunk (the architecture of diffusion_policy's ConditionalUnet1D).

The chunk is treated as a 1-D signal: channels = action_dim, length = horizon. Structure, for down_dims
(d_1, ..., d_L):

* condition c = [MLP(sinusoidal(t * time_scale)), cond]: Linear(e -> 4e) -> Mish -> Linear(4e -> e), then the
  flattened observation features appended;
* every residual block is two Conv1d -> GroupNorm -> Mish blocks with FiLM between them: Mish -> Linear(c -> 2C)
  gives a per-channel scale and bias applied to the first block's output; a 1x1 conv on the shortcut when the width
  changes;
* down path: level i has two residual blocks to width d_i, then a stride-2 Conv1d(k=3) (not after the last level),
  so the length goes horizon -> horizon/2 -> ... -> horizon / 2^(L-1);
* two mid blocks at width d_L;
* up path (L-1 levels): concatenate the skip saved at the same length, two residual blocks down to the next
  narrower width, ConvTranspose1d(k=4, s=2) back up. As in diffusion_policy the skip of the first (full-length)
  level is not used: the up path has one level fewer than the down path;
* head: Conv1d block at d_1, then a 1x1 Conv1d to action_dim.

Hence the horizon must be divisible by 2^(L-1) (16 with three levels: 16 -> 8 -> 4 -> 8 -> 16).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fm_policy.networks.base import VelocityNet
from fm_policy.networks.embeddings import SinusoidalTimeEmbedding


@dataclass
class UNet1DConfig:
    """Architecture of `ConditionalUNet1D` (the I/O sizes horizon, action_dim, cond_dim are passed separately).

    The default is the small CPU network; `UNet1DConfig.diffusion_policy()` is diffusion_policy's low-dim size.
    """

    down_dims: tuple[int, ...] = (32, 64, 128)
    kernel_size: int = 5  # odd, so "same" padding keeps the length
    n_groups: int = 8  # GroupNorm groups; must divide every width in down_dims
    time_embed_dim: int = 64  # diffusion_policy: 256 (low-dim), 128 (image)
    time_scale: float = 1000.0  # t is multiplied by this before the sinusoidal embedding; 1.0 for integer steps
    zero_init_output: bool = False  # True: the final 1x1 conv starts at zero (the net then outputs 0 at init)

    @classmethod
    def diffusion_policy(cls) -> UNet1DConfig:
        """diffusion_policy's low-dim U-Net (train_diffusion_unet_lowdim_workspace.yaml): ~65.8 M params on Push-T."""
        return cls(down_dims=(256, 512, 1024), kernel_size=5, n_groups=8, time_embed_dim=256)


class Conv1dBlock(nn.Module):
    """Conv1d ("same" padding) -> GroupNorm -> Mish."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class FiLMResidualBlock1D(nn.Module):
    """Two conv blocks; the condition sets a per-channel scale and bias on the first block's output (FiLM)."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, kernel_size: int, n_groups: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.conv1 = Conv1dBlock(in_channels, out_channels, kernel_size, n_groups)
        self.conv2 = Conv1dBlock(out_channels, out_channels, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out_channels))
        self.shortcut = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        scale, bias = self.film(c).unsqueeze(-1).chunk(2, dim=1)  # (B, C, 1) each
        h = self.conv1(x) * scale + bias
        return self.conv2(h) + self.shortcut(x)


class _Level(nn.Module):
    def __init__(self, block1: nn.Module, block2: nn.Module, resample: nn.Module) -> None:
        super().__init__()
        self.block1, self.block2, self.resample = block1, block2, resample


class ConditionalUNet1D(VelocityNet):
    """Velocity field v(x, t | cond) over an action chunk: x (B, horizon, action_dim) -> (B, horizon, action_dim)."""

    kind = "unet1d"

    def __init__(self, horizon: int, action_dim: int, cond_dim: int, config: UNet1DConfig | None = None) -> None:
        super().__init__(horizon, action_dim, cond_dim)
        config = config if config is not None else UNet1DConfig()
        dims = tuple(int(d) for d in config.down_dims)
        config = dataclasses.replace(config, down_dims=dims)  # a copy: YAML lists become a tuple, caller's untouched
        self.config = config
        k, g = config.kernel_size, config.n_groups
        if not dims or any(d < 1 for d in dims):
            raise ValueError(f"down_dims must be a non-empty sequence of positive widths, got {config.down_dims}")
        if k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding keeps the length), got {k}")
        bad = [d for d in dims if d % g]
        if g < 1 or bad:
            raise ValueError(f"n_groups={g} must divide every width in down_dims={dims}; it does not divide {bad}")
        factor = 2 ** (len(dims) - 1)
        if horizon % factor:
            raise ValueError(
                f"horizon {horizon} must be divisible by 2^(levels-1) = {factor} for down_dims={dims} "
                f"({len(dims)} levels halve the length {len(dims) - 1} times); use a horizon that is a multiple of "
                f"{factor} or fewer levels"
            )

        e = config.time_embed_dim
        self.time_embed = SinusoidalTimeEmbedding(e, scale=config.time_scale)
        self.time_mlp = nn.Sequential(nn.Linear(e, 4 * e), nn.Mish(), nn.Linear(4 * e, e))
        c = e + cond_dim

        widths = (action_dim, *dims)
        self.down = nn.ModuleList()
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            last = i == len(dims) - 1
            self.down.append(_Level(
                FiLMResidualBlock1D(w_in, w_out, c, k, g),
                FiLMResidualBlock1D(w_out, w_out, c, k, g),
                nn.Identity() if last else nn.Conv1d(w_out, w_out, 3, stride=2, padding=1),
            ))
        self.mid = nn.ModuleList([FiLMResidualBlock1D(dims[-1], dims[-1], c, k, g) for _ in range(2)])
        self.up = nn.ModuleList()
        for w_out, w_in in reversed(list(zip(dims[:-1], dims[1:]))):  # (d_{L-1}, d_L), ..., (d_1, d_2)
            self.up.append(_Level(
                FiLMResidualBlock1D(2 * w_in, w_out, c, k, g),  # input = current features ++ skip
                FiLMResidualBlock1D(w_out, w_out, c, k, g),
                nn.ConvTranspose1d(w_out, w_out, 4, stride=2, padding=1),
            ))
        self.head = nn.Sequential(Conv1dBlock(dims[0], dims[0], k, g), nn.Conv1d(dims[0], action_dim, 1))
        if config.zero_init_output:
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)
        # Otherwise PyTorch's default init: the head sees GroupNorm-Mish features (O(1) per channel) and its fan-in
        # scaling gives initial outputs of std ~0.3, the order of the target velocity x1 - x0 (std ~1.4).

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        t, cond = self.check_inputs(x, t, cond)
        c = self.time_mlp(self.time_embed(t).to(x.dtype))
        if cond is not None:
            c = torch.cat([c, cond.to(c.dtype)], dim=-1)

        h = x.transpose(1, 2)  # (B, action_dim, horizon)
        skips = []
        for level in self.down:
            h = level.block2(level.block1(h, c), c)
            skips.append(h)
            h = level.resample(h)
        for block in self.mid:
            h = block(h, c)
        for level in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = level.resample(level.block2(level.block1(h, c), c))
        return self.head(h).transpose(1, 2)
