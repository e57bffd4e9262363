"""Export a saved policy to ONNX or TorchScript (`fm-policy export`), with a parity check against PyTorch.

What is exported (the usual split for few-step samplers: docs/deploy.md, section 5):

- `encoder`: raw observations {key: (B, n_obs_steps, *shape)} -> global condition (B, cond_dim). The observation
  normaliser is inside the graph, so a C++/Rust host feeds sensor values exactly as the server receives them.
- `velocity` (flow) / `denoiser` (ddpm): (x (B, horizon, A), t (B,), cond) -> (B, horizon, A). One network call;
  the host runs the 1-16-step ODE loop (or the DDIM loop) itself. `export.json` carries the action
  un-normalisation (actions = (x - offset) / scale) and the time grid convention (t = 0 noise -> 1 data).
- `fused_euler{N}` (flow policies, N in `fused_steps`, default 1 and 2): observations + initial noise -> executable
  chunk in env units (B, horizon, A): encoder, N unrolled Euler steps and un-normalisation in one graph, for hosts
  that want a single call per chunk.

Every graph has a dynamic batch dimension. ONNX uses torch's TorchScript-based exporter (`dynamo=False`, opset 17;
the dynamo exporter needs onnxscript and gains nothing for these static graphs). Parity: each artefact is run on
random observations inside the training range (batch 1 and 3) through onnxruntime (ONNX) or `torch.jit.load`
(TorchScript) and compared with the PyTorch modules; the max abs error per graph is recorded in `export.json`, and
the export fails if it exceeds `atol + rtol * max|reference|`.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import fm_policy
from fm_policy.errors import UserError

__all__ = ["ExportConfig", "ExportError", "export_policy"]

FORMATS = ("onnx", "torchscript")


class ExportError(UserError):
    """The policy cannot be exported as asked, or an exported graph disagrees with PyTorch beyond the tolerance."""


@dataclass
class ExportConfig:
    format: str = "onnx"  # onnx | torchscript
    fused_steps: tuple[int, ...] = (1, 2)  # unrolled Euler graphs to add (flow policies only); () for none
    opset: int = 17
    verify: bool = True
    atol: float = 1e-4
    rtol: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ExportError(f"export format '{self.format}' is unknown; choose one of {FORMATS}")
        if any(n < 1 or n > 16 for n in self.fused_steps):
            raise ExportError(f"fused_steps must be in [1, 16] (unrolled graphs grow linearly), got {self.fused_steps}")


class EncoderGraph(nn.Module):
    """Raw observations (positional, sorted key order) -> normalised, encoded condition."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.policy, self.keys = policy, list(policy.obs_shapes)

    def forward(self, *obs: Tensor) -> Tensor:
        return self.policy.encode_obs(dict(zip(self.keys, obs, strict=True)))


