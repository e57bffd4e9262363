"""Compose docs/results/pusht.md: flow vs Diffusion Policy baseline, same data and network, from eval reports.

    python -m fm_policy.eval.benchmarks.pusht_results \
        --report flow=runs/pusht_keypoints_flow_cpu/eval/eval.json \
        --report ddpm-ddim=runs/pusht_keypoints_ddpm_cpu/eval_ddim/eval.json \
        --report ddpm-ddpm=runs/pusht_keypoints_ddpm_cpu/eval_ddpm/eval.json \
        --run flow=runs/pusht_keypoints_flow_cpu --run ddpm=runs/pusht_keypoints_ddpm_cpu \
        --commands docs/results/pusht_commands.txt --json docs/results/pusht.json --out docs/results/pusht.md

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


def _pairs(values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        name, _, path = value.partition("=")
        if not path:
            raise SystemExit(f"expected NAME=PATH, got '{value}'")
        out[name] = path
    return out


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


def page_data(reports: dict[str, str], runs: dict[str, str], analyses: dict[str, str] | None = None,
              title: str = "Push-T: flow policy vs Diffusion Policy baseline", commands: str | None = None,
              notes: str | None = None, provenance: str | None = None) -> dict[str, Any]:
    """Everything the page shows, read from eval reports, training sessions and analyze-flow outputs."""
    loaded = {name: json.loads(Path(path).read_text()) for name, path in reports.items()}
    info = next(iter(loaded.values()))["env_info"]
    hardware = info["hardware"]
    if isinstance(hardware, dict):
        hardware = ", ".join(f"{k} {v}" for k, v in hardware.items())
    robustness = []
    for name, path in (analyses or {}).items():
        stats = json.loads(Path(path).read_text())
        robustness.append({"policy": name, "num_steps": int(stats["num_steps"]),
                           **{k: stats[k] for k in ROBUSTNESS_KEYS if k in stats}})
    return {
        "title": title,
        "provenance": provenance or ("measured by the commands on the page; composed from the eval reports "
                                     + ", ".join(reports.values()) + f" on {time.strftime('%Y-%m-%d')}"),
        "protocol": {"n_episodes": info["n_episodes"], "seeds": [info["seeds"][0], info["seeds"][-1]],
                     "max_episode_steps": info["max_episode_steps"]},
        "rows": [row for name, report in loaded.items() for row in _report_rows(name, report)],
        "hardware": hardware,
        "runs": [r for name, run_dir in runs.items() if (r := _run_summary(name, run_dir)) is not None],
        "robustness": robustness,
        "facts": [],
        "commands": commands,
        "notes": notes,
    }


def robustness_table(rows: list[dict[str, Any]]) -> list[str]:
    """Disturbance response from `fm-policy analyze-flow --json` outputs: final-chunk movement per unit disturbance
    of the initial noise (gain_noise) and of the state at mid-trajectory (gain_mid), and the symmetric-Jacobian
    eigenvalue extremes along the trajectories."""
    lines = ["| policy | steps | " + " | ".join(ROBUSTNESS_KEYS) + " |", "|---|---|" + "---|" * len(ROBUSTNESS_KEYS)]
    for stats in rows:
        cells = [f"{stats[k]:.4g}" if stats.get(k) is not None else "-" for k in ROBUSTNESS_KEYS]
        lines.append(f"| {stats['policy']} | {stats['num_steps']} | " + " | ".join(cells) + " |")
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
        "| policy | sampler steps | score [95% CI] | success [95% CI] | ms per chunk per env (p50) "
        "| ms per call p50 / p99 |",
        "|---|---|---|---|---|---|",
        *[_row(row) for row in data["rows"]],
        "",
        f"Evaluation hardware: {data['hardware']}.",
        "",
    ]
    for run in data["runs"]:
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
    parser.add_argument("--report", action="append", default=[], help="NAME=eval.json (repeatable, in table order)")
    parser.add_argument("--run", action="append", default=[], help="NAME=run_dir, for training time and hardware")
    parser.add_argument("--commands", help="text file with the commands that produced the reports")
    parser.add_argument("--analysis", action="append", default=[], help="NAME=analyze-flow JSON (robustness table)")
    parser.add_argument("--title", default="Push-T: flow policy vs Diffusion Policy baseline")
    parser.add_argument("--notes", help="Markdown file appended at the end (discussion of the numbers)")
    parser.add_argument("--out", default="docs/results/pusht.md")
    parser.add_argument("--json", help="where the page's numbers go (default: --out with .json)")
    args = parser.parse_args()
    out = Path(args.out)
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    data = page_data(_pairs(args.report), _pairs(args.run), _pairs(args.analysis), args.title, args.commands,
                     args.notes)
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    text = render(data, json_name=json_path.name, page=out.stem)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
