"""The policy object shared by the flow policy and the Diffusion Policy baseline (LeRobot / diffusion_policy style).

- `compute_loss(batch)`: training loss on a batch of windows (also `forward`, so wrappers such as DDP see it);
- `predict_action_chunk(obs, num_steps=None, solver=None, noise=None)`: the executable actions
  (B, n_action_steps, action_dim) in env units, from an observation history (B, n_obs_steps, ...);
- `select_action(obs)`: one action per control step, with observation and action queues; `reset()` clears them;
- `save_pretrained(dir)` / `from_pretrained(dir)`: `config.json` + `model.safetensors` + `normalizer.safetensors`,
  no pickle, written atomically and verified on load.

Horizons follow diffusion_policy: the network generates `horizon` actions aligned so that index n_obs_steps - 1 is
the current step; the executed actions are [n_obs_steps - 1, n_obs_steps - 1 + n_action_steps).
Subclasses implement the generative part: `_loss(actions, cond, mask)` and `_sample(cond, num_steps, solver, noise)`.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import fm_policy
from fm_policy.checkpoint import CheckpointError, verify_checkpoint_dir, write_checkpoint_dir
from fm_policy.config import ConfigError, config_from_dict
from fm_policy.normalizer import Normalizer

CONFIG_FILE, WEIGHTS_FILE, NORMALIZER_FILE = "config.json", "model.safetensors", "normalizer.safetensors"


@dataclass
class NetworkConfig:
    """Velocity / noise network. `unet1d`: diffusion_policy's conditional 1-D U-Net; `mlp`: for small problems."""

    kind: str = "unet1d"
    down_dims: list[int] = field(default_factory=lambda: [32, 64, 128])
    kernel_size: int = 5
    n_groups: int = 8
    hidden_dims: list[int] = field(default_factory=lambda: [512, 512, 512])
    time_embed_dim: int = 64


@dataclass
class PolicyConfig:
    type: str = "flow"  # flow | ddpm (the Diffusion Policy baseline)
    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    network: NetworkConfig = field(default_factory=NetworkConfig)
    normalization: dict[str, str] = field(default_factory=dict)  # key -> minmax | zscore | identity (default minmax)
    # flow matching (type: flow)
    time_sampling: str = "uniform"  # uniform | logit_normal | beta (see fm_policy.flow_matching.TimeSampler)
    time_logit_mean: float = 0.0
    time_logit_std: float = 1.0
    time_beta_alpha: float = 1.0
    time_beta_beta: float = 1.5
    solver: str = "euler"  # euler | midpoint | rk4 | dopri5 ...
    num_inference_steps: int = 8  # flow: ODE steps; ddpm: sampler steps
    # diffusion baseline (type: ddpm)
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    diffusion_sampler: str = "ddim"  # ddpm | ddim
    clip_sample: bool = True
    # filled in from the data when a policy is built for training; saved with it
    obs_shapes: dict[str, list[int]] = field(default_factory=dict)
    action_dim: int = 0

    def validate(self) -> None:
        if self.type not in POLICY_NAMES:
            raise ConfigError(f"policy.type '{self.type}' is unknown; choose one of {list(POLICY_NAMES)}")
        if not 1 <= self.n_obs_steps <= self.horizon:
            raise ConfigError(f"policy.n_obs_steps={self.n_obs_steps} must be in [1, horizon={self.horizon}]")
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ConfigError(
                f"policy: n_obs_steps - 1 + n_action_steps = {self.n_obs_steps - 1 + self.n_action_steps} exceeds "
                f"horizon {self.horizon}: the executed actions would run past the generated chunk"
            )
        if self.num_inference_steps < 1:
            raise ConfigError(f"policy.num_inference_steps must be >= 1, got {self.num_inference_steps}")


POLICY_NAMES = ("flow", "ddpm", "flow_residual")  # flow_residual: fm_policy.finetune.residual
POLICY_TYPES: dict[str, type[BasePolicy]] = {}  # filled by the policy modules' @register_policy


def register_policy(name: str):
    def decorate(cls: type[BasePolicy]) -> type[BasePolicy]:
        POLICY_TYPES[name] = cls
        return cls

    return decorate


