"""`fm-policy quickstart`: the whole loop on the embedded default task, Push-T, in minutes on a CPU.

1. collect expert demonstrations (data/quickstart_pusht.zarr; reused if already there),
2. train the small flow policy of configs/quickstart.yaml,
3. evaluate its EMA weights at 1, 4 and 8 Euler steps and print the table.

Each stage is the same code the full commands run (`fm-policy collect`, `train-policy`, `fm-policy eval`); the
quickstart only picks small sizes. Rerunning it resumes whatever was interrupted.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from fm_policy.datasets.collect import CollectConfig, collect
from fm_policy.train import load_train_config, train

DATA = "data/quickstart_pusht.zarr"


def quickstart(episodes: int = 50, steps: int = 2000, eval_episodes: int = 20, workers: int = 2) -> Path:
    """Run the three stages; returns the evaluation report's Markdown path."""
    from fm_policy.eval.run import eval_checkpoint

    start = time.perf_counter()
    if os.path.exists(DATA):
        print(f"[1/3] using the demonstrations already in {DATA}")
    else:
        print(f"[1/3] collecting {episodes} Push-T expert demonstrations into {DATA}")
        summary = collect(CollectConfig(env="pusht", episodes=episodes, out=DATA, workers=workers))
        print(f"      {summary['episodes']} episodes, {summary['steps']} steps in {summary['seconds']:.0f} s")

    config = load_train_config("quickstart", [f"data.path={DATA}", f"loop.steps={steps}"])
    print(f"[2/3] training a flow policy for {steps} steps (run dir {config.run_dir})")
    checkpoint = train(config)

    print(f"[3/3] evaluating {checkpoint / 'ema'} on {eval_episodes} test episodes per setting")
    torch.set_num_threads(1)  # the policy is small; envs and inference share the cores better this way
    report, paths = eval_checkpoint(checkpoint / "ema", out_dir=Path(config.run_dir) / "eval", n_episodes=eval_episodes,
                                    num_steps=list(config.eval.num_steps), n_videos=1)
    print(paths["markdown"].read_text())
    print(f"quickstart done in {time.perf_counter() - start:.0f} s; report and plot in {paths['markdown'].parent}")
    return paths["markdown"]
