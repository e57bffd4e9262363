"""Command line: `fm-policy <command>` and `train-policy`.

Heavy imports (torch, simulators) happen inside the command that needs them, so `fm-policy --help` is instant and a
dataset command never pays for a simulator import.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fm_policy import __version__
from fm_policy.envs.spec import csv_list
from fm_policy.errors import UserError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _arg_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` as an argparse `type`: argparse prints an ArgumentTypeError's message but replaces a ValueError's with
    a generic "invalid value"; env option parsers raise ValueError (they are not CLI code), so convert it. Builtin
    types (`int`, `float`, `str`) keep argparse's own "invalid int value" message."""
    if isinstance(parse, type):
        return parse

    def convert(value: str) -> Any:
        try:
            return parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _csv(value: str) -> tuple[str, ...]:
    return tuple(_arg_type(csv_list)(value))


def _add_env_options(parser: argparse.ArgumentParser, command: str) -> None:
    """One argument per env-specific flag that any registered env declares for `command` (`EnvSpec.options`)."""
    from fm_policy.envs.registry import env_options

    for option, envs in env_options(command).values():
        metavar = option.metavar or (None if option.choices else option.flag.lstrip("-").replace("-", "_").upper())
        try:
            parser.add_argument(option.flag, dest=option.dest, type=_arg_type(option.parse), choices=option.choices,
                                metavar=metavar, default=None, help=f"{option.help} (--env {', '.join(envs)})")
        except argparse.ArgumentError:
            raise UserError(f"env {', '.join(envs)} declares option {option.flag}, which `fm-policy {command}` "
                             "already has; rename it in the env's spec") from None


