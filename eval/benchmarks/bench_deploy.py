"""Benchmark: latency per action chunk in process vs over the policy server, server overhead, and a load test.

    python -m fm_policy.eval.benchmarks.bench_deploy \
        --flow runs/pusht_keypoints_flow_cpu/checkpoints/step_8000/ema \
        --ddpm runs/pusht_keypoints_ddpm_cpu/checkpoints/step_8000/ema \
        [--threads 1] [--repeats 50] [--clients 8] [--requests 25] \
        [--out docs/results/deploy.json] [--md docs/results/deploy.md]

What is measured, for one observation (batch 1, what a robot controller sends), Push-T keypoint shapes:
- in process: `predict_action_chunk` timed by `fm_policy.eval.benchmarks.bench_policy.chunk_latency` (the same function as the
  policy-speed benchmark), at Euler 1/2/4/8/16 for the flow policy and DDIM-10 / DDPM-100 for the baseline;
- over the socket: `PolicyClient.infer` round trips to `fm-policy serve` running in a separate process on
  loopback (so client and server do not share a GIL), same settings; the server reports its own inference time,
  and round trip minus that is the server overhead (msgpack, websocket, validation, thread hand-off);
- end to end: Push-T episodes through the controller loop (`fm_policy.deploy.controller`), served vs in process
  with the same seeds and noise: success rates and whether the action sequences are identical;
- load: N client threads, each with its own connection, send R requests as fast as they are answered; throughput,
  p50/p99 latency, and a check that every request was answered (the server's /stats shows no errors); once with
  the default server (one request per forward pass) and once with `--max-batch N` (micro-batching).

A missing checkpoint is replaced by the same architecture with untrained weights (timing does not depend on the
weight values); the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fm_policy.eval.benchmarks.bench_common import write_results
from fm_policy.eval.benchmarks.bench_policy import OBS_DIM, _device_name, chunk_latency

FLOW_SETTINGS = [("euler", n) for n in (1, 2, 4, 8, 16)]
DDPM_SETTINGS = [("ddim", 10), ("ddpm", 100)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pctl(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "mean_ms": float(arr.mean())}


def _policy_dir(path: str | None, policy_type: str, tmp: Path) -> tuple[str, str]:
    """The checkpoint to benchmark, or an untrained stand-in of the same architecture (and a note saying so)."""
    if path and Path(path, "config.json").exists():
        return path, f"trained checkpoint {path}"
    from fm_policy.factory import make_policy
    from fm_policy.train import load_train_config

    config = load_train_config(f"pusht_keypoints_{policy_type}_cpu").policy
    rng = np.random.default_rng(0)
    arrays = {"keypoints": rng.uniform(0, 512, (1000, OBS_DIM)).astype(np.float32),
              "action": rng.uniform(0, 512, (1000, 2)).astype(np.float32)}
    out = tmp / f"untrained_{policy_type}"
    make_policy(config, arrays, ["keypoints"]).save_pretrained(out)
    return str(out), (f"untrained weights, architecture of configs/pusht_keypoints_{policy_type}_cpu.yaml "
                      f"({path or 'no checkpoint given'} not found)")


class ServedPolicy:
    """`fm-policy serve` in a subprocess on a free loopback port."""

    def __init__(self, checkpoint: str, threads: int, device: str = "cpu", max_batch: int = 1,
                 max_clients: int | None = 64) -> None:
        """`max_clients=None` keeps the server's default limit (what a load test of the defaults wants)."""
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        # the server's log goes to a file: an unread pipe fills up and blocks the server mid-benchmark
        self.log = tempfile.NamedTemporaryFile("w+", prefix="fm-policy-serve-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fm_policy", "serve", "--checkpoint", checkpoint, "--port", str(self.port),
             "--threads", str(threads), "--log-level", "warning", "--device", device, "--max-batch", str(max_batch),
             *(["--max-clients", str(max_clients)] if max_clients is not None else [])],
            stdout=subprocess.DEVNULL, stderr=self.log, text=True, env=env)
        self.url = f"ws://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=10) as response:
            return json.loads(response.read())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        os.unlink(self.log.name)


