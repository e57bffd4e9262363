"""ODE solvers for dx/dt = v(t, x): fixed-step Euler / midpoint / RK4 for sampling, torchdiffeq for references.

Time follows `fm_policy.flow_matching`: t = 0 is noise, t = 1 is data. Sampling integrates forward (t0=0 -> t1=1);
encoding a data chunk to its noise integrates backward (t0=1 -> t1=0); every solver here accepts either direction.

The velocity function has the signature `velocity_fn(t, x) -> v` with t a (B,) tensor (one time per sample, the
shape a policy network's time embedding takes) and x, v of shape (B, ...). It must not keep references to `x` or
`t` past the call: in the fast path both are reused buffers that the solver overwrites on the next stage.

Fixed-step solvers are written for the policy's hot path (1-16 steps at 10-100 Hz control):
- the time grid is built once per solve, with device kernels (torch.linspace), never torch.tensor(list), so the
  whole solve can be captured in a CUDA graph; the per-stage time is a broadcast view of that grid;
- with gradients off (inference) the state is updated in place in a working copy (the caller's tensor is never
  touched) and stage states live in buffers allocated once per solve, so a step allocates nothing beyond what the
  velocity function itself does;
- with gradients on (e.g. fine-tuning through the unrolled sampler) updates are out of place, because autograd
  needs every intermediate state the network saw;
- no .item() and no data-dependent Python branches, so torch.compile traces the unrolled loop into one graph;
- each stage's velocity is consumed before the next call, so a velocity function that returns a static output
  buffer (a CUDA-graphed network) is safe.

The number of function evaluations (NFE) is exact for fixed-step methods (steps x stages); adaptive torchdiffeq
solves count the calls with a wrapper.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]

STAGES: dict[str, int] = {"euler": 1, "midpoint": 2, "rk4": 4}  # velocity evaluations per step
FIXED_STEP_METHODS: tuple[str, ...] = tuple(STAGES)
ADAPTIVE_METHODS: tuple[str, ...] = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")  # torchdiffeq's
METHODS: tuple[str, ...] = FIXED_STEP_METHODS + ADAPTIVE_METHODS


@dataclass
class SolveResult:
    """Final state, number of velocity evaluations, and (on request) the states at the grid times `times`."""

    x: Tensor
    nfe: int
    trajectory: Tensor | None = None  # (num_steps + 1, B, ...), trajectory[0] = x0, trajectory[-1] = x
    times: Tensor | None = None  # (num_steps + 1,)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown ODE method '{method}'; choose one of {METHODS}")


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")


def solve(
    velocity_fn: VelocityFn,
    x0: Tensor,
    method: str = "euler",
    num_steps: int = 10,
    t0: float = 0.0,
    t1: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    return_trajectory: bool = False,
    inplace: bool | None = None,
) -> SolveResult:
    """Integrate dx/dt = velocity_fn(t, x) from x(t0) = x0 to t1 (t0 > t1 integrates backward).

    Fixed-step methods take `num_steps` equal steps; adaptive ones (torchdiffeq) use rtol/atol and use `num_steps`
    only for the trajectory grid. `inplace`: None = in-place updates exactly when gradients are disabled.
    """
    _check_method(method)
    _check_steps(num_steps)
    if method in STAGES:
        return _FIXED[method](velocity_fn, x0, num_steps, t0, t1, return_trajectory, inplace)
    return solve_adaptive(velocity_fn, x0, method, t0, t1, rtol, atol, num_steps if return_trajectory else None)


# ---------------------------------------------------------------------------------------------------------------
# Fixed-step solvers. Shared shape: build grid views once, loop num_steps times (a Python int, so torch.compile
# unrolls it), update either in place (inference) or out of place (autograd).


def _time_grids(
    x0: Tensor, num_steps: int, t0: float, t1: float, midpoints: bool = True
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...], float]:
    """Grid t_0..t_N, per-step (B,) time views at the grid points and at the midpoints t_i + dt/2, and dt.

    dt is a Python float so it can be an `alpha=` scalar. The (B,) views are made in one `unbind` call before the
    loop (a broadcast of the grid, no copy): it is ~3x cheaper than `grid[i].expand(B)` per stage in eager mode.
    """
    dtype = x0.dtype if x0.is_floating_point() else torch.float32
    dt = (t1 - t0) / num_steps
    batch = x0.shape[0]
    grid = torch.linspace(t0, t1, num_steps + 1, device=x0.device, dtype=dtype)
    ts = grid[:, None].expand(-1, batch).unbind(0)
    if not midpoints:  # Euler: skip the midpoint grid (~5 us of fixed cost per solve on CPU)
        return grid, ts, (), dt
    mid = torch.linspace(t0 + 0.5 * dt, t1 - 0.5 * dt, num_steps, device=x0.device, dtype=dtype)
    return grid, ts, mid[:, None].expand(-1, batch).unbind(0), dt


def _use_inplace(inplace: bool | None) -> bool:
    return not torch.is_grad_enabled() if inplace is None else inplace


def _trajectory_buffer(x: Tensor, num_steps: int, return_trajectory: bool, inplace: bool) -> Tensor | list | None:
    if not return_trajectory:
        return None
    if inplace:
        traj = x.new_empty((num_steps + 1,) + tuple(x.shape))
        traj[0].copy_(x)
        return traj
    return [x]


def _record(traj: Tensor | list | None, i: int, x: Tensor) -> None:
    if traj is None:
        return
    if isinstance(traj, list):
        traj.append(x)
    else:
        traj[i].copy_(x)


def _result(x: Tensor, nfe: int, traj: Tensor | list | None, grid: Tensor) -> SolveResult:
    if traj is None:
        return SolveResult(x=x, nfe=nfe)
    stacked = torch.stack(traj) if isinstance(traj, list) else traj
    return SolveResult(x=x, nfe=nfe, trajectory=stacked, times=grid)


def euler(
    velocity_fn: VelocityFn,
    x0: Tensor,
    num_steps: int,
    t0: float = 0.0,
    t1: float = 1.0,
    return_trajectory: bool = False,
    inplace: bool | None = None,
) -> SolveResult:
    """Explicit Euler, first order, 1 NFE per step: x <- x + dt v(t, x)."""
    _check_steps(num_steps)
    grid, ts, _, dt = _time_grids(x0, num_steps, t0, t1, midpoints=False)
    fast = _use_inplace(inplace)
    x = x0.clone() if fast else x0  # the working copy; the caller's x0 is never written
    traj = _trajectory_buffer(x, num_steps, return_trajectory, fast)
    for i in range(num_steps):
        v = velocity_fn(ts[i], x)
        if fast:
            x.add_(v, alpha=dt)
        else:
            x = x + dt * v
        _record(traj, i + 1, x)
    return _result(x, num_steps, traj, grid)


def midpoint(
    velocity_fn: VelocityFn,
    x0: Tensor,
    num_steps: int,
    t0: float = 0.0,
    t1: float = 1.0,
    return_trajectory: bool = False,
    inplace: bool | None = None,
) -> SolveResult:
    """Explicit midpoint, second order, 2 NFE per step: x <- x + dt v(t + dt/2, x + dt/2 v(t, x))."""
    _check_steps(num_steps)
    grid, ts, tms, dt = _time_grids(x0, num_steps, t0, t1)
    fast = _use_inplace(inplace)
    x = x0.clone() if fast else x0
    stage = torch.empty_like(x0) if fast else None  # reused stage state: one allocation per solve, not per step
    traj = _trajectory_buffer(x, num_steps, return_trajectory, fast)
    for i in range(num_steps):
        k1 = velocity_fn(ts[i], x)
        if fast:
            torch.add(x, k1, alpha=0.5 * dt, out=stage)
            k2 = velocity_fn(tms[i], stage)
            x.add_(k2, alpha=dt)
        else:
            k2 = velocity_fn(tms[i], x + (0.5 * dt) * k1)
            x = x + dt * k2
        _record(traj, i + 1, x)
    return _result(x, 2 * num_steps, traj, grid)


def rk4(
    velocity_fn: VelocityFn,
    x0: Tensor,
    num_steps: int,
    t0: float = 0.0,
    t1: float = 1.0,
    return_trajectory: bool = False,
    inplace: bool | None = None,
) -> SolveResult:
    """Classic Runge-Kutta, fourth order, 4 NFE per step: x <- x + dt/6 (k1 + 2 k2 + 2 k3 + k4)."""
    _check_steps(num_steps)
    grid, ts, tms, dt = _time_grids(x0, num_steps, t0, t1)
    fast = _use_inplace(inplace)
    x = x0.clone() if fast else x0
    traj = _trajectory_buffer(x, num_steps, return_trajectory, fast)
    if fast:
        stage = torch.empty_like(x0)  # stage state fed to the next k
        acc = torch.empty_like(x0)  # running k1 + 2 k2 + 2 k3 + k4
    for i in range(num_steps):
        t, tm, tn = ts[i], tms[i], ts[i + 1]
        if fast:
            # Each k is folded into `acc` and `stage` before the next call: k may alias `stage` (an identity-like
            # field) or a static output buffer of a CUDA-graphed network, so it must not be needed afterwards.
            k = velocity_fn(t, x)
            acc.copy_(k)
            torch.add(x, k, alpha=0.5 * dt, out=stage)
            k = velocity_fn(tm, stage)
            acc.add_(k, alpha=2.0)
            torch.add(x, k, alpha=0.5 * dt, out=stage)
            k = velocity_fn(tm, stage)
            acc.add_(k, alpha=2.0)
            torch.add(x, k, alpha=dt, out=stage)
            k = velocity_fn(tn, stage)
            acc.add_(k)
            x.add_(acc, alpha=dt / 6.0)
        else:
            k1 = velocity_fn(t, x)
            k2 = velocity_fn(tm, x + (0.5 * dt) * k1)
            k3 = velocity_fn(tm, x + (0.5 * dt) * k2)
            k4 = velocity_fn(tn, x + dt * k3)
            x = x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        _record(traj, i + 1, x)
    return _result(x, 4 * num_steps, traj, grid)


_FIXED: dict[str, Callable[..., SolveResult]] = {"euler": euler, "midpoint": midpoint, "rk4": rk4}


# ---------------------------------------------------------------------------------------------------------------
# Adaptive reference solves (torchdiffeq). Not for the hot path: step-size control needs host-side decisions.


class _CountingField(torch.nn.Module):
    """Adapts velocity_fn to torchdiffeq's f(t scalar, x) and counts its calls (the NFE of an adaptive solve)."""

    def __init__(self, velocity_fn: VelocityFn, batch: int) -> None:
        super().__init__()
        self.velocity_fn = velocity_fn
        self.batch = batch
        self.calls = 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        return self.velocity_fn(t.expand(self.batch), x)


