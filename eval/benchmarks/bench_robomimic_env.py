"""Env steps/s of the robomimic tasks (`python -m fm_policy.eval.benchmarks.bench_robomimic_env [--cameras agentview] [--steps N]`).

Why a script: the step rate decides how evaluation and expert collection are budgeted (robosuite is the slowest
simulator in the package), so the number is recorded with the exact command that produced it. Construction and the
first reset (numba JIT on the first Lift in a fresh install) are timed separately from stepping.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def bench(task: str, steps: int, cameras: list[str]) -> dict[str, float]:
    from fm_policy.envs.registry import make_env

    t0 = time.perf_counter()
    env = make_env(f"robomimic/{task}", cameras=cameras, max_episode_steps=10**9)
    env.reset(seed=0)
    t1 = time.perf_counter()
    rng = np.random.default_rng(0)
    for _ in range(20):  # warm-up
        env.step(rng.uniform(-1, 1, 7))
    t2, c2 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        env.step(rng.uniform(-1, 1, 7))
    t3, c3 = time.perf_counter(), time.process_time()
    env.reset(seed=1)
    t4 = time.perf_counter()
    env.close()
    return {
        "make_and_reset_s": t1 - t0,
        "steps_per_s": steps / (t3 - t2),
        # per CPU-second of this process: about what an unloaded core gives, whatever else the machine runs
        "steps_per_cpu_s": steps / max(c3 - c2, 1e-9),
        "reset_s": t4 - t3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="lift,can,square")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--cameras", default="", help="comma-separated camera names, e.g. agentview")
    args = parser.parse_args()
    cameras = [c for c in args.cameras.split(",") if c]
    results = {t: bench(t, args.steps, cameras) for t in args.tasks.split(",")}
    print(json.dumps({"cameras": cameras, "steps": args.steps, "load_avg_1m": os.getloadavg()[0],
                      "cpus": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
