"""`train-policy --config NAME_OR_PATH [key=value ...]`: build data, policy and trainer from one typed config.

A run directory that already holds checkpoints is resumed from the newest complete one (with the same config; only
`loop.steps` may grow), so rerunning an interrupted command continues it exactly.

Launched with `accelerate launch` or `torchrun`, every process runs this same entry point; the trainer shards each
global batch across them (`fm_policy.trainer`), and only the main process writes the run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from fm_policy.config import ConfigError, config_to_yaml, load_config, peek_config_value
from fm_policy.datasets.policy_data import DataConfig, build_policy_data
from fm_policy.distributed import is_main_process, process_state
from fm_policy.factory import make_policy, policy_config_class
from fm_policy.flow_policy import FlowPolicyConfig
from fm_policy.policy import PolicyConfig
from fm_policy.trainer import EMAConfig, LoopConfig, OptimConfig, Trainer, latest_checkpoint, seed_everything
from fm_policy.versions import hardware_summary


@dataclass
class EvalConfig:
    """Rollout evaluation during (loop.eval_every) and after training."""

    env: str = "pusht"
    env_kwargs: dict[str, Any] = field(default_factory=dict)  # bools and numbers stay typed (abs_actions: true)
    episodes: int = 50
    num_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    seed_start: int = 100000
    workers: int = 1
    # during training (loop.eval_every): false = evaluate inline on the main process (training waits);
    # true = save the EMA weights and evaluate them in a separate process (`workers` CPU processes) while training
    # continues; results are logged at the step they were taken from
    background: bool = False


@dataclass
class TrainConfig:
    run_dir: str = "runs/pusht_flow"
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=FlowPolicyConfig)  # the class of the chosen policy.type
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def config_defaults_yaml(config: Any) -> str:
    """`config`'s sections at their class defaults (a polymorphic section, such as `policy`, at its own class's), as
    YAML: what a key added since a run started meant for that run."""
    base = type(config)()
    changes = {f.name: type(value)() for f in dataclasses.fields(config)
               if dataclasses.is_dataclass(value := getattr(config, f.name))
               and type(value) is not type(getattr(base, f.name))}
    return config_to_yaml(dataclasses.replace(base, **changes))


def _fill_added_keys(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any]) -> None:
    """A section or key that a newer fm-policy added is absent from a run's saved config; when the resumed config
    holds its default there, the run is unchanged, so count it as saved with that value."""
    for section, default in defaults.items():
        if section not in old:
            if new.get(section) == default:
                old[section] = default
        elif isinstance(default, dict) and isinstance(old[section], dict) and isinstance(new.get(section), dict):
            for key, value in default.items():
                if key not in old[section] and new[section].get(key) == value:
                    old[section][key] = value


def _check_resume_config(run_dir: Path, config_yaml: str, defaults_yaml: str | None = None) -> None:
    """Resuming with another config would silently mix two runs. Only loop.steps and the resource settings
    (progress bar, torch threads: a shared machine may need fewer on resume) may change. The process count is not
    part of the config: a run resumes with any count that splits its global batch (`fm_policy.trainer`). Keys
    added to the config since the run started are fine at their defaults (`defaults_yaml`)."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    old, new = yaml.safe_load(saved.read_text()), yaml.safe_load(config_yaml)
    if defaults_yaml is not None:
        _fill_added_keys(old, new, yaml.safe_load(defaults_yaml))
    for cfg in (old, new):
        cfg.pop("run_dir", None)  # a run directory may be moved (to another machine, another mount point)
        for key in ("steps", "progress", "torch_threads"):
            cfg["loop"].pop(key, None)
    if old != new:
        changed = sorted(
            f"{section}.{key}"
            for section in new
            if isinstance(new[section], dict)
            for key in set(new[section]) | set(old.get(section, {}))
            if new[section].get(key) != old.get(section, {}).get(key)
        )
        raise ConfigError(
            f"{run_dir} holds checkpoints of a run with another config (differs in {changed or 'top-level keys'}); "
            "use a new run_dir, or the same config (only loop.steps, loop.progress and loop.torch_threads may change when resuming)"
        )


