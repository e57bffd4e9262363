"""Benchmark: gradual fine-tuning (GFT) vs plain fine-tuning (FT) vs training from scratch on a Push-T variant.

    python -m fm_policy.eval.benchmarks.bench_gft --pretrained runs/pusht_keypoints_flow_cpu/checkpoints/step_8000/ema \\
        [--goal 190,310,-1.0] [--demos 10,25,50,100] [--seeds 3] [--steps 3000] [--eval-every 500] [--episodes 50] \\
        [--methods 'scratch,ft,gft,ft+ot,gft+ot*3,gft(w0=0.3)*3'] [--label 'full run'] [--json docs/results/gft.json]

Arms (`--methods`): `scratch`, `ft` or `gft`, optionally `+ot` (minibatch optimal-transport coupling,
`policy.coupling=ot`, for the run: pre-training from scratch or the fine-tuning), optionally a GFT schedule override
`(w0=X,anneal=Y)`, optionally `*K` for K seeds instead of `--seeds` (a sweep arm may use fewer seeds than the main
comparison). `ft` is GFT with w0 = 0, so it is the sweep's w0 = 0 point.

The distribution shift (docs/gft.md, "What the CPU benchmark showed"): the pre-trained Push-T policy pushes the T to gym-pusht's
goal (256, 256, pi/4); the variant moves the goal (default (190, 310, -1.0), which the scripted expert solves 100/100;
or, with `--data`, a store such as the half-turned human demos of `fm_policy.datasets.pusht_symmetry`). A policy
whose inputs include the goal (`goal` observation key) can serve both goals, so its retention is meaningful; a
keypoint-only policy cannot tell the goals apart. The runs use the pre-trained policy's observation keys. Steps:

1. collect `max(demos)` expert demos of the variant (env seeds data_seed.., reused when the store exists);
2. for each demo count N (a fixed subset of N episodes, the same for every method and seed) and each seed, train
   - scratch: the pre-trained policy's architecture and recipe, from random weights, on the N demos;
   - ft:      the pre-trained EMA policy fine-tuned by plain flow matching (`fm-policy finetune --method ft`);
   - gft:     the same, with the GFT objective (`--method gft`, w0 -> 0 over `gft_anneal_fraction` of the steps);
   ft and gft share every setting (lr, steps, batch, EMA, seed: the same batches, noise and times), so they differ
   only by the teacher term;
3. evaluate every `eval_every`-step checkpoint (EMA weights) on the variant at the deployment step count
   (`--deploy-steps`, 8): success across training and its area under the curve (AUC: trapezoid mean of the success
   curve over the evaluated checkpoints); the final checkpoint also at every `--num-steps` (1, 2, 8), its retention
   (success on the ORIGINAL goal) and its average ODE path length (sum of Euler step lengths, 100 steps, normalised
   action chunks, on `--path-obs` observation windows of the variant demos; straightness = length / displacement).

The training-loss curve of every run is read back from its TensorBoard log (`train/loss`): its spread over seeds is
one of the stability figures, with the steps to reach `--threshold` success. Every evaluation uses the same env seeds
(from 100000) and the harness's fixed initial noise, so methods are
compared on identical episodes. Runs are cached (`<run_root>/demos<N>/<method>/seed<k>/bench_result.json`), so an
interrupted benchmark resumes where it stopped; the results JSON records hardware, commands and CPU/wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fm_policy.eval.benchmarks.bench_common import write_results
from fm_policy.eval.metrics import seed_summary, seed_verdict

from fm_policy.couplings import ode_path_length
from fm_policy.versions import hardware_summary

METHODS: tuple[str, ...] = ("scratch", "ft", "gft")
_ARM = re.compile(r"^(scratch|ft|gft)(\+ot)?(?:\(([^)]*)\))?(?:\*(\d+))?$")


@dataclass(frozen=True)
class Arm:
    """One compared training recipe (module docstring): method, coupling, GFT schedule override, seed count."""

    method: str
    coupling: str = "independent"
    w0: float | None = None
    anneal: float | None = None
    seeds: int | None = None

    @classmethod
    def parse(cls, text: str) -> Arm:
        m = _ARM.match(text.replace(" ", ""))
        if not m:
            raise SystemExit(f"bench_gft: arm '{text}' is not METHOD[+ot][(w0=X,anneal=Y)][*SEEDS] with METHOD one of "
                             f"{list(METHODS)}")
        method, ot, overrides, seeds = m.groups()
        values: dict[str, float] = {}
        for item in filter(None, (overrides or "").split(",")):
            key, _, value = item.partition("=")
            if key not in ("w0", "anneal"):
                raise SystemExit(f"bench_gft: arm '{text}': unknown override '{key}' (w0, anneal)")
            values[key] = float(value)
        if values and method != "gft":
            raise SystemExit(f"bench_gft: arm '{text}': a schedule override applies to gft only")
        return cls(method, "ot" if ot else "independent", values.get("w0"), values.get("anneal"),
                   int(seeds) if seeds else None)

    @property
    def name(self) -> str:
        """The arm's label in tables and run folders (without the seed count)."""
        overrides = ",".join(f"{k}={v:g}" for k, v in (("w0", self.w0), ("anneal", self.anneal)) if v is not None)
        return self.method + ("+ot" if self.coupling == "ot" else "") + (f"({overrides})" if overrides else "")

    @property
    def folder(self) -> str:
        return self.name.replace("(", "_").replace(")", "").replace(",", "_")

    def n_seeds(self, default: int) -> int:
        return self.seeds or default

    def twin(self, **changes: Any) -> str:
        """The name of this arm with some fields changed (the arm it is compared with)."""
        fields = {"method": self.method, "coupling": self.coupling, "w0": self.w0, "anneal": self.anneal} | changes
        return Arm(**fields).name