def solve_adaptive(
    velocity_fn: VelocityFn,
    x0: Tensor,
    method: str = "dopri5",
    t0: float = 0.0,
    t1: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    trajectory_steps: int | None = None,
) -> SolveResult:
    """Adaptive-step solve with torchdiffeq.odeint; NFE = counted velocity calls (including step rejections).

    `trajectory_steps`: also return the states at trajectory_steps + 1 equally spaced times (dense output of the
    same solve, not extra steps). Works backward (t0 > t1). Gradients flow through the solver's operations.
    """
    from torchdiffeq import odeint  # imported here: only reference solves need it

    if method not in ADAPTIVE_METHODS:
        raise ValueError(f"unknown adaptive method '{method}'; choose one of {ADAPTIVE_METHODS}")
    n = 1 if trajectory_steps is None else trajectory_steps
    _check_steps(n)
    times = torch.linspace(t0, t1, n + 1, device=x0.device, dtype=x0.dtype)
    field = _CountingField(velocity_fn, x0.shape[0])
    states = odeint(field, x0, times, rtol=rtol, atol=atol, method=method)
    if trajectory_steps is None:
        return SolveResult(x=states[-1], nfe=field.calls)
    return SolveResult(x=states[-1], nfe=field.calls, trajectory=states, times=times)
