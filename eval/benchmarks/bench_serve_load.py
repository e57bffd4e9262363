"""Load benchmark of the policy server on loopback: well-behaved clients alone, and next to one abusive client.

    python -m fm_policy.eval.benchmarks.bench_serve_load [--checkpoint DIR] [--clients 1,4,16] [--duration 5] \
        [--threads 1] [--out docs/results/deploy_load.json] [--md docs/results/deploy_load.md]

`fm-policy serve` runs in its own process with its default limits (max 128 network evaluations per request,
32 waiting requests, 5 s deadline, preemption on). N client threads (this process), each with its own
connection, send their next request as soon as the last is answered, for `--duration` seconds, once at the
server's default sampler steps and once at 1 step: requests/s, p50/p99 round trip, and whether every request got
actions (none dropped). Then the same runs next to one abusive client:

- `max_cost`: a connection looping the costliest request the server accepts (rk4 x 32 steps = 128 evaluations,
  16x the default 8-step Euler request) back to back;
- `flood`: a connection that pipelines default requests without waiting for the replies (a sender and a reader
  thread), as fast as the server lets it.

The acceptance figure is the well-behaved clients' p99 next to the abuser divided by their quiet p99 (target
<= 2). What the abuser got (actions, busy, deadline_exceeded) is reported too. Every loop is bounded in time and
count, and all traffic stays on 127.0.0.1.

A missing checkpoint is replaced by the architecture of configs/pusht_keypoints_flow_cpu.yaml with untrained
weights (latency does not depend on the weight values); the report says which.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import socket
import struct
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from fm_policy.eval.benchmarks.bench_common import write_results
from fm_policy.eval.benchmarks.bench_deploy import ServedPolicy

MAX_REQUESTS_PER_CLIENT = 20000  # a hard cap next to the time bound
ABUSE_MODES = ("max_cost", "flood")


def _policy_dir(path: str | None, tmp: Path) -> tuple[str, str]:
    if path and Path(path, "config.json").exists():
        return path, f"checkpoint {path}"
    from fm_policy.factory import make_policy
    from fm_policy.train import load_train_config

    config = load_train_config("pusht_keypoints_flow_cpu").policy
    rng = np.random.default_rng(0)
    arrays = {"keypoints": rng.uniform(0, 512, (1000, 20)).astype(np.float32),
              "action": rng.uniform(0, 512, (1000, 2)).astype(np.float32)}
    out = tmp / "untrained_flow"
    make_policy(config, arrays, ["keypoints"]).save_pretrained(out)
    return str(out), ("untrained weights, architecture of configs/pusht_keypoints_flow_cpu.yaml "
                      f"({f'{path} not found' if path else 'no checkpoint given'}; latency does not depend on the "
                      "weight values)")


def Server(checkpoint: str, threads: int) -> ServedPolicy:  # noqa: N802 - reads as the class it builds
    """`fm-policy serve` with its default limits (clients included) in a subprocess on a free loopback port."""
    return ServedPolicy(checkpoint, threads, max_clients=None)


def _observation(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"keypoints": rng.uniform(0, 512, (2, 20)).astype(np.float32)}


def _pctl(latencies: list[float]) -> dict[str, float]:
    arr = np.asarray(latencies, dtype=np.float64) * 1e3
    if not arr.size:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99))}


class Abuser:
    """One abusive connection, running until `stop()` (bounded by time and count)."""

    def __init__(self, url: str, mode: str, max_seconds: float) -> None:
        self.url, self.mode, self.deadline = url, mode, time.monotonic() + max_seconds
        self.outcomes: dict[str, int] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _count(self, key: str) -> None:
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self.deadline

    def _max_cost(self) -> None:
        from fm_policy.deploy.client import PolicyClient, ServerError

        rng = np.random.default_rng(99)
        with PolicyClient(self.url) as client:
            steps = client.spec.max_nfe // client.spec.solver_nfe.get("rk4", 4)
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if not self._running():
                    break
                try:
                    client.infer(_observation(rng), num_steps=steps, solver="rk4", timeout_s=30)
                    self._count("actions")
                except ServerError as exc:
                    self._count(exc.code)
                except TimeoutError:
                    self._count("client_timeout")

    def _flood(self) -> None:
        from websockets.sync.client import connect

        from fm_policy.deploy.codec import packb, unpackb

        frame = packb({"observation": _observation(np.random.default_rng(98))})
        logging.getLogger("websockets").setLevel(logging.CRITICAL)  # the reset below is meant; no traceback for it
        with connect(self.url, proxy=None, compression=None) as ws:
            ws.recv(timeout=10)  # metadata

            def read() -> None:
                with contextlib.suppress(Exception):
                    while True:
                        reply = unpackb(ws.recv(timeout=5))
                        self._count(reply.get("type") if reply.get("type") == "actions" else reply["error"]["code"])

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            with contextlib.suppress(Exception):
                for _ in range(MAX_REQUESTS_PER_CLIENT * 10):
                    if not self._running():
                        break
                    ws.send(frame)  # blocks when the server stops reading (TCP backpressure)
                    self._count("sent")
            # reset, not close: a close frame would queue behind thousands of sent requests the server then serves
            ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ws.socket.close()
            reader.join(10)

    def start(self) -> Abuser:
        thread = threading.Thread(target=self._max_cost if self.mode == "max_cost" else self._flood, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def run_clients(url: str, n_clients: int, num_steps: int, duration_s: float) -> dict[str, Any]:
    """N closed-loop clients for `duration_s`: throughput, latency percentiles, and every failure counted."""
    from fm_policy.deploy.client import PolicyClient

    clients = [PolicyClient(url) for _ in range(n_clients)]
    latencies: list[list[float]] = [[] for _ in range(n_clients)]
    failures: list[str] = []
    barrier = threading.Barrier(n_clients + 1)

    def worker(i: int) -> None:
        rng = np.random.default_rng(i)
        client = clients[i]
        for _ in range(3):  # warm-up, not measured
            client.infer(_observation(rng), num_steps=num_steps, timeout_s=30)
        barrier.wait(60)
        end = time.monotonic() + duration_s
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() >= end:
                break
            start = time.perf_counter()
            try:
                reply = client.infer(_observation(rng), num_steps=num_steps, timeout_s=30)
                if reply.actions.shape[0] == 0 or not np.isfinite(reply.actions).all():
                    failures.append("bad actions")
                latencies[i].append(time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 - counted as dropped
                failures.append(f"{type(exc).__name__}: {exc}"[:200])

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    barrier.wait(120)
    start = time.perf_counter()
    for t in threads:
        t.join(duration_s + 120)
    wall = time.perf_counter() - start
    for c in clients:
        c.close()
    flat = [x for per in latencies for x in per]
    return {"clients": n_clients, "num_steps": num_steps, "answered": len(flat), "dropped": len(failures),
            "failures": failures[:5], "requests_per_s": len(flat) / wall, **_pctl(flat),
            "per_client_requests_min": min(len(p) for p in latencies)}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from fm_policy.deploy.client import PolicyClient
    from fm_policy.versions import hardware_description

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, note = _policy_dir(args.checkpoint, Path(tmp))
        server = Server(checkpoint, args.threads)
        try:
            with PolicyClient(server.url, connect_timeout_s=180) as probe:
                spec = probe.spec
            runs: list[dict[str, Any]] = []
            for num_steps in (spec.num_steps, 1):
                for n in args.clients:
                    quiet = run_clients(server.url, n, num_steps, args.duration)
                    quiet["abuse"] = "none"
                    runs.append(quiet)
                    print(json.dumps(quiet), file=sys.stderr, flush=True)
                    for mode in ABUSE_MODES:
                        abuser = Abuser(server.url, mode, max_seconds=args.duration + 60).start()
                        time.sleep(0.5)  # the abuse is under way before the measurement starts
                        loaded = run_clients(server.url, n, num_steps, args.duration)
                        abuser.stop()
                        loaded.update(abuse=mode, abuser=abuser.outcomes,
                                      p99_vs_quiet=loaded["p99_ms"] / quiet["p99_ms"])
                        runs.append(loaded)
                        print(json.dumps(loaded), file=sys.stderr, flush=True)
            stats = server.stats()
        finally:
            server.close()
    hw = hardware_description("cpu")
    return {"date": str(date.today()), "command": " ".join(["python -m fm_policy.eval.benchmarks.bench_serve_load",
                                                             *sys.argv[1:]]),
            "policy": note, "hardware": hw, "torch": torch.__version__,
            "server": {"num_steps": spec.num_steps, "max_nfe": spec.max_nfe, "request_timeout_s": spec.request_timeout_s,
                       "solver": spec.solver, "flags": f"defaults (--threads {args.threads})"},
            "duration_s": args.duration, "runs": runs, "server_stats_counts": stats.get("counts", {})}


def markdown(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    lines = [
        "# Policy server under load: well-behaved clients, alone and next to an abusive one",
        "",
        f"Command: `{result['command']}`",
        "",
        (f"Hardware: {hw['cpu']}, {hw['cpu_count']} cores (shared with other jobs), torch {result['torch']} CPU, "
         f"{hw['torch_threads']} torch thread; measured {result['date']}. Server: `fm-policy serve` in its own "
         f"process with default limits (max {result['server']['max_nfe']} network evaluations per request, "
         f"{result['server']['request_timeout_s']:g} s deadline, preemption on); clients: threads of one process on "
         f"loopback. Policy: {result['policy']}."),
        "",
        (f"Each row: N clients, each with its own connection, sending the next request as soon as the last is "
         f"answered, for {result['duration_s']:g} s. `dropped`: requests of these clients that did not get actions "
         "(errors or timeouts). Abuse: `max_cost` = one more connection looping rk4 x 32 steps (128 network "
         "evaluations, 16x the default request); `flood` = one more connection pipelining default requests "
         "without waiting for replies. `p99 / quiet`: the well-behaved clients' p99 divided by the same row "
         "without abuse."),
        "",
        "| steps | clients | abuse | requests/s | p50 ms | p99 ms | p99 / quiet | answered | dropped | abuser got |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        ratio = f"{r['p99_vs_quiet']:.2f}" if "p99_vs_quiet" in r else ""
        abuser = ", ".join(f"{k} {v}" for k, v in sorted(r.get("abuser", {}).items()))
        lines.append(f"| {r['num_steps']} | {r['clients']} | {r['abuse']} | {r['requests_per_s']:.1f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {ratio} | {r['answered']} | {r['dropped']} | {abuser} |")
    worst = {mode: max((r["p99_vs_quiet"] for r in result["runs"] if r["abuse"] == mode), default=float("nan"))
             for mode in ABUSE_MODES}
    dropped = sum(r["dropped"] for r in result["runs"])
    counts = result["server_stats_counts"]
    lines += [
        "",
        (f"Well-behaved requests dropped in all runs: {dropped}. Worst p99 / quiet: max_cost "
         f"{worst['max_cost']:.2f}, flood {worst['flood']:.2f}."),
        "",
        "Server counters over the whole benchmark (`GET /stats`): "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ".",
        "",
        ("How to read it: costly requests run on a second copy of the policy and pause before each network "
         "evaluation while any cheaper request waits, so the max-cost abuser adds at most one network call to a "
         "well-behaved request; while the well-behaved clients keep the server saturated, the abuser's requests "
         "wait (cancelled at their 5 s deadline: `deadline_exceeded`) or are displaced from the full queue "
         "(`busy`). The flooder sends its next request before reading its reply, so its requests run on that same "
         "preemptible lane, behind every client that waits for its replies."),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a saved flow policy (default: untrained Push-T keypoint architecture)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/results/deploy_load.json")
    parser.add_argument("--md", default="docs/results/deploy_load.md")
    parser.add_argument("--render", metavar="JSON", help="only re-write --md from a saved result (no measuring)")
    args = parser.parse_args(argv)
    if args.render:
        write_results(json.loads(Path(args.render).read_text()), None, args.md,
                      markdown(json.loads(Path(args.render).read_text())))
        return 0
    args.clients = [int(c) for c in args.clients.split(",")]
    if not 0 < args.duration <= 120 or max(args.clients) > 30:
        parser.error("--duration must be in (0, 120] s and at most 30 clients (the server accepts 32 connections)")
    result = bench(args)
    write_results(result, args.out, args.md, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
