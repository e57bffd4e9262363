"""Checking the actions an env is stepped with: the one place every wrapper shares.

A NaN, a wrong shape or a non-numeric action is a bug in the caller (a policy, a controller); stepping the simulator
with it would silently corrupt an episode, so it raises with the env's name and what the action means. In-range
clipping is not an error: policies overshoot the box slightly and the simulators clip anyway.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def checked_action(action: Any, dim: int, owner: str, meaning: str, low: float, high: float) -> np.ndarray:
    """A float64 copy of `action`, shape (dim,), finite, clipped to [low, high]; ValueError naming `owner` otherwise.

    `meaning` says what the numbers are (e.g. "target (x, y)", "joint velocities") for the error message.
    """
    try:
        act = np.array(action, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{owner} action must be {dim} numbers ({meaning}), got {action!r}") from err
    if act.shape != (dim,):
        raise ValueError(f"{owner} action must have shape ({dim},) = {meaning}, got shape {act.shape}: {action!r}")
    if not np.all(np.isfinite(act)):
        raise ValueError(f"{owner} action must be finite, got {act.tolist()}")
    return np.clip(act, low, high)
