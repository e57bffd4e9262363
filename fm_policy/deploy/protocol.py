"""The messages between a robot controller and the policy server, and the checks every request goes through.

One websocket connection carries (all binary msgpack frames, see `fm_policy.deploy.codec`):

    server -> client, once on connect   metadata: PolicySpec.to_metadata() (keys, shapes, dtypes, horizons, ...)
    client -> server                    {"observation": {key: array (n_obs_steps, *shape)}, "request_id": str | int,
                                         "num_steps": int, "solver": str, "noise": array (horizon, action_dim)}
                                        (everything but "observation" optional)
    server -> client                    {"type": "actions", "actions": float32 (horizon - n_obs_steps + 1, action_dim),
                                         "request_id": ..., "num_steps": int, "server_timing": {"infer_ms", ...}}
                                        or {"type": "error", "error": {"code": str, "message": str}, "request_id": ...}

The server is stateless: the client keeps the observation history (the first observation repeated after a reset,
as in training), so a reconnect or a second server loses nothing. `actions` starts at the current step (index
n_obs_steps - 1 of the generated chunk) and runs to the end of the chunk; the metadata's `n_action_steps` says how
many of them the policy was trained to execute open loop, so no wrapper silently truncates or over-runs a chunk.
`noise` lets an evaluation replay exactly the same samples in-process and over the socket.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import numpy as np

import fm_policy

__all__ = ["PROTOCOL_VERSION", "InferRequest", "PolicySpec", "RequestError", "spec_from_policy", "validate_request"]

PROTOCOL_VERSION = 1
SOLVERS = {"flow": ("euler", "midpoint", "rk4"), "flow_residual": ("euler", "midpoint", "rk4"), "ddpm": ("ddpm", "ddim")}
REQUEST_FIELDS = ("observation", "request_id", "num_steps", "solver", "noise")


class RequestError(ValueError):
    """A request the server refuses; `code` is machine-readable, the message names the field and what is wrong."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


@dataclass
class PolicySpec:
    """What a client must know to talk to a served policy; sent as the metadata frame on connect."""

    obs_shapes: dict[str, list[int]]  # per-step shape of each observation key
    obs_dtypes: dict[str, str]  # numpy dtype str each key must be sent as, e.g. "<f4"
    action_dim: int
    horizon: int
    n_obs_steps: int
    n_action_steps: int
    policy_type: str
    num_steps: int  # default sampler steps of the server
    max_num_steps: int  # largest num_steps a request may ask for
    solver: str
    solvers: list[str]
    action_low: list[float]  # training action range (normaliser min / max): what clients clamp to
    action_high: list[float]
    control_hz: float = 10.0
    model: str = ""
    fm_policy_version: str = fm_policy.__version__
    protocol_version: int = PROTOCOL_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def chunk_len(self) -> int:
        """Actions per response: from the current step to the end of the generated chunk."""
        return self.horizon - self.n_obs_steps + 1

    def to_metadata(self) -> dict[str, Any]:
        return {"type": "metadata", **asdict(self)}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> PolicySpec:
        names = set(cls.__dataclass_fields__)
        missing = sorted(f.name for f in fields(cls)
                         if f.name not in meta and f.default is MISSING and f.default_factory is MISSING)
        if missing:
            raise ValueError(f"server metadata lacks fields {missing}; is this an fm-policy server?")
        return cls(**{k: v for k, v in meta.items() if k in names})


def spec_from_policy(policy: Any, num_steps: int | None = None, max_num_steps: int = 64, control_hz: float = 10.0,
                     model: str = "") -> PolicySpec:
    """The spec of a loaded `BasePolicy`: shapes from its config, action range from its normaliser's statistics."""
    cfg = policy.config
    stats = policy.normalizer.stats("action")
    default_solver = cfg.diffusion_sampler if cfg.type == "ddpm" else cfg.solver
    steps = int(num_steps or cfg.num_inference_steps)
    if not 1 <= steps <= max_num_steps:
        raise ValueError(f"num_steps={steps} must be in [1, max_num_steps={max_num_steps}]")
    return PolicySpec(
        obs_shapes={k: list(v) for k, v in policy.obs_shapes.items()},
        obs_dtypes={k: "<f4" for k in policy.obs_shapes},  # the low-dim encoder consumes float32
        action_dim=int(cfg.action_dim), horizon=int(cfg.horizon), n_obs_steps=int(cfg.n_obs_steps),
        n_action_steps=int(cfg.n_action_steps), policy_type=cfg.type, num_steps=steps,
        max_num_steps=int(max_num_steps), solver=default_solver,
        solvers=list(SOLVERS.get(cfg.type, (default_solver,))),
        action_low=[float(v) for v in stats["min"].reshape(-1).tolist()],
        action_high=[float(v) for v in stats["max"].reshape(-1).tolist()],
        control_hz=float(control_hz), model=model,
    )