def train(config: TrainConfig) -> Path:
    """Train (or resume) the run described by `config`; returns the newest checkpoint directory."""
    if config.loop.torch_threads:
        torch.set_num_threads(config.loop.torch_threads)
    seed_everything(config.loop.seed)
    policy_cfg = config.policy
    data = build_policy_data(config.data, policy_cfg.horizon, policy_cfg.n_obs_steps, policy_cfg.n_action_steps)
    policy = make_policy(policy_cfg, data.arrays, config.data.obs_keys)
    n_params = sum(p.numel() for p in policy.parameters())
    return run_trainer(
        policy, data, config,
        describe=f"policy {policy_cfg.type}/{policy_cfg.network['kind']}: {n_params / 1e6:.2f} M parameters; "
                 f"{len(data.train)} training windows from {int(data.train_mask.sum())} episodes of {data.source}",
    )


def run_trainer(policy, data, config, describe: str, session_extra: dict | None = None) -> Path:
    """The part every training entry point shares (pre-training, fine-tuning): resume check, Trainer, periodic
    rollout evaluation, the session record. `config` is any run config with run_dir/optim/ema/loop/data/eval
    sections; returns the newest checkpoint directory."""
    config_yaml = config_to_yaml(config)
    run_dir = Path(config.run_dir)
    state = process_state(config.loop.device)
    main = state.is_main_process
    resume_from = latest_checkpoint(run_dir)
    if resume_from is not None:
        _check_resume_config(run_dir, config_yaml, config_defaults_yaml(config))
    state.wait_for_everyone()  # every process has read the run directory before the main process writes to it
    trainer = Trainer(policy, data, config.optim, config.ema, config.loop, run_dir, config_yaml,
                      num_workers=config.data.num_workers)
    processes = (f"; {trainer.world} processes x {trainer.micro_batch} samples x {config.loop.grad_accum_steps} "
                 "micro-batches per step" if trainer.world > 1 or config.loop.grad_accum_steps > 1 else "")
    if main:
        print(f"{describe}; {getattr(data, 'storage', 'memory')} data; device {trainer.accelerator.device}"
              f"{processes}; run dir {run_dir}")
    if resume_from is not None:
        trainer.resume(resume_from)
        if main:
            print(f"resumed from {resume_from} (step {trainer.step})")
    start, first_step = time.perf_counter(), trainer.step
    evaluate = None
    if config.loop.eval_every and main:
        evaluate = BackgroundEvaluator(config, run_dir) if config.eval.background else _rollout_evaluator(config)
    history = trainer.train(evaluate=evaluate)
    seconds = time.perf_counter() - start
    if main:
        print(f"trained to step {trainer.step} in {seconds:.0f} s")
        _append_session(run_dir, {
            "steps": [first_step, trainer.step], "seconds": round(seconds, 1),
            "steps_per_s": round((trainer.step - first_step) / max(seconds, 1e-9), 2),
            "batch_size": config.loop.batch_size, "parameters": sum(p.numel() for p in policy.parameters()),
            "device": str(trainer.accelerator.device), "hardware": hardware_summary(trainer.accelerator.device),
            "processes": trainer.world, "grad_accum_steps": config.loop.grad_accum_steps,
            "mixed_precision": config.loop.mixed_precision, "data_storage": getattr(data, "storage", "memory"),
            "torch_threads": torch.get_num_threads(),
            "final_train_loss": history["loss"][-1] if history["loss"] else None, **(session_extra or {}),
        })
    final = latest_checkpoint(run_dir)
    assert final is not None
    return final


def _append_session(run_dir: Path, session: dict) -> None:
    """`training_sessions.json`: one entry per (resumed) session, so a run's total time and hardware are on record."""
    path = run_dir / "training_sessions.json"
    sessions = json.loads(path.read_text()) if path.exists() else []
    sessions.append(session)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sessions, indent=2))
    os.replace(tmp, path)


def _eval_arguments(config: TrainConfig) -> dict[str, Any]:
    return {"env": config.eval.env, "env_kwargs": dict(config.eval.env_kwargs), "n_episodes": config.loop.eval_episodes,
            "num_steps": list(config.loop.eval_num_steps), "seed_start": config.eval.seed_start,
            "workers": config.eval.workers}


def _rollout_scalars(policy, arguments: dict[str, Any]) -> dict[str, float]:
    from fm_policy.eval.run import evaluate_policy

    report = evaluate_policy(policy, progress=False, **arguments)
    out = {}
    for setting in report.settings:
        out[f"score_steps{setting.num_steps}"] = setting.score.value
        out[f"success_steps{setting.num_steps}"] = setting.success.value
    return out


