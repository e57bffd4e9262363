"""Sequence sampler: window index, edge-replication padding at both episode edges, first-k obs, splits, DataLoader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fm_policy.datasets.sampler import (
    PAD_MASK_KEY,
    SequenceDataset,
    SequenceSampler,
    episode_split,
    make_dataloader,
    window_index,
)

# two episodes: steps 0..4 and 5..14; the value of each step is its global index, so gathers are easy to read
ENDS = np.array([5, 15])
VALUES = np.arange(15, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)


def _reference_windows(ends, horizon, pad_before, pad_after):
    """Straightforward per-episode loop (diffusion_policy's definition) to check the vectorised version against."""
    rows, start = [], 0
    for end in ends:
        length = end - start
        for idx in range(-pad_before, length - horizon + pad_after + 1):
            rows.append((start + idx, start, end))
        start = end
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


@pytest.mark.parametrize("horizon, pad_before, pad_after", [(4, 1, 3), (16, 1, 7), (3, 0, 0), (6, 5, 5), (2, 9, 9)])
def test_window_index_matches_reference(horizon, pad_before, pad_after):
    ends = np.array([5, 15, 16, 40])
    pb, pa = min(pad_before, horizon - 1), min(pad_after, horizon - 1)
    np.testing.assert_array_equal(window_index(ends, horizon, pad_before, pad_after), _reference_windows(ends, horizon, pb, pa))


def test_padding_replicates_first_and_last_frame():
    sampler = SequenceSampler({"action": VALUES}, ENDS, horizon=4, pad_before=1, pad_after=3, pad_mask=True)
    batch = sampler.sample(np.arange(len(sampler)))
    actions = batch["action"][..., 0]
    # first window of episode 0 starts one step before it: the first frame is repeated
    np.testing.assert_array_equal(actions[0], [0, 0, 1, 2])
    np.testing.assert_array_equal(batch[PAD_MASK_KEY][0], [False, True, True, True])
    # last window of episode 0 runs three steps past its end: the last frame (4) is repeated, never episode 1's 5
    last_of_first = len(window_index(ENDS[:1], 4, 1, 3)) - 1
    np.testing.assert_array_equal(actions[last_of_first], [4, 4, 4, 4])
    np.testing.assert_array_equal(batch[PAD_MASK_KEY][last_of_first], [True, False, False, False])
    # the first window of episode 1 repeats ITS first frame (5), not episode 0's last
    np.testing.assert_array_equal(actions[last_of_first + 1], [5, 5, 6, 7])
    np.testing.assert_array_equal(actions[-1], [14, 14, 14, 14])
    assert actions.min() >= 0 and (np.diff(actions, axis=1) >= 0).all()


def test_first_k_loads_only_observation_frames():
    sampler = SequenceSampler({"obs": VALUES, "action": VALUES}, ENDS, horizon=16, pad_before=1, pad_after=7,
                              first_k={"obs": 2})
    batch = sampler.sample([0, 2])
    assert batch["obs"].shape == (2, 2, 2) and batch["action"].shape == (2, 16, 2)
    np.testing.assert_array_equal(batch["obs"][:, :, 0], batch["action"][:, :2, 0])
    with pytest.raises(KeyError, match="first_k names 'img'"):
        SequenceSampler({"obs": VALUES}, ENDS, horizon=4, first_k={"img": 2})


def test_episode_mask_restricts_windows():
    sampler = SequenceSampler({"action": VALUES}, ENDS, horizon=2, episode_mask=np.array([False, True]))
    assert sampler.sample(np.arange(len(sampler)))["action"].min() >= 5


def test_episode_split_is_seeded_and_by_episode():
    train, val = episode_split(206, val_ratio=0.02, seed=42)
    assert val.sum() == 4 and train.sum() == 202 and not (train & val).any()
    np.testing.assert_array_equal(val, episode_split(206, val_ratio=0.02, seed=42)[1])
    assert not np.array_equal(val, episode_split(206, val_ratio=0.02, seed=7)[1])
    train, val = episode_split(206, val_ratio=0.02, seed=42, max_train_episodes=90)
    assert train.sum() == 90 and not (train & val).any()
    train, val = episode_split(2, val_ratio=0.02)
    assert train.sum() == 1 and val.sum() == 1
    assert episode_split(1, val_ratio=0.1)[1].sum() == 0
    with pytest.raises(ValueError):
        episode_split(0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_yields_whole_batches(num_workers):
    sampler = SequenceSampler({"obs": VALUES, "action": VALUES}, ENDS, horizon=4, pad_before=1, pad_after=3,
                              first_k={"obs": 2}, pad_mask=True)
    dataset = SequenceDataset(sampler)
    loader = make_dataloader(dataset, batch_size=4, shuffle=True, num_workers=num_workers, seed=0)
    batches = list(loader)
    assert len(batches) == len(dataset) // 4
    for batch in batches:
        assert batch["action"].shape == (4, 4, 2) and batch["obs"].shape == (4, 2, 2)
        assert batch["action"].dtype == torch.float32 and batch[PAD_MASK_KEY].dtype == torch.bool
    single = dataset[0]
    assert single["action"].shape == (4, 2)


def test_window_arrays_ride_along_with_their_windows():
    """Per-window extras (fine-tuning's cached noise codes) are gathered with the same indices as the data."""
    sampler = SequenceSampler({"action": VALUES}, ENDS, horizon=4, pad_before=1, pad_after=3)
    first_value = torch.tensor([float(sampler.sample(np.array([i]))["action"][0, 0, 0]) for i in range(len(sampler))])
    dataset = SequenceDataset(sampler, {"code": first_value[:, None]})
    for batch in make_dataloader(dataset, batch_size=3, seed=1):
        assert torch.equal(batch["code"][:, 0], batch["action"][:, 0, 0])
    assert dataset[2]["code"].shape == (1,)
    with pytest.raises(ValueError, match="rows for"):
        SequenceDataset(sampler, {"code": first_value[:-1]})
    with pytest.raises(ValueError, match="shadow"):
        SequenceDataset(sampler, {"action": first_value})
