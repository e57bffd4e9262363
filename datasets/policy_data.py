"""From a replay buffer to what a policy trains on: observation keys in the env's layout, windows, and splits.

A policy sees the same observation keys in training and in the simulator. Most keys are stored as they are observed
(`state`, `image`); some observations are derived from stored fields, because the stores keep diffusion_policy's
field layout: Push-T's 20-D `keypoints` observation is the 9 block keypoints (`keypoint`, (9, 2)) flattened plus the
agent position (`state[:, :2]`). Each env's spec declares such recipes (`EnvSpec.derived_keys` for built keys,
`EnvSpec.renamed_keys` for plain renames such as Push-T's `image` <- `img`); this module uses the union over all
registered envs (`fm_policy.envs.registry.dataset_key_recipes`), not the recipes of the store's env, because a store
need not record its env (diffusion_policy's Push-T zarr has no attributes). A key stored under its own name always
wins over a recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from fm_policy.datasets.errors import DatasetError
from fm_policy.datasets.replay_buffer import ReplayBuffer
from fm_policy.datasets.sampler import SequenceDataset, SequenceSampler, episode_split
from fm_policy.envs.registry import dataset_key_recipes
from fm_policy.envs.spec import DerivedKey

__all__ = ["DataConfig", "DerivedKey", "PolicyData", "build_policy_data", "load_policy_arrays", "stored_keys_for"]


def stored_keys_for(obs_keys: Sequence[str], action_key: str, available: Sequence[str]) -> list[str]:
    """Store keys needed to build `obs_keys` and the action."""
    derived, renamed = dataset_key_recipes()
    needed: list[str] = []
    for key in obs_keys:
        if key in available:
            needed.append(key)
        elif key in derived:
            needed.extend(derived[key].sources)
        elif renamed.get(key) in available:
            needed.append(renamed[key])
        else:
            needed.append(key)  # missing: ReplayBuffer.require reports it clearly
    return list(dict.fromkeys([*needed, action_key]))


def load_policy_arrays(buffer: ReplayBuffer, obs_keys: Sequence[str], action_key: str = "action") -> dict[str, np.ndarray]:
    """Observation arrays under their env keys plus `action` (float32), all in memory."""
    buffer.require(stored_keys_for(obs_keys, action_key, buffer.keys))
    stored = buffer.load(stored_keys_for(obs_keys, action_key, buffer.keys))
    derived, renamed = dataset_key_recipes()
    arrays: dict[str, np.ndarray] = {}
    for key in obs_keys:
        if key in stored:
            arrays[key] = stored[key]
        elif key in derived:
            arrays[key] = derived[key].build(stored)
        else:
            arrays[key] = stored[renamed[key]]
        if arrays[key].dtype.kind == "f":
            arrays[key] = arrays[key].astype(np.float32, copy=False)
    arrays["action"] = stored[action_key].astype(np.float32, copy=False)
    return arrays


@dataclass
class DataConfig:
    """Which store, which keys, and how episodes are split. `obs_keys` are env observation keys."""

    path: str = "data/pusht_expert.zarr"
    obs_keys: list[str] = field(default_factory=lambda: ["keypoints"])
    action_key: str = "action"
    val_ratio: float = 0.02
    split_seed: int = 42
    max_train_episodes: int | None = None
    loss_mask_padding: bool = False  # diffusion_policy trains on padded (held) actions too; True masks them out
    num_workers: int = 0  # in-memory data: one batched gather beats worker IPC (docs/results/sampler.md)


@dataclass
class PolicyData:
    arrays: dict[str, np.ndarray]
    train: SequenceDataset
    val: SequenceDataset | None
    train_mask: np.ndarray
    source: str


def build_policy_data(config: DataConfig, horizon: int, n_obs_steps: int, n_action_steps: int) -> PolicyData:
    """Open and validate the store, build the arrays, split by episode, and wrap train/val windows."""
    with ReplayBuffer.open(config.path) as buffer:
        arrays = load_policy_arrays(buffer, config.obs_keys, config.action_key)
        ends = buffer.episode_ends
    if ends.size < 1:
        raise DatasetError(config.path, "holds no episodes")
    train_mask, val_mask = episode_split(len(ends), config.val_ratio, config.split_seed, config.max_train_episodes)

    def windows(mask: np.ndarray) -> SequenceDataset:
        return SequenceDataset(
            SequenceSampler(
                arrays,
                ends,
                horizon=horizon,
                pad_before=n_obs_steps - 1,
                pad_after=n_action_steps - 1,
                episode_mask=mask,
                first_k={k: n_obs_steps for k in config.obs_keys},
                pad_mask=config.loss_mask_padding,
            )
        )

    train = windows(train_mask)
    if len(train) == 0:
        raise DatasetError(config.path, f"no training window of horizon {horizon}: episodes are too short")
    return PolicyData(arrays, train, windows(val_mask) if val_mask.any() else None, train_mask, config.path)