DEFAULT_GOAL: tuple[float, float, float] = (190.0, 310.0, -1.0)
ORIGINAL_GOAL_NAME = "gym-pusht default (256, 256, pi/4)"


@dataclass
class BenchConfig:
    """Everything that determines the benchmark's numbers (stored with them)."""

    pretrained: str = "runs/pusht_keypoints_flow_cpu/checkpoints/step_8000/ema"
    goal: list[float] = field(default_factory=lambda: list(DEFAULT_GOAL))
    demos: list[int] = field(default_factory=lambda: [10, 25, 50, 100])
    seeds: int = 3
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    steps: int = 3000
    eval_every: int = 500
    episodes: int = 50
    num_steps: list[int] = field(default_factory=lambda: [1, 2, 8])
    deploy_steps: int = 8
    batch_size: int = 64
    ft_lr: float = 3e-4
    scratch_lr: float = 1e-3
    gft_schedule: str = "linear"
    gft_w0: float = 0.7
    gft_anneal_fraction: float = 0.6
    data: str = ""  # the variant store; "" = data/pusht_goal_<x>_<y>_<angle>_n<max demos>.zarr
    data_seed: int = 0
    collect_workers: int = 1
    curve_episodes: int = 0  # episodes per intermediate checkpoint (0: `episodes`); the final one uses `episodes`
    threshold: float = 0.3  # success level whose first crossing (steps) is reported per run
    run_root: str = "runs/bench_gft"
    path_obs: int = 256
    path_steps: int = 100
    eval_seed_start: int = 100000

    def validate(self) -> None:
        problems = []
        if len(self.goal) != 3:
            problems.append(f"goal must be X,Y,ANGLE, got {self.goal}")
        if not self.demos or min(self.demos) < 1:
            problems.append(f"demos must be positive counts, got {self.demos}")
        if self.seeds < 1:
            problems.append(f"seeds must be >= 1, got {self.seeds}")
        if not self.methods:
            problems.append("no methods (arms) given")
        names = [Arm.parse(m).name for m in self.methods]
        if len(set(names)) != len(names):
            problems.append(f"arms repeat: {names}")
        if self.steps < 1 or self.eval_every < 1 or self.eval_every > self.steps:
            problems.append(f"need 1 <= eval_every <= steps, got eval_every {self.eval_every}, steps {self.steps}")
        if self.episodes < 1:
            problems.append(f"episodes must be >= 1, got {self.episodes}")
        if self.deploy_steps not in self.num_steps:
            problems.append(f"deploy_steps {self.deploy_steps} must be one of num_steps {self.num_steps}")
        if problems:
            raise SystemExit("bench_gft: " + "; ".join(problems))

    @property
    def store(self) -> str:
        if self.data:
            return self.data
        x, y, a = self.goal
        return f"data/pusht_goal_{x:g}_{y:g}_{a:g}_n{max(self.demos)}.zarr"

    @property
    def arms(self) -> list[Arm]:
        return [Arm.parse(m) for m in self.methods]

    @property
    def checkpoint_steps(self) -> list[int]:
        return sorted({*range(self.eval_every, self.steps + 1, self.eval_every), self.steps})


# ---------------------------------------------------------------------------------------------------------------- data
def ensure_variant_demos(cfg: BenchConfig) -> dict[str, Any]:
    """Collect the variant's expert demos once; an existing store must have the goal and enough episodes."""
    from fm_policy.datasets.collect import CollectConfig, collect
    from fm_policy.datasets.replay_buffer import ReplayBuffer

    path, need = cfg.store, max(cfg.demos)
    if os.path.exists(path):
        with ReplayBuffer.open(path) as buffer:
            goal = buffer.attrs.get("source", {}).get("goal_pose")
            turned_from = buffer.attrs.get("source", {}).get("turned_from")
            n = buffer.n_episodes
        if goal is None or not np.allclose(goal, cfg.goal) or n < need:
            raise SystemExit(f"bench_gft: {path} holds {n} episodes with goal {goal}; need {need} with goal "
                             f"{cfg.goal} (delete it or pass --data)")
        found = {"store": path, "episodes": n, "collected_now": False, "seconds": 0.0}
        if turned_from:  # demos made by fm_policy.datasets.pusht_symmetry: say where from
            found["turned_from"] = {"store": turned_from.get("store"), "transform": turned_from.get("transform")}
        return found
    start = time.perf_counter()
    summary = collect(CollectConfig(env="pusht", episodes=need, out=path, workers=cfg.collect_workers,
                                    obs=("state", "keypoints"), seed=cfg.data_seed,
                                    env_kwargs={"goal_pose": list(cfg.goal)}), progress=False)
    return {"store": path, "episodes": summary["episodes"], "collected_now": True,
            "seconds": round(time.perf_counter() - start, 1), "skipped_env_seeds": summary["skipped_env_seeds"]}


