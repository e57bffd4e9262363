"""The flow-matching action-chunk policy: a velocity field v(t, x | obs) trained on the linear path, sampled by
integrating it from Gaussian noise (t = 0) to an action chunk (t = 1) in 1-16 steps (see fm_policy.flow_matching)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fm_policy.flow_matching import LinearPath, TimeSampler, flow_matching_loss, sample_noise
from fm_policy.normalizer import Normalizer
from fm_policy.policy import BasePolicy, PolicyConfig
from fm_policy.solvers import FIXED_STEP_METHODS, METHODS, solve


@dataclass
class FlowPolicyConfig(PolicyConfig):
    """The flow policy: how training draws flow times, and how the ODE is integrated at deployment."""

    type: str = "flow"
    solver: str = "euler"  # euler | midpoint | rk4 | heun2 ... | dopri5 and torchdiffeq's adaptive methods
    time_sampling: str = "uniform"  # uniform | logit_normal | beta (see fm_policy.flow_matching.TimeSampler)
    time_logit_mean: float = 0.0
    time_logit_std: float = 1.0
    time_beta_alpha: float = 1.0
    time_beta_beta: float = 1.5


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

    def _loss(self, actions: Tensor, cond: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
        noise = sample_noise(actions.shape, actions.device, actions.dtype)
        t = self.time_sampler.sample(actions.shape[0], actions.device).to(actions.dtype)
        x_t, target = LinearPath().sample(actions, t, noise)
        loss = flow_matching_loss(self.velocity(t, x_t, cond), target, mask)
        return {"loss": loss}

    def _sample(self, cond: Tensor, num_steps: int, solver: str | None, noise: Tensor | None) -> Tensor:
        if noise is None:
            noise = sample_noise((cond.shape[0], self.config.horizon, self.config.action_dim), cond.device, cond.dtype)
        result = solve(lambda t, x: self.velocity(t, x, cond), noise, solver or self.config.solver, num_steps)
        return result.x
