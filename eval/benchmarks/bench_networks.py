"""Benchmark: velocity-network speed on CPU (training step and single-sample inference), Push-T low-dim sizes.

    python -m fm_policy.eval.benchmarks.bench_networks [--threads 1] [--seconds 2.5] [--out docs/results/networks.json]
        [--md docs/results/networks.md]

Sizes: horizon 16, action_dim 2, cond = 2 observation steps x 20-D keypoints = 40-D (diffusion_policy's low-dim
Push-T). A training step is one flow-matching step with AdamW: draw noise and t ~ U(0, 1), x_t = (1 - t) x0 + t x1,
forward, MSE against x1 - x0, backward, optimizer step. Inference is one forward pass at batch 1 in inference mode,
i.e. the cost of one function evaluation (NFE) of an ODE solver when the policy acts. Each figure is the median
over repeated calls for about `--seconds` after warm-up; the machine load average is recorded because the CPU may
be shared with other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable

import torch
from fm_policy.eval.benchmarks.bench_common import write_results

from fm_policy.networks import build_velocity_net, count_parameters
from fm_policy.versions import hardware_summary

HORIZON, ACTION_DIM, COND_DIM = 16, 2, 40
TRAIN_BATCHES = (64, 256)

# (label, kind, settings, measure training?)
NETWORKS: list[tuple[str, str, dict[str, Any], bool]] = [
    ("U-Net (32, 64, 128), k5, t-emb 64 [CPU default]", "unet1d", {"down_dims": (32, 64, 128)}, True),
    ("U-Net (64, 128, 256), k5, t-emb 64", "unet1d", {"down_dims": (64, 128, 256)}, True),
    ("MLP 3 x 512, Mish", "mlp", {"hidden_dims": (512, 512, 512)}, True),
    ("MLP 3 x 1024, Mish", "mlp", {"hidden_dims": (1024, 1024, 1024)}, True),
    ("U-Net (256, 512, 1024), k5, t-emb 256 [diffusion_policy size]", "unet1d",
     {"down_dims": (256, 512, 1024), "time_embed_dim": 256}, False),
]




def _median_seconds(fn: Callable[[], None], seconds: float, warmup: int = 3,
                    max_calls: int = 2000) -> tuple[float, int]:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while (time.perf_counter() - start < seconds or len(times) < 5) and len(times) < max_calls:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def _train_step_fn(net: torch.nn.Module, batch: int) -> Callable[[], None]:
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-6)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(batch, HORIZON, ACTION_DIM, generator=g)
    cond = torch.randn(batch, COND_DIM, generator=g)

    def step() -> None:
        noise = torch.randn(x1.shape, generator=g)
        t = torch.rand(batch, generator=g)
        x_t = torch.lerp(noise, x1, t[:, None, None])
        loss = torch.nn.functional.mse_loss(net(x_t, t, cond), x1 - noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _inference_fn(net: torch.nn.Module) -> Callable[[], None]:
    x = torch.randn(1, HORIZON, ACTION_DIM)
    t = torch.full((1,), 0.5)
    cond = torch.randn(1, COND_DIM)

    def forward() -> None:
        with torch.inference_mode():
            net(x, t, cond)

    return forward


def run(seconds: float) -> list[dict[str, Any]]:
    rows = []
    for label, kind, settings, train in NETWORKS:
        torch.manual_seed(0)
        net = build_velocity_net(kind, HORIZON, ACTION_DIM, COND_DIM, **settings)
        row: dict[str, Any] = {"network": label, "kind": kind, "settings": settings, "params": count_parameters(net)}
        if train:
            for batch in TRAIN_BATCHES:
                net.train()
                median, calls = _median_seconds(_train_step_fn(net, batch), seconds)
                row[f"train_b{batch}_ms"] = 1e3 * median
                row[f"train_b{batch}_steps_per_s"] = 1.0 / median
                row[f"train_b{batch}_calls"] = calls
        net.eval()
        median, calls = _median_seconds(_inference_fn(net), seconds / 2)
        row["infer_b1_ms"] = 1e3 * median
        row["infer_b1_calls"] = calls
        rows.append(row)
        print(json.dumps(row), flush=True)
        del net
    return rows


def to_markdown(result: dict[str, Any]) -> str:
    load = result["load_average"]
    lines = [
        "# Velocity-network speed on CPU",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Sizes: horizon {HORIZON}, action_dim {ACTION_DIM}, cond_dim {COND_DIM} (Push-T keypoints, "
        "2 obs steps x 20-D). "
        "Training step = one flow-matching step (noise, t ~ U(0,1), forward, MSE, backward, AdamW). Inference = one "
        "forward pass at batch 1 in inference mode = one function evaluation (NFE) of the ODE solver. "
        "Medians over repeated calls.",
        f"Machine: {result['machine']}; torch {result['torch']}, {result['threads']} torch thread(s). "
        f"Measured {result['date']}.",
        f"Load average before / after: {load['before']:.2f} / {load['after']:.2f} on {result['cpu_count']} cores"
        + (" - **the machine was shared with other jobs during the run**, so figures can be pessimistic."
           if max(load["before"], load["after"]) > 0.5 else "."),
        "",
        "| network | params | train b64 (ms / steps/s) | train b256 (ms / steps/s) | inference b1 (ms / NFE) |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        cells = []
        for batch in TRAIN_BATCHES:
            key = f"train_b{batch}"
            cells.append(f"{row[key + '_ms']:.1f} / {row[key + '_steps_per_s']:.1f}" if key + "_ms" in row else "-")
        lines.append(f"| {row['network']} | {row['params'] / 1e6:.2f} M | {cells[0]} | {cells[1]} | "
                     f"{row['infer_b1_ms']:.2f} |")
    lines += [
        "",
        "Reading: a policy action with an N-step solver costs N x the inference column (plus the observation "
        "encoder, which is a flatten for low-dim inputs). The diffusion_policy-size U-Net (66 M parameters) is "
        "listed for inference only: training it is a GPU job.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared: default 1)")
    parser.add_argument("--seconds", type=float, default=2.5, help="time budget per training measurement")
    parser.add_argument("--out", default="docs/results/networks.json")
    parser.add_argument("--md", default="docs/results/networks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python -m fm_policy.eval.benchmarks.bench_networks"
    if args.threads != 1:
        command += f" --threads {args.threads}"
    if args.seconds != 2.5:
        command += f" --seconds {args.seconds:g}"
    before = os.getloadavg()[0]
    start = time.perf_counter()
    rows = run(args.seconds)
    result = {
        "command": command,
        "machine": hardware_summary(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
        "load_average": {"before": before, "after": os.getloadavg()[0]},
        "wall_s": time.perf_counter() - start,
        "sizes": {"horizon": HORIZON, "action_dim": ACTION_DIM, "cond_dim": COND_DIM},
        "rows": rows,
    }
    markdown = to_markdown(result)
    write_results(result, args.out, args.md, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
