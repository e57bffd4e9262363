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
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import fm_policy
from fm_policy.checkpoint import CheckpointError, write_checkpoint_dir
from fm_policy.config import ConfigError
from fm_policy.networks.vision import VisionConfig, is_image_shape
from fm_policy.normalizer import Normalizer

CONFIG_FILE, WEIGHTS_FILE, NORMALIZER_FILE = "config.json", "model.safetensors", "normalizer.safetensors"


V1_FLAT_FIELDS = frozenset({
    "time_sampling", "time_logit_mean", "time_logit_std", "time_beta_alpha", "time_beta_beta", "solver",
    "num_train_timesteps", "beta_schedule", "diffusion_sampler", "clip_sample",
})
"""Fields of the one flat policy config that checkpoints of fm-policy <= 0.1.0 (config.json without "format")
hold for every type; `PolicyConfig.migrate_v1` drops the ones that belong to other types."""

CONFIG_FORMAT = 2  # config.json layout: 2 = one config class per policy type (absent = the flat format 1)


@dataclass
class PolicyConfig:
    """What every policy type shares: horizons, network, normalisation, the deployment sampler, and the data shapes.

    Each policy type subclasses this with its own fields (`FlowPolicyConfig`, `DiffusionPolicyConfig`, ...) and its
    own defaults for `type` and `solver`; `fm_policy.factory` maps `type` to the config and policy classes, so a
    YAML file with a key the chosen type does not have fails with the valid keys listed.

    `network` is the velocity network's own settings (`kind` plus the fields of that network's config dataclass in
    `fm_policy.networks`), kept as a mapping so the networks' configs are written once; a saved policy records the
    fully resolved settings. `solver` and `num_inference_steps` are how the policy is meant to be deployed: every
    consumer (select_action, eval, serve, export) uses them unless told otherwise.
    """

    type: str = ""
    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    network: dict[str, Any] = field(default_factory=lambda: {"kind": "unet1d"})
    normalization: dict[str, str] = field(default_factory=dict)  # key -> minmax | zscore | identity (default minmax)
    # key -> [low, high] declared for minmax instead of the data's range (fm_policy.normalizer: keeps one scale for
    # an input that is constant in the pre-training data but not in later data, e.g. Push-T's `goal`)
    normalization_ranges: dict[str, list[float]] = field(default_factory=dict)
    solver: str = ""
    num_inference_steps: int = 8
    # filled in from the data when a policy is built for training; saved with it
    obs_shapes: dict[str, list[int]] = field(default_factory=dict)
    action_dim: int = 0
    # how image keys (per-step shape (H, W, C), uint8) are encoded; unused by low-dim policies
    vision: VisionConfig = field(default_factory=VisionConfig)

    def image_keys(self) -> list[str]:
        """Observation keys that are images (per-step shape of 3 dims, HWC uint8)."""
        return sorted(k for k, s in self.obs_shapes.items() if is_image_shape(s))

    def validate(self) -> None:
        own_type = type(self).__dataclass_fields__["type"].default
        if self.type != own_type:
            raise ConfigError(f"policy.type '{self.type}' does not match the config class {type(self).__name__} "
                              f"(type '{own_type}'); build a config of another type with "
                              "fm_policy.factory.policy_config_class(name), or load YAML with "
                              "fm_policy.train.load_train_config, which picks the class from policy.type")
        if not 1 <= self.n_obs_steps <= self.horizon:
            raise ConfigError(f"policy.n_obs_steps={self.n_obs_steps} must be in [1, horizon={self.horizon}]")
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ConfigError(
                f"policy: n_obs_steps - 1 + n_action_steps = {self.n_obs_steps - 1 + self.n_action_steps} exceeds "
                f"horizon {self.horizon}: the executed actions would run past the generated chunk"
            )
        if self.num_inference_steps < 1:
            raise ConfigError(f"policy.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if not isinstance(self.network, Mapping) or "kind" not in self.network:
            raise ConfigError(f"policy.network must be a mapping with a 'kind' (unet1d | mlp), got {self.network!r}")
        if "time_scale" in self.network:
            raise ConfigError("policy.network.time_scale is set by the policy type (flow time or diffusion steps); "
                              "remove it from the config")
        self.vision.validate()

    @classmethod
    def migrate_v1(cls, values: dict[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
        """A format-1 (flat) saved config as this class's fields: the network keeps only its kind's settings, and
        fields of other policy types are dropped. Subclasses rename what they renamed."""
        from fm_policy.networks import VELOCITY_NETS

        values = {k: v for k, v in values.items() if k not in V1_FLAT_FIELDS or k in cls.__dataclass_fields__}
        network = dict(values.get("network") or {"kind": "unet1d"})
        kind = network.get("kind", "unet1d")
        if kind in VELOCITY_NETS:
            allowed = set(VELOCITY_NETS[kind][1].__dataclass_fields__) - {"time_scale"}
            network = {"kind": kind, **{k: v for k, v in network.items() if k in allowed}}
        values["network"] = network
        return values


class BasePolicy(nn.Module):
    """Observation handling, normalisation, queues and persistence; subclasses add the generative model.

    A policy type is a subclass that sets the class attributes below and implements `_loss` and `_sample`;
    registering it with `fm_policy.factory.register_policy_type` makes configs, checkpoints, the CLI, the harness,
    the server and export find it by `name`. Code elsewhere asks these attributes, never the type's name.
    """

    name: ClassVar[str] = ""
    """The `type` written in configs and checkpoints."""
    config_class: ClassVar[type[PolicyConfig]] = PolicyConfig
    solvers: ClassVar[tuple[str, ...]] = ()
    """Every `solver` the type's sampler accepts (the first is the default)."""
    fixed_cost_solvers: ClassVar[tuple[str, ...]] = ()
    """The solvers whose cost is fixed by `num_steps` (no adaptive step control): what a server may offer clients."""
    time_scale: ClassVar[float] = 1000.0
    """What the network's time embedding multiplies the sampler's time by: 1000 for flow time in [0, 1]."""
    supports_fused_export: ClassVar[bool] = False
    """Whether `fm_policy.deploy.export` can fuse the whole few-step sampler into one graph for this type."""
    exportable: ClassVar[bool] = True
    """Whether the exported encoder + network graphs (with the host's sampler loop) reproduce the policy; a type whose
    sampler does more than integrate its network (e.g. a terminal refinement stage) sets False and export refuses."""

    config: PolicyConfig

    def __init__(self, config: PolicyConfig, normalizer: Normalizer):
        super().__init__()
        from fm_policy.networks import LowDimObsEncoder, build_velocity_net, settings_for_kind

        if not isinstance(config, self.config_class):
            raise ConfigError(f"a {type(self).__name__} needs a {self.config_class.__name__}, got "
                              f"{type(config).__name__} (type '{config.type}')")
        config.validate()
        if config.solver not in self.solvers:
            raise ConfigError(f"policy.solver '{config.solver}' is unknown for policy type '{self.name}'; choose one "
                              f"of {list(self.solvers)}")
        if not config.obs_shapes or config.action_dim < 1:
            raise ConfigError("policy config lacks obs_shapes/action_dim; build policies with make_policy(config, data)")
        self.normalizer = normalizer
        self.obs_shapes = {k: tuple(v) for k, v in sorted(config.obs_shapes.items())}
        self.image_keys = frozenset(config.image_keys())
        if self.image_keys:
            from fm_policy.networks.vision import MultiModalObsEncoder

            self.encoder = MultiModalObsEncoder(self.obs_shapes, config.n_obs_steps, config.vision)
            # the weights now hold what `pretrained` named: a saved policy must not need that file again
            config = replace(config, vision=replace(config.vision, pretrained=""))
        else:
            self.encoder = LowDimObsEncoder(self.obs_shapes, config.n_obs_steps)
        settings = settings_for_kind(config.network["kind"],
                                     {k: v for k, v in config.network.items() if k != "kind"})
        try:
            self.net = build_velocity_net(config.network["kind"], horizon=config.horizon,
                                          action_dim=config.action_dim, cond_dim=self.encoder.output_dim,
                                          time_scale=self.time_scale, **settings)
        except ValueError as exc:
            raise ConfigError(f"policy.network: {exc}") from None
        # the saved config names every network setting, defaults included, so a checkpoint never depends on
        # what a later version's defaults are
        resolved = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.net.config).items()
                    if k != "time_scale"}
        self.config = replace(config, network={"kind": config.network["kind"], **resolved})
        self.reset()

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
            cameras = [k for k in missing if k in self.image_keys]
            what = f"camera image(s) {cameras} and keys {missing}" if cameras else f"keys {missing}"
            raise ValueError(f"observation lacks {what}; the policy needs {list(self.obs_shapes)}")
        batch = None
        for key, shape in self.obs_shapes.items():
            value = obs[key]
            expected = (self.n_obs_steps, *shape)
            if value.ndim != len(expected) + 1 or tuple(value.shape[1:]) != expected:
                if key in self.image_keys:
                    raise ValueError(
                        f"camera image '{key}' has shape {tuple(value.shape)}; expected (batch, "
                        f"{', '.join(map(str, expected))}) = (batch, n_obs_steps, height, width, channels), uint8 "
                        f"{shape[0]}x{shape[1]} images as in training")
                raise ValueError(
                    f"observation '{key}' has shape {tuple(value.shape)}; expected (batch, {', '.join(map(str, expected))})"
                )
            if key in self.image_keys and value.dtype != torch.uint8:
                raise ValueError(f"camera image '{key}' has dtype {value.dtype}; images must be uint8 (0..255, HWC)")
            if batch is not None and value.shape[0] != batch:
                raise ValueError(f"observation '{key}' has batch {value.shape[0]}, other keys have {batch}")
            batch = value.shape[0]
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"observation '{key}' contains NaN or inf")
        return int(batch)

    def encode_obs(self, obs: Mapping[str, Tensor]) -> Tensor:
        """Normalised, flattened observation features (B, cond_dim): the network's global condition."""
        device = self.device
        normalized = {k: obs[k].to(device) if k in self.image_keys  # uint8 to the device; the encoder converts
                      else self.normalizer.normalize(k, obs[k].to(device, torch.float32)) for k in self.obs_shapes}
        return self.encoder(normalized)

    # ---------------------------------------------------------------- training
    def prepare_batch(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """A batch of windows as the generative model sees it: (normalised actions (B, horizon, A), observation
        condition (B, cond_dim), pad mask (B, horizon) or None), all on the policy's device. Every training
        objective (pre-training, MLE, GFT) starts here, so they agree on normalisation and masking."""
        cond = self.encode_obs({k: batch[k] for k in self.obs_shapes})
        actions = self.normalizer.normalize("action", batch["action"].to(self.device, torch.float32))
        mask = batch.get("pad_mask")
        return actions, cond, mask.to(self.device) if mask is not None else None

    def compute_loss(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Loss on a batch of windows: obs keys (B, n_obs_steps, ...), 'action' (B, horizon, A), optional mask."""
        return self._loss(*self.prepare_batch(batch))

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
    def save_pretrained(self, directory: str | os.PathLike, atomic: bool = True,
                        extra_files: Callable[[Path], None] | None = None) -> Path:
        """config.json + model.safetensors + normalizer.safetensors. `atomic`: write aside, seal, rename.

        `extra_files(folder)` writes what a caller keeps beside the policy (a fine-tuning objective's state) into
        the same folder before it is sealed, so the extra files are covered by the same manifest."""

        def write(folder: Path) -> None:
            folder.mkdir(parents=True, exist_ok=True)
            meta = {"format": CONFIG_FORMAT, "fm_policy_version": fm_policy.__version__, "policy": asdict(self.config)}
            (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
            weights = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                       if not k.startswith("normalizer.")}
            save_file(weights, folder / WEIGHTS_FILE)
            self.normalizer.save(folder / NORMALIZER_FILE)
            if extra_files is not None:
                extra_files(folder)

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
        """Rebuild a saved policy and load its weights.

        `BasePolicy.from_pretrained` (and `fm_policy.factory.load_policy`) rebuild whichever type was saved;
        `FlowPolicy.from_pretrained` also checks that the saved type is a `FlowPolicy` (or a subclass of it)."""
        from fm_policy.factory import policy_class, read_policy_config

        directory = Path(directory)
        config = read_policy_config(directory)
        policy_cls = policy_class(config.type)
        if not issubclass(policy_cls, cls):
            raise CheckpointError(f"{directory} holds a '{config.type}' policy ({policy_cls.__name__}), which is not "
                                  f"a {cls.__name__}; load it with fm_policy.factory.load_policy")
        normalizer = Normalizer.load(directory / NORMALIZER_FILE)
        policy = policy_cls(config, normalizer).to(device)
        policy.load_weights(directory)
        policy.eval()
        return policy


def fit_normalizer(config: PolicyConfig, arrays: Mapping[str, np.ndarray]) -> Normalizer:
    """Fit on the low-dim observation keys and the actions; image keys are left out (the image encoder scales
    uint8 to [0, 1] itself), so no statistics are computed over image arrays."""
    images = set(config.image_keys())
    keys = [*(k for k in config.obs_shapes if k not in images), "action"]
    unknown = sorted(set(config.normalization_ranges) - set(keys))
    if unknown:
        raise ConfigError(f"policy.normalization_ranges names {unknown}, which are not low-dim keys of this policy "
                          f"({keys})")
    try:
        return Normalizer.fit({k: arrays[k] for k in keys}, {k: config.normalization.get(k, "minmax") for k in keys},
                              ranges=config.normalization_ranges)
    except ValueError as exc:
        raise ConfigError(f"policy.normalization / normalization_ranges: {exc}") from None
