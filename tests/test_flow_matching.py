"""Flow matching: path values, time samplers, masked loss, and agreement of path and solver time conventions."""

import pytest
import torch

from fm_policy.flow_matching import (
    LinearPath,
    TimeSampler,
    flow_matching_loss,
    sample_noise,
)
from fm_policy.solvers import solve


def test_linear_path_hand_computed() -> None:
    x1 = torch.tensor([[[2.0, -1.0]], [[4.0, 0.0]]])  # (B=2, T=1, D=2)
    x0 = torch.tensor([[[0.0, 1.0]], [[-4.0, 2.0]]])
    t = torch.tensor([0.25, 0.5])
    x_t, u = LinearPath().sample(x1, t, x0)
    torch.testing.assert_close(x_t, torch.tensor([[[0.5, 0.5]], [[0.0, 1.0]]]))
    torch.testing.assert_close(u, torch.tensor([[[2.0, -2.0]], [[8.0, -2.0]]]))
    # endpoints: t = 0 is the noise, t = 1 the data
    ends, _ = LinearPath().sample(x1, torch.tensor([0.0, 1.0]), x0)
    torch.testing.assert_close(ends[0], x0[0])
    torch.testing.assert_close(ends[1], x1[1])
    # the target recovers both ends from any point on the path
    torch.testing.assert_close(LinearPath.data_from_velocity(x_t, u, t), x1)
    torch.testing.assert_close(LinearPath.noise_from_velocity(x_t, u, t), x0)


def test_linear_path_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="noise shape"):
        LinearPath().sample(torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="t must have shape"):
        LinearPath().sample(torch.zeros(2, 3), torch.zeros(2, 1), torch.zeros(2, 3))


@pytest.mark.parametrize(
    ("sampler", "mean", "mean_tol"),
    [
        (TimeSampler("uniform"), 0.5, 0.02),
        (TimeSampler("logit_normal"), 0.5, 0.02),
        (TimeSampler("logit_normal", logit_mean=-1.0), 0.29, 0.03),  # noise-side emphasis
        (TimeSampler("beta"), 0.4, 0.02),  # Beta(1, 1.5): openpi's Beta(1.5, 1) in our time
        (TimeSampler("beta", beta_alpha=3.0, beta_beta=1.0), 0.75, 0.02),
    ],
    ids=["uniform", "logit_normal", "logit_normal_shifted", "beta_pi0", "beta_3_1"],
)
def test_time_sampler_range_and_mean(sampler: TimeSampler, mean: float, mean_tol: float) -> None:
    t = sampler.sample(4000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4000,) and t.dtype == torch.float32
    assert t.min() >= 0.0 and t.max() <= 1.0
    assert abs(t.mean().item() - mean) < mean_tol


def test_time_sampler_eps_reproducible_and_beta_matches_openpi() -> None:
    t = TimeSampler("beta", eps=0.01).sample(2000, generator=torch.Generator().manual_seed(1))
    assert t.min() >= 0.01 and t.max() <= 0.99
    again = TimeSampler("beta", eps=0.01).sample(2000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t, again)
    # openpi: s ~ Beta(1.5, 1) with s = 1 as noise; our t = 1 - s must have the same distribution as Beta(1, 1.5)
    s = torch.distributions.Beta(1.5, 1.0).sample((20000,))
    ours = TimeSampler("beta").sample(20000, generator=torch.Generator().manual_seed(2))
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    torch.testing.assert_close(torch.quantile(ours, qs), torch.quantile(1 - s, qs), atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="unknown time sampler kind"):
        TimeSampler("cosine")


def test_masked_loss_ignores_padded_steps() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    loss = flow_matching_loss(pred, target, mask)
    assert loss.ndim == 0
    # average over the 4 real steps x 3 dims = 12 real elements
    expected = ((pred - target) ** 2)[mask].sum() / 12
    torch.testing.assert_close(loss, expected)
    changed = pred.clone()
    changed[~mask] = 1e3  # garbage in padded steps
    torch.testing.assert_close(flow_matching_loss(changed, target, mask), loss)
    assert flow_matching_loss(changed, target) > 1e4  # ...which the unmasked loss does see
    torch.testing.assert_close(flow_matching_loss(pred, target, torch.ones(2, 4, dtype=torch.bool)),
                               flow_matching_loss(pred, target))
    assert flow_matching_loss(pred, target, torch.zeros(2, 4, dtype=torch.bool)) == 0.0


def test_loss_backprops_and_is_float32_for_half_inputs() -> None:
    pred = torch.randn(2, 3, 2, dtype=torch.bfloat16, requires_grad=True)
    loss = flow_matching_loss(pred, torch.zeros(2, 3, 2, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.bool))
    assert loss.dtype == torch.float32
    loss.backward()
    assert pred.grad is not None and pred.grad.dtype == torch.bfloat16


def test_sample_noise_is_gaussian() -> None:
    z = sample_noise((20000,), generator=torch.Generator().manual_seed(0))
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.03 and z.min() < -3 and z.max() > 3
    assert torch.equal(z, sample_noise((20000,), generator=torch.Generator().manual_seed(0)))


def test_linear_path_interpolates_and_targets_the_difference() -> None:
    x1 = torch.randn(5, 8, 2)
    noise = sample_noise(x1.shape, generator=torch.Generator().manual_seed(0))
    t = TimeSampler("beta", eps=1e-3).sample(5, generator=torch.Generator().manual_seed(1))
    x_t, target = LinearPath().sample(x1, t, noise)
    tt = t[:, None, None]
    torch.testing.assert_close(x_t, (1 - tt) * noise + tt * x1)
    torch.testing.assert_close(target, x1 - noise)


@pytest.mark.parametrize("num_steps", [1, 3, 10])
def test_exact_field_from_noise_lands_on_data(num_steps: int) -> None:
    """Path and solver agree on time: the exact field of one data point, (x1 - x) / (1 - t), carries Gaussian
    noise at t = 0 to x1 at t = 1 (exactly, even with Euler, since the conditional paths are straight)."""
    x1 = torch.tensor([[0.7, -0.3]], dtype=torch.float64).expand(6, 2)
    x0 = sample_noise((6, 2), dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def exact_field(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x1 - x) / (1 - t[:, None])

    out = solve(exact_field, x0, "euler", num_steps)
    torch.testing.assert_close(out.x, x1.contiguous())
    # and at every point of the path the exact field equals the path's target velocity
    t = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.9
    x_t, u = LinearPath().sample(x1.contiguous(), t, x0)
    torch.testing.assert_close(exact_field(t, x_t), u)
