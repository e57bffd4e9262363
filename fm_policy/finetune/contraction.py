"""Measuring contraction and robustness of a sampler's velocity field (docs/finetuning.md, "Contraction and robustness analysis").

Two measurements, both on the flattened action chunk x (B, d), d = horizon * action_dim:

* the logarithmic norm mu(J) = lambda_max((J + J^T) / 2) of the field's Jacobian J = dv/dx along sampled
  trajectories: negative values mean nearby trajectories converge at that (t, x). Exact (d backward passes per
  point: cheap for Push-T's d = 32) or by shifted power iteration with vector-Jacobian products for large d;
* a perturbation test: a disturbance of norm delta added to the initial noise, or to the state at time t_d, and how
  far the final chunk moves (its norm, and its ratio to delta: the empirical incremental gain of the sampler).

For a residual policy the Jacobian statistics are reported for the full field, the frozen base and the residual
alone, next to the residual's certified rate, so the residual's by-construction bound can be checked against the
measurement and against the base field's expansion it has to beat. Side by side with them, the input-to-state view
of the refined sampler, measured by finite perturbation: the gain from the initial noise, from a mid-trajectory
state and from the observation (a disturbance of the normalised observation) to the action chunk, for the refined
sampler and (`base_gain_*`) for the frozen base alone. What the residual learned is split into its drift r(t, 0 | c)
(x-independent: a shift of the sampler) and its x-dependent part r(t, x | c) - r(t, 0 | c) (the part that shapes
contraction), both as norms along the deployed trajectories next to the base field's. `analyze_flow(checkpoint)`
runs it all on a saved policy; every result is a flat dict of floats.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fm_policy.errors import UserError
from fm_policy.flow_matching import sample_noise
from fm_policy.solvers import solve

FlatField = Callable[[Tensor], Tensor]  # (B, d) -> (B, d), samples independent of each other


def _jacobian(fn: FlatField, x: Tensor) -> Tensor:
    """Per-sample Jacobians (B, d, d) of fn at x (B, d), one backward pass per output coordinate.

    Relies on sample independence (no batch statistics), true of the velocity networks in eval mode.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = fn(x)
        rows = [torch.autograd.grad(y[:, k].sum(), x, retain_graph=k + 1 < y.shape[1], allow_unused=True)[0]
                for k in range(y.shape[1])]
    rows = [torch.zeros_like(x) if r is None else r for r in rows]
    return torch.stack(rows, dim=1).detach()


