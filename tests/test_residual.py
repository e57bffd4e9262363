"""Contracting residual fields: the by-construction Jacobian bound for random weights, exact zero init, the residual
policy reproducing its base bit for bit, learning from zero init, and save/load through `load_policy`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fm_policy.factory import load_policy
from fm_policy.finetune.contraction import sym_jacobian_max_eig
from fm_policy.flow_policy import FlowPolicy, FlowPolicyConfig
from fm_policy.networks.residual import ResidualConfig, build_residual
from fm_policy.normalizer import Normalizer
from fm_policy.residual_policy import ResidualFlowPolicy

torch.set_num_threads(1)
HORIZON, ACTION_DIM, COND_DIM = 4, 2, 3
CONTRACTING = ("monotone", "damped", "lure")


def _perturb(module: torch.nn.Module, scale: float, seed: int) -> None:
    """Move every weight away from its (zero) initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _base_policy(seed: int = 0) -> FlowPolicy:
    torch.manual_seed(seed)
    config = FlowPolicyConfig(n_obs_steps=2, horizon=HORIZON, n_action_steps=2,
                          network={"kind": "mlp", "hidden_dims": [32, 32], "time_embed_dim": 16},
                          obs_shapes={"state": [COND_DIM]}, action_dim=ACTION_DIM)
    rng = np.random.default_rng(seed)
    normalizer = Normalizer.fit({"state": rng.uniform(0, 5, (50, COND_DIM)).astype(np.float32),
                                 "action": rng.uniform(-3, 3, (50, ACTION_DIM)).astype(np.float32)})
    return FlowPolicy(config, normalizer).eval()


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(CONTRACTING),
    seed=st.integers(0, 2**31 - 1),
    eps=st.sampled_from([None, 0.0, 0.05, 0.7]),
    width=st.sampled_from([3, 8, 16]),
    weight_scale=st.floats(0.05, 1.0),
    x_scale=st.floats(0.01, 10.0),
    slope_min=st.sampled_from([0.0, 0.1, 0.5]),
    lip_ratio=st.sampled_from([0.0, 0.5, 0.95]),
)
def test_symmetric_jacobian_bound_holds_for_random_weights(kind, seed, eps, width, weight_scale, x_scale, slope_min,
                                                            lip_ratio):
    """lambda_max(sym(dr/dx)) <= -guaranteed_rate <= -eps at random points, times, conditions and weights (eps None:
    the kind's default, 0.1 for lure)."""
    config = ResidualConfig(kind=kind, width=width, cond_hidden=16, time_embed_dim=8, eps=eps, slope_min=slope_min,
                            lip_ratio=lip_ratio)
    residual = build_residual(config, HORIZON, ACTION_DIM, COND_DIM).double()
    _perturb(residual, weight_scale, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    batch = 6
    t = torch.rand(batch, generator=generator, dtype=torch.float64)
    x = x_scale * torch.randn(batch, HORIZON * ACTION_DIM, generator=generator, dtype=torch.float64)
    cond = 3.0 * torch.randn(batch, COND_DIM, generator=generator, dtype=torch.float64)
    mu = sym_jacobian_max_eig(lambda z: residual.flat(t, z, cond), x)
    rate = residual.guaranteed_rate(t, cond).detach()
    assert rate.shape == (batch,) and (rate >= config.rate_floor).all()
    assert config.rate_floor == (eps if eps is not None else (0.1 if kind == "lure" else 0.0))
    assert (mu <= -rate + 1e-9 * (1.0 + rate)).all(), (mu, rate)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), width=st.sampled_from([1, 5, 12, 40]), scale=st.floats(0.01, 3.0),
       horizon=st.sampled_from([1, 3]), action_dim=st.sampled_from([1, 4]))
def test_lure_weights_satisfy_the_contraction_lmi_for_any_parameters(seed, width, scale, horizon, action_dim):
    """The direct parameterisation maps any free parameters to (A, B, C, L) with
    H = [[-(A + A^T), -(B + C^T L)], [., 2 L]] >= 0 (min eigenvalue >= 0 up to rounding), the LMI whose
    consequence, mu(d/dx [A x + B tanh(C x + b)]) <= 0, the Jacobian test above checks."""
    residual = build_residual(ResidualConfig(kind="lure", width=width, cond_hidden=8, time_embed_dim=8),
                              horizon, action_dim, COND_DIM).double()
    _perturb(residual, scale, seed)
    h = residual.lmi_matrix().detach()
    assert h.shape == (horizon * action_dim + width,) * 2
    torch.testing.assert_close(h, h.T)
    eigs = torch.linalg.eigvalsh(h)
    assert eigs[0] >= -1e-12 * max(1.0, float(eigs[-1])), eigs[0]


