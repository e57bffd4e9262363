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

openpi dialect (what `openpi_client.websocket_client_policy.WebsocketClientPolicy` sends and reads, unmodified):

    client -> server                    {key: array (n_obs_steps, *shape), ...}: the observation map itself, flat;
                                        any float or int dtype (converted to the spec's dtype); arrays tagged with
                                        openpi's bytes keys; the control fields above may sit beside the keys
    server -> client                    {"actions": float32 (chunk_len, action_dim), "clamped": int,
                                         "server_timing": {...}} with bytes-key array tags (openpi's decoder)
                                        or a text frame: JSON {"type": "error", "error": {...}} (openpi's client
                                        raises RuntimeError with it)

A request in the `{"observation": {...}}` envelope is answered in this module's dialect, a flat one in openpi's
(`detect_dialect`); a server can be restricted to one of them. Error messages never quote received data at length
(`fm_policy.deploy.codec.short_repr`) and are cut to `MAX_ERROR_CHARS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import numpy as np

import fm_policy
from fm_policy.deploy.codec import short_repr

__all__ = ["ACTION_RANGE_MODES", "DIALECTS", "PROTOCOL_VERSION", "InferRequest", "PolicySpec", "RequestError",
           "check_actions", "detect_dialect", "error_frame", "spec_from_policy", "validate_request"]

PROTOCOL_VERSION = 1
REQUEST_FIELDS = ("observation", "request_id", "num_steps", "solver", "noise")
CONTROL_FIELDS = REQUEST_FIELDS[1:]  # may sit beside the observation keys of a flat (openpi) request
DIALECTS = ("fm", "openpi")
MAX_ERROR_CHARS = 400  # an error message is never longer, whatever the request held
MAX_REQUEST_ID_CHARS = 128
ACTION_RANGE_MODES = ("clamp", "flag", "none")  # what a server does with actions outside the training range


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
    # limits and output checks of the serving side (defaults: what an older server, or none, promises)
    max_nfe: int = 0  # most network evaluations one request may cost (num_steps x solver_nfe[solver]); 0: no cap
    solver_nfe: dict[str, int] = field(default_factory=dict)  # network evaluations per step of each solver
    action_range_mode: str = "none"  # clamp | flag | none: what the server does with actions outside action_low/high
    request_timeout_s: float = 0.0  # a request not answered by then gets a `deadline_exceeded` error; 0: none
    dialects: list[str] = field(default_factory=lambda: ["fm"])  # request formats the server accepts

    def request_nfe(self, num_steps: int, solver: str) -> int:
        """Network evaluations of one request (what `max_nfe` caps)."""
        return int(num_steps) * int(self.solver_nfe.get(solver, 1))

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
    default_solver = cfg.solver
    steps = int(num_steps or cfg.num_inference_steps)
    if not 1 <= steps <= max_num_steps:
        raise ValueError(f"num_steps={steps} must be in [1, max_num_steps={max_num_steps}]")
    return PolicySpec(
        obs_shapes={k: list(v) for k, v in policy.obs_shapes.items()},
        # low-dim keys are float32; camera images (per-step shape (H, W, C)) travel as uint8, as the envs emit them
        obs_dtypes={k: "|u1" if k in getattr(policy, "image_keys", ()) else "<f4" for k in policy.obs_shapes},
        action_dim=int(cfg.action_dim), horizon=int(cfg.horizon), n_obs_steps=int(cfg.n_obs_steps),
        n_action_steps=int(cfg.n_action_steps), policy_type=type(policy).name, num_steps=steps,
        max_num_steps=int(max_num_steps), solver=default_solver,
        solvers=list(dict.fromkeys([default_solver, *type(policy).fixed_cost_solvers])),
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


def _check_array(name: str, value: Any, shape: tuple[int, ...], dtype: np.dtype, convert: bool = False) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise RequestError(f"'{name}' must be a numpy array (msgpack __ndarray__), got {type(value).__name__}",
                           "bad_type")
    if convert and value.shape == shape[1:] and shape[0] == 1:  # openpi: one frame when the policy wants one
        value = value[None]
    if value.shape != shape:
        raise RequestError(f"'{name}' has shape {short_repr(value.shape)}; expected {shape}", "bad_shape")
    if value.dtype != dtype:
        if not (convert and value.dtype.kind in "fiu" and dtype.kind == "f"):
            raise RequestError(f"'{name}' has dtype {value.dtype.str} ({value.dtype}); expected {dtype.str} ({dtype})",
                               "bad_dtype")
        with np.errstate(over="ignore"):
            value = value.astype(dtype)  # openpi clients send what numpy gave them; out-of-range -> inf -> refused
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        raise RequestError(f"'{name}' contains {bad} NaN/inf value(s)", "not_finite")
    return value


def _names(keys: Any) -> str:
    """A short, bounded list of (attacker-chosen) key names for an error message."""
    names = sorted(short_repr(k, 40) for k in keys)
    return "[" + ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "") + "]"


def detect_dialect(message: Any, spec: PolicySpec) -> str:
    """'fm' for the {"observation": {...}} envelope (and anything that is not a map), 'openpi' for a flat map."""
    if not isinstance(message, dict) or "observation" not in message:
        return "fm" if not isinstance(message, dict) or not message or set(message) <= set(REQUEST_FIELDS) else "openpi"
    if "observation" in spec.obs_shapes and not isinstance(message["observation"], dict):
        return "openpi"  # a policy whose observation key is literally 'observation'
    return "fm"


def _int_value(value: Any) -> int | None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return None
    return int(value)


def validate_request(message: Any, spec: PolicySpec, dialect: str = "fm") -> InferRequest:
    """Check a decoded request against `spec`; RequestError names the first thing that is wrong.

    Strict on purpose: unknown fields and observation keys are refused (a typo such as 'keypoint' would otherwise
    silently fall back to defaults), and dtypes must match exactly (no silent float64 -> float32 rounding or
    int -> float reinterpretation on the server; the client library converts before sending). The openpi dialect
    (`dialect="openpi"`: the observation map itself, flat) converts numeric dtypes, as openpi's own servers do.
    Every message is bounded: received values are quoted only as a short prefix.
    """
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be one of {DIALECTS}, got {dialect!r}")
    if not isinstance(message, dict):
        raise RequestError(f"a request must be a map with an 'observation' field, got {type(message).__name__}")
    request_id = message.get("request_id")
    if request_id is not None:
        if isinstance(request_id, str):
            if len(request_id) > MAX_REQUEST_ID_CHARS:
                raise RequestError(f"'request_id' is longer than {MAX_REQUEST_ID_CHARS} characters", "bad_value")
        elif _int_value(request_id) is None or not -2**63 <= request_id < 2**64:
            raise RequestError("'request_id' must be a str or a 64-bit int", "bad_value")
    if dialect == "fm":
        unknown = [k for k in message if k not in REQUEST_FIELDS]
        if unknown:
            raise RequestError(f"unknown request field(s) {_names(unknown)}; allowed: {list(REQUEST_FIELDS)}",
                               "unknown_field")
        obs = message.get("observation")
        if not isinstance(obs, dict):
            raise RequestError("request lacks an 'observation' map of arrays", "missing_observation")
        controls: Mapping[str, Any] = message
    else:
        obs = {k: v for k, v in message.items() if k in spec.obs_shapes or k not in CONTROL_FIELDS}
        controls = {k: v for k, v in message.items() if k not in obs}
    missing = sorted(set(spec.obs_shapes) - set(obs))
    extra = [k for k in obs if k not in spec.obs_shapes]
    if missing or extra:
        raise RequestError(
            f"observation keys do not match the policy: missing {_names(missing)}, unexpected {_names(extra)}; "
            f"expected exactly {sorted(spec.obs_shapes)}", "bad_keys")
    convert = dialect == "openpi"
    checked = {
        key: _check_array(f"observation/{key}", obs[key], (spec.n_obs_steps, *spec.obs_shapes[key]),
                          np.dtype(spec.obs_dtypes[key]), convert)
        for key in sorted(spec.obs_shapes)
    }
    num_steps = controls.get("num_steps")
    num_steps = spec.num_steps if num_steps is None else _int_value(num_steps)
    if num_steps is None or not 1 <= num_steps <= spec.max_num_steps:
        raise RequestError(f"'num_steps' must be an int in [1, {spec.max_num_steps}], got "
                           f"{short_repr(controls.get('num_steps'))}", "bad_value")
    solver = controls.get("solver")
    if solver is None or (isinstance(solver, str) and not solver):
        solver = spec.solver
    if not isinstance(solver, str):
        raise RequestError(f"'solver' must be a str, got {type(solver).__name__}", "bad_value")
    if solver not in spec.solvers:
        raise RequestError(f"'solver' {short_repr(solver, 30)} is not served; choose one of {spec.solvers}",
                           "bad_value")
    if spec.max_nfe and spec.request_nfe(num_steps, solver) > spec.max_nfe:
        raise RequestError(
            f"{num_steps} {solver} steps cost {spec.request_nfe(num_steps, solver)} network evaluations; this server "
            f"allows at most {spec.max_nfe} per request (max_nfe)", "too_costly")
    noise = controls.get("noise")
    if noise is not None:
        noise = _check_array("noise", noise, (spec.horizon, spec.action_dim), np.dtype("<f4"), convert)
    return InferRequest(observation=checked, num_steps=num_steps, solver=solver, noise=noise, request_id=request_id)


def check_actions(actions: np.ndarray, spec: PolicySpec, mode: str) -> tuple[np.ndarray, int]:
    """Server-side output check: NaN/inf -> RequestError('non_finite_output'); values outside the training range
    clamped (mode 'clamp') or only counted ('flag'). Returns the actions to send and how many values were outside."""
    finite = np.isfinite(actions)
    if not finite.all():
        raise RequestError(f"the policy produced {int(finite.size - finite.sum())} NaN/inf action value(s); no actions "
                           "sent (observations far outside the training data?)", "non_finite_output")
    if mode == "none":
        return actions, 0
    low, high = np.asarray(spec.action_low, np.float32), np.asarray(spec.action_high, np.float32)
    outside = int(np.count_nonzero((actions < low) | (actions > high)))
    if outside and mode == "clamp":
        actions = np.clip(actions, low, high)
    return actions, outside


def error_frame(code: str, message: str, request_id: Any = None) -> dict[str, Any]:
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 3] + "..."
    return {"type": "error", "error": {"code": code, "message": message}, "request_id": request_id}
