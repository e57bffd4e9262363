"""Normalizer: ranges, the near-constant-dimension rule, exact inverse, safetensors round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fm_policy.normalizer import Normalizer


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    keypoint = rng.normal(200, 60, (500, 9, 2))
    keypoint[:, 3, 1] = 17.0  # a constant dimension
    return {"keypoint": keypoint, "action": rng.uniform(10, 500, (500, 2)), "quat": rng.normal(0, 1, (500, 4))}


def test_minmax_maps_to_unit_range_and_centres_constant_dims(data):
    norm = Normalizer.fit(data, "minmax")
    y = norm.normalize("keypoint", torch.as_tensor(data["keypoint"], dtype=torch.float32))
    assert y.min().item() == pytest.approx(-1, abs=1e-6) and y.max().item() == pytest.approx(1, abs=1e-6)
    assert torch.all(y[:, 3, 1] == 0)
    per_dim = y.reshape(len(y), -1)
    keep = torch.ones(18, dtype=torch.bool)
    keep[7] = False
    torch.testing.assert_close(per_dim[:, keep].amin(0), -torch.ones(17), atol=1e-6, rtol=0)


def test_zscore_and_identity(data):
    norm = Normalizer.fit(data, {"action": "zscore", "quat": "identity", "keypoint": "zscore"})
    a = norm.normalize("action", torch.as_tensor(data["action"]).float())
    assert a.mean(0).abs().max() < 1e-4 and (a.std(0, unbiased=False) - 1).abs().max() < 1e-4
    q = torch.as_tensor(data["quat"]).float()
    assert torch.equal(norm.normalize("quat", q), q)
    assert torch.all(norm.normalize("keypoint", torch.as_tensor(data["keypoint"]).float())[:, 3, 1] == 0)


@pytest.mark.parametrize("mode", ["minmax", "zscore", "identity"])
def test_inverse_round_trip(data, mode):
    norm = Normalizer.fit(data, mode)
    for key, value in data.items():
        x = torch.as_tensor(value, dtype=torch.float32)
        torch.testing.assert_close(norm.unnormalize(key, norm.normalize(key, x)), x, rtol=1e-6, atol=1e-4)
        y = torch.rand(3, 5, *value.shape[1:]) * 2 - 1  # arbitrary leading dims (batch, time)
        torch.testing.assert_close(norm.normalize(key, norm.unnormalize(key, y)), y, rtol=1e-5, atol=1e-6)


def test_save_load_round_trip(tmp_path, data):
    norm = Normalizer.fit(data, {"action": "minmax", "quat": "identity", "keypoint": "zscore"})
    path = tmp_path / "normalizer.safetensors"
    norm.save(path)
    loaded = Normalizer.load(path)
    assert loaded.modes == norm.modes
    for key in data:
        x = torch.as_tensor(data[key], dtype=torch.float32)
        assert torch.equal(loaded.normalize(key, x), norm.normalize(key, x))
        for name, value in norm.stats(key).items():
            assert torch.equal(loaded.stats(key)[name], value)


def test_clear_errors(tmp_path, data):
    norm = Normalizer.fit(data)
    with pytest.raises(KeyError, match="no key 'state'.*fitted keys"):
        norm.normalize("state", torch.zeros(2))
    with pytest.raises(ValueError, match=r"'action' has shape \(4, 3\); the normaliser expects \(\.\.\., 2\)"):
        norm.normalize("action", torch.zeros(4, 3))
    with pytest.raises(ValueError, match="unknown normalisation mode"):
        Normalizer.fit(data, "robust")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a normaliser file"):
        Normalizer.load(tmp_path / "other.safetensors")


def test_declared_range_replaces_the_data_range_and_keeps_a_constant_key_on_scale():
    """A goal that is constant in the pre-training data (one goal) keeps the declared workspace scale, so another
    goal later lands inside [-1, 1] instead of hundreds of units away; the data's statistics are still recorded."""
    goal = np.full((50, 18), 300.0)
    norm = Normalizer.fit({"goal": goal}, "minmax", ranges={"goal": (0.0, 512.0)})
    assert torch.allclose(norm.normalize("goal", torch.full((1, 18), 300.0)), torch.full((1, 18), 300 / 256 - 1))
    other = norm.normalize("goal", torch.full((1, 18), 100.0))
    assert other.abs().max() <= 1 and torch.allclose(norm.unnormalize("goal", other), torch.full((1, 18), 100.0))
    assert float(norm.stats("goal")["max"][0]) == 300.0
    data_fitted = Normalizer.fit({"goal": goal}, "minmax")  # the default rule would only centre it
    assert float(data_fitted.normalize("goal", torch.full((1, 18), 100.0))[0, 0]) == -200.0
    with pytest.raises(ValueError, match="minmax"):
        Normalizer.fit({"goal": goal}, "zscore", ranges={"goal": (0.0, 512.0)})
    with pytest.raises(ValueError, match="high > low"):
        Normalizer.fit({"goal": goal}, "minmax", ranges={"goal": (5.0, 5.0)})
