"""Benchmark of the Push-T planning expert (fm_policy.datasets.experts.pusht) over a range of env seeds.

Measures success without retries and with up to `--max-retries` retries (fresh planner seeds from
`retry_planner_seed`), episode length, wall-clock and CPU seconds per state-only episode on one core, and the
final coverage; writes a JSON (summary + per-seed records) and a Markdown report.

    python -m fm_policy.eval.benchmarks.bench_pusht_expert --seeds 0:200 --workers 1 \
        --out docs/results/pusht_expert.json --md docs/results/pusht_expert.md

The planner seed of env seed s is `s + --planner-seed-offset` (0 by default). `--goal x,y,angle` runs a
non-default goal pose through fm_policy.envs.PushTEnv(goal_pose=...); by default gym-pusht's own env is used.
"""

from __future__ import annotations

import os

# One core per episode, as in the acceptance budget; set before numpy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from multiprocessing import Pool  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from fm_policy.versions import cpu_name, package_versions, usable_cores  # noqa: E402

_ENV = None  # one env per (worker) process


def _parse_seeds(spec: str) -> list[int]:
    """'a:b' -> range(a, b); 'a,b,c' -> that list."""
    if ":" in spec:
        a, b = spec.split(":")
        return list(range(int(a), int(b)))
    return [int(s) for s in spec.split(",")]


def _get_env(goal: tuple[float, float, float] | None, max_steps: int) -> Any:
    """The process's state-obs Push-T env (created once: env creation is not part of an episode's cost)."""
    global _ENV
    if _ENV is None:
        if goal is None:
            import gym_pusht  # noqa: F401  (registers the env)
            import gymnasium as gym

            _ENV = gym.make("gym_pusht/PushT-v0", obs_type="state")
        else:
            from fm_policy.envs import PushTEnv

            _ENV = PushTEnv(obs_mode="state", goal_pose=goal, max_episode_steps=max_steps)
    return _ENV


