"""Write an `EvalReport` as JSON, a Markdown table and a PNG plot of success / score vs number of integration steps.

    paths = write_report(report, "runs/eval")   # {"json": ..., "markdown": ..., "plot": ...}

Push-T is reported both ways (anchors §7): **score** = mean max coverage-reward (diffusion_policy's `mean_score`,
bootstrap 95% CI) and **success** = fraction of episodes reaching coverage > 0.95 (Wilson 95% CI).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .harness import EvalReport, SettingResult

__all__ = ["markdown_table", "plot_report", "write_report"]


def _ms(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _steps_name(s: SettingResult) -> str:
    return "default" if s.num_steps is None else str(s.num_steps)


def _sorted(settings: list[SettingResult]) -> list[SettingResult]:
    """Numeric settings ascending, the policy default (None) first."""
    return sorted(settings, key=lambda s: (s.num_steps is not None, s.num_steps or 0))


def markdown_table(report: EvalReport) -> str:
    """One row per num_steps setting: score [CI], success [CI], ms per chunk p50 / p99 (per env), episodes."""
    lines = [
        "| num_steps | score [95% CI] | success [95% CI] | ms/chunk p50 / p99 | ms/chunk per env p50 | episodes |",
        "|---|---|---|---|---|---|",
    ]
    for s in _sorted(report.settings):
        t = s.timing
        lines.append(
            f"| {_steps_name(s)} | {s.score.fmt()} | {s.success.fmt()} ({sum(e.success for e in s.episodes)}/"
            f"{s.n_episodes}) | {_ms(t.p50_ms)} / {_ms(t.p99_ms)} | {_ms(t.per_env_p50_ms)} | {s.n_episodes} |"
        )
    return "\n".join(lines)


def _markdown(report: EvalReport) -> str:
    info = report.env_info
    seeds = info.get("seeds") or []
    seed_range = f"{seeds[0]}..{seeds[-1]}" if seeds else "n/a"
    hw = info.get("hardware", {})
    versions = info.get("versions", {})
    vers = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    lines = [
        f"# Evaluation: {info.get('env')} ({info.get('policy', 'policy')})",
        "",
        markdown_table(report),
        "",
        "score = mean over episodes of the max reward (Push-T: clip(coverage / 0.95, 0, 1); "
        f"{info.get('score_ci', 'bootstrap')}); success = any step with is_success "
        f"({info.get('success_ci', 'Wilson')}).",
        "ms/chunk = wall time of one `predict_action_chunk` call for the whole batch of running envs; per env = "
        "call time / batch size.",
        "",
        f"- env: `{info.get('env')}` kwargs `{info.get('env_kwargs')}`, "
        f"max episode steps {info.get('max_episode_steps')}",
        f"- episodes: {info.get('n_episodes')} per setting, env seeds {seed_range} (each exactly once, same seeds for "
        "every setting)",
        f"- n_obs_steps {info.get('n_obs_steps')}, n_action_steps {info.get('n_action_steps')}; "
        f"{info.get('n_envs')} envs, {info.get('vector_env')}, workers {info.get('workers')}; "
        f"torch seed {info.get('torch_seed')} ({info.get('noise')})",
        f"- hardware: {hw.get('cpu')} ({hw.get('usable_cores')} usable cores, "
        f"torch threads {hw.get('torch_threads')}), "
        f"device {hw.get('device')}{', ' + hw['gpu'] if hw.get('gpu') else ''}",
        f"- versions: {vers}",
        f"- created: {info.get('created')}",
        "",
        "| num_steps | mean final coverage | mean episode steps | env steps/s | wall s | policy s | env s |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in _sorted(report.settings):
        cov = "n/a" if s.mean_final_coverage is None else f"{s.mean_final_coverage:.3f}"
        lines.append(
            f"| {_steps_name(s)} | {cov} | {s.mean_steps:.1f} | {s.env_steps_per_s:.0f} | {s.wall_s:.1f} | "
            f"{s.policy_s:.1f} | {s.env_s:.1f} |"
        )
    lines += _metrics_table(report)
    return "\n".join(lines) + "\n"


def _metrics_table(report: EvalReport) -> list[str]:
    """Env-specific metrics (Kitchen: p1..pK, mean tasks) as one row per setting; nothing for envs without any."""
    settings = [s for s in _sorted(report.settings) if getattr(s, "metrics", None)]
    if not settings:
        return []
    names = list(settings[0].metrics)
    lines = ["", "| num_steps | " + " | ".join(f"{n} [95% CI]" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for s in settings:
        lines.append(f"| {_steps_name(s)} | " + " | ".join(s.metrics[n].fmt() for n in names) + " |")
    return lines


def plot_report(report: EvalReport, path: str | os.PathLike) -> Path:
    """Success rate and score (both with 95% CI error bars) vs number of integration steps, as a PNG.

    The x axis is log2 when every setting is numeric; a `None` (policy default) setting makes it categorical.
    """
    # the Agg canvas directly, not pyplot: no global backend switch, no GUI, safe in threads and workers
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = _sorted(report.settings)
    numeric = all(s.num_steps is not None for s in settings)
    xs = [float(s.num_steps) for s in settings] if numeric else list(range(len(settings)))  # type: ignore[arg-type]
    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, key, marker in (("success rate", "success", "o"), ("coverage score", "score", "s")):
        est = [getattr(s, key) for s in settings]
        vals = [e.value for e in est]
        err = [[max(0.0, e.value - e.lo) for e in est], [max(0.0, e.hi - e.value) for e in est]]
        ax.errorbar(xs, vals, yerr=err, marker=marker, capsize=4, label=f"{name} (95% CI)")
    if numeric and len(xs) > 1 and max(xs) / min(xs) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([_steps_name(s) for s in settings])
    ax.minorticks_off()
    ax.set_xlabel("number of integration steps")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("fraction")
    n = report.env_info.get("n_episodes")
    ax.set_title(f"{report.env_info.get('env')}: {n} episodes per setting")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def write_report(report: EvalReport, out_dir: str | os.PathLike, name: str = "eval") -> dict[str, Path]:
    """Write `<name>.json`, `<name>.md` and `<name>.png` into `out_dir`; returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {"json": out / f"{name}.json", "markdown": out / f"{name}.md", "plot": out / f"{name}.png"}
    report.to_json(paths["json"])
    paths["markdown"].write_text(_markdown(report))
    plot_report(report, paths["plot"])
    return paths
