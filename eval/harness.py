"""Rollout harness: evaluate a chunk policy on vectorised envs, every requested seed exactly once.

    report = evaluate(policy, "pusht", {"obs_mode": "keypoints"}, n_episodes=50, num_steps=(1, 2, 4, 8, None))
    write_report(report, "runs/eval")          # fm_policy.eval.report: JSON, Markdown table, PNG

What it guarantees (the diffusion_policy runners' pitfalls; docs/evaluation.md, "What the harness guarantees"):
- Episode i uses env seed `seed_start + i` (default 100000, like diffusion_policy's test inits); each of the
  `n_episodes` seeds is run exactly once and all of them count (no "22 of 50" bug), however `n_envs` compares.
- Envs run with gymnasium's autoreset DISABLED: when an env finishes, the harness reads its episode record and resets
  just that env (`reset_mask`) with the next unassigned seed, or parks it (it then ignores actions and reports
  nothing) when no seed is left. No unrequested episode ever reaches the metrics.
- Every `num_steps` setting runs the SAME seeds (paired comparison) and starts from `torch.manual_seed(torch_seed)`.
  If the policy has a `noise_shape` attribute (per-sample shape of its initial noise), the harness draws the noise
  itself from one generator per episode (seeded by torch_seed and the env seed) and passes it as `noise=`: each
  episode then gets the same noise stream under every setting and for any `n_envs`/`workers`.
  Without it, the policy draws from torch's global RNG, which is reproducible for a fixed (n_envs, workers) only.
- `workers == 1`: `SyncVectorEnv` in this process. `workers > 1`: `AsyncVectorEnv(context="spawn")` with one env per
  process (so `n_envs == workers`); the envs are built inside the workers and gymnasium's parent-side "dummy env" is
  replaced by a spaces-only stand-in (the spaces come from a short-lived spawned probe), so this process never
  creates a simulator or GL context. Scripts that use workers > 1 need the `if __name__ == "__main__":` guard.
- `disturbance=Disturbance(...)` (`fm_policy.eval.disturbances`) adds observation noise, a shove at a given env step
  and/or a scaled / offset initial noise, each drawn per episode from the disturbance seed and the env seed (paired
  like the initial noise); the report records it in `env_info["disturbance"]` and each episode's shove.
- Videos (first `n_videos` seeds of each setting) are rendered and encoded inside the process that owns the env.
- Push-T itself is reproducible per seed only to the last bit: pymunk's contact solving can depend on the process's
  history, so replaying a seed after other episodes may change rewards by ~1e-16 (compare results with a tolerance).
- Per-chunk inference is timed with `time.perf_counter` around `predict_action_chunk` (CUDA synchronised), after one
  untimed warm-up call.

Policy protocol: `ChunkPolicy` below. Observations go in as {key: (B, n_obs_steps, *shape)} tensors (float32, uint8
images keep their dtype), B = number of envs still running an episode; actions come back as
(B, n_action_steps, action_dim) in env units. `policy.reset()` is called at the start of each setting; a policy that
keeps per-env state between calls is not supported (episodes start at different times in one batch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np
from fm_policy.datasets.seeds import episode_noise_seed
from fm_policy.envs.registry import env_metrics, env_spec

from fm_policy.errors import UserError
from fm_policy.versions import hardware_description, package_versions

from .disturbances import Disturbance, DisturbedEnv, check_shoves_applied, init_noise_offset
from .metrics import Estimate, mean_ci, rate_ci

if TYPE_CHECKING:  # torch is imported lazily: spawned env workers must not pay for it
    import torch

__all__ = ["ChunkPolicy", "EpisodeResult", "EvalReport", "SettingResult", "TimingStats", "evaluate", "setting_label"]


@runtime_checkable
class ChunkPolicy(Protocol):
    """What `evaluate` needs from a policy (the flow policy, baselines and test stubs all follow it)."""

    n_obs_steps: int
    """Observation history the policy needs (the env wrapper stacks this many frames)."""
    n_action_steps: int
    """Actions executed per chunk."""

    def reset(self) -> None: ...

    def predict_action_chunk(
        self, obs: dict[str, torch.Tensor], num_steps: int | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """obs: {key: (B, n_obs_steps, *shape)} -> actions (B, n_action_steps, action_dim) in env units."""
        ...


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class EpisodeResult:
    """One rollout. `max_reward` is Push-T's per-episode score; `total_reward` counts Kitchen tasks."""

    num_steps: int | None
    seed: int
    max_reward: float
    total_reward: float
    success: bool
    final_coverage: float | None
    steps: int
    n_chunks: int
    terminated: bool
    truncated: bool
    wall_s: float
    video: str | None = None
    shove: dict[str, Any] | None = None
    """The episode's shove when the evaluation had one: step, applied, the drawn offsets and rotation."""


