"""Fine-tuning pre-trained flow policies by maximum likelihood of reconstructions (docs/finetuning.md).

- `fm_policy.finetune.mle`: the MLE-of-reconstructions objective as a policy whose `compute_loss` it is
  (`MLEFinetunePolicy`), for full (FT-FM) and residual (ResFT-FM) fine-tuning;
- `fm_policy.finetune.contraction`: Jacobian log-norms along trajectories, disturbance gains (initial noise, state,
  observation) and what a residual learned (`analyze_flow`);
- `fm_policy.finetune.codes`: the inversion codes, cached by content and checked against their data (imported on
  demand: it reads the training windows);
- `fm_policy.finetune.run`: `FinetuneConfig`, `finetune(config)` and the `fm-policy finetune` command (imported
  on demand: it pulls in the Trainer's dependencies).

The residual refiner these methods can train is a policy type of its own: `fm_policy.residual_policy`.
"""

from fm_policy.finetune.contraction import (
    analyze_flow,
    analyze_policy,
    observation_gain,
    perturbation_test,
    residual_decomposition,
    sym_jacobian_max_eig,
)
from fm_policy.finetune.mle import GaussianReconstructionNLL, MLEConfig, MLEFinetunePolicy, mle_finetune_policy

__all__ = [
    "GaussianReconstructionNLL",
    "MLEConfig",
    "MLEFinetunePolicy",
    "analyze_flow",
    "analyze_policy",
    "mle_finetune_policy",
    "observation_gain",
    "perturbation_test",
    "residual_decomposition",
    "sym_jacobian_max_eig",
]
