"""Velocity networks (conditional 1-D U-Net, MLP) and the low-dim observation encoder."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fm_policy.networks import (
    ConditionalUNet1D,
    LowDimObsEncoder,
    MLPVelocityConfig,
    MLPVelocityNet,
    SinusoidalTimeEmbedding,
    UNet1DConfig,
    VelocityNet,
    build_velocity_net,
    count_parameters,
)

TINY_UNET = {"down_dims": (8, 16, 32), "time_embed_dim": 16}


def _inputs(batch: int, horizon: int, action_dim: int, cond_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, horizon, action_dim, generator=g)
    t = torch.rand(batch, generator=g)
    cond = torch.randn(batch, cond_dim, generator=g) if cond_dim else None
    return x, t, cond


@pytest.mark.parametrize(
    "kind, horizon, action_dim, cond_dim, cfg",
    [
        ("unet1d", 16, 2, 40, TINY_UNET),
        ("unet1d", 16, 2, 40, {"down_dims": (16, 32), "kernel_size": 3, "n_groups": 4, "time_embed_dim": 8}),
        ("unet1d", 5, 7, 3, {"down_dims": (16,), "time_embed_dim": 8}),  # one level: any horizon
        ("unet1d", 8, 10, 0, {"down_dims": (8, 8, 16), "time_embed_dim": 8}),  # no observation condition
        ("mlp", 16, 2, 40, {"hidden_dims": (32, 32, 32)}),
        ("mlp", 10, 9, 0, {"hidden_dims": (16,), "layer_norm": True, "time_embed_dim": 8}),
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape(kind, horizon, action_dim, cond_dim, cfg, batch):
    net = build_velocity_net(kind, horizon, action_dim, cond_dim, **cfg)
    assert isinstance(net, VelocityNet) and net.kind == kind
    x, t, cond = _inputs(batch, horizon, action_dim, cond_dim)
    out = net(x, t, cond)
    assert out.shape == (batch, horizon, action_dim)
    assert torch.isfinite(out).all()
    # a scalar time is broadcast over the batch
    torch.testing.assert_close(net(x, 0.3, cond), net(x, torch.full((batch,), 0.3), cond))


@pytest.mark.parametrize("kind, cfg", [("unet1d", TINY_UNET), ("mlp", {"hidden_dims": (32, 32)})])
def test_output_depends_on_x_t_and_cond(kind, cfg):
    torch.manual_seed(0)
    net = build_velocity_net(kind, 16, 2, 6, **cfg).eval()
    x, t, cond = _inputs(4, 16, 2, 6)
    base = net(x, t, cond)

    def differs(other):
        return (other - base).abs().amax(dim=(1, 2)).min().item() > 1e-5  # every sample changes

    assert differs(net(x, t, cond + 0.5))
    assert differs(net(x, t + 0.01, cond))  # a small step in flow time is resolved (time_scale 1000)
    assert differs(net(x + 0.5, t, cond))
    # samples are independent: changing one sample's condition leaves the others alone (GroupNorm is per sample)
    cond2 = cond.clone()
    cond2[0] += 1.0
    out2 = net(x, t, cond2)
    assert not torch.allclose(out2[0], base[0])
    torch.testing.assert_close(out2[1:], base[1:])


@pytest.mark.parametrize(
    "kind, cfg",
    [("unet1d", TINY_UNET), ("unet1d", {"down_dims": (8,), "time_embed_dim": 8}),
     ("mlp", {"hidden_dims": (16, 16), "layer_norm": True})],
)
def test_gradient_reaches_every_parameter(kind, cfg):
    torch.manual_seed(0)
    net = build_velocity_net(kind, 16, 3, 5, **cfg)
    x, t, cond = _inputs(4, 16, 3, 5)
    net(x, t, cond).square().mean().backward()
    unused = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == []


def test_time_scale_integer_diffusion_steps_match_scaled_flow_time():
    emb_flow = SinusoidalTimeEmbedding(32, scale=1000.0)
    emb_steps = SinusoidalTimeEmbedding(32, scale=1.0)
    steps = torch.tensor([0, 7, 99])
    torch.testing.assert_close(emb_steps(steps), emb_flow(steps / 1000.0))
    net = build_velocity_net("unet1d", 16, 2, 4, time_scale=1.0, **TINY_UNET)
    x, _, cond = _inputs(3, 16, 2, 4)
    assert net(x, steps, cond).shape == (3, 16, 2)  # integer timesteps accepted


def test_zero_init_output_and_default_init_scale():
    x, t, cond = _inputs(8, 16, 2, 4)
    for kind, cfg in [("unet1d", TINY_UNET), ("mlp", {"hidden_dims": (32,)})]:
        zero = build_velocity_net(kind, 16, 2, 4, zero_init_output=True, **cfg)
        assert torch.count_nonzero(zero(x, t, cond)) == 0
        std = build_velocity_net(kind, 16, 2, 4, **cfg)(x, t, cond).std().item()
        assert 0.02 < std < 3.0  # neither dead nor exploding at init


def test_shape_errors_name_expected_and_got():
    net = build_velocity_net("unet1d", 16, 2, 40, **TINY_UNET)
    x, t, cond = _inputs(2, 16, 2, 40)
    with pytest.raises(ValueError, match=r"x: expected .*\('B', 16, 2\), got \(2, 16, 3\)"):
        net(torch.randn(2, 16, 3), t, cond)
    with pytest.raises(ValueError, match=r"x: expected .*\('B', 16, 2\), got \(2, 8, 2\)"):
        net(torch.randn(2, 8, 2), t, cond)
    with pytest.raises(ValueError, match=r"x: expected .*got \(32, 2\)"):
        net(torch.randn(32, 2), t, cond)
    with pytest.raises(ValueError, match=r"cond: expected .*\(2, 40\), got \(2, 20\)"):
        net(x, t, torch.randn(2, 20))
    with pytest.raises(ValueError, match=r"cond: expected shape \(2, 40\), got None"):
        net(x, t, None)
    with pytest.raises(ValueError, match=r"t: expected shape \(2,\).*got \(2, 1\)"):
        net(x, t[:, None], cond)
    mlp = build_velocity_net("mlp", 16, 2, 40, hidden_dims=(8,))
    with pytest.raises(ValueError, match=r"cond: expected .*\(2, 40\), got \(2, 41\)"):
        mlp(x, t, torch.randn(2, 41))


def test_config_errors():
    with pytest.raises(ValueError, match=r"horizon 10 must be divisible by 2\^\(levels-1\) = 4"):
        ConditionalUNet1D(10, 2, 0, UNet1DConfig(down_dims=(8, 16, 32)))
    with pytest.raises(ValueError, match=r"horizon 16 must be divisible by 2\^\(levels-1\) = 32"):
        build_velocity_net("unet1d", 16, 2, 0, down_dims=(8,) * 6)
    with pytest.raises(ValueError, match="n_groups=8 must divide"):
        build_velocity_net("unet1d", 16, 2, 0, down_dims=(12, 24))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        build_velocity_net("unet1d", 16, 2, 0, kernel_size=4)
    with pytest.raises(ValueError, match="unknown velocity network kind 'transformer'"):
        build_velocity_net("transformer", 16, 2, 0)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['down_dims'\] for velocity network 'mlp'"):
        build_velocity_net("mlp", 16, 2, 0, down_dims=(8,))
    with pytest.raises(ValueError, match="action_dim must be an int >= 1"):
        MLPVelocityNet(16, 0, 0)


def test_config_roundtrip_and_state_dict():
    net = build_velocity_net("unet1d", 16, 2, 4, down_dims=[8, 16], time_embed_dim=8)
    assert net.config.down_dims == (8, 16) and net.config.time_embed_dim == 8
    clone = build_velocity_net("unet1d", 16, 2, 4, **dataclasses.asdict(net.config))
    clone.load_state_dict(net.state_dict())
    x, t, cond = _inputs(2, 16, 2, 4)
    torch.testing.assert_close(clone(x, t, cond), net(x, t, cond))
    mlp = MLPVelocityNet(16, 2, 0, MLPVelocityConfig(hidden_dims=(8,)))
    assert build_velocity_net("mlp", 16, 2, 0, **dataclasses.asdict(mlp.config)).config == mlp.config


def _count_on_meta(horizon, action_dim, cond_dim, config) -> int:
    with torch.device("meta"):  # no memory, no init: counting a 250 M-parameter net takes milliseconds
        return count_parameters(ConditionalUNet1D(horizon, action_dim, cond_dim, config))


def test_parameter_counts():
    # CPU config: widths (32, 64, 128), kernel 5, time embedding 64; Push-T keypoints (2 x 20-D obs, 2-D action)
    assert count_parameters(ConditionalUNet1D(16, 2, 40, UNet1DConfig())) == 1_180_002
    assert count_parameters(MLPVelocityNet(16, 2, 40)) == 611_872  # 3 x 512


@pytest.mark.parametrize(
    "name, down_dims, embed, cond_dim, action_dim, expected, anchor_millions",
    [
        # diffusion_policy's ConditionalUnet1D sizes, counted from its published configs
        ("low-dim Push-T keypoints", (256, 512, 1024), 256, 40, 2, 65_783_298, 65.8),
        ("low-dim Kitchen", (256, 512, 1024), 256, 120, 9, 66_942_729, 66.9),
        ("hybrid image Push-T", (512, 1024, 2048), 128, 132, 2, 251_511_938, 251.5),
    ],
)
def test_parameter_count_matches_diffusion_policy(name, down_dims, embed, cond_dim, action_dim, expected,
                                                  anchor_millions):
    config = UNet1DConfig(down_dims=down_dims, kernel_size=5, n_groups=8, time_embed_dim=embed)
    n = _count_on_meta(16, action_dim, cond_dim, config)
    assert n == expected
    assert abs(n / 1e6 - anchor_millions) < 0.05  # the anchor is given to 0.1 M
    if name.startswith("low-dim Push-T"):
        assert _count_on_meta(16, 2, 40, UNet1DConfig.diffusion_policy()) == expected


# ---------------------------------------------------------------------------------------------------- encoders
def test_lowdim_encoder_flattens_in_sorted_key_order():
    enc = LowDimObsEncoder({"state": (5,), "keypoint": (9, 2), "n_contacts": 1}, n_obs_steps=2)
    assert enc.keys == ("keypoint", "n_contacts", "state")
    assert enc.output_dim == 2 * (18 + 1 + 5) == 48
    b = 3
    obs = {
        "state": torch.randn(b, 2, 5),
        "keypoint": torch.randn(b, 2, 9, 2),
        "n_contacts": torch.randn(b, 2, 1),
        "img": torch.randn(b, 2, 3, 8, 8),  # keys the encoder does not use are ignored
    }
    out = enc(obs)
    assert out.shape == (b, 48)
    expected = torch.cat([obs[k].reshape(b, -1) for k in ("keypoint", "n_contacts", "state")], dim=-1)
    torch.testing.assert_close(out, expected)
    assert count_parameters(enc) == 0
    # the encoder's output is the velocity network's condition
    net = build_velocity_net("unet1d", 16, 2, enc.output_dim, **TINY_UNET)
    assert net(torch.randn(b, 16, 2), torch.rand(b), out).shape == (b, 16, 2)


def test_lowdim_encoder_errors():
    enc = LowDimObsEncoder({"obs": (20,), "agent_pos": (2,)}, n_obs_steps=2)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['obs'\]; expected keys \['agent_pos', 'obs'\]"):
        enc({"agent_pos": torch.randn(4, 2, 2)})
    with pytest.raises(ValueError, match=r"obs\['obs'\]: expected .*\(B, 2, 20\), got \(4, 2, 19\)"):
        enc({"agent_pos": torch.randn(4, 2, 2), "obs": torch.randn(4, 2, 19)})
    with pytest.raises(ValueError, match=r"obs\['agent_pos'\]: expected .*\(B, 2, 2\), got \(4, 3, 2\)"):
        enc({"agent_pos": torch.randn(4, 3, 2), "obs": torch.randn(4, 2, 20)})
    with pytest.raises(ValueError, match=r"obs\['obs'\]: expected .*got \(4, 40\)"):
        enc({"agent_pos": torch.randn(4, 2, 2), "obs": torch.randn(4, 40)})
    with pytest.raises(ValueError, match="batch size 5"):
        enc({"agent_pos": torch.randn(4, 2, 2), "obs": torch.randn(5, 2, 20)})
    with pytest.raises(ValueError, match="obs_shapes is empty"):
        LowDimObsEncoder({}, 2)
    with pytest.raises(ValueError, match=r"obs_shapes\['x'\] must be a tuple of positive ints"):
        LowDimObsEncoder({"x": (0, 2)}, 2)
    with pytest.raises(ValueError, match="n_obs_steps must be an int >= 1"):
        LowDimObsEncoder({"x": (2,)}, 0)