@dataclass
class TimingStats:
    """`predict_action_chunk` wall time: per call (whole batch) and per env (call time / batch size), in ms."""

    n_calls: int
    mean_ms: float
    p50_ms: float
    p99_ms: float
    per_env_mean_ms: float
    per_env_p50_ms: float
    per_env_p99_ms: float
    mean_batch: float
    total_s: float

    @classmethod
    def from_calls(cls, call_s: Sequence[float], batch: Sequence[int]) -> TimingStats:
        if not call_s:
            nan = math.nan
            return cls(0, nan, nan, nan, nan, nan, nan, nan, 0.0)
        ms = np.asarray(call_s, dtype=np.float64) * 1e3
        per_env = ms / np.asarray(batch, dtype=np.float64)
        return cls(
            n_calls=len(ms), mean_ms=float(ms.mean()), p50_ms=float(np.percentile(ms, 50)),
            p99_ms=float(np.percentile(ms, 99)), per_env_mean_ms=float(per_env.mean()),
            per_env_p50_ms=float(np.percentile(per_env, 50)), per_env_p99_ms=float(np.percentile(per_env, 99)),
            mean_batch=float(np.mean(batch)), total_s=float(ms.sum() / 1e3),
        )


@dataclass
class SettingResult:
    """All episodes of one `num_steps` setting, with the aggregate metrics.

    `score` = mean over episodes of the max reward (Push-T: coverage score) with a bootstrap 95% interval;
    `success` = success rate with a Wilson 95% interval.
    """

    num_steps: int | None
    label: str
    n_episodes: int
    score: Estimate
    success: Estimate
    mean_final_coverage: float | None
    mean_steps: float
    env_steps: int
    wall_s: float
    env_steps_per_s: float
    policy_s: float
    env_s: float
    timing: TimingStats
    episodes: list[EpisodeResult]
    metrics: dict[str, Estimate] = dataclasses.field(default_factory=dict)
    """Env-specific metrics from the registry's hook (Kitchen: p1..pK, mean_tasks, mean_score); empty for Push-T."""


@dataclass
class EvalReport:
    """Per-setting metrics, per-episode rows, timing and the environment the numbers came from."""

    settings: list[SettingResult]
    env_info: dict[str, Any]

    @property
    def episodes(self) -> list[EpisodeResult]:
        return [ep for s in self.settings for ep in s.episodes]

    def setting(self, num_steps: int | None) -> SettingResult:
        for s in self.settings:
            if s.num_steps == num_steps:
                return s
        raise KeyError(f"no setting with num_steps={num_steps!r}; have {[s.num_steps for s in self.settings]}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike | None = None, indent: int | None = 2) -> str:
        """The report as JSON (NaN written as null); also written to `path` if given."""
        text = json.dumps(_json_safe(self.to_dict()), indent=indent, default=str)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        def est(d: dict[str, Any]) -> Estimate:
            return Estimate(**{k: (math.nan if v is None and k in ("value", "lo", "hi") else v) for k, v in d.items()})

        def nan(v: Any) -> Any:
            return math.nan if v is None else v

        settings = []
        for s in data["settings"]:
            s = dict(s)
            s["score"], s["success"] = est(s["score"]), est(s["success"])
            s["timing"] = TimingStats(**{k: nan(v) for k, v in s["timing"].items()})
            s["metrics"] = {k: est(v) for k, v in (s.get("metrics") or {}).items()}
            s["episodes"] = [EpisodeResult(**ep) for ep in s["episodes"]]
            settings.append(SettingResult(**s))
        return cls(settings=settings, env_info=dict(data["env_info"]))

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> EvalReport:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text_or_path) as f:
                text = f.read()
        return cls.from_dict(json.loads(text))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    return obj


