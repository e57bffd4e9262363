"""Flow matching for action chunks: the probability path, training-time sampling, and the loss.

Time convention (the ONE convention of the whole package):

    t = 0 is noise, t = 1 is data.

    x_t = (1 - t) * x0 + t * x1,    x0 ~ N(0, I) (noise),  x1 = the normalised data chunk
    u   = d x_t / dt = x1 - x0       (the target velocity of the linear / rectified-flow path)

So sampling integrates dx/dt = v(t, x) forward from t = 0 (Gaussian noise) to t = 1 (an action chunk), and
encoding a chunk to its noise integrates backward from 1 to 0 (`fm_policy.solvers` does both). Papers and code
bases differ here: pi0 / openpi / LeRobot and SD3 put noise at t = 1 and write x_t = t * noise + (1 - t) * data,
with the velocity pointing from data to noise; their time s is our 1 - t and their velocity is minus ours. The
`TimeSampler` docstring says how their time-sampling parameters map onto ours.

The module follows the path / solver split of Meta's `flow_matching` library: `LinearPath` only says how x_t and
the target are built from (x0, x1, t); how the learned field is integrated lives in `fm_policy.solvers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fm_policy.distributed import per_sample

TimeKind = Literal["uniform", "logit_normal", "beta"]
TIME_KINDS: tuple[str, ...] = ("uniform", "logit_normal", "beta")


def sample_noise(
    shape: tuple[int, ...] | torch.Size,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The source distribution x0 ~ N(0, I), for training and inference alike.

    Always Gaussian: the path is trained from N(0, I), so starting inference anywhere else (uniform noise, zeros)
    feeds the field inputs it never saw at t = 0. Pass `generator` for reproducible samples.
    """
    if generator is not None or len(shape) == 0:
        return torch.randn(shape, device=device, dtype=dtype, generator=generator)
    rest = tuple(shape[1:])  # one row per sample: a data-parallel process keeps its rows of the global draw
    return per_sample(lambda n: torch.randn((n, *rest), device=device, dtype=dtype), int(shape[0]))


def _expand_time(t: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so one time per sample broadcasts over the chunk's remaining dimensions."""
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim)).to(like.dtype)