def _sym_matvec(fn: FlatField, x: Tensor, v: Tensor) -> Tensor:
    """((J + J^T) / 2) v with reverse mode only: J^T v by a VJP, J v by differentiating the VJP in its cotangent."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = fn(x)
        u = torch.zeros_like(y, requires_grad=True)
        jt_u = torch.autograd.grad(y, x, u, create_graph=True)[0]  # linear in u
        jv = torch.autograd.grad(jt_u, u, v)[0]
        jt_v = torch.autograd.grad(y, x, v)[0]
    return 0.5 * (jv + jt_v)


def _power_max_eig(fn: FlatField, x: Tensor, iters: int, generator: torch.Generator | None) -> Tensor:
    """lambda_max of the symmetric part by shifted power iteration (a lower bound that tightens with iters).

    First |lambda|_max = rho by plain power iteration, then power iteration on S + rho I, whose top eigenvalue is
    lambda_max + rho; the Rayleigh quotient of the final vector is returned.
    """
    def rayleigh(v: Tensor) -> Tensor:
        return (v * _sym_matvec(fn, x, v)).sum(-1)

    def random_unit() -> Tensor:
        v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return v / v.norm(dim=-1, keepdim=True)

    v = random_unit()
    for _ in range(iters):
        w = _sym_matvec(fn, x, v)
        v = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    rho = rayleigh(v).abs()[:, None]
    v = random_unit()  # not the -rho eigenvector that S + rho I annihilates
    for _ in range(iters):
        w = _sym_matvec(fn, x, v) + rho * v
        v = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return rayleigh(v).detach()


def sym_jacobian_max_eig(fn: FlatField, x: Tensor, method: str = "exact", iters: int = 30,
                         generator: torch.Generator | None = None) -> Tensor:
    """Per-sample mu(J) = lambda_max((J + J^T) / 2) of fn at x (B, d) -> (B,).

    method "exact": full Jacobian and a symmetric eigensolver (float64); "power": shifted power iteration (no d x d
    matrix; for large d), a slightly low estimate.
    """
    if method == "exact":
        jac = _jacobian(fn, x).double()
        return torch.linalg.eigvalsh(0.5 * (jac + jac.transpose(1, 2)))[:, -1].to(x.dtype)
    if method == "power":
        return _power_max_eig(fn, x, iters, generator)
    raise UserError(f"unknown method '{method}'; choose exact or power")


ChunkField = Callable[[Tensor, Tensor], Tensor]  # velocity(t (B,), x (B, H, A)) -> (B, H, A)


def _flat(field: ChunkField, t: Tensor, shape: torch.Size) -> FlatField:
    return lambda x: field(t, x.reshape(shape)).reshape(shape[0], -1)


def contraction_along_trajectories(
    fields: Mapping[str, ChunkField], drive: ChunkField, x0: Tensor, num_steps: int = 8, solver: str = "euler",
    method: str = "exact",
) -> dict[str, float]:
    """mu(J) of each named field at the states of the `drive` field's trajectories from x0 (B, H, A).

    The trajectory is the deployed sampler's (solver, num_steps); Jacobians are taken at the grid states
    t_0 .. t_{N-1} (where the sampler evaluates the field). Keys: `jac_<name>_{max,mean,min}` over all points and
    `jac_<name>_max_t<t>` per grid time.
    """
    with torch.no_grad():
        result = solve(drive, x0, solver, num_steps, return_trajectory=True)
    out: dict[str, float] = {}
    per_field: dict[str, list[Tensor]] = {name: [] for name in fields}
    for i in range(num_steps):
        t_value = float(result.times[i])
        t = torch.full((x0.shape[0],), t_value, dtype=x0.dtype, device=x0.device)
        x = result.trajectory[i].reshape(x0.shape[0], -1)
        for name, field in fields.items():
            eig = sym_jacobian_max_eig(_flat(field, t, x0.shape), x, method)
            per_field[name].append(eig)
            out[f"jac_{name}_max_t{t_value:.3f}"] = float(eig.max())
    for name, eigs in per_field.items():
        stacked = torch.cat(eigs)
        out[f"jac_{name}_max"] = float(stacked.max())
        out[f"jac_{name}_mean"] = float(stacked.mean())
        out[f"jac_{name}_min"] = float(stacked.min())
    return out


def _unit_directions(shape: torch.Size, generator: torch.Generator | None, like: Tensor) -> Tensor:
    u = torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)
    return u / u.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (len(shape) - 1))


@torch.no_grad()
def perturbation_test(
    velocity: ChunkField, x0: Tensor, num_steps: int = 8, solver: str = "euler", delta: float = 1e-2,
    t_disturb: float = 0.5, generator: torch.Generator | None = None,
    finish: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """How far the final chunk moves when a random disturbance of norm `delta` is injected.

    * `noise`: added to the initial noise x0;
    * `mid`: added to the state at grid time t_k, k = round(t_disturb * num_steps) (reported as `mid_t`), then the
      same sampler continues for the remaining steps (k = 0 is the noise case; k = num_steps moves the output by
      exactly delta).
    Keys: `perturb_<where>_{mean,max}` (final displacement norm, normalised action units) and
    `gain_<where>_{mean,max}` (displacement / delta). `finish`: a stage applied to every final state (a terminal
    refiner), so the gains are those of the whole sampler.
    """
    ref = solve(velocity, x0, solver, num_steps, return_trajectory=True)
    end = finish or (lambda x: x)
    ref_out = end(ref.x)
    out: dict[str, float] = {}

    def record(where: str, moved: Tensor) -> None:
        dist = (end(moved) - ref_out).flatten(1).norm(dim=1)
        out[f"perturb_{where}_mean"] = float(dist.mean())
        out[f"perturb_{where}_max"] = float(dist.max())
        out[f"gain_{where}_mean"] = float(dist.mean() / delta)
        out[f"gain_{where}_max"] = float(dist.max() / delta)

    record("noise", solve(velocity, x0 + delta * _unit_directions(x0.shape, generator, x0), solver, num_steps).x)
    k = min(max(round(t_disturb * num_steps), 0), num_steps)
    t_k = float(ref.times[k])
    state = ref.trajectory[k] + delta * _unit_directions(x0.shape, generator, x0)
    moved = solve(velocity, state, solver, num_steps - k, t0=t_k, t1=1.0).x if k < num_steps else state
    record("mid", moved)
    out["mid_t"] = t_k
    return out


@torch.no_grad()
def observation_gain(
    policy: torch.nn.Module, obs: Mapping[str, Tensor], noise: Tensor,
    velocity: Callable[[Tensor, Tensor, Tensor], Tensor], num_steps: int, solver: str, delta: float = 1e-2,
    generator: torch.Generator | None = None,
    finish: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Gain from an observation disturbance to the action chunk, by finite perturbation.

    The normalised low-dimensional observation window (all such keys and steps together; camera images, uint8, are
    kept as they are) is moved by a random direction of norm `delta` and the chunk is sampled again from the same
    noise; the displacement of the final chunk (normalised action units) divided by delta is the
    observation-to-action gain, the ISS gain of the sampler with the observation as its input. `velocity(t, x,
    cond)` is the field to integrate, `finish(x, cond)` an optional terminal stage. Keys: `gain_obs_{mean,max}`,
    `perturb_obs_{mean,max}` (none for a policy that observes images only).
    """
    images = set(getattr(policy, "image_keys", ()))
    normalized = {k: obs[k].to(noise.device) if k in images
                  else policy.normalizer.normalize(k, obs[k].to(noise.device, torch.float32))
                  for k in policy.obs_shapes}
    directions = {k: torch.randn(v.shape, generator=generator).to(v) for k, v in normalized.items() if k not in images}
    if not directions:
        return {}
    norm = torch.sqrt(sum(d.flatten(1).square().sum(1) for d in directions.values()))
    moved = {k: v + delta * directions[k] / norm.reshape((-1,) + (1,) * (v.ndim - 1)) if k in directions else v
             for k, v in normalized.items()}

    def sample(cond: Tensor) -> Tensor:
        x = solve(lambda t, x: velocity(t, x, cond), noise, solver, num_steps).x
        return finish(x, cond) if finish is not None else x

    dist = (sample(policy.encoder(moved)) - sample(policy.encoder(normalized))).flatten(1).norm(dim=1)
    return {"perturb_obs_mean": float(dist.mean()), "perturb_obs_max": float(dist.max()),
            "gain_obs_mean": float(dist.mean() / delta), "gain_obs_max": float(dist.max() / delta)}


