"""Gradual Fine-Tuning (GFT) of a pre-trained flow policy on a shifted task (docs/gft.md).

Plain flow-matching fine-tuning on a few new demos regresses the field straight onto the new data's conditional
velocity u = x1 - x0, so the first steps pull hard toward a noisy small-sample target and can wander away from what
pre-training learned. GFT regresses instead onto a blend, at the SAME noisy
point x_t, of that velocity and the frozen pre-trained field:

    target(x_t, t | o) = (1 - w) * (x1 - x0) + w * v_pre(x_t, t | o),    x_t = (1 - t) x0 + t x1,

with the weight w annealed by a schedule from w0 to 0 over the first `anneal_fraction` of training and then held at
0. The optimum of the objective at weight w is the pointwise blend (1 - w) b_target + w b_pre of the two marginal
fields, so the model moves from the pre-trained field toward the new task in small steps; once w = 0 the objective
IS plain fine-tuning, so the end point (the population optimum) is never worse than plain fine-tuning's - only the
optimisation path differs. At w = 1 the pre-trained model itself is the minimiser (loss 0 at initialisation).

Choices (docs/gft.md, "What it does" and "Why it works"):
- teacher: a frozen copy of the pre-trained policy's EMA weights (pass the checkpoint's `ema/` folder), in eval mode,
  queried under no_grad at the identical (x_t, t, o); skipped once w = 0;
- coupling: the tuned policy's own (`policy.coupling`, independent by default; `fm-policy finetune ...
  policy.coupling=ot` changes it for the run). The per-sample target u = x1 - x0 comes from the coupled pair, so the
  objective trained is the conditional one; its minimiser is the marginal objective's blend (1 - w) b_target + w v_pre,
  where b_target is the field the coupling induces on the new data. The teacher term needs no coupling: it is
  evaluated at whatever x_t the pair gives. For a conditional policy the OT pairing moves noise draws between
  observations only as far as `policy.coupling_cond_weight` allows (fm_policy.couplings, docs/gft.md "Couplings");
- time sampling, coupling, loss mask and loss weighting: exactly the policy's own (`FlowPolicy.training_draws`),
  drawn in the same order (noise, then t), so at w = 0 this loss is bit-for-bit the plain fine-tuning loss on the
  same random draws;
- deterministic (ODE) training and sampling (sigma = 0): the stochastic form only motivates the theory (docs/gft.md, "Why it works").

`GFTFinetunePolicy` packages the objective as a policy-like module whose `compute_loss` is the GFT loss, so the
package's Trainer (EMA, checkpoints, exact resume, TensorBoard) runs it unchanged; the Trainer tells it the step
through `on_train_step(step, total_steps)`, and w is a pure function of the step, which is what makes resume exact.
Checkpoints hold the tuned model as a plain "flow" policy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fm_policy.config import ConfigError
from fm_policy.finetune.wrapper import FinetuneWrapper
from fm_policy.flow_matching import LinearPath, flow_matching_loss
from fm_policy.flow_policy import FlowPolicy

SCHEDULES: tuple[str, ...] = ("linear", "cosine", "step")


@dataclass
class GFTConfig:
    """The GFT weight schedule (defaults and why: docs/gft.md, "The temperature schedule").

    w(s) for optimizer step s of S = loop.steps, with A = anneal_fraction * S:
    - linear: w0 * (1 - s / A)
    - cosine: w0 * (1 + cos(pi s / A)) / 2
    - step:   w0 * beta ** k on stage k = floor(s / (A / stages)), k = 0 .. stages - 1 (geometric cooling)
    and w(s) = 0 for every s >= A (plain fine-tuning for the rest of the run). The schedule is a function of
    loop.steps: growing loop.steps when resuming stretches it.
    """

    schedule: str = "linear"  # linear | cosine | step
    w0: float = 0.7  # initial weight of the pre-trained field; lower (0.3-0.5) when the old behaviour is clearly wrong
    anneal_fraction: float = 0.6  # the fraction of loop.steps over which w reaches 0 (then held at 0)
    stages: int = 5  # step schedule: number of constant stages within the anneal
    beta: float = 0.5  # step schedule: cooling factor between stages
    teacher: str = ""  # the frozen pre-trained field; "" = the checkpoint fine-tuning starts from

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"gft.schedule '{self.schedule}' is unknown; choose one of {list(SCHEDULES)}")
        if not 0.0 <= self.w0 <= 1.0:
            raise ConfigError(f"gft.w0 must be in [0, 1] (the weight of the pre-trained field), got {self.w0}")
        if not 0.0 < self.anneal_fraction <= 1.0:
            raise ConfigError(f"gft.anneal_fraction must be in (0, 1], got {self.anneal_fraction}")
        if isinstance(self.stages, bool) or int(self.stages) != self.stages or self.stages < 1:
            raise ConfigError(f"gft.stages must be an integer >= 1, got {self.stages}")
        if not 0.0 < self.beta < 1.0:
            raise ConfigError(f"gft.beta must be in (0, 1), got {self.beta}")


def gft_weight(step: int, total_steps: int, config: GFTConfig) -> float:
    """The weight w of the pre-trained field for optimizer step `step` (0-based) of a `total_steps` run."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    anneal = config.anneal_fraction * total_steps
    if config.w0 == 0.0 or step >= anneal:
        return 0.0
    progress = step / anneal  # in [0, 1)
    if config.schedule == "linear":
        return config.w0 * (1.0 - progress)
    if config.schedule == "cosine":
        return config.w0 * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "step":
        stage = min(int(progress * config.stages), config.stages - 1)
        return config.w0 * config.beta**stage
    raise ConfigError(f"gft.schedule '{config.schedule}' is unknown; choose one of {list(SCHEDULES)}")


