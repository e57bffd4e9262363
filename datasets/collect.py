"""Collect expert demonstrations into a zarr replay buffer, across worker processes, reproducibly and safely.

Reproducible: candidate episode i uses env seed `seed + i` and a planner seed derived from (seed, i); a failed
attempt is retried with planner seeds derived from that one. Each candidate is a pure function of (seed, i), and
results are written in candidate order, so the store is bitwise the same for any number of workers, and after a
resume. Candidates whose every attempt fails are skipped (success filter) and listed in the store's attributes.
Evaluation seeds start at 100000 (diffusion_policy's convention), so demos from seeds below that never overlap them.

Safe on interruption: the store is built at `<out>.partial` and renamed to `<out>` only when complete, so a store at
`<out>` is always whole. Each episode is committed by its `meta/episode_ends` entry; rerunning the same command
resumes from the last committed episode.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from fm_policy.datasets.recorders import Episode, EpisodeRecorder, make_recorder
from fm_policy.datasets.replay_buffer import ReplayBuffer
from fm_policy.datasets.seeds import planner_seed_for
from fm_policy.envs.registry import expert_collection
from tqdm.auto import tqdm

import fm_policy
from fm_policy.errors import UserError

PARTIAL_SUFFIX = ".partial"
ATTRS_KEY = "fm_policy_collect"


@dataclass
class CollectConfig:
    env: str = "pusht"
    episodes: int = 200
    out: str = "data/pusht_expert.zarr"
    workers: int = 1
    obs: tuple[str, ...] = ("state", "keypoints")
    seed: int = 0
    max_steps: int = 300
    max_retries: int = 2  # extra attempts with fresh planner seeds before a candidate is skipped
    zarr_format: int = 2
    compressor: str = "default"
    overwrite: bool = False
    env_kwargs: dict[str, Any] = field(default_factory=dict)

    def generation_settings(self) -> dict[str, Any]:
        """What determines the data: a partial store is resumed only if these match."""
        keep = ("env", "obs", "seed", "max_steps", "max_retries", "zarr_format", "env_kwargs")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in keep}


def env_collect_defaults(env: str) -> dict[str, Any]:
    """`obs` and `max_steps` from the env's spec (`EnvSpec.collection`), for the CLI when they are not given
    (CollectConfig's own defaults are Push-T's). An env without an expert is an error listing those with one."""
    collection = expert_collection(env)
    return {"obs": tuple(collection.obs), "max_steps": collection.max_steps}


# ---------------------------------------------------------------- worker side
_RECORDER: EpisodeRecorder | None = None


def _init_worker(env: str, recorder_kwargs: dict[str, Any]) -> None:
    """Build the env and expert once per worker process (never in the parent; see recorders.py)."""
    global _RECORDER
    try:
        import torch

        torch.set_num_threads(1)  # workers are single-threaded: oversubscribing 2 cores is 10x slower
    except ImportError:
        pass
    _RECORDER = make_recorder(env, **recorder_kwargs)


def _run_candidate(index: int, seed: int, max_retries: int) -> tuple[int, Episode | None, int, float]:
    """Record candidate `index`; returns (index, episode or None if every attempt failed, attempts, seconds)."""
    assert _RECORDER is not None, "worker not initialised"
    start = time.perf_counter()
    for attempt in range(max_retries + 1):
        episode = _RECORDER.record(env_seed=seed + index, planner_seed=planner_seed_for(seed, index, attempt))
        if episode.success:
            return index, episode, attempt + 1, time.perf_counter() - start
    return index, None, max_retries + 1, time.perf_counter() - start


# ---------------------------------------------------------------- parent side
def _open_output(config: CollectConfig, recorder_attrs: dict[str, Any]) -> tuple[ReplayBuffer, int, list[int]]:
    """Create `<out>.partial`, or resume it if it was made with the same settings. Returns (buffer, next index,
    skipped env seeds so far)."""
    out, partial = config.out, config.out + PARTIAL_SUFFIX
    if os.path.exists(out):
        if not config.overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if os.path.exists(partial) and not config.overwrite:
        buffer = ReplayBuffer.resume(partial)
        stored = buffer.attrs.get(ATTRS_KEY, {})
        if stored.get("generation") != config.generation_settings():
            raise UserError(
                f"{partial} is an interrupted collection with other settings ({stored.get('generation')}); "
                "delete it or pass --overwrite"
            )
        next_index = int(buffer.meta["candidate_index"][-1]) + 1 if buffer.n_episodes else 0
        return buffer, next_index, list(stored.get("skipped_env_seeds", []))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    attrs = {
        ATTRS_KEY: {
            "complete": False,
            "generation": config.generation_settings(),
            "fm_policy_version": fm_policy.__version__,
            "skipped_env_seeds": [],
        },
        "source": recorder_attrs,
    }
    return ReplayBuffer.create(partial, zarr_format=config.zarr_format, attrs=attrs, overwrite=True), 0, []


def collect(config: CollectConfig, progress: bool = True) -> dict[str, Any]:
    """Collect `config.episodes` successful expert episodes into `config.out`; returns a summary."""
    if config.episodes < 1:
        raise UserError(f"episodes must be >= 1, got {config.episodes}")
    if config.workers < 1:
        raise UserError(f"workers must be >= 1, got {config.workers}")
    recorder_kwargs = {"obs_modes": tuple(config.obs), "max_steps": config.max_steps, **config.env_kwargs}
    # the parent needs the recorder's description only; building it is cheap for Push-T and validates the settings
    # before any worker starts. Envs that own GL contexts will describe themselves without an env here.
    _init_worker(config.env, recorder_kwargs)
    assert _RECORDER is not None
    buffer, next_index, skipped = _open_output(config, _RECORDER.dataset_attrs())
    found, start_time, attempts_total = buffer.n_episodes, time.perf_counter(), 0
    bar = tqdm(total=config.episodes, initial=found, desc=f"collect {config.env}", unit="ep", disable=not progress)

    def write(result: tuple[int, Episode | None, int, float]) -> None:
        nonlocal found, attempts_total
        index, episode, attempts, _ = result
        attempts_total += attempts
        if episode is None:
            skipped.append(config.seed + index)
            meta = dict(buffer.attrs[ATTRS_KEY], skipped_env_seeds=skipped)
            buffer.update_attrs(**{ATTRS_KEY: meta})
        else:
            buffer.add_episode(
                episode.data,
                episode_meta={
                    "candidate_index": index,
                    "env_seed": config.seed + index,
                    "planner_seed": planner_seed_for(config.seed, index, attempts - 1),
                    "attempts": attempts,
                },
                compressor=config.compressor,  # type: ignore[arg-type]
            )
            found += 1
            bar.update(1)
        bar.set_postfix(ok=found, skipped=len(skipped))

    try:
        if config.workers == 1:
            index = next_index
            while found < config.episodes:
                write(_run_candidate(index, config.seed, config.max_retries))
                index += 1
        else:
            _collect_parallel(config, recorder_kwargs, next_index, lambda: found, write)
    except KeyboardInterrupt:
        bar.close()
        raise KeyboardInterrupt(
            f"interrupted: {found} episodes are committed in {buffer.path}; rerun the same command to resume"
        ) from None
    bar.close()

    meta = dict(buffer.attrs[ATTRS_KEY], complete=True, skipped_env_seeds=skipped)
    buffer.update_attrs(**{ATTRS_KEY: meta})
    if os.path.exists(config.out):  # only reachable with --overwrite
        shutil.rmtree(config.out)
    os.replace(buffer.path, config.out)
    lengths = np.diff(ReplayBuffer.open(config.out, check_finite=False).episode_ends, prepend=0)
    return {
        "out": config.out,
        "episodes": int(found),
        "steps": int(lengths.sum()),
        "mean_episode_length": float(lengths.mean()),
        "skipped_env_seeds": skipped,
        "seconds": time.perf_counter() - start_time,
    }


def _collect_parallel(config, recorder_kwargs, next_index, found, write) -> None:
    """Keep 2 candidates per worker in flight; write results strictly in candidate order."""
    context = multiprocessing.get_context("spawn")  # no inherited GL contexts or torch thread pools
    with cf.ProcessPoolExecutor(
        config.workers, mp_context=context, initializer=_init_worker, initargs=(config.env, recorder_kwargs)
    ) as pool:
        pending: dict[int, cf.Future] = {}
        submit_index = write_index = next_index
        try:
            while found() < config.episodes:
                # candidates beyond what is still needed may be wasted; bounded by the in-flight window
                while len(pending) < 2 * config.workers:
                    pending[submit_index] = pool.submit(_run_candidate, submit_index, config.seed, config.max_retries)
                    submit_index += 1
                write(pending.pop(write_index).result())
                write_index += 1
        finally:
            for future in pending.values():
                future.cancel()