def _norm_stats(prefix: str, values: list[Tensor]) -> dict[str, float]:
    stacked = torch.cat(values)
    return {f"{prefix}_mean": float(stacked.mean()), f"{prefix}_max": float(stacked.max())}


@torch.no_grad()
def residual_decomposition(residual: torch.nn.Module, base: ChunkField | None, cond: Tensor, states: Tensor,
                           times: Tensor) -> dict[str, float]:
    """What a residual learned, at trajectory states (K, B, H, A) and their times (K,): the norms (over the flattened
    chunk) of its drift r(t, 0 | c), of its x-dependent part r(t, x | c) - r(t, 0 | c) and of the whole r, next to the
    base field's norm at the same points (`base_velocity_norm_*`, absent when `base` is None)."""
    drift, xdep, whole, base_norm = [], [], [], []
    batch = cond.shape[0]
    for x, t_value in zip(states, times.tolist()):
        t = torch.full((batch,), t_value, dtype=x.dtype, device=x.device)
        r0 = residual(t, torch.zeros_like(x), cond)
        rx = residual(t, x, cond)
        drift.append(r0.flatten(1).norm(dim=1))
        xdep.append((rx - r0).flatten(1).norm(dim=1))
        whole.append(rx.flatten(1).norm(dim=1))
        if base is not None:
            base_norm.append(base(t, x).flatten(1).norm(dim=1))
    out = {**_norm_stats("residual_drift_norm", drift), **_norm_stats("residual_xdep_norm", xdep),
           **_norm_stats("residual_norm", whole)}
    if base_norm:
        out.update(_norm_stats("base_velocity_norm", base_norm))
    return out