def setting_label(num_steps: int | None) -> str:
    """`steps-8`, or `steps-default` for the policy's own default (num_steps=None)."""
    return "steps-default" if num_steps is None else f"steps-{num_steps}"


# ---------------------------------------------------------------------------------------------------------------
# Env side (runs inside the vector env's processes; must stay picklable and torch-free)
# ---------------------------------------------------------------------------------------------------------------


class _EpisodeRecorder(gym.Wrapper):
    """Below MultiStepWrapper: sees every single env step; keeps the episode record and writes the video."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.video_path: str | None = None
        self._writer: Any = None
        self._reset_stats(None)

    def _reset_stats(self, info: dict[str, Any] | None) -> None:
        self.max_reward = -math.inf
        self.total_reward = 0.0
        self.success = False
        cov = None if info is None else info.get("coverage")
        self.final_coverage = None if cov is None else float(cov)
        self.steps = 0

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self._close_writer()
        obs, info = self.env.reset(**kwargs)
        self._reset_stats(info)
        if self.video_path is not None:
            import imageio.v2 as imageio

            fps = self.env.metadata.get("render_fps", 10)
            self._writer = imageio.get_writer(self.video_path, fps=fps, codec="libx264", macro_block_size=8)
            self._writer.append_data(self.env.render())
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        self.max_reward = max(self.max_reward, float(reward))
        self.total_reward += float(reward)
        self.success = self.success or bool(info.get("is_success", False))
        if info.get("coverage") is not None:
            self.final_coverage = float(info["coverage"])
        if self._writer is not None:
            self._writer.append_data(self.env.render())
        return obs, reward, terminated, truncated, info

    def finish(self) -> dict[str, Any]:
        """Close the video and return the episode record."""
        self._close_writer()
        return {
            "max_reward": self.max_reward if self.steps else math.nan,
            "total_reward": self.total_reward,
            "success": self.success,
            "final_coverage": self.final_coverage,
            "steps": self.steps,
            "video": self.video_path,
        }

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        self._close_writer()
        super().close()


class _HarnessEnv(gym.Wrapper):
    """Above MultiStepWrapper: follows the parent's per-env plan and parks envs that have no seed left.

    Before a reset the parent sets `harness_plan` (via `set_attr`): `{"seed": int, "video": path | None}` starts that
    episode, `None` parks the env: it keeps returning its last observation with reward 0 and never reports done, so
    gymnasium's DISABLED autoreset never sees a finished env being stepped and nothing of it is counted.
    """

    def __init__(self, env: gym.Env, recorder: _EpisodeRecorder, disturbed: DisturbedEnv | None = None):
        super().__init__(env)
        self.recorder = recorder
        self.disturbed = disturbed
        self.harness_plan: dict[str, Any] | None = None
        self.episode_stats: dict[str, Any] | None = None
        self._seed: int | None = None
        self._parked = True
        self._last_obs: Any = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        plan = self.harness_plan
        self.episode_stats = None
        if plan is None:
            if self._last_obs is None:
                raise RuntimeError("harness env parked before it ran any episode")
            self._parked = True
            return self._last_obs, {}
        self._parked = False
        self._seed = int(plan["seed"])
        self.recorder.video_path = plan.get("video")
        obs, info = self.env.reset(seed=self._seed, options=options or None)
        self._last_obs = obs
        return obs, _scalars(info)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        if self._parked:
            return self._last_obs, 0.0, False, False, {}
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._last_obs = obs
        if terminated or truncated:
            self._parked = True  # until the parent's next plan + reset
            self.episode_stats = {
                **self.recorder.finish(), "seed": self._seed, "terminated": bool(terminated),
                "truncated": bool(truncated),
                "shove": None if self.disturbed is None else self.disturbed.shove_record,
            }
        return obs, reward, terminated, truncated, _scalars(info)


def _scalars(info: dict[str, Any]) -> dict[str, Any]:
    """Only scalar entries cross the process boundary (no per-step lists or pose arrays)."""
    return {k: v for k, v in info.items() if isinstance(v, (bool, int, float, np.bool_, np.integer, np.floating))}


class _SpacesOnlyEnv(gym.Env):
    """Stand-in for gymnasium's parent-side dummy env: spaces and metadata, no simulator."""

    def __init__(self, spaces: dict[str, Any]):
        self.observation_space = spaces["observation_space"]
        self.action_space = spaces["action_space"]
        self.metadata = spaces["metadata"]
        self.render_mode = spaces["render_mode"]

    def reset(self, **kwargs: Any):  # pragma: no cover - never stepped
        raise RuntimeError("spaces-only env")

    def step(self, action: Any):  # pragma: no cover - never stepped
        raise RuntimeError("spaces-only env")