@dataclass(frozen=True)
class LinearPath:
    """The linear (rectified-flow / optimal-transport conditional) path x_t = (1 - t) x0 + t x1, target x1 - x0.

    The target velocity does not depend on t, so training never divides by (1 - t) and any t in [0, 1] is safe;
    only the *exact* marginal field of a single data point, (x1 - x) / (1 - t), is singular at t = 1.
    """

    def sample(self, x1: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Point on the path and its target velocity: x1 (B, ...) data, t (B,) in [0, 1], noise (B, ...) = x0."""
        if noise.shape != x1.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != data shape {tuple(x1.shape)}")
        if t.ndim != 1 or t.shape[0] != x1.shape[0]:
            raise ValueError(f"t must have shape ({x1.shape[0]},), got {tuple(t.shape)}")
        tt = _expand_time(t, x1)
        x_t = torch.lerp(noise, x1, tt)  # (1 - t) * x0 + t * x1 in one kernel
        return x_t, x1 - noise

    @staticmethod
    def data_from_velocity(x_t: Tensor, velocity: Tensor, t: Tensor) -> Tensor:
        """The data end point the path would reach from x_t: x1 = x_t + (1 - t) v (one Euler step to t = 1)."""
        return x_t + (1.0 - _expand_time(t, x_t)) * velocity

    @staticmethod
    def noise_from_velocity(x_t: Tensor, velocity: Tensor, t: Tensor) -> Tensor:
        """The noise start point of the path through x_t: x0 = x_t - t v."""
        return x_t - _expand_time(t, x_t) * velocity


@dataclass
class TimeSampler:
    """Distribution of the training time t in [0, 1] (t = 0 noise, t = 1 data), one draw per sample.

    kinds:
    - `uniform`: t ~ U(0, 1) (rectified flow, Lipman et al.).
    - `logit_normal`: t = sigmoid(logit_mean + logit_std * z), z ~ N(0, 1) (SD3). Mean 0 concentrates on mid
      times. SD3 puts noise at t = 1, so its `m` is our `logit_mean = -m` (std unchanged).
    - `beta`: t ~ Beta(beta_alpha, beta_beta) on OUR time. openpi / LeRobot's pi0 draw their time s ~ Beta(1.5, 1)
      with s = 1 as noise; since t = 1 - s and 1 - Beta(a, b) = Beta(b, a), the same distribution here is
      Beta(1, 1.5) (the defaults): density 1.5 (1 - t)^0.5, mean 0.4, i.e. more weight on the noise side, where
      the velocity is hardest to predict. (pi0 also caps s >= 0.001, i.e. t <= 0.999; `eps=1e-3` is the
      symmetric version.)

    `eps` > 0 maps the draw affinely into [eps, 1 - eps] (keeping its shape), for objectives or velocity
    parameterisations that divide by t or (1 - t); the plain linear-path loss needs no eps.
    """

    kind: TimeKind = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    beta_alpha: float = 1.0
    beta_beta: float = 1.5
    eps: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in TIME_KINDS:
            raise ValueError(f"unknown time sampler kind '{self.kind}'; choose one of {TIME_KINDS}")
        if self.logit_std <= 0 or self.beta_alpha <= 0 or self.beta_beta <= 0:
            raise ValueError("logit_std, beta_alpha and beta_beta must be positive")
        if not 0.0 <= self.eps < 0.5:
            raise ValueError(f"eps must be in [0, 0.5), got {self.eps}")

    def sample(
        self, batch_size: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """(batch_size,) float32 times in [0, 1] ([eps, 1 - eps] when eps > 0), reproducible with `generator`."""
        if generator is None:  # a data-parallel process keeps its rows of the global batch's draw
            return per_sample(lambda n: self._sample((n,), device, None), batch_size)
        return self._sample((batch_size,), device, generator)

    def _sample(self, shape: tuple[int], device: torch.device | str | None, generator: torch.Generator | None) -> Tensor:
        if self.kind == "uniform":
            t = torch.rand(shape, device=device, generator=generator)
        elif self.kind == "logit_normal":
            z = torch.randn(shape, device=device, generator=generator)
            t = torch.sigmoid(z * self.logit_std + self.logit_mean)
        else:
            # Beta(a, b) = Ga / (Ga + Gb) with Ga ~ Gamma(a), Gb ~ Gamma(b). torch.distributions.Beta takes no
            # generator, so we draw the gammas directly (the same primitive torch.distributions uses) to keep
            # training runs reproducible from a seeded generator.
            ga = torch._standard_gamma(torch.full(shape, self.beta_alpha, device=device), generator=generator)
            gb = torch._standard_gamma(torch.full(shape, self.beta_beta, device=device), generator=generator)
            t = ga / (ga + gb)
        if self.eps > 0:
            t = t * (1.0 - 2.0 * self.eps) + self.eps
        return t


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of `values` (B, T, ...) over the real (unpadded) elements only, in float32.

    mask: bool (B, T) (or any leading shape of values), True for real action steps; chunks cut at an episode end are
    padded and those steps must not teach the model anything. The mean is over the real elements of the whole batch,
    so a sample's weight is proportional to its number of real steps. An all-padded batch gives 0 (not NaN). Every
    per-element loss in the package (flow matching, the MLE objective's NLL and reconstruction error) reduces here.
    """
    values = values.float()
    if mask is None:
        return values.mean()
    if mask.shape != values.shape[: mask.ndim]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the leading dims of {tuple(values.shape)}")
    m = mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim)).to(values.dtype)
    count = m.expand_as(values).sum()  # real elements (a broadcast view: no (B, T, D) mask is materialised)
    return (values * m).sum() / count.clamp_min(1.0)  # clamp, not `if`: no host sync, all-padded batch -> 0


def flow_matching_loss(pred_velocity: Tensor, target_velocity: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between predicted and target velocities over real elements (see `masked_mean`).

    Computed in float32 even when the prediction is bf16/fp16, because the squared error of small velocity residuals
    underflows/rounds badly in half precision.
    """
    if pred_velocity.shape != target_velocity.shape:
        raise ValueError(f"prediction {tuple(pred_velocity.shape)} != target {tuple(target_velocity.shape)}")
    return masked_mean((pred_velocity.float() - target_velocity.float()).square(), mask)
