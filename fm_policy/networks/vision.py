"""Image observations: a ResNet-18 with GroupNorm and spatial-softmax keypoints (diffusion_policy's vision encoder).

    from fm_policy.networks.vision import VisionConfig, MultiModalObsEncoder

    enc = MultiModalObsEncoder({"image": (96, 96, 3), "agent_pos": (2,)}, n_obs_steps=2,
                               config=VisionConfig(widths=[16, 32, 64, 128], blocks=[1, 1, 1, 1], crop_shape=[84, 84]))
    cond = enc({"image": uint8 (B, 2, 96, 96, 3), "agent_pos": normalised (B, 2, 2)})   # (B, enc.output_dim)

Images travel as uint8 HWC (as the stores and the envs keep them) all the way to the encoder's device and become
float CHW in [0, 1] only here. Training crops a random `crop_shape` window per image (diffusion_policy's
CropRandomizer); evaluation takes the centre crop, so inference is deterministic. BatchNorm is replaced by
GroupNorm (batch statistics interact badly with EMA weights and with small batches), and global average pooling
by a spatial softmax: a 1x1 convolution to K keypoint maps, a softmax over H x W, and the expected (x, y) of each
map in [-1, 1] -> 2K features (optionally projected to `feature_dim`).

Written in plain torch (torchvision is not a dependency). The trunk's parameter names follow torchvision's
`resnet18` (conv1, bn1, layer1.0.conv1, ..., layer4.1.bn2, layerN.0.downsample.{0,1}), so converted weights load
by name from a safetensors file (`VisionConfig.pretrained`); BatchNorm running statistics in such a file are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fm_policy.networks.encoders import LowDimObsEncoder, ObsEncoder, _as_shape

RESNET18_WIDTHS, RESNET18_BLOCKS = (64, 128, 256, 512), (2, 2, 2, 2)
CPU_WIDTHS, CPU_BLOCKS = (16, 32, 64, 128), (1, 1, 1, 1)
_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class VisionConfig:
    """How image observation keys (per-step shape (H, W, C)) are encoded; ignored when a policy has none.

    widths / blocks: channels and residual blocks per ResNet stage (default: ResNet-18; a CPU variant is
    [16, 32, 64, 128] x [1, 1, 1, 1]). group_channels: channels per GroupNorm group. num_keypoints: spatial-softmax
    maps K (2K features per image), feature_dim: a linear projection of those (0 = none). crop_shape: [h, w] of the
    random (training) / centre (inference) crop, empty = no crop. share_encoder: one network for every camera
    instead of one each. pretrained: a safetensors file of trunk weights (torchvision resnet18 names) loaded when the
    policy is first built; the saved policy holds the weights, so its config no longer names the file.
    """

    widths: list[int] = field(default_factory=lambda: list(RESNET18_WIDTHS))
    blocks: list[int] = field(default_factory=lambda: list(RESNET18_BLOCKS))
    group_channels: int = 16
    num_keypoints: int = 32
    feature_dim: int = 64
    crop_shape: list[int] = field(default_factory=list)
    share_encoder: bool = False
    pretrained: str = ""

    def validate(self) -> None:
        from fm_policy.config import ConfigError

        widths, blocks = list(self.widths), list(self.blocks)
        if not widths or len(widths) != len(blocks):
            raise ConfigError(f"policy.vision.widths {widths} and blocks {blocks} must be non-empty and of one length "
                              "(one entry per ResNet stage)")
        if any(int(w) < 1 for w in widths) or any(int(b) < 1 for b in blocks):
            raise ConfigError(f"policy.vision.widths {widths} and blocks {blocks} must be positive")
        if self.group_channels < 1 or self.num_keypoints < 1 or self.feature_dim < 0:
            raise ConfigError("policy.vision: group_channels and num_keypoints must be >= 1, feature_dim >= 0")
        if len(self.crop_shape) not in (0, 2) or any(int(c) < 1 for c in self.crop_shape):
            raise ConfigError(f"policy.vision.crop_shape must be [] or [height, width], got {list(self.crop_shape)}")


def is_image_shape(shape: Sequence[int]) -> bool:
    """An observation key is an image when its per-step shape has 3 dims (H, W, C)."""
    return len(tuple(shape)) == 3


def _norm(channels: int, group_channels: int) -> nn.GroupNorm:
    groups = max(1, channels // group_channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, group_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = _norm(c_out, group_channels)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _norm(c_out, group_channels)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(c_out, group_channels))
                           if stride != 1 or c_in != c_out else None)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetTrunk(nn.Module):
    """ResNet (BasicBlocks, GroupNorm) without the pooling head: (N, C, H, W) float -> (N, widths[-1], h, w)."""

    def __init__(self, in_channels: int, widths: Sequence[int], blocks: Sequence[int], group_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = _norm(widths[0], group_channels)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            layer = [BasicBlock(c if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1, group_channels)
                     for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            c = w
        self.n_stages, self.out_channels = len(widths), c

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


class SpatialSoftmax(nn.Module):
    """(N, C, h, w) -> (N, 2K): K keypoint maps (1x1 conv), softmax over h x w, expected (x, y) in [-1, 1]."""

    def __init__(self, in_channels: int, num_keypoints: int, height: int, width: int) -> None:
        super().__init__()
        self.keypoints = nn.Conv2d(in_channels, num_keypoints, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        self.register_buffer("grid", torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        maps = self.keypoints(x).flatten(2)  # (N, K, h*w)
        attention = torch.softmax(maps, dim=-1)
        return (attention @ self.grid).flatten(1)  # (N, K, 2) -> (N, 2K)


class ImageEncoder(nn.Module):
    """One camera's network: uint8 (N, H, W, C) -> crop -> float CHW / 255 -> ResNet -> spatial softmax -> (N, F)."""

    def __init__(self, image_shape: Sequence[int], config: VisionConfig) -> None:
        super().__init__()
        height, width, channels = (int(d) for d in image_shape)
        crop = tuple(int(c) for c in config.crop_shape) or (height, width)
        if crop[0] > height or crop[1] > width:
            from fm_policy.config import ConfigError

            raise ConfigError(f"policy.vision.crop_shape {list(crop)} is larger than the image ({height}, {width})")
        self.image_shape, self.crop = (height, width, channels), crop
        self.trunk = ResNetTrunk(channels, config.widths, config.blocks, config.group_channels)
        with torch.no_grad():
            h, w = self.trunk(torch.zeros(1, channels, *crop)).shape[-2:]
        self.pool = SpatialSoftmax(self.trunk.out_channels, config.num_keypoints, int(h), int(w))
        self.proj = nn.Linear(2 * config.num_keypoints, config.feature_dim) if config.feature_dim else None
        self.output_dim = config.feature_dim or 2 * config.num_keypoints

    def crop_images(self, images: Tensor) -> Tensor:
        """(N, H, W, C) -> (N, h, w, C): a random window per image in training, the centre one in eval."""
        n, height, width, _ = images.shape
        ch, cw = self.crop
        if (ch, cw) == (height, width):
            return images
        if not self.training:
            top, left = (height - ch) // 2, (width - cw) // 2
            return images[:, top : top + ch, left : left + cw]
        top = torch.randint(0, height - ch + 1, (n,), device=images.device)
        left = torch.randint(0, width - cw + 1, (n,), device=images.device)
        rows = (top[:, None] + torch.arange(ch, device=images.device))[:, :, None]  # (N, ch, 1)
        cols = (left[:, None] + torch.arange(cw, device=images.device))[:, None, :]  # (N, 1, cw)
        return images[torch.arange(n, device=images.device)[:, None, None], rows, cols]

    def forward(self, images: Tensor) -> Tensor:
        x = self.crop_images(images)
        x = x.permute(0, 3, 1, 2).to(torch.float32)
        if images.dtype == torch.uint8:
            x = x / 255.0
        features = self.pool(self.trunk(x))
        return features if self.proj is None else self.proj(features)


