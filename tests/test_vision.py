"""Image observations: the GroupNorm ResNet + spatial-softmax encoder, the multi-modal observation encoder, and an
image policy through training, persistence, the harness, the server and export. Tiny sizes throughout."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from fm_policy.datasets.replay_buffer import ReplayBuffer
from safetensors.torch import save_file

from fm_policy.config import ConfigError
from fm_policy.factory import load_policy, make_policy, policy_config_class
from fm_policy.networks.vision import ImageEncoder, MultiModalObsEncoder, VisionConfig

TINY = {"widths": [8, 16], "blocks": [1, 1], "group_channels": 8, "num_keypoints": 4, "feature_dim": 0,
        "crop_shape": [20, 20]}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def _image_policy(image_shape=(24, 24, 3), n: int = 40, seed: int = 0, **vision):
    rng = np.random.default_rng(seed)
    arrays = {"image": rng.integers(0, 256, (n, *image_shape), dtype=np.uint8),
              "agent_pos": rng.uniform(0, 512, (n, 2)).astype(np.float32),
              "action": rng.uniform(0, 512, (n, 2)).astype(np.float32)}
    cfg = policy_config_class("flow")(horizon=8, n_action_steps=4, network={"kind": "unet1d", "down_dims": [16, 32]},
                                      vision=VisionConfig(**{**TINY, **vision}))
    torch.manual_seed(seed)
    return make_policy(cfg, arrays, ["image", "agent_pos"]).eval()


def _obs(policy, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    h, w, c = policy.obs_shapes["image"]
    return {"image": _images(batch, policy.n_obs_steps, h, w, c, seed=seed),
            "agent_pos": torch.rand((batch, policy.n_obs_steps, 2), generator=torch.Generator().manual_seed(seed)) * 512}


def test_encoder_shapes_per_camera_and_shared():
    shapes = {"cam_a": (24, 24, 3), "cam_b": (24, 24, 3), "pos": (3,)}
    obs = {"cam_a": _images(5, 2, 24, 24, 3), "cam_b": _images(5, 2, 24, 24, 3, seed=1), "pos": torch.rand(5, 2, 3)}
    separate = MultiModalObsEncoder(shapes, 2, VisionConfig(**TINY)).eval()
    shared = MultiModalObsEncoder(shapes, 2, VisionConfig(**{**TINY, "share_encoder": True})).eval()
    for enc in (separate, shared):
        assert enc.output_dim == 2 * 2 * 8 + 2 * 3  # steps * cameras * 2K + steps * low-dim
        out = enc(obs)
        assert out.shape == (5, enc.output_dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
        torch.testing.assert_close(out[:, -6:], obs["pos"].reshape(5, -1))  # low-dim block as LowDimObsEncoder
    assert len(separate.cameras) == 2 and len(shared.cameras) == 1
    assert sum(p.numel() for p in shared.parameters()) * 2 == sum(p.numel() for p in separate.parameters())
    # keypoints are expectations over [-1, 1] coordinates; a projection changes the feature width
    assert separate(obs)[:, :-6].abs().max() <= 1.0
    projected = MultiModalObsEncoder(shapes, 2, VisionConfig(**{**TINY, "feature_dim": 5}))
    assert projected.output_dim == 2 * 2 * 5 + 6 and projected(obs).shape == (5, 26)
    # the full ResNet-18 is the default
    full = ImageEncoder((96, 96, 3), VisionConfig(crop_shape=[84, 84]))
    assert [len(getattr(full.trunk, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert 11.0e6 < sum(p.numel() for p in full.trunk.parameters()) < 11.3e6  # resnet18 minus fc, GN for BN
    with pytest.raises(ConfigError, match="crop_shape"):
        ImageEncoder((16, 16, 3), VisionConfig(**TINY))


def test_random_crops_in_training_centre_crop_in_eval():
    enc = ImageEncoder((24, 24, 3), VisionConfig(**TINY))
    images = _images(16, 24, 24, 3)
    enc.eval()
    centre = images[:, 2:22, 2:22]
    assert torch.equal(enc.crop_images(images), centre)
    assert torch.equal(enc(images), enc(images))  # deterministic inference
    enc.train()
    crops = [enc.crop_images(images) for _ in range(3)]
    assert all(c.shape == (16, 20, 20, 3) for c in crops)
    assert not torch.equal(crops[0], crops[1]) or not torch.equal(crops[1], crops[2])
    # each crop is a window of its own image
    offsets = {(t, l) for c in crops for i in range(16) for t in range(5) for l in range(5)
               if torch.equal(c[i], images[i, t : t + 20, l : l + 20])}
    assert len(offsets) > 3
    assert not torch.equal(enc(images), enc(images))


def test_image_policy_round_trip_and_obs_errors(tmp_path):
    policy = _image_policy()
    assert policy.image_keys == {"image"} and "image" not in policy.normalizer  # no statistics over images
    assert "agent_pos" in policy.normalizer
    obs, noise = _obs(policy), torch.randn(2, 8, 2)
    expected = policy.predict_action_chunk(obs, noise=noise)
    assert expected.shape == (2, 4, 2)
    policy.save_pretrained(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "config.json").read_text())["policy"]
    assert saved["vision"]["widths"] == [8, 16] and saved["vision"]["crop_shape"] == [20, 20]
    loaded = load_policy(tmp_path / "p")
    assert torch.equal(loaded.predict_action_chunk(obs, noise=noise), expected)
    # select_action keeps uint8 images in its queue
    step = {"image": obs["image"][:, -1], "agent_pos": obs["agent_pos"][:, -1]}
    assert loaded.select_action(step).shape == (2, 2)

    with pytest.raises(ValueError, match=r"lacks camera image\(s\) \['image'\]"):
        policy.predict_action_chunk({"agent_pos": obs["agent_pos"]})
    with pytest.raises(ValueError, match=r"'image' has shape \(2, 2, 32, 32, 3\); expected \(batch, 2, 24, 24, 3\)"):
        policy.predict_action_chunk({**obs, "image": _images(2, 2, 32, 32, 3)})
    with pytest.raises(ValueError, match="must be uint8"):
        policy.predict_action_chunk({**obs, "image": obs["image"].float()})


def test_pretrained_trunk_weights_and_key_errors(tmp_path):
    source = ImageEncoder((24, 24, 3), VisionConfig(**TINY))
    weights = {k: v.clone() for k, v in source.trunk.state_dict().items()}
    weights["bn1.running_mean"] = torch.zeros(8)  # BatchNorm statistics (torchvision files) are ignored
    weights["fc.weight"] = torch.zeros(2, 16)
    save_file(weights, tmp_path / "trunk.safetensors")
    enc = MultiModalObsEncoder({"image": (24, 24, 3)}, 2,
                               VisionConfig(**TINY, pretrained=str(tmp_path / "trunk.safetensors")))
    for k, v in source.trunk.state_dict().items():
        assert torch.equal(enc.camera("image").trunk.state_dict()[k], v)

    del weights["layer2.0.downsample.0.weight"]
    weights["layer9.conv.weight"] = torch.zeros(1)
    save_file(weights, tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match=r"missing keys \['layer2.0.downsample.0.weight'\].*unexpected keys "
                                          r"\['layer9.conv.weight'\]"):
        MultiModalObsEncoder({"image": (24, 24, 3)}, 2, VisionConfig(**TINY, pretrained=str(tmp_path / "bad.safetensors")))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        MultiModalObsEncoder({"image": (24, 24, 3)}, 2, VisionConfig(**TINY, pretrained=str(tmp_path / "junk.safetensors")))
    with pytest.raises(ConfigError, match="no such file"):
        MultiModalObsEncoder({"image": (24, 24, 3)}, 2, VisionConfig(**TINY, pretrained=str(tmp_path / "none")))


def _image_store(path, n_episodes: int = 6, steps: int = 24) -> str:
    """Push-T field layout (`img` uint8, `state`): the action is the position of a bright square in the image."""
    buffer = ReplayBuffer.create(str(path))
    rng = np.random.default_rng(0)
    for _ in range(n_episodes):
        start, velocity = rng.uniform(4, 16, 2), rng.uniform(-0.2, 0.2, 2)
        pos = np.clip(start + velocity * np.arange(steps)[:, None], 2, 18)
        img = np.zeros((steps, 24, 24, 3), dtype=np.uint8)
        for t, (x, y) in enumerate(pos.astype(int)):
            img[t, y : y + 4, x : x + 4] = 255
        state = np.concatenate([pos * 20, rng.uniform(0, 1, (steps, 3))], axis=1).astype(np.float32)
        buffer.add_episode({"img": img, "state": state, "action": (pos * 20).astype(np.float32)})
    return str(path)


def test_training_an_image_policy_lowers_the_loss(tmp_path):
    from fm_policy.datasets.policy_data import build_policy_data

    from fm_policy.train import load_train_config, train
    from fm_policy.trainer import seed_everything

    store = _image_store(tmp_path / "img.zarr")
    config = load_train_config(None, [
        f"data.path={store}", "data.obs_keys=[image,agent_pos]", "data.val_ratio=0.2", f"run_dir={tmp_path / 'run'}",
        "policy.horizon=8", "policy.n_action_steps=4", "policy.network.down_dims=[16,32]",
        "policy.network.time_embed_dim=16", "policy.vision.widths=[8,16]", "policy.vision.blocks=[1,1]",
        "policy.vision.group_channels=8", "policy.vision.num_keypoints=4", "policy.vision.feature_dim=0",
        "policy.vision.crop_shape=[20,20]", "loop.batch_size=16", "loop.steps=40", "loop.log_every=10",
        "loop.val_every=0", "loop.checkpoint_every=40", "loop.progress=false", "loop.torch_threads=1",
        "optim.lr=3e-3", "optim.warmup_steps=2", "ema.enabled=false",
    ])
    data = build_policy_data(config.data, 8, 2, 4)
    assert data.arrays["image"].dtype == np.uint8 and data.arrays["agent_pos"].shape[1:] == (2,)
    batch = {k: torch.as_tensor(v) for k, v in data.train[np.arange(0, len(data.train), 3)].items()}
    assert batch["image"].dtype == torch.uint8

    def loss(policy) -> float:
        policy.eval()
        torch.manual_seed(5)
        with torch.no_grad():
            return float(np.mean([float(policy.compute_loss(batch)["loss"]) for _ in range(4)]))

    seed_everything(config.loop.seed)
    before = loss(make_policy(copy.deepcopy(config.policy), data.arrays, ["image", "agent_pos"]))
    checkpoint = train(config)
    after = loss(load_policy(checkpoint / "policy"))
    assert after < 0.7 * before, (before, after)


def test_pusht_image_harness_server_and_export(tmp_path):
    from fm_policy.eval.run import evaluate_policy

    from fm_policy.deploy.client import PolicyClient
    from fm_policy.deploy.export import ExportConfig, export_policy, host_euler_loop
    from fm_policy.deploy.server import PolicyServer, ServerConfig, ServerThread

    policy = _image_policy(image_shape=(96, 96, 3), crop_shape=[84, 84])
    report = evaluate_policy(policy, "pusht", {"max_episode_steps": 8}, n_episodes=2, progress=False)
    assert report.settings[0].n_episodes == 2

    obs = _obs(policy, batch=1, seed=3)
    noise = torch.randn(1, 8, 2)
    expected = policy.generate_chunk(obs, noise=noise)[0, policy.n_obs_steps - 1 :].numpy()
    with ServerThread(PolicyServer(policy, ServerConfig(port=0, log_every=0, action_range="flag"))) as running, \
            PolicyClient(running.url) as client:
        assert client.spec.obs_dtypes == {"agent_pos": "<f4", "image": "|u1"}
        served = client.infer({k: v[0].numpy() for k, v in obs.items()}, noise=noise[0].numpy()).actions
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)

    manifest = export_policy(policy, tmp_path / "onnx", ExportConfig(format="onnx", fused_steps=(2,)))
    assert manifest.obs_dtypes == {"agent_pos": "<f4", "image": "|u1"}
    assert all(g.max_abs_error <= g.tolerance for g in manifest.graphs)
    got = host_euler_loop(tmp_path / "onnx", {k: v.numpy() for k, v in obs.items()}, noise.numpy(), 2)
    np.testing.assert_allclose(got, policy.generate_chunk(obs, num_steps=2, solver="euler", noise=noise).numpy(),
                               atol=2e-2, rtol=1e-4)


@pytest.mark.parametrize("name", ["pusht_image_flow_cpu", "pusht_image_flow", "robomimic_lift_image_flow_cpu"])
def test_image_configs_load(name):
    from fm_policy.train import load_train_config

    config = load_train_config(name)
    assert any(k.endswith("image") for k in config.data.obs_keys)
    assert len(config.policy.vision.widths) == len(config.policy.vision.blocks) == 4
    config.policy.validate()
