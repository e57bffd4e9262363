"""MLE-of-reconstructions fine-tuning (FT-FM / ResFT-FM; docs/finetuning.md).

Flow matching regresses a velocity and never sees the integrated output, so a few-step sampler inherits the field's
error amplified by the flow (docs/finetuning.md, "Why fine-tune the sampler's output"). This objective trains the *deployed sampler's output* instead:

1. encode: the data chunk x1 (normalised) is mapped to its noise code z by integrating the FROZEN pre-trained field
   backward, t: 1 -> 0, with an accurate solver, without gradients (pairing "inversion"; "independent" draws fresh
   N(0, I) noise instead - an ablation that regresses to the conditional mean and collapses multimodality);
2. decode: the model being tuned integrates forward from z with the deployment solver and step count (1-16 Euler),
   and the loss backpropagates through the unrolled steps (the solvers run out of place when grad is on);
3. Gaussian NLL of x1 under N(x_hat, sigma^2), per real chunk element (fixed, learned scalar, or learned
   per-element sigma);
4. plus an optional flow-matching loss of the model's field, which anchors it to a valid transport of
   N(0, I) while the encoder (the frozen pre-trained flow) stays fixed; its weight `fm_weight` is relative to the
   NLL's weight 1 / (2 sigma^2) on the squared reconstruction error (see `MLEConfig.fm_weight`).

`MLEFinetunePolicy` packages the objective as a policy-like module whose `compute_loss` is this loss, so the
package's Trainer (EMA, checkpoints, exact resume, TensorBoard) runs it unchanged. It saves exactly the tuned policy
(a fully fine-tuned flow policy saves as a plain "flow" policy; a residual one as "flow_residual"), plus a sidecar
with a learned sigma when there is one.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fm_policy.checkpoint import CheckpointError
from fm_policy.config import ConfigError
from fm_policy.errors import UserError
from fm_policy.finetune.wrapper import FinetuneWrapper
from fm_policy.flow_matching import flow_matching_loss, masked_mean, sample_noise
from fm_policy.flow_policy import FlowPolicy
from fm_policy.solvers import METHODS, solve

PAIRINGS: tuple[str, ...] = ("inversion", "independent")
SIGMA_MODES: tuple[str, ...] = ("fixed", "scalar", "per_dim")
TRAINABLE: tuple[str, ...] = ("all", "last", "residual")
OBJECTIVE_FILE = "mle_objective.safetensors"


@dataclass
class MLEConfig:
    """Options of the MLE fine-tuning objective (defaults and why: docs/finetuning.md, "Defaults and why")."""

    pairing: str = "inversion"  # inversion (encode data with the frozen flow) | independent (fresh noise, ablation)
    # the backward solve of the frozen pre-trained field. Adaptive by default: fixed-step solvers converge slowly on
    # fields with fast time features (rk4 x16 codes were 0.19 RMS off the true ones on the 2-D toy policy, 0.26 on
    # Push-T); the code cache pays the cost once per run (docs/finetuning.md, "Encode accuracy")
    encode_solver: str = "dopri5"
    encode_steps: int = 16  # fixed-step methods: steps; adaptive (dopri5): ignored, rtol/atol used
    encode_rtol: float = 1e-6
    encode_atol: float = 1e-6
    # the run re-decodes this many codes with an accurate forward solve of the frozen field and compares them with
    # their data chunks (RMS, normalised action units); above code_check_tol it warns (0 samples: no check)
    code_check_samples: int = 256
    code_check_tol: float = 0.01
    decode_solver: str = "euler"  # the deployment solver ...
    decode_steps: int = 1  # ... and step count (fine-tune one model per deployed NFE)
    decode_steps_choices: list[int] = field(default_factory=list)  # non-empty: draw N per batch (any-step model)
    # the step count the tuned policy is saved for (its num_inference_steps, what eval / serve / select_action use):
    # decode_steps by default; an any-step model (decode_steps_choices) must name it
    deploy_steps: int | None = None
    sigma_mode: str = "fixed"  # fixed | scalar (one learned sigma) | per_dim (one learned sigma per chunk element)
    sigma: float = 0.05  # the fixed sigma, or the learned one's initial value (actions normalised to [-1, 1])
    # lambda of the flow-matching anchor, relative to the reconstruction term: the anchor's loss (a velocity MSE) is
    # multiplied by fm_weight / (2 sigma^2), the NLL's own weight on the squared reconstruction error (current sigma,
    # no gradient through it), so fm_weight = 1 weighs a unit of flow-matching MSE like a unit of reconstruction MSE
    # whatever sigma is. None: 0.1 for method mle, 0 for residual
    fm_weight: float | None = None
    trainable: str = "all"  # mle: all | last (the last `last_layers` parameterised layers); residual: all = residual
    last_layers: int = 1
    cache_codes: bool = True  # inversion pairing: encode the training windows once (run_dir/codes.safetensors)

    def validate(self) -> None:
        if self.pairing not in PAIRINGS:
            raise ConfigError(f"mle.pairing '{self.pairing}' is unknown; choose one of {list(PAIRINGS)}")
        for name in ("encode_solver", "decode_solver"):
            if getattr(self, name) not in METHODS:
                raise ConfigError(f"mle.{name} '{getattr(self, name)}' is unknown; choose one of {list(METHODS)}")
        steps = [self.encode_steps, self.decode_steps, *self.decode_steps_choices]
        if any(int(s) < 1 for s in steps):
            raise ConfigError(f"mle step counts must be >= 1, got {steps}")
        if self.sigma_mode not in SIGMA_MODES:
            raise ConfigError(f"mle.sigma_mode '{self.sigma_mode}' is unknown; choose one of {list(SIGMA_MODES)}")
        if not self.sigma > 0:
            raise ConfigError(f"mle.sigma must be > 0, got {self.sigma}")
        if self.fm_weight is not None and self.fm_weight < 0:
            raise ConfigError(f"mle.fm_weight must be >= 0, got {self.fm_weight}")
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"mle.trainable '{self.trainable}' is unknown; choose one of {list(TRAINABLE)}")
        if self.last_layers < 1:
            raise ConfigError(f"mle.last_layers must be >= 1, got {self.last_layers}")
        if self.decode_steps_choices and self.deploy_steps is None:
            raise ConfigError(f"mle.deploy_steps: a model tuned for several step counts (decode_steps_choices="
                              f"{list(self.decode_steps_choices)}) must name the one it is deployed with, e.g. "
                              f"mle.deploy_steps={min(self.decode_steps_choices)}")
        if self.deploy_steps is not None and self.deploy_steps < 1:
            raise ConfigError(f"mle.deploy_steps must be >= 1, got {self.deploy_steps}")
        if self.code_check_samples < 0 or not self.code_check_tol > 0:
            raise ConfigError(f"mle.code_check_samples must be >= 0 and mle.code_check_tol > 0, got "
                              f"{self.code_check_samples} and {self.code_check_tol}")

    @property
    def deployment_steps(self) -> int:
        return self.decode_steps if self.deploy_steps is None else self.deploy_steps


class GaussianReconstructionNLL(nn.Module):
    """Per-element Gaussian NLL 0.5 ((x1 - x_hat) / sigma)^2 + log sigma (no 0.5 log 2 pi), over real elements.

    The per-element mean (not a per-chunk sum) keeps the loss scale independent of the chunk
    size, so one learning rate / gradient clip fits Push-T and larger action spaces alike. With a fixed sigma it is
    MSE / (2 sigma^2) + const; a learned sigma (scalar, or one per chunk element) converges to the RMS error there
    and re-weights the elements by their noise level.
    """

    def __init__(self, mode: str, sigma: float, chunk_shape: tuple[int, int]) -> None:
        super().__init__()
        if mode not in SIGMA_MODES:
            raise ValueError(f"unknown sigma mode '{mode}'")
        self.mode = mode
        init = torch.full(chunk_shape if mode == "per_dim" else (), math.log(sigma))
        if mode == "fixed":
            self.register_buffer("log_sigma", init, persistent=False)
        else:
            self.log_sigma = nn.Parameter(init)

    @property
    def learned(self) -> bool:
        return self.mode != "fixed"

    def precision(self) -> Tensor:
        """The NLL's weight on the squared reconstruction error, mean over elements of 1 / (2 sigma^2), detached:
        the unit the flow-matching anchor is scaled to (`MLEConfig.fm_weight`)."""
        return (0.5 * torch.exp(-2.0 * self.log_sigma.detach().float())).mean()

    def forward(self, x_hat: Tensor, x1: Tensor, mask: Tensor | None = None) -> Tensor:
        log_sigma = self.log_sigma.to(x_hat.dtype)
        z = (x1.float() - x_hat.float()) * torch.exp(-log_sigma.float())
        return masked_mean(0.5 * z.square() + log_sigma.float(), mask)


def last_parameterised_modules(module: nn.Module, count: int) -> list[nn.Module]:
    """The last `count` modules (registration order) that own parameters directly: the output layers of the
    velocity networks here (MLP: `out`, then the last hidden Linear; U-Net: the head's 1x1 conv, then its conv block's
    GroupNorm and conv), which is what "fine-tune only the last layers" means for them."""
    owners = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
    return owners[-count:]


class MLEFinetunePolicy(FinetuneWrapper):
    """A flow(-residual) policy whose `compute_loss` is the MLE-of-reconstructions objective.

    model: the policy being tuned (`FlowPolicy` for FT-FM, `ResidualFlowPolicy` for ResFT-FM); it is trained in place.
    reference: the frozen pre-trained flow policy that encodes data to noise codes. None: the model's own frozen
        `base_velocity` (a residual policy), which is the same pre-trained field without a second copy.
    fm_weight: lambda of the flow-matching anchor (the model's own `_loss`).

    Everything the harness and Trainer use is delegated to `model` (`predict_action_chunk`, `select_action`,
    `reset`, `config`, `normalizer`, ...). `parameters()` yields only the trainable parameters, so the Trainer's
    optimiser and EMA never carry (or copy) the frozen reference / base weights (see `FinetuneWrapper`).
    """

    frozen_attribute = "reference"

    def __init__(self, model: FlowPolicy, config: MLEConfig, reference: FlowPolicy | None = None,
                 fm_weight: float = 0.0) -> None:
        super().__init__(model)
        config.validate()
        if reference is None and not hasattr(model, "base_velocity"):
            raise ValueError("a reference (pre-trained) policy is needed unless the model has a frozen base_velocity")
        self.mle_config = config
        self.fm_weight = float(fm_weight)
        self.reference = self.freeze(reference)
        self._select_trainable(config)
        self.objective = GaussianReconstructionNLL(config.sigma_mode, config.sigma, model.noise_shape)
        if not any(p.requires_grad for p in model.parameters()):
            raise UserError("no trainable parameter in the model (check mle.trainable)")

    def _select_trainable(self, config: MLEConfig) -> None:
        has_base = hasattr(self.model, "base_velocity")
        if has_base:
            if config.trainable == "last":
                raise ConfigError("mle.trainable=last applies to full fine-tuning (method mle), not to a residual")
            return  # a residual policy already trains exactly its residual
        if config.trainable == "residual":
            raise ConfigError("mle.trainable=residual needs a residual policy (method residual)")
        self.model.requires_grad_(True)
        self.model.encoder.requires_grad_(False)  # observation encoder frozen (docs/finetuning.md, "Defaults and why")
        if config.trainable == "last":
            self.model.net.requires_grad_(False)
            for module in last_parameterised_modules(self.model.net, config.last_layers):
                module.requires_grad_(True)

    # ---------------------------------------------------------------- objective
    def reference_velocity(self, t: Tensor, x: Tensor, cond: Tensor) -> Tensor:
        """The frozen pre-trained field (the encoder)."""
        if self.reference is not None:
            return self.reference.velocity(t, x, cond)
        return self.model.base_velocity(t, x, cond)

    @torch.no_grad()
    def encode(self, x1: Tensor, ref_cond: Tensor) -> Tensor:
        """Noise codes of data chunks x1 (normalised): the frozen field integrated backward, t: 1 -> 0."""
        c = self.mle_config
        result = solve(lambda t, x: self.reference_velocity(t, x, ref_cond), x1, c.encode_solver, c.encode_steps,
                       t0=1.0, t1=0.0, rtol=c.encode_rtol, atol=c.encode_atol)
        return result.x

    def decode(self, z: Tensor, cond: Tensor, num_steps: int | None = None) -> Tensor:
        """The tuned model's deployed sampler from codes z (differentiable through the unrolled steps)."""
        c = self.mle_config
        steps = num_steps or c.decode_steps
        x = solve(lambda t, x: self.model.velocity(t, x, cond), z, c.decode_solver, steps).x
        refine = getattr(self.model, "refine", None)  # a residual policy's terminal stage (identity otherwise)
        return refine(x, cond) if refine is not None else x

    def _decode_steps(self) -> int:
        choices = self.mle_config.decode_steps_choices
        if not choices:
            return self.mle_config.decode_steps
        return int(choices[int(torch.randint(len(choices), ()))])

    def pair(self, obs: Mapping[str, Tensor], x1: Tensor) -> Tensor:
        """The noise code paired with each data chunk (inversion or, for the ablation, fresh noise)."""
        if self.mle_config.pairing == "independent":
            return sample_noise(x1.shape, x1.device, x1.dtype)
        ref_cond = (self.reference.encode_obs(obs) if self.reference is not None
                    else self.model.encode_obs(obs)).detach()
        return self.encode(x1, ref_cond)

    def compute_loss(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """MLE-of-reconstruction loss (+ fm_weight * flow matching) on a batch of windows; extras are detached.

        A batch may carry its noise codes under "code" (normalised chunk shape): inversions of a fixed data set
        cached once instead of re-solved every epoch, which is most of a step's cost (the default adaptive encode
        takes hundreds of network evaluations per batch, rk4 x16 64).
        """
        model = self.model
        obs = {k: batch[k] for k in model.obs_shapes}
        x1, cond, mask = model.prepare_batch(batch)
        z = batch["code"].to(model.device, torch.float32) if "code" in batch else self.pair(obs, x1)
        x_hat = self.decode(z, cond, self._decode_steps())
        nll = self.objective(x_hat, x1, mask)
        out = {"nll": nll.detach(), "recon_mse": flow_matching_loss(x_hat.detach(), x1, mask),
               "sigma": self.objective.log_sigma.detach().exp().mean()}
        loss = nll
        if self.fm_weight > 0:
            fm = model._loss(x1, cond, mask)["loss"]
            loss = loss + (self.fm_weight * self.objective.precision()) * fm  # relative to the NLL (MLEConfig)
            out["fm_loss"] = fm.detach()
        out["loss"] = loss
        return out

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | os.PathLike, atomic: bool = True) -> Path:
        """The tuned policy as a normal loadable policy, plus the learned sigma (if any) in a sidecar file."""

        def write_sigma(folder: Path) -> None:
            if self.objective.learned:
                save_file({"log_sigma": self.objective.log_sigma.detach().cpu().contiguous()}, folder / OBJECTIVE_FILE)

        return self.model.save_pretrained(directory, atomic=atomic, extra_files=write_sigma)

    def load_weights(self, directory: str | os.PathLike) -> None:
        """Load the tuned policy's weights (and the learned sigma) saved by `save_pretrained` (used on resume)."""
        self.model.load_weights(directory)
        if self.objective.learned:
            path = Path(directory) / OBJECTIVE_FILE
            if not path.exists():
                raise CheckpointError(f"{directory}: no {OBJECTIVE_FILE}, but this objective learns sigma")
            with torch.no_grad():
                self.objective.log_sigma.copy_(load_file(path)["log_sigma"])


def mle_finetune_policy(pretrained: FlowPolicy, config: MLEConfig, method: str = "mle",
                        residual: Any = None) -> MLEFinetunePolicy:
    """FT-FM (`method="mle"`: the whole pre-trained policy is tuned, a frozen copy encodes) or ResFT-FM
    (`method="residual"`: a `ResidualFlowPolicy` around the frozen pre-trained field, only the residual is tuned).

    `pretrained` is not modified for "residual"; for "mle" it becomes the tuned model (pass a copy to keep it).
    """
    if type(pretrained) is not FlowPolicy:
        raise ConfigError(f"MLE fine-tuning needs a plain flow policy, got {type(pretrained).__name__} "
                          f"(type '{pretrained.config.type}')")
    config.validate()
    if method == "mle":
        reference = copy.deepcopy(pretrained)
        model: FlowPolicy = pretrained
        weight = 0.1 if config.fm_weight is None else config.fm_weight
    elif method == "residual":
        from fm_policy.residual_policy import ResidualFlowPolicy

        reference = None
        model = ResidualFlowPolicy.from_base(pretrained, residual)
        weight = 0.0 if config.fm_weight is None else config.fm_weight
    else:
        raise ConfigError(f"fine-tuning method '{method}' is unknown; choose mle or residual")
    # the tuned model is only good at the sampler it was tuned through: save it with that sampler as its default,
    # so select_action, eval, serve and analyze-flow run it as it was trained
    model.config.solver = config.decode_solver
    model.config.num_inference_steps = config.deployment_steps
    return MLEFinetunePolicy(model, config, reference=reference, fm_weight=weight)
