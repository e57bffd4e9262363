"""Disturbances for robustness rollouts: observation noise, a mid-episode shove, perturbed initial flow noise.

    report = evaluate(policy, "pusht", disturbance=Disturbance(obs_noise=2.0, shove_step=100, shove_block=20.0))

Why a spec and not ad-hoc wrappers: a robustness (input-to-state stability) benchmark compares outcomes with and
without a disturbance, and between step counts under the same disturbance. That comparison is only meaningful when
(1) an episode is disturbed identically under every `num_steps` setting and for any `n_envs` / `workers` (every draw
comes from a per-episode generator keyed by `Disturbance.seed` and the env seed, one stream per kind of disturbance),
(2) a zero disturbance changes nothing, and (3) the report says what it was measured under (`env_info["disturbance"]`,
and each episode's drawn shove in `EpisodeResult.shove`).

Where each part acts:
- observation noise and the shove act inside the env process (`DisturbedEnv`, between the episode recorder and the
  observation stacking), so a frame carries the same noise wherever it appears in the policy's history, noise is
  indexed by env step (not by policy call), and nothing of it crosses the process boundary;
- the initial-noise perturbation acts in the harness, on the noise it already draws per episode for policies with a
  `noise_shape`.

This module is imported by spawned env workers and must stay torch-free at import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np
from fm_policy.datasets.seeds import episode_disturbance_seed

from fm_policy.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["Disturbance", "DisturbedEnv", "ShoveableEnv", "init_noise_offset"]

STREAM_OBS_NOISE = 1
STREAM_SHOVE = 2
STREAM_INIT_NOISE_OFFSET = 3
SHOVE_MAX_TRIES = 256
"""Random directions tried before a shove is declared impossible for an episode (block pinned in a corner...)."""


@runtime_checkable
class ShoveableEnv(Protocol):
    """What an env offers to be shoved (Push-T: `PushTEnv`). Offsets are in the env's position units, the rotation
    in radians; the harness draws the directions, the env knows what is physically safe."""

    def shove_problem(self, block_offset: Sequence[float] = (0.0, 0.0), block_rotation: float = 0.0,
                      agent_offset: Sequence[float] = (0.0, 0.0)) -> str | None:
        """Why this shove would be unsafe, or None if it can be applied."""
        ...

    def shove(self, block_offset: Sequence[float] = (0.0, 0.0), block_rotation: float = 0.0,
              agent_offset: Sequence[float] = (0.0, 0.0)) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Apply it; returns the observation and info of the shoved state."""
        ...