@dataclass
class _EnvFactory:
    """Picklable env constructor: registry env -> recorder -> MultiStepWrapper -> harness plan wrapper."""

    env: str
    env_kwargs: dict[str, Any]
    n_obs_steps: int
    n_action_steps: int
    max_episode_steps: int | None
    disturbance: Disturbance | None = None
    """Observation noise / shove, applied in the env's process (None: none, the wrapper is not even built)."""
    parent_pid: int | None = None
    parent_spaces: dict[str, Any] | None = None

    def __call__(self) -> gym.Env:
        if self.parent_spaces is not None and os.getpid() == self.parent_pid:
            return _SpacesOnlyEnv(self.parent_spaces)
        if "torch" in sys.modules:  # a worker that imported torch anyway must not oversubscribe the cores
            sys.modules["torch"].set_num_threads(1)
        from fm_policy.envs import MultiStepWrapper, make_env

        recorder = _EpisodeRecorder(make_env(self.env, **self.env_kwargs))
        disturbed = DisturbedEnv(recorder, self.disturbance, self.env) if self.disturbance is not None else None
        wrapped = MultiStepWrapper(
            disturbed if disturbed is not None else recorder, n_obs_steps=self.n_obs_steps,
            n_action_steps=self.n_action_steps, max_episode_steps=self.max_episode_steps,
        )
        return _HarnessEnv(wrapped, recorder, disturbed)


def _probe_spaces(factory: _EnvFactory) -> dict[str, Any]:
    env = factory()
    try:
        return {
            "observation_space": env.observation_space, "action_space": env.action_space,
            "metadata": dict(env.metadata), "render_mode": env.render_mode,
        }
    finally:
        env.close()


_SPACES_CACHE: dict[str, dict[str, Any]] = {}


def _spaces_via_spawn(factory: _EnvFactory) -> dict[str, Any]:
    """Build one env in a spawned process to learn the spaces (cached per factory for repeated evaluations)."""
    key = repr(factory)
    if key not in _SPACES_CACHE:
        # ProcessPoolExecutor, not Pool: a worker that dies at import raises BrokenProcessPool instead of hanging
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            _SPACES_CACHE[key] = pool.submit(_probe_spaces, factory).result()
    return _SPACES_CACHE[key]


def _make_vector_env(factory: _EnvFactory, n_envs: int, workers: int) -> gym.vector.VectorEnv:
    from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

    if workers == 1:
        return SyncVectorEnv([factory] * n_envs, autoreset_mode=AutoresetMode.DISABLED)
    parent_factory = dataclasses.replace(factory, parent_pid=os.getpid(), parent_spaces=_spaces_via_spawn(factory))
    return AsyncVectorEnv(
        [parent_factory] * n_envs, context="spawn", autoreset_mode=AutoresetMode.DISABLED, shared_memory=True
    )


# ---------------------------------------------------------------------------------------------------------------
# Evaluation loop
# ---------------------------------------------------------------------------------------------------------------