class BasePolicy(nn.Module):
    """Observation handling, normalisation, queues and persistence; subclasses add the generative model."""

    config: PolicyConfig

    def __init__(self, config: PolicyConfig, normalizer: Normalizer):
        super().__init__()
        from fm_policy.networks import LowDimObsEncoder, build_velocity_net

        config.validate()
        if not config.obs_shapes or config.action_dim < 1:
            raise ConfigError("policy config lacks obs_shapes/action_dim; build policies with make_policy(config, data)")
        self.config = config
        self.normalizer = normalizer
        self.obs_shapes = {k: tuple(v) for k, v in sorted(config.obs_shapes.items())}
        self.encoder = LowDimObsEncoder(self.obs_shapes, config.n_obs_steps)
        net = config.network
        self.net = build_velocity_net(
            net.kind,
            horizon=config.horizon,
            action_dim=config.action_dim,
            cond_dim=self.encoder.output_dim,
            **self._network_kwargs(net, config.type),
        )
        self.reset()

    @staticmethod
    def _network_kwargs(net: NetworkConfig, policy_type: str) -> dict[str, Any]:
        # flow time t in [0, 1] is embedded as 1000 t; the DDPM baseline passes integer steps 0..99 unscaled
        common = {"time_embed_dim": net.time_embed_dim, "time_scale": 1.0 if policy_type == "ddpm" else 1000.0}
        if net.kind == "unet1d":
            return {"down_dims": tuple(net.down_dims), "kernel_size": net.kernel_size, "n_groups": net.n_groups,
                    **common}
        return {"hidden_dims": tuple(net.hidden_dims), **common}

    @property
    def n_obs_steps(self) -> int:
        return self.config.n_obs_steps

    @property
    def n_action_steps(self) -> int:
        return self.config.n_action_steps

    @property
    def noise_shape(self) -> tuple[int, int]:
        """Per-sample shape of the initial noise; the harness draws it per episode for paired comparisons."""
        return (self.config.horizon, self.config.action_dim)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---------------------------------------------------------------- observations
    def _check_obs(self, obs: Mapping[str, Tensor]) -> int:
        """Validate keys, shapes and values of an observation history; returns the batch size."""
        missing = [k for k in self.obs_shapes if k not in obs]
        if missing:
            raise ValueError(f"observation lacks keys {missing}; the policy needs {list(self.obs_shapes)}")
        batch = None
        for key, shape in self.obs_shapes.items():
            value = obs[key]
            expected = (self.n_obs_steps, *shape)
            if value.ndim != len(expected) + 1 or tuple(value.shape[1:]) != expected:
                raise ValueError(
                    f"observation '{key}' has shape {tuple(value.shape)}; expected (batch, {', '.join(map(str, expected))})"
                )
            if batch is not None and value.shape[0] != batch:
                raise ValueError(f"observation '{key}' has batch {value.shape[0]}, other keys have {batch}")
            batch = value.shape[0]
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"observation '{key}' contains NaN or inf")
        return int(batch)

    def encode_obs(self, obs: Mapping[str, Tensor]) -> Tensor:
        """Normalised, flattened observation features (B, cond_dim): the network's global condition."""
        normalized = {k: self.normalizer.normalize(k, obs[k].to(self.device, torch.float32)) for k in self.obs_shapes}
        return self.encoder(normalized)

    # ---------------------------------------------------------------- training
    def compute_loss(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Loss on a batch of windows: obs keys (B, n_obs_steps, ...), 'action' (B, horizon, A), optional mask."""
        cond = self.encode_obs({k: batch[k] for k in self.obs_shapes})
        actions = self.normalizer.normalize("action", batch["action"].to(self.device, torch.float32))
        mask = batch.get("pad_mask")
        return self._loss(actions, cond, mask.to(self.device) if mask is not None else None)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.compute_loss(batch)

    def _loss(self, actions: Tensor, cond: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
        raise NotImplementedError

    def _sample(self, cond: Tensor, num_steps: int, solver: str | None, noise: Tensor | None) -> Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def generate_chunk(
        self, obs: Mapping[str, Tensor], num_steps: int | None = None, solver: str | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """The whole generated chunk (B, horizon, action_dim) in env units."""
        batch = self._check_obs(obs)
        if noise is not None and tuple(noise.shape) != (batch, self.config.horizon, self.config.action_dim):
            raise ValueError(
                f"noise has shape {tuple(noise.shape)}; expected ({batch}, {self.config.horizon}, {self.config.action_dim})"
            )
        cond = self.encode_obs(obs)
        steps = num_steps or self.config.num_inference_steps
        actions = self._sample(cond, steps, solver, None if noise is None else noise.to(self.device, torch.float32))
        return self.normalizer.unnormalize("action", actions)

    def predict_action_chunk(
        self, obs: Mapping[str, Tensor], num_steps: int | None = None, solver: str | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Executable actions (B, n_action_steps, action_dim): the chunk from index n_obs_steps - 1 on."""
        start = self.n_obs_steps - 1
        return self.generate_chunk(obs, num_steps, solver, noise)[:, start : start + self.n_action_steps]

    def reset(self) -> None:
        """Forget the observation history and any queued actions (call at every episode start)."""
        self._obs_queue: dict[str, deque[Tensor]] = {}
        self._action_queue: deque[Tensor] = deque()

    @torch.no_grad()
    def select_action(self, obs: Mapping[str, Tensor], num_steps: int | None = None) -> Tensor:
        """One action (B, action_dim) for the current observation (B, ...) per key.

        Keeps the last n_obs_steps observations (the first one repeated after a reset, as in training) and replans
        only when the n_action_steps queued actions are used up.
        """
        for key in self.obs_shapes:
            if key not in obs:
                raise ValueError(f"observation lacks key '{key}'; the policy needs {list(self.obs_shapes)}")
            queue = self._obs_queue.setdefault(key, deque(maxlen=self.n_obs_steps))
            while len(queue) < self.n_obs_steps - 1:
                queue.append(obs[key])
            queue.append(obs[key])
        if not self._action_queue:
            history = {k: torch.stack(list(q), dim=1) for k, q in self._obs_queue.items()}
            chunk = self.predict_action_chunk(history, num_steps)
            self._action_queue.extend(chunk.unbind(dim=1))
        return self._action_queue.popleft()

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | os.PathLike, atomic: bool = True) -> Path:
        """config.json + model.safetensors + normalizer.safetensors. `atomic`: write aside, seal, rename."""

        def write(folder: Path) -> None:
            folder.mkdir(parents=True, exist_ok=True)
            meta = {"fm_policy_version": fm_policy.__version__, "policy": asdict(self.config)}
            (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
            weights = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                       if not k.startswith("normalizer.")}
            save_file(weights, folder / WEIGHTS_FILE)
            self.normalizer.save(folder / NORMALIZER_FILE)

        if atomic:
            return write_checkpoint_dir(directory, write)
        write(Path(directory))
        return Path(directory)

    def load_weights(self, directory: str | os.PathLike) -> None:
        """Load weights saved by `save_pretrained` into this (already built) policy."""
        directory = Path(directory)
        try:
            weights = load_file(directory / WEIGHTS_FILE, device=str(self.device))
        except Exception as exc:
            raise CheckpointError(f"{directory}/{WEIGHTS_FILE}: cannot be read ({exc})") from None
        missing, unexpected = self.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.startswith("normalizer.")]
        if missing or unexpected:
            raise CheckpointError(f"{directory}: weights do not match the config (missing {missing}, unexpected {unexpected})")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> BasePolicy:
        """Rebuild a saved policy (of whichever type it was saved as) and load its weights."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: no such directory (a checkpoint still being written appears only "
                                  "when complete)")
        for sealed in (directory, directory.parent):  # a policy saved alone, or inside a training checkpoint
            if (sealed / "manifest.json").exists():
                verify_checkpoint_dir(sealed)
                break
        try:
            meta = json.loads((directory / CONFIG_FILE).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{directory}: no {CONFIG_FILE}; not a saved policy") from None
        except ValueError as exc:
            raise CheckpointError(f"{directory}/{CONFIG_FILE}: not valid JSON ({exc})") from None
        config = config_from_dict(PolicyConfig, meta["policy"], f"{directory}/{CONFIG_FILE}")
        policy_cls = POLICY_TYPES.get(config.type)
        if policy_cls is None:
            raise CheckpointError(f"{directory}: unknown policy type '{config.type}'")
        normalizer = Normalizer.load(directory / NORMALIZER_FILE)
        policy = policy_cls(config, normalizer).to(device)
        policy.load_weights(directory)
        policy.eval()
        return policy


def fit_normalizer(config: PolicyConfig, arrays: Mapping[str, np.ndarray]) -> Normalizer:
    keys = [*config.obs_shapes, "action"]
    return Normalizer.fit({k: arrays[k] for k in keys}, {k: config.normalization.get(k, "minmax") for k in keys})


def make_policy(config: PolicyConfig, arrays: Mapping[str, np.ndarray], obs_keys: list[str]) -> BasePolicy:
    """Build a policy for training: shapes and normaliser come from the (in-memory) training arrays."""
    import fm_policy.ddpm_policy  # noqa: F401  (registers 'ddpm')
    import fm_policy.flow_policy  # noqa: F401  (registers 'flow')

    config.validate()
    config.obs_shapes = {k: list(arrays[k].shape[1:]) for k in obs_keys}
    config.action_dim = int(arrays["action"].shape[-1])
    return POLICY_TYPES[config.type](config, fit_normalizer(config, arrays))


def load_policy(directory: str | os.PathLike, device: str | torch.device = "cpu") -> BasePolicy:
    """Load any saved policy (flow, ddpm, or a fine-tuned flow_residual)."""
    import fm_policy.ddpm_policy  # noqa: F401
    import fm_policy.finetune.residual  # noqa: F401  (registers 'flow_residual')
    import fm_policy.flow_policy  # noqa: F401

    return BasePolicy.from_pretrained(directory, device)
