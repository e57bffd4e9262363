"""Diffusion Policy baseline (Chi et al.): epsilon-prediction DDPM on the same network, data and API as the flow
policy, so the two compare side by side. Schedulers are diffusers' (DDPMScheduler for training and 100-step ancestral
sampling, DDIMScheduler for few-step deterministic sampling)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor

from fm_policy.distributed import per_sample
from fm_policy.flow_matching import flow_matching_loss, sample_noise
from fm_policy.normalizer import Normalizer
from fm_policy.policy import BasePolicy, PolicyConfig

SAMPLERS = ("ddim", "ddpm")


@dataclass
class DiffusionPolicyConfig(PolicyConfig):
    """The DDPM baseline: the noise schedule it is trained with; `solver` is the sampler (ddim or ddpm)."""

    type: str = "ddpm"
    solver: str = "ddim"  # ddim: deterministic few-step; ddpm: ancestral, normally num_inference_steps = 100
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True

    @classmethod
    def migrate_v1(cls, values: dict[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
        """Format 1 named the sampler `diffusion_sampler` and kept the flow's `solver` beside it."""
        sampler = values.get("diffusion_sampler", "ddim")
        values = super().migrate_v1(values, meta)
        values["solver"] = sampler
        return values


class DiffusionPolicy(BasePolicy):
    name = "ddpm"
    config_class = DiffusionPolicyConfig
    solvers = SAMPLERS
    fixed_cost_solvers = SAMPLERS
    time_scale = 1.0  # the network sees integer diffusion steps 0..num_train_timesteps-1 unscaled
    config: DiffusionPolicyConfig

    def __init__(self, config: DiffusionPolicyConfig, normalizer: Normalizer):
        super().__init__(config, normalizer)
        schedule = dict(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            clip_sample=config.clip_sample,
            prediction_type="epsilon",
        )
        self.train_scheduler = DDPMScheduler(**schedule)
        self._sample_schedulers = {"ddpm": DDPMScheduler(**schedule), "ddim": DDIMScheduler(**schedule)}

    def _loss(self, actions: Tensor, cond: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
        noise = sample_noise(actions.shape, actions.device, actions.dtype)
        timesteps = per_sample(lambda n: torch.randint(0, self.config.num_train_timesteps, (n,), device=actions.device),
                               actions.shape[0])  # per-sample draw: the same in a data-parallel run
        noisy = self.train_scheduler.add_noise(actions, noise, timesteps)
        predicted = self.net(noisy, timesteps.to(actions.dtype), cond)
        # the same masked mean squared error as the flow loss, here on the noise instead of the velocity
        return {"loss": flow_matching_loss(predicted, noise, mask)}

    def _sample(self, cond: Tensor, num_steps: int, solver: str | None, noise: Tensor | None) -> Tensor:
        """`solver` picks the sampler ('ddpm' or 'ddim'; default from the config); `num_steps` its step count."""
        name = solver or self.config.solver
        if name not in SAMPLERS:
            raise ValueError(f"diffusion sampler '{name}' is unknown; choose one of {SAMPLERS}")
        scheduler = self._sample_schedulers[name]
        scheduler.set_timesteps(num_steps, device=cond.device)
        x = noise if noise is not None else sample_noise(
            (cond.shape[0], self.config.horizon, self.config.action_dim), cond.device, cond.dtype)
        for t in scheduler.timesteps:
            eps = self.net(x, t.to(x.dtype).expand(x.shape[0]), cond)
            x = scheduler.step(eps, t, x).prev_sample
        return x
