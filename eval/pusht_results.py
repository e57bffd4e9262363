"""Compose docs/results/pusht.md: flow vs Diffusion Policy baseline, same data and network, from eval reports.

    python -m fm_policy.eval.pusht_results \
        --report flow=runs/pusht_keypoints_flow_cpu/eval/eval.json \
        --report ddpm-ddim=runs/pusht_keypoints_ddpm_cpu/eval_ddim/eval.json \
        --report ddpm-ddpm=runs/pusht_keypoints_ddpm_cpu/eval_ddpm/eval.json \
        --run flow=runs/pusht_keypoints_flow_cpu --run ddpm=runs/pusht_keypoints_ddpm_cpu \
        --commands docs/results/pusht_commands.txt --out docs/results/pusht.md

Every number in the table is read from a report written by `fm-policy eval`; the commands file lists the exact
commands that produced the data, the training runs and the reports.
"""

from __future__ import annotations

import argparse
import json
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


def _row(name: str, setting: dict[str, Any]) -> str:
    score, success, timing = setting["score"], setting["success"], setting["timing"]
    k = round(success["value"] * success["n"])
    return (
        f"| {name} | {setting['num_steps']} | {score['value']:.3f} [{score['lo']:.3f}, {score['hi']:.3f}] | "
        f"{success['value']:.2f} [{success['lo']:.2f}, {success['hi']:.2f}] ({k}/{success['n']}) | "
        f"{timing['per_env_p50_ms']:.2f} | {timing['p50_ms']:.1f} / {timing['p99_ms']:.1f} |"
    )


ROBUSTNESS_KEYS = ("gain_noise_mean", "gain_noise_max", "gain_mid_mean", "gain_mid_max", "jac_full_max",
                   "jac_full_mean", "jac_residual_max")


def robustness_table(analyses: dict[str, str]) -> list[str]:
    """Disturbance response from `fm-policy analyze-flow --json` outputs: final-chunk movement per unit disturbance
    of the initial noise (gain_noise) and of the state at mid-trajectory (gain_mid), and the symmetric-Jacobian
    eigenvalue extremes along the trajectories."""
    loaded = {name: json.loads(Path(path).read_text()) for name, path in analyses.items()}
    lines = ["| policy | steps | " + " | ".join(ROBUSTNESS_KEYS) + " |", "|---|---|" + "---|" * len(ROBUSTNESS_KEYS)]
    for name, stats in loaded.items():
        cells = [f"{stats[k]:.4g}" if k in stats else "-" for k in ROBUSTNESS_KEYS]
        lines.append(f"| {name} | {int(stats['num_steps'])} | " + " | ".join(cells) + " |")
    return lines


def compose(reports: dict[str, str], runs: dict[str, str], commands: str | None,
            title: str = "Push-T: flow policy vs Diffusion Policy baseline",
            analyses: dict[str, str] | None = None) -> str:
    lines = [f"# {title}", ""]
    loaded = {name: json.loads(Path(path).read_text()) for name, path in reports.items()}
    any_report = next(iter(loaded.values()))
    info = any_report["env_info"]
    lines += [
        f"Test protocol: {info['n_episodes']} episodes per setting, env seeds {info['seeds'][0]}..{info['seeds'][-1]} "
        "(diffusion_policy's test seeds; the demonstrations use seeds below 100000), the same seeds for every row; "
        f"step limit {info['max_episode_steps']}. Score = mean over episodes of max clip(coverage / 0.95, 0, 1) "
        "with a bootstrap 95% interval; success = coverage > 0.95 at any step, with a Wilson 95% interval. "
        "Latency = one `predict_action_chunk` call, per env (batched over the running envs) and per call.",
        "",
        "| policy | sampler steps | score [95% CI] | success [95% CI] | ms per chunk per env (p50) | ms per call p50 / p99 |",
        "|---|---|---|---|---|---|",
    ]
    for name, report in loaded.items():
        for setting in report["settings"]:
            lines.append(_row(name, setting))
    hardware = info["hardware"]
    if isinstance(hardware, dict):
        hardware = ", ".join(f"{k} {v}" for k, v in hardware.items())
    lines += ["", f"Evaluation hardware: {hardware}.", ""]
    for name, run_dir in runs.items():
        sessions = _sessions(run_dir)
        if sessions:
            total = sum(s["seconds"] for s in sessions)
            last = sessions[-1]
            lines.append(
                f"- **{name}** ({run_dir}): {last['steps'][1]} steps at batch {last['batch_size']}, "
                f"{last['parameters'] / 1e6:.2f} M parameters, {total / 60:.1f} min of training on {last['hardware']} "
                f"({last['device']}, {last['torch_threads']} torch threads), final training loss "
                f"{last['final_train_loss']:.4f}."
            )
    if analyses:
        lines += ["", "## Robustness", "", "Measured by `fm-policy analyze-flow` on observations from the training data "
                  "(disturbance delta 0.01 in normalised action units; gains are final-chunk movement / disturbance).",
                  "", *robustness_table(analyses)]
    if commands:
        lines += ["", "## Commands", "", "```bash", Path(commands).read_text().strip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", action="append", default=[], help="NAME=eval.json (repeatable, in table order)")
    parser.add_argument("--run", action="append", default=[], help="NAME=run_dir, for training time and hardware")
    parser.add_argument("--commands", help="text file with the commands that produced the reports")
    parser.add_argument("--analysis", action="append", default=[], help="NAME=analyze-flow JSON (robustness table)")
    parser.add_argument("--title", default="Push-T: flow policy vs Diffusion Policy baseline")
    parser.add_argument("--notes", help="Markdown file appended at the end (discussion of the numbers)")
    parser.add_argument("--out", default="docs/results/pusht.md")
    args = parser.parse_args()
    text = compose(_pairs(args.report), _pairs(args.run), args.commands, args.title, _pairs(args.analysis))
    if args.notes:
        text += "\n" + Path(args.notes).read_text()
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
