"""The residual flow policy (ResFT-FM's deployable form): a frozen pre-trained velocity field plus a contracting
residual refiner, v(t, x | o) = v_pre(t, x | o) + r(t, x | o).

It is a policy type of its own ("flow_residual") beside the flow policy: it saves, loads, evaluates, serves and
exports like one. Training it is a fine-tuning method (`fm-policy finetune --method residual`, which wraps it in
`fm_policy.finetune.mle.MLEFinetunePolicy`); the residual fields and their contraction guarantees are in
`fm_policy.networks.residual`; docs/finetuning.md explains the design.

Two placements of the residual (`residual.placement`, saved with the policy):

* ``velocity`` (default): the residual is added to the field throughout the flow, v = v_pre + r;
* ``terminal``: the flow is the frozen base's, unchanged; its output then goes through a refinement stage of
  `residual.refine_steps` Euler steps of dx/ds = r(s, x | o), s in [0, 1]: a learned, observation-conditioned
  contracting field that pulls the chunk toward the data (trained by MLE of reconstructions through flow and stage).
  Such a policy is a `TerminalResidualFlowPolicy` (built automatically from the config): its sampler is not an Euler
  loop over one velocity field, so it declares no fused export.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from fm_policy.flow_policy import FlowPolicy, FlowPolicyConfig
from fm_policy.networks.residual import ResidualConfig, ResidualField, build_residual
from fm_policy.normalizer import Normalizer


@dataclass
class ResidualFlowPolicyConfig(FlowPolicyConfig):
    """A flow policy's config (the frozen base's architecture) plus the residual field's."""

    type: str = "flow_residual"
    residual: ResidualConfig = field(default_factory=ResidualConfig)

    def validate(self) -> None:
        super().validate()
        self.residual.validate()

    @classmethod
    def migrate_v1(cls, values: dict[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
        """Format 1 kept the residual's config beside the policy config, at the top level of config.json."""
        values = super().migrate_v1(values, meta)
        values["residual"] = dict(meta.get("residual") or {})
        values["residual"].setdefault("kind", "monotone")  # format 1's default kind (the default is lure since)
        return values


class ResidualFlowPolicy(FlowPolicy):
    """A frozen pre-trained flow policy plus a trainable residual field: v = base(t, x | o) + r(t, x | o).

    Built for fine-tuning with `from_base(pretrained, residual_config)`; the weights file holds base and residual,
    so a saved residual policy is self-contained. Sampling (`predict_action_chunk`, any solver) and the default
    `compute_loss` (flow matching of the combined field) are FlowPolicy's.
    """

    name = "flow_residual"
    config_class = ResidualFlowPolicyConfig
    config: ResidualFlowPolicyConfig

    def __new__(cls, *args: Any, **kwargs: Any) -> ResidualFlowPolicy:  # noqa: PYI034 - may be a subclass
        config = args[0] if args else kwargs.get("config")
        terminal = cls is ResidualFlowPolicy and config is not None and config.residual.placement == "terminal"
        # same type name and config; a sampler with a refinement stage
        return super().__new__(TerminalResidualFlowPolicy if terminal else cls)

    def __init__(self, config: ResidualFlowPolicyConfig, normalizer: Normalizer):
        super().__init__(config, normalizer)
        self.residual: ResidualField = build_residual(config.residual, config.horizon, config.action_dim,
                                                      self.encoder.output_dim)
        for module in (self.net, self.encoder):  # the base stays the pre-trained field
            module.requires_grad_(False)

    @property
    def residual_config(self) -> ResidualConfig:
        return self.config.residual

    @classmethod
    def from_base(cls, base: FlowPolicy, residual: ResidualConfig | None = None) -> ResidualFlowPolicy:
        """Wrap a pre-trained flow policy (its weights and normaliser are copied; `base` is left untouched)."""
        if type(base) is not FlowPolicy:
            raise TypeError(f"the base of a residual policy must be a plain FlowPolicy, got {type(base).__name__}")
        # field by field, not asdict: nested config dataclasses stay dataclasses
        values = {f.name: copy.deepcopy(getattr(base.config, f.name)) for f in fields(base.config) if f.name != "type"}
        config = ResidualFlowPolicyConfig(**values,
                                          residual=copy.deepcopy(residual) if residual else ResidualConfig())
        policy = cls(config, copy.deepcopy(base.normalizer)).to(base.device)
        missing, unexpected = policy.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("residual.") for k in missing), (missing, unexpected)
        return policy

    def base_velocity(self, t: Tensor, x: Tensor, cond: Tensor) -> Tensor:
        """The frozen pre-trained field (what MLE fine-tuning inverts data chunks with)."""
        return self.net(x, t, cond)

    def velocity(self, t: Tensor, x: Tensor, cond: Tensor) -> Tensor:
        return self.net(x, t, cond) + self.residual(t, x, cond)

    @property
    def refine_steps(self) -> int:
        """Euler steps of the terminal refinement stage (0: the residual acts inside the flow)."""
        return 0

    def refine(self, x: Tensor, cond: Tensor, return_trajectory: bool = False) -> Tensor:
        """The terminal refinement stage applied to flow outputs x (B, H, A); the identity for velocity placement.
        `return_trajectory`: the states (refine_steps + 1, B, H, A) instead of the last one."""
        return x[None] if return_trajectory else x


class TerminalResidualFlowPolicy(ResidualFlowPolicy):
    """A residual policy with `residual.placement=terminal`: the frozen base flow, then `refine_steps` Euler steps
    of the contracting refiner, x <- x + (1 / k) r(i / k, x | o). Built by `ResidualFlowPolicy(config, ...)` when the
    config asks for it (so it loads with `load_policy` like any residual policy)."""

    supports_fused_export = False  # the fused Euler graph would integrate the base field only, without the stage
    exportable = False  # the exported graphs would be the base field alone: the host loop would skip the stage

    def velocity(self, t: Tensor, x: Tensor, cond: Tensor) -> Tensor:
        return self.net(x, t, cond)

    @property
    def refine_steps(self) -> int:
        return self.config.residual.refine_steps

    def refine(self, x: Tensor, cond: Tensor, return_trajectory: bool = False) -> Tensor:
        steps = self.refine_steps
        dt = 1.0 / steps
        states = [x]
        for i in range(steps):
            s = torch.full((x.shape[0],), i * dt, dtype=x.dtype, device=x.device)
            x = x + dt * self.residual(s, x, cond)
            states.append(x)
        return torch.stack(states) if return_trajectory else x

    def _sample(self, cond: Tensor, num_steps: int, solver: str | None, noise: Tensor | None) -> Tensor:
        return self.refine(super()._sample(cond, num_steps, solver, noise), cond)
