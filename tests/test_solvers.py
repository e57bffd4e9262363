"""ODE solvers: order of accuracy, adaptive accuracy, both directions, NFE, no input mutation, autograd, compile."""

import math
import time

import pytest
import torch

from fm_policy.solvers import (
    ADAPTIVE_METHODS,
    FIXED_STEP_METHODS,
    euler,
    solve,
    solve_adaptive,
)


def linear_ode(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dx/dt = -x + t (time enters explicitly, so wrong stage times show up as a lost order)."""
    return -x + t.reshape(-1, *([1] * (x.ndim - 1)))


def linear_ode_exact(x0: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    """x(t) = t - 1 + C e^{-t} with C fixed by x(t0) = x0."""
    c = (x0 - t0 + 1.0) * math.exp(t0)
    return t1 - 1.0 + c * math.exp(-t1)


def x0_batch(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor([[0.5], [-2.0], [3.0]], dtype=dtype)


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("midpoint", 2), ("rk4", 4)])
@pytest.mark.parametrize("grad", [False, True], ids=["inplace", "autograd"])
@pytest.mark.parametrize(("t0", "t1"), [(0.0, 1.0), (1.0, 0.25)], ids=["forward", "backward"])
def test_order_of_accuracy(method: str, order: int, grad: bool, t0: float, t1: float) -> None:
    """Halving the step divides the error by 2^order, forward (noise -> data) and backward (data -> noise)."""
    x0 = x0_batch()
    exact = linear_ode_exact(x0, t0, t1)
    errors = []
    with torch.set_grad_enabled(grad):
        for n in (4, 8, 16, 32):
            errors.append((solve(linear_ode, x0, method, n, t0=t0, t1=t1).x - exact).abs().max().item())
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(r - order) < 0.25 for r in rates), (method, errors, rates)


def test_adaptive_matches_analytic_and_counts_nfe() -> None:
    x0 = x0_batch()
    calls = 0

    def counted(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        assert t.shape == (x.shape[0],)
        return linear_ode(t, x)

    res = solve(counted, x0, "dopri5", rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res.x, linear_ode_exact(x0, 0.0, 1.0), atol=1e-6, rtol=0)
    assert res.nfe == calls > 0


def test_adaptive_round_trip_returns_start() -> None:
    x0 = torch.randn(4, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def field(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # nonlinear, time-dependent, mixes dims
        return torch.tanh(x @ w) * (1.0 + t.reshape(-1, 1, 1))

    fwd = solve_adaptive(field, x0, "dopri5", 0.0, 1.0, rtol=1e-9, atol=1e-9)
    back = solve_adaptive(field, fwd.x, "dopri5", 1.0, 0.0, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(fwd.x, x0)
    torch.testing.assert_close(back.x, x0, atol=1e-6, rtol=0)


def test_adaptive_trajectory_on_grid() -> None:
    res = solve(linear_ode, x0_batch(), "dopri5", num_steps=4, rtol=1e-9, atol=1e-9, return_trajectory=True)
    assert res.trajectory.shape == (5, 3, 1)
    for i, t in enumerate(res.times.tolist()):
        torch.testing.assert_close(res.trajectory[i], linear_ode_exact(x0_batch(), 0.0, t), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("method", "per_step"), [("euler", 1), ("midpoint", 2), ("rk4", 4)])
@pytest.mark.parametrize("grad", [False, True], ids=["inplace", "autograd"])
def test_fixed_step_nfe_is_exact(method: str, per_step: int, grad: bool) -> None:
    calls = 0

    def counted(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return -x

    with torch.set_grad_enabled(grad):
        res = solve(counted, torch.ones(2, 3), method, num_steps=3)
    assert res.nfe == calls == 3 * per_step


@pytest.mark.parametrize("method", FIXED_STEP_METHODS + ("dopri5",))
@pytest.mark.parametrize("grad", [False, True], ids=["inplace", "autograd"])
def test_input_not_modified_and_batched_shapes(method: str, grad: bool) -> None:
    x0 = torch.randn(5, 16, 2, generator=torch.Generator().manual_seed(0))
    before = x0.clone()
    target = torch.linspace(-1, 1, 32).reshape(16, 2)

    def field(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        assert t.shape == (5,) and x.shape == (5, 16, 2)
        return target - x

    with torch.set_grad_enabled(grad):
        res = solve(field, x0, method, num_steps=4, return_trajectory=True)
    assert torch.equal(x0, before)
    assert res.x.shape == (5, 16, 2) and res.trajectory.shape == (5, 5, 16, 2)
    assert torch.equal(res.trajectory[0], before) and torch.equal(res.trajectory[-1], res.x)
    torch.testing.assert_close(res.times, torch.linspace(0, 1, 5))


def test_aliasing_velocity_is_safe() -> None:
    """A field returning its input tensor (or a reused buffer) must give the same result as a fresh one."""
    x0 = x0_batch()
    for method in FIXED_STEP_METHODS:
        with torch.no_grad():
            aliased = solve(lambda t, x: x, x0, method, 5).x
            fresh = solve(lambda t, x: x.clone(), x0, method, 5).x
        torch.testing.assert_close(aliased, fresh, rtol=0, atol=0)
        h = 1.0 / 5  # one step of x' = x multiplies by the method's Taylor polynomial of e^h
        growth = {"euler": 1 + h, "midpoint": 1 + h + h**2 / 2, "rk4": 1 + h + h**2 / 2 + h**3 / 6 + h**4 / 24}
        torch.testing.assert_close(aliased, x0 * growth[method] ** 5, rtol=1e-12, atol=0)


def test_inplace_and_autograd_paths_agree() -> None:
    x0 = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))
    for method in FIXED_STEP_METHODS:
        fast = solve(linear_ode, x0, method, 7, inplace=True).x
        slow = solve(linear_ode, x0, method, 7, inplace=False).x
        torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", FIXED_STEP_METHODS)
def test_gradients_flow_through_unrolled_solve(method: str) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    def field(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return net(torch.cat([x, t[:, None, None].expand(-1, x.shape[1], 1)], dim=-1))

    x0 = torch.randn(2, 4, 2, requires_grad=True)
    out = solve(field, x0, method, num_steps=3).x
    out.square().sum().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_unknown_method_and_bad_steps() -> None:
    with pytest.raises(ValueError, match="euler.*midpoint.*rk4.*dopri5"):
        solve(linear_ode, x0_batch(), "heun", 4)
    with pytest.raises(ValueError, match="positive integer"):
        solve(linear_ode, x0_batch(), "euler", 0)
    with pytest.raises(ValueError, match="unknown ODE method"):
        solve(linear_ode, x0_batch(), "ddim", 4)


def test_rk4_solve_counts_four_evaluations_per_step() -> None:
    res = solve(linear_ode, x0_batch(), "rk4", 8)
    assert res.nfe == 32
    torch.testing.assert_close(res.x, linear_ode_exact(x0_batch(), 0.0, 1.0), atol=1e-5, rtol=0)
    assert set(ADAPTIVE_METHODS) >= {"dopri5"}


def _compile_available() -> str | None:
    if not hasattr(torch, "compile"):
        return "torch.compile missing"
    try:
        torch.compile(lambda x: x + 1, backend="inductor")(torch.zeros(1))
    except Exception as exc:  # no C++ compiler, unsupported Python, ...
        return f"torch.compile unusable here: {type(exc).__name__}: {exc}"[:200]
    return None


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside torch
def test_compiled_euler_matches_eager() -> None:
    reason = _compile_available()
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2)).eval()

    def field(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return net(torch.cat([x, t[:, None, None].expand(-1, x.shape[1], 1)], dim=-1))

    def sample(x0: torch.Tensor) -> torch.Tensor:
        return euler(field, x0, num_steps=2).x

    x0 = torch.randn(2, 4, 2)
    start = time.perf_counter()
    with torch.no_grad():
        compiled = torch.compile(sample, fullgraph=True)(x0)  # fullgraph: any graph break is an error
        eager = sample(x0)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert time.perf_counter() - start < 90