def _check_teacher(model: FlowPolicy, teacher: FlowPolicy) -> None:
    """The blend is only meaningful if both fields live on the same normalised chunk space and observations."""
    a, b = model.config, teacher.config
    for name in ("horizon", "action_dim", "n_obs_steps", "obs_shapes"):
        if getattr(a, name) != getattr(b, name):
            raise ConfigError(f"gft teacher: {name} is {getattr(b, name)}, the fine-tuned policy's is {getattr(a, name)}")
    ours, theirs = model.normalizer.state_dict(), teacher.normalizer.state_dict()
    if ours.keys() != theirs.keys() or any(not torch.equal(ours[k].cpu(), theirs[k].cpu()) for k in ours):
        raise ConfigError("gft teacher: its normaliser differs from the fine-tuned policy's, so its velocities live "
                          "in another normalised action space; use a teacher fine-tuned from the same pre-training")


class GFTFinetunePolicy(FinetuneWrapper):
    """A flow policy whose `compute_loss` is the GFT objective (plain flow-matching fine-tuning when w = 0).

    model: the policy being tuned (all its parameters are trained, as in plain fine-tuning); usually a copy of the
        pre-trained policy.
    teacher: the frozen pre-trained policy (v_pre); None only when w0 = 0 (method "ft"), which never queries it.

    Everything the harness and Trainer use is delegated to `model`. `parameters()` yields only trainable parameters,
    so the optimiser and the EMA never hold the teacher. In eval mode (the Trainer's validation) the loss is the
    plain w = 0 objective: the true target objective, comparable across methods and steps.
    """

    frozen_attribute = "teacher"

    def __init__(self, model: FlowPolicy, teacher: FlowPolicy | None, config: GFTConfig) -> None:
        super().__init__(model)
        config.validate()
        if type(model) is not FlowPolicy:
            raise ConfigError(f"GFT fine-tunes a plain flow policy, got {type(model).__name__}")
        if teacher is None and config.w0 > 0:
            raise ValueError("GFT with w0 > 0 needs a teacher (the frozen pre-trained policy)")
        self.gft_config = config
        if teacher is not None:
            _check_teacher(model, teacher)
        self.teacher = self.freeze(teacher)
        self.model.requires_grad_(True)
        self.weight = float(config.w0)  # set per step by on_train_step; w0 until the Trainer says otherwise

    # ---------------------------------------------------------------- schedule
    def on_train_step(self, step: int, total_steps: int) -> dict[str, float]:
        """Trainer hook, called before each optimizer step: set w for it; the returned scalars are logged."""
        self.weight = gft_weight(step, total_steps, self.gft_config)
        return {"gft_w": self.weight}

    # ---------------------------------------------------------------- objective
    def compute_loss(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """GFT loss on a batch of windows; extras (`fm_loss`: the plain w = 0 loss of the same prediction, `gft_w`)
        are detached."""
        model = self.model
        obs = {k: batch[k] for k in model.obs_shapes}
        # the same operations, in the same order, as FlowPolicy.compute_loss / _loss: equal losses at w = 0
        x1, cond, mask = model.prepare_batch(batch)
        noise, t = model.training_draws(x1, cond, mask)  # the policy's coupling and time sampling
        x_t, u = LinearPath().sample(x1, t, noise)
        pred = model.velocity(t, x_t, cond)
        w = self.weight if self.training else 0.0
        target = u
        if w > 0.0:
            assert self.teacher is not None
            with torch.no_grad():
                v_pre = self.teacher.velocity(t, x_t, self.teacher.encode_obs(obs))
            target = torch.lerp(u, v_pre.to(u.dtype), w)  # (1 - w) u + w v_pre
        loss = flow_matching_loss(pred, target, mask)
        fm = loss.detach() if w == 0.0 else flow_matching_loss(pred.detach(), u, mask)
        return {"loss": loss, "fm_loss": fm, "gft_w": torch.tensor(w)}


def gft_finetune_policy(pretrained: FlowPolicy, config: GFTConfig, teacher: FlowPolicy | None = None,
                        method: str = "gft") -> GFTFinetunePolicy:
    """Wrap `pretrained` for GFT (`method="gft"`) or plain flow-matching fine-tuning (`method="ft"`: w = 0 always).

    `pretrained` becomes the tuned model (pass a copy to keep it). The teacher defaults to a frozen copy of it; "ft"
    never builds one.
    """
    import copy
    import dataclasses

    if type(pretrained) is not FlowPolicy:
        raise ConfigError(f"GFT needs a plain flow policy, got {type(pretrained).__name__} "
                          f"(type '{pretrained.config.type}')")
    if method == "ft":
        return GFTFinetunePolicy(pretrained, None, dataclasses.replace(config, w0=0.0))
    if method != "gft":
        raise ConfigError(f"fine-tuning method '{method}' is unknown here; choose gft or ft")
    if teacher is None and config.w0 > 0:
        teacher = copy.deepcopy(pretrained)
    return GFTFinetunePolicy(pretrained, teacher, config)
