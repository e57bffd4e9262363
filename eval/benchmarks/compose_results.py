"""Render every docs/results page and the README's results table from the committed JSON beside each page.

    python -m fm_policy.eval.benchmarks.compose_results                 # rewrite every page and the README table
    python -m fm_policy.eval.benchmarks.compose_results --page pusht    # one page
    python -m fm_policy.eval.benchmarks.compose_results --check         # exit 1 if a committed page differs
    python -m fm_policy.eval.benchmarks.compose_results \\
        --eval-report robomimic_can_eval=runs/robomimic_can_flow_cpu/eval/eval.json    # new numbers from an eval run

The rule this enforces: a number on a results page comes from `docs/results/<page>.json` (or another committed JSON
the page names), and the page is what this script renders from it. Three kinds of page:

- **whole pages** rendered by the function of the script that measured them: the benchmarks (`bench_*.py`,
  `toy_2d.py`: `to_markdown(result)` / `markdown(result)`), the Push-T comparison pages (`pusht_results.render`),
  and eval-report pages (`fm_policy.eval.report.markdown_from_summary`);
- **pages with hand-written prose** (kitchen.md, robomimic.md) and README.md: only the blocks between
  `<!-- results:start NAME -->` and `<!-- results:end -->` are rendered, by the functions below; the prose around
  them is kept as it is and must not restate a number that is not in a block;
- the README's headline table (block `headline` in README.md), assembled from pusht.json, finetuning_scripted_one_seed.json and
  policy_speed.json.

`tests/test_results_pages.py` renders everything into a temporary folder and compares it with the committed files, so
a number edited by hand on a page (instead of in its JSON) fails the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

RESULTS = Path("docs/results")
BLOCK_RE = re.compile(r"(<!-- results:start (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- results:end -->)", re.S)

# benchmark pages: page -> (module under fm_policy.eval.benchmarks, render function of the result JSON)
BENCH_PAGES: dict[str, tuple[str, str]] = {
    "deploy": ("bench_deploy", "to_markdown"),
    "deploy_load": ("bench_serve_load", "markdown"),
    "diagnosis": ("bench_diagnosis", "markdown"),
    "gft": ("bench_gft", "markdown"),
    "gft_moved_goal": ("bench_gft", "markdown"),  # the earlier keypoint-only run (scripted demos of a moved goal)
    "kitchen_expert": ("bench_kitchen_expert", "to_markdown"),
    "networks": ("bench_networks", "to_markdown"),
    "policy_speed": ("bench_policy", "to_markdown"),
    "pusht_expert": ("bench_pusht_expert", "to_markdown"),
    "sampler": ("bench_sampler", "to_markdown"),
    "scale": ("bench_streaming", "to_markdown"),
    "toy_2d": ("toy_2d", "to_markdown"),
    "vision_speed": ("bench_vision", "to_markdown"),
}
PUSHT_PAGES = ("pusht", "finetuning_scripted_one_seed", "finetuning_scripted", "finetuning")  # pusht_results.render
EVAL_PAGES = ("robomimic_lift_eval", "robomimic_can_eval", "robomimic_square_eval")  # report.markdown_from_summary
BLOCK_PAGES = ("kitchen", "robomimic")  # hand-written prose with rendered blocks


# ------------------------------------------------------------------------------------------------------------ helpers
def half_up(value: float, digits: int = 0) -> str:
    """`value` rounded half-up on its shortest decimal form (a transcribed 30.95 gives 31.0, not binary 30.9)."""
    quantum = Decimal(1).scaleb(-digits)
    return str(Decimal(repr(float(value))).quantize(quantum, rounding=ROUND_HALF_UP))


def _load(root: Path, name: str) -> Any:
    return json.loads((root / RESULTS / f"{name}.json").read_text())


def _range(values: list[Any]) -> str:
    return f"{values[0]}-{values[1]}"


@contextlib.contextmanager
def _environ_kept() -> Iterator[None]:
    """Some benchmark modules pin thread counts in os.environ at import; keep the caller's environment as it was."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _bench_module(name: str) -> Any:
    with _environ_kept():
        return importlib.import_module(f"fm_policy.eval.benchmarks.{name}")


