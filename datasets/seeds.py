"""Seed derivations: one place, so collection, evaluation, deployment, benchmarks and tests agree on every seed.

Demonstrations: candidate episode i of a dataset with seed S starts from env seed S + i; its planner seed comes from
(S, i), so demos differ in strategy and not only in their start; a failed attempt is retried with a planner seed
derived from the first one, because the expert's failures are long, unlucky push sequences rather than unsolvable
starts.

Evaluation: the initial noise of a test episode comes from its own generator, seeded by `episode_noise_seed(torch
seed, env seed)`, so an episode sees the same noise under every step-count setting, for any number of envs or
workers, and in the deployment controller (which replays an episode through the policy server). Disturbances
(`fm_policy.eval.disturbances`) draw from per-episode streams of `episode_disturbance_seed`, for the same reason.
"""

from __future__ import annotations

import numpy as np


def retry_planner_seed(planner_seed: int, attempt: int) -> int:
    """Planner seed of retry `attempt` (0 = `planner_seed` itself): a fixed hash of (planner_seed, attempt)."""
    if attempt == 0:
        return planner_seed
    return int(np.random.SeedSequence([planner_seed, attempt]).generate_state(1)[0])


def planner_seed_for(seed: int, index: int, attempt: int = 0) -> int:
    """Planner seed of candidate `index` of a dataset with seed `seed`, at retry `attempt`."""
    first = int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])
    return retry_planner_seed(first, attempt)


def episode_noise_seed(torch_seed: int, env_seed: int) -> int:
    """Seed of the per-episode noise generator of test episode `env_seed` under run seed `torch_seed`."""
    return (int(torch_seed) * 1_000_003 + int(env_seed)) % (2**63 - 1)


def episode_disturbance_seed(disturbance_seed: int, env_seed: int, stream: int) -> int:
    """Seed of one disturbance stream (observation noise, shove, initial-noise offset) of test episode `env_seed`.

    Separate streams, so turning one disturbance on never changes the draws of another, and keyed by the env seed
    only (not by the step-count setting or the batch), so an episode is disturbed identically under every setting.
    """
    state = np.random.SeedSequence([int(disturbance_seed), int(env_seed), int(stream)]).generate_state(2)
    return (int(state[0]) << 31 ^ int(state[1])) % (2**63 - 1)
