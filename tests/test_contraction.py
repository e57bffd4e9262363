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


@pytest.mark.parametrize("kind", ["monotone", "damped", "lure"])
def test_analysis_is_finite_and_measured_jacobian_respects_the_certified_rate(kind):
    policy = _with_residual(_base_policy(), ResidualConfig(kind=kind, width=16, cond_hidden=16, eps=0.1), 0.3)
    out = analyze_policy(policy, _obs())
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values()), out
    assert out["certified_rate_min"] >= 0.1
    assert out["jac_residual_max"] <= -out["certified_rate_min"] + 1e-4
    # lambda_max of a sum is at most the sum of lambda_max: the residual can only lower the full field's log-norm
    assert out["jac_full_max"] <= out["jac_base_max"] + out["jac_residual_max"] + 1e-4
    assert {"jac_full_max_t0.000", "jac_full_max_t0.875", "gain_noise_mean", "gain_mid_max"} <= set(out)
    # certified rate, measured log-norm of the refined field and the ISS-style gains, with the base's beside them
    assert {"certified_rate_min", "jac_full_max", "gain_obs_mean", "gain_obs_max", "base_gain_noise_mean",
            "base_gain_mid_max", "base_gain_obs_mean", "residual_drift_norm_mean", "residual_xdep_norm_max",
            "residual_norm_mean", "base_velocity_norm_mean"} <= set(out)


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


def test_residual_decomposition_separates_drift_from_the_x_dependent_part():
    """A residual that is a pure drift (monotone with W = 0, drift head moved) has x-dependent part 0 and drift norm
    = its norm; a pure damping (lure at init: r = -eps x) has drift 0 and x-dependent norm = eps ||x||."""
    base = _base_policy()
    drift_only = ResidualFlowPolicy.from_base(base, ResidualConfig(kind="monotone", width=16, cond_hidden=16)).eval()
    with torch.no_grad():
        drift_only.residual.drift_head.bias.copy_(torch.linspace(-1, 1, 16))
    out = analyze_policy(drift_only, _obs(4), num_steps=2)
    assert out["residual_xdep_norm_max"] == 0.0
    assert out["residual_drift_norm_mean"] == pytest.approx(float(torch.linspace(-1, 1, 16).norm()), rel=1e-6)
    assert out["residual_norm_mean"] == pytest.approx(out["residual_drift_norm_mean"], rel=1e-6)

    damping = ResidualFlowPolicy.from_base(base, ResidualConfig(kind="lure", width=16, cond_hidden=16, eps=0.25))
    damping.eval()
    out = analyze_policy(damping, _obs(4), num_steps=2)
    assert out["residual_drift_norm_max"] == 0.0
    # the trajectory states are the refined sampler's; r = -0.25 x there, so |r| = 0.25 |x|
    cond = damping.encode_obs(_obs(4))
    noise = torch.randn(4, 8, 2, generator=torch.Generator().manual_seed(0))
    from fm_policy.solvers import solve

    with torch.no_grad():
        traj = solve(lambda t, x: damping.velocity(t, x, cond), noise, "euler", 2, return_trajectory=True).trajectory
    expected = 0.25 * traj[:-1].flatten(2).norm(dim=2)
    assert out["residual_xdep_norm_mean"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert out["certified_rate_min"] == pytest.approx(0.25)


def test_gains_of_a_zero_residual_equal_the_base_gains_and_a_damping_one_lowers_them():
    """Same noise and the same disturbances for the refined and the base sampler: with a zero residual every gain
    equals its `base_gain_*` twin exactly; pure damping (-eps x) lowers the noise and mid-trajectory gains."""
    base = _base_policy()
    zero = ResidualFlowPolicy.from_base(base, ResidualConfig(kind="monotone", width=16, cond_hidden=16)).eval()
    out = analyze_policy(zero, _obs(), num_steps=4)
    for key in ("gain_noise_mean", "gain_noise_max", "gain_mid_mean", "gain_obs_mean", "gain_obs_max"):
        assert out[key] == out[f"base_{key}"], key
    assert out["gain_obs_mean"] > 0 and out == analyze_policy(zero, _obs(), num_steps=4)  # reproducible
    plain = analyze_policy(base, _obs(), num_steps=4)
    assert plain["gain_obs_mean"] == out["gain_obs_mean"] and "base_gain_obs_mean" not in plain
    damped = analyze_policy(
        ResidualFlowPolicy.from_base(base, ResidualConfig(kind="lure", width=16, cond_hidden=16, eps=1.0)).eval(),
        _obs(), num_steps=4)
    for where in ("noise", "mid"):
        assert damped[f"gain_{where}_mean"] < damped[f"base_gain_{where}_mean"]


def test_observation_gain_of_a_linear_policy_is_exact():
    """A field v = M o_norm (no x dependence) integrated over [0, 1] moves the chunk by exactly M delta u: with an
    orthogonal-scaled M the gain is the scale, for every direction u."""
    from fm_policy.finetune.contraction import observation_gain

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.normalizer = _base_policy().normalizer
            self.obs_shapes = {"state": (5,)}
            self.encoder = lambda obs: obs["state"].flatten(1)  # (B, 10)

    policy = Linear()
    q, _ = torch.linalg.qr(torch.randn(16, 10, generator=torch.Generator().manual_seed(0)))  # orthonormal columns
    out = observation_gain(policy, _obs(), torch.zeros(8, 8, 2), lambda t, x, c: 3.0 * (c @ q.T).reshape(x.shape),
                           num_steps=3, solver="euler", delta=1e-2, generator=torch.Generator().manual_seed(1))
    assert out["gain_obs_mean"] == pytest.approx(3.0, rel=1e-4) and out["gain_obs_max"] == pytest.approx(3.0, rel=1e-4)


def test_terminal_refiner_analysis_measures_the_refinement_stage():
    base = _base_policy()
    policy = _with_residual(base, ResidualConfig(kind="lure", width=16, cond_hidden=16, placement="terminal",
                                                 refine_steps=3), 0.3)
    out = analyze_policy(policy, _obs(4), num_steps=2)
    assert out["refine_steps"] == 3.0 and out["num_steps"] == 2.0
    assert out["jac_residual_max"] <= -out["certified_rate_min"] + 1e-4 and out["certified_rate_min"] >= 0.1
    assert {"jac_residual_max_t0.000", "jac_residual_max_t0.667", "residual_drift_norm_mean", "gain_obs_mean",
            "base_gain_noise_mean"} <= set(out)
    assert "jac_base_max" not in out  # the flow's field is the base itself: jac_full is its log-norm
    # gains include the stage: they differ from the base flow's
    assert out["gain_noise_mean"] != out["base_gain_noise_mean"]


def test_terminal_refiner_policy_is_not_exported_without_its_stage(tmp_path):
    """The exported graphs hold the base field only; a host loop over them would skip the refinement stage, so
    export refuses the policy instead of writing something that acts differently."""
    from fm_policy.deploy.export import ExportConfig, ExportError, export_policy

    policy = _with_residual(_base_policy(), ResidualConfig(kind="lure", width=8, cond_hidden=8, placement="terminal",
                                                           refine_steps=2), 0.3)
    with pytest.raises(ExportError, match="cannot be exported"):
        export_policy(policy, tmp_path / "export", ExportConfig(format="torchscript", fused_steps=()))
