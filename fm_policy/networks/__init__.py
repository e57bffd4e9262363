"""Velocity networks and observation encoders for flow-matching action-chunk policies.

    from fm_policy.networks import build_velocity_net, LowDimObsEncoder

    encoder = LowDimObsEncoder({"obs": (20,)}, n_obs_steps=2)              # Push-T keypoints: cond_dim 40
    net = build_velocity_net("unet1d", horizon=16, action_dim=2, cond_dim=encoder.output_dim,
                             down_dims=(32, 64, 128))
    v = net(x, t, encoder(obs))   # x (B, 16, 2), t (B,) flow time in [0, 1] -> v (B, 16, 2)

Every network takes `forward(x (B, horizon, action_dim), t (B,), cond (B, cond_dim)) -> (B, horizon, action_dim)`
and raises ValueError naming the expected and actual shapes when they do not fit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fm_policy.networks.base import VelocityNet, count_parameters
from fm_policy.networks.embeddings import SinusoidalTimeEmbedding
from fm_policy.networks.encoders import LowDimObsEncoder, ObsEncoder
from fm_policy.networks.mlp import MLPVelocityConfig, MLPVelocityNet
from fm_policy.networks.unet1d import ConditionalUNet1D, UNet1DConfig
from fm_policy.networks.vision import MultiModalObsEncoder, VisionConfig

VELOCITY_NETS: dict[str, tuple[type[VelocityNet], type]] = {
    "unet1d": (ConditionalUNet1D, UNet1DConfig),
    "mlp": (MLPVelocityNet, MLPVelocityConfig),
}


def settings_for_kind(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` without the keys that only another network kind has.

    A config file that describes a U-Net and an override `policy.network.kind=mlp` should give an MLP, not an error
    about `down_dims`; a key that no network has (a typo) is kept, so `build_velocity_net` still reports it.
    """
    own = {f.name for f in dataclasses.fields(VELOCITY_NETS[kind][1])} if kind in VELOCITY_NETS else set()
    foreign = {f.name for other, (_, cfg) in VELOCITY_NETS.items() if other != kind for f in dataclasses.fields(cfg)}
    return {k: v for k, v in settings.items() if k in own or k not in foreign}


def build_velocity_net(kind: str, horizon: int, action_dim: int, cond_dim: int, **settings: Any) -> VelocityNet:
    """A velocity network of `kind` ("unet1d" or "mlp") for the given sizes.

    `settings` are the fields of the kind's config dataclass (`UNet1DConfig` / `MLPVelocityConfig`), e.g.
    `down_dims=(32, 64, 128), kernel_size=5`; lists (from YAML) are accepted for tuples. Unknown kinds or settings
    raise ValueError naming the valid ones.
    """
    if kind not in VELOCITY_NETS:
        raise ValueError(f"unknown velocity network kind {kind!r}; known: {', '.join(VELOCITY_NETS)}")
    net_cls, config_cls = VELOCITY_NETS[kind]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values = dict(settings)
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for velocity network {kind!r}; valid: {sorted(fields)}")
    for key, value in values.items():  # YAML / OmegaConf give lists where the dataclass has tuples
        if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
            values[key] = tuple(value)
    return net_cls(horizon, action_dim, cond_dim, config_cls(**values))


__all__ = [
    "VELOCITY_NETS",
    "ConditionalUNet1D",
    "LowDimObsEncoder",
    "MLPVelocityConfig",
    "MLPVelocityNet",
    "MultiModalObsEncoder",
    "ObsEncoder",
    "SinusoidalTimeEmbedding",
    "UNet1DConfig",
    "VelocityNet",
    "VisionConfig",
    "build_velocity_net",
    "settings_for_kind",
    "count_parameters",
]
