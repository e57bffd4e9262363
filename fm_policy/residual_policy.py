"""The residual flow policy (ResFT-FM's deployable form): a frozen pre-trained velocity field plus a contracting
residual refiner, v(t, x | o) = v_pre(t, x | o) + r(t, x | o).

It is a policy type of its own ("flow_residual") beside the flow policy: it saves, loads, evaluates, serves and
exports like one. Training it is a fine-tuning method (`fm-policy finetune --method residual`, which wraps it in
`fm_policy.finetune.mle.MLEFinetunePolicy`); the residual fields and their contraction guarantees are in
`fm_policy.networks.residual`; docs/finetuning.md explains the design.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

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
        values = {k: v for k, v in asdict(base.config).items() if k != "type"}
        config = ResidualFlowPolicyConfig(**copy.deepcopy(values),
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