@torch.no_grad()
def analyze_policy(
    policy: torch.nn.Module, obs: Mapping[str, Tensor], num_steps: int | None = None, solver: str | None = None,
    delta: float = 1e-2, t_disturb: float = 0.5, seed: int = 0, jacobian: str = "exact",
) -> dict[str, float]:
    """Contraction, disturbance-gain and residual statistics of a flow(-residual) policy for an observation batch.

    Uses the policy's deployed solver / step count unless given. Side by side:

    * certified: `certified_rate_{min,mean}`, the residual's by-construction rate (0 when it has none to give) at the
      times the deployed sampler evaluates it;
    * measured: Jacobian log-norms along the deployed trajectories for `full` (the refined field v_pre + r that is
      integrated), and for a residual policy also `base` and `residual` (`jac_<field>_*`);
    * ISS-style gains of the whole sampler by finite perturbation: `gain_noise_*` (initial noise), `gain_mid_*`
      (state at t_disturb), `gain_obs_*` (normalised observation); for a residual policy also `base_gain_*`, the
      frozen base sampler's, so the effect of the refiner reads directly;
    * what the residual learned: `residual_drift_norm_*`, `residual_xdep_norm_*`, `residual_norm_*` and
      `base_velocity_norm_*` along the deployed trajectories (`residual_decomposition`).

    A terminal-placement residual (`residual.placement=terminal`) refines the flow's output for its own `refine_steps`
    Euler steps in refinement time s in [0, 1]: its Jacobian, certificate and decomposition are taken along that
    stage (`refine_steps` in the output), the gains include it. Everything is in normalised action units.
    """
    if not hasattr(policy, "velocity"):
        raise UserError(f"{type(policy).__name__} has no velocity field: contraction analysis is for flow policies")
    policy.eval()
    steps = num_steps or policy.config.num_inference_steps
    method = solver or policy.config.solver
    generator = torch.Generator().manual_seed(seed)
    cond = policy.encode_obs(obs)
    batch = cond.shape[0]
    noise = sample_noise((batch, *policy.noise_shape), generator=generator).to(cond.device)

    def full(t: Tensor, x: Tensor) -> Tensor:
        return policy.velocity(t, x, cond)

    fields: dict[str, ChunkField] = {"full": full}
    residual = getattr(policy, "residual", None)
    terminal = residual is not None and getattr(policy, "refine_steps", 0) > 0
    finish = (lambda x: policy.refine(x, cond)) if terminal else None
    out: dict[str, float] = {"n": float(batch), "num_steps": float(steps), "delta": delta}
    if residual is not None:
        refine_steps = policy.refine_steps if terminal else steps
        if terminal:
            out["refine_steps"] = float(refine_steps)
        rates = []
        for t_value in torch.linspace(0, 1, refine_steps + 1)[:-1].tolist():
            rate = residual.guaranteed_rate(torch.full((batch,), t_value, device=cond.device), cond)
            rates.append(torch.zeros(batch) if rate is None else rate.detach().cpu().reshape(-1).expand(batch))
        rates_t = torch.cat(rates)
        out["certified_rate_min"] = float(rates_t.min())
        out["certified_rate_mean"] = float(rates_t.mean())

        def base_field(t: Tensor, x: Tensor) -> Tensor:
            return policy.base_velocity(t, x, cond)

        if terminal:  # the flow's field is the base; the residual acts in the refinement stage
            flow_end = solve(full, noise, method, steps).x
            stage = policy.refine(flow_end, cond, return_trajectory=True)
            out.update(contraction_along_trajectories(
                {"residual": lambda t, x: residual(t, x, cond)}, lambda t, x: residual(t, x, cond), flow_end,
                refine_steps, "euler", jacobian))
            out.update(residual_decomposition(residual, None, cond, stage[:-1],
                                              torch.linspace(0, 1, refine_steps + 1)[:-1]))
        else:
            fields["base"] = base_field
            fields["residual"] = lambda t, x: residual(t, x, cond)
            traj = solve(full, noise, method, steps, return_trajectory=True)
            out.update(residual_decomposition(residual, base_field, cond, traj.trajectory[:-1], traj.times[:-1]))
    out.update(contraction_along_trajectories(fields, full, noise, steps, method, jacobian))
    disturbances = generator.get_state()
    out.update(perturbation_test(full, noise, steps, method, delta, t_disturb, generator, finish))
    out.update(observation_gain(policy, obs, noise, policy.velocity, steps, method, delta, generator,
                                policy.refine if terminal else None))
    if residual is not None:  # the frozen base sampler alone, from the same noise with the same disturbances
        base_gen = torch.Generator()
        base_gen.set_state(disturbances)
        base_pt = perturbation_test(base_field, noise, steps, method, delta, t_disturb, base_gen)
        base_pt.update(observation_gain(policy, obs, noise, policy.base_velocity, steps, method, delta, base_gen))
        out.update({f"base_{k}": v for k, v in base_pt.items() if k.startswith("gain_")})
    return out


