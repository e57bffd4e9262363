"""Shared helpers of the tests/test_deploy_*.py files: tiny Push-T-shaped policies built in milliseconds."""

from __future__ import annotations

import numpy as np
import torch

from fm_policy.factory import make_policy, policy_config_class
from fm_policy.policy import BasePolicy

ACTION_LOW, ACTION_HIGH = 50.0, 450.0  # the fitted action range: what clients clamp to


def tiny_policy(kind: str = "mlp", policy_type: str = "flow", seed: int = 0) -> BasePolicy:
    """An untrained policy with Push-T keypoint shapes (obs 2 x 20, chunk 16 x 2); weights fixed by `seed`.

    Untrained is enough for deployment tests: they compare served against in-process actions bit for bit, so any
    deterministic function of the observation and the noise exercises the same paths as a trained network.
    """
    network = ({"kind": "mlp", "hidden_dims": [64, 64], "time_embed_dim": 16} if kind == "mlp"
               else {"kind": "unet1d", "down_dims": [16, 32], "kernel_size": 3, "n_groups": 4, "time_embed_dim": 16})
    config = policy_config_class(policy_type)(n_obs_steps=2, horizon=16, n_action_steps=8, network=network,
                          num_inference_steps=4)
    rng = np.random.default_rng(seed)
    arrays = {"keypoints": rng.uniform(0, 512, (500, 20)).astype(np.float32),
              "action": rng.uniform(ACTION_LOW, ACTION_HIGH, (500, 2)).astype(np.float32)}
    arrays["action"][0], arrays["action"][1] = ACTION_LOW, ACTION_HIGH  # exact range ends
    torch.manual_seed(seed)
    return make_policy(config, arrays, ["keypoints"]).eval()


def observation(seed: int = 0) -> dict[str, np.ndarray]:
    """A valid request observation: (n_obs_steps, 20) float32 keypoints."""
    return {"keypoints": np.random.default_rng(seed).uniform(0, 512, (2, 20)).astype(np.float32)}
