"""Benchmark of the Franka Kitchen scripted expert (fm_policy.datasets.experts.kitchen).

Runs every single task and the four-task sequence microwave -> kettle -> light switch -> slide cabinet for
`--episodes` episodes each (env seed i, planner seed `planner_seed_for(--seed, i)`: the same derivation as
`fm-policy collect`), no retries, within the env's step limit; success = the env's own completion info. Writes a
JSON (summary + per-episode records) and a Markdown report with the command and hardware.

    python -m fm_policy.eval.benchmarks.bench_kitchen_expert --episodes 50 \
        --out docs/results/kitchen_expert.json --md docs/results/kitchen_expert.md
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core per episode; set before numpy is imported
os.environ.setdefault("MUJOCO_GL", "egl")

import argparse  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from fm_policy.eval.benchmarks.bench_common import write_results  # noqa: E402

from fm_policy.versions import cpu_name, package_versions  # noqa: E402

SEQUENCE = ("microwave", "kettle", "light switch", "slide cabinet")
SINGLE = ("microwave", "kettle", "light switch", "slide cabinet", "bottom burner", "top burner", "hinge cabinet")

_CACHE: dict[tuple[str, ...], Any] = {}


def run_job(job: tuple[tuple[str, ...], int, int, int]) -> dict[str, Any]:
    """One expert episode: (tasks, env seed, dataset seed, step limit) -> JSON-able record."""
    from fm_policy.datasets.experts.kitchen import KitchenExpert, run_expert_episode
    from fm_policy.datasets.seeds import planner_seed_for
    from fm_policy.envs.kitchen import KitchenEnv

    tasks, index, seed, max_steps = job
    if tasks not in _CACHE:  # env creation is not part of an episode's cost
        env = KitchenEnv(tasks=list(tasks), max_episode_steps=max_steps)
        _CACHE[tasks] = (env, KitchenExpert(env))
    env, expert = _CACHE[tasks]
    cpu0 = time.process_time()
    r = run_expert_episode(env, planner_seed=planner_seed_for(seed, index), env_seed=index, expert=expert)
    return {"tasks": list(tasks), "env_seed": index, "success": r["success"], "steps": r["steps"],
            "completed": r["completed"], "wall_s": r["wall_s"], "cpu_s": time.process_time() - cpu0}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if r["success"]]
    steps = np.array([r["steps"] for r in ok] or [np.nan], dtype=float)
    return {
        "episodes": len(records),
        "success": len(ok),
        "success_rate": len(ok) / len(records),
        "failed_env_seeds": [r["env_seed"] for r in records if not r["success"]],
        "mean_tasks_completed": float(np.mean([len(r["completed"]) for r in records])),
        "steps_mean_success": float(np.mean(steps)),
        "steps_max_success": float(np.max(steps)),
        "wall_s_mean": float(np.mean([r["wall_s"] for r in records])),
        "cpu_s_mean": float(np.mean([r["cpu_s"] for r in records])),
    }


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Franka Kitchen scripted expert: benchmark",
        "",
        (f"FrankaKitchen-v1 through `fm_policy.envs.kitchen.KitchenEnv`, step limit {result['max_steps']}, "
         f"{result['episodes']} episodes per row (env seeds 0..{result['episodes'] - 1}, planner seed "
         f"`planner_seed_for({result['seed']}, i)`), no retries; success = the env's completion info "
         "(every task of the row completed). Times are wall-clock / CPU seconds per episode, one process."),
        "",
        "| tasks | success | mean tasks done | steps mean / max (successes) | wall s / ep | CPU s / ep |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in result["summary"].items():
        lines.append(
            f"| {name} | **{s['success']} / {s['episodes']}** ({100 * s['success_rate']:.0f}%) | "
            f"{s['mean_tasks_completed']:.2f} | {s['steps_mean_success']:.1f} / {s['steps_max_success']:.0f} | "
            f"{s['wall_s_mean']:.2f} | {s['cpu_s_mean']:.2f} |"
        )
    lines += ["", "Failed env seeds: " + "; ".join(
        f"{name}: {s['failed_env_seeds'] or 'none'}" for name, s in result["summary"].items()), ""]
    lines += ["Command:", "", "```", result["command"], "```", "",
              f"Hardware: {result['machine']['cpu']}, {result['machine']['cores']} cores, {result['workers']} worker "
              f"process(es). Python {result['machine']['python']}; "
              + ", ".join(f"{k} {v}" for k, v in result["machine"]["versions"].items())
              + f". Total wall time {result['total_wall_s']:.0f} s. Date: {result['date']}.", ""]
    if result["note"]:
        lines += [f"Note: {result['note']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from fm_policy.datasets.experts.kitchen import KitchenExpertConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="dataset seed for the planner-seed derivation")
    p.add_argument("--max-steps", type=int, default=280)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rows", default="single,sequence",
                   help="comma-separated: 'single' (all seven tasks), 'sequence', or single task names")
    p.add_argument("--out", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--note", default="")
    args = p.parse_args(argv)

    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in ("single", "sequence", *SINGLE)]
    if unknown:
        p.error(f"unknown rows {unknown}")
    rows: list[tuple[str, tuple[str, ...]]] = [(t, (t,)) for t in SINGLE if "single" in wanted or t in wanted]
    if "sequence" in wanted:
        rows.append((" -> ".join(SEQUENCE), SEQUENCE))
    t0 = time.perf_counter()
    summary: dict[str, Any] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    pool = get_context("spawn").Pool(args.workers) if args.workers > 1 else None
    try:
        for name, tasks in rows:
            jobs = [(tasks, i, args.seed, args.max_steps) for i in range(args.episodes)]
            recs = list(pool.imap(run_job, jobs)) if pool else [run_job(j) for j in jobs]
            records[name] = recs
            summary[name] = summarize(recs)
            s = summary[name]
            print(f"{name}: {s['success']}/{s['episodes']} steps {s['steps_mean_success']:.1f} "
                  f"wall {s['wall_s_mean']:.2f}s failed {s['failed_env_seeds']}", flush=True)
    finally:
        if pool:
            pool.close()
    versions = package_versions(("gymnasium-robotics", "mujoco", "gymnasium", "scipy", "numpy"))
    result = {
        "episodes": args.episodes, "seed": args.seed, "max_steps": args.max_steps, "workers": args.workers,
        "command": "python -m fm_policy.eval.benchmarks.bench_kitchen_expert " + shlex.join(sys.argv[1:]) if argv is None else "main(" + repr(argv) + ")",
        "note": args.note, "total_wall_s": time.perf_counter() - t0,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "versions": versions},
        "expert_config": KitchenExpertConfig().__dict__,
        "summary": summary, "records": records,
    }
    write_results(result, args.out, args.md, to_markdown(result))
    return result


if __name__ == "__main__":
    main()