@torch.no_grad()
def code_statistics(policy: torch.nn.Module, obs: Mapping[str, Tensor], actions: Tensor, solver: str | None = None,
                    num_steps: int | None = None, tol: float | None = None,
                    reference_tol: float = 1e-7) -> dict[str, float]:
    """Noise codes of data chunks under the policy's field (what MLE fine-tuning pairs data with: docs/finetuning.md, "The inversion pairing").

    The (B, H, A) env-unit actions are encoded backward twice: with (solver, num_steps, tol), the MLE encode setting
    (default: `MLEConfig`'s), and with dopri5 at rtol = atol = reference_tol. Reported: `code_abs_mean` (mean
    |per-element mean|) and `code_std` (mean per-element std) of the reference codes, 0 and 1 for a field that
    transports N(0, I) exactly; `code_encode_rmse`, the RMS error of the encode setting's codes against the
    reference; `code_redecode_rmse`, how far the encode setting's codes land from their data chunks when decoded by
    the accurate forward solve (the pairing error in action space, what `fm-policy finetune` checks). A same-solver
    encode-decode round trip is no test: it closes even when the codes are wrong (the errors of the two directions
    cancel), and fields with fast time features need many more fixed steps than smooth ones.
    """
    from fm_policy.finetune.mle import MLEConfig

    defaults = MLEConfig()
    solver = solver or defaults.encode_solver
    num_steps = num_steps or defaults.encode_steps
    tol = tol or defaults.encode_rtol
    cond = policy.encode_obs(obs)
    x1 = policy.normalizer.normalize("action", actions.to(cond.device, torch.float32))

    def field(t: Tensor, x: Tensor) -> Tensor:
        return policy.velocity(t, x, cond)

    codes = solve(field, x1, solver, num_steps, t0=1.0, t1=0.0, rtol=tol, atol=tol).x
    reference = solve(field, x1, "dopri5", 1, t0=1.0, t1=0.0, rtol=reference_tol, atol=reference_tol).x
    back = solve(field, codes, "dopri5", 1, rtol=reference_tol, atol=reference_tol).x
    flat = reference.flatten(1)
    return {
        "code_abs_mean": float(flat.mean(0).abs().mean()),
        "code_std": float(flat.std(0).mean()) if flat.shape[0] > 1 else math.nan,
        "code_encode_rmse": float((codes - reference).square().mean().sqrt()),
        "code_redecode_rmse": float((back - x1).square().mean().sqrt()),
    }