def _nonneg(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UserError(f"disturbance {name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise UserError(f"disturbance {name} must be finite and >= 0, got {value!r}")
    return value


def _scale_value(key: str, value: Any) -> float | tuple[float, ...]:
    """A per-key noise scale: one number or one per dimension (e.g. Push-T `state`: pixels and an angle)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        values = tuple(_nonneg(f"obs_noise_scale['{key}']", v) for v in np.asarray(value, dtype=object).ravel())
        if not values:
            raise UserError(f"disturbance obs_noise_scale['{key}'] is empty")
        return values
    return _nonneg(f"obs_noise_scale['{key}']", value)


@dataclass(frozen=True)
class Disturbance:
    """What the rollouts are disturbed with; every field's zero (scale 1) means "no disturbance of that kind".

    obs_noise: std of Gaussian noise added to the observation keys the policy receives, in env units (Push-T:
        pixels; an angle in `state` gets the same std in radians unless `obs_noise_scale` says otherwise).
    obs_noise_keys: keys to perturb; None = every floating-point key. A uint8 image is perturbed only when named
        here (noise in pixel levels, rounded and clipped to the dtype's range).
    obs_noise_scale: per-key multiplier of `obs_noise`: a number, or one per dimension of the key's frame.
    shove_step: env step after which the shove is applied (0 = right after reset); None = no shove.
    shove_block / shove_agent: distance (env units) the block's centre of gravity / the agent is displaced by, each
        in its own random direction.
    shove_angle: rotation of the block about its centre of gravity (radians), random sign.
    init_noise_scale / init_noise_offset: the policy's initial flow noise becomes `scale * noise + offset`, where
        `offset` is one random vector per episode of this Euclidean norm over the whole per-sample noise tensor.
    seed: base of the per-episode disturbance generators (with the env seed); independent of `torch_seed`, so the
        same disturbance can be replayed under another policy seed.
    """

    obs_noise: float = 0.0
    obs_noise_keys: tuple[str, ...] | None = None
    obs_noise_scale: Mapping[str, float | tuple[float, ...]] = field(default_factory=dict)
    shove_step: int | None = None
    shove_block: float = 0.0
    shove_agent: float = 0.0
    shove_angle: float = 0.0
    init_noise_scale: float = 1.0
    init_noise_offset: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("obs_noise", "shove_block", "shove_agent", "shove_angle", "init_noise_scale",
                     "init_noise_offset"):
            object.__setattr__(self, name, _nonneg(name, getattr(self, name)))
        if self.obs_noise_keys is not None:
            keys = (self.obs_noise_keys,) if isinstance(self.obs_noise_keys, str) else tuple(self.obs_noise_keys)
            if not keys or not all(isinstance(k, str) and k for k in keys):
                raise UserError(f"disturbance obs_noise_keys must be observation key names, got {self.obs_noise_keys!r}")
            object.__setattr__(self, "obs_noise_keys", keys)
        if not isinstance(self.obs_noise_scale, Mapping):
            raise UserError(f"disturbance obs_noise_scale must map keys to scales, got {self.obs_noise_scale!r}")
        scale = {str(k): _scale_value(str(k), v) for k, v in self.obs_noise_scale.items()}
        if self.obs_noise_keys is not None and set(scale) - set(self.obs_noise_keys):
            raise UserError(f"disturbance obs_noise_scale names keys {sorted(set(scale) - set(self.obs_noise_keys))} "
                            f"that obs_noise_keys {list(self.obs_noise_keys)} does not perturb")
        object.__setattr__(self, "obs_noise_scale", scale)
        step = self.shove_step
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0):
            raise UserError(f"disturbance shove_step must be an int >= 0 (env step), got {step!r}")
        if step is not None:
            object.__setattr__(self, "shove_step", int(step))
        elif self.shove_block or self.shove_agent or self.shove_angle:
            raise UserError("disturbance shove_block / shove_agent / shove_angle need a shove_step (when to shove)")
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"disturbance seed must be an int >= 0, got {seed!r}")
        object.__setattr__(self, "seed", int(seed))

    @property
    def obs_noise_active(self) -> bool:
        return self.obs_noise > 0

    @property
    def shove_active(self) -> bool:
        """A shove that moves something (a shove step with zero magnitudes is a no-op, e.g. a sweep's baseline)."""
        return self.shove_step is not None and (self.shove_block > 0 or self.shove_agent > 0 or self.shove_angle > 0)

    @property
    def env_side_active(self) -> bool:
        """Whether the env needs the `DisturbedEnv` wrapper."""
        return self.obs_noise_active or self.shove_active

    @property
    def init_noise_active(self) -> bool:
        return self.init_noise_scale != 1.0 or self.init_noise_offset > 0

    @property
    def is_null(self) -> bool:
        return not (self.env_side_active or self.init_noise_active)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record for reports (`env_info["disturbance"]`)."""
        return {
            "obs_noise": self.obs_noise,
            "obs_noise_keys": None if self.obs_noise_keys is None else list(self.obs_noise_keys),
            "obs_noise_scale": {k: list(v) if isinstance(v, tuple) else v for k, v in self.obs_noise_scale.items()},
            "shove_step": self.shove_step, "shove_block": self.shove_block, "shove_agent": self.shove_agent,
            "shove_angle": self.shove_angle, "init_noise_scale": self.init_noise_scale,
            "init_noise_offset": self.init_noise_offset, "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Disturbance:
        """Inverse of `to_dict` (a report's record, or a config section); unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown disturbance field(s) {unknown}; valid: {sorted(known)}")
        kwargs = dict(data)
        if kwargs.get("obs_noise_keys") is not None:
            kwargs["obs_noise_keys"] = tuple(kwargs["obs_noise_keys"])
        return cls(**kwargs)


def init_noise_offset(noise_shape: tuple[int, ...], disturbance: Disturbance, env_seed: int) -> torch.Tensor:
    """The per-episode offset added to the initial flow noise: a random direction, norm `init_noise_offset`."""
    import torch

    gen = torch.Generator().manual_seed(episode_disturbance_seed(disturbance.seed, env_seed, STREAM_INIT_NOISE_OFFSET))
    direction = torch.randn(noise_shape, generator=gen)
    return direction * (disturbance.init_noise_offset / direction.norm())


class DisturbedEnv(gym.Wrapper):
    """Single-step env wrapper applying a `Disturbance`'s observation noise and shove, per episode from its seed.

    Sits below `MultiStepWrapper` (it sees every env step) and above the harness's episode recorder (rewards and
    coverage are the undisturbed env's). `reset` must get a seed: every draw of the episode comes from it.
    `shove_record` describes the episode's shove (None without one) for the report.
    """

    def __init__(self, env: gym.Env, disturbance: Disturbance, env_name: str = "?"):
        super().__init__(env)
        self.disturbance = disturbance
        self.env_name = env_name
        self._noise = self._noise_plan(env.observation_space) if disturbance.obs_noise_active else []
        if disturbance.shove_active and not isinstance(env.unwrapped, ShoveableEnv):
            raise UserError(f"shove is not supported for env '{env_name}' (its env has no shove/shove_problem "
                            "methods); use observation or initial-noise disturbances there")
        self.shove_record: dict[str, Any] | None = None
        self._seed: int | None = None
        self._t = 0
        self._obs_rng: np.random.Generator | None = None
        self._shove_rng: np.random.Generator | None = None

    def _noise_plan(self, space: gym.Space) -> list[tuple[str, np.ndarray, np.dtype]]:
        """(key, per-element std, dtype) for each perturbed key, checked against the env's observation space."""
        d = self.disturbance
        subspaces = getattr(space, "spaces", None)
        if not isinstance(subspaces, Mapping):
            raise UserError(f"observation noise needs a Dict observation space; env '{self.env_name}' has {space}")
        if d.obs_noise_keys is None:
            keys = [k for k, s in subspaces.items() if np.issubdtype(s.dtype, np.floating)]
        else:
            missing = [k for k in d.obs_noise_keys if k not in subspaces]
            if missing:
                raise UserError(f"obs_noise_keys {missing} are not observation keys of env '{self.env_name}'; "
                                f"it observes {list(subspaces)}")
            keys = list(d.obs_noise_keys)
        unused = sorted(set(d.obs_noise_scale) - set(keys))
        if unused:
            raise UserError(f"obs_noise_scale names keys {unused} that are not perturbed (perturbed: {keys})")
        plan = []
        for key in keys:
            shape = subspaces[key].shape
            scale = np.asarray(d.obs_noise_scale.get(key, 1.0), dtype=np.float64)
            try:
                std = d.obs_noise * np.broadcast_to(scale, shape)
            except ValueError:
                raise UserError(f"obs_noise_scale['{key}'] has {scale.size} values; key '{key}' has shape {shape} "
                                "(give one number or one per dimension)") from None
            plan.append((key, std, np.dtype(subspaces[key].dtype)))
        return plan

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        if seed is None:
            raise ValueError("DisturbedEnv.reset needs a seed: the episode's disturbance is drawn from it")
        obs, info = self.env.reset(seed=seed, options=options)
        d = self.disturbance
        self._seed, self._t = int(seed), 0
        self._obs_rng = np.random.default_rng(episode_disturbance_seed(d.seed, seed, STREAM_OBS_NOISE))
        self._shove_rng = np.random.default_rng(episode_disturbance_seed(d.seed, seed, STREAM_SHOVE))
        self.shove_record = {"step": d.shove_step, "applied": False} if d.shove_active else None
        if d.shove_active and d.shove_step == 0:
            obs, info = self._shove(obs, info)
        return self._noisy(obs), info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._t += 1
        d = self.disturbance
        if d.shove_active and self._t == d.shove_step and not (terminated or truncated):
            obs, info = self._shove(obs, info)
        return self._noisy(obs), reward, terminated, truncated, info

    def _noisy(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._noise:
            return obs
        assert self._obs_rng is not None
        out = dict(obs)
        for key, std, dtype in self._noise:  # fixed order and count per step: the stream is indexed by env step
            value = np.asarray(obs[key], dtype=np.float64) + self._obs_rng.standard_normal(std.shape) * std
            if np.issubdtype(dtype, np.integer):
                info = np.iinfo(dtype)
                value = np.clip(np.rint(value), info.min, info.max)
            out[key] = value.astype(dtype)
        return out

    def _shove(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Rejection-sample directions (and the rotation's sign) until the env accepts one; same draws per seed."""
        assert self._shove_rng is not None
        d, env = self.disturbance, self.env.unwrapped
        problem = None
        for attempt in range(1, SHOVE_MAX_TRIES + 1):
            a_block, a_agent = self._shove_rng.uniform(0.0, 2 * math.pi, size=2)
            sign = 1.0 if self._shove_rng.random() < 0.5 else -1.0
            # `+ 0.0` turns the -0.0 of a zero magnitude into 0.0 in the record
            block_offset = (d.shove_block * math.cos(a_block) + 0.0, d.shove_block * math.sin(a_block) + 0.0)
            agent_offset = (d.shove_agent * math.cos(a_agent) + 0.0, d.shove_agent * math.sin(a_agent) + 0.0)
            rotation = sign * d.shove_angle + 0.0
            problem = env.shove_problem(block_offset, rotation, agent_offset)
            if problem is None:
                shoved_obs, shove_info = env.shove(block_offset, rotation, agent_offset)
                self.shove_record = {
                    "step": d.shove_step, "applied": True, "block_offset": list(block_offset),
                    "block_rotation": rotation, "agent_offset": list(agent_offset), "attempts": attempt,
                }
                return shoved_obs, {**info, **shove_info, "shoved": True}
        # this state leaves no room (the block near a wall): the episode runs on unshoved and says why; a shove that
        # fits no episode at all is an error (`check_shoves_applied`)
        self.shove_record = {"step": d.shove_step, "applied": False, "attempts": SHOVE_MAX_TRIES,
                             "reason": f"no safe direction in {SHOVE_MAX_TRIES} tries (last: {problem})"}
        return obs, info


def check_shoves_applied(episodes: Sequence[Any], disturbance: Disturbance | None) -> None:
    """A shove that no episode could take is a configuration error (too large for the task), not a result."""
    if disturbance is None or not disturbance.shove_active:
        return
    records = [e.shove for e in episodes if e.shove is not None]
    refused = [r for r in records if r.get("reason")]
    if refused and not any(r.get("applied") for r in records):
        raise UserError(f"no episode could take the shove (block {disturbance.shove_block}, agent "
                        f"{disturbance.shove_agent}, angle {disturbance.shove_angle}) at step "
                        f"{disturbance.shove_step}: {refused[0]['reason']}; use a smaller shove")
