"""Evaluate a saved policy: `fm-policy eval --checkpoint DIR ...` and the in-training rollouts.

The env is built to emit exactly the observation keys the policy was trained on (`env_kwargs_for_obs_keys`), so a
checkpoint evaluates without restating its observation mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fm_policy.envs import env_kwargs_for_obs_keys
from fm_policy.eval.harness import EvalReport, evaluate
from fm_policy.eval.report import write_report

from fm_policy.errors import UserError


def evaluate_policy(
    policy: Any,
    env: str = "pusht",
    env_kwargs: dict[str, Any] | None = None,
    n_episodes: int = 50,
    num_steps: Sequence[int | None] = (None,),
    seed_start: int = 100000,
    workers: int = 1,
    **harness_kwargs: Any,
) -> EvalReport:
    """`evaluate` with the env's observation kwargs derived from the policy's inputs (explicit kwargs win)."""
    kwargs = {**env_kwargs_for_obs_keys(env, list(policy.obs_shapes)), **(env_kwargs or {})}
    return evaluate(policy, env=env, env_kwargs=kwargs, n_episodes=n_episodes, num_steps=num_steps,
                    seed_start=seed_start, workers=workers, n_envs=workers if workers > 1 else None, **harness_kwargs)


def eval_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path | None = None,
    solver: str | None = None,
    device: str = "cpu",
    n_videos: int = 0,
    **kwargs: Any,
) -> tuple[EvalReport, dict[str, Path]]:
    """Load a saved policy, evaluate it, write JSON/Markdown/PNG (and videos) to `out_dir` (default:
    `<checkpoint>/eval`). `solver` overrides the flow ODE method or the DDPM baseline's sampler."""
    from fm_policy.factory import load_policy

    policy = load_policy(checkpoint, device=device)
    if solver is not None:
        if solver not in type(policy).solvers:
            raise UserError(f"--solver {solver}: a '{type(policy).name}' policy takes one of {list(type(policy).solvers)}")
        policy.config.solver = solver
    out = Path(out_dir) if out_dir is not None else Path(checkpoint) / "eval"
    report = evaluate_policy(policy, device=device, video_dir=out / "videos" if n_videos else None,
                             n_videos=n_videos, **kwargs)
    return report, write_report(report, out)