def _env_option_kwargs(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The env options given on the command line, as kwargs for `args.env` (recorder kwargs for collect, env
    factory kwargs for eval). An option that `args.env` does not declare is an error naming the envs that do."""
    from fm_policy.envs.registry import env_options, env_spec

    own = {o.flag: o for o in env_spec(args.env).options_for(command)}  # unknown env: error listing the known ones
    kwargs: dict[str, Any] = {}
    foreign: dict[str, list[str]] = {}
    for flag, (option, envs) in env_options(command).items():
        value = getattr(args, option.dest, None)
        if value is None:
            continue
        if flag in own:
            kwargs[own[flag].kwarg] = value
        else:
            foreign.setdefault(", ".join(envs), []).append(flag)
    if foreign:
        raise UserError("; ".join(f"{', '.join(flags)} only apply to --env {envs}" for envs, flags in foreign.items()))
    return kwargs


def _grouped(pairs: Sequence[tuple[str, str]]) -> str:
    """`[(env, text), ...]` -> `"env1, env2: text; env3: other"`: help texts that list per-env facts compactly."""
    groups: dict[str, list[str]] = {}
    for env, text in pairs:
        groups.setdefault(text, []).append(env)
    return "; ".join(f"{', '.join(envs)}: {text}" for text, envs in groups.items())


def _cmd_collect(args: argparse.Namespace) -> int:
    from fm_policy.datasets.collect import CollectConfig, collect, env_collect_defaults

    defaults = env_collect_defaults(args.env)
    env_kwargs = _env_option_kwargs(args, "collect")
    config = CollectConfig(
        env=args.env,
        episodes=args.episodes,
        out=args.out,
        workers=args.workers,
        obs=args.obs if args.obs is not None else defaults["obs"],
        seed=args.seed,
        max_steps=args.max_steps if args.max_steps is not None else defaults["max_steps"],
        max_retries=args.max_retries,
        zarr_format=args.zarr_format,
        compressor=args.compressor,
        overwrite=args.overwrite,
        env_kwargs=env_kwargs,
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


def _cmd_dataset_replay(args: argparse.Namespace) -> int:
    from fm_policy.eval.demo_replay import format_replay, replay_store

    summary = replay_store(args.path, env=args.env, episodes=args.episodes, tolerance=args.tolerance)
    print(json.dumps(summary.as_dict(), indent=2) if args.json else format_replay(summary))
    return 0


def _cmd_convert_robomimic(args: argparse.Namespace) -> int:
    from fm_policy.datasets.convert_robomimic import convert_robomimic

    with convert_robomimic(args.input, args.output, obs_keys=args.obs_keys, filter_key=args.filter,
                           overwrite=args.overwrite, progress=not args.quiet,
                           abs_actions=args.abs_actions) as buffer:
        print(f"{args.output}: {buffer.n_episodes} episodes, {buffer.n_steps} steps, keys {buffer.keys}")
    return 0


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _csv(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 1,2,4,8; got '{value}'") from None


def _env_kwarg(value: str) -> tuple[str, object]:
    key, sep, raw = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. abs_actions=true; got '{value}'")
    import yaml

    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"value of '{key}' is not valid YAML: {exc}") from None


def _noise_scale(value: str) -> tuple[str, object]:
    """`KEY=S` or `KEY=S1,S2,...` (one scale per dimension) for --obs-noise-scale."""
    key, sep, raw = value.partition("=")
    try:
        if not sep or not key.strip():
            raise ValueError
        scales = tuple(float(v) for v in csv_list(raw))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=SCALE or KEY=S1,S2,..., e.g. state=1,1,1,1,0.01; got '{value}'") from None
    return key.strip(), scales[0] if len(scales) == 1 else scales


_DISTURBANCE_FLAGS = {  # Disturbance field -> argparse dest (docs/evaluation.md, "Disturbances")
    "obs_noise": "obs_noise", "obs_noise_keys": "obs_noise_keys", "obs_noise_scale": "obs_noise_scale",
    "shove_step": "shove_step", "shove_block": "shove_block", "shove_agent": "shove_agent",
    "shove_angle": "shove_angle", "init_noise_scale": "init_noise_scale", "init_noise_offset": "init_noise_offset",
    "seed": "disturbance_seed",
}


def _disturbance(args: argparse.Namespace) -> Any:
    """The eval's `Disturbance` from its flags, or None when none is given; bad values fail here, before the
    checkpoint is loaded."""
    given = {field: getattr(args, dest) for field, dest in _DISTURBANCE_FLAGS.items()
             if getattr(args, dest) not in (None, [])}
    if not given:
        return None
    from fm_policy.eval.disturbances import Disturbance

    if "obs_noise_scale" in given:
        given["obs_noise_scale"] = dict(given["obs_noise_scale"])
    return Disturbance(**given)


def _cmd_eval(args: argparse.Namespace) -> int:
    from fm_policy.eval.run import eval_checkpoint

    disturbance = _disturbance(args)
    _report, paths = eval_checkpoint(
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
        env_kwargs={**_env_option_kwargs(args, "eval"), **dict(args.env_kwarg)},
        progress=not args.no_progress,
        disturbance=disturbance,
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
    from fm_policy.envs.registry import all_env_specs

    specs = sorted(all_env_specs(), key=lambda spec: spec.name)
    width = max(len(spec.name) for spec in specs)
    for spec in specs:
        expert = "  [scripted expert]" if spec.collection is not None else ""
        print(f"{spec.name:<{width}}  {spec.description}{expert}")
    return 0


def _deploy_import_error(exc: ImportError) -> UserError:
    return UserError(f"this command needs the deploy extra: pip install 'fm-policy[deploy]' ({exc})")


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import os

    try:
        from fm_policy.deploy.server import PolicyServer, ServerConfig
    except ImportError as exc:
        raise _deploy_import_error(exc) from None
    from fm_policy.factory import load_policy

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "debug":  # websockets' own per-connection lines duplicate ours
        logging.getLogger("fm_policy.deploy.websockets").setLevel(logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    config = ServerConfig(host=args.host, port=args.port, api_key=api_key, num_steps=args.num_steps,
                          max_message_bytes=args.max_message_bytes, max_clients=args.max_clients,
                          max_batch=args.max_batch, control_hz=args.control_hz, max_num_steps=args.max_num_steps,
                          max_nfe=args.max_nfe, max_queue=args.max_queue, request_timeout_s=args.request_timeout,
                          preempt=not args.no_preempt, protocol=args.protocol, action_range=args.action_range,
                          seed=args.seed, idle_timeout_s=args.idle_timeout or None,
                          max_queued_frames=args.max_queued_frames, auth_fail_limit=args.auth_fail_limit)
    policy = load_policy(args.checkpoint, device=args.device)
    server = PolicyServer(policy, config, model_name=str(args.checkpoint))
    server.serve_forever(ready=lambda port: print(f"serving {args.checkpoint} at ws://{args.host}:{port}", flush=True))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        from fm_policy.deploy.export import ExportConfig, export_policy
    except ImportError as exc:
        raise _deploy_import_error(exc) from None
    from pathlib import Path

    from fm_policy.factory import load_policy

    policy = load_policy(args.checkpoint)
    fused = args.fused_steps if type(policy).supports_fused_export else ()
    out = Path(args.out) if args.out else Path(args.checkpoint) / f"export_{args.format}"
    manifest = export_policy(policy, out, ExportConfig(format=args.format, fused_steps=fused, opset=args.opset,
                                                       verify=not args.no_verify))
    for g in manifest.graphs:
        err = "not verified" if g.max_abs_error is None else f"max abs error {g.max_abs_error:.2e} (tol {g.tolerance:.1e})"
        print(f"{out / g.file}: {err}")
    print(f"manifest: {out / 'export.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fm-policy", description="Flow-matching action-chunk policies for robots.")
    parser.add_argument("--version", action="version", version=f"fm-policy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    from fm_policy.envs.registry import all_env_specs

    experts = [(s.name, s.collection) for s in all_env_specs() if s.collection is not None]
    p = sub.add_parser("collect", help="generate expert demonstrations into a zarr store")
    p.add_argument("--env", default="pusht", help="environment with a scripted expert (default: pusht): "
                                                  + ", ".join(name for name, _ in experts))
    p.add_argument("--episodes", type=int, default=200, help="successful episodes to store (default: 200)")
    p.add_argument("--out", required=True, help="output store, e.g. data/pusht_expert.zarr")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    p.add_argument("--obs", type=_csv, default=None,
                   help="observation modes to store; " + _grouped(
                       [(name, f"{c.obs_help} (default: {','.join(c.obs)})") for name, c in experts]))
    p.add_argument("--seed", type=int, default=0, help="dataset seed; candidate i uses env seed seed+i (default: 0)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="episode step limit (default: the env's; " + _grouped(
                       [(name, str(c.max_steps)) for name, c in experts]) + ")")
    p.add_argument("--max-retries", type=int, default=2, help="retries with fresh planner seeds (default: 2)")
    p.add_argument("--zarr-format", type=int, choices=(2, 3), default=2,
                   help="2 (default) is readable by diffusion_policy; 3 is zarr's current format")
    p.add_argument("--compressor", choices=("default", "disk", "none"), default="default",
                   help="Blosc lz4 (default, fast), Blosc zstd bit-shuffle (disk, small) or none")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store or interrupted collection")
    _add_env_options(p, "collect")
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
    p = dataset.add_parser("replay", help="replay stored demos open loop in their simulator: does the env reproduce them?")
    p.add_argument("path")
    p.add_argument("--env", help="suite of a store that does not record it (pusht for diffusion_policy's Push-T demos)")
    p.add_argument("--episodes", type=int, help="replay only the first N episodes (default: all)")
    p.add_argument("--tolerance", type=float, help="state gap counted as divergence (default: per suite)")
    p.add_argument("--json", action="store_true", help="print JSON (with per-episode rows) instead of a summary")
    p.set_defaults(func=_cmd_dataset_replay)

    convert = sub.add_parser("convert", help="convert other dataset formats to a zarr replay buffer").add_subparsers(
        dest="format", required=True, metavar="format")
    p = convert.add_parser("robomimic", help="robomimic hdf5 (low-dim and image keys, env_args kept) to zarr")
    p.add_argument("input", help="robomimic .hdf5 file")
    p.add_argument("output", help="zarr store to write (a directory)")
    p.add_argument("--obs-keys", type=_csv, default=None, help="observation keys to keep (default: all)")
    p.add_argument("--filter", default=None, help="convert only the demos in mask/<FILTER>, e.g. train")
    p.add_argument("--abs-actions", action="store_true",
                   help="store 10-D absolute OSC goals (position, rotation-6d, gripper) as action and the deltas as "
                        "action_delta (replays the stored states in a simulator built from env_args)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert_robomimic)

    p = sub.add_parser("eval", help="roll a saved policy out in its simulator: score, success, latency, report")
    p.add_argument("--checkpoint", required=True, help="a saved policy, e.g. runs/NAME/checkpoints/step_N/ema")
    p.add_argument("--env", default="pusht", help="registered environment (default: pusht; see `fm-policy envs`)")
    p.add_argument("--episodes", type=int, default=50, help="test episodes, env seeds from --seed-start (default 50)")
    p.add_argument("--num-steps", type=_ints, default=None,
                   help="sampler steps to compare, e.g. 1,2,4,8 (flow: ODE steps; ddpm: sampler steps; default: the "
                        "step count the policy was saved for, e.g. a fine-tuned 2-step model's 2)")
    p.add_argument("--solver", help="flow: euler|midpoint|rk4|dopri5; ddpm: ddpm|ddim (default: the saved one)")
    p.add_argument("--seed-start", type=int, default=100000)
    _add_env_options(p, "eval")
    p.add_argument("--workers", type=int, default=1, help="env worker processes (default 1: envs in this process)")
    p.add_argument("--env-kwarg", type=_env_kwarg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra env factory argument, value parsed as YAML (repeatable), e.g. abs_actions=true for a "
                        "robomimic policy trained on absolute actions, max_episode_steps=500")
    p.add_argument("--device", default="cpu")
    p.add_argument("--videos", type=int, default=0, help="mp4 videos of the first N episodes of each setting")
    p.add_argument("--out", help="report folder (default: <checkpoint>/eval)")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("disturbances", "robustness rollouts, drawn per episode from --disturbance-seed and the "
                             "env seed, so every --num-steps setting sees the same ones (docs/evaluation.md)")
    g.add_argument("--obs-noise", type=float, metavar="STD",
                   help="Gaussian noise std added to the float observation keys, in env units (Push-T: pixels)")
    g.add_argument("--obs-noise-keys", type=_csv, metavar="KEYS",
                   help="observation keys to perturb (default: every float key; name an image to perturb it)")
    g.add_argument("--obs-noise-scale", type=_noise_scale, action="append", metavar="KEY=S[,S...]",
                   help="per-key multiplier of --obs-noise, one number or one per dimension (repeatable), e.g. "
                        "state=1,1,1,1,0.01")
    g.add_argument("--shove-step", type=int, metavar="N", help="env step after which the shove is applied")
    g.add_argument("--shove-block", type=float, metavar="PX",
                   help="distance the block is displaced in a random direction (Push-T: pixels)")
    g.add_argument("--shove-agent", type=float, metavar="PX", help="distance the agent is displaced")
    g.add_argument("--shove-angle", type=float, metavar="RAD", help="block rotation about its centre, random sign")
    g.add_argument("--init-noise-scale", type=float, metavar="F",
                   help="multiply the policy's initial flow noise (policies with a noise_shape; default 1)")
    g.add_argument("--init-noise-offset", type=float, metavar="NORM",
                   help="add a per-episode random offset of this norm to the initial noise (default 0)")
    g.add_argument("--disturbance-seed", type=int, metavar="N", help="seed of the disturbance draws (default 0)")
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

    p = sub.add_parser("serve", help="serve a saved policy to robot controllers over websockets (msgpack, no pickle)")
    p.add_argument("--checkpoint", required=True, help="a saved policy, e.g. runs/NAME/checkpoints/step_N/ema")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--num-steps", type=int, help="default sampler steps per chunk (default: the saved policy's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--api-key-env", metavar="VAR",
                   help="require the API key stored in this environment variable (never pass keys on the command line)")
    p.add_argument("--max-message-bytes", type=int,
                   help="largest request frame (default: twice a full float64 request of this policy + 64 KiB)")
    p.add_argument("--max-clients", type=int, default=32, help="concurrent connections accepted (default 32)")
    p.add_argument("--protocol", choices=("auto", "fm", "openpi"), default="auto",
                   help="request dialects: fm ({'observation': ...}), openpi (flat map, openpi_client) or both (auto)")
    p.add_argument("--max-num-steps", type=int, default=128, help="most sampler steps a request may ask for (128)")
    p.add_argument("--max-nfe", type=int, default=128,
                   help="most network evaluations per request: steps x evaluations per step, rk4 = 4 (default 128)")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting for the model before `busy` (32)")
    p.add_argument("--request-timeout", type=float, default=5.0,
                   help="seconds until an unanswered request gets `deadline_exceeded` and is cancelled (5)")
    p.add_argument("--no-preempt", action="store_true",
                   help="run costly requests in line (default: on a policy copy, paused while cheaper requests wait)")
    p.add_argument("--action-range", choices=("clamp", "flag", "none"), default="clamp",
                   help="actions outside the training range: clamp them (default) or only count them in the reply")
    p.add_argument("--seed", type=int,
                   help="deterministic noise for requests without noise: per connection, torch generator seeded so")
    p.add_argument("--idle-timeout", type=float, default=120.0, help="close connections idle this long (s; 0: never)")
    p.add_argument("--max-queued-frames", type=int, default=2, help="frames buffered per connection (default 2)")
    p.add_argument("--auth-fail-limit", type=int, default=10,
                   help="failed handshakes per address per minute before HTTP 429 (default 10)")
    p.add_argument("--max-batch", type=int, default=1,
                   help="batch up to N requests that arrive together (throughput; default 1: bit-exact replies)")
    p.add_argument("--control-hz", type=float, default=10.0, help="control rate advertised to clients (default 10)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--log-level", choices=("debug", "info", "warning"), default="info",
                   help="debug logs every inference call with its latency; info a p50/p99 summary every 100 calls")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("export", help="export a saved policy to ONNX or TorchScript, verified against PyTorch")
    p.add_argument("--checkpoint", required=True, help="a saved policy directory")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", help="output folder (default: <checkpoint>/export_<format>)")
    p.add_argument("--fused-steps", type=_ints, default=(1, 2),
                   help="unrolled Euler graphs to add for flow policies (default 1,2)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check against PyTorch")
    p.set_defaults(func=_cmd_export)

    sub.add_parser("envs", help="list registered environments").set_defaults(func=_cmd_envs)
    sub.add_parser("train", help="train a policy: same arguments as train-policy (see train-policy --help)")
    sub.add_parser("finetune", help="fine-tune a flow policy: mle, residual, gft (gradual) or ft (plain) "
                                    "(see fm-policy finetune --help)")
    return parser


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """User errors (bad data, config, checkpoint or arguments; existing outputs) print one clear line; anything else
    is a bug and keeps its traceback."""
    try:
        return func(args)
    except (UserError, FileExistsError) as exc:
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