def _observation_batch(policy: torch.nn.Module, checkpoint_dir: Path, data_path: str | None, n: int,
                       seed: int) -> tuple[dict[str, Tensor], Tensor | None]:
    """n observation windows (and their action chunks) from the data store, or, without data, observations drawn
    uniformly inside the normaliser's fitted range (actions None)."""
    from fm_policy.datasets.policy_data import DataConfig, build_policy_data
    from fm_policy.trainer import read_run_config

    data_cfg: DataConfig | None = None
    if data_path is not None:
        data_cfg = DataConfig(path=data_path)
    else:
        run = read_run_config(checkpoint_dir)
        data = (run or {}).get("data") or {}
        if data.get("path") and os.path.exists(data["path"]):
            data_cfg = DataConfig(**{k: v for k, v in data.items() if k in DataConfig.__dataclass_fields__})
    rng = np.random.default_rng(seed)
    if data_cfg is not None:
        data_cfg.obs_keys = list(policy.obs_shapes)
        cfg = policy.config
        windows = build_policy_data(data_cfg, cfg.horizon, cfg.n_obs_steps, cfg.n_action_steps).train
        batch = windows[rng.choice(len(windows), size=min(n, len(windows)), replace=False)]
        return {k: batch[k] for k in policy.obs_shapes}, batch["action"]
    obs = {}
    for key, shape in policy.obs_shapes.items():
        if key in getattr(policy, "image_keys", ()):  # camera images: uint8 pixels
            obs[key] = torch.from_numpy(rng.integers(0, 256, (n, policy.n_obs_steps, *shape), dtype=np.uint8))
            continue
        stats = policy.normalizer.stats(key)
        u = torch.from_numpy(rng.random((n, policy.n_obs_steps, *shape), dtype=np.float32))
        obs[key] = stats["min"] + u * (stats["max"] - stats["min"])
    return obs, None


def analyze_flow(
    checkpoint_dir: str | os.PathLike, data_path: str | None = None, n: int = 64, num_steps: int | None = None,
    solver: str | None = None, delta: float = 1e-2, t_disturb: float = 0.5, seed: int = 0, jacobian: str = "exact",
    device: str = "cpu",
) -> dict[str, float]:
    """`fm-policy analyze-flow --checkpoint DIR`: contraction, perturbation and code statistics of a saved policy.

    Observations come from `data_path`, else from the store of the training run the checkpoint belongs to, else are
    drawn inside the normaliser's range (`from_data` says which: 1 or 0). With data, the Gaussianity of the data's
    noise codes (`code_*`) is reported too.
    """
    from fm_policy.factory import load_policy

    checkpoint_dir = Path(checkpoint_dir)
    policy = load_policy(checkpoint_dir, device=device)
    obs, actions = _observation_batch(policy, checkpoint_dir, data_path, n, seed)
    obs = {k: v.to(device) for k, v in obs.items()}
    out = {"from_data": float(actions is not None)}
    out.update(analyze_policy(policy, obs, num_steps, solver, delta, t_disturb, seed, jacobian))
    if actions is not None:
        out.update(code_statistics(policy, obs, actions))
    return out