def load_trunk_weights(trunk: ResNetTrunk, path: str | Path) -> None:
    """Trunk weights from a safetensors file (torchvision resnet18 names; BatchNorm statistics and `fc.*` ignored);
    a missing, unreadable or mismatched file is a `ConfigError` naming the missing / unexpected keys."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from fm_policy.config import ConfigError

    try:
        weights = load_file(str(path))
    except FileNotFoundError:
        raise ConfigError(f"policy.vision.pretrained: {path}: no such file") from None
    except (OSError, ValueError, SafetensorError) as exc:
        raise ConfigError(f"policy.vision.pretrained: {path}: not a readable safetensors file ({exc})") from None
    weights = {k: v for k, v in weights.items() if k.rsplit(".", 1)[-1] not in _BN_STATS and not k.startswith("fc.")}
    own = trunk.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ConfigError(f"policy.vision.pretrained: {path} does not match the vision trunk (widths/blocks): "
                          f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''} ({len(missing)}), "
                          f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} "
                          f"({len(unexpected)})")
    wrong = [f"{k}: file {tuple(weights[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
             if tuple(weights[k].shape) != tuple(v.shape)]
    if wrong:
        raise ConfigError(f"policy.vision.pretrained: {path}: tensor shapes do not match: {wrong[:5]}")
    trunk.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()})


class MultiModalObsEncoder(ObsEncoder):
    """Image keys through `ImageEncoder`s (one per camera, or one shared), low-dim keys flattened as
    `LowDimObsEncoder` does; output (B, n_obs_steps * (n_cameras * F + low-dim width)).

    forward(obs): image keys uint8 (B, n_obs_steps, H, W, C), low-dim keys already normalised. Features are in
    sorted camera order, each time-major per step, then the low-dim block.
    """

    def __init__(self, obs_shapes: Mapping[str, Sequence[int] | int], n_obs_steps: int,
                 config: VisionConfig | None = None) -> None:
        super().__init__()
        config = config or VisionConfig()
        config.validate()
        shapes = {k: _as_shape(k, obs_shapes[k]) for k in sorted(obs_shapes)}
        self.image_keys = tuple(k for k, s in shapes.items() if is_image_shape(s))
        if not self.image_keys:
            raise ValueError("MultiModalObsEncoder needs at least one image key (per-step shape (H, W, C))")
        self.low_dim_keys = tuple(k for k in shapes if k not in self.image_keys)
        self.obs_shapes, self.n_obs_steps, self.shared = shapes, n_obs_steps, bool(config.share_encoder)
        if self.shared:
            first = shapes[self.image_keys[0]]
            other = [k for k in self.image_keys if shapes[k] != first]
            if other:
                from fm_policy.config import ConfigError

                raise ConfigError(f"policy.vision.share_encoder needs cameras of one shape; {other} differ from "
                                  f"'{self.image_keys[0]}' {first}")
            self.cameras = nn.ModuleDict({"shared": ImageEncoder(first, config)})
        else:
            self.cameras = nn.ModuleDict({_module_name(k): ImageEncoder(shapes[k], config) for k in self.image_keys})
        if config.pretrained:
            for camera in self.cameras.values():
                load_trunk_weights(camera.trunk, config.pretrained)
        self.low_dim = (LowDimObsEncoder({k: shapes[k] for k in self.low_dim_keys}, n_obs_steps)
                        if self.low_dim_keys else None)
        feature = next(iter(self.cameras.values())).output_dim
        self.output_dim = n_obs_steps * len(self.image_keys) * feature + (self.low_dim.output_dim if self.low_dim else 0)

    def camera(self, key: str) -> ImageEncoder:
        return self.cameras["shared" if self.shared else _module_name(key)]

    def forward(self, obs: Mapping[str, Tensor]) -> Tensor:
        missing = [k for k in self.obs_shapes if k not in obs]
        if missing:
            raise ValueError(f"obs is missing key(s) {missing}; expected keys {list(self.obs_shapes)}, got {sorted(obs)}")
        parts = []
        batch = obs[self.image_keys[0]].shape[0]
        if self.shared and len(self.image_keys) > 1:  # one pass over every camera's images
            stacked = torch.stack([self._images(k, obs[k], batch) for k in self.image_keys])  # (cams, B, T, H, W, C)
            feats = self.cameras["shared"](stacked.reshape(-1, *stacked.shape[3:]))
            parts.append(feats.reshape(len(self.image_keys), batch, -1).transpose(0, 1).reshape(batch, -1))
        else:
            for key in self.image_keys:
                images = self._images(key, obs[key], batch)
                parts.append(self.camera(key)(images.reshape(-1, *images.shape[2:])).reshape(batch, -1))
        if self.low_dim is not None:
            parts.append(self.low_dim(obs))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def _images(self, key: str, value: Tensor, batch: int) -> Tensor:
        expected = (self.n_obs_steps, *self.obs_shapes[key])
        if value.ndim != 5 or tuple(value.shape[1:]) != expected or value.shape[0] != batch:
            raise ValueError(f"obs['{key}']: expected an image batch (B={batch}, {', '.join(map(str, expected))}), "
                             f"got {tuple(value.shape)}")
        return value

    def extra_repr(self) -> str:
        return (f"image_keys={list(self.image_keys)}, low_dim_keys={list(self.low_dim_keys)}, "
                f"shared={self.shared}, output_dim={self.output_dim}")


def _module_name(key: str) -> str:
    return key.replace(".", "__")


def count_trunk_flops(image_shape: Sequence[int], config: VisionConfig) -> int:  # pragma: no cover - informative
    """Rough multiply-accumulates of one trunk pass (for the benchmark page)."""
    enc = ImageEncoder(image_shape, config)
    total = 0

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * module.in_channels * math.prod(module.kernel_size) // module.groups

    handles = [m.register_forward_hook(hook) for m in enc.modules() if isinstance(m, nn.Conv2d)]
    enc.eval()(torch.zeros(1, *image_shape, dtype=torch.uint8))
    for h in handles:
        h.remove()
    return total


__all__ = ["ImageEncoder", "MultiModalObsEncoder", "ResNetTrunk", "SpatialSoftmax", "VisionConfig", "is_image_shape",
           "load_trunk_weights"]
