"""Contraction analysis: exact perturbation gains of a linear field, measured Jacobians against the residual's
certified rate, contracting vs unconstrained residuals, and `analyze_flow` on saved policies with and without data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_flow import tiny_state_store

from fm_policy.finetune.contraction import analyze_flow, analyze_policy, perturbation_test
from fm_policy.flow_policy import FlowPolicy, FlowPolicyConfig
from fm_policy.networks.residual import ResidualConfig
from fm_policy.normalizer import Normalizer
from fm_policy.residual_policy import ResidualFlowPolicy

torch.set_num_threads(1)


def _base_policy(seed: int = 0) -> FlowPolicy:
    """A flow policy shaped for the tiny store below: state (5,), 2-D actions, horizon 8."""
    torch.manual_seed(seed)
    config = FlowPolicyConfig(n_obs_steps=2, horizon=8, n_action_steps=4, num_inference_steps=8,
                          network={"kind": "mlp", "hidden_dims": [32, 32], "time_embed_dim": 16},
                          obs_shapes={"state": [5]}, action_dim=2)
    rng = np.random.default_rng(seed)
    normalizer = Normalizer.fit({"state": rng.uniform(100, 400, (50, 5)).astype(np.float32),
                                 "action": rng.uniform(100, 400, (50, 2)).astype(np.float32)})
    return FlowPolicy(config, normalizer).eval()


def _with_residual(base: FlowPolicy, config: ResidualConfig, scale: float, seed: int = 1) -> ResidualFlowPolicy:
    policy = ResidualFlowPolicy.from_base(base, config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.residual.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return policy


def _obs(n: int = 8) -> dict[str, torch.Tensor]:
    return {"state": torch.rand(n, 2, 5, generator=torch.Generator().manual_seed(5)) * 300 + 100}


@pytest.mark.parametrize("t_disturb,k", [(0.5, 2), (0.0, 0), (1.0, 4)])
def test_perturbation_gain_of_a_linear_field_is_exact(t_disturb, k):
    """Euler on v = lam x multiplies any disturbance by (1 + lam dt) per remaining step."""
    lam, steps = -1.5, 4
    x0 = torch.randn(5, 3, 2)
    out = perturbation_test(lambda t, x: lam * x, x0, steps, "euler", delta=1e-2, t_disturb=t_disturb,
                            generator=torch.Generator().manual_seed(0))
    factor = 1 + lam / steps
    assert out["gain_noise_mean"] == pytest.approx(abs(factor) ** steps, rel=1e-4)
    assert out["gain_noise_max"] == pytest.approx(abs(factor) ** steps, rel=1e-4)
    assert out["gain_mid_mean"] == pytest.approx(abs(factor) ** (steps - k), rel=1e-4)
    assert out["mid_t"] == pytest.approx(k / steps)
    assert out["perturb_noise_mean"] == pytest.approx(1e-2 * abs(factor) ** steps, rel=1e-4)


@pytest.mark.parametrize("kind", ["monotone", "damped"])
def test_analysis_is_finite_and_measured_jacobian_respects_the_certified_rate(kind):
    policy = _with_residual(_base_policy(), ResidualConfig(kind=kind, width=16, cond_hidden=16, eps=0.1), 0.3)
    out = analyze_policy(policy, _obs())
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values()), out
    assert out["certified_rate_min"] >= 0.1
    assert out["jac_residual_max"] <= -out["certified_rate_min"] + 1e-4
    # lambda_max of a sum is at most the sum of lambda_max: the residual can only lower the full field's log-norm
    assert out["jac_full_max"] <= out["jac_base_max"] + out["jac_residual_max"] + 1e-4
    assert {"jac_full_max_t0.000", "jac_full_max_t0.875", "gain_noise_mean", "gain_mid_max"} <= set(out)


def test_power_iteration_agrees_with_exact_jacobians():
    policy = _with_residual(_base_policy(), ResidualConfig(kind="free", width=16, cond_hidden=16), 0.3)
    exact = analyze_policy(policy, _obs(4), num_steps=2)
    power = analyze_policy(policy, _obs(4), num_steps=2, jacobian="power")
    for key in ("jac_full_max", "jac_base_max", "jac_residual_max"):
        assert power[key] == pytest.approx(exact[key], rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("kind", ["monotone", "damped"])
def test_contracting_residual_damps_perturbations_that_an_unconstrained_one_amplifies(kind):
    """Same base, residual weights of the same random size, eps = 0 (no hand-set damping): the contracting residual
    shrinks disturbances of the initial noise and of a mid-trajectory state, the plainly added MLP amplifies them."""
    base = _base_policy()
    plain = analyze_policy(base, _obs())
    contracting = analyze_policy(
        _with_residual(base, ResidualConfig(kind=kind, width=16, cond_hidden=16, eps=0.0), 0.3), _obs())
    free = analyze_policy(_with_residual(base, ResidualConfig(kind="free", width=16, cond_hidden=16), 0.3), _obs())
    for where in ("noise", "mid"):
        assert contracting[f"gain_{where}_mean"] < plain[f"gain_{where}_mean"] < free[f"gain_{where}_mean"]
        assert contracting[f"gain_{where}_max"] < 1.0 < free[f"gain_{where}_max"]
    assert contracting["jac_residual_max"] <= 0.0 < free["jac_residual_max"]


def test_analyze_flow_on_saved_policies(tmp_path):
    store = tiny_state_store(tmp_path / "tiny.zarr", n_episodes=3)
    base = _base_policy()
    base.save_pretrained(tmp_path / "flow")
    out = analyze_flow(tmp_path / "flow", data_path=store, n=6, num_steps=2)
    assert out["from_data"] == 1.0 and out["n"] == 6.0
    assert {"code_abs_mean", "code_std", "code_encode_rmse", "gain_noise_mean", "jac_full_max"} <= set(out)
    assert all(math.isfinite(v) for v in out.values()), out
    assert "jac_residual_max" not in out

    _with_residual(base, ResidualConfig(kind="damped", width=8, cond_hidden=8), 0.3).save_pretrained(tmp_path / "res")
    out = analyze_flow(tmp_path / "res", n=4, num_steps=2)  # no data: observations inside the normaliser range
    assert out["from_data"] == 0.0 and "code_std" not in out
    assert all(math.isfinite(v) for v in out.values()), out
    assert out["jac_residual_max"] <= -out["certified_rate_min"] + 1e-4