def _data_config(cfg: BenchConfig, n_demos: int, obs_keys: Sequence[str]):
    from fm_policy.datasets.policy_data import DataConfig

    # no validation split (few demos); a fixed subset of n_demos episodes (split_seed), the same for all methods; the
    # pre-trained policy's observation keys (a goal-aware policy keeps seeing the goal)
    return DataConfig(path=cfg.store, obs_keys=list(obs_keys), val_ratio=0.0, split_seed=42,
                      max_train_episodes=n_demos)


# ---------------------------------------------------------------------------------------------------------------- runs
def train_run(cfg: BenchConfig, arm: Arm, n_demos: int, seed: int, run_dir: Path) -> Path:
    """Train one (arm, N, seed) run with the package's own entry points; returns the run directory."""
    from fm_policy.factory import load_policy
    from fm_policy.trainer import EMAConfig, LoopConfig, OptimConfig

    loop = LoopConfig(steps=cfg.steps, batch_size=cfg.batch_size, seed=seed, log_every=max(1, cfg.steps // 10),
                      checkpoint_every=cfg.eval_every, keep_checkpoints=len(cfg.checkpoint_steps) + 1, val_every=0,
                      progress=False, torch_threads=1)
    pretrained_cfg = load_policy(cfg.pretrained).config
    data = _data_config(cfg, n_demos, list(pretrained_cfg.obs_shapes))
    if arm.method == "scratch":
        from fm_policy.train import TrainConfig, train

        policy_cfg = copy.deepcopy(pretrained_cfg)  # same architecture and flow settings
        policy_cfg.obs_shapes, policy_cfg.action_dim = {}, 0
        policy_cfg.coupling = arm.coupling
        train(TrainConfig(run_dir=str(run_dir), data=data, policy=policy_cfg,
                          optim=OptimConfig(lr=cfg.scratch_lr, warmup_steps=min(200, cfg.steps // 10)),
                          ema=EMAConfig(), loop=loop))
    else:
        from fm_policy.finetune.gft import GFTConfig
        from fm_policy.finetune.run import FinetuneConfig, PolicyTrainingSettings, finetune

        gft = GFTConfig(schedule=cfg.gft_schedule, w0=cfg.gft_w0 if arm.w0 is None else arm.w0,
                        anneal_fraction=cfg.gft_anneal_fraction if arm.anneal is None else arm.anneal)
        finetune(FinetuneConfig(checkpoint=cfg.pretrained, method=arm.method, run_dir=str(run_dir), gft=gft, data=data,
                                policy=PolicyTrainingSettings(coupling=arm.coupling),
                                optim=OptimConfig(lr=cfg.ft_lr, warmup_steps=min(100, cfg.steps // 20)),
                                ema=EMAConfig(), loop=loop))
    return run_dir


def _evaluate(policy: Any, cfg: BenchConfig, goal: Sequence[float] | None, num_steps: Sequence[int],
              episodes: int | None = None) -> dict:
    from fm_policy.eval.run import evaluate_policy

    kwargs = {} if goal is None else {"goal_pose": tuple(goal)}
    report = evaluate_policy(policy, "pusht", kwargs, episodes or cfg.episodes, list(num_steps), cfg.eval_seed_start,
                             progress=False)
    return {str(s.num_steps): {"success": s.success.value, "score": s.score.value,
                               "success_ci": [s.success.lo, s.success.hi]} for s in report.settings}


def _path_obs(cfg: BenchConfig, policy: Any) -> dict[str, torch.Tensor]:
    """`path_obs` observation windows drawn (fixed seed) from all variant demos in the store."""
    from fm_policy.datasets.policy_data import DataConfig, build_policy_data
    from fm_policy.datasets.sampler import make_dataloader

    pc = policy.config
    data = build_policy_data(DataConfig(path=cfg.store, obs_keys=list(policy.obs_shapes), val_ratio=0.0),
                             pc.horizon, pc.n_obs_steps, pc.n_action_steps)
    batch = next(iter(make_dataloader(data.train, min(cfg.path_obs, len(data.train)), seed=0)))
    return {k: batch[k] for k in policy.obs_shapes}


def assess(policy: Any, cfg: BenchConfig, obs: dict[str, torch.Tensor], final: bool) -> dict:
    """Variant success/score at the deployment step count (`curve_episodes`); for a final model every step count
    (`episodes`), retention on the original goal and the path length."""
    policy.eval()
    if not final:
        return {"variant": _evaluate(policy, cfg, cfg.goal, [cfg.deploy_steps], cfg.curve_episodes or cfg.episodes)}
    variant = _evaluate(policy, cfg, cfg.goal, cfg.num_steps)
    return {"variant": {str(n): variant[str(n)] for n in cfg.num_steps},
            "original": _evaluate(policy, cfg, None, [cfg.deploy_steps]),
            **ode_path_length(policy, obs, cfg.path_steps)}


def training_losses(run_dir: Path) -> dict[str, list]:
    """The run's logged training-loss curve (`train/loss` in its TensorBoard log)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    if "train/loss" not in events.Tags().get("scalars", []):
        return {"step": [], "loss": []}
    points = events.Scalars("train/loss")
    return {"step": [p.step for p in points], "loss": [float(p.value) for p in points]}


def steps_to_threshold(curve: list[dict], threshold: float) -> int | None:
    """The first evaluated checkpoint whose success reaches `threshold` (None: never)."""
    return next((c["step"] for c in curve if c["success"] >= threshold), None)


def run_and_assess(cfg: BenchConfig, arm: Arm, n_demos: int, seed: int, obs: dict[str, torch.Tensor]) -> dict:
    """Train, then evaluate every checkpoint; cached in the run directory."""
    from fm_policy.factory import load_policy

    # the three plain arms keep the folder names of earlier versions of this benchmark
    run_dir = Path(cfg.run_root) / f"demos{n_demos}" / arm.folder / f"seed{seed}"
    cache = run_dir / "bench_result.json"
    settings = {"config": _run_settings(cfg), "method": arm.name, "demos": n_demos, "seed": seed}
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("settings") == settings:
            return cached | {"from_cache": True}
        raise SystemExit(f"bench_gft: {run_dir} holds a run with other settings; use another --run-root")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    train_run(cfg, arm, n_demos, seed, run_dir)
    train_cpu, train_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    curve, final = [], {}
    for step in cfg.checkpoint_steps:
        policy = load_policy(run_dir / "checkpoints" / f"step_{step}" / "ema")
        if step == cfg.steps:
            final = assess(policy, cfg, obs, final=True)
            curve.append({"step": step, **final["variant"][str(cfg.deploy_steps)]})
            continue
        result = assess(policy, cfg, obs, final=False)
        curve.append({"step": step, **result["variant"][str(cfg.deploy_steps)]})
    record = {"settings": settings, "curve": curve, "final": final, "losses": training_losses(run_dir),
              "train_cpu_s": round(train_cpu, 1),
              "train_wall_s": round(train_wall, 1), "total_cpu_s": round(time.process_time() - cpu0, 1),
              "total_wall_s": round(time.perf_counter() - wall0, 1)}
    cache.write_text(json.dumps(record, indent=2))
    return record


def _run_settings(cfg: BenchConfig) -> dict:
    keep = ("pretrained", "goal", "steps", "eval_every", "episodes", "num_steps", "deploy_steps", "batch_size",
            "ft_lr", "scratch_lr", "gft_schedule", "gft_w0", "gft_anneal_fraction", "data_seed", "path_obs",
            "path_steps", "eval_seed_start", "curve_episodes")
    return {k: v for k, v in asdict(cfg).items() if k in keep} | {"store": cfg.store}


# ---------------------------------------------------------------------------------------------------------------- stats
def auc(curve: list[dict]) -> float:
    """Trapezoid mean of the success curve over the evaluated checkpoints (1 point: that point's value)."""
    steps = np.array([c["step"] for c in curve], dtype=float)
    values = np.array([c["success"] for c in curve], dtype=float)
    if len(steps) == 1:
        return float(values[0])
    return float(np.trapezoid(values, steps) / (steps[-1] - steps[0]))


def aggregate(cfg: BenchConfig, runs: list[dict]) -> dict[str, dict[str, dict]]:
    """Per (demos, method): mean, sample std and count over seeds of every reported metric."""
    out: dict[str, dict[str, dict]] = {}
    for n in cfg.demos:
        for method in (arm.name for arm in cfg.arms):
            group = [r for r in runs if r["settings"]["demos"] == n and r["settings"]["method"] == method]
            if not group:
                continue
            metrics: dict[str, list[float]] = {}
            for r in group:
                f = r["final"]
                for ns in cfg.num_steps:
                    metrics.setdefault(f"success@{ns}", []).append(f["variant"][str(ns)]["success"])
                    metrics.setdefault(f"score@{ns}", []).append(f["variant"][str(ns)]["score"])
                metrics.setdefault("auc", []).append(auc(r["curve"]))
                metrics.setdefault("worst_checkpoint", []).append(min(c["success"] for c in r["curve"]))
                metrics.setdefault("retention", []).append(f["original"][str(cfg.deploy_steps)]["success"])
                metrics.setdefault("retention_score", []).append(f["original"][str(cfg.deploy_steps)]["score"])
                metrics.setdefault("path_length", []).append(f["path_length"])
                metrics.setdefault("straightness", []).append(f["straightness"])
                metrics.setdefault("train_cpu_s", []).append(r["train_cpu_s"])
                losses = r.get("losses", {}).get("loss", [])
                if losses:  # the mean of the last fifth of the logged curve: the level training settled at
                    metrics.setdefault("final_loss", []).append(float(np.mean(losses[-max(1, len(losses) // 5):])))
            stats = {k: seed_summary(v) for k, v in metrics.items()}
            reached = [steps_to_threshold(r["curve"], cfg.threshold) for r in group]
            stats["steps_to_threshold"] = {"reached": sum(s is not None for s in reached), "n": len(reached),
                                           **({"median": float(np.median([s for s in reached if s is not None]))}
                                              if any(s is not None for s in reached) else {})}
            curves = [r["losses"]["loss"] for r in group if r.get("losses", {}).get("loss")]
            if len(curves) > 1 and len({len(c) for c in curves}) == 1:
                # spread of the loss curve over seeds: the std across seeds at each logged step, averaged over steps
                stats["loss_seed_std"] = float(np.mean(np.std(np.asarray(curves), axis=0, ddof=1)))
            steps = cfg.checkpoint_steps
            stats["curve"] = {"step": steps, **{
                key: [seed_summary([next(c[key] for c in r["curve"] if c["step"] == s) for r in group]) for s in steps]
                for key in ("success", "score")}}
            out.setdefault(str(n), {})[method] = stats
    return out


# ---------------------------------------------------------------------------------------------------------------- report
def _fmt(stat: dict[str, float] | None, digits: int = 2) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def verdicts(cfg: BenchConfig, agg: dict) -> list[str]:
    lines = []
    # scores (coverage) next to success: at small budgets success is near 0 everywhere and only scores separate
    checks = [(f"success@{cfg.deploy_steps}", True), (f"score@{cfg.deploy_steps}", True), ("auc", True),
              ("success@1", True), ("success@2", True), ("retention", True), ("retention_score", True),
              ("path_length", False)]
    for n, by_method in agg.items():
        for method, other in comparison_pairs(cfg):
            if method not in by_method or other not in by_method:
                continue
            seeds = min(by_method[method]["auc"]["n"], by_method[other]["auc"]["n"])
            if seeds < 2:
                lines.append(f"- {n} demos, {method.upper()} vs {other.upper()}: no verdict (one seed)")
                continue
            parts = []
            for key, higher in checks:
                if key in by_method[method] and key in by_method[other]:
                    parts.append(f"{key} {seed_verdict(by_method[method][key], by_method[other][key], higher)}")
            lines.append(f"- {n} demos, {method.upper()} vs {other.upper()}: " + ", ".join(parts))
    return lines


def comparison_pairs(cfg: BenchConfig) -> list[tuple[str, str]]:
    """Which arms are set against which: GFT against FT and scratch and FT against scratch (same coupling; does
    starting from the pre-trained policy help, with or without the teacher term?), every OT arm against its
    independent twin, and every schedule variant against the default GFT schedule."""
    names = {arm.name for arm in cfg.arms}
    pairs: list[tuple[str, str]] = []
    for arm in cfg.arms:
        candidates = []
        if arm.method == "gft" and arm.w0 is None and arm.anneal is None:
            candidates += [arm.twin(method="ft"), arm.twin(method="scratch")]
        if arm.method == "ft":
            candidates.append(arm.twin(method="scratch"))
        if arm.method == "gft" and (arm.w0 is not None or arm.anneal is not None):
            candidates.append(arm.twin(w0=None, anneal=None))
        if arm.coupling == "ot":
            candidates.append(arm.twin(coupling="independent"))
        pairs += [(arm.name, other) for other in candidates if other in names]
    return pairs


def markdown(result: dict) -> str:
    cfg = BenchConfig(**result["config"])
    agg, pre = result["aggregate"], result["pretrained"]
    ns = cfg.num_steps
    lines = [f"# Gradual fine-tuning (GFT) on a Push-T goal variant{': ' + result['label'] if result['label'] else ''}",
             ""]
    if result["label"]:
        lines += [(f"> **{result['label']}.** The numbers below come from this configuration only; see the command "
                  "and the notes."), ""]
    lines += [
        (f"Variant: Push-T with the T's goal at {tuple(round(g, 4) for g in cfg.goal)} instead of "
        f"{ORIGINAL_GOAL_NAME}; {result['data']['episodes']} "
        + (f"demos in `{result['data']['store']}`: the episodes of `{result['data']['turned_from']['store']}` turned "
           f"by {result['data']['turned_from']['transform']} (`fm_policy.datasets.pusht_symmetry`)"
           if result["data"].get("turned_from") else
           f"expert demos in `{result['data']['store']}` (env seeds {cfg.data_seed}..)")
        + f", of which a fixed subset of N is used. Pre-trained policy: `{cfg.pretrained}` "
        f"(trained on `{result['pretrained_data'] or '?'}`, default goal)."),
        "",
        (f"Training: {cfg.steps} steps at batch {cfg.batch_size}, EMA; seeds per arm: "
        + ", ".join(f"{a.name} {a.n_seeds(cfg.seeds)}" for a in cfg.arms)
        + f"; scratch lr {cfg.scratch_lr:g} (the pre-training recipe), ft/gft lr {cfg.ft_lr:g}; GFT {cfg.gft_schedule} "
        f"schedule w0 {cfg.gft_w0:g} -> 0 at {cfg.gft_anneal_fraction:g} of the steps unless the arm says otherwise "
        "(`ft` is w0 = 0); `+ot`: minibatch optimal-transport coupling of noise and action chunks for the run. "
        f"Observation keys: {', '.join(result.get('obs_keys') or ['keypoints'])}. "
        f"Evaluation: {cfg.episodes} episodes (env seeds {cfg.eval_seed_start}..) for the final checkpoint at every "
        f"step count and for retention, {cfg.curve_episodes or cfg.episodes} for the intermediate checkpoints (every "
        f"{cfg.eval_every} steps, EMA weights, {cfg.deploy_steps} Euler steps); the same episodes and initial noise "
        "for every model."),
        "",
        "## Pre-trained policy before fine-tuning",
        "",
        "| task | " + " | ".join(f"success@{n}" for n in ns) + " | score@" + str(cfg.deploy_steps) + " |",
        "| --- | " + " | ".join("---" for _ in ns) + " | --- |",
        "| variant goal | " + " | ".join(f"{pre['variant'][str(n)]['success']:.2f}" for n in ns)
        + f" | {pre['variant'][str(cfg.deploy_steps)]['score']:.2f} |",
        "| original goal | " + " | ".join(f"{pre['original'][str(n)]['success']:.2f}" if str(n) in pre["original"]
                                          else "-" for n in ns)
        + f" | {pre['original'][str(cfg.deploy_steps)]['score']:.2f} |",
        "",
        f"Path length {pre['path_length']:.2f}, straightness {pre['straightness']:.3f}.",
        "",
        "## Results on the variant (mean ± std over seeds)",
        "",
        ("Success/score: final checkpoint. AUC: trapezoid mean of the success-vs-step curve over the evaluated "
        "checkpoints. Worst: the lowest checkpoint success. Retention: success / score on the original goal at "
        f"{cfg.deploy_steps} steps. Path: average Euler path length over {cfg.path_steps} steps (action units: pixels) "
        "and straightness (length / displacement, 1 = straight). "
        f"To {cfg.threshold:g}: the runs whose success reached {cfg.threshold:g} at an evaluated checkpoint, and the "
        "median step they first did. Loss: the last fifth of the training-loss curve (a GFT loss includes its teacher "
        "term, so compare it within an arm); loss spread: the std over seeds at each logged step, averaged."),
        "",
        "| demos | arm | " + " | ".join(f"success@{n}" for n in ns) + f" | score@{cfg.deploy_steps} | AUC | worst "
        f"| retention | retention score | path length | straightness | to {cfg.threshold:g} | loss | loss spread "
        "| train CPU s |",
        "| --- | --- | " + " | ".join("---" for _ in ns) + " | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- |",
    ]
    for n, by_method in agg.items():
        for method, s in by_method.items():
            reach = s.get("steps_to_threshold")
            reach_text = "-" if reach is None else (f"{reach['reached']}/{reach['n']}" + (
                f" @ {reach['median']:.0f}" if "median" in reach else ""))
            spread = f"{s['loss_seed_std']:.4f}" if "loss_seed_std" in s else "-"
            lines.append(
                f"| {n} | {method} | " + " | ".join(_fmt(s[f"success@{k}"]) for k in ns)
                + f" | {_fmt(s[f'score@{cfg.deploy_steps}'])} | {_fmt(s['auc'])} | {_fmt(s['worst_checkpoint'])} "
                f"| {_fmt(s['retention'])} | {_fmt(s['retention_score'])} | {_fmt(s['path_length'])} "
                f"| {_fmt(s['straightness'], 3)} | {reach_text} | {_fmt(s.get('final_loss'), 4)} | {spread} "
                f"| {s['train_cpu_s']['mean']:.0f} |")
    lines += ["", "## Comparisons", "",
              ("Per cell: a difference of means beyond 2 standard errors over seeds is a win/loss, else a tie "
              "(path length: shorter wins); an arm with one seed gets no verdict."), "", *verdicts(cfg, agg), ""]
    for name, title in (("plot_demos", "Success vs number of demos"), ("plot_steps", "Success vs training steps")):
        if result.get(name):
            lines += [f"## {title}", "", f"![{title}]({os.path.basename(result[name])})", ""]
    t = result["timing"]
    lines += [
        "## Command, hardware, time", "",
        "```", result["command"], "```", "",
        (f"Hardware: {result['hardware']}. Time: the {len(result['runs'])} training runs with their evaluations took "
         f"{t['runs_cpu_s']:.0f} CPU s ({t['runs_wall_s']:.0f} s wall) in total"
         + (f", plus {t['pretrained_eval_cpu_s']:.0f} CPU s for evaluating the pre-trained policy"
            if t.get("pretrained_eval_cpu_s") is not None else "")
         + (f"; {t['runs_from_cache']} of the runs were cached by an earlier invocation of the same command, so this "
            f"process itself used {t['cpu_s']:.0f} CPU s, {t['wall_s']:.0f} s wall" if t["runs_from_cache"] else
            f"; this process: {t['cpu_s']:.0f} CPU s, {t['wall_s']:.0f} s wall")
         + f" (load average {t['load_start']:.2f} at start, {t['load_end']:.2f} at end on {t['cores']} cores; "
         f"wall time is an upper bound on a shared machine). Date: {result['date']}."),
        "",
    ]
    if result.get("notes"):
        lines += ["Notes:", "", *[f"- {note}" for note in result["notes"]], ""]
    return "\n".join(lines)


def plot(cfg: BenchConfig, agg: dict, out_dir: str) -> tuple[str | None, str | None]:
    """success@deploy vs demos (one line per method) and success vs training step (one panel per demo count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    key = f"success@{cfg.deploy_steps}"
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {arm.name: cycle[i % len(cycle)] for i, arm in enumerate(cfg.arms)}
    demos_path = None
    if len(agg) > 1:  # one demo count: no curve over demos to draw
        demos_path = _plot_demos(cfg, agg, colors, key, out_dir, plt)
    return demos_path, _plot_steps(cfg, agg, colors, out_dir, plt)


def _plot_demos(cfg: BenchConfig, agg: dict, colors: dict, key: str, out_dir: str, plt: Any) -> str:
    """Final success against the number of variant demos, one line per arm."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in colors:
        xs = [int(n) for n in agg if method in agg[n]]
        if not xs:
            continue
        m = [agg[str(n)][method][key]["mean"] for n in xs]
        s = [agg[str(n)][method][key]["std"] for n in xs]
        ax.errorbar(xs, m, yerr=s, marker="o", capsize=3, label=method, color=colors[method])
    ax.set_xscale("log")
    ax.minorticks_off()  # only the demo counts as ticks (no "2 x 10^1" labels)
    ax.set_xticks([int(n) for n in agg], [str(n) for n in agg])
    ax.set_xlabel("variant demos")
    ax.set_ylabel(f"final success ({cfg.deploy_steps} Euler steps)")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    demos_path = os.path.join(out_dir, "gft_success_vs_demos.png")
    fig.savefig(demos_path, dpi=120)
    plt.close(fig)
    return demos_path


def _plot_steps(cfg: BenchConfig, agg: dict, colors: dict, out_dir: str, plt: Any) -> str:
    """Success (top) and score (bottom) against the training step, one column per demo count, mean +- std over
    seeds; the success axis follows the data, so a curve that stays below 0.2 is still readable."""
    fig, axes = plt.subplots(2, len(agg), figsize=(4.5 * len(agg), 6), sharex=True, squeeze=False)
    top = 0.0
    for col, (n, by_method) in enumerate(agg.items()):
        for row, key in enumerate(("success", "score")):
            ax = axes[row][col]
            for method, s in by_method.items():
                steps = s["curve"]["step"]
                m = np.array([p["mean"] for p in s["curve"][key]])
                sd = np.array([p["std"] for p in s["curve"][key]])
                ax.plot(steps, m, marker="o", label=method, color=colors[method])
                ax.fill_between(steps, m - sd, m + sd, alpha=0.15, color=colors[method])
                if key == "success":
                    top = max(top, float((m + sd).max()))
            ax.grid(alpha=0.3)
        axes[0][col].set_title(f"{n} demos")
        axes[1][col].set_xlabel("training step")
    for col in range(len(agg)):
        axes[0][col].set_ylim(-0.02, min(1.02, max(0.25, top + 0.05)))
        axes[1][col].set_ylim(0.0, 1.0)
    axes[0][0].set_ylabel(f"success ({cfg.deploy_steps} Euler steps)")
    axes[1][0].set_ylabel(f"score ({cfg.deploy_steps} Euler steps)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    steps_path = os.path.join(out_dir, "gft_success_vs_steps.png")
    fig.savefig(steps_path, dpi=120)
    plt.close(fig)
    return steps_path


# ---------------------------------------------------------------------------------------------------------------- main
def _pretrained_data(checkpoint: str) -> str | None:
    from fm_policy.trainer import read_run_config

    run = read_run_config(Path(checkpoint))
    return (run or {}).get("data", {}).get("path")


def run_benchmark(cfg: BenchConfig, label: str = "", command: str = "", notes: Sequence[str] = (),
                  only_seeds: Sequence[int] | None = None, cached_only: bool = False) -> dict:
    """Run (or read back from the cache) every (demos, arm, seed) run; `only_seeds` restricts this invocation to
    some seeds, so two processes can share the work on one run root (the report then covers only what this one
    ran; a last invocation without it collects everything from the cache). `cached_only` trains nothing: it reports
    the runs already finished (a preview while others still train)."""
    from fm_policy.factory import load_policy

    cfg.validate()
    torch.set_num_threads(1)
    cpu0, wall0, load0 = time.process_time(), time.perf_counter(), os.getloadavg()[0]
    data = ensure_variant_demos(cfg)
    pretrained = load_policy(cfg.pretrained)
    obs = _path_obs(cfg, pretrained)
    cache = Path(cfg.run_root) / "pretrained_result.json"
    settings = _run_settings(cfg)
    if cache.exists() and json.loads(cache.read_text()).get("settings") == settings:
        cached = json.loads(cache.read_text())
        pre, pre_cpu = cached["result"], cached.get("cpu_s")
    else:
        pre_start = time.process_time()
        pre = assess(pretrained, cfg, obs, final=True)
        pre_cpu = round(time.process_time() - pre_start, 1)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"settings": settings, "result": pre, "cpu_s": pre_cpu}, indent=2))
    runs = []
    for n in cfg.demos:
        for seed in range(max(arm.n_seeds(cfg.seeds) for arm in cfg.arms)):
            for arm in cfg.arms:
                if seed >= arm.n_seeds(cfg.seeds) or (only_seeds is not None and seed not in only_seeds):
                    continue
                if cached_only and not (Path(cfg.run_root) / f"demos{n}" / arm.folder / f"seed{seed}"
                                        / "bench_result.json").exists():
                    continue
                record = run_and_assess(cfg, arm, n, seed, obs)
                runs.append(record)
                print(f"demos {n} seed {seed} {arm.name}: success@{cfg.deploy_steps} "
                      f"{record['final']['variant'][str(cfg.deploy_steps)]['success']:.2f}, AUC "
                      f"{auc(record['curve']):.2f}, retention "
                      f"{record['final']['original'][str(cfg.deploy_steps)]['success']:.2f} "
                      f"({record['total_cpu_s']:.0f} CPU s)", flush=True)
    agg = aggregate(cfg, runs)
    return {
        "label": label, "command": command, "config": asdict(cfg), "data": data,
        "pretrained_data": _pretrained_data(cfg.pretrained), "pretrained": pre, "runs": runs, "aggregate": agg,
        "obs_keys": list(pretrained.obs_shapes),
        "hardware": f"{hardware_summary()}, 1 torch thread, torch {torch.__version__}",
        "timing": {"cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0, "load_start": load0,
                   "load_end": os.getloadavg()[0], "runs_cpu_s": round(sum(r["total_cpu_s"] for r in runs), 1),
                   "runs_wall_s": round(sum(r["total_wall_s"] for r in runs), 1), "pretrained_eval_cpu_s": pre_cpu,
                   "runs_from_cache": sum(bool(r.get("from_cache")) for r in runs), "cores": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "notes": list(notes),
    }


def _split_arms(text: str) -> list[str]:
    """Split on commas outside parentheses: 'ft,gft(w0=0.3,anneal=1)' -> ['ft', 'gft(w0=0.3,anneal=1)']."""
    arms, depth, current = [], 0, ""
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            arms.append(current.strip())
            current = ""
        else:
            current += ch
    arms.append(current.strip())
    return [a for a in arms if a]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m fm_policy.eval.benchmarks.bench_gft", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default=d.pretrained, help="the pre-trained flow policy (its EMA folder)")
    p.add_argument("--goal", default=",".join(f"{v:g}" for v in d.goal), help="variant goal X,Y,ANGLE")
    p.add_argument("--demos", type=_ints, default=d.demos, help="demo counts, e.g. 10,25,50,100")
    p.add_argument("--seeds", type=int, default=d.seeds, help="training seeds per (demos, method) cell")
    p.add_argument("--methods", default=",".join(d.methods),
                   help="arms, comma-separated: METHOD[+ot][(w0=X,anneal=Y)][*SEEDS], METHOD one of scratch, ft, gft")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per run")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="checkpoint / evaluation interval")
    p.add_argument("--episodes", type=int, default=d.episodes, help="episodes per evaluation")
    p.add_argument("--num-steps", type=_ints, default=d.num_steps, help="Euler step counts for the final models")
    p.add_argument("--deploy-steps", type=int, default=d.deploy_steps, help="step count of the training curves")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--ft-lr", type=float, default=d.ft_lr, help="learning rate of ft and gft")
    p.add_argument("--scratch-lr", type=float, default=d.scratch_lr)
    p.add_argument("--gft-schedule", default=d.gft_schedule, choices=("linear", "cosine", "step"))
    p.add_argument("--gft-w0", type=float, default=d.gft_w0)
    p.add_argument("--gft-anneal-fraction", type=float, default=d.gft_anneal_fraction)
    p.add_argument("--data", default=d.data, help="variant store (default: data/pusht_goal_..._n<max demos>.zarr)")
    p.add_argument("--data-seed", type=int, default=d.data_seed)
    p.add_argument("--curve-episodes", type=int, default=d.curve_episodes,
                   help="episodes for the intermediate checkpoints (default: --episodes)")
    p.add_argument("--threshold", type=float, default=d.threshold, help="success level for 'steps to reach'")
    p.add_argument("--collect-workers", type=int, default=d.collect_workers)
    p.add_argument("--run-root", default=d.run_root, help="where runs are trained and cached")
    p.add_argument("--path-obs", type=int, default=d.path_obs)
    p.add_argument("--path-steps", type=int, default=d.path_steps)
    p.add_argument("--only-seeds", type=_ints, default=None,
                   help="train only these seeds in this process (share a run root between processes)")
    p.add_argument("--cached-only", action="store_true", help="train nothing; report the finished runs")
    p.add_argument("--label", default="", help="a banner for the report, e.g. 'reduced CPU smoke run'")
    p.add_argument("--note", action="append", default=[], help="a note for the report (repeatable)")
    p.add_argument("--json", default="docs/results/gft.json")
    p.add_argument("--md", default="docs/results/gft.md")
    p.add_argument("--plots", default="docs/results", help="folder for the PNG plots")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = BenchConfig(
        pretrained=args.pretrained, goal=[float(v) for v in args.goal.split(",")], demos=args.demos,
        seeds=args.seeds, methods=_split_arms(args.methods), steps=args.steps,
        eval_every=args.eval_every, episodes=args.episodes, num_steps=args.num_steps, deploy_steps=args.deploy_steps,
        batch_size=args.batch_size, ft_lr=args.ft_lr, scratch_lr=args.scratch_lr, gft_schedule=args.gft_schedule,
        gft_w0=args.gft_w0, gft_anneal_fraction=args.gft_anneal_fraction, data=args.data, data_seed=args.data_seed,
        collect_workers=args.collect_workers, run_root=args.run_root, path_obs=args.path_obs,
        path_steps=args.path_steps, curve_episodes=args.curve_episodes, threshold=args.threshold,
    )
    command = "python -m fm_policy.eval.benchmarks.bench_gft " + " ".join(shlex.quote(a) for a in (
        sys.argv[1:] if argv is None else argv))
    result = run_benchmark(cfg, label=args.label, command=command, notes=args.note, only_seeds=args.only_seeds,
                           cached_only=args.cached_only)
    result["plot_demos"], result["plot_steps"] = plot(cfg, result["aggregate"], args.plots)
    text = markdown(result)
    write_results(result, args.json, args.md, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
