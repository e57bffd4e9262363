"""Compose docs/results/pusht.md: flow vs Diffusion Policy baseline, same data and network, from eval reports.

    python -m fm_policy.eval.benchmarks.pusht_results \
        --report flow=runs/pusht_keypoints_flow_cpu/eval/eval.json \
        --report ddpm-ddim=runs/pusht_keypoints_ddpm_cpu/eval_ddim/eval.json \
        --report ddpm-ddpm=runs/pusht_keypoints_ddpm_cpu/eval_ddpm/eval.json \
        --run flow=runs/pusht_keypoints_flow_cpu --run ddpm=runs/pusht_keypoints_ddpm_cpu \
        --commands docs/results/pusht_commands.txt --json docs/results/pusht.json --out docs/results/pusht.md

Several training seeds: give one path per seed, comma-separated (a single path keeps the one-report row). Rows then
pool the seeds' episodes and also show every seed's own numbers; `--disturbed` adds a robustness table measured in
rollouts (`fm-policy eval --disturbance ...`), `--base` a fine-tuning cost line:

    python -m fm_policy.eval.benchmarks.pusht_results \
        --report flow=runs/flow_s0/eval/eval.json,runs/flow_s1/eval/eval.json,runs/flow_s2/eval/eval.json \
        --disturbed flow=none=runs/flow_s0/eval/eval.json,runs/flow_s1/eval/eval.json \
        --disturbed flow=obs-noise-5px=runs/flow_s0/eval_noise5/eval.json,runs/flow_s1/eval_noise5/eval.json \
        --analysis flow=runs/flow_s0/analysis.json,runs/flow_s1/analysis.json \
        --runs flow=runs/flow_s0,runs/flow_s1,runs/flow_s2 --runs ft=runs/ft_s0,runs/ft_s1 --base flow ...

Two steps, so that the page never holds a number its committed JSON does not:
1. `page_data` reads the eval reports (`fm-policy eval`), the runs' `training_sessions.json` and optional
   `fm-policy analyze-flow --json` outputs, and keeps exactly the numbers the page shows; `--json` writes them
   (default: the page's path with `.json`);
2. `render` turns that JSON into the page. `python -m fm_policy.eval.benchmarks.compose_results` calls the same
   `render` on the committed JSON, which is how the page is regenerated and checked without the (git-ignored) runs.
The commands file lists the exact commands that produced the data, the training runs and the reports.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from fm_policy.eval.metrics import mean_ci, rate_ci

Paths = str | list[str]
"""One path (a single report / run / analysis: the one-seed rows), or one per training seed."""


def _pairs(values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        name, _, path = value.partition("=")
        if not path:
            raise SystemExit(f"expected NAME=PATH, got '{value}'")
        out[name] = path
    return out


def _split(paths: str) -> Paths:
    """'a.json' -> 'a.json' (one path, as before); 'a.json,b.json' -> ['a.json', 'b.json'] (one per seed)."""
    parts = [p for p in paths.split(",") if p]
    if not parts:
        raise SystemExit(f"expected one or more comma-separated paths, got '{paths}'")
    return parts[0] if len(parts) == 1 else parts


def _path_lists(values: list[str]) -> dict[str, Paths]:
    """NAME=PATH[,PATH...] options -> {NAME: path or [paths]}."""
    return {name: _split(paths) for name, paths in _pairs(values).items()}


def _disturbed_triples(values: list[str]) -> list[tuple[str, str, list[str]]]:
    """NAME=LABEL=PATH[,PATH...] options -> [(NAME, LABEL, [paths])]."""
    out = []
    for value in values:
        name, _, rest = value.partition("=")
        label, _, paths = rest.partition("=")
        if not (name and label and paths):
            raise SystemExit(f"--disturbed expects NAME=LABEL[@STEPS]=EVAL_JSON[,EVAL_JSON...], got '{value}'")
        split = _split(paths)
        out.append((name, label, [split] if isinstance(split, str) else split))
    return out


def _as_list(paths: Paths) -> list[str]:
    return [paths] if isinstance(paths, str) else list(paths)


def _single(paths: Paths) -> str | None:
    """The path when one was given (the one-seed behaviour), else None."""
    paths = _as_list(paths)
    return paths[0] if len(paths) == 1 else None


def _sessions(run_dir: str) -> list[dict[str, Any]]:
    path = Path(run_dir) / "training_sessions.json"
    return json.loads(path.read_text()) if path.exists() else []


def _row(row: dict[str, Any]) -> str:
    score, success = row["score"], row["success"]
    return (
        f"| {row['policy']} | {row['num_steps']} | {score['value']:.3f} [{score['lo']:.3f}, {score['hi']:.3f}] | "
        f"{success['value']:.2f} [{success['lo']:.2f}, {success['hi']:.2f}] ({success['k']}/{success['n']}) | "
        f"{row['ms_per_env_p50']:.2f} | {row['ms_per_call_p50']:.1f} / {row['ms_per_call_p99']:.1f} |"
    )


ROBUSTNESS_KEYS = ("gain_noise_mean", "gain_noise_max", "gain_mid_mean", "gain_mid_max", "jac_full_max",
                   "jac_full_mean", "jac_residual_max")


ROBUSTNESS_EXTRA_KEYS = ("certified_rate_min", "certified_rate_mean", "jac_full_max", "gain_obs_mean", "gain_obs_max",
                         "base_gain_obs_mean", "base_gain_obs_max")
"""Certified vs measured (second robustness table): the residual's by-construction contraction rate c
(mu(sym dr/dx) <= -c; absent for a policy without a residual), the largest symmetric-Jacobian eigenvalue measured for
the refined field v + r along the deployed trajectories (`jac_full_max`, also in the first table), and the
observation-to-chunk gain of the whole sampler (`gain_obs_*`; `base_gain_obs_*`: the frozen base sampler's)."""


def _estimate(est: dict[str, Any]) -> dict[str, float]:
    return {"value": est["value"], "lo": est["lo"], "hi": est["hi"]}


def _report_rows(name: str, report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for setting in report["settings"]:
        success, timing = setting["success"], setting["timing"]
        rows.append({
            "policy": name, "num_steps": setting["num_steps"], "score": _estimate(setting["score"]),
            "success": {**_estimate(success), "k": round(success["value"] * success["n"]), "n": success["n"]},
            "ms_per_env_p50": timing["per_env_p50_ms"], "ms_per_call_p50": timing["p50_ms"],
            "ms_per_call_p99": timing["p99_ms"],
        })
    return rows


def _load_reports(paths: list[str]) -> list[dict[str, Any]]:
    return [json.loads(Path(path).read_text()) for path in paths]


def _check_seeds(what: str, paths: list[str], reports: list[dict[str, Any]]) -> None:
    """All training seeds of one row were evaluated alike: same settings, disturbance and episodes per setting."""
    if len(set(paths)) != len(paths):
        raise SystemExit(f"{what}: the same eval report is given twice ({paths}); give one report per training seed")
    first = reports[0]
    for path, report in zip(paths[1:], reports[1:]):
        for key, words in (("num_steps", "num_steps settings"), ("disturbance", "disturbance"),
                           ("n_episodes", "episodes per setting")):
            a, b = first["env_info"].get(key), report["env_info"].get(key)
            if a != b:
                raise SystemExit(f"{what}: the seeds' eval reports differ in {words}: {paths[0]} has {a!r}, "
                                 f"{path} has {b!r} (every seed of a row must be evaluated alike)")
        steps_a = [s["num_steps"] for s in first["settings"]]
        steps_b = [s["num_steps"] for s in report["settings"]]
        if steps_a != steps_b:
            raise SystemExit(f"{what}: the seeds' eval reports hold different num_steps settings: {paths[0]} has "
                             f"{steps_a}, {path} has {steps_b}")


def _median(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.median(finite)) if finite else None


def _std(values: list[float]) -> float | None:
    """Sample standard deviation across seeds (ddof 1); None for one seed."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _seed_rows(name: str, paths: list[str], reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per num_steps setting, pooling the episodes of every training seed's eval report (see `render`)."""
    rows = []
    for index, setting in enumerate(reports[0]["settings"]):
        settings = [report["settings"][index] for report in reports]
        scores = [[float(ep["max_reward"]) for ep in s["episodes"]] for s in settings]
        flags = [[bool(ep["success"]) for ep in s["episodes"]] for s in settings]
        counts = {len(f) for f in flags}
        if len(counts) != 1:
            raise SystemExit(f"{name} (num_steps {setting['num_steps']}): the seeds' reports hold "
                             f"{[len(f) for f in flags]} episodes; every seed must run the same episodes")
        score = mean_ci([v for seed in scores for v in seed])
        success = rate_ci([v for seed in flags for v in seed])
        per_score = [float(np.mean(seed)) for seed in scores]
        per_success = [sum(seed) / len(seed) for seed in flags]
        rows.append({
            "policy": name, "num_steps": setting["num_steps"], "n_seeds": len(reports),
            "episodes_per_seed": counts.pop(), "reports": list(paths),
            "score": _estimate(score.to_dict()),
            "success": {**_estimate(success.to_dict()), "k": sum(sum(seed) for seed in flags), "n": success.n},
            "per_seed": {"score": per_score, "success": per_success, "k": [sum(seed) for seed in flags]},
            "across_seeds": {"score_mean": float(np.mean(per_score)), "score_std": _std(per_score),
                             "success_mean": float(np.mean(per_success)), "success_std": _std(per_success)},
            "ms_per_env_p50": _median([s["timing"]["per_env_p50_ms"] for s in settings]),
            "ms_per_call_p50": _median([s["timing"]["p50_ms"] for s in settings]),
            "ms_per_call_p99": _median([s["timing"]["p99_ms"] for s in settings]),
        })
    return rows


def _disturbance_words(disturbance: dict[str, Any] | None) -> str:
    if disturbance is None:
        return "no disturbance"
    from fm_policy.eval.report import _disturbance_text  # the eval report page's wording

    return _disturbance_text(disturbance)


def _disturbed_rows(name: str, label: str, paths: list[str]) -> list[dict[str, Any]]:
    """`label` may end in `@N`: keep only the num_steps N setting of the reports (e.g. the undisturbed reference row
    taken from a 1/2/4/8-step eval report)."""
    label, _, only = label.partition("@")
    reports = _load_reports(paths)
    _check_seeds(f"--disturbed {name}={label}", paths, reports)
    disturbance = reports[0]["env_info"].get("disturbance")
    rows = _seed_rows(name, paths, reports)
    if only:
        rows = [row for row in rows if str(row["num_steps"]) == only]
        if not rows:
            raise SystemExit(f"--disturbed {name}={label}@{only}: the reports hold no num_steps {only} setting")
    return [{**row, "label": label, "disturbance": disturbance, "disturbance_text": _disturbance_words(disturbance)}
            for row in rows]


def _samples(sessions: list[dict[str, Any]]) -> int:
    """Training samples drawn: optimizer steps x batch size, summed over the run's sessions."""
    return sum((s["steps"][1] - s["steps"][0]) * s["batch_size"] for s in sessions)


def _seed_runs_summary(name: str, run_dirs: list[str]) -> dict[str, Any] | None:
    """The training runs of one model, one per seed: per-seed steps, batch and minutes, mean and std of minutes."""
    runs = [(d, _sessions(d)) for d in run_dirs]
    missing = [d for d, sessions in runs if not sessions]
    if len(missing) == len(runs):
        return None
    if missing:
        raise SystemExit(f"--runs {name}: no training_sessions.json in {missing} (the other seeds have one)")
    minutes = [sum(s["seconds"] for s in sessions) / 60 for _, sessions in runs]
    last = [sessions[-1] for _, sessions in runs]
    return {
        "name": name, "run_dirs": list(run_dirs), "n_seeds": len(run_dirs),
        "steps_per_seed": [s["steps"][1] for s in last], "batch_size_per_seed": [s["batch_size"] for s in last],
        "samples_per_seed": [_samples(sessions) for _, sessions in runs],
        "parameters_m": last[0]["parameters"] / 1e6,
        "training_min_per_seed": minutes, "training_min": float(np.mean(minutes)), "training_min_std": _std(minutes),
        "hardware": " / ".join(dict.fromkeys(s["hardware"] for s in last)),
        "device": " / ".join(dict.fromkeys(s["device"] for s in last)),
        "torch_threads": " / ".join(dict.fromkeys(str(s["torch_threads"]) for s in last)),
        "final_train_loss_per_seed": [s["final_train_loss"] for s in last],
    }


def _cost(base: str, runs: dict[str, Paths]) -> dict[str, Any]:
    """Each run's training cost as a fraction of the `base` run's: minutes, and optimizer steps x batch size."""
    if base not in runs:
        raise SystemExit(f"--base {base}: no --run/--runs named '{base}' (have {sorted(runs)})")

    def measure(name: str) -> tuple[float, float] | None:
        per_seed = [_sessions(d) for d in _as_list(runs[name])]
        if not all(per_seed):
            return None
        return (float(np.mean([sum(s["seconds"] for s in sessions) / 60 for sessions in per_seed])),
                float(np.mean([_samples(sessions) for sessions in per_seed])))

    base_cost = measure(base)
    if base_cost is None or not all(base_cost):
        raise SystemExit(f"--base {base}: its runs have no (or zero-length) training_sessions.json")
    rows = []
    for name in runs:
        if name == base or (cost := measure(name)) is None:
            continue
        rows.append({"name": name, "minutes": cost[0], "samples": cost[1], "minutes_fraction": cost[0] / base_cost[0],
                     "samples_fraction": cost[1] / base_cost[1]})
    return {"base": base, "base_minutes": base_cost[0], "base_samples": base_cost[1], "rows": rows}


def _analysis_row(name: str, paths: Paths) -> dict[str, Any]:
    """One robustness row from an analyze-flow JSON, or the mean over seeds of each key from one JSON per seed."""
    files = _as_list(paths)
    stats = [json.loads(Path(path).read_text()) for path in files]
    steps = {int(s["num_steps"]) for s in stats}
    if len(steps) != 1:
        raise SystemExit(f"--analysis {name}: the seeds' analyze-flow outputs use different num_steps {sorted(steps)}")
    keys = [k for k in dict.fromkeys((*ROBUSTNESS_KEYS, *ROBUSTNESS_EXTRA_KEYS)) if k in stats[0]]
    for path, s in zip(files[1:], stats[1:]):
        if set(keys) - set(s):
            raise SystemExit(f"--analysis {name}: {path} lacks {sorted(set(keys) - set(s))} ({files[0]} has them)")
    row: dict[str, Any] = {"policy": name, "num_steps": steps.pop()}
    if len(stats) == 1:
        row.update({k: stats[0][k] for k in keys})
    else:
        row.update({k: float(np.mean([s[k] for s in stats])) for k in keys})
        row["n_seeds"] = len(stats)
    return row


def _run_summary(name: str, run_dir: str) -> dict[str, Any] | None:
    sessions = _sessions(run_dir)
    if not sessions:
        return None
    last = sessions[-1]
    return {
        "name": name, "run_dir": run_dir, "steps": last["steps"][1], "batch_size": last["batch_size"],
        "parameters_m": last["parameters"] / 1e6, "training_min": sum(s["seconds"] for s in sessions) / 60,
        "hardware": last["hardware"], "device": last["device"], "torch_threads": last["torch_threads"],
        "final_train_loss": last["final_train_loss"],
    }


def page_data(reports: dict[str, Paths], runs: dict[str, Paths], analyses: dict[str, Paths] | None = None,
              title: str = "Push-T: flow policy vs Diffusion Policy baseline", commands: str | None = None,
              notes: str | None = None, provenance: str | None = None,
              disturbed: list[tuple[str, str, list[str]]] | None = None, base: str | None = None) -> dict[str, Any]:
    """Everything the page shows, read from eval reports, training sessions and analyze-flow outputs.

    A value of `reports` / `runs` / `analyses` is one path (one row as before) or a list with one path per training
    seed (rows pooled over seeds, with every seed's own numbers). `disturbed`: (model, label, one eval report per
    seed) for the rollout robustness table. `base`: the run (name in `runs`) whose pre-training cost the others are
    compared with. Keys that only these options fill are left out when unused, so one-path pages are unchanged."""
    rows: list[dict[str, Any]] = []
    first_info = None
    for name, paths in reports.items():
        files = _as_list(paths)
        loaded = _load_reports(files)
        first_info = first_info or loaded[0]["env_info"]
        if len(files) == 1:
            rows += _report_rows(name, loaded[0])
        else:
            _check_seeds(f"--report {name}", files, loaded)
            rows += _seed_rows(name, files, loaded)
    disturbed_rows = [row for name, label, paths in disturbed or [] for row in _disturbed_rows(name, label, paths)]
    if first_info is None:
        if not disturbed_rows:
            raise SystemExit("give at least one --report or --disturbed eval report")
        first_info = json.loads(Path(disturbed_rows[0]["reports"][0]).read_text())["env_info"]
    info = first_info
    hardware = info["hardware"]
    if isinstance(hardware, dict):
        hardware = ", ".join(f"{k} {v}" for k, v in hardware.items())
    robustness = [_analysis_row(name, paths) for name, paths in (analyses or {}).items()]
    sources = list(dict.fromkeys([*(p for paths in reports.values() for p in _as_list(paths)),
                                  *(p for row in disturbed_rows for p in row["reports"])]))
    run_rows = []
    for name, paths in runs.items():
        one = _single(paths)
        summary = _run_summary(name, one) if one is not None else _seed_runs_summary(name, _as_list(paths))
        if summary is not None:
            run_rows.append(summary)
    data = {
        "title": title,
        "provenance": provenance or ("measured by the commands on the page; composed from the eval reports "
                                     + ", ".join(sources) + f" on {time.strftime('%Y-%m-%d')}"),
        "protocol": {"n_episodes": info["n_episodes"], "seeds": [info["seeds"][0], info["seeds"][-1]],
                     "max_episode_steps": info["max_episode_steps"]},
        "rows": rows,
        "hardware": hardware,
        "runs": run_rows,
        "robustness": robustness,
        "facts": [],
        "commands": commands,
        "notes": notes,
    }
    if disturbed_rows:
        data["disturbed"] = disturbed_rows
    if base is not None:
        data["cost"] = _cost(base, runs)
    return data


def robustness_table(rows: list[dict[str, Any]]) -> list[str]:
    """Disturbance response from `fm-policy analyze-flow --json` outputs: final-chunk movement per unit disturbance
    of the initial noise (gain_noise) and of the state at mid-trajectory (gain_mid), and the symmetric-Jacobian
    eigenvalue extremes along the trajectories."""
    return _stats_table(rows, ROBUSTNESS_KEYS)


def _stats_table(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[str]:
    lines = ["| policy | steps | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for stats in rows:
        cells = [f"{stats[k]:.4g}" if stats.get(k) is not None else "-" for k in keys]
        policy = stats["policy"] + (f" (mean of {stats['n_seeds']} seeds)" if stats.get("n_seeds") else "")
        lines.append(f"| {policy} | {stats['num_steps']} | " + " | ".join(cells) + " |")
    return lines


def certified_table(rows: list[dict[str, Any]]) -> list[str]:
    """Certified contraction rate of the residual next to what was measured (`ROBUSTNESS_EXTRA_KEYS`), for the rows
    whose analyze-flow output has any of those keys besides `jac_full_max`; nothing when none has."""
    new_keys = [k for k in ROBUSTNESS_EXTRA_KEYS if k not in ROBUSTNESS_KEYS]
    rows = [r for r in rows if any(r.get(k) is not None for k in new_keys)]
    return _stats_table(rows, ROBUSTNESS_EXTRA_KEYS) if rows else []


def _ms(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _per_seed(values: list[float], mean: float, std: float | None, digits: int) -> str:
    """`0.812, 0.845, 0.790 (0.816 ± 0.028)`: every seed's value, then mean ± std over seeds."""
    spread = f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else "one seed"
    return ", ".join(f"{v:.{digits}f}" for v in values) + f" ({spread})"


def _seed_cells(row: dict[str, Any]) -> str:
    score, success, per, across = row["score"], row["success"], row["per_seed"], row["across_seeds"]
    return (
        f"{row['n_seeds']} x {row['episodes_per_seed']} | {score['value']:.3f} [{score['lo']:.3f}, {score['hi']:.3f}] | "
        f"{_per_seed(per['score'], across['score_mean'], across['score_std'], 3)} | "
        f"{success['value']:.2f} [{success['lo']:.2f}, {success['hi']:.2f}] ({success['k']}/{success['n']}) | "
        f"{_per_seed(per['success'], across['success_mean'], across['success_std'], 2)} | "
        f"{_ms(row['ms_per_env_p50'])} |"
    )


SEED_COLUMNS = ("seeds x episodes | score pooled [95% CI] | score per seed (mean ± std) | success pooled [95% CI] "
                "(k/n) | success per seed (mean ± std) | ms per chunk per env (p50) |")
SEED_TEXT = (
    "Each row pools the episodes of several training seeds (one eval report per seed, every seed on the test seeds "
    "above). Score pooled = mean over all episodes of all seeds, with a bootstrap 95% interval that resamples the "
    "pooled episodes (seeds are not resampled, so the interval leaves out the variation between training seeds: read "
    "it with the per-seed values); success pooled = k/n over all episodes, with a Wilson 95% interval. Per seed: each "
    "seed's own score and success rate, then their mean ± sample standard deviation (ddof 1) over seeds. Latency = "
    "median over seeds of each seed's p50."
)


def seed_table(rows: list[dict[str, Any]]) -> list[str]:
    """Rows pooled over training seeds (`n_seeds`): pooled estimates, per-seed values, latency."""
    lines = ["| policy | steps | " + SEED_COLUMNS, "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {row['policy']} | {row['num_steps']} | {_seed_cells(row)}" for row in rows]
    return lines


def disturbed_table(rows: list[dict[str, Any]]) -> list[str]:
    """Success and score vs disturbance, in rollouts: one row per (model, disturbance label, num_steps), then what each
    label stands for (from the reports' `env_info["disturbance"]`)."""
    lines = ["| policy | disturbance | steps | " + SEED_COLUMNS, "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {row['policy']} | {row['label']} | {row['num_steps']} | {_seed_cells(row)}" for row in rows]
    labels = dict.fromkeys((row["label"], row["disturbance_text"]) for row in rows)
    lines += ["", *[f"- `{label}`: {text}" for label, text in labels]]
    return lines


def _seed_run_line(run: dict[str, Any]) -> str:
    def same(values: list[Any]) -> str:
        return str(values[0]) if len(set(values)) == 1 else " / ".join(map(str, values))

    minutes = ", ".join(f"{m:.1f}" for m in run["training_min_per_seed"])
    losses = " / ".join("-" if v is None else f"{v:.4f}" for v in run["final_train_loss_per_seed"])
    std = f" ± {run['training_min_std']:.1f}" if run["training_min_std"] is not None else ""
    return (f"- **{run['name']}** ({run['n_seeds']} seeds: {', '.join(run['run_dirs'])}): "
            f"{same(run['steps_per_seed'])} steps at batch {same(run['batch_size_per_seed'])} per seed, "
            f"{run['parameters_m']:.2f} M parameters, {run['training_min']:.1f}{std} min of training per seed (mean ± "
            f"std over seeds; {minutes}) on {run['hardware']} ({run['device']}, {run['torch_threads']} torch threads), "
            f"final training loss {losses}.")


def cost_lines(cost: dict[str, Any]) -> list[str]:
    """Fine-tuning cost as a fraction of the base run's pre-training, in minutes and in samples."""
    lines = [f"Relative to the pre-training of **{cost['base']}** ({cost['base_minutes']:.1f} min, "
             f"{cost['base_samples']:,.0f} samples = optimizer steps x batch size; means over seeds):", ""]
    for row in cost["rows"]:
        lines.append(f"- **{row['name']}**: {row['minutes']:.1f} min = {row['minutes_fraction']:.2f} of the "
                     f"pre-training time; {row['samples']:,.0f} samples = {row['samples_fraction']:.3f} of the "
                     "pre-training samples.")
    return lines


def render(data: dict[str, Any], root: str | Path = ".", json_name: str = "pusht.json",
           page: str = "pusht") -> str:
    """The page, from `page_data`'s dict (a committed JSON); `commands` / `notes` paths are relative to `root`."""
    root = Path(root)
    protocol = data["protocol"]
    lines = [f"# {data['title']}", ""]
    lines += [
        f"Test protocol: {protocol['n_episodes']} episodes per setting, env seeds {protocol['seeds'][0]}.."
        f"{protocol['seeds'][1]} (diffusion_policy's test seeds; the demonstrations use seeds below 100000), the "
        f"same seeds for every row; step limit {protocol['max_episode_steps']}. Score = mean over episodes of max "
        "clip(coverage / 0.95, 0, 1) with a bootstrap 95% interval; success = coverage > 0.95 at any step, with a "
        "Wilson 95% interval. Latency = one `predict_action_chunk` call, per env (batched over the running envs) "
        "and per call.",
        "",
    ]
    one_report = [row for row in data["rows"] if not row.get("n_seeds")]
    seed_rows = [row for row in data["rows"] if row.get("n_seeds")]
    if one_report or not seed_rows:
        lines += [
            "| policy | sampler steps | score [95% CI] | success [95% CI] | ms per chunk per env (p50) "
            "| ms per call p50 / p99 |",
            "|---|---|---|---|---|---|",
            *[_row(row) for row in one_report],
            "",
        ]
    if seed_rows:
        lines += ["## Several training seeds", "", SEED_TEXT, "", *seed_table(seed_rows), ""]
    lines += [f"Evaluation hardware: {data['hardware']}.", ""]
    for run in data["runs"]:
        if run.get("run_dirs"):
            lines.append(_seed_run_line(run))
            continue
        lines.append(
            f"- **{run['name']}** ({run['run_dir']}): {run['steps']} steps at batch {run['batch_size']}, "
            f"{run['parameters_m']:.2f} M parameters, {run['training_min']:.1f} min of training on {run['hardware']} "
            f"({run['device']}, {run['torch_threads']} torch threads), final training loss "
            f"{run['final_train_loss']:.4f}."
        )
    if data.get("robustness"):
        lines += ["", "## Robustness", "", "Measured by `fm-policy analyze-flow` on observations from the training "
                  "data (disturbance delta 0.01 in normalised action units; gains are final-chunk movement / "
                  "disturbance).",
                  "", *robustness_table(data["robustness"])]
        if certified := certified_table(data["robustness"]):
            lines += ["", "Certified against measured: `certified_rate_*` is the residual's contraction rate c "
                      "guaranteed by construction (largest symmetric-Jacobian eigenvalue of the residual <= -c, for any "
                      "weights; absent without a residual); `jac_full_max` the largest eigenvalue measured for the "
                      "refined field along the deployed trajectories; `gain_obs_*` the final-chunk movement per unit "
                      "observation disturbance (`base_gain_obs_*`: the frozen base sampler's). Rows over several seeds "
                      "show the mean over seeds of each seed's value (of a maximum: the mean of the maxima).",
                      "", *certified]
    if data.get("disturbed"):
        lines += ["", "## Success and score vs disturbance", "",
                  "Measured in rollouts (`fm-policy eval` with a disturbance, `fm_policy.eval.disturbances`; the "
                  "labels are explained below the table). Each disturbance is drawn per episode from its seed and the "
                  "env seed, so rows with the same label meet the same disturbances whatever the policy and step "
                  "count. Rows pool the episodes of the training seeds as in the seed table: score with a "
                  "bootstrap 95% interval over the pooled episodes (variation between seeds not included), success "
                  "k/n with a Wilson 95% interval, then each seed's value and the mean ± std (ddof 1) over seeds.", "",
                  *disturbed_table(data["disturbed"])]
    if data.get("cost"):
        lines += ["", "## Fine-tuning cost", "", *cost_lines(data["cost"])]
    if data.get("facts"):  # measurements from the runs' logs that no eval report holds (added to the JSON by hand)
        lines += ["", "## Other measurements", "", *[f"- {fact}" for fact in data["facts"]]]
    if data.get("commands"):
        lines += ["", "## Commands", "", "```bash", (root / data["commands"]).read_text().strip(), "```"]
    lines += ["", f"Source of every number above: [{json_name}]({json_name}), {data['provenance']}. "
              f"`python -m fm_policy.eval.benchmarks.compose_results --page {page}` renders this page from it; the "
              "page command above writes both from the runs."]
    text = "\n".join(lines) + "\n"
    if data.get("notes"):
        text += "\n" + (root / data["notes"]).read_text()
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", action="append", default=[],
                        help="NAME=eval.json (repeatable, in table order); NAME=a.json,b.json,...: one report per "
                             "training seed (the row pools their episodes and shows each seed's numbers)")
    parser.add_argument("--run", "--runs", dest="run", action="append", default=[],
                        help="NAME=run_dir (or NAME=dir1,dir2,...: one run per seed), for training time and hardware")
    parser.add_argument("--base", help="NAME of a --run whose pre-training cost the other runs are compared with")
    parser.add_argument("--commands", help="text file with the commands that produced the reports")
    parser.add_argument("--analysis", action="append", default=[],
                        help="NAME=analyze-flow JSON (robustness table); NAME=a.json,b.json: mean over seeds")
    parser.add_argument("--disturbed", action="append", default=[],
                        help="NAME=LABEL=eval.json[,eval.json...] (repeatable): rollouts under a disturbance, one "
                             "report per training seed, for the success-and-score-vs-disturbance table")
    parser.add_argument("--title", default="Push-T: flow policy vs Diffusion Policy baseline")
    parser.add_argument("--notes", help="Markdown file appended at the end (discussion of the numbers)")
    parser.add_argument("--out", default="docs/results/pusht.md")
    parser.add_argument("--json", help="where the page's numbers go (default: --out with .json)")
    args = parser.parse_args()
    out = Path(args.out)
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    data = page_data(_path_lists(args.report), _path_lists(args.run), _path_lists(args.analysis), args.title,
                     args.commands, args.notes, disturbed=_disturbed_triples(args.disturbed), base=args.base)
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    text = render(data, json_name=json_path.name, page=out.stem)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
