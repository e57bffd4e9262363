"""The shape every fine-tuning objective shares: a policy object whose `compute_loss` is the objective.

Fine-tuning methods (MLE of reconstructions, GFT, plain FT) wrap the policy being tuned together with a frozen
module (the pre-trained reference / teacher). The package's Trainer then runs them unchanged: it needs
`compute_loss` / `forward`, `parameters()`, `train()`, `save_pretrained` and `load_weights`, and the harness needs
`predict_action_chunk` / `select_action` / `reset`. This base class provides the common part once:

- attribute access falls through to the tuned model (`config`, `normalizer`, `obs_shapes`, ...);
- `parameters()` yields only trainable parameters, so the optimiser and the EMA never hold (or copy) frozen weights;
- `train()` keeps the frozen module in eval mode (a fixed function: no dropout / batch statistics);
- acting is the tuned model's own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn


class FinetuneWrapper(nn.Module):
    """Base of the fine-tuning policies; subclasses define `compute_loss` (and persistence extras if any)."""

    frozen_attribute: str | None = None
    """Name of the subclass's frozen module (the pre-trained reference / teacher), kept in eval mode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def freeze(module: nn.Module | None) -> nn.Module | None:
        """Make `module` a fixed function: no gradients, eval mode."""
        if module is not None:
            module.requires_grad_(False)
            module.eval()
        return module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """Trainable parameters only (see the module docstring)."""
        return (p for p in super().parameters(recurse) if p.requires_grad)

    def train(self, mode: bool = True) -> FinetuneWrapper:
        super().train(mode)
        frozen = getattr(self, self.frozen_attribute) if self.frozen_attribute else None
        if frozen is not None:
            frozen.eval()
        return self

    def predict_action_chunk(self, obs: Mapping[str, Tensor], num_steps: int | None = None, solver: str | None = None,
                             noise: Tensor | None = None) -> Tensor:
        return self.model.predict_action_chunk(obs, num_steps, solver, noise)

    def generate_chunk(self, obs: Mapping[str, Tensor], num_steps: int | None = None, solver: str | None = None,
                       noise: Tensor | None = None) -> Tensor:
        return self.model.generate_chunk(obs, num_steps, solver, noise)

    def select_action(self, obs: Mapping[str, Tensor], num_steps: int | None = None) -> Tensor:
        return self.model.select_action(obs, num_steps)

    def reset(self) -> None:
        self.model.reset()

    def compute_loss(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.compute_loss(batch)

    def save_pretrained(self, directory: str | os.PathLike, atomic: bool = True) -> Path:
        """The tuned model as a normal loadable policy (frozen modules are the run's own checkpoint)."""
        return self.model.save_pretrained(directory, atomic=atomic)

    def load_weights(self, directory: str | os.PathLike) -> None:
        """Load the tuned model's weights saved by `save_pretrained` (used on resume)."""
        self.model.load_weights(directory)