def _check_policy(policy: Any) -> tuple[int, int]:
    if not isinstance(policy, ChunkPolicy):
        members = ("n_obs_steps", "n_action_steps", "reset", "predict_action_chunk")
        missing = [m for m in members if not hasattr(policy, m)]
        raise TypeError(f"policy does not follow ChunkPolicy; missing {missing}")
    values = []
    for name in ("n_obs_steps", "n_action_steps"):
        value = getattr(policy, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UserError(f"policy.{name} must be a positive int, got {value!r}")
        values.append(int(value))
    return values[0], values[1]


def _versions(env: str) -> dict[str, str | None]:
    """The core packages' versions and those the env's spec names as defining its simulator (`EnvSpec.packages`)."""
    core = ("fm-policy", "numpy", "torch", "gymnasium", "imageio-ffmpeg")
    packages = tuple(dict.fromkeys((*core, *env_spec(env).packages)))
    return {"python": platform.python_version(), **package_versions(packages, missing=None)}


def _to_torch_obs(obs: dict[str, np.ndarray], rows: np.ndarray, device: Any) -> dict[str, torch.Tensor]:
    import torch

    out = {}
    for key, value in obs.items():
        arr = np.ascontiguousarray(value[rows])
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float32, copy=False)
        out[key] = torch.from_numpy(arr).to(device)
    return out


