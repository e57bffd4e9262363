"""Benchmark: why a policy falls short of its demonstrations -- the env, the data or the learner.

    python -m fm_policy.eval.benchmarks.bench_diagnosis \\
        --store human=data/pusht_cchi_v7_replay.zarr.zip@pusht --store scripted=data/pusht_expert.zarr \\
        --trained human=runs/human_kp_s0/eval/eval.json,runs/human_kp_s1/eval/eval.json,... \\
        --trained scripted=runs/scripted_kp_s0/eval/eval.json,... --reference human \\
        --json docs/results/diagnosis.json --md docs/results/diagnosis.md

Three measurements, each ruling a suspect in or out:

1. **Open-loop replay** (`fm_policy.eval.demo_replay`): each stored episode's actions fed to the env from the
   episode's own start. A store that replays exactly clears the env and the action path; the replayed outcome also
   says what the demos themselves achieve under the env's success rule.
2. **Demonstration statistics** (Push-T stores): how fast and how smoothly the demos move, how often they pause, how
   far the action target leads the agent, how long they take, and how *consistent* they are: the spread of the next
   action chunks of near-identical states in other episodes (k nearest neighbours). A policy can only be as
   decisive as its data: an expert that does different things from the same state makes a harder target.
3. **Trained policies** (`--trained`, one eval report per training seed, same recipe and test seeds): score and
   success per step count, as mean and std over seeds, and each dataset's difference from `--reference` with its
   standard error. The page's rule: a difference beyond 2 standard errors is a difference, else a tie.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from fm_policy.datasets.replay_buffer import ReplayBuffer
from fm_policy.envs.pusht_spec import store_goal_pose
from fm_policy.eval.benchmarks.bench_common import write_results
from fm_policy.eval.demo_replay import replay_store
from fm_policy.eval.metrics import seed_difference, seed_summary, seed_verdict

from fm_policy.versions import hardware_summary

PAUSE_SPEED = 1.0  # px per step below which the agent counts as paused (typical pushing speed is 5-15 px per step)
CHUNK = 8  # action-chunk length compared between neighbours: the policy's n_action_steps on Push-T
NEIGHBOURS = 5
QUERIES = 2000


def _episodes(ends: np.ndarray) -> np.ndarray:
    """Episode index of every row."""
    return np.repeat(np.arange(len(ends)), np.diff(np.concatenate([[0], ends])))


def pusht_demo_statistics(path: str, seed: int = 0) -> dict[str, Any]:
    """Motion and consistency statistics of a Push-T store (keys `state` [agent xy, block xy, angle], `action`)."""
    with ReplayBuffer.open(path) as buffer:
        buffer.require(["state", "action"])
        arrays = buffer.load(["state", "action", *(["n_contacts"] if "n_contacts" in buffer.keys else [])])
        ends = np.asarray(buffer.episode_ends)
        attrs = buffer.attrs
    state, action = arrays["state"].astype(np.float64), arrays["action"].astype(np.float64)
    episode = _episodes(ends)
    same = episode[1:] == episode[:-1]  # consecutive rows of one episode
    speed = np.linalg.norm(state[1:, :2] - state[:-1, :2], axis=1)[same]
    dact = np.linalg.norm(action[1:] - action[:-1], axis=1)[same]
    same2 = same[1:] & same[:-1]
    jerk = np.linalg.norm(action[2:] - 2 * action[1:-1] + action[:-2], axis=1)[same2]
    lead = np.linalg.norm(action - state[:, :2], axis=1)
    lengths = np.diff(np.concatenate([[0], ends]))
    goal = np.asarray(store_goal_pose(attrs))
    start = state[np.concatenate([[0], ends[:-1]])]
    start_angle = np.abs((start[:, 4] - goal[2] + np.pi) % (2 * np.pi) - np.pi)
    out = {
        "episodes": len(ends), "steps": len(state),
        "length_mean": float(lengths.mean()), "length_p10": float(np.quantile(lengths, 0.1)),
        "length_p90": float(np.quantile(lengths, 0.9)),
        "agent_speed_mean": float(speed.mean()), "pause_fraction": float((speed < PAUSE_SPEED).mean()),
        "action_step_mean": float(dact.mean()), "action_jerk_mean": float(jerk.mean()),
        "action_lead_mean": float(lead.mean()),
        # where the episodes start, relative to the goal: a store that starts closer is an easier curriculum
        "start_goal_distance_mean": float(np.linalg.norm(start[:, 2:4] - goal[:2], axis=1).mean()),
        "start_goal_angle_mean": float(start_angle.mean()),
    }
    if "n_contacts" in arrays:
        out["contact_fraction"] = float((arrays["n_contacts"].reshape(len(state), -1).sum(axis=1) > 0).mean())
    out.update(_neighbour_consistency(state, action, episode, ends, seed))
    return out


def _neighbour_consistency(state: np.ndarray, action: np.ndarray, episode: np.ndarray, ends: np.ndarray,
                           seed: int) -> dict[str, float]:
    """Spread of the next CHUNK actions (relative to the agent) among the k nearest states of other episodes.

    State features in pixels: agent xy, block xy, and the block angle as a point 100 px out (cos, sin), so one pixel
    of position and one pixel of T-arm movement weigh the same. The disagreement is normalised by the distance between
    chunks of random pairs of rows, so stores of different speeds compare."""
    feats = np.concatenate([state[:, :4], 100 * np.cos(state[:, 4:5]), 100 * np.sin(state[:, 4:5])], axis=1)
    last = ends[episode] - 1  # chunk rows past an episode's end repeat its last action (the sampler's padding)
    idx = np.minimum(np.arange(len(state))[:, None] + np.arange(CHUNK)[None], last[:, None])
    chunks = (action[idx] - state[:, None, :2]).reshape(len(state), -1)
    rng = np.random.default_rng(seed)
    queries = rng.choice(len(state), size=min(QUERIES, len(state)), replace=False)
    obs_dist, disagreement = [], []
    sq = (feats**2).sum(axis=1)
    for block in np.array_split(queries, max(1, len(queries) // 200)):
        # |q - x|^2 by the expansion: one matrix product instead of a (queries, rows, features) temporary
        d = np.sqrt(np.maximum(sq[block, None] + sq[None] - 2 * feats[block] @ feats.T, 0.0))
        d[episode[block][:, None] == episode[None]] = np.inf  # neighbours come from other episodes
        nn = np.argpartition(d, NEIGHBOURS, axis=1)[:, :NEIGHBOURS]
        obs_dist.append(np.take_along_axis(d, nn, axis=1).mean(axis=1))
        diff = chunks[nn] - chunks[block, None]
        disagreement.append(np.linalg.norm(diff.reshape(*diff.shape[:2], CHUNK, 2), axis=3).mean(axis=(1, 2)))
    pairs = rng.choice(len(state), size=(QUERIES, 2))
    random_pair = np.linalg.norm((chunks[pairs[:, 0]] - chunks[pairs[:, 1]]).reshape(-1, CHUNK, 2), axis=2).mean()
    dis = float(np.concatenate(disagreement).mean())
    return {"nn_state_distance": float(np.concatenate(obs_dist).mean()), "nn_chunk_disagreement": dis,
            "random_chunk_distance": float(random_pair), "nn_disagreement_ratio": dis / float(random_pair)}


def trained_rows(reports: dict[str, list[str]], reference: str | None) -> list[dict[str, Any]]:
    """Per dataset and step count: score and success over training seeds, and the difference from `reference`."""
    per: dict[str, dict[int, dict[str, dict]]] = {}
    for name, paths in reports.items():
        by_steps: dict[int, dict[str, list[float]]] = {}
        for path in paths:
            with open(path) as f:
                report = json.load(f)
            for s in report["settings"]:
                if s.get("disturbance"):
                    continue
                row = by_steps.setdefault(int(s["num_steps"]), {"score": [], "success": [], "episodes": []})
                row["score"].append(float(s["score"]["value"]))
                row["success"].append(float(s["success"]["value"]))
                row["episodes"].append(int(s["n_episodes"]))
        per[name] = {k: {"score": seed_summary(v["score"]), "success": seed_summary(v["success"]),
                         "episodes_per_seed": sorted(set(v["episodes"]))} for k, v in by_steps.items()}
    rows = []
    for name, by_steps in per.items():
        for steps, stats in sorted(by_steps.items()):
            row: dict[str, Any] = {"data": name, "num_steps": steps, **stats, "reports": reports[name]}
            ref = per.get(reference or "", {}).get(steps)
            if reference and name != reference and ref:
                for key in ("score", "success"):
                    row[f"{key}_vs_reference"] = {**seed_difference(stats[key], ref[key]),
                                                  "verdict": seed_verdict(stats[key], ref[key])}
            rows.append(row)
    return rows


def _store_arg(text: str) -> tuple[str, str, str | None]:
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH[@ENV], got '{text}'")
    path, _, env = rest.partition("@")
    return name, path, env or None


def _reports_arg(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=REPORT[,REPORT...], got '{text}'")
    return name, [p for p in rest.split(",") if p]


def run(stores: Sequence[tuple[str, str, str | None]], trained: dict[str, list[str]], reference: str | None,
        replay_episodes: int | None = None, notes: Sequence[str] = (), command: str = "") -> dict[str, Any]:
    replays, stats = {}, {}
    for name, path, env in stores:
        t0 = time.perf_counter()
        summary = replay_store(path, env=env, episodes=replay_episodes).as_dict()
        seconds = time.perf_counter() - t0
        steps = sum(e["steps"] for e in summary["per_episode"])
        replays[name] = {**{k: v for k, v in summary.items() if k != "per_episode"},
                         "gap_max": max((e["gap_max"] for e in summary["per_episode"]), default=0.0),
                         "env_steps_per_s": steps / seconds if seconds else None,
                         "scores": [e["score"] for e in summary["per_episode"]]}
        if summary["env"] == "pusht":
            stats[name] = pusht_demo_statistics(path)
    return {"command": command, "hardware": hardware_summary(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "stores": {name: {"path": path, "env": env} for name, path, env in stores},
            "replay": replays, "pusht_statistics": stats, "trained": trained_rows(trained, reference),
            "reference": reference, "notes": list(notes)}


# ---------------------------------------------------------------------------------------------------------------- report
_STAT_ROWS = (  # key, label, digits
    ("episodes", "episodes", 0), ("steps", "steps", 0), ("length_mean", "episode length, mean (steps)", 1),
    ("length_p10", "episode length, 10th / 90th percentile", 0), ("agent_speed_mean", "agent speed (px / step)", 2),
    ("pause_fraction", f"paused steps (agent speed < {PAUSE_SPEED:g} px / step)", 3),
    ("action_step_mean", "action change per step (px)", 2), ("action_jerk_mean", "action jerk |a[t+1] - 2a[t] + a[t-1]| (px)", 2),
    ("action_lead_mean", "action target ahead of the agent (px)", 1),
    ("start_goal_distance_mean", "start: block distance from the goal (px)", 1),
    ("start_goal_angle_mean", "start: block angle off the goal (rad)", 2), ("contact_fraction", "steps in contact with the block", 3),
    ("nn_state_distance", f"distance to the {NEIGHBOURS} nearest states of other episodes (px)", 1),
    ("nn_chunk_disagreement", f"their next-{CHUNK}-action disagreement (px)", 1),
    ("random_chunk_distance", "chunk distance of random pairs (px)", 1),
    ("nn_disagreement_ratio", "disagreement / random-pair distance", 3),
)


def _pm(stat: dict[str, float], digits: int) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}" if stat["n"] > 1 else f"{stat['mean']:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Diagnosis: env, data or learner", "",
             ("Produced by `eval/benchmarks/bench_diagnosis.py`; every number below is in `diagnosis.json` beside "
             "this page. Rule: a difference of means beyond 2 standard errors over training seeds is a difference, "
             "otherwise a tie."), "", f"Hardware: {result['hardware']}. Date: {result['date']}.", ""]
    if result["replay"]:
        lines += ["## 1. Open-loop replay of the stored demonstrations", "",
                  ("Each episode's stored actions, fed to the env from the episode's own start (`fm-policy dataset "
                  "replay`). Gap: stored vs replayed state after each action."), "",
                  ("| store | env | episodes | replay success | replay score (mean) | diverged | final gap median / p90 "
                  "| largest gap | gap units | env steps/s |"), "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in result["replay"].items():
            lines.append(f"| {name} (`{result['stores'][name]['path']}`) | {r['env']} | {r['episodes']} | "
                         f"{r['success_rate']:.2f} | {r['mean_score']:.3f} | {r['diverged_fraction']:.0%} "
                         f"(tol {r['tolerance']:g}) | {r['gap_final_median']:.2g} / {r['gap_final_p90']:.2g} | "
                         f"{r['gap_max']:.2g} | {r['units']} | {r['env_steps_per_s']:.0f} |")
        lines.append("")
    stats = result["pusht_statistics"]
    if stats:
        names = list(stats)
        lines += ["## 2. Push-T demonstrations: how they move", "", "| statistic | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for key, label, digits in _STAT_ROWS:
            if key == "length_p10":
                cells = [f"{stats[n]['length_p10']:.0f} / {stats[n]['length_p90']:.0f}" for n in names]
            elif all(key in stats[n] for n in names):
                cells = [f"{stats[n][key]:.{digits}f}" for n in names]
            else:
                continue
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if result["trained"]:
        ref = result["reference"]
        lines += ["## 3. Policies trained on each store", "",
                  "Same recipe, same test seeds; mean ± std over training seeds of each seed's score and success"
                  + (f"; difference from **{ref}** ± its standard error, and the verdict." if ref else "."), "",
                  "| data | steps | seeds | episodes / seed | score | success | score vs ref | success vs ref |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in result["trained"]:
            cells = []
            for key in ("score", "success"):
                d = row.get(f"{key}_vs_reference")
                cells.append(f"{d['diff']:+.3f} ± {d['se']:.3f} ({d['verdict']})" if d else "-")
            lines.append(f"| {row['data']} | {row['num_steps']} | {row['score']['n']} | "
                         f"{'/'.join(map(str, row['episodes_per_seed']))} | {_pm(row['score'], 3)} | "
                         f"{_pm(row['success'], 2)} | {cells[0]} | {cells[1]} |")
        lines.append("")
    if result["notes"]:
        lines += ["## Notes", "", *[f"- {n}" for n in result["notes"]], ""]
    lines += ["## Command", "", "```", result["command"], "```"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=_store_arg, action="append", default=[],
                   help="NAME=PATH[@ENV]: a store to replay (and, for Push-T, to describe); ENV if it does not record one")
    p.add_argument("--trained", type=_reports_arg, action="append", default=[],
                   help="NAME=REPORT[,REPORT...]: eval reports of policies trained on NAME, one per training seed")
    p.add_argument("--reference", help="the --trained NAME the others are compared with")
    p.add_argument("--replay-episodes", type=int, help="replay only the first N episodes of each store")
    p.add_argument("--note", action="append", default=[], help="a line for the page's notes")
    p.add_argument("--json", help="output JSON")
    p.add_argument("--md", help="output Markdown")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    trained = dict(args.trained)
    if args.reference and args.reference not in trained:
        raise SystemExit(f"--reference {args.reference}: not one of the --trained names {sorted(trained)}")
    command = "python -m fm_policy.eval.benchmarks.bench_diagnosis " + shlex.join(
        list(argv) if argv is not None else sys.argv[1:])
    result = run(args.store, trained, args.reference, args.replay_episodes, args.note, command)
    write_results(result, args.json, args.md, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
