"""Benchmark: image-policy speed: inference ms per action chunk (vision encoder + flow) and training samples/s.

    python -m fm_policy.eval.benchmarks.bench_vision [--config pusht_image_flow_cpu] [--device cpu] [--threads 1]
        [--seconds 3] [--repeats 20] [--out docs/results/vision_speed.json] [--md docs/results/vision_speed.md]

Uses the policy of `--config` (default: the CPU Push-T image config: narrow GroupNorm ResNet + spatial softmax,
84x84 crops of 96x96 images, plus `agent_pos`) on random uint8 images, so it needs no dataset. Inference: one
`predict_action_chunk` for one observation (batch 1), p50/p99 ms, at 1 and 8 Euler steps, and the encoder alone.
Training: `compute_loss` + backward + AdamW, samples/s.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from fm_policy.eval.benchmarks.bench_common import write_results
from fm_policy.eval.benchmarks.bench_policy import timed_train_rate

from fm_policy.factory import make_policy
from fm_policy.policy import BasePolicy
from fm_policy.train import TrainConfig, load_train_config
from fm_policy.versions import hardware_description

IMAGE_SHAPE, ACTION_DIM = (96, 96, 3), 2


def _device_name(device: str) -> str:
    hw = hardware_description(device)
    return hw.get("gpu") or f"{hw['cpu']} ({hw['torch_threads']} torch threads, {hw['cpu_count']} cores)"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _policy(config: TrainConfig, device: str) -> BasePolicy:
    rng = np.random.default_rng(0)
    arrays = {"image": rng.integers(0, 256, (64, *IMAGE_SHAPE), dtype=np.uint8),
              "agent_pos": rng.uniform(0, 512, (64, 2)).astype(np.float32),
              "action": rng.uniform(0, 512, (64, ACTION_DIM)).astype(np.float32)}
    return make_policy(config.policy, arrays, ["image", "agent_pos"]).to(device)


def _obs(policy: BasePolicy, batch: int, device: str) -> dict[str, torch.Tensor]:
    n = policy.config.n_obs_steps
    return {"image": torch.randint(0, 256, (batch, n, *IMAGE_SHAPE), dtype=torch.uint8, device=device),
            "agent_pos": torch.rand(batch, n, 2, device=device) * 512}


def _timed(fn: Any, device: str, repeats: int) -> dict[str, float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def train_rate(policy: BasePolicy, batch: int, device: str, seconds: float) -> float:
    data = {**_obs(policy, batch, device),
            "action": torch.rand(batch, policy.config.horizon, ACTION_DIM, device=device) * 512}
    return timed_train_rate(policy, data, device, seconds, warmup=2, min_steps=3)


def run(config: TrainConfig, device: str, seconds: float, repeats: int, batch: int) -> dict[str, Any]:
    policy = _policy(config, device)
    encoder_params = sum(p.numel() for p in policy.encoder.parameters())
    net_params = sum(p.numel() for p in policy.net.parameters())
    policy.eval()
    obs = _obs(policy, 1, device)
    with torch.no_grad():
        inference = [{"what": "encoder only", "nfe": 0, **_timed(lambda: policy.encode_obs(obs), device, repeats)}]
        inference += [{"what": f"chunk, euler-{n}", "nfe": n,
                       **_timed(lambda n=n: policy.predict_action_chunk(obs, num_steps=n, solver="euler"), device,
                                repeats)} for n in (1, 8)]
    samples = train_rate(policy, batch, device, seconds)
    return {"vision": dict(config.policy.vision.__dict__), "network": dict(config.policy.network),
            "encoder_parameters": encoder_params, "network_parameters": net_params,
            "cond_dim": policy.encoder.output_dim, "inference": inference,
            "training": [{"batch": batch, "samples_per_s": samples, "steps_per_s": samples / batch}]}


def to_markdown(result: dict[str, Any]) -> str:
    v = result["vision"]
    crop = "x".join(map(str, v["crop_shape"])) or "none"
    lines = [
        "# Vision policy speed: image encoder + flow, per chunk and in training",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Device: {result['device']}; torch {result['torch']}; measured {result['date']}. {result.get('note', '')}",
        (f"Encoder: GroupNorm ResNet widths {v['widths']} x blocks {v['blocks']}, spatial softmax "
        f"{v['num_keypoints']} keypoints -> {v['feature_dim'] or 2 * v['num_keypoints']} features, crop {crop} of "
        f"96x96x3 uint8, {result['encoder_parameters'] / 1e6:.2f} M parameters; U-Net {result['network']['down_dims']}, "
        f"{result['network_parameters'] / 1e6:.2f} M parameters; condition {result['cond_dim']} "
         "(Push-T `image` + `agent_pos`, 2 observation steps)."),
        "",
        "## Inference: one observation (batch 1)",
        "",
        "| what | network evaluations | p50 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['what']} | {r['nfe']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |" for r in result["inference"]]
    lines += ["", "## Training (random crops + compute_loss + backward + AdamW)", "",
              "| batch | samples/s | steps/s |", "|---|---|---|"]
    lines += [f"| {r['batch']} | {r['samples_per_s']:,.0f} | {r['steps_per_s']:.2f} |" for r in result["training"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="pusht_image_flow_cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0, help="training time measured")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--note", default="", help="free text for the report (e.g. 'machine shared with ...')")
    parser.add_argument("--out", default="docs/results/vision_speed.json")
    parser.add_argument("--md", default="docs/results/vision_speed.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_train_config(args.config)
    result = run(config, args.device, args.seconds, args.repeats, args.batch)
    result.update(
        command=f"python -m fm_policy.eval.benchmarks.bench_vision --config {args.config} --device {args.device} "
        f"--threads {args.threads} --seconds {args.seconds:g} --repeats {args.repeats} --batch {args.batch}",
        device=_device_name(args.device), torch=torch.__version__, date=time.strftime("%Y-%m-%d"), note=args.note,
    )
    markdown = to_markdown(result)
    write_results(result, args.out, args.md, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
