"""Command line: `fm-policy <command>` and `train-policy`.

Heavy imports (torch, simulators) happen inside the command that needs them, so `fm-policy --help` is instant and a
dataset command never pays for a simulator import.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from fm_policy import __version__

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _csv(value: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. state,keypoints")
    return items


def _cmd_collect(args: argparse.Namespace) -> int:
    from fm_policy.datasets.collect import CollectConfig, collect

    config = CollectConfig(
        env=args.env,
        episodes=args.episodes,
        out=args.out,
        workers=args.workers,
        obs=args.obs,
        seed=args.seed,
        max_steps=args.max_steps,
        max_retries=args.max_retries,
        zarr_format=args.zarr_format,
        compressor=args.compressor,
        overwrite=args.overwrite,
    )
    summary = collect(config, progress=not args.no_progress)
    skipped = summary["skipped_env_seeds"]
    print(
        f"wrote {summary['episodes']} episodes ({summary['steps']} steps, mean length "
        f"{summary['mean_episode_length']:.1f}) to {summary['out']} in {summary['seconds']:.1f} s; "
        f"{len(skipped)} candidate(s) skipped after all retries failed{': env seeds ' + str(skipped) if skipped else ''}"
    )
    return 0


def _cmd_dataset_info(args: argparse.Namespace) -> int:
    from fm_policy.datasets.info import dataset_summary, format_summary

    summary = dataset_summary(args.path)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0


def _cmd_dataset_validate(args: argparse.Namespace) -> int:
    from fm_policy.datasets.replay_buffer import ReplayBuffer

    with ReplayBuffer.open(args.path, required_keys=args.keys or ()) as buffer:
        print(f"{args.path}: valid ({buffer.n_episodes} episodes, {buffer.n_steps} steps, keys {buffer.keys})")
    return 0


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _csv(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 1,2,4,8; got '{value}'") from None


def _cmd_eval(args: argparse.Namespace) -> int:
    from fm_policy.eval.run import eval_checkpoint

    report, paths = eval_checkpoint(
        args.checkpoint,
        out_dir=args.out,
        solver=args.solver,
        device=args.device,
        n_videos=args.videos,
        env=args.env,
        n_episodes=args.episodes,
        num_steps=args.num_steps,
        seed_start=args.seed_start,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(paths["markdown"].read_text())
    print(f"report: {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from fm_policy.quickstart import quickstart

    quickstart(episodes=args.episodes, steps=args.steps, eval_episodes=args.eval_episodes, workers=args.workers)
    return 0


def _cmd_analyze_flow(args: argparse.Namespace) -> int:
    from fm_policy.finetune.contraction import analyze_flow

    stats = analyze_flow(args.checkpoint, args.data, n=args.n, num_steps=args.num_steps, solver=args.solver,
                         delta=args.delta, t_disturb=args.t_disturb, seed=args.seed, jacobian=args.jacobian,
                         device=args.device)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        width = max(len(k) for k in stats)
        for key, value in stats.items():
            print(f"{key:<{width}}  {value:.6g}")
    return 0


def _cmd_envs(args: argparse.Namespace) -> int:
    from fm_policy.envs import available_envs

    print("\n".join(available_envs()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fm-policy", description="Flow-matching action-chunk policies for robots.")
    parser.add_argument("--version", action="version", version=f"fm-policy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("collect", help="generate expert demonstrations into a zarr store")
    p.add_argument("--env", default="pusht", help="environment with a scripted expert (default: pusht)")
    p.add_argument("--episodes", type=int, default=200, help="successful episodes to store (default: 200)")
    p.add_argument("--out", required=True, help="output store, e.g. data/pusht_expert.zarr")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    p.add_argument("--obs", type=_csv, default=("state", "keypoints"),
                   help="observation modes to store: state, keypoints, image (default: state,keypoints)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; candidate i uses env seed seed+i (default: 0)")
    p.add_argument("--max-steps", type=int, default=300, help="episode step limit (default: 300)")
    p.add_argument("--max-retries", type=int, default=2, help="retries with fresh planner seeds (default: 2)")
    p.add_argument("--zarr-format", type=int, choices=(2, 3), default=2,
                   help="2 (default) is readable by diffusion_policy; 3 is zarr's current format")
    p.add_argument("--compressor", choices=("default", "disk", "none"), default="default",
                   help="Blosc lz4 (default, fast), Blosc zstd bit-shuffle (disk, small) or none")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store or interrupted collection")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_collect)

    dataset = sub.add_parser("dataset", help="inspect replay-buffer stores").add_subparsers(
        dest="dataset_command", required=True, metavar="subcommand")
    p = dataset.add_parser("info", help="episodes, steps, keys, shapes, dtypes, chunks, compressors, statistics")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_dataset_info)
    p = dataset.add_parser("validate", help="check a store's layout and values; exit 2 with the problem if bad")
    p.add_argument("path")
    p.add_argument("--keys", type=_csv, help="data keys that must be present, e.g. state,action")
    p.set_defaults(func=_cmd_dataset_validate)

    p = sub.add_parser("eval", help="roll a saved policy out in its simulator: score, success, latency, report")
    p.add_argument("--checkpoint", required=True, help="a saved policy, e.g. runs/NAME/checkpoints/step_N/ema")
    p.add_argument("--env", default="pusht")
    p.add_argument("--episodes", type=int, default=50, help="test episodes, env seeds from --seed-start (default 50)")
    p.add_argument("--num-steps", type=_ints, default=(1, 2, 4, 8),
                   help="sampler steps to compare, e.g. 1,2,4,8 (flow: ODE steps; ddpm: sampler steps)")
    p.add_argument("--solver", help="flow: euler|midpoint|rk4|dopri5; ddpm: ddpm|ddim (default: the saved one)")
    p.add_argument("--seed-start", type=int, default=100000)
    p.add_argument("--workers", type=int, default=1, help="env worker processes (default 1: envs in this process)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--videos", type=int, default=0, help="mp4 videos of the first N episodes of each setting")
    p.add_argument("--out", help="report folder (default: <checkpoint>/eval)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("quickstart", help="the whole loop on Push-T in minutes: collect, train, evaluate")
    p.add_argument("--episodes", type=int, default=50, help="expert demonstrations to collect (default 50)")
    p.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    p.add_argument("--eval-episodes", type=int, default=20, help="test episodes per setting (default 20)")
    p.add_argument("--workers", type=int, default=2, help="processes for collection (default 2)")
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser("analyze-flow", help="contraction (Jacobian eigenvalues) and disturbance response of a policy")
    p.add_argument("--checkpoint", required=True, help="a saved flow or flow_residual policy directory")
    p.add_argument("--data", help="store to draw observations from (default: the training run's)")
    p.add_argument("--n", type=int, default=64, help="observations / trajectories to sample (default 64)")
    p.add_argument("--num-steps", type=int, help="ODE steps (default: the policy's)")
    p.add_argument("--solver", help="euler|midpoint|rk4 (default: the policy's)")
    p.add_argument("--delta", type=float, default=1e-2, help="size of the injected disturbance (default 1e-2)")
    p.add_argument("--t-disturb", type=float, default=0.5, help="time of the mid-trajectory disturbance (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jacobian", choices=("exact", "power"), default="exact",
                   help="exact symmetric-Jacobian eigenvalues, or power iteration for large action chunks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_analyze_flow)

    sub.add_parser("envs", help="list registered environments").set_defaults(func=_cmd_envs)
    sub.add_parser("train", help="train a policy: same arguments as train-policy (see train-policy --help)")
    sub.add_parser("finetune", help="MLE / residual fine-tuning of a flow policy (see fm-policy finetune --help)")
    return parser


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Expected failures (bad data, bad arguments, existing outputs) print one clear line, not a traceback."""
    from fm_policy.checkpoint import CheckpointError
    from fm_policy.datasets.errors import DatasetError

    try:
        return func(args)
    except (DatasetError, CheckpointError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except KeyboardInterrupt as exc:
        print(f"\n{exc or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return train_main(argv[1:])
    if argv[:1] == ["finetune"]:
        return finetune_main(argv[1:])
    args = build_parser().parse_args(argv)
    return _run(args.func, args)


def train_main(argv: Sequence[str] | None = None) -> int:
    """`train-policy`: its own parser (fm_policy.train), the same one-line errors as every command."""

    def run(_: argparse.Namespace) -> int:
        from fm_policy.train import main as train

        return train(argv)

    return _run(run, argparse.Namespace())


def finetune_main(argv: Sequence[str] | None = None) -> int:
    """`fm-policy finetune`: its own parser (fm_policy.finetune.run), the same one-line errors as every command."""

    def run(_: argparse.Namespace) -> int:
        from fm_policy.finetune.run import main as finetune

        return finetune(argv)

    return _run(run, argparse.Namespace())


if __name__ == "__main__":
    sys.exit(main())
