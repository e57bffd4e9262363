"""Robomimic tasks (robosuite 1.4.1 through robomimic 0.3.0's `EnvRobosuite`) behind the package's Dict-observation API.

Why robomimic's `EnvRobosuite` and not robosuite directly: robomimic's hdf5 datasets store `env_args` (env name and the
exact robosuite kwargs, including the old-style OSC_POSE controller config) and flattened MuJoCo states; going through
the same class means a dataset's `env_args` rebuild the very simulator the demos came from, and its stored states
reset it exactly (`reset(options={"state": ...})`). robosuite 1.5 cannot read those controller configs, hence 1.4.1
(see docs/results/robomimic.md, "Install", and `pyproject.toml`'s `robomimic` extra).

Observations (float32 copies):
- the robomimic low-dim keys `object`, `robot0_eef_pos`, `robot0_eef_quat` (xyzw), `robot0_gripper_qpos`, under their
  robomimic names, so policies trained on converted robomimic datasets read the same keys;
- `state`: those four concatenated in that order (`STATE_KEYS`), the flat vector most configs use; the converter
  (`fm_policy.datasets.convert_robomimic`) builds the same key from hdf5 observations;
- optionally camera images `<camera>_image` (uint8 HWC, e.g. 84x84 `agentview_image`, `robot0_eye_in_hand_image`).

Action (7,): OSC_POSE deltas in [-1, 1] (position 3, axis-angle 3, gripper 1 with +1 = close), robomimic's setting
(control at 20 Hz). With `abs_actions=True` (diffusion_policy's `abs_action`), action (10,): the OSC goal itself,
[position (3), orientation as rotation-6d (6, `fm_policy.datasets.rotations`), gripper (1, in [-1, 1])], in the frame
robosuite 1.4.1's OSC works in (the MuJoCo world frame; the Panda's base is fixed in it, so this is the base frame up
to a constant offset). The wrapper turns the rot6d into axis-angle and the controller runs with `control_delta=False`;
`fm-policy convert robomimic --abs-actions` writes datasets in this action space.

Success is the env's own `_check_success`; the episode terminates on success by default (as robomimic's rollouts do)
and is truncated after `max_episode_steps` (400 by default, diffusion_policy's ph setting).

Rendering and GL: with no cameras (the default) robosuite is built with no renderer at all, so no GL context exists in
any process; the env is safe to build in a parent that forks workers. With cameras, robosuite creates an offscreen
(EGL) context when the env is constructed: build such envs inside the worker processes.

Seeding: robosuite 1.4.1 draws object placements from numpy's *global* generator. `reset(seed=...)` therefore swaps
a private generator state into `np.random` for the duration of the reset and swaps it back afterwards, so resets are
reproducible per env and never disturb (or are disturbed by) other users of `np.random`.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede the first mujoco GL import

import importlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
from fm_policy.datasets.rotations import rot6d_to_axis_angle  # noqa: E402
from gymnasium import spaces  # noqa: E402

from fm_policy.errors import UserError

from .actions import checked_action  # noqa: E402

TASKS: dict[str, str] = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare"}
"""Short task names (registry suffixes `robomimic/<name>`) -> robosuite env names. Other robosuite env names are
accepted as `task` too (e.g. "Stack"), see `RobomimicEnv`."""
STATE_KEYS: tuple[str, ...] = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
"""The robomimic low-dim keys, in the order in which `state` concatenates them."""
ACTION_DIM = 7
ABS_ACTION_DIM = 10
"""Absolute action: goal position (3), goal orientation as rotation-6d (6), gripper (1)."""
DEFAULT_MAX_EPISODE_STEPS = 400
CONTROL_FREQ = 20


def _missing(module: str) -> bool:
    """True if `module` cannot be imported (not installed, or a broken install that fails while importing)."""
    try:
        importlib.import_module(module)
        return False
    except Exception:
        return True


def _register_stand_in(module: str, **attributes: Any) -> types.ModuleType:
    stand_in = types.ModuleType(module)
    stand_in.__dict__.update(attributes)
    sys.modules[module] = stand_in  # replaces a failed import's None entry too
    return stand_in


def _install_stand_ins() -> None:
    """Tiny modules for two imports of robomimic 0.3.0 that cannot be satisfied on a current machine; a real module,
    when one imports, is always left alone. This is the only place that installs them.

    - `mujoco_py`: `env_robosuite` imports it at module level only to name an exception class
      (`mujoco_py.builder.MujocoException`, in `rollout_exceptions`). mujoco_py is the long-dead MuJoCo 2.0 binding
      and does not install on current Pythons; robosuite >= 1.3 uses the official `mujoco` bindings. Stand-in:
      `MujocoException = Exception`.
    - `egl_probe`: imported when an env renders offscreen (camera observations), only to pick the GPU that EGL renders
      on. It ships as source only and needs cmake and a compiler, which a plain CPU machine (and CI) lacks, so it is
      not a dependency. Stand-in: no GPU devices, so robosuite renders on the default EGL device (Mesa's software EGL
      on a CPU machine). On a multi-GPU machine `pip install egl_probe` restores robomimic's device selection.
    """
    if "mujoco_py" not in sys.modules and _missing("mujoco_py"):
        builder = _register_stand_in("mujoco_py.builder", MujocoException=Exception)
        _register_stand_in("mujoco_py", builder=builder)
    if _missing("egl_probe"):
        _register_stand_in("egl_probe", get_available_devices=lambda: [])


def _env_robosuite_class(image_keys: Sequence[str] = ()) -> type:
    """Import robomimic's `EnvRobosuite` (optional extra) with a clear message when it is missing.

    robomimic's `get_observation` consults its global observation-modality table (it is None until initialised and
    then raises TypeError), so the table is initialised here with our low-dim keys plus any camera keys.
    """
    _install_stand_ins()
    try:
        import robomimic.utils.obs_utils as obs_utils
        from robomimic.envs.env_robosuite import EnvRobosuite
    except ImportError as err:
        raise ImportError(
            "robomimic envs need the robomimic extra: `bash scripts/setup.sh robomimic` (installs robosuite 1.4.1, "
            f"mujoco<3.10 and robomimic 0.3.0 without its torchvision dependency); import failed with: {err}"
        ) from err
    specs = {"obs": {"low_dim": list(STATE_KEYS), "rgb": list(image_keys)}}
    _quiet(obs_utils.initialize_obs_utils_with_obs_specs, specs)
    return EnvRobosuite


def _quiet(func: Any, *args: Any, **kwargs: Any) -> Any:
    """Call `func` with stdout silenced: robomimic prints its modality table on every initialisation."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return func(*args, **kwargs)