@pytest.mark.parametrize("task,horizon,action_dim", [("Push-T", 16, 2), ("Robomimic", 16, 7), ("Kitchen", 16, 9)])
def test_lure_certifies_a_positive_rate_at_every_task_size_where_monotone_cannot(task, horizon, action_dim):
    """d = 32 / 112 / 144 with the default width 64: the lure kind certifies its default rate 0.1 at init and after
    random weights, and the measured log-norm respects it; the monotone kind's learned rate is 0 whenever d > width
    (its W has rank <= 64 < d), so at its default eps = 0 it certifies nothing at Robomimic / Kitchen sizes."""
    t, cond = torch.rand(2, dtype=torch.float64), torch.randn(2, COND_DIM, dtype=torch.float64)
    lure = build_residual(ResidualConfig(kind="lure"), horizon, action_dim, COND_DIM).double()
    assert torch.allclose(lure.guaranteed_rate(t, cond), torch.full((2,), 0.1, dtype=torch.float64))
    _perturb(lure, 0.2, 3)
    rate = lure.guaranteed_rate(t, cond).detach()
    assert (rate >= 0.1).all()
    x = torch.randn(2, horizon * action_dim, dtype=torch.float64)
    mu = sym_jacobian_max_eig(lambda z: lure.flat(t, z, cond), x)
    assert (mu <= -rate + 1e-9).all(), (task, mu, rate)
    monotone = build_residual(ResidualConfig(kind="monotone"), horizon, action_dim, COND_DIM).double()
    _perturb(monotone, 0.2, 3)
    monotone_rate = monotone.guaranteed_rate(t, cond).detach()
    if horizon * action_dim > 64:
        assert torch.equal(monotone_rate, torch.zeros(2, dtype=torch.float64))
    else:
        assert (monotone_rate > 0).all()  # Push-T: W (64 x 32) has full column rank


def test_jacobian_helper_matches_autograd_and_power_iteration():
    residual = build_residual(ResidualConfig(kind="free", width=16, cond_hidden=16), HORIZON, ACTION_DIM,
                              COND_DIM).double()
    _perturb(residual, 0.5, 0)
    t, x, cond = torch.rand(3, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 3).double()
    exact = sym_jacobian_max_eig(lambda z: residual.flat(t, z, cond), x)
    for i in range(3):
        def one(z, i=i):
            return residual.flat(t[i:i + 1], z[None], cond[i:i + 1])[0]

        jac = torch.autograd.functional.jacobian(one, x[i])
        expected = torch.linalg.eigvalsh(0.5 * (jac + jac.T))[-1]
        torch.testing.assert_close(exact[i], expected)
    power = sym_jacobian_max_eig(lambda z: residual.flat(t, z, cond), x, method="power", iters=200,
                                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(power, exact, rtol=1e-4, atol=1e-6)


def test_lure_starts_at_minus_eps_x_and_at_exactly_zero_with_eps_zero():
    """A strictly positive rate at init forbids a zero start (J = 0 there); lure's default start is -0.1 x."""
    x, t, cond = 4.0 * torch.randn(5, HORIZON, ACTION_DIM), torch.rand(5), torch.randn(5, COND_DIM)
    default = build_residual(ResidualConfig(kind="lure"), HORIZON, ACTION_DIM, COND_DIM)
    torch.testing.assert_close(default(t, x, cond), -0.1 * x)
    zero = build_residual(ResidualConfig(kind="lure", eps=0.0), HORIZON, ACTION_DIM, COND_DIM)
    assert not zero(t, x, cond).any()
    assert torch.equal(zero.guaranteed_rate(t, cond), torch.zeros(5))


@pytest.mark.parametrize("kind", ["monotone", "damped", "free"])
def test_zero_init_output_is_exactly_zero(kind):
    residual = build_residual(ResidualConfig(kind=kind), HORIZON, ACTION_DIM, COND_DIM)
    out = residual(torch.rand(5), 4.0 * torch.randn(5, HORIZON, ACTION_DIM), torch.randn(5, COND_DIM))
    assert out.shape == (5, HORIZON, ACTION_DIM) and not out.any()
    assert torch.equal(residual.guaranteed_rate(torch.rand(5), torch.randn(5, COND_DIM)), torch.zeros(5)) \
        if kind != "free" else residual.guaranteed_rate(torch.rand(5), torch.randn(5, COND_DIM)) is None


def test_positive_eps_is_a_rate_from_the_start():
    """eps > 0 buys a guaranteed rate at init at the price of r = -eps x instead of 0 (documented trade-off)."""
    residual = build_residual(ResidualConfig(kind="monotone", eps=0.3), HORIZON, ACTION_DIM, COND_DIM)
    x = torch.randn(2, HORIZON, ACTION_DIM)
    torch.testing.assert_close(residual(torch.rand(2), x, torch.randn(2, COND_DIM)), -0.3 * x)


@pytest.mark.parametrize("kind", ["monotone", "damped", "free"])
def test_zero_init_residual_policy_reproduces_base_actions_exactly(kind):
    base = _base_policy()
    policy = ResidualFlowPolicy.from_base(base, ResidualConfig(kind=kind, width=16, cond_hidden=16)).eval()
    obs = {"state": torch.rand(5, 2, COND_DIM) * 5}
    noise = torch.randn(5, HORIZON, ACTION_DIM)
    for steps, solver in ((1, "euler"), (4, "euler"), (2, "midpoint"), (1, "rk4")):
        expected = base.predict_action_chunk(obs, num_steps=steps, solver=solver, noise=noise)
        assert torch.equal(policy.predict_action_chunk(obs, num_steps=steps, solver=solver, noise=noise), expected)


@pytest.mark.parametrize("kind", ["monotone", "damped", "free", "lure"])
def test_residual_learns_from_zero_init_and_base_stays_frozen(kind):
    """At exact zero init the loss still has a non-zero gradient on the residual (no dead start), none on the base."""
    policy = ResidualFlowPolicy.from_base(_base_policy(), ResidualConfig(kind=kind, width=16, cond_hidden=16))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("residual.") for n in trainable)
    batch = {"state": torch.rand(8, 2, COND_DIM) * 5, "action": torch.rand(8, HORIZON, ACTION_DIM) * 6 - 3}
    policy.compute_loss(batch)["loss"].backward()
    grad_norm = sum(float(p.grad.norm()) for p in policy.parameters() if p.grad is not None)
    assert grad_norm > 0
    if kind == "lure":  # every weight of the parameterisation gets a first-order gradient at its zero start
        for name in ("k", "y", "c", "drift_head.weight"):
            assert policy.residual.get_parameter(name).grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in policy.named_parameters() if not n.startswith("residual."))