def socket_latency(client: Any, solver: str, steps: int, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    obs = {"keypoints": (rng.random((client.spec.n_obs_steps, OBS_DIM)) * 512).astype(np.float32)}
    for _ in range(3):
        client.infer(obs, num_steps=steps, solver=solver)
    rtt, infer, overhead = [], [], []
    for _ in range(repeats):
        reply = client.infer(obs, num_steps=steps, solver=solver)
        rtt.append(reply.roundtrip_ms)
        infer.append(reply.server_timing["infer_ms"])
        overhead.append(reply.roundtrip_ms - reply.server_timing["infer_ms"])
    return {**_pctl(rtt), "server_infer_p50_ms": float(np.median(infer)),
            "overhead_p50_ms": float(np.median(overhead)), "overhead_p99_ms": float(np.percentile(overhead, 99))}


def load_test(url: str, clients: int, requests: int, steps: int) -> dict[str, Any]:
    from fm_policy.deploy.client import PolicyClient

    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    connections = [PolicyClient(url) for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def worker(i: int) -> None:
        rng = np.random.default_rng(i)
        obs = {"keypoints": (rng.random((connections[i].spec.n_obs_steps, OBS_DIM)) * 512).astype(np.float32)}
        barrier.wait()
        for _ in range(requests):
            try:
                latencies[i].append(connections[i].infer(obs, num_steps=steps, timeout_s=60).roundtrip_ms)
            except Exception as exc:  # noqa: BLE001 - counted and reported, never hidden
                errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for c in connections:
        c.close()
    flat = [x for per in latencies for x in per]
    return {"clients": clients, "requests_per_client": requests, "num_steps": steps, "sent": clients * requests,
            "answered": len(flat), "errors": errors[:5], "n_errors": len(errors), "wall_s": wall,
            "throughput_rps": len(flat) / wall, **_pctl(flat)}


def end_to_end(client: Any, policy: Any, episodes: int, seed_start: int) -> dict[str, Any]:
    """Push-T episodes through the controller loop, served vs in process, same seeds and noise (not real time)."""
    from fm_policy.deploy.client import LocalChunkSource
    from fm_policy.deploy.controller import ControllerConfig, run_controller, summarize

    seeds = list(range(seed_start, seed_start + episodes))
    config = ControllerConfig(realtime=False, record_actions=True)
    start = time.perf_counter()
    served = run_controller(client, seeds, config)
    local = run_controller(LocalChunkSource(policy), seeds, config)
    return {
        "seeds": [seeds[0], seeds[-1]], "served": summarize(served), "in_process": summarize(local),
        "identical_actions": all(a.actions == b.actions for a, b in zip(served, local, strict=True)),
        "per_episode_success_equal": all(a.success == b.success for a, b in zip(served, local, strict=True)),
        "wall_s": time.perf_counter() - start,
    }


def export_parity(checkpoint: str, tmp: Path) -> list[dict[str, Any]]:
    """`fm-policy export` of the checkpoint in both formats: max abs error of each graph against PyTorch."""
    from fm_policy.deploy.export import ExportConfig, export_policy
    from fm_policy.factory import load_policy

    policy = load_policy(checkpoint)
    fused = (1, 2) if type(policy).supports_fused_export else ()
    rows = []
    for fmt in ("onnx", "torchscript"):
        manifest = export_policy(policy, tmp / f"export_{fmt}", ExportConfig(format=fmt, fused_steps=fused))
        rows += [{"format": fmt, "graph": g.name, "max_abs_error": g.max_abs_error, "tolerance": g.tolerance}
                 for g in manifest.graphs]
    return rows


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_policy(name: str, checkpoint: str, settings: list[tuple[str, int]], args: argparse.Namespace,
                 load: bool) -> dict[str, Any]:
    from fm_policy.deploy.client import PolicyClient
    from fm_policy.factory import load_policy

    policy = load_policy(checkpoint, device=args.device)
    if policy.obs_shapes != {"keypoints": (OBS_DIM,)}:
        raise ValueError(f"{checkpoint}: the benchmark uses Push-T keypoint observations; this policy takes "
                         f"{policy.obs_shapes}")
    rows = []
    for solver, steps in settings:
        repeats = args.repeats if steps < 50 else max(10, args.repeats // 2)  # DDPM-100: ~1 s per call on CPU
        _progress(f"{name} {solver}-{steps}: in process")
        rows.append({"policy": name, "sampler": f"{solver}-{steps}", "nfe": steps, "repeats": repeats,
                     "in_process": chunk_latency(policy, steps, solver, args.device, repeats)})
    served = ServedPolicy(checkpoint, args.threads, args.device)
    try:
        with PolicyClient(served.url, connect_timeout_s=180) as client:
            for row, (solver, steps) in zip(rows, settings, strict=True):
                _progress(f"{name} {solver}-{steps}: over the socket")
                row["socket"] = socket_latency(client, solver, steps, row["repeats"])
        result: dict[str, Any] = {"rows": rows}
        if load and args.e2e_episodes:
            _progress(f"{name}: end to end, {args.e2e_episodes} Push-T episodes served and in process")
            with PolicyClient(served.url) as client:
                result["end_to_end"] = end_to_end(client, policy, args.e2e_episodes, args.seed_start)
        if load:
            _progress(f"{name}: load test, max_batch 1")
            result["load"] = [_load_with_stats(served, 1, args)]
    finally:
        served.close()
    if load:  # the same load with micro-batching on
        batched = ServedPolicy(checkpoint, args.threads, args.device, max_batch=args.clients)
        try:
            _progress(f"{name}: load test, max_batch {args.clients}")
            PolicyClient(batched.url, connect_timeout_s=180).close()
            result["load"].append(_load_with_stats(batched, args.clients, args))
        finally:
            batched.close()
    return result


def _load_with_stats(served: ServedPolicy, max_batch: int, args: argparse.Namespace) -> dict[str, Any]:
    before = served.stats()["counts"]
    out = load_test(served.url, args.clients, args.requests, args.load_steps)
    after = served.stats()["counts"]
    out["max_batch"] = max_batch
    out["server_errors"] = {k: v - before.get(k, 0) for k, v in after.items()
                            if k.startswith("error") and v - before.get(k, 0)}
    out["server_answered"] = after.get("ok", 0) - before.get("ok", 0)
    return out


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Deployment latency: in process vs over the policy server",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Hardware: {result['device']}; torch {result['torch']}; measured {result['date']}. {result['note']}",
        "",
        ("Latency of one action chunk for one observation (batch 1), Push-T keypoints (obs 2 x 20, chunk 16 x 2). "
         "Socket: `PolicyClient.infer` round trip to `fm-policy serve` in another process on loopback. Overhead: "
         "round trip minus the server's own inference time (msgpack, websocket, validation, thread hand-off)."),
        "",
    ]
    for name, info in result["policies"].items():
        lines += [f"## {name}: {info['source']}", "",
                  "| sampler | NFE | calls | in-process p50 ms | p99 ms | socket p50 ms | p99 ms | overhead p50 ms | p99 ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in info["rows"]:
            ip, so = r["in_process"], r["socket"]
            lines.append(f"| {r['sampler']} | {r['nfe']} | {r['repeats']} | {ip['p50_ms']:.2f} | {ip['p99_ms']:.2f} | "
                         f"{so['p50_ms']:.2f} | {so['p99_ms']:.2f} | {so['overhead_p50_ms']:.2f} | "
                         f"{so['overhead_p99_ms']:.2f} |")
        lines.append("")
        if "end_to_end" in info:
            e = info["end_to_end"]
            lines += [(f"### End to end ({name}): Push-T controller loop, served vs in process, seeds "
                       f"{e['seeds'][0]}-{e['seeds'][1]}"), "",
                      "| | episodes | success rate | mean max reward | held ticks |", "|---|---|---|---|---|"]
            lines += [f"| {k} | {e[k]['episodes']} | {e[k]['success_rate']:.2f} | {e[k]['mean_max_reward']:.3f} | "
                      f"{e[k]['held_ticks']} |" for k in ("served", "in_process")]
            lines += ["", (f"Identical action sequences: {e['identical_actions']}; per-episode success equal: "
                           f"{e['per_episode_success_equal']}."), ""]
        if "export" in info:
            lines += [(f"### Export parity ({name}): `fm-policy export`, exported graph vs PyTorch, max abs error at "
                       "batch 1 and 3 (onnxruntime / torch.jit.load)"), "",
                      "| format | graph | max abs error | tolerance |", "|---|---|---|---|"]
            lines += [f"| {r['format']} | {r['graph']} | {r['max_abs_error']:.2e} | {r['tolerance']:.1e} |"
                      for r in info["export"]]
            lines.append("")
        if "load" in info:
            lines += [(f"### Load test ({name}, Euler-{info['load'][0]['num_steps']}): N clients, each sends its "
                       "next request as soon as the last is answered"), "",
                      ("| server --max-batch | clients | requests | answered | errors | throughput req/s | p50 ms | "
                       "p99 ms |"), "|---|---|---|---|---|---|---|---|"]
            lines += [(f"| {ld['max_batch']} | {ld['clients']} | {ld['sent']} | {ld['answered']} (server: "
                       f"{ld['server_answered']}) | {ld['n_errors']} (server: {ld['server_errors'] or 0}) | "
                       f"{ld['throughput_rps']:.1f} | {ld['p50_ms']:.2f} | {ld['p99_ms']:.2f} |")
                      for ld in info["load"]]
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flow", default="runs/pusht_keypoints_flow_cpu/checkpoints/step_8000/ema")
    parser.add_argument("--ddpm", default="runs/pusht_keypoints_ddpm_cpu/checkpoints/step_8000/ema")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in process and in the server")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (in process and in the server)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--clients", type=int, default=8, help="load test: concurrent clients")
    parser.add_argument("--requests", type=int, default=25, help="load test: requests per client")
    parser.add_argument("--load-steps", type=int, default=8, help="load test: Euler steps per chunk")
    parser.add_argument("--e2e-episodes", type=int, default=10,
                        help="Push-T episodes of the controller loop, served vs in process (flow policy; 0: skip)")
    parser.add_argument("--seed-start", type=int, default=100000)
    parser.add_argument("--note", default="", help="free text for the report (e.g. 'machine shared with training')")
    parser.add_argument("--out", default="docs/results/deploy.json")
    parser.add_argument("--md", default="docs/results/deploy.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        policies = {}
        for name, path, settings, load in (("flow", args.flow, FLOW_SETTINGS, True),
                                           ("ddpm", args.ddpm, DDPM_SETTINGS, False)):
            checkpoint, source = _policy_dir(path, name, Path(tmp))
            policies[name] = {"source": source, "checkpoint": path, **bench_policy(name, checkpoint, settings, args, load)}
            _progress(f"{name}: export parity")
            policies[name]["export"] = export_parity(checkpoint, Path(tmp) / name)
    result = {
        "command": f"python -m fm_policy.eval.benchmarks.bench_deploy --flow {args.flow} --ddpm {args.ddpm} --device {args.device} --threads "
                   f"{args.threads} --repeats {args.repeats} --clients {args.clients} --requests {args.requests} "
                   f"--e2e-episodes {args.e2e_episodes}",
        "device": _device_name(args.device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "note": args.note, "policies": policies,
    }
    markdown = to_markdown(result)
    write_results(result, args.out, args.md, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
