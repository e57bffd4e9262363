"""Scripted / planning experts that generate demonstrations (design: /work/shared/docs/experts.md)."""

from .pusht import (
    PushTExpert,
    PushTExpertConfig,
    retry_planner_seed,
    run_expert_episode,
    run_expert_episode_with_retries,
)

__all__ = [
    "PushTExpert",
    "PushTExpertConfig",
    "retry_planner_seed",
    "run_expert_episode",
    "run_expert_episode_with_retries",
]
