"""How flow-matching training pairs noise draws with action chunks (the coupling), and how straight the learned
paths come out.

The linear path trains on pairs (x0, x1): x0 a noise draw, x1 a normalised demo chunk. Which noise goes with which
chunk is the coupling:

- `independent` (the default): each chunk keeps the fresh N(0, I) draw made for it. The marginal field it teaches
  carries N(0, I) to the data; paths of different pairs cross, so the field curves and few-step sampling pays for it.
- `ot`: minibatch optimal transport. The batch's noise draws are permuted among its samples so that the total
  squared distance between paired noise and chunk is smallest (exact assignment, `ot_pair`). Paired points lie
  closer, conditional paths cross less, the regression target x1 - x0 varies less at a given x_t, and the learned
  field is straighter (shorter ODE paths, see `ode_path_length`).

A conditional policy needs care. Every (observation, chunk) pair keeps its own observation; only the noise draws move.
Each draw is still N(0, I), but which draw a sample receives now depends on its chunk, and so on its observation:
given the observation, the noise is no longer N(0, I) (it leans toward that observation's demo chunk), whereas at
deployment the sampler starts from N(0, I) drawn independently of the observation. Plain minibatch OT over a batch
of distinct observations thus trains the field from a start distribution it never sees when it acts. The cost
therefore also charges for moving a draw between observations:

    cost[j, i] = |m_j * (x1_j - x0_i)|^2 / (horizon * action_dim) + cond_weight * |c_j - c_i|^2 / cond_dim

for giving noise draw i (made for sample i, observation features c_i) to sample j (chunk x1_j, pad mask m_j), with
c the normalised observation features the network is conditioned on. Keeping its own draw costs a sample nothing
in observation terms, so the identity assignment is always feasible and the result never raises the transport cost.

- `cond_weight = 0`: plain minibatch OT; the straightest paths, and the largest bias of the noise given the
  observation.
- Larger `cond_weight`: draws move only between samples whose observations are close (a swap costs `cond_weight`
  times their per-feature mean squared distance). Among samples with identical observations swaps stay free, and
  there the noise given the observation remains exactly N(0, I) (the samples are exchangeable).
- Very large `cond_weight`: the independent coupling whenever all observations in the batch differ, which is the
  usual case (one demo chunk per observation window), so the straightening disappears with the bias.

The weight trades straighter paths against a start distribution that matches deployment. The default (10) is the
cautious end: a draw moves only when the chunk-distance saving per element exceeds ten times the observations' mean
squared feature difference, i.e. between near-identical observations (on Push-T keypoint windows, a small fraction
of the draws move); lower it (1-3) for straighter paths at more bias, or 0 for plain minibatch OT.

Cost: an exact assignment is O(B^3) on the CPU (one host sync per batch; a few ms at B = 256), solved within
each process's share of the batch and each micro-batch, so with `coupling=ot` runs on different process counts or
`loop.grad_accum_steps` no longer draw identical pairs (they still resume exactly).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fm_policy.config import ConfigError

COUPLINGS: tuple[str, ...] = ("independent", "ot")


def check_coupling(kind: str, cond_weight: float, prefix: str = "policy.") -> None:
    """ConfigError for an unknown coupling or a bad observation weight (`prefix` names the config section)."""
    if kind not in COUPLINGS:
        raise ConfigError(f"{prefix}coupling '{kind}' is unknown; choose one of {list(COUPLINGS)}")
    if isinstance(cond_weight, bool) or not isinstance(cond_weight, (int, float)) or not math.isfinite(cond_weight) \
            or cond_weight < 0:
        raise ConfigError(f"{prefix}coupling_cond_weight must be a finite number >= 0, got {cond_weight!r}")


def transport_cost(noise: Tensor, actions: Tensor, obs_condition: Tensor | None = None, mask: Tensor | None = None,
                   cond_weight: float = 0.0) -> Tensor:
    """(B, B) float64 cost of giving noise draw i to sample j, at [j, i] (formula in the module docstring).

    noise, actions: (B, horizon, action_dim) (any (B, ...) shape); mask: bool (B, horizon), True for real steps, so
    padded steps, which the loss ignores, do not steer the pairing; obs_condition: (B, cond_dim) features.
    """
    if noise.shape != actions.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != actions shape {tuple(actions.shape)}")
    x0 = noise.detach().flatten(1).double()
    x1 = actions.detach().flatten(1).double()
    if mask is None:
        m = torch.ones_like(x1)
    else:
        if mask.shape != actions.shape[: mask.ndim]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match the leading dims of {tuple(actions.shape)}")
        m = mask.detach().reshape(mask.shape + (1,) * (actions.ndim - mask.ndim)).expand_as(actions)
        m = m.flatten(1).to(x1.dtype)
    # sum_k m_jk (x1_jk - x0_ik)^2 expanded: no (B, B, K) tensor
    cost = (m * x1.square()).sum(1, keepdim=True) - 2.0 * (m * x1) @ x0.T + m @ x0.square().T
    cost = cost.clamp_min(0.0) / x1.shape[1]
    if obs_condition is not None and cond_weight > 0:
        c = obs_condition.detach().flatten(1).double()
        if c.shape[0] != x1.shape[0]:
            raise ValueError(f"obs_condition has batch {c.shape[0]}, actions {x1.shape[0]}")
        cost = cost + cond_weight * torch.cdist(c, c).square() / c.shape[1]
    return cost


def ot_pair(noise: Tensor, actions: Tensor, obs_condition: Tensor | None = None, mask: Tensor | None = None,
            cond_weight: float = 0.0) -> Tensor:
    """The minibatch-OT permutation: sample j is paired with noise[perm[j]] (a long tensor on noise's device).

    Exact assignment (`scipy.optimize.linear_sum_assignment`) on `transport_cost`; the identity is a feasible
    assignment of zero observation cost, so the paired batch's transport cost is never above the independent one.
    """
    from scipy.optimize import linear_sum_assignment

    cost = transport_cost(noise, actions, obs_condition, mask, cond_weight)
    if not torch.isfinite(cost).all():
        raise ValueError("ot coupling: the transport cost is not finite (NaN or inf in the actions or observations)")
    _, cols = linear_sum_assignment(cost.cpu().numpy())  # rows come back as 0..B-1, in order
    return torch.as_tensor(cols, dtype=torch.long, device=noise.device)


def couple_noise(noise: Tensor, actions: Tensor, obs_condition: Tensor | None, mask: Tensor | None,
                 coupling: str = "independent", cond_weight: float = 0.0) -> Tensor:
    """The noise each sample trains with under `coupling`: `noise` itself (independent, no extra work and no random
    draw, so runs are unchanged) or its rows permuted by `ot_pair`."""
    if coupling == "independent":
        return noise
    if coupling == "ot":
        return noise[ot_pair(noise, actions, obs_condition, mask, cond_weight)]
    raise ConfigError(f"coupling '{coupling}' is unknown; choose one of {list(COUPLINGS)}")


@torch.no_grad()
def ode_path_length(policy: Any, obs: dict[str, Tensor], num_steps: int = 100, seed: int = 0) -> dict[str, float]:
    """Average length of the Euler path noise -> action chunk and its straightness (length / |x1 - x0|, 1 = a
    straight line): a proxy for how easy few-step inference is, and what a straighter coupling should lower.
    Measured in env action units (the chunk flattened), because policies trained from scratch have their own
    normalisers, so normalised lengths would not be comparable across them."""
    from fm_policy.flow_matching import sample_noise
    from fm_policy.solvers import solve

    cond = policy.encode_obs(obs)
    shape = (cond.shape[0], policy.config.horizon, policy.config.action_dim)
    x0 = sample_noise(shape, generator=torch.Generator().manual_seed(seed)).to(cond.device)
    traj = solve(lambda t, x: policy.velocity(t, x, cond), x0, "euler", num_steps, return_trajectory=True).trajectory
    traj = policy.normalizer.unnormalize("action", traj.reshape(-1, *shape[1:])).reshape(traj.shape)
    steps = (traj[1:] - traj[:-1]).flatten(2).norm(dim=-1)  # (num_steps, B)
    length = steps.sum(0)
    displacement = (traj[-1] - traj[0]).flatten(1).norm(dim=-1)
    return {"path_length": float(length.mean()), "straightness": float((length / displacement).mean())}