def fill_blocks(text: str, renderers: dict[str, Callable[[], str]], where: str) -> str:
    """Replace the body of every `<!-- results:start NAME -->` block with `renderers[NAME]()`."""
    seen: list[str] = []

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in renderers:
            raise KeyError(f"{where}: no renderer for block '{name}' (have {sorted(renderers)})")
        seen.append(name)
        return match.group(1) + renderers[name]().rstrip("\n") + "\n" + match.group(4)

    out = BLOCK_RE.sub(replace, text)
    missing = sorted(set(renderers) - set(seen))
    if missing:
        raise KeyError(f"{where}: blocks {missing} are missing (add '<!-- results:start NAME -->' markers)")
    return out


# ------------------------------------------------------------------------------------------------- kitchen.md blocks
def _kitchen_blocks(root: Path) -> dict[str, Callable[[], str]]:
    data, expert = _load(root, "kitchen"), _load(root, "kitchen_expert")
    hw, machine = data["hardware"], expert["machine"]

    def hardware() -> str:
        versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
        return (f"Hardware for every number here: {hw['cpu']}, {hw['cores']} cores shared with other jobs (load "
                f"average {hw['load_average']} during the runs, so wall-clock times are upper bounds), Python "
                f"{machine['python']}, {versions}. Date: {hw['date']}.")

    def expert_table() -> str:
        n, limit = expert["episodes"], expert["max_steps"]
        lines = [f"{n} episodes per row (env seeds {expert['seed']}-{expert['seed'] + n - 1}), no retries, step limit "
                 f"{limit}, success = the env's own completion info.", "",
                 "| tasks | success | steps mean / max | CPU s per episode |", "| --- | --- | --- | --- |"]
        for name, s in expert["summary"].items():
            sequence = "->" in name
            success = f"{s['success']} / {s['episodes']}"
            steps = f"{s['steps_mean_success']:.1f} / {s['steps_max_success']:.0f}"
            lines.append(f"| {name} | {'**' + success + '**' if sequence else success} | "
                         f"{steps}{f' (limit {limit})' if sequence else ''} | {s['cpu_s_mean']:.2f} |")
        seq = next(s for name, s in expert["summary"].items() if "->" in name)
        lines += ["", f"The sequence uses {100 * seq['steps_mean_success'] / limit:.0f}% of the step limit on average "
                  f"(max {seq['steps_max_success']:.0f} of {limit}); a slower expert setting would need a larger "
                  "declared limit."]
        return "\n".join(lines)

    def demos() -> str:
        d = data["demos"]
        keys = ", ".join(f"`{k}` ({v})" for k, v in d["keys"].items())
        retried = d["retried_env_seeds"]
        return "\n".join([
            f"- {d['episodes']} episodes, {d['steps']:,} steps (length mean {d['length_mean']:.1f}, std "
            f"{d['length_std']:.1f}, min {d['length_min']}, max {d['length_max']}), keys {keys}; "
            "`fm-policy dataset validate` passes.",
            f"- {d['skipped']} candidates skipped; {len(retried)} of {d['episodes']} candidates (env seeds "
            f"{' and '.join(map(str, retried))}) failed their first attempt and succeeded on the first retry (fresh "
            f"planner seed), i.e. {d['episodes'] - len(retried)} / {d['episodes']} first-attempt successes.",
            f"- {d['collection_wall_s']} s wall for the collection itself ({d['total_wall_s']} s including start-up; "
            f"{d['cpu_s']} s CPU), one worker at nice {d['nice']} on the shared cores: ~{d['wall_s_per_demo']} s wall "
            "per demo.",
            f"- Diversity: per-demo speed (+-{d['speed_jitter_percent']}%) and waypoint offsets; the joint-angle "
            f"spread across demos at the same step is {_range(d['joint_spread_rad'])} rad per joint "
            f"(t = {', '.join(map(str, d['joint_spread_at_steps']))}), episode lengths vary by "
            f"+-{d['length_spread_steps']} steps.",
        ])

    def policy() -> str:
        p = data["policy"]
        est = lambda v: f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"  # noqa: E731
        lines = [
            f"{p['parameters_m']} M-parameter U-Net (widths {'/'.join(map(str, p['down_dims']))}), {p['steps']:,} "
            f"steps at batch {p['batch_size']} ({p['samples_k']} k samples, ~{p['epochs']} epochs of the "
            f"{p['dataset_steps_k']} k steps) in {p['training_min']} minutes on the shared {hw['cores']}-core "
            f"{hw['cpu']} ({p['torch_threads']} torch thread, {p['steps_per_s']} steps/s), final training loss "
            f"{p['final_train_loss']}. {p['n_episodes']} test episodes per setting (env seeds "
            f"{p['seeds'][0]}..{p['seeds'][1]}, the same for every row), step limit {p['max_episode_steps']}; p_n = "
            "fraction of episodes completing at least n of the four tasks (Wilson 95% intervals), mean tasks with a "
            "bootstrap interval:",
            "",
            "| Euler steps | p1 | p2 | p3 | p4 | mean tasks |",
            "|---|---|---|---|---|---|",
        ]
        for r in p["rows"]:
            cells = [est(r[k]) for k in ("p1", "p2", "p3", "p4", "mean_tasks")]
            lines.append(f"| {r['num_steps']} | " + " | ".join(cells) + " |")
        lines += ["", f"Mean episode length at 8 Euler steps: {p['mean_episode_steps_at_8']} of the "
                  f"{p['max_episode_steps']} allowed steps."]
        return "\n".join(lines)

    def tests() -> str:
        t = data["tests"]
        return (f"`pytest tests/test_kitchen.py`: {t['count']} tests (env spaces and real steps, step limit and "
                "task parsing, one expert task to completion, p_n metrics, the harness's Kitchen metrics with the JSON "
                "round trip and Markdown table, a one-episode collection to zarr with a replay of the stored actions, "
                f"the CLI's option check, a rendered frame): {_range(t['seconds'])} s on the shared cores.")

    return {"hardware": hardware, "expert": expert_table, "demos": demos, "policy": policy, "tests": tests}


