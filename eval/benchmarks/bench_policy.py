"""Benchmark: policy training throughput and inference latency per action chunk, flow vs the DDPM baseline.

    python -m fm_policy.eval.benchmarks.bench_policy [--config pusht_keypoints_flow_cpu] [--device cpu] [--threads 2]
        [--out docs/results/policy_speed.json] [--md docs/results/policy_speed.md]

Uses the network of `--config` (default: the CPU Push-T config) on random data of Push-T keypoint shapes, so it
needs no dataset. Training: full `compute_loss` + AdamW step, samples/s at batch 64/256. Inference: one
`predict_action_chunk` call for one observation (batch 1, what a robot controller does), p50/p99 ms over repeats,
at 1/2/4/8/16 Euler steps for the flow policy, DDIM-1/10/16 and DDPM-100 for the baseline.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from fm_policy.eval.benchmarks.bench_common import write_results

from fm_policy.factory import make_policy, policy_config_as
from fm_policy.policy import BasePolicy
from fm_policy.train import TrainConfig, load_train_config
from fm_policy.versions import hardware_description

OBS_DIM, ACTION_DIM = 20, 2




def _device_name(device: str) -> str:
    hw = hardware_description(device)
    return hw.get("gpu") or f"{hw['cpu']} ({hw['torch_threads']} torch threads, {hw['cpu_count']} cores)"


def _policy(config: TrainConfig, policy_type: str, device: str) -> BasePolicy:
    cfg = policy_config_as(config.policy, policy_type)
    rng = np.random.default_rng(0)
    arrays = {"keypoints": rng.uniform(0, 512, (1000, OBS_DIM)).astype(np.float32),
              "action": rng.uniform(0, 512, (1000, ACTION_DIM)).astype(np.float32)}
    return make_policy(cfg, arrays, ["keypoints"]).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_rate(policy: BasePolicy, batch: int, device: str, seconds: float) -> float:
    horizon, n_obs = policy.config.horizon, policy.config.n_obs_steps
    data = {"keypoints": torch.rand(batch, n_obs, OBS_DIM, device=device) * 512,
            "action": torch.rand(batch, horizon, ACTION_DIM, device=device) * 512}
    return timed_train_rate(policy, data, device, seconds)


def timed_train_rate(policy: BasePolicy, data: dict[str, torch.Tensor], device: str, seconds: float,
                     warmup: int = 3, min_steps: int = 5) -> float:
    """Samples/s of compute_loss + backward + AdamW on one fixed batch, for at least `seconds` (after warm-up)."""
    batch = len(data["action"])
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    policy.train()

    def step() -> None:
        loss = policy.compute_loss(data)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    _sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < min_steps:
        step()
        n += 1
    _sync(device)
    return n * batch / (time.perf_counter() - start)


@torch.no_grad()
def chunk_latency(policy: BasePolicy, num_steps: int, solver: str | None, device: str, repeats: int) -> dict[str, float]:
    policy.eval()
    obs = {"keypoints": torch.rand(1, policy.config.n_obs_steps, OBS_DIM, device=device) * 512}
    for _ in range(3):
        policy.predict_action_chunk(obs, num_steps=num_steps, solver=solver)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        policy.predict_action_chunk(obs, num_steps=num_steps, solver=solver)
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "mean_ms": float(np.mean(times))}


def run(config: TrainConfig, device: str, seconds: float, repeats: int) -> dict[str, Any]:
    flow, ddpm = _policy(config, "flow", device), _policy(config, "ddpm", device)
    n_params = sum(p.numel() for p in flow.parameters())
    training = [
        {"policy": name, "batch": batch, "samples_per_s": train_rate(policy, batch, device, seconds),}
        for name, policy in (("flow", flow), ("ddpm", ddpm))
        for batch in (64, 256)
    ]
    for row in training:
        row["steps_per_s"] = row["samples_per_s"] / row["batch"]
    inference = [{"policy": "flow", "sampler": f"euler-{n}", "nfe": n, **chunk_latency(flow, n, "euler", device, repeats)}
                 for n in (1, 2, 4, 8, 16)]
    inference += [{"policy": "ddpm", "sampler": f"{s}-{n}", "nfe": n, **chunk_latency(ddpm, n, s, device, repeats)}
                  for s, n in (("ddim", 1), ("ddim", 10), ("ddim", 16), ("ddpm", 100))]
    return {"network": config.policy.network.__dict__, "parameters": n_params, "training": training,
            "inference": inference}


def to_markdown(result: dict[str, Any]) -> str:
    net = result["network"]
    lines = [
        "# Policy speed: training throughput and inference latency per chunk",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Device: {result['device']}; torch {result['torch']}; measured {result['date']}. "
        f"{result.get('note', '')}",
        f"Network: {net['kind']} {net['down_dims'] if net['kind'] == 'unet1d' else net['hidden_dims']}, "
        f"{result['parameters'] / 1e6:.2f} M parameters; Push-T keypoint shapes (obs 2 x 20, chunk 16 x 2).",
        "",
        "## Training (compute_loss + backward + AdamW)",
        "",
        "| policy | batch | samples/s | steps/s |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['policy']} | {r['batch']} | {r['samples_per_s']:,.0f} | {r['steps_per_s']:.1f} |"
              for r in result["training"]]
    lines += ["", "## Inference: one `predict_action_chunk` for one observation (batch 1)", "",
              "| policy | sampler | network evaluations | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['policy']} | {r['sampler']} | {r['nfe']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
              for r in result["inference"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="pusht_keypoints_flow_cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="training time measured per row")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--note", default="", help="free text for the report (e.g. 'machine shared with ...')")
    parser.add_argument("--out", default="docs/results/policy_speed.json")
    parser.add_argument("--md", default="docs/results/policy_speed.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_train_config(args.config)
    result = run(config, args.device, args.seconds, args.repeats)
    result.update(
        command=f"python -m fm_policy.eval.benchmarks.bench_policy --config {args.config} --device {args.device} "
        f"--threads {args.threads}",
        device=_device_name(args.device), torch=torch.__version__, date=time.strftime("%Y-%m-%d"), note=args.note,
    )
    markdown = to_markdown(result)
    write_results(result, args.out, args.md, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