def run_seed(job: tuple[int, int, int, int, tuple[float, float, float] | None]) -> dict[str, Any]:
    """Runs env seed `seed` (attempt 0, then retries while failing); returns a JSON-able record."""
    from fm_policy.datasets.experts.pusht import retry_planner_seed, run_expert_episode

    seed, planner_seed, max_retries, max_steps, goal = job
    env = _get_env(goal, max_steps)
    attempts = []
    for attempt in range(max_retries + 1):
        cpu0 = time.process_time()
        r = run_expert_episode(env, seed, retry_planner_seed(planner_seed, attempt), max_steps=max_steps)
        attempts.append({
            "planner_seed": r["planner_seed"],
            "success": r["success"],
            "steps": r["steps"],
            "coverage": r["coverage"],
            "wall_s": r["wall_time"],
            "cpu_s": time.process_time() - cpu0,
            "n_primitives": r["n_primitives"],
        })
        if r["success"]:
            break
    return {"env_seed": seed, "attempts": attempts}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Success without / with retries and first-attempt statistics (a failure counts all its steps)."""
    first = [r["attempts"][0] for r in records]
    steps = np.array([a["steps"] for a in first], dtype=float)
    wall = np.array([a["wall_s"] for a in first])
    cpu = np.array([a["cpu_s"] for a in first])
    n = len(records)
    ok_first = sum(a["success"] for a in first)
    ok_retry = sum(r["attempts"][-1]["success"] for r in records)
    return {
        "episodes": n,
        "success_no_retry": ok_first,
        "success_rate_no_retry": ok_first / n,
        "success_with_retries": ok_retry,
        "success_rate_with_retries": ok_retry / n,
        "failed_seeds_no_retry": [r["env_seed"] for r in records if not r["attempts"][0]["success"]],
        "failed_seeds_with_retries": [r["env_seed"] for r in records if not r["attempts"][-1]["success"]],
        "steps_mean": float(steps.mean()),
        "steps_median": float(np.median(steps)),
        "steps_p90": float(np.percentile(steps, 90)),
        "steps_max": int(steps.max()),
        "wall_s_mean": float(wall.mean()),
        "wall_s_median": float(np.median(wall)),
        "wall_s_max": float(wall.max()),
        "cpu_s_mean": float(cpu.mean()),
        "cpu_s_median": float(np.median(cpu)),
        "cpu_s_max": float(cpu.max()),
        "coverage_mean": float(np.mean([a["coverage"] for a in first])),
        "primitives_mean": float(np.mean([a["n_primitives"] for a in first])),
    }


def machine_info() -> dict[str, str]:
    """CPU model / usable cores (`fm_policy.versions`), Python and package versions, date."""
    versions = package_versions(("gym-pusht", "pymunk", "shapely", "gymnasium", "numpy"))
    return {
        "cpu_model": cpu_name(),
        "nproc": str(usable_cores()),
        "python": platform.python_version(),
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def to_markdown(result: dict[str, Any]) -> str:
    """The report: summary table, failures, exact command, hardware, versions, config."""
    s, m = result["summary"], result["machine"]
    n = s["episodes"]
    lines = [
        "# Push-T planning expert: benchmark",
        "",
        f"Env seeds `{result['seeds']}` ("
        + ("gym_pusht/PushT-v0, obs_type=state, default goal pose (256, 256, pi/4)" if result["goal"] is None
           else f"fm_policy.envs.PushTEnv, obs_mode=state, goal pose {tuple(result['goal'])}")
        + "), "
        f"planner seed = env seed + {result['planner_seed_offset']}, at most {result['max_steps']} steps, "
        "success = coverage > 0.95. Times are per state-only episode on one core (numpy threads = 1).",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| success, no retries | **{s['success_no_retry']} / {n}** ({100 * s['success_rate_no_retry']:.1f}%) |",
        f"| success, up to {result['max_retries']} retries | **{s['success_with_retries']} / {n}** "
        f"({100 * s['success_rate_with_retries']:.1f}%) |",
        f"| steps mean / median / p90 / max (first attempt) | {s['steps_mean']:.1f} / {s['steps_median']:.0f} / "
        f"{s['steps_p90']:.0f} / {s['steps_max']} |",
        f"| wall s per episode mean / median / max | {s['wall_s_mean']:.2f} / {s['wall_s_median']:.2f} / "
        f"{s['wall_s_max']:.2f} |",
        f"| CPU s per episode mean / median / max | {s['cpu_s_mean']:.2f} / {s['cpu_s_median']:.2f} / "
        f"{s['cpu_s_max']:.2f} |",
        f"| mean final coverage (first attempt) | {s['coverage_mean']:.3f} |",
        f"| mean primitives (plans) per episode | {s['primitives_mean']:.1f} |",
        "",
        f"Failed seeds without retries: {s['failed_seeds_no_retry'] or 'none'}; "
        f"with retries: {s['failed_seeds_with_retries'] or 'none'}.",
        "",
    ]
    retried = [r for r in result["records"] if len(r["attempts"]) > 1]
    if retried:
        lines += ["| env seed | attempts (success, steps, final coverage) |", "| --- | --- |"]
        for r in retried:
            cells = ", ".join(f"({a['success']}, {a['steps']}, {a['coverage']:.3f})" for a in r["attempts"])
            lines.append(f"| {r['env_seed']} | {cells} |")
        lines.append("")
    lines += [
        "Command:",
        "",
        "```",
        result["command"],
        "```",
        "",
        f"Hardware: {m['cpu_model']}, nproc = {m['nproc']}, {result['workers']} worker process(es). "
        f"Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f". Date: {m['date']}.",
        "",
    ]
    if result["note"]:
        lines += [f"Note: {result['note']}", ""]
    lines += ["Planner config (defaults of `PushTExpertConfig`):", "", "```",
              json.dumps(result["config"]), "```", ""]
    extra = result.get("additional_runs")  # runs added to the JSON by hand (with their commands), not by main()
    if extra:
        lines += [f"## {extra['title']}", "",
                  "| run | success, no retries | with up to 2 retries | steps mean / median / p90 / max | wall s mean / max "
                  "| CPU s mean / max | mean final coverage |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in extra["rows"]:
            lines.append(
                f"| {r['run']} | {r['success_no_retry']} / {r['episodes']} | {r['success_with_retries']} / {r['episodes']} "
                f"| {r['steps_mean']:.1f} / {r['steps_median']:.0f} / {r['steps_p90']:.0f} / {r['steps_max']} "
                f"| {r['wall_s_mean']:.2f} / {r['wall_s_max']:.2f} | {r['cpu_s_mean']:.2f} / {r['cpu_s_max']:.2f} "
                f"| {r['coverage_mean']:.3f} |")
        lines += ["", "Commands: " + " and ".join(f"`{r['command']}`" for r in extra["rows"]) + f" ({extra['note']}).", ""]
    if result.get("notes"):
        lines += ["Notes:", "", *[f"- {note}" for note in result["notes"]], ""]
    if result.get("provenance"):
        lines += [f"Source of the numbers: `pusht_expert.json` ({result['provenance']}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point; returns the result dict that is written to --out."""
    from fm_policy.datasets.experts.pusht import PushTExpertConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0:200", help="env seeds, 'a:b' or 'a,b,c'")
    p.add_argument("--workers", type=int, default=1, help="processes (each episode runs on one core)")
    p.add_argument("--max-retries", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--planner-seed-offset", type=int, default=0)
    p.add_argument("--goal", default=None, help="non-default goal pose 'x,y,angle' (fm_policy.envs.PushTEnv)")
    p.add_argument("--out", default=None, help="JSON output path")
    p.add_argument("--md", default=None, help="Markdown report path")
    p.add_argument("--note", default="", help="free text for the report (e.g. machine load)")
    args = p.parse_args(argv)

    seeds = _parse_seeds(args.seeds)
    goal = None if args.goal is None else tuple(float(v) for v in args.goal.split(","))
    jobs = [(s, s + args.planner_seed_offset, args.max_retries, args.max_steps, goal) for s in seeds]
    t0 = time.perf_counter()
    if args.workers > 1:
        with Pool(args.workers) as pool:
            records = []
            for r in pool.imap(run_seed, jobs):
                records.append(r)
                _print_record(r)
    else:
        records = []
        for job in jobs:
            records.append(run_seed(job))
            _print_record(records[-1])
    result = {
        "seeds": args.seeds,
        "planner_seed_offset": args.planner_seed_offset,
        "goal": goal,
        "max_steps": args.max_steps,
        "max_retries": args.max_retries,
        "workers": args.workers,
        "command": "python -m fm_policy.eval.benchmarks.bench_pusht_expert " + shlex.join(sys.argv[1:]) if argv is None else "main(" + repr(argv) + ")",
        "note": args.note,
        "total_wall_s": time.perf_counter() - t0,
        "machine": machine_info(),
        "config": dataclasses.asdict(PushTExpertConfig()),
        "summary": summarize(records),
        "records": records,
    }
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.md:
        os.makedirs(os.path.dirname(args.md) or ".", exist_ok=True)
        with open(args.md, "w") as f:
            f.write(to_markdown(result))
    return result


def _print_record(r: dict[str, Any]) -> None:
    """One progress line per env seed."""
    cells = " | ".join(f"ok={a['success']} steps={a['steps']} cov={a['coverage']:.3f} {a['wall_s']:.2f}s"
                       for a in r["attempts"])
    print(f"seed {r['env_seed']}: {cells}", flush=True)


if __name__ == "__main__":
    main()
