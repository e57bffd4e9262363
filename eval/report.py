"""Write an `EvalReport` as JSON, a Markdown table and a PNG plot of success / score vs number of integration steps.

    paths = write_report(report, "runs/eval")   # {"json": ..., "markdown": ..., "plot": ...}

Push-T is reported both ways (docs/evaluation.md, "Score and success"): **score** = mean max coverage-reward
(diffusion_policy's `mean_score`, bootstrap 95% CI) and **success** = fraction of episodes reaching coverage > 0.95
(Wilson 95% CI).

The Markdown and the plot are rendered from `summary(report)`: a small JSON-able dict holding exactly the numbers
they show. A results page in docs/results/ commits that dict next to itself (`<page>.json`), and
`python -m fm_policy.eval.benchmarks.compose_results` renders the page from it with `markdown_from_summary`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .harness import EvalReport, SettingResult
from .metrics import Estimate

__all__ = ["markdown_from_summary", "markdown_table", "plot_report", "plot_summary", "summary", "write_report"]


def _ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _steps_name(num_steps: int | None) -> str:
    return "default" if num_steps is None else str(num_steps)


def _sorted(settings: list[SettingResult]) -> list[SettingResult]:
    """Numeric settings ascending, the policy default (None) first."""
    return sorted(settings, key=lambda s: (s.num_steps is not None, s.num_steps or 0))


def _finite(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _estimate(est: Estimate) -> dict[str, float | None]:
    return {"value": _finite(est.value), "lo": _finite(est.lo), "hi": _finite(est.hi)}


def _fmt(est: dict[str, Any], digits: int = 3) -> str:
    """`0.812 [0.745, 0.870]` (as `Estimate.fmt`), "n/a" for an undefined value."""
    if est.get("value") is None:
        return "n/a"
    return f"{est['value']:.{digits}f} [{est['lo']:.{digits}f}, {est['hi']:.{digits}f}]"


def summary(report: EvalReport) -> dict[str, Any]:
    """Exactly the numbers `markdown_from_summary` and `plot_summary` show, as a JSON-able dict (NaN -> None)."""
    info = report.env_info
    seeds = info.get("seeds") or []
    settings = []
    for s in _sorted(report.settings):
        t = s.timing
        settings.append({
            "num_steps": s.num_steps, "n_episodes": s.n_episodes, "score": _estimate(s.score),
            "success": {**_estimate(s.success), "k": sum(e.success for e in s.episodes), "n": s.n_episodes},
            "ms_per_call_p50": _finite(t.p50_ms), "ms_per_call_p99": _finite(t.p99_ms),
            "ms_per_env_p50": _finite(t.per_env_p50_ms), "mean_final_coverage": s.mean_final_coverage,
            "mean_steps": s.mean_steps, "env_steps_per_s": s.env_steps_per_s, "wall_s": s.wall_s,
            "policy_s": s.policy_s, "env_s": s.env_s,
            "metrics": {name: _estimate(est) for name, est in (getattr(s, "metrics", None) or {}).items()},
        })
    hw = info.get("hardware", {})
    return {
        "env": info.get("env"), "policy": info.get("policy", "policy"), "env_kwargs": info.get("env_kwargs"),
        "max_episode_steps": info.get("max_episode_steps"), "n_episodes": info.get("n_episodes"),
        "seeds": [seeds[0], seeds[-1]] if seeds else None, "n_obs_steps": info.get("n_obs_steps"),
        "n_action_steps": info.get("n_action_steps"), "n_envs": info.get("n_envs"),
        "vector_env": info.get("vector_env"), "workers": info.get("workers"), "torch_seed": info.get("torch_seed"),
        "noise": info.get("noise"), "score_ci": info.get("score_ci", "bootstrap"),
        "success_ci": info.get("success_ci", "Wilson"),
        "hardware": {k: hw.get(k) for k in ("cpu", "usable_cores", "torch_threads", "device", "gpu") if k in hw},
        "versions": {k: v for k, v in info.get("versions", {}).items() if v},
        "created": info.get("created"), "settings": settings,
        **({"disturbance": info["disturbance"]} if info.get("disturbance") else {}),
    }


def _table(settings: list[dict[str, Any]]) -> str:
    lines = [
        "| num_steps | score [95% CI] | success [95% CI] | ms/chunk p50 / p99 | ms/chunk per env p50 | episodes |",
        "|---|---|---|---|---|---|",
    ]
    for s in settings:
        success = s["success"]
        lines.append(
            f"| {_steps_name(s['num_steps'])} | {_fmt(s['score'])} | {_fmt(success)} ({success['k']}/"
            f"{s['n_episodes']}) | {_ms(s['ms_per_call_p50'])} / {_ms(s['ms_per_call_p99'])} | "
            f"{_ms(s['ms_per_env_p50'])} | {s['n_episodes']} |"
        )
    return "\n".join(lines)


def markdown_table(report: EvalReport) -> str:
    """One row per num_steps setting: score [CI], success [CI], ms per chunk p50 / p99 (per env), episodes."""
    return _table(summary(report)["settings"])


def markdown_from_summary(info: dict[str, Any]) -> str:
    """The report page, from `summary(report)` (or a committed copy of it). A copy that carries `provenance`,
    `commands` and `regenerate` (docs/results pages) also gets a section saying where its numbers come from."""
    seeds = info.get("seeds")
    seed_range = f"{seeds[0]}..{seeds[-1]}" if seeds else "n/a"
    hw = info.get("hardware", {})
    vers = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items() if v)
    lines = [
        f"# Evaluation: {info.get('env')} ({info.get('policy', 'policy')})",
        "",
        _table(info["settings"]),
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
        *([f"- disturbance: {_disturbance_text(info['disturbance'])}"] if info.get("disturbance") else []),
        "",
        "| num_steps | mean final coverage | mean episode steps | env steps/s | wall s | policy s | env s |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in info["settings"]:
        cov = "n/a" if s["mean_final_coverage"] is None else f"{s['mean_final_coverage']:.3f}"
        lines.append(
            f"| {_steps_name(s['num_steps'])} | {cov} | {s['mean_steps']:.1f} | {s['env_steps_per_s']:.0f} | "
            f"{s['wall_s']:.1f} | {s['policy_s']:.1f} | {s['env_s']:.1f} |"
        )
    lines += _metrics_table(info["settings"])
    if info.get("provenance"):
        lines += ["", "## Source", "", f"Every number on this page: `{info.get('json_name', 'its JSON')}`, "
                  f"{info['provenance']}."]
        if info.get("commands"):
            lines += ["", "Measured with:", "", "```bash", *info["commands"], "```"]
        if info.get("regenerate"):
            lines += ["", f"Rendered from the JSON by `{info['regenerate']}`."]
    return "\n".join(lines) + "\n"


def _disturbance_text(d: dict[str, Any]) -> str:
    """One line naming only the disturbances that act (docs/evaluation.md, "Disturbances")."""
    parts = []
    if d.get("obs_noise"):
        keys = d.get("obs_noise_keys") or "float keys"
        scale = f", scale {d['obs_noise_scale']}" if d.get("obs_noise_scale") else ""
        parts.append(f"observation noise std {d['obs_noise']} on {keys}{scale}")
    if d.get("shove_step") is not None and (d.get("shove_block") or d.get("shove_agent") or d.get("shove_angle")):
        parts.append(f"shove after step {d['shove_step']}: block {d.get('shove_block', 0)}, agent "
                     f"{d.get('shove_agent', 0)}, angle {d.get('shove_angle', 0)} rad")
    if d.get("init_noise_scale", 1.0) != 1.0 or d.get("init_noise_offset"):
        parts.append(f"initial noise x {d.get('init_noise_scale', 1.0)} + offset of norm {d.get('init_noise_offset', 0)}")
    return ("; ".join(parts) or "none (all zero)") + f" (disturbance seed {d.get('seed', 0)})"


def _markdown(report: EvalReport) -> str:
    return markdown_from_summary(summary(report))


def _metrics_table(settings: list[dict[str, Any]]) -> list[str]:
    """Env-specific metrics (Kitchen: p1..pK, mean tasks) as one row per setting; nothing for envs without any."""
    settings = [s for s in settings if s.get("metrics")]
    if not settings:
        return []
    names = list(settings[0]["metrics"])
    lines = ["", "| num_steps | " + " | ".join(f"{n} [95% CI]" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for s in settings:
        lines.append(f"| {_steps_name(s['num_steps'])} | " + " | ".join(_fmt(s["metrics"][n]) for n in names) + " |")
    return lines


def plot_report(report: EvalReport, path: str | os.PathLike) -> Path:
    """Success rate and score (both with 95% CI error bars) vs number of integration steps, as a PNG."""
    return plot_summary(summary(report), path)


def plot_summary(info: dict[str, Any], path: str | os.PathLike) -> Path:
    """`plot_report` from a summary dict. The x axis is log2 when every setting is numeric; a `None` (policy
    default) setting makes it categorical."""
    # the Agg canvas directly, not pyplot: no global backend switch, no GUI, safe in threads and workers
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = info["settings"]
    numeric = all(s["num_steps"] is not None for s in settings)
    xs = [float(s["num_steps"]) for s in settings] if numeric else list(range(len(settings)))
    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, key, marker in (("success rate", "success", "o"), ("coverage score", "score", "s")):
        est = [s[key] for s in settings]
        vals = [math.nan if e["value"] is None else e["value"] for e in est]
        err = [[0.0 if e["value"] is None else max(0.0, e["value"] - e["lo"]) for e in est],
               [0.0 if e["value"] is None else max(0.0, e["hi"] - e["value"]) for e in est]]
        ax.errorbar(xs, vals, yerr=err, marker=marker, capsize=4, label=f"{name} (95% CI)")
    if numeric and len(xs) > 1 and max(xs) / min(xs) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([_steps_name(s["num_steps"]) for s in settings])
    ax.minorticks_off()
    ax.set_xlabel("number of integration steps")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("fraction")
    ax.set_title(f"{info.get('env')}: {info.get('n_episodes')} episodes per setting")
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