def evaluate(
    policy: ChunkPolicy,
    env: str = "pusht",
    env_kwargs: dict[str, Any] | None = None,
    n_episodes: int = 50,
    num_steps: Sequence[int | None] = (None,),
    seed_start: int = 100000,
    n_envs: int | None = None,
    workers: int = 1,
    max_episode_steps: int | None = None,
    video_dir: str | os.PathLike | None = None,
    n_videos: int = 0,
    device: Any = "cpu",
    torch_seed: int = 0,
    progress: bool = True,
    disturbance: Disturbance | dict[str, Any] | None = None,
) -> EvalReport:
    """Roll `policy` out for `n_episodes` seeds under each `num_steps` setting and aggregate the metrics.

    env / env_kwargs: registry name and factory kwargs (`make_env(env, **env_kwargs)`).
    n_envs: envs stepped in parallel (= policy batch); default all episodes (at most 64) for workers == 1, and
        `workers` for workers > 1 (AsyncVectorEnv runs one env per process, so n_envs must equal workers there).
    max_episode_steps: single-step limit; None keeps the env's own (Push-T: 300). Given, it is passed to the env
        factory as `max_episode_steps` (envs of this package accept it) and to MultiStepWrapper.
    video_dir / n_videos: mp4 of the first `n_videos` seeds of every setting, named `<label>_seed<seed>.mp4`.
    device: where observations go and the policy runs (the policy must already be there).
    disturbance: observation noise, a shove, perturbed initial noise (`fm_policy.eval.disturbances.Disturbance`, or
        its fields as a dict); drawn per episode from its seed and the env seed, so every setting sees the same
        disturbance for an episode. Recorded in `env_info["disturbance"]` (None without one).
    """
    import torch

    n_obs_steps, n_action_steps = _check_policy(policy)
    settings = list(num_steps)
    if not settings:
        raise UserError("num_steps must list at least one setting (None = the policy's default)")
    for ns in settings:
        if ns is not None and (isinstance(ns, bool) or not isinstance(ns, (int, np.integer)) or ns < 1):
            raise UserError(f"num_steps settings must be positive ints or None, got {ns!r}")
    if len({s for s in settings}) != len(settings):
        raise UserError(f"num_steps settings must be distinct, got {settings}")
    if not isinstance(n_episodes, (int, np.integer)) or n_episodes < 1:
        raise UserError(f"n_episodes must be a positive int, got {n_episodes!r}")
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise UserError(f"workers must be a positive int, got {workers!r}")
    if workers > 1:
        if n_envs is not None and n_envs != workers:
            raise UserError(
                f"with workers > 1 every env runs in its own process (AsyncVectorEnv), so n_envs must equal workers "
                f"(got n_envs={n_envs}, workers={workers}); leave n_envs unset"
            )
        n_envs = workers
    elif n_envs is None:
        n_envs = min(n_episodes, 64)
    if not isinstance(n_envs, (int, np.integer)) or n_envs < 1:
        raise UserError(f"n_envs must be a positive int, got {n_envs!r}")
    n_envs = int(min(n_envs, n_episodes))
    n_videos = int(min(max(n_videos, 0), n_episodes))
    if n_videos and video_dir is None:
        raise UserError("n_videos > 0 needs a video_dir")
    if n_videos:
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError as err:
            raise ImportError("mp4 videos need the ffmpeg writer: pip install imageio-ffmpeg") from err
        video_dir = os.path.abspath(video_dir)  # type: ignore[arg-type]
        os.makedirs(video_dir, exist_ok=True)

    if isinstance(disturbance, dict):
        disturbance = Disturbance.from_dict(disturbance)
    if disturbance is not None and not isinstance(disturbance, Disturbance):
        raise UserError(f"disturbance must be a Disturbance (fm_policy.eval.disturbances) or a dict, got {disturbance!r}")
    noise_shape = getattr(policy, "noise_shape", None)
    noise_shape = tuple(int(d) for d in noise_shape) if noise_shape is not None else None
    if disturbance is not None and disturbance.init_noise_active and noise_shape is None:
        raise UserError(
            f"init_noise_scale / init_noise_offset need a policy with a `noise_shape` (the harness then draws its "
            f"initial noise); {type(policy).__name__} draws its own"
        )

    env_kwargs = dict(env_kwargs or {})
    if max_episode_steps is not None:
        env_kwargs.setdefault("max_episode_steps", int(max_episode_steps))
    env_disturbance = disturbance if disturbance is not None and disturbance.env_side_active else None
    factory = _EnvFactory(env, env_kwargs, n_obs_steps, n_action_steps, max_episode_steps, env_disturbance)
    metrics_hook = env_metrics(env)  # env-specific aggregates (Kitchen p_n), None for Push-T
    seeds = [int(seed_start) + i for i in range(int(n_episodes))]
    init_offsets = (
        {s: init_noise_offset(noise_shape, disturbance, s) for s in seeds}
        if disturbance is not None and disturbance.init_noise_offset > 0 and noise_shape is not None else None
    )
    init_scale = disturbance.init_noise_scale if disturbance is not None else 1.0
    torch_device = torch.device(device)

    was_training = bool(getattr(policy, "training", False))
    if isinstance(policy, torch.nn.Module):
        policy.eval()

    results: list[SettingResult] = []
    warmup_ms = math.nan
    envs = _make_vector_env(factory, n_envs, int(workers))
    try:
        action_shape = envs.single_action_space.shape
        if action_shape[0] != n_action_steps:  # pragma: no cover - MultiStepWrapper guarantees it
            raise RuntimeError(f"env action chunk shape {action_shape} vs n_action_steps={n_action_steps}")
        step_limit = envs.get_attr("max_episode_steps")[0]

        for ns in settings:
            label = setting_label(ns)
            ctx = _Rollout(envs, seeds, n_envs, label, video_dir, n_videos)
            t_setting = time.perf_counter()
            obs = ctx.start()
            if math.isnan(warmup_ms):  # one untimed call: lazy init (CUDA context, kernels) stays out of timings
                t0 = time.perf_counter()
                with torch.no_grad():
                    policy.predict_action_chunk(_to_torch_obs(obs, np.arange(n_envs), torch_device), num_steps=ns)
                _sync(torch_device)
                warmup_ms = (time.perf_counter() - t0) * 1e3
                t_setting += warmup_ms / 1e3  # not part of the setting's wall time
            policy.reset()
            torch.manual_seed(torch_seed)
            generators = (
                {s: torch.Generator().manual_seed(episode_noise_seed(torch_seed, s)) for s in seeds}
                if noise_shape is not None else None
            )
            call_s: list[float] = []
            batch_sizes: list[int] = []
            policy_s = 0.0
            bar = _progress_bar(progress, n_episodes, f"eval {label}")
            try:
                while ctx.any_active():
                    rows = ctx.active_rows()
                    obs_t = _to_torch_obs(obs, rows, torch_device)
                    noise = None
                    if generators is not None:
                        noise = torch.stack(
                            [torch.randn(noise_shape, generator=generators[ctx.slot_seed[r]]) for r in rows]
                        )
                        if init_scale != 1.0:
                            noise = noise * init_scale
                        if init_offsets is not None:
                            noise = noise + torch.stack([init_offsets[ctx.slot_seed[r]] for r in rows])
                        noise = noise.to(torch_device)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        actions = policy.predict_action_chunk(obs_t, num_steps=ns, noise=noise)
                    _sync(torch_device)
                    dt = time.perf_counter() - t0
                    call_s.append(dt)
                    batch_sizes.append(len(rows))
                    actions_np = _check_actions(actions, len(rows), action_shape, [ctx.slot_seed[r] for r in rows])
                    policy_s += time.perf_counter() - t0
                    n_done = len(ctx.finished)
                    obs = ctx.step(rows, actions_np)
                    if bar is not None and len(ctx.finished) > n_done:
                        bar.update(len(ctx.finished) - n_done)
                        bar.set_postfix(score=f"{np.mean([e.max_reward for e in ctx.finished]):.3f}")
            finally:
                if bar is not None:
                    bar.close()
            wall = time.perf_counter() - t_setting
            setting = _aggregate(ns, label, ctx, call_s, batch_sizes, wall, policy_s, seeds)
            if metrics_hook is not None:
                setting.metrics = dict(metrics_hook(setting.episodes, env_kwargs))
            results.append(setting)
    finally:
        envs.close()
        if isinstance(policy, torch.nn.Module) and was_training:
            policy.train()

    env_info = {
        "env": env, "env_kwargs": env_kwargs, "n_episodes": int(n_episodes), "seed_start": int(seed_start),
        "seeds": seeds, "num_steps": settings, "n_envs": n_envs, "workers": int(workers),
        "vector_env": "SyncVectorEnv" if workers == 1 else "AsyncVectorEnv(spawn)",
        "n_obs_steps": n_obs_steps, "n_action_steps": n_action_steps, "max_episode_steps": step_limit,
        "torch_seed": int(torch_seed),
        "noise": "per-episode generator" if noise_shape is not None else "global torch RNG",
        "disturbance": None if disturbance is None else disturbance.to_dict(),
        "policy": type(policy).__name__, "warmup_ms": warmup_ms, "versions": _versions(env),
        "hardware": hardware_description(torch_device), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "score_ci": "bootstrap percentile, 10000 resamples, seed 0", "success_ci": "Wilson score interval",
    }
    check_shoves_applied([e for r in results for e in r.episodes], disturbance)
    return EvalReport(settings=results, env_info=env_info)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress_bar(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ep", leave=False)


def _check_actions(actions: Any, batch: int, action_shape: tuple[int, ...], seeds: list[int]) -> np.ndarray:
    arr = actions.detach().to("cpu").numpy() if hasattr(actions, "detach") else np.asarray(actions)
    if arr.shape != (batch, *action_shape):
        raise UserError(
            f"predict_action_chunk must return shape (B, n_action_steps, action_dim) = {(batch, *action_shape)}, "
            f"got {tuple(arr.shape)}"
        )
    if not np.all(np.isfinite(arr)):
        bad = sorted({seeds[i] for i in np.flatnonzero(~np.isfinite(arr.reshape(batch, -1)).all(axis=1))})
        raise ValueError(f"predict_action_chunk returned non-finite actions for env seeds {bad}")
    return arr


class _Rollout:
    """Seed bookkeeping for one setting: which env runs which seed, refills, parking, finished episodes."""

    def __init__(self, envs: gym.vector.VectorEnv, seeds: list[int], n_envs: int, label: str,
                 video_dir: str | None, n_videos: int):
        self.envs = envs
        self.seeds = seeds
        self.n_envs = n_envs
        self.label = label
        self.video_seeds = set(seeds[:n_videos])
        self.video_dir = video_dir
        self.next_seed = 0
        self.slot_seed: list[int | None] = [None] * n_envs
        self.slot_chunks = [0] * n_envs
        self.slot_start = [0.0] * n_envs
        self.finished: list[EpisodeResult] = []
        self.env_s = 0.0

    def _plan_for(self, slot: int) -> dict[str, Any] | None:
        if self.next_seed >= len(self.seeds):
            self.slot_seed[slot] = None
            return None
        seed = self.seeds[self.next_seed]
        self.next_seed += 1
        self.slot_seed[slot] = seed
        self.slot_chunks[slot] = 0
        self.slot_start[slot] = time.perf_counter()
        video = os.path.join(self.video_dir, f"{self.label}_seed{seed}.mp4") if seed in self.video_seeds else None
        return {"seed": seed, "video": video}

    def _reset(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        mask = np.zeros(self.n_envs, dtype=bool)
        mask[slots] = True
        # every env gets a plan value (set_attr sets all); envs outside the mask keep running and ignore theirs
        plans = [self._plan_for(i) if mask[i] else None for i in range(self.n_envs)]
        t0 = time.perf_counter()
        self.envs.set_attr("harness_plan", plans)
        obs, _ = self.envs.reset(options={"reset_mask": mask})
        self.env_s += time.perf_counter() - t0
        return obs

    def start(self) -> dict[str, np.ndarray]:
        return self._reset(np.arange(self.n_envs))

    def any_active(self) -> bool:
        return any(s is not None for s in self.slot_seed)

    def active_rows(self) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.slot_seed) if s is not None], dtype=np.int64)

    def step(self, rows: np.ndarray, actions: np.ndarray) -> dict[str, np.ndarray]:
        full = np.zeros((self.n_envs, *actions.shape[1:]), dtype=self.envs.single_action_space.dtype)
        full[rows] = actions
        if len(rows) < self.n_envs:  # parked envs ignore their action; give them a valid one all the same
            full[np.setdiff1d(np.arange(self.n_envs), rows)] = actions[0]
        t0 = time.perf_counter()
        obs, _, terminated, truncated, _ = self.envs.step(full)
        self.env_s += time.perf_counter() - t0
        done_rows = []
        for r in rows:
            self.slot_chunks[r] += 1
            if terminated[r] or truncated[r]:
                done_rows.append(int(r))
        if not done_rows:
            return obs
        t0 = time.perf_counter()
        stats = self.envs.get_attr("episode_stats")
        self.env_s += time.perf_counter() - t0
        for r in done_rows:
            st = stats[r]
            if st is None or st["seed"] != self.slot_seed[r]:  # pragma: no cover - would be a harness bug
                raise RuntimeError(f"env {r}: episode record {st} does not match seed {self.slot_seed[r]}")
            self.finished.append(EpisodeResult(
                num_steps=None, seed=int(st["seed"]), max_reward=float(st["max_reward"]),
                total_reward=float(st["total_reward"]), success=bool(st["success"]),
                final_coverage=None if st["final_coverage"] is None else float(st["final_coverage"]),
                steps=int(st["steps"]), n_chunks=self.slot_chunks[r], terminated=bool(st["terminated"]),
                truncated=bool(st["truncated"]), wall_s=time.perf_counter() - self.slot_start[r], video=st["video"],
                shove=st.get("shove"),
            ))
        return self._reset(np.asarray(done_rows))


def _aggregate(ns: int | None, label: str, ctx: _Rollout, call_s: list[float], batch: list[int], wall: float,
               policy_s: float, seeds: list[int]) -> SettingResult:
    episodes = sorted(ctx.finished, key=lambda e: e.seed)
    got = [e.seed for e in episodes]
    if got != seeds:  # the one invariant the whole harness exists for
        raise RuntimeError(f"{label}: ran seeds {got}, expected each of {seeds} exactly once")
    for e in episodes:
        e.num_steps = ns
    coverages = [e.final_coverage for e in episodes if e.final_coverage is not None]
    env_steps = sum(e.steps for e in episodes)
    return SettingResult(
        num_steps=ns, label=label, n_episodes=len(episodes),
        score=mean_ci([e.max_reward for e in episodes]), success=rate_ci([e.success for e in episodes]),
        mean_final_coverage=float(np.mean(coverages)) if coverages else None,
        mean_steps=float(np.mean([e.steps for e in episodes])), env_steps=env_steps, wall_s=wall,
        env_steps_per_s=env_steps / wall if wall > 0 else math.nan, policy_s=policy_s, env_s=ctx.env_s,
        timing=TimingStats.from_calls(call_s, batch), episodes=episodes,
    )