# ----------------------------------------------------------------------------------------------- robomimic.md blocks
def _robomimic_blocks(root: Path) -> dict[str, Callable[[], str]]:
    import numpy as np

    data = _load(root, "robomimic")
    hw = data["hardware"]
    experts = {t: _load(root, f"robomimic_expert_{t}") for t in ("lift", "can", "square")}
    evals = {row["eval_page"]: _load(root, row["eval_page"]) for row in data["policies"]["rows"]}

    def hardware() -> str:
        return (f"Hardware for every number below: {hw['machine']} (torch {hw['torch']}, robosuite {hw['robosuite']}, "
                f"robomimic {hw['robomimic']}, mujoco {hw['mujoco']}), **shared with training and evaluation jobs** "
                f"(1-minute load average {hw['load_average'][0]}-{hw['load_average'][1]} during the measurements). "
                "Wall-clock rates are therefore several times lower than on a quiet machine; the per-CPU-second rate "
                "is the better estimate of what one unloaded core gives.")

    def env_rate() -> str:
        e = data["env_rate"]
        lines = [f"| task | observations | steps/s (wall, quiet machine, {e['quiet_date']}) | steps/s (wall, loaded) "
                 "| steps per CPU-second (loaded) | reset (s, wall, quiet) |", "|---|---|---|---|---|---|"]
        for r in e["rows"]:
            lines.append(f"| {r['task']} | {r['observations']} | **{r['quiet_steps_per_s']}** | "
                         f"{r['loaded_steps_per_s']} | {r['loaded_steps_per_cpu_s']} | {r['quiet_reset_s']:.2f} |")
        can_rates = [s["env_steps_per_s"] for s in evals["robomimic_can_eval"]["settings"]]
        lines += ["", "The quiet-machine column was measured at the end of the session with nothing else running "
                  f"(load average ~{e['quiet_load_average']}, one process, one core); the loaded columns come from an "
                  f"earlier session with a load average of {hw['load_average'][0]}-{hw['load_average'][1]}. The first "
                  f"construction in a fresh process costs {_range(e['first_construction_s'])} s (robosuite's numba "
                  "kernels; more with cameras); every reset is a hard reset (robosuite rebuilds the scene). Evaluation "
                  "runs episodes in parallel workers (`--workers`): the Can evaluation below stepped "
                  f"{min(can_rates):.0f}-{max(can_rates):.0f} env steps/s across 2 workers including policy inference."]
        return "\n".join(lines)

    def abs_speed() -> str:
        a = data["abs_actions"]
        return (f"The delta-to-absolute step runs at **{a['steps_per_s']:,} steps/s** on one core of the quiet machine "
                f"({a['demos']} Lift demos, {a['steps']:,} steps, in {a['seconds']} s; plus {a['build_s']} s to build "
                "the simulator once), measured with:")

    def replay() -> str:
        r = data["replay"]
        return (f"Replay check (`test_convert_abs_actions_and_replay`: {r['demos']} random-action Lift demos of "
                f"{r['steps']} steps, each replayed open loop from its first state and scene XML in an "
                f"`abs_actions=True` env): end-effector positions stay within **{_range(r['abs_mm'])} mm** (max "
                f"{r['abs_mm'][1]} mm) of the recorded delta-action run. Replaying the *delta* actions the same way "
                f"drifts {_range(r['delta_mm'])} mm: deltas are relative to the current pose and accumulate any "
                "disturbance, absolute goals do not.")

    def expert_table() -> str:
        x = data["experts"]
        names = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare"}
        lines = [f"Env seeds {_range(x['seeds'])}, expert seed = env seed, one attempt per seed (no retries, no "
                 f"success filter), {x['max_steps']}-step limit:", "",
                 "| task | success | steps per episode (mean / median / p95 / max) | CPU s per episode | wall s per "
                 "episode (loaded) | episodes with a regrasp |", "|---|---|---|---|---|---|"]
        for task, d in experts.items():
            s, steps = d["summary"], np.array([e["steps"] for e in d["episodes"]], dtype=float)
            regrasps = sum(e["regrasps"] > 0 for e in d["episodes"])
            median = half_up(float(np.median(steps)), 1).removesuffix(".0")
            lines.append(f"| {names[task]} | **{s['successes']}/{s['episodes']}** | {half_up(s['mean_steps'], 1)} / "
                         f"{median} / {half_up(float(np.percentile(steps, 95)))} / {steps.max():.0f} | "
                         f"{s['cpu_s_per_episode']:.2f} | {s['wall_s_per_episode']:.2f} | {regrasps} |")
        square = experts["square"]["episodes"]
        lines += ["", f"Times include the hard reset; the three runs went in parallel with each other and with a "
                  f"collection job on the 2 cores (load average ~{_range(x['load_average'])}). Per-episode JSON: "
                  "`docs/results/robomimic_expert_<task>.json`. Square's first grasp missed in "
                  f"{sum(e['regrasps'] > 0 for e in square)} of {len(square)} episodes and the regrasp saved "
                  f"{'both' if all(e['success'] for e in square if e['regrasps'] > 0) else 'not all'}."]
        return "\n".join(lines)

    def collection() -> str:
        parts = [f"{c['demos']} {c['task']} demos ({c['steps']:,} steps, mean {c['mean_steps']}) in {c['wall_s']} s"
                 for c in data["collection"]]
        return ("Measured (1 worker each, on the loaded machine; no candidate failed in any of them): "
                + ", ".join(parts[:-1]) + f", {parts[-1]}.")

    def policy_setup() -> str:
        p = data["policies"]
        dims = ", ".join(f"{v}-D {k}" for k, v in p["state_dims"].items())
        seeds = next(iter(evals.values()))
        return (f"Policy (`configs/robomimic_<task>_flow_cpu.yaml`): flow matching, 1-D U-Net (down dims "
                f"{'/'.join(map(str, p['down_dims']))}, {p['parameters_m']} M parameters with the observation "
                f"conditioning), low-dim `state` ({dims}), n_obs_steps {seeds['n_obs_steps']}, horizon 16, "
                f"n_action_steps {seeds['n_action_steps']}, 7-D delta actions, {p['steps']:,} steps at batch "
                f"{p['batch_size']}, lr {p['lr']} cosine, EMA; {p['val_percent']}% of the episodes held out for "
                f"validation ({p['train_episodes']} train episodes). Test: {seeds['n_episodes']} episodes per setting, "
                f"env seeds {seeds['seeds'][0]}-{seeds['seeds'][1]} (never used for demos), the same seeds and initial "
                f"noise for every step count, {seeds['max_episode_steps']}-step limit; success with 95% Wilson "
                "intervals.")

    def policy_table() -> str:
        rows = data["policies"]["rows"]
        steps = [s["num_steps"] for s in evals[rows[0]["eval_page"]]["settings"]]
        lines = ["| task | demos (steps) | training (1 core, shared) | "
                 + " | ".join(f"Euler-{n} success" for n in steps)
                 + f" | ms per chunk (Euler-{' / '.join(map(str, steps))}) |",
                 "|---|---|---|" + "---|" * len(steps) + "---|"]
        for r in rows:
            settings = evals[r["eval_page"]]["settings"]
            cells = [f"**{s['success']['k']}/{s['success']['n']}** [{s['success']['lo']:.2f}, {s['success']['hi']:.2f}]"
                     for s in settings]
            ms = " / ".join(half_up(s["ms_per_env_p50"], 1) for s in settings)
            lines.append(f"| {r['task']} | {r['demos']} ({r['demo_steps']:,}) | {r['train_s']:,} s "
                         f"({r['steps_per_s']} steps/s) | " + " | ".join(cells) + f" | {ms} |")
        return "\n".join(lines)

    def tests() -> str:
        t = data["tests"]
        return (f"{t['count']} tests: {t['timed']} of them took {t['wall_s']} s wall ({t['user_cpu_s']} s user CPU, "
                f"{t['peak_rss_gb']} GB peak RSS) with a training job and the GFT benchmark on the same 2 cores; the "
                f"camera-collection test adds ~{t['camera_test_s']} s. They run in CI (the README's test command "
                "installs the `robomimic` extra).")

    return {"hardware": hardware, "env-rate": env_rate, "abs-speed": abs_speed, "replay": replay,
            "experts": expert_table, "collection": collection, "policy-setup": policy_setup,
            "policy-table": policy_table, "tests": tests}


