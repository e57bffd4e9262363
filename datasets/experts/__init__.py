"""Scripted / planning experts that generate demonstrations (design: docs/experts.md)."""

from .kitchen import KitchenExpert, KitchenExpertConfig
from .pusht import (
    PushTExpert,
    PushTExpertConfig,
    retry_planner_seed,
    run_expert_episode,
    run_expert_episode_with_retries,
)

__all__ = [
    "KitchenExpert",
    "KitchenExpertConfig",
    "PushTExpert",
    "PushTExpertConfig",
    "retry_planner_seed",
    "run_expert_episode",
    "run_expert_episode_with_retries",
]