class VelocityGraph(nn.Module):
    """(x, t, cond) -> the network output (flow velocity, or the DDPM baseline's predicted noise)."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        velocity = getattr(self.policy, "velocity", None)  # flow / flow_residual: base field (+ residual)
        return velocity(t, x, cond) if velocity is not None else self.policy.net(x, t, cond)


class FusedEulerGraph(nn.Module):
    """Observations + noise -> un-normalised chunk via `steps` unrolled Euler steps (t = 0 noise -> t = 1 data)."""

    def __init__(self, policy: Any, steps: int) -> None:
        super().__init__()
        self.encoder, self.velocity, self.steps, self.policy = EncoderGraph(policy), VelocityGraph(policy), steps, policy

    def forward(self, *inputs: Tensor) -> Tensor:
        *obs, x = inputs
        cond = self.encoder(*obs)
        dt = 1.0 / self.steps
        for i in range(self.steps):
            t = torch.full((x.shape[0],), i * dt, dtype=x.dtype, device=x.device)
            x = x + dt * self.velocity(x, t, cond)
        return self.policy.normalizer.unnormalize("action", x)


@dataclass
class GraphRecord:
    name: str
    file: str
    inputs: dict[str, list[Any]]
    outputs: dict[str, list[Any]]
    max_abs_error: float | None = None
    tolerance: float | None = None
    seconds: float = 0.0
    note: str = ""


@dataclass
class ExportManifest:
    format: str
    policy_type: str
    obs_keys: list[str]
    obs_shapes: dict[str, list[int]]
    horizon: int
    n_obs_steps: int
    n_action_steps: int
    action_dim: int
    action_scale: list[float]
    action_offset: list[float]
    time_convention: str
    graphs: list[GraphRecord] = field(default_factory=list)
    opset: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    obs_dtypes: dict[str, str] = field(default_factory=dict)  # "<f4" low-dim keys, "|u1" camera images (HWC)


def _versions() -> dict[str, str]:
    out = {"fm_policy": fm_policy.__version__, "torch": torch.__version__}
    for name in ("onnx", "onnxruntime"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def _sample_obs(policy: Any, batch: int, generator: torch.Generator) -> list[Tensor]:
    """Observations uniformly inside the training range of each key (what the graph will see in service)."""
    out = []
    for key, shape in policy.obs_shapes.items():
        if key in getattr(policy, "image_keys", ()):  # camera images: uint8 HWC, as served
            out.append(torch.randint(0, 256, (batch, policy.n_obs_steps, *shape), generator=generator,
                                     dtype=torch.uint8))
            continue
        stats = policy.normalizer.stats(key) if key in policy.normalizer else None
        u = torch.rand((batch, policy.n_obs_steps, *shape), generator=generator)
        out.append(u if stats is None else stats["min"] + u * (stats["max"] - stats["min"]))
    return out


def _run_onnx(path: Path, names: Sequence[str], args: Sequence[Tensor]) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})[0]


def _export_one(module: nn.Module, args: tuple[Tensor, ...], names: list[str], path: Path, cfg: ExportConfig) -> None:
    with warnings.catch_warnings():
        # shape checks inside the networks (e.g. `if x.shape[1] != horizon: raise`) are constant for the traced
        # shapes; tracing warns about each of them although the batch dimension stays dynamic
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch >= 2.9 marks both the TorchScript-based ONNX exporter and torch.jit as deprecated; they still
        # produce exact graphs for these models, and the parity check below catches any regression
        warnings.simplefilter("ignore", DeprecationWarning)
        if cfg.format == "onnx":
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=cfg.opset, input_names=names,
                              output_names=["output"],
                              dynamic_axes={n: {0: "batch"} for n in [*names, "output"]})
        else:
            traced = torch.jit.trace(module, args, check_trace=False)
            torch.jit.save(traced, str(path))


def _check(module: nn.Module, path: Path, names: list[str], policy: Any, make_args: Any, cfg: ExportConfig,
           record: GraphRecord) -> None:
    """Compare the exported graph with the PyTorch module at batch 1 and 3 (the batch axis must be dynamic)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    worst, scale = 0.0, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = torch.jit.load(str(path)) if cfg.format == "torchscript" else None
    for batch in (1, 3):
        args = make_args(batch, generator)
        with torch.no_grad():
            ref = module(*args).numpy()
            got = _run_onnx(path, names, args) if loaded is None else loaded(*args).numpy()
        if got.shape != ref.shape:
            raise ExportError(f"{record.file}: output shape {got.shape} != PyTorch {ref.shape} at batch {batch}")
        worst = max(worst, float(np.max(np.abs(got - ref))))
        scale = max(scale, float(np.max(np.abs(ref))))
    record.max_abs_error = worst
    record.tolerance = cfg.atol + cfg.rtol * scale
    if not worst <= record.tolerance:  # also catches NaN
        raise ExportError(f"{record.file}: max abs error {worst:.3g} vs PyTorch exceeds tolerance {record.tolerance:.3g}")