def test_damped_gate_cannot_get_stuck_below_zero():
    """The gate's forward value is max(g, 0) but its gradient passes straight through, so a gate pushed negative by
    one step still receives gradient (and k = 0 there keeps the bound)."""
    residual = build_residual(ResidualConfig(kind="damped", width=8, cond_hidden=8), HORIZON, ACTION_DIM, COND_DIM)
    with torch.no_grad():
        residual.gate.fill_(-0.5)
    t, x, cond = torch.rand(4), torch.randn(4, HORIZON, ACTION_DIM), torch.randn(4, COND_DIM)
    out = residual(t, x, cond)
    assert not out.any()
    (out * x).sum().backward()
    assert residual.gate.grad is not None and residual.gate.grad != 0


def test_residual_policy_saves_and_loads_with_its_residual_config(tmp_path):
    config = ResidualConfig(kind="damped", width=12, cond_hidden=20, time_embed_dim=8, eps=0.01, lip_ratio=0.8)
    policy = ResidualFlowPolicy.from_base(_base_policy(), config)
    _perturb(policy.residual, 0.3, 1)
    policy.save_pretrained(tmp_path / "res")
    meta = json.loads((tmp_path / "res" / "config.json").read_text())
    assert meta["policy"]["type"] == ResidualFlowPolicy.name and meta["policy"]["residual"]["width"] == 12
    loaded = load_policy(tmp_path / "res")
    assert type(loaded) is ResidualFlowPolicy and loaded.residual_config == config
    obs = {"state": torch.rand(3, 2, COND_DIM) * 5}
    noise = torch.randn(3, HORIZON, ACTION_DIM)
    a = policy.eval().predict_action_chunk(obs, num_steps=3, noise=noise)
    b = loaded.predict_action_chunk(obs, num_steps=3, noise=noise)
    assert torch.equal(a, b) and a.shape == (3, 2, ACTION_DIM)
    assert not torch.equal(a, _base_policy().predict_action_chunk(obs, num_steps=3, noise=noise))


def test_residual_policies_saved_before_the_lure_kind_and_placements_still_load():
    """A residual config written before `eps` defaulted per kind and before `placement` / `refine_steps` existed
    (format 2 without those keys, and the format-1 flat layout) loads as the same monotone residual it was."""
    from fm_policy.factory import policy_config_from_dict

    values = {"type": "flow_residual", "n_obs_steps": 2, "horizon": HORIZON, "n_action_steps": 2,
              "action_dim": ACTION_DIM, "obs_shapes": {"state": [COND_DIM]},
              "network": {"kind": "mlp", "hidden_dims": [32, 32], "time_embed_dim": 16},
              "residual": {"kind": "monotone", "width": 16, "cond_hidden": 16, "time_embed_dim": 32, "eps": 0.0,
                           "slope_min": 0.1, "lip_ratio": 0.5}}
    config = policy_config_from_dict(values, "old config.json", {"format": 2})
    assert config.residual.placement == "velocity" and config.residual.rate_floor == 0.0
    v1 = {k: v for k, v in values.items() if k != "residual"}
    config = policy_config_from_dict(v1, "v1 config.json", {"policy": v1, "residual": {"width": 16}})
    assert config.residual.kind == "monotone" and config.residual.rate_floor == 0.0


def test_bad_residual_configs_are_rejected():
    from fm_policy.config import ConfigError

    for bad in ({"kind": "lmi"}, {"eps": -1.0}, {"lip_ratio": 1.0}, {"slope_min": 1.5}, {"time_embed_dim": 5},
                {"placement": "before"}, {"refine_steps": 0}):
        with pytest.raises(ConfigError):
            build_residual(ResidualConfig(**bad), HORIZON, ACTION_DIM, COND_DIM)
    with pytest.raises(TypeError, match="plain FlowPolicy"):
        ResidualFlowPolicy.from_base(ResidualFlowPolicy.from_base(_base_policy()))
