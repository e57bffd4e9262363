"""A tiny Push-T-shaped store and a flow policy pre-trained on it: shared by the fine-tuning tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fm_policy.datasets.replay_buffer import ReplayBuffer


def tiny_state_store(path: Path, n_episodes: int = 4, shift: float = 20.0, seed: int = 0) -> str:
    """5-D state moving linearly from a random start, 30 steps per episode; 2-D action = state[:2] + shift (a task
    variant changes the shift)."""
    buffer = ReplayBuffer.create(str(path))
    rng = np.random.default_rng(seed)
    for _ in range(n_episodes):
        start = rng.uniform(100, 400, 5)
        t = np.arange(30)[:, None]
        state = (start + 3.0 * t * np.array([1, -1, 0.5, 0.2, 0.0])).astype(np.float32)
        buffer.add_episode({"state": state, "action": (state[:, :2] + shift).astype(np.float32)})
    return str(path)


def pretrain_tiny_flow(root: Path, store: str) -> Path:
    """A flow policy (MLP, horizon 8) pre-trained for 30 steps by train(); returns its EMA folder."""
    from fm_policy.train import load_train_config, train

    config = load_train_config(None, [
        f"data.path={store}", "data.obs_keys=[state]", "data.val_ratio=0.25", f"run_dir={root / 'pre'}",
        "policy.network.kind=mlp", "policy.network.hidden_dims=[32,32]", "policy.network.time_embed_dim=16",
        "policy.horizon=8", "policy.n_action_steps=4", "loop.batch_size=16", "loop.steps=30", "loop.log_every=10",
        "loop.val_every=0", "loop.checkpoint_every=30", "loop.progress=false", "optim.lr=3e-3",
        "optim.warmup_steps=5",
    ])
    return train(config) / "ema"
