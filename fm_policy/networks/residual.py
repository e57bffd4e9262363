"""Contracting residual velocity fields r(t, x | cond), the refiners of `fm_policy.residual_policy` (v = v_pre + r).

Why (docs/finetuning.md, "The contracting residual" and "What is certified"): fine-tune a *frozen* pre-trained
field through an added residual whose Jacobian in x has a negative semi-definite symmetric part *by construction*,
i.e. for any value of its weights, so that no training step can make the residual itself amplify errors. Every
residual here acts on the flattened chunk x (B, d), d = horizon * action_dim, and is conditioned on the flow time
and the observation embedding only through terms that do not depend on x (so conditioning never breaks the bound).

Kinds and the exact guarantee each gives, with J = dr/dx and mu(J) = lambda_max((J + J^T) / 2):

* ``lure`` (a Lur'e-type network whose contraction LMI holds by construction; the default, see below):

      r = p(t, c) - (eps + a(t, c)) x + nu(t, c) [A x + B s(C x + b(t, c))],   s = tanh (slope in [0, 1])

  With a diagonal multiplier L > 0, the incremental quadratic constraint of a slope-[0, 1] nonlinearity turns
  "A x + B s(C x + b) contracts (rate >= 0) in the Euclidean metric" into the linear matrix inequality

      H = [[-(A + A^T), -(B + C^T L)], [-(B + C^T L)^T, 2 L]]  >= 0.

  Instead of constraining weights to it, free parameters K (d x m), Y (d x d), C (m x d), l (m) are *mapped* onto
  weights that satisfy it (a direct parameterisation, as for contracting recurrent-equilibrium networks, here with
  identity metric and no feedthrough, so there is no implicit layer to solve):

      L = diag(exp(l)),  S = (2 L)^(1/2),  A = -(K K^T + Y - Y^T) / 2,  B = -K S - C^T L,

  for which H = [K; S] [K; S]^T >= 0 for every parameter value. Hence mu(J) <= -(eps + a(t, c)) at every x, t, c and
  for every weight value, whatever the width m and the chunk size d. `eps` defaults to a strictly positive rate for
  this kind (see `ResidualConfig.eps`), a(t, c) = max(g, 0) softplus(...) is a learned extra rate gated like the
  damped kind's, nu = softplus(...) > 0 a time- and observation-dependent strength, and Y - Y^T a skew (rotation)
  part the monotone kind cannot express. All of K, Y, C and the drift head start at 0, so the residual starts at
  -eps x; each still gets a first-order gradient at 0 (A and B are linear in Y and K; s(b) != 0 feeds C).

* ``monotone`` ("viscous": a drift plus the negative gradient of a convex potential):

      r = p(t, c) - nu(t, c) W^T s(W x + b(t, c)) - eps x,    s(u) = beta u + (1 - beta) tanh(u),  s' in [beta, 1]

  J = -nu W^T diag(s') W - eps I is symmetric, so mu(J) <= -(eps + nu(t, c) beta sigma_min(W)^2) <= -eps for every
  W, b, p, nu > 0 (nu = softplus), x, t, c. sigma_min(W) is the d-th singular value of the (m x d) matrix W (0 when
  m < d). W and the drift head start at exactly 0, so the residual starts at -eps x (exactly 0 with the default
  eps = 0); W still gets a first-order gradient at 0 because s(b) != 0 for the random initial bias network.

* ``damped`` (damped Lipschitz residual):

      r = p(t, c) - k(t, c) [ x - rho h(t, x, c) ] - eps x,      Lip_x(h) <= 1,  rho = lip_ratio < 1

  i.e. -k (x - m) + g with m = p / k and g = k rho h, Lip_x(g) <= rho k < k, but with the drift p not gated by k: a
  shift of the sampler can then be learned before (or without) any damping, which the k-gated form cannot do.

  h = W2 tanh(W1 x + b1(t, c)) / (||W1||_2 ||W2||_2) with the *exact* spectral norms (an SVD of two small matrices per
  call; power iteration, as in torch's spectral_norm, under-estimates the norm and would not give a guarantee).
  Hence mu(J) <= -(eps + (1 - rho) k(t, c)) <= -eps for every weight value. k = gamma * softplus(a(t, c)) with a
  scalar gate gamma = max(g, 0) that starts at g = 0, so the residual starts at -eps x (exactly 0 when eps = 0). The
  gate's gradient is passed straight through (as if gamma = g), so the gate cannot get stuck at 0 when the loss
  first pushes it negative; its forward value is never negative, which is all the guarantee needs.

* ``free`` (ablation, no guarantee): an MLP of (x, time embedding, cond) with a zero output layer.

The x-independent drift p(t, c) does not enter J, so it is free: it plays the role of the exogenous input of the
residual system in the input-to-state-stability view (docs/finetuning.md, "The contracting residual").

Limitation (measured on a toy problem, see tests/test_mle_finetune.py): because mu(dv/dx) can only go *down* when a
contracting residual is added, the residual cannot make the sampler more expansive. With the inversion pairing and
1 Euler step, the pre-trained decode z -> z + v(0, z) is nearly constant in z (it returns about the conditional mean),
and the correction it needs is an expansion, so a contracting residual barely helps at N = 1 (full fine-tuning or a
`free` residual does); at N >= 2-4 it does reduce the reconstruction error.

Zero init and a strictly positive guaranteed rate are incompatible for *any* parameterisation: a field that is
identically 0 has J = 0. So `eps` is the rate that holds from the first step on. For ``monotone``, ``damped`` and
``free`` it defaults to 0: the residual is exactly zero at init (the residual policy then reproduces the base policy
bit for bit) and its learned rate (`guaranteed_rate`) grows from 0 as W / the gate move away from zero (for
``monotone`` only if width >= d: its rate is 0 whenever width < horizon * action_dim). ``lure`` defaults to
eps = DEFAULT_EPS["lure"] > 0 for every chunk size, at the price of starting at -eps x instead of 0.

`guaranteed_rate(t, cond)` returns the certified per-sample rate, which `fm_policy.finetune.contraction` compares
with measured Jacobians.

Why ``lure`` is the default kind: it is the only one whose certificate is strictly positive for every chunk size
d at its defaults (``monotone`` certifies 0 whenever width < d, which is every task but Push-T at width 64, and
starts at eps = 0), so "the refiner contracts" holds for whatever task a user fine-tunes without picking settings.
The price is a start at -eps x instead of 0: the residual policy does not reproduce the base policy bit for bit at
init (``monotone`` does; choose it with ``residual.kind=monotone`` when that matters). On the 2-D toy of
tests/test_mle_finetune.py neither kind is better at every step count and budget (docs/finetuning.md); the Push-T
benchmark of docs/results/finetuning.md uses ``lure``.

Caveat (docs/finetuning.md, "What is certified"): contraction of r alone does not make v_pre + r contracting; that needs the residual's rate to
exceed the base field's positive log-norm (measure both with `fm_policy.finetune.contraction`). A very stiff residual
also needs small enough Euler steps (dt * ||J|| <~ 1-2), so keep eps modest at 1-step inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fm_policy.config import ConfigError
from fm_policy.networks.embeddings import SinusoidalTimeEmbedding

RESIDUAL_KINDS: tuple[str, ...] = ("lure", "monotone", "damped", "free")
PLACEMENTS: tuple[str, ...] = ("velocity", "terminal")
# the contraction rate each kind guarantees for all weights when `eps` is not set (lure: > 0 for every chunk size)
DEFAULT_EPS: dict[str, float] = {"lure": 0.1, "monotone": 0.0, "damped": 0.0, "free": 0.0}
_SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(_SOFTPLUS_ONE) == 1: scale heads start at 1



@dataclass
class ResidualConfig:
    """Architecture of the residual field; saved in the residual policy's config.json under "residual"."""

    # lure (LMI by construction, positive rate by default) | monotone | damped | free (ablation, no guarantee)
    kind: str = "lure"
    width: int = 64  # lure/monotone: nonlinear units m (monotone needs m >= d for a learned rate); damped/free: hidden
    cond_hidden: int = 128  # conditioning MLP of (time embedding, obs embedding)
    time_embed_dim: int = 32
    # contraction rate guaranteed for all weights (flow-time units, normalised actions); > 0 means the residual starts
    # at -eps x, not 0. None: the kind's default, DEFAULT_EPS (lure 0.1, the others 0)
    eps: float | None = None
    slope_min: float = 0.1  # monotone: slope range [slope_min, 1] of s, so the learned rate is >= 0 beta sigma_min^2
    lip_ratio: float = 0.5  # damped: Lip_x(g) <= lip_ratio * k, rate (1 - lip_ratio) k
    # velocity: v = v_pre + r throughout the flow | terminal: the base flow unchanged, then refine_steps Euler steps
    # of dx/ds = r(s, x | c), s in [0, 1], a contracting refinement stage after the few-step flow
    placement: str = "velocity"
    refine_steps: int = 2  # terminal placement only

    def validate(self) -> None:
        if self.kind not in RESIDUAL_KINDS:
            raise ConfigError(f"residual.kind '{self.kind}' is unknown; choose one of {list(RESIDUAL_KINDS)}")
        if self.width < 1 or self.cond_hidden < 1:
            raise ConfigError("residual.width and residual.cond_hidden must be >= 1")
        if self.time_embed_dim < 4 or self.time_embed_dim % 2:
            raise ConfigError(f"residual.time_embed_dim must be even and >= 4, got {self.time_embed_dim}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"residual.placement '{self.placement}' is unknown; choose one of {list(PLACEMENTS)}")
        if self.refine_steps < 1:
            raise ConfigError(f"residual.refine_steps must be >= 1, got {self.refine_steps}")
        if self.eps is not None and self.eps < 0:
            raise ConfigError(f"residual.eps must be >= 0, got {self.eps}")
        if not 0.0 <= self.slope_min <= 1.0:
            raise ConfigError(f"residual.slope_min must be in [0, 1], got {self.slope_min}")
        if not 0.0 <= self.lip_ratio < 1.0:
            raise ConfigError(f"residual.lip_ratio must be in [0, 1), got {self.lip_ratio}")

    @property
    def rate_floor(self) -> float:
        """The rate guaranteed for every weight value: `eps`, or the kind's default when it is None."""
        return DEFAULT_EPS.get(self.kind, 0.0) if self.eps is None else float(self.eps)


class _Conditioner(nn.Module):
    """(t, cond) -> features: sinusoidal time embedding and the obs embedding through a 2-layer SiLU MLP."""

    def __init__(self, cond_dim: int, hidden: int, time_embed_dim: int) -> None:
        super().__init__()
        self.time_embed = SinusoidalTimeEmbedding(time_embed_dim, scale=1000.0)  # same t scale as the base nets
        self.mlp = nn.Sequential(nn.Linear(time_embed_dim + cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU())

    def forward(self, t: Tensor, cond: Tensor) -> Tensor:
        return self.mlp(torch.cat([self.time_embed(t).to(cond.dtype), cond], dim=-1))


def _scale_head(hidden: int) -> nn.Linear:
    """A head whose softplus starts at exactly 1 for every input (zero weights, bias softplus^-1(1))."""
    head = nn.Linear(hidden, 1)
    nn.init.zeros_(head.weight)
    nn.init.constant_(head.bias, _SOFTPLUS_ONE)
    return head


def _zero_head(hidden: int, out: int) -> nn.Linear:
    """A linear head that outputs exactly 0 at init and still gets a gradient (its input features are not 0)."""
    head = nn.Linear(hidden, out)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class _StraightThroughReLU(torch.autograd.Function):
    """max(g, 0) forward, identity backward: a non-negative gate that a negative step cannot freeze."""

    @staticmethod
    def forward(ctx: Any, g: Tensor) -> Tensor:
        return g.clamp(min=0.0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


class ResidualField(nn.Module):
    """Base class: r(t (B,), x (B, H, A), cond (B, C)) -> (B, H, A); `guaranteed_rate` -> (B,) or None."""

    def __init__(self, horizon: int, action_dim: int, cond_dim: int, config: ResidualConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.chunk_shape = (horizon, action_dim)
        self.dim = horizon * action_dim
        self.cond_dim = cond_dim
        self.eps = config.rate_floor

    def forward(self, t: Tensor, x: Tensor, cond: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], self.dim)
        return self.flat(t, flat, cond).reshape(x.shape)

    def flat(self, t: Tensor, x: Tensor, cond: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The residual on flattened chunks x (B, d)."""
        raise NotImplementedError

    def guaranteed_rate(self, t: Tensor, cond: Tensor) -> Tensor | None:  # pragma: no cover - abstract
        """Per-sample c with lambda_max(sym(dr/dx)) <= -c at every x, for the current weights (None: no bound)."""
        raise NotImplementedError


class MonotoneResidual(ResidualField):
    """r = p(t, c) - nu(t, c) W^T s(W x + b(t, c)) - eps x (see the module docstring for the guarantee)."""

    def __init__(self, horizon: int, action_dim: int, cond_dim: int, config: ResidualConfig) -> None:
        super().__init__(horizon, action_dim, cond_dim, config)
        self.cond_net = _Conditioner(cond_dim, config.cond_hidden, config.time_embed_dim)
        self.weight = nn.Parameter(torch.zeros(config.width, self.dim))  # W = 0: r starts at -eps x
        self.bias_head = nn.Linear(config.cond_hidden, config.width)  # random: s(b) != 0, so W learns at once
        self.scale_head = _scale_head(config.cond_hidden)
        self.drift_head = _zero_head(config.cond_hidden, self.dim)

    def _activation(self, u: Tensor) -> Tensor:
        beta = self.config.slope_min
        return beta * u + (1.0 - beta) * torch.tanh(u)

    def flat(self, t: Tensor, x: Tensor, cond: Tensor) -> Tensor:
        h = self.cond_net(t, cond)
        nu = F.softplus(self.scale_head(h))  # (B, 1), > 0
        pre = x @ self.weight.T + self.bias_head(h)  # (B, m)
        out = self.drift_head(h) - nu * (self._activation(pre) @ self.weight)
        return out - self.eps * x if self.eps else out

    def guaranteed_rate(self, t: Tensor, cond: Tensor) -> Tensor:
        nu = F.softplus(self.scale_head(self.cond_net(t, cond))).squeeze(-1)
        svals = torch.linalg.svdvals(self.weight)  # min(m, d) values, descending
        sigma_min = svals[-1] if self.weight.shape[0] >= self.dim else svals.new_zeros(())
        return self.eps + nu * self.config.slope_min * sigma_min.square()


class DampedLipschitzResidual(ResidualField):
    """r = p(t, c) - k(t, c) [x - rho h(t, x, c)] - eps x with Lip_x(h) <= 1 exactly (module docstring)."""

    _NORM_FLOOR = 1e-6  # dividing by max(||W||, floor) keeps Lip <= 1 and avoids 0/0 for a vanishing matrix

    def __init__(self, horizon: int, action_dim: int, cond_dim: int, config: ResidualConfig) -> None:
        super().__init__(horizon, action_dim, cond_dim, config)
        self.cond_net = _Conditioner(cond_dim, config.cond_hidden, config.time_embed_dim)
        self.drift_head = _zero_head(config.cond_hidden, self.dim)
        self.in_bias_head = nn.Linear(config.cond_hidden, config.width)
        self.w1 = nn.Parameter(torch.empty(config.width, self.dim))
        self.w2 = nn.Parameter(torch.empty(self.dim, config.width))
        nn.init.orthogonal_(self.w1)
        nn.init.orthogonal_(self.w2)
        self.rate_head = _scale_head(config.cond_hidden)
        self.gate = nn.Parameter(torch.zeros(()))  # k = max(gate, 0) softplus(a): exactly 0 at init

    def _k(self, h: Tensor) -> Tensor:
        return _StraightThroughReLU.apply(self.gate) * F.softplus(self.rate_head(h))  # (B, 1), >= 0

    def _lipschitz_part(self, x: Tensor, h: Tensor) -> Tensor:
        n1 = torch.linalg.matrix_norm(self.w1, ord=2).clamp_min(self._NORM_FLOOR)
        n2 = torch.linalg.matrix_norm(self.w2, ord=2).clamp_min(self._NORM_FLOOR)
        hidden = torch.tanh(x @ self.w1.T + self.in_bias_head(h))
        return (hidden @ self.w2.T) / (n1 * n2)

    def flat(self, t: Tensor, x: Tensor, cond: Tensor) -> Tensor:
        h = self.cond_net(t, cond)
        inner = x - self.config.lip_ratio * self._lipschitz_part(x, h)
        out = self.drift_head(h) - self._k(h) * inner
        return out - self.eps * x if self.eps else out

    def guaranteed_rate(self, t: Tensor, cond: Tensor) -> Tensor:
        k = self._k(self.cond_net(t, cond)).squeeze(-1)
        return self.eps + (1.0 - self.config.lip_ratio) * k


class LureResidual(ResidualField):
    """r = p - (eps + a) x + nu [A x + B tanh(C x + b)] with (A, B, C) a direct parameterisation of the contraction
    LMI (module docstring): mu(dr/dx) <= -(eps + a(t, c)) for every weight value and every chunk size."""

    def __init__(self, horizon: int, action_dim: int, cond_dim: int, config: ResidualConfig) -> None:
        super().__init__(horizon, action_dim, cond_dim, config)
        d, m = self.dim, config.width
        self.cond_net = _Conditioner(cond_dim, config.cond_hidden, config.time_embed_dim)
        self.drift_head = _zero_head(config.cond_hidden, d)
        self.bias_head = nn.Linear(config.cond_hidden, m)  # random: tanh(b) != 0, so C and K learn at once
        self.scale_head = _scale_head(config.cond_hidden)  # nu starts at 1
        self.rate_head = _scale_head(config.cond_hidden)
        self.gate = nn.Parameter(torch.zeros(()))  # learned extra rate a = max(gate, 0) softplus(.): 0 at init
        self.k = nn.Parameter(torch.zeros(d, m))
        self.y = nn.Parameter(torch.zeros(d, d))
        self.c = nn.Parameter(torch.zeros(m, d))
        self.log_multiplier = nn.Parameter(torch.zeros(m))  # L = diag(exp(l))

    def weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """(A (d, d), B (d, m), C (m, d)) of the current parameters; they satisfy the LMI by construction."""
        lam = torch.exp(self.log_multiplier)
        s = torch.sqrt(2.0 * lam)
        a = -0.5 * (self.k @ self.k.T + self.y - self.y.T)
        b = -(self.k * s) - self.c.T * lam
        return a, b, self.c

    def lmi_matrix(self) -> Tensor:
        """H = [[-(A + A^T), -(B + C^T L)], [., 2 L]] (d + m square); >= 0 is the contraction certificate."""
        a, b, c = self.weights()
        lam = torch.exp(self.log_multiplier)
        off = -(b + c.T * lam)
        return torch.cat([torch.cat([-(a + a.T), off], 1), torch.cat([off.T, torch.diag(2.0 * lam)], 1)], 0)

    def _rate(self, h: Tensor) -> Tensor:
        return _StraightThroughReLU.apply(self.gate) * F.softplus(self.rate_head(h))  # (B, 1), >= 0

    def flat(self, t: Tensor, x: Tensor, cond: Tensor) -> Tensor:
        h = self.cond_net(t, cond)
        a, b, c = self.weights()
        nu = F.softplus(self.scale_head(h))  # (B, 1), > 0
        network = x @ a.T + torch.tanh(x @ c.T + self.bias_head(h)) @ b.T
        damping = self._rate(h) + self.eps if self.eps else self._rate(h)
        return self.drift_head(h) - damping * x + nu * network

    def guaranteed_rate(self, t: Tensor, cond: Tensor) -> Tensor:
        return self.eps + self._rate(self.cond_net(t, cond)).squeeze(-1)


class FreeResidual(ResidualField):
    """Unconstrained MLP residual (ablation: what the contracting kinds are compared against); no guarantee."""

    def __init__(self, horizon: int, action_dim: int, cond_dim: int, config: ResidualConfig) -> None:
        super().__init__(horizon, action_dim, cond_dim, config)
        self.time_embed = SinusoidalTimeEmbedding(config.time_embed_dim, scale=1000.0)
        width = config.width
        self.body = nn.Sequential(nn.Linear(self.dim + config.time_embed_dim + cond_dim, width), nn.SiLU(),
                                  nn.Linear(width, width), nn.SiLU())
        self.out = nn.Linear(width, self.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def flat(self, t: Tensor, x: Tensor, cond: Tensor) -> Tensor:
        out = self.out(self.body(torch.cat([x, self.time_embed(t).to(x.dtype), cond], dim=-1)))
        return out - self.eps * x if self.eps else out

    def guaranteed_rate(self, t: Tensor, cond: Tensor) -> None:
        return None


_RESIDUALS: dict[str, type[ResidualField]] = {
    "lure": LureResidual,
    "monotone": MonotoneResidual,
    "damped": DampedLipschitzResidual,
    "free": FreeResidual,
}


def build_residual(config: ResidualConfig, horizon: int, action_dim: int, cond_dim: int) -> ResidualField:
    """The residual field of `config.kind` for chunks (horizon, action_dim) and a cond_dim-wide condition."""
    config.validate()
    return _RESIDUALS[config.kind](horizon, action_dim, cond_dim, config)
