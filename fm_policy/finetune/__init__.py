"""Fine-tuning pre-trained flow policies by maximum likelihood of reconstructions (docs: mle_finetuning.md).

- `fm_policy.finetune.residual`: contracting residual fields (monotone / damped Lipschitz, zero at init) and the
  `ResidualFlowPolicy` ("flow_residual": frozen pre-trained field + residual), a normal saveable policy;
- `fm_policy.finetune.mle`: the MLE-of-reconstructions objective as a policy whose `compute_loss` it is
  (`MLEFinetunePolicy`), for full (FT-FM) and residual (ResFT-FM) fine-tuning;
- `fm_policy.finetune.contraction`: Jacobian log-norms along trajectories and perturbation tests (`analyze_flow`);
- `fm_policy.finetune.run`: `FinetuneConfig`, `finetune(config)` and the `fm-policy finetune` command (imported
  on demand: it pulls in the Trainer's dependencies).

Importing this package registers the "flow_residual" policy type, so `load_policy` can rebuild residual policies.
"""

from fm_policy.finetune.contraction import analyze_flow, analyze_policy, perturbation_test, sym_jacobian_max_eig
from fm_policy.finetune.mle import GaussianReconstructionNLL, MLEConfig, MLEFinetunePolicy, mle_finetune_policy
from fm_policy.finetune.residual import (
    RESIDUAL_POLICY_TYPE,
    DampedLipschitzResidual,
    FreeResidual,
    MonotoneResidual,
    ResidualConfig,
    ResidualField,
    ResidualFlowPolicy,
    build_residual,
)

__all__ = [
    "RESIDUAL_POLICY_TYPE",
    "DampedLipschitzResidual",
    "FreeResidual",
    "GaussianReconstructionNLL",
    "MLEConfig",
    "MLEFinetunePolicy",
    "MonotoneResidual",
    "ResidualConfig",
    "ResidualField",
    "ResidualFlowPolicy",
    "analyze_flow",
    "analyze_policy",
    "build_residual",
    "mle_finetune_policy",
    "perturbation_test",
    "sym_jacobian_max_eig",
]
