"""The MLE-of-reconstructions objective checked against hand computations and finite differences: the Gaussian NLL's
value and masked reduction, the gradient through the unrolled 1/2/4-step decode (float64 gradcheck), the per-batch
step-count draw, and the scale of the flow-matching anchor relative to the NLL."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from fm_policy.finetune.mle import GaussianReconstructionNLL, MLEConfig, mle_finetune_policy
from fm_policy.flow_policy import FlowPolicy, FlowPolicyConfig
from fm_policy.normalizer import Normalizer

torch.set_num_threads(1)


def _tiny_policy(horizon: int = 2, action_dim: int = 2, seed: int = 0) -> FlowPolicy:
    torch.manual_seed(seed)
    config = FlowPolicyConfig(n_obs_steps=1, horizon=horizon, n_action_steps=1,
                              network={"kind": "mlp", "hidden_dims": [8, 8], "time_embed_dim": 4},
                              obs_shapes={"state": [1]}, action_dim=action_dim)
    rng = np.random.default_rng(seed)
    normalizer = Normalizer.fit({"state": rng.uniform(-1, 1, (20, 1)).astype(np.float32),
                                 "action": rng.uniform(-1, 1, (20, action_dim)).astype(np.float32)})
    return FlowPolicy(config, normalizer)


# ---------------------------------------------------------------------------------------------------------------
# the Gaussian NLL


def test_fixed_sigma_nll_is_the_hand_computed_value_with_and_without_a_mask():
    x_hat = torch.tensor([[[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]]])  # (1, 3, 2)
    x1 = torch.tensor([[[0.1, 0.7], [2.0, 0.0], [9.0, 9.0]]])
    nll = GaussianReconstructionNLL("fixed", 0.5, (3, 2))
    per = [0.5 * (e / 0.5) ** 2 + math.log(0.5) for e in (0.1, -0.3, 0.0, 1.0, 8.5, 8.5)]
    assert float(nll(x_hat, x1)) == pytest.approx(sum(per) / 6, rel=1e-6)
    mask = torch.tensor([[True, True, False]])  # the third step is padding: its (large) error must not count
    assert float(nll(x_hat, x1, mask)) == pytest.approx(sum(per[:4]) / 4, rel=1e-6)
    assert float(nll(x_hat, x1, torch.zeros(1, 3, dtype=torch.bool))) == 0.0  # all padded: 0, not NaN


def test_per_dim_sigma_nll_weights_each_element_by_its_own_sigma_and_gets_the_right_gradient():
    torch.manual_seed(0)
    x_hat, x1 = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    mask = torch.tensor([[True] * 3, [True, True, False], [True, False, False], [True] * 3])
    nll = GaussianReconstructionNLL("per_dim", 0.3, (3, 2))
    log_sigma = torch.log(torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]))
    with torch.no_grad():
        nll.log_sigma.copy_(log_sigma)
    value = nll(x_hat, x1, mask)
    sigma = log_sigma.exp()
    terms = 0.5 * ((x1 - x_hat) / sigma) ** 2 + log_sigma  # (4, 3, 2), broadcast over the batch
    expected = terms[mask].sum() / (mask.sum() * 2)
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-6)
    value.backward()
    # d/d log_sigma_e of mean(0.5 r^2 exp(-2 l) + l) over the n real elements = sum_real(1 - r^2 / sigma^2) / n
    r2 = ((x1 - x_hat) ** 2 * mask[..., None]).sum(0)
    count = mask[..., None].expand(4, 3, 2).sum(0)
    expected_grad = (count - r2 / sigma**2) / (mask.sum() * 2)
    torch.testing.assert_close(nll.log_sigma.grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_learned_scalar_sigma_converges_to_the_rms_error():
    """The NLL's minimiser in sigma is the RMS reconstruction error (what `sigma` reports during training)."""
    torch.manual_seed(0)
    x_hat, x1 = torch.zeros(64, 4, 2), 0.2 * torch.randn(64, 4, 2)
    nll = GaussianReconstructionNLL("scalar", 1.0, (4, 2))
    optimizer = torch.optim.Adam(nll.parameters(), lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        nll(x_hat, x1).backward()
        optimizer.step()
    assert float(nll.log_sigma.detach().exp()) == pytest.approx(float(x1.square().mean().sqrt()), rel=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# the gradient through the unrolled decode


class _Decode(nn.Module):
    """decode(z, cond) of a wrapper as a module, so `functional_call` can substitute the tuned network's weights."""

    def __init__(self, wrapper: nn.Module, steps: int) -> None:
        super().__init__()
        self.wrapper, self.steps = wrapper, steps

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.wrapper.decode(z, cond, self.steps)


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_gradient_through_the_unrolled_decode_matches_finite_differences(steps, solver):
    """float64 gradcheck of `MLEFinetunePolicy.decode` (what the loss backpropagates through) with respect to the
    codes, the observation condition and every weight of the tuned velocity network."""
    wrapper = mle_finetune_policy(_tiny_policy(), MLEConfig(decode_solver=solver, decode_steps=steps), "mle").double()
    generator = torch.Generator().manual_seed(steps)
    z = torch.randn(2, 2, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(2, wrapper.model.encoder.output_dim, generator=generator, dtype=torch.float64,
                       requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, c: wrapper.decode(z, c, steps), (z, cond))

    module = _Decode(wrapper, steps)
    names = [n for n, p in module.named_parameters() if n.startswith("wrapper.model.net.")]
    assert len(names) == 6  # two hidden layers and the output layer, weights and biases
    params = tuple(dict(module.named_parameters())[n].detach().clone().requires_grad_(True) for n in names)

    def decode_with(*values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, dict(zip(names, values, strict=True)), (z.detach(), cond.detach()))

    assert torch.autograd.gradcheck(decode_with, params)


def test_decode_gradient_is_what_the_loss_uses():
    """The loss's gradient on the network equals the chain rule through decode: dL/dtheta = (dL/dx_hat) dx_hat/dtheta
    with dL/dx_hat = (x_hat - x1) / (sigma^2 n) for the fixed-sigma NLL over n elements."""
    wrapper = mle_finetune_policy(_tiny_policy(), MLEConfig(decode_steps=2, sigma=0.5, fm_weight=0.0), "mle")
    generator = torch.Generator().manual_seed(0)
    batch = {"state": torch.rand(3, 1, 1, generator=generator), "action": torch.rand(3, 2, 2, generator=generator),
             "code": torch.randn(3, 2, 2, generator=generator)}
    wrapper.compute_loss(batch)["loss"].backward()
    got = {n: p.grad.clone() for n, p in wrapper.model.net.named_parameters()}
    wrapper.zero_grad()
    x1, cond, _ = wrapper.model.prepare_batch(batch)
    x_hat = wrapper.decode(batch["code"], cond, 2)
    x_hat.backward((x_hat.detach() - x1) / (0.25 * x1.numel()))
    for name, p in wrapper.model.net.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# the per-batch step count and the anchor


def _draws(config: MLEConfig, n: int, seed: int) -> list[int]:
    wrapper = mle_finetune_policy(_tiny_policy(), config, "mle")
    torch.manual_seed(seed)
    return [wrapper._decode_steps() for _ in range(n)]


def test_decode_steps_choices_draw_only_the_choices_all_of_them_reproducibly():
    config = MLEConfig(decode_steps_choices=[1, 2, 4, 8], deploy_steps=2)
    draws = _draws(config, 400, seed=0)
    counts = {k: draws.count(k) for k in set(draws)}
    assert set(counts) == {1, 2, 4, 8}
    assert all(60 <= c <= 140 for c in counts.values()), counts  # about uniform: 100 each
    assert _draws(config, 400, seed=0) == draws  # the global torch seed (saved in checkpoints) fixes the stream
    assert _draws(config, 400, seed=1) != draws
    assert set(_draws(MLEConfig(decode_steps=3), 20, seed=0)) == {3}  # no choices: always decode_steps


def test_compute_loss_decodes_with_the_drawn_step_count():
    wrapper = mle_finetune_policy(_tiny_policy(), MLEConfig(decode_steps_choices=[1, 3], deploy_steps=1,
                                                            fm_weight=0.0), "mle")
    used: list[int] = []
    decode = wrapper.decode
    wrapper.decode = lambda z, cond, steps=None: used.append(steps) or decode(z, cond, steps)
    batch = {"state": torch.rand(4, 1, 1), "action": torch.rand(4, 2, 2), "code": torch.randn(4, 2, 2)}
    torch.manual_seed(0)
    for _ in range(30):
        wrapper.compute_loss(batch)
    torch.manual_seed(0)
    assert used == [wrapper._decode_steps() for _ in range(30)] and set(used) == {1, 3}


@pytest.mark.parametrize("sigma_mode,sigma", [("fixed", 0.05), ("fixed", 0.5), ("per_dim", 0.2)])
def test_the_anchor_weight_is_relative_to_the_nll(sigma_mode, sigma):
    """loss = nll + fm_weight / (2 sigma^2) * fm: fm_weight = 1 weighs the flow-matching MSE like the reconstruction
    MSE inside the NLL, whatever sigma is (the documented scaling of MLEConfig.fm_weight)."""
    wrapper = mle_finetune_policy(_tiny_policy(), MLEConfig(sigma_mode=sigma_mode, sigma=sigma, fm_weight=0.3),
                                  "mle")
    batch = {"state": torch.rand(4, 1, 1), "action": torch.rand(4, 2, 2), "code": torch.randn(4, 2, 2)}
    out = wrapper.compute_loss(batch)
    expected = out["nll"] + 0.3 / (2 * sigma**2) * out["fm_loss"]
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    # the precision is detached: a learned sigma gets no gradient from the anchor
    if sigma_mode != "fixed":
        out["loss"].backward()
        grad_with = wrapper.objective.log_sigma.grad.clone()
        wrapper.zero_grad()
        wrapper.objective(wrapper.decode(batch["code"], wrapper.model.prepare_batch(batch)[1]),
                          wrapper.model.prepare_batch(batch)[0]).backward()
        torch.testing.assert_close(grad_with, wrapper.objective.log_sigma.grad)


def test_mle_configs_that_cannot_work_are_rejected():
    from fm_policy.config import ConfigError

    for bad in ({"code_check_samples": -1}, {"code_check_tol": 0.0}, {"decode_steps_choices": [1, 0],
                                                                       "deploy_steps": 1}):
        with pytest.raises(ConfigError):
            MLEConfig(**bad).validate()
    copy.deepcopy(MLEConfig()).validate()  # the defaults are valid