# ------------------------------------------------------------------------------------------------ README headline
# (label, sampler, page JSON, policy row name, sampler steps, policy_speed.json inference row (policy, sampler))
HEADLINE_ROWS: tuple[tuple[str, str, str, str, int, tuple[str, str]], ...] = (
    ("flow, 8k steps", "Euler-8", "pusht", "flow", 8, ("flow", "euler-8")),
    ("flow, 20k steps", "Euler-8", "pusht", "flow-20k", 8, ("flow", "euler-8")),
    ("flow, 20k steps", "Euler-1", "pusht", "flow-20k", 1, ("flow", "euler-1")),
    ("flow 20k + MLE fine-tuning for 2 steps", "Euler-2", "finetuning_scripted_one_seed", "ft-fm-2-on-20k", 2, ("flow", "euler-2")),
    ("flow 20k + MLE fine-tuning for 1 step", "Euler-1", "finetuning_scripted_one_seed", "ft-fm-1-on-20k", 1, ("flow", "euler-1")),
    ("Diffusion Policy, 8k steps", "DDPM-100", "pusht", "ddpm-ddpm", 100, ("ddpm", "ddpm-100")),
    ("Diffusion Policy, 8k steps", "DDIM-10", "pusht", "ddpm-ddim", 10, ("ddpm", "ddim-10")),
)