def task_env_name(task: str) -> str:
    """`"lift"` -> `"Lift"`; robosuite env names pass through unchanged."""
    return TASKS.get(task, task)


def default_env_kwargs(cameras: Sequence[str] = (), image_size: int = 84) -> dict[str, Any]:
    """robosuite kwargs matching robomimic's datasets (Panda, OSC_POSE deltas, 20 Hz, sparse reward)."""
    from robosuite.controllers import load_controller_config

    kwargs: dict[str, Any] = {
        "robots": ["Panda"],
        "controller_configs": load_controller_config(default_controller="OSC_POSE"),
        "control_freq": CONTROL_FREQ,
        "reward_shaping": False,
    }
    if cameras:
        kwargs.update(camera_names=list(cameras), camera_heights=image_size, camera_widths=image_size)
    return kwargs


def parse_env_args(env_args: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(env_name, env_kwargs) from a robomimic `env_args` (JSON string or dict), as stored in `data.attrs`.

    The render/observation flags stored with a dataset are dropped: `RobomimicEnv` sets them from its own arguments.
    """
    args = json.loads(env_args) if isinstance(env_args, str) else dict(env_args)
    if "env_name" not in args:
        raise ValueError(f"robomimic env_args has no 'env_name' (keys: {sorted(args)})")
    env_type = args.get("type", 1)
    if env_type != 1:  # robomimic's EnvType.ROBOSUITE_TYPE
        raise ValueError(f"robomimic env_args type {env_type} is not a robosuite env (type 1)")
    kwargs = dict(args.get("env_kwargs", {}))
    for flag in ("has_renderer", "has_offscreen_renderer", "ignore_done", "use_object_obs", "use_camera_obs",
                 "camera_depths", "render_gpu_device_id"):
        kwargs.pop(flag, None)
    return str(args["env_name"]), kwargs


def state_vector(obs: Mapping[str, Any]) -> np.ndarray:
    """The flat `state` (float32): `STATE_KEYS` concatenated along the last axis (works for one step or a batch)."""
    missing = [k for k in STATE_KEYS if k not in obs]
    if missing:
        raise KeyError(f"observation lacks robomimic low-dim key(s) {missing}; has {sorted(obs)}")
    return np.concatenate([np.asarray(obs[k], dtype=np.float32) for k in STATE_KEYS], axis=-1)


class RobomimicEnv(gym.Env):
    """One robomimic/robosuite task with Dict observations (see the module docstring).

    Args:
        task: "lift", "can", "square" or a robosuite env name.
        max_episode_steps: truncation horizon (robosuite itself runs with `ignore_done`).
        cameras: camera names for image observations (`<camera>_image`); empty = low-dim only, no GL.
        image_size: square camera resolution (84 in robomimic's image datasets).
        terminate_on_success: end the episode at the first successful step.
        env_kwargs: robosuite kwargs replacing `default_env_kwargs` (e.g. from a dataset's `env_args`).
        abs_actions: take 10-D absolute OSC goals (position, rotation-6d, gripper) instead of 7-D deltas; the OSC_POSE
            controller config is copied with `control_delta=False` (see the module docstring).
        render_camera, render_size: camera and square resolution of `render()` frames (videos) for an env without
            observation cameras.

    `info` after reset and every step: `is_success` (bool) and `success/<criterion>` for every criterion the env
    reports. `get_state()` returns the flattened MuJoCo state; `reset(options={"state": s})` restores one.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_FREQ}

    def __init__(
        self,
        task: str = "lift",
        max_episode_steps: int = DEFAULT_MAX_EPISODE_STEPS,
        cameras: Sequence[str] = (),
        image_size: int = 84,
        terminate_on_success: bool = True,
        env_kwargs: Mapping[str, Any] | None = None,
        abs_actions: bool = False,
        render_camera: str = "agentview",
        render_size: int = 256,
    ):
        if int(max_episode_steps) < 1:
            raise UserError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        if isinstance(cameras, str):
            cameras = [c for c in cameras.split(",") if c]
        self.task = task
        self.env_name = task_env_name(task)
        self.max_episode_steps = int(max_episode_steps)
        self.cameras = tuple(cameras)
        self.image_size = int(image_size)
        self.terminate_on_success = bool(terminate_on_success)
        self.abs_actions = bool(abs_actions)
        self.render_camera, self.render_size = render_camera, int(render_size)
        self._renderer: Any = None
        self._renderer_model: Any = None
        image_keys = [f"{c}_image" for c in self.cameras]
        env_cls = _env_robosuite_class(image_keys)
        kwargs = dict(default_env_kwargs(self.cameras, self.image_size) if env_kwargs is None else env_kwargs)
        if self.cameras:
            kwargs.update(camera_names=list(self.cameras), camera_heights=self.image_size,
                          camera_widths=self.image_size)
        if self.abs_actions:
            kwargs["controller_configs"] = _absolute_controller_config(kwargs.get("controller_configs"))
        self._rng_state = np.random.RandomState().get_state()  # private placement generator (module docstring)
        self._elapsed_steps: int | None = None
        # postprocess_visual_obs=False: keep images uint8 HWC (robomimic would convert them to float CHW)
        self.sim_env = _with_rng(self, lambda: env_cls(
            self.env_name, use_image_obs=bool(self.cameras), postprocess_visual_obs=False, **kwargs))
        probe = self._observe(_with_rng(self, self.sim_env.reset))
        obs_spaces: dict[str, spaces.Space] = {}
        for key, value in probe.items():
            if value.dtype == np.uint8:
                obs_spaces[key] = spaces.Box(0, 255, value.shape, np.uint8)
            else:
                obs_spaces[key] = spaces.Box(-np.inf, np.inf, value.shape, np.float32)
        self.observation_space = spaces.Dict(obs_spaces)
        if self.abs_actions:
            # the controller is built from the config on every (hard) reset, so control_delta=False persists
            self._check_absolute_controllers()
            high = np.full(ABS_ACTION_DIM, np.inf, np.float32)
            high[-1] = 1.0  # position and rot6d are unbounded (rot6d is normalised), the gripper is in [-1, 1]
            self.action_space = spaces.Box(-high, high, (ABS_ACTION_DIM,), np.float32)
        else:
            self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)

    @classmethod
    def from_env_args(cls, env_args: str | Mapping[str, Any], **kwargs: Any) -> RobomimicEnv:
        """The env a robomimic dataset was recorded in, from its `env_args` (see `parse_env_args`)."""
        env_name, env_kwargs = parse_env_args(env_args)
        return cls(task=env_name, env_kwargs=env_kwargs, **kwargs)

    @property
    def robosuite_env(self) -> Any:
        """The underlying robosuite env (re-read after every reset: robosuite rebuilds its sim on hard resets)."""
        return self.sim_env.env

    @property
    def elapsed_steps(self) -> int:
        return self._elapsed_steps or 0

    def get_state(self) -> np.ndarray:
        """Flattened MuJoCo state (time, qpos, qvel), robomimic's `states` row; `reset(options={"state": ...})`.

        Read from the sim directly: robomimic's `get_state()` also serialises the model XML (~1 ms), and the recorder
        calls this every step."""
        return np.array(self.robosuite_env.sim.get_state().flatten(), dtype=np.float64)

    def get_model_xml(self) -> str:
        """The MJCF XML of the current scene (robomimic's per-demo `model_file`). Pass it with a state to `reset`:
        robosuite re-samples some geometry on every hard reset (Lift's cube size), so a state alone restores poses
        and velocities but not necessarily the same bodies."""
        return str(self.sim_env.get_state()["model"])

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Random placements (reproducible with `seed`), or the stored simulator state `options["state"]`
        (optionally with `options["model"]`, an MJCF XML string as robomimic datasets store per demo; with it, the
        restored episode is exactly reproducible, but the reset rebuilds the scene and takes seconds)."""
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"state", "model"}
        if unknown:
            raise ValueError(f"RobomimicEnv.reset options are 'state' and 'model', got {sorted(unknown)}")
        if seed is not None:
            self._rng_state = np.random.RandomState(seed).get_state()
        if "state" in options:
            state = np.asarray(options["state"], dtype=np.float64).ravel()
            target: dict[str, Any] = {"states": state}
            if options.get("model") is not None:
                target["model"] = options["model"]
            else:
                _with_rng(self, self.sim_env.reset)
            expected = self.get_state().shape
            if "model" not in target and state.shape != expected:
                raise ValueError(
                    f"reset state has {state.shape[0]} entries, this {self.env_name} sim has {expected[0]}")
            raw = _with_rng(self, lambda: self.sim_env.reset_to(target))
        else:
            _with_rng(self, self.sim_env.reset)
            raw = self.sim_env.get_observation()  # forced refresh: reset's own observables can lag on some tasks
        if self.abs_actions:
            self._check_absolute_controllers()
        self._elapsed_steps = 0
        return self._observe(raw), self._info()

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if self._elapsed_steps is None:
            raise RuntimeError("RobomimicEnv.step() called before reset()")
        act = self._validate_action(action)
        raw, reward, _, _ = self.sim_env.step(act)
        self._elapsed_steps += 1
        info = self._info()
        terminated = self.terminate_on_success and info["is_success"]
        truncated = self._elapsed_steps >= self.max_episode_steps
        return self._observe(raw), float(reward), bool(terminated), bool(truncated), info

    def render(self) -> np.ndarray:
        """RGB frame (uint8 HWC) for videos: from the first observation camera when the env has cameras, else from
        `render_camera` at `render_size` through a `mujoco.Renderer` created on first use. Lazily, so a low-dim env
        owns no GL context until a video is actually recorded, and then only in the process that renders (the
        harness renders inside the worker that owns the env)."""
        if self.cameras:
            frame = self.sim_env.render(mode="rgb_array", height=self.image_size, width=self.image_size,
                                        camera_name=self.cameras[0])
            return np.ascontiguousarray(frame)
        import mujoco

        sim = self.robosuite_env.sim
        model = sim.model._model
        if self._renderer is None or self._renderer_model is not model:  # robosuite rebuilds the model on reset
            if self._renderer is not None:
                self._renderer.close()
            self._renderer = mujoco.Renderer(model, self.render_size, self.render_size)
            self._renderer_model = model
            self._scene_option = mujoco.MjvOption()
            self._scene_option.geomgroup[0] = 0  # robosuite puts collision geoms in group 0, visual meshes in 1
        self._renderer.update_scene(sim.data._data, camera=self.render_camera, scene_option=self._scene_option)
        return np.ascontiguousarray(self._renderer.render())

    def close(self) -> None:
        if getattr(self, "_renderer", None) is not None:
            self._renderer.close()
            self._renderer = None
        env = getattr(getattr(self, "sim_env", None), "env", None)
        if env is not None:
            env.close()

    # -- internals -------------------------------------------------------------------------------------------------

    def _validate_action(self, action: Any) -> np.ndarray:
        """The 7-D action robosuite's controller takes: the delta action clipped to [-1, 1], or (abs_actions) the
        absolute goal with its rot6d turned into axis-angle and the gripper clipped to [-1, 1]."""
        if not self.abs_actions:
            return checked_action(action, ACTION_DIM, "RobomimicEnv", "OSC_POSE delta", -1.0, 1.0)
        act = checked_action(action, ABS_ACTION_DIM, "RobomimicEnv",
                             "absolute OSC goal: position 3, rotation-6d 6, gripper 1", -np.inf, np.inf)
        try:
            axis_angle = rot6d_to_axis_angle(act[3:9])
        except ValueError as err:
            raise ValueError(f"RobomimicEnv absolute action has an invalid rotation-6d {act[3:9].tolist()}: {err}") \
                from err
        return np.concatenate([act[:3], axis_angle, np.clip(act[9:], -1.0, 1.0)])

    def _check_absolute_controllers(self) -> None:
        for robot in self.robosuite_env.robots:
            if robot.controller.use_delta:
                raise RuntimeError(f"RobomimicEnv(abs_actions=True): {type(robot.controller).__name__} still takes "
                                   "deltas after reset (control_delta=False did not reach it)")

    def _observe(self, raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
        obs = {k: np.array(raw[k], dtype=np.float32, copy=True) for k in STATE_KEYS}
        obs["state"] = state_vector(obs)
        for camera in self.cameras:
            key = f"{camera}_image"
            obs[key] = np.ascontiguousarray(raw[key], dtype=np.uint8)
        return obs

    def _info(self) -> dict[str, Any]:
        success = self.sim_env.is_success()
        info: dict[str, Any] = {"is_success": bool(success["task"])}
        for name, value in success.items():
            if name != "task":
                info[f"success/{name}"] = bool(value)
        return info


def _absolute_controller_config(config: Any) -> dict[str, Any]:
    """A copy of an OSC_POSE controller config (robosuite 1.4 style, as in robomimic's env_args) with
    `control_delta=False`, so the controller treats actions as absolute goals (robosuite's `OSC.set_goal`)."""
    if config is None:
        from robosuite.controllers import load_controller_config

        config = load_controller_config(default_controller="OSC_POSE")
    if not isinstance(config, Mapping) or config.get("type") != "OSC_POSE":
        kind = config.get("type") if isinstance(config, Mapping) else type(config).__name__
        raise UserError(f"abs_actions needs an OSC_POSE controller config, got {kind!r}")
    return {**config, "control_delta": False}


def _with_rng(env: RobomimicEnv, func: Any) -> Any:
    """Run `func` with the env's private generator state in `np.random` (robosuite 1.4 samples placements from the
    global generator), then restore the caller's global state."""
    outer = np.random.get_state()
    np.random.set_state(env._rng_state)
    try:
        return func()
    finally:
        env._rng_state = np.random.get_state()
        np.random.set_state(outer)


def check_obs_keys(obs_keys: Sequence[str]) -> None:
    """A policy's observation keys must be ones this env emits (`state`, the robomimic low-dim keys, `*_image`)."""
    known = {"state", *STATE_KEYS}
    unknown = [k for k in obs_keys if k not in known and not k.endswith("_image")]
    if unknown:
        raise UserError(f"robomimic envs have no observation keys {unknown}; they observe {sorted(known)} and "
                         "<camera>_image")


def obs_kwargs_for_keys(obs_keys: Sequence[str]) -> dict[str, Any]:
    """Factory kwargs that make the env emit `obs_keys` (cameras for every `<camera>_image` key)."""
    check_obs_keys(obs_keys)
    cameras = [k[: -len("_image")] for k in obs_keys if k.endswith("_image")]
    return {"cameras": cameras} if cameras else {}