@dataclass
class InferRequest:
    """A validated request: observation arrays in the spec's dtype, sampler settings resolved."""

    observation: dict[str, np.ndarray]
    num_steps: int
    solver: str
    noise: np.ndarray | None = None
    request_id: Any = None


def _check_array(name: str, value: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise RequestError(f"'{name}' must be a numpy array (msgpack __ndarray__), got {type(value).__name__}",
                           "bad_type")
    if value.shape != shape:
        raise RequestError(f"'{name}' has shape {value.shape}; expected {shape}", "bad_shape")
    if value.dtype != dtype:
        raise RequestError(f"'{name}' has dtype {value.dtype.str} ({value.dtype}); expected {dtype.str} ({dtype})",
                           "bad_dtype")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        raise RequestError(f"'{name}' contains {bad} NaN/inf value(s)", "not_finite")
    return value


def validate_request(message: Any, spec: PolicySpec) -> InferRequest:
    """Check a decoded request against `spec`; RequestError names the first thing that is wrong.

    Strict on purpose: unknown fields and observation keys are refused (a typo such as 'keypoint' would otherwise
    silently fall back to defaults), and dtypes must match exactly (no silent float64 -> float32 rounding or
    int -> float reinterpretation on the server; the client library converts before sending).
    """
    if not isinstance(message, dict):
        raise RequestError(f"a request must be a map with an 'observation' field, got {type(message).__name__}")
    request_id = message.get("request_id")
    if request_id is not None and not isinstance(request_id, (str, int)):
        raise RequestError("'request_id' must be a str or an int")
    unknown = sorted(str(k) for k in message if k not in REQUEST_FIELDS)
    if unknown:
        raise RequestError(f"unknown request field(s) {unknown}; allowed: {list(REQUEST_FIELDS)}", "unknown_field")
    obs = message.get("observation")
    if not isinstance(obs, dict):
        raise RequestError("request lacks an 'observation' map of arrays", "missing_observation")
    missing = sorted(set(spec.obs_shapes) - set(obs))
    extra = sorted(str(k) for k in set(obs) - set(spec.obs_shapes))
    if missing or extra:
        raise RequestError(
            f"observation keys do not match the policy: missing {missing}, unexpected {extra}; "
            f"expected exactly {sorted(spec.obs_shapes)}", "bad_keys")
    checked = {
        key: _check_array(f"observation/{key}", obs[key], (spec.n_obs_steps, *spec.obs_shapes[key]),
                          np.dtype(spec.obs_dtypes[key]))
        for key in sorted(spec.obs_shapes)
    }
    num_steps = message.get("num_steps", spec.num_steps)
    if num_steps is None:
        num_steps = spec.num_steps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= spec.max_num_steps:
        raise RequestError(f"'num_steps' must be an int in [1, {spec.max_num_steps}], got {num_steps!r}", "bad_value")
    solver = message.get("solver") or spec.solver
    if solver not in spec.solvers:
        raise RequestError(f"'solver' {solver!r} is not served; choose one of {spec.solvers}", "bad_value")
    noise = message.get("noise")
    if noise is not None:
        noise = _check_array("noise", noise, (spec.horizon, spec.action_dim), np.dtype("<f4"))
    return InferRequest(observation=checked, num_steps=num_steps, solver=solver, noise=noise, request_id=request_id)


def error_frame(code: str, message: str, request_id: Any = None) -> dict[str, Any]:
    return {"type": "error", "error": {"code": code, "message": message}, "request_id": request_id}