def _ms_short(value: float) -> str:
    return half_up(value, 1) if value < 10 else half_up(value)


def readme_headline(root: Path) -> str:
    pages = {name: _load(root, name) for name in ("pusht", "finetuning_scripted_one_seed")}
    speed = {(r["policy"], r["sampler"]): r for r in _load(root, "policy_speed")["inference"]}
    protocol = pages["pusht"]["protocol"]
    lines = [f"Headline (Push-T with keypoint observations, 200 expert demos, the same 1.2 M-parameter U-Net, "
             f"{protocol['n_episodes']} test episodes, trained on a 2-core CPU; no GPU run yet). Score with a "
             "bootstrap 95% interval, success with a Wilson 95% interval; two rows differ only where their intervals "
             "do not overlap. The sampler settings were fixed beforehand (8 Euler steps is the acceptance setting, "
             "1 and 2 steps are what the fine-tuned models were trained for, DDPM-100 and DDIM-10 are "
             "diffusion_policy's samplers), not picked as the best on the test seeds. Sources: "
             "[pusht.json](docs/results/pusht.json), [finetuning_scripted_one_seed.json](docs/results/finetuning_scripted_one_seed.json) and, for "
             "latency, [policy_speed.json](docs/results/policy_speed.json).", "",
             "| policy | sampler | score [95% CI] | success [95% CI] | ms per chunk (batch 1, CPU) |",
             "|---|---|---|---|---|"]
    for label, sampler, page, policy, steps, speed_key in HEADLINE_ROWS:
        row = next(r for r in pages[page]["rows"] if r["policy"] == policy and r["num_steps"] == steps)
        sc, su = row["score"], row["success"]
        lines.append(f"| {label} | {sampler} | {sc['value']:.3f} [{sc['lo']:.3f}, {sc['hi']:.3f}] | "
                     f"{100 * su['value']:.0f}% [{100 * su['lo']:.0f}, {100 * su['hi']:.0f}] | "
                     f"{_ms_short(speed[speed_key]['p50_ms'])} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- compose
def render_page(root: Path, page: str) -> str:
    """The text of docs/results/<page>.md rendered from its JSON (block pages: from the committed page's prose)."""
    if page in BENCH_PAGES:
        module, func = BENCH_PAGES[page]
        text = getattr(_bench_module(module), func)(_load(root, page))
        return text if text.endswith("\n") else text + "\n"
    if page in PUSHT_PAGES:
        return _bench_module("pusht_results").render(_load(root, page), root, json_name=f"{page}.json", page=page)
    if page in EVAL_PAGES:
        from fm_policy.eval.report import markdown_from_summary

        return markdown_from_summary(_load(root, page))
    if page in BLOCK_PAGES:
        blocks = {"kitchen": _kitchen_blocks, "robomimic": _robomimic_blocks}[page](root)
        return fill_blocks((root / RESULTS / f"{page}.md").read_text(), blocks, f"{page}.md")
    raise KeyError(f"unknown page '{page}'; pages: {', '.join(all_pages())}")


def all_pages() -> list[str]:
    return [*BENCH_PAGES, *PUSHT_PAGES, *EVAL_PAGES, *BLOCK_PAGES]


def compose(root: str | Path = ".", pages: list[str] | None = None, readme: bool = True) -> dict[str, str]:
    """{path relative to root: rendered text} for the requested pages (default: all) and the README table."""
    root = Path(root)
    out = {str(RESULTS / f"{page}.md"): render_page(root, page) for page in (pages or all_pages())}
    if readme:
        out["README.md"] = fill_blocks((root / "README.md").read_text(), {"headline": lambda: readme_headline(root)},
                                       "README.md")
    return out


def import_eval_report(root: Path, page: str, report_path: str, plot: bool = True) -> None:
    """Write docs/results/<page>.json (+ .png) from an `fm-policy eval` report; an existing page JSON keeps its
    commands (the new numbers replace the old ones, and the provenance names the report they came from)."""
    from fm_policy.eval.harness import EvalReport
    from fm_policy.eval.report import plot_summary, summary

    path = root / RESULTS / f"{page}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    data = {
        "provenance": (f"measured by the commands below on the stated hardware; summarised from {report_path} on "
                       f"{time.strftime('%Y-%m-%d')}"),
        "json_name": f"{page}.json", "commands": old.get("commands", []),
        "regenerate": f"python -m fm_policy.eval.benchmarks.compose_results --page {page}",
        **summary(EvalReport.from_json(report_path)),
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    if plot:
        plot_summary(data, path.with_suffix(".png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--page", action="append", help=f"render only these pages ({', '.join(all_pages())})")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    parser.add_argument("--root", default=".", help="repository root (default: the current folder)")
    parser.add_argument("--out-dir", help="write the rendered files under this folder instead of in place")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed file differs")
    parser.add_argument("--eval-report", action="append", default=[],
                        help="PAGE=runs/.../eval.json: first replace the page's JSON (and PNG) with this report")
    args = parser.parse_args(argv)
    root = Path(args.root)
    for item in args.eval_report:
        page, _, report = item.partition("=")
        if page not in EVAL_PAGES or not report:
            parser.error(f"--eval-report expects PAGE=EVAL_JSON with PAGE in {EVAL_PAGES}, got '{item}'")
        import_eval_report(root, page, report)
    rendered = compose(root, args.page, readme=not args.no_readme)
    differ = []
    for rel, text in rendered.items():
        current = (root / rel).read_text() if (root / rel).exists() else ""
        if args.check:
            if text != current:
                differ.append(rel)
                sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                           f"{rel} (committed)", f"{rel} (rendered)", n=1))
            continue
        target = Path(args.out_dir) / rel if args.out_dir else root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"{'wrote' if text != current or args.out_dir else 'unchanged'} {target}")
    if differ:
        print(f"\n{len(differ)} file(s) differ from their JSON: {', '.join(differ)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