def export_policy(policy: Any, out_dir: str | Path, config: ExportConfig | None = None) -> ExportManifest:
    """Export `policy` (a loaded `BasePolicy`) into `out_dir` and write `export.json`; see the module docstring."""
    cfg = config or ExportConfig()
    if cfg.format == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ExportError(f"ONNX export needs the deploy extra: pip install 'fm-policy[deploy]' ({exc})") from None
    policy = policy.to("cpu").eval()
    if not type(policy).exportable:
        raise ExportError(f"a '{type(policy).name}' policy cannot be exported: its sampler does more than integrate "
                          "its network (serve it with `fm-policy serve` instead)")
    is_flow = type(policy).supports_fused_export  # its network is a velocity field in flow time, Euler-fusable
    if cfg.fused_steps and not is_flow:
        raise ExportError(f"fused Euler graphs are for flow policies; this is a '{type(policy).name}' policy "
                          "(export it with fused_steps=() and run its sampler loop on the host)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ext = ".onnx" if cfg.format == "onnx" else ".pt"
    keys = list(policy.obs_shapes)
    horizon, adim = policy.config.horizon, policy.config.action_dim
    cond_dim = policy.encoder.output_dim
    obs_specs = {k: ["batch", policy.n_obs_steps, *policy.obs_shapes[k]] for k in keys}
    act = policy.normalizer
    manifest = ExportManifest(
        format=cfg.format, policy_type=type(policy).name, obs_keys=keys,
        obs_shapes={k: list(v) for k, v in policy.obs_shapes.items()}, horizon=horizon,
        n_obs_steps=policy.n_obs_steps, n_action_steps=policy.n_action_steps, action_dim=adim,
        action_scale=act._get("action", "scale").reshape(-1).tolist(),
        action_offset=act._get("action", "offset").reshape(-1).tolist(),
        time_convention=("flow time t in [0, 1], t = 0 noise, t = 1 data; Euler: x += (1/N) v(x, i/N, cond)"
                         if is_flow else "DDPM timesteps 0..num_train_timesteps-1 (diffusers schedulers on the host)"),
        opset=cfg.opset if cfg.format == "onnx" else None, versions=_versions(),
        obs_dtypes={k: "|u1" if k in getattr(policy, "image_keys", ()) else "<f4" for k in keys},
    )

    def noise(batch: int, g: torch.Generator) -> Tensor:
        return torch.randn((batch, horizon, adim), generator=g)

    graphs: list[tuple[str, nn.Module, list[str], Any, dict[str, list[Any]], dict[str, list[Any]]]] = [
        ("encoder", EncoderGraph(policy), keys, lambda b, g: tuple(_sample_obs(policy, b, g)), obs_specs,
         {"cond": ["batch", cond_dim]}),
        ("velocity" if is_flow else "denoiser", VelocityGraph(policy), ["x", "t", "cond"],
         lambda b, g: (noise(b, g), torch.rand((b,), generator=g) * (1.0 if is_flow else 99.0),
                       policy.encode_obs(dict(zip(keys, _sample_obs(policy, b, g), strict=True)))),
         {"x": ["batch", horizon, adim], "t": ["batch"], "cond": ["batch", cond_dim]},
         {"output": ["batch", horizon, adim]}),
    ]
    for steps in cfg.fused_steps:
        graphs.append((f"fused_euler{steps}", FusedEulerGraph(policy, steps), [*keys, "noise"],
                       lambda b, g: (*_sample_obs(policy, b, g), noise(b, g)),
                       {**obs_specs, "noise": ["batch", horizon, adim]}, {"actions": ["batch", horizon, adim]}))

    for name, module, names, make_args, inputs, outputs in graphs:
        start = time.perf_counter()
        path = out / f"{name}{ext}"
        module.eval()
        with torch.no_grad():
            _export_one(module, make_args(1, torch.Generator().manual_seed(cfg.seed + 1)), names, path, cfg)
        record = GraphRecord(name=name, file=path.name, inputs=inputs, outputs=outputs)
        if cfg.verify:
            _check(module, path, names, policy, make_args, cfg, record)
        record.seconds = time.perf_counter() - start
        manifest.graphs.append(record)
    (out / "export.json").write_text(json.dumps(asdict(manifest), indent=2, default=_json_default) + "\n")
    return manifest


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def host_euler_loop(out_dir: str | Path, observation: dict[str, np.ndarray], noise: np.ndarray, steps: int) -> np.ndarray:
    """Reference host loop over the ONNX encoder + velocity graphs (what a C++ host would do), un-normalised.

    observation: {key: (B, n_obs_steps, *shape)} float32 (camera images uint8); noise (B, horizon, A). Returns (B, horizon, A).
    """
    import onnxruntime as ort

    out = Path(out_dir)
    manifest = json.loads((out / "export.json").read_text())
    from fm_policy.factory import policy_class

    if manifest["format"] != "onnx" or not policy_class(manifest["policy_type"]).supports_fused_export:
        raise ExportError(f"{out}: host_euler_loop needs an ONNX export of a flow policy")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    encoder = ort.InferenceSession(str(out / "encoder.onnx"), options, providers=["CPUExecutionProvider"])
    velocity = ort.InferenceSession(str(out / "velocity.onnx"), options, providers=["CPUExecutionProvider"])
    dtypes = manifest.get("obs_dtypes") or {}
    cond = encoder.run(None, {k: np.asarray(observation[k], np.dtype(dtypes.get(k, "<f4")))
                              for k in manifest["obs_keys"]})[0]
    x = np.asarray(noise, np.float32).copy()
    dt = np.float32(1.0 / steps)
    for i in range(steps):
        t = np.full((x.shape[0],), i / steps, np.float32)
        x = x + dt * velocity.run(None, {"x": x, "t": t, "cond": cond})[0]
    scale, offset = np.asarray(manifest["action_scale"], np.float32), np.asarray(manifest["action_offset"], np.float32)
    return (x - offset) / scale
