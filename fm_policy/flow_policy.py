"""The flow-matching action-chunk policy: a velocity field v(t, x | obs) trained on the linear path, sampled by
integrating it from Gaussian noise (t = 0) to an action chunk (t = 1) in 1-16 steps (see fm_policy.flow_matching)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fm_policy.couplings import check_coupling, couple_noise
from fm_policy.flow_matching import LinearPath, TimeSampler, flow_matching_loss, sample_noise
from fm_policy.normalizer import Normalizer
from fm_policy.policy import BasePolicy, PolicyConfig
from fm_policy.solvers import FIXED_STEP_METHODS, METHODS, solve


@dataclass
class FlowPolicyConfig(PolicyConfig):
    """The flow policy: how training draws flow times and pairs noise with chunks, and how the ODE is integrated at
    deployment."""

    type: str = "flow"
    solver: str = "euler"  # euler | midpoint | rk4 | heun2 ... | dopri5 and torchdiffeq's adaptive methods
    time_sampling: str = "uniform"  # uniform | logit_normal | beta (see fm_policy.flow_matching.TimeSampler)
    time_logit_mean: float = 0.0
    time_logit_std: float = 1.0
    time_beta_alpha: float = 1.0
    time_beta_beta: float = 1.5
    # training only: how noise draws are paired with action chunks (fm_policy.couplings). independent | ot (minibatch
    # optimal transport of the noise draws among the batch; each sample keeps its observation)
    coupling: str = "independent"
    # ot: the cost of moving a noise draw between observations (0 = plain minibatch OT, large = only between
    # near-identical observations; why in fm_policy.couplings)
    coupling_cond_weight: float = 10.0

    def validate(self) -> None:
        super().validate()
        check_coupling(self.coupling, self.coupling_cond_weight)


class FlowPolicy(BasePolicy):
    name = "flow"
    config_class = FlowPolicyConfig
    solvers = METHODS
    fixed_cost_solvers = FIXED_STEP_METHODS
    supports_fused_export = True
    config: FlowPolicyConfig

    def __init__(self, config: FlowPolicyConfig, normalizer: Normalizer):
        super().__init__(config, normalizer)
        self.time_sampler = TimeSampler(
            kind=config.time_sampling,  # type: ignore[arg-type]
            logit_mean=config.time_logit_mean,
            logit_std=config.time_logit_std,
            beta_alpha=config.time_beta_alpha,
            beta_beta=config.time_beta_beta,
        )

    def velocity(self, t: Tensor, x: Tensor, cond: Tensor) -> Tensor:
        """The learned field at flow time t (B,) in [0, 1] for normalised chunks x (B, horizon, A)."""
        return self.net(x, t, cond)

    def training_draws(self, actions: Tensor, cond: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The noise paired with each chunk (by `config.coupling`) and the flow times of one training batch.

        The one place pre-training, GFT and plain fine-tuning draw them, in this order (noise, then t), so their
        losses agree on the same random state; the independent coupling draws exactly what it always drew."""
        noise = sample_noise(actions.shape, actions.device, actions.dtype)
        noise = couple_noise(noise, actions, cond, mask, self.config.coupling, self.config.coupling_cond_weight)
        t = self.time_sampler.sample(actions.shape[0], actions.device).to(actions.dtype)
        return noise, t

    def _loss(self, actions: Tensor, cond: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
        noise, t = self.training_draws(actions, cond, mask)
        x_t, target = LinearPath().sample(actions, t, noise)
        loss = flow_matching_loss(self.velocity(t, x_t, cond), target, mask)
        return {"loss": loss}

    def _sample(self, cond: Tensor, num_steps: int, solver: str | None, noise: Tensor | None) -> Tensor:
        if noise is None:
            noise = sample_noise((cond.shape[0], self.config.horizon, self.config.action_dim), cond.device, cond.dtype)
        result = solve(lambda t, x: self.velocity(t, x, cond), noise, solver or self.config.solver, num_steps)
        return result.x