def _rollout_evaluator(config: TrainConfig):
    arguments = _eval_arguments(config)
    return lambda policy: _rollout_scalars(policy, arguments)


def _evaluate_saved(folder: str, arguments: dict[str, Any]) -> None:
    """Entry point of a background evaluation process: evaluate `folder/policy` on CPU, write `folder/result.json`,
    then drop the weights (the checkpoints keep them)."""
    import shutil

    from fm_policy.factory import load_policy

    torch.set_num_threads(1)
    scalars = _rollout_scalars(load_policy(Path(folder) / "policy", device="cpu"), arguments)
    tmp = Path(folder) / "result.tmp"
    tmp.write_text(json.dumps(scalars))
    os.replace(tmp, Path(folder) / "result.json")
    shutil.rmtree(Path(folder) / "policy", ignore_errors=True)


class BackgroundEvaluator:
    """Rollout evaluation in a separate process (eval.background=true): at an evaluation step the main training
    process only saves the EMA weights to `run_dir/eval/step_N/policy` and starts a spawned process that evaluates
    them on CPU with `eval.workers` environment processes, so no training process waits for the rollouts. Results
    are picked up between steps and logged to TensorBoard at the step they belong to (and kept in
    `run_dir/eval/step_N/result.json`). One evaluation runs at a time: a step that comes due while the previous one
    is still running is skipped with a message (evaluate less often, or with more workers)."""

    def __init__(self, config: TrainConfig, run_dir: Path):
        self.arguments = _eval_arguments(config)
        self.folder = Path(run_dir) / "eval"
        self.running: tuple[int, Any, Path] | None = None

    def submit(self, step: int, policy) -> None:
        if self.running is not None and self.running[1].is_alive():
            print(f"step {step}: the evaluation of step {self.running[0]} is still running; skipping this one")
            return
        import multiprocessing

        folder = self.folder / f"step_{step}"
        policy.save_pretrained(folder / "policy")
        process = multiprocessing.get_context("spawn").Process(
            target=_evaluate_saved, args=(str(folder), self.arguments), name=f"fm-policy-eval-{step}")
        process.start()
        self.running = (step, process, folder)

    def poll(self, wait: bool = False) -> list[tuple[int, dict[str, float]]]:
        """Results of a finished evaluation, as [(step, scalars)] (empty while it runs)."""
        if self.running is None:
            return []
        step, process, folder = self.running
        if wait:
            process.join()
        if process.is_alive():
            return []
        process.join()
        self.running = None
        result = folder / "result.json"
        if process.exitcode != 0 or not result.exists():
            print(f"warning: the background evaluation of step {step} failed (exit code {process.exitcode}); "
                  "its traceback is above")
            return []
        return [(step, json.loads(result.read_text()))]

    def close(self) -> list[tuple[int, dict[str, float]]]:
        """Wait for the running evaluation (the last one belongs to the final weights) and return its results."""
        return self.poll(wait=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train-policy",
        description="Train a flow-matching (or DDPM baseline) action-chunk policy on a zarr demo store.",
        epilog="Example: train-policy --config pusht_keypoints_flow_cpu data.path=data/pusht_expert.zarr loop.steps=5000",
    )
    parser.add_argument("--config", required=True, help="a YAML file, or the name of a config shipped in configs/")
    parser.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. optim.lr=3e-4")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def load_train_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A `TrainConfig` from YAML + overrides, its `policy` section typed by the config class of `policy.type`
    (so a key another policy type has, or a misspelt one, is reported with the valid keys)."""
    policy_type = peek_config_value(path, overrides, "policy.type") or FlowPolicyConfig().type
    config_cls = policy_config_class(str(policy_type))
    return load_config(TrainConfig, path, overrides, defaults=TrainConfig(policy=config_cls()))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = load_train_config(args.config, args.overrides)
    if args.print_config:
        print(config_to_yaml(config))
        return 0
    checkpoint = train(config)
    if is_main_process(config.loop.device):
        print(f"checkpoint: {checkpoint} (evaluate with: fm-policy eval --checkpoint {checkpoint / 'ema'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
