"""Convert a robomimic hdf5 dataset into the package's zarr replay buffer (`fm-policy convert robomimic IN OUT`).

robomimic layout read here (robomimic's `docs/datasets/overview.md`)::

    data                  attrs: env_args (JSON: env_name, type, env_kwargs), total
    data/demo_<i>/actions (N, A)      data/demo_<i>/states (N, D)   flattened MuJoCo states
    data/demo_<i>/rewards (N,)        data/demo_<i>/dones (N,)
    data/demo_<i>/obs/<key>           low-dim (N, d) float or images (N, H, W, C) uint8
    mask/<filter>         demo names (bytes), e.g. train / valid

Written (`ReplayBuffer` layout, zarr format 2 by default so diffusion_policy can read it too)::

    data/action (float32), data/<obs key> (float32 low-dim, uint8 images as stored), data/state (float32, the
    concatenation of `STATE_KEYS` exactly as `RobomimicEnv` builds it), data/sim_state (float64, the MuJoCo states,
    so demos can be replayed or envs reset to them), data/reward, data/done
    meta/episode_ends, meta/demo_index (the i of demo_<i>)
    attrs: env_args (the JSON string, unchanged, so the harness can rebuild the env), source, robomimic_filter

Absolute actions (`abs_actions=True`, `--abs-actions`; diffusion_policy's `abs_action`): `data/action` becomes the
10-D absolute OSC goal [position (3), orientation as rotation-6d (6, `fm_policy.datasets.rotations`: pytorch3d's
first-two-rows layout), gripper (1, unchanged)] and the original 7-D delta is kept as `data/action_delta`;
attrs["action_space"] = "osc_pose_abs_rot6d". The goals come from the robosuite controller itself, as in
diffusion_policy's `RobomimicAbsoluteActionConverter`: a simulator is built from the file's `env_args`
(`RobomimicEnv.from_env_args`), and for each step it is set to the stored flattened state (`data/demo_i/states`), the
OSC_POSE controller reads the robot pose (`update`) and takes the delta (`set_goal`), and its `goal_pos` / `goal_ori`
are the absolute action. They are in the frame robosuite 1.4.1's OSC works in: the MuJoCo world frame (the Panda's
base is fixed in it). `RobomimicEnv(abs_actions=True)` steps with these actions. Needs robosuite/robomimic, and the
file's `states` and `env_args`.

Why streaming: robomimic image datasets are tens of GB; each demo is read, checked and appended on its own, so memory
stays bounded by one demo. Why demos are sorted by index: hdf5 lists `demo_10` before `demo_2`; the store should
follow recording order.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from fm_policy.datasets.errors import DatasetError
from fm_policy.datasets.replay_buffer import ReplayBuffer
from fm_policy.datasets.rotations import matrix_to_rot6d
from fm_policy.envs.robomimic import STATE_KEYS, state_vector  # no simulator import: robomimic loads lazily

_DEMO = re.compile(r"^demo_(\d+)$")
ABS_ACTION_SPACE = "osc_pose_abs_rot6d"
"""`attrs["action_space"]` of a store converted with `abs_actions=True`."""


def _demo_names(path: str, data: Any, mask: Any, filter_key: str | None) -> list[str]:
    """Demo group names in index order, restricted to `mask/<filter_key>` when given."""
    names = [n for n in data.keys() if _DEMO.match(n)]
    if filter_key is not None:
        if mask is None or filter_key not in mask:
            available = sorted(mask.keys()) if mask is not None else []
            raise DatasetError(path, f"no filter '{filter_key}' under mask/ (available: {available})", key="mask")
        wanted = [n.decode() if isinstance(n, bytes) else str(n) for n in np.asarray(mask[filter_key])]
        missing = [n for n in wanted if n not in data]
        if missing:
            raise DatasetError(path, f"mask/{filter_key} names demos missing from data/: {missing[:5]}", key="mask")
        names = wanted
    if not names:
        raise DatasetError(path, "no demo_<i> groups under data/", key="data")
    odd = [n for n in names if not _DEMO.match(n)]
    if odd:
        raise DatasetError(path, f"demo names must look like demo_<i>, got {odd[:5]}", key="mask")
    return sorted(names, key=_demo_index)


def _demo_index(name: str) -> int:
    match = _DEMO.match(name)
    assert match is not None  # names are checked in _demo_names
    return int(match.group(1))


def _read_demo(path: str, name: str, demo: Any, obs_keys: Sequence[str] | None) -> dict[str, np.ndarray]:
    """One demo's arrays (in memory), checked: actions present, every array as long as the actions."""
    if "actions" not in demo:
        raise DatasetError(path, f"demo '{name}' has no 'actions' dataset (has {sorted(demo.keys())})",
                           key=f"data/{name}/actions")
    actions = np.asarray(demo["actions"], dtype=np.float32)
    if actions.ndim != 2 or len(actions) == 0:
        raise DatasetError(path, f"actions must be a non-empty (N, A) array, got shape {actions.shape}",
                           key=f"data/{name}/actions")
    n = len(actions)
    arrays: dict[str, np.ndarray] = {"action": actions}
    if "obs" not in demo:
        raise DatasetError(path, f"demo '{name}' has no 'obs' group", key=f"data/{name}/obs")
    obs = demo["obs"]
    keys = list(obs.keys()) if obs_keys is None else list(obs_keys)
    for key in keys:
        if key not in obs:
            raise DatasetError(path, f"demo '{name}' has no observation '{key}' (has {sorted(obs.keys())})",
                               key=f"data/{name}/obs/{key}")
        value = np.asarray(obs[key])
        arrays[key] = value if value.dtype == np.uint8 else value.astype(np.float32)
    for src, dst, dtype in (("states", "sim_state", np.float64), ("rewards", "reward", np.float32),
                            ("dones", "done", np.float32)):
        if src in demo:
            arrays[dst] = np.asarray(demo[src], dtype=dtype)
    for key, value in arrays.items():
        if value.ndim == 0 or len(value) != n:
            got = value.shape[0] if value.ndim else "a scalar"
            raise DatasetError(path, f"demo '{name}': '{key}' has {got} steps but 'actions' has {n}",
                               key=f"data/{name}")
    if all(k in arrays for k in STATE_KEYS):  # the env's flat `state`, built by the env's own function
        arrays["state"] = state_vector({k: arrays[k].reshape(n, -1) for k in STATE_KEYS})
    return arrays


def delta_to_absolute_actions(env: Any, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """One demo's OSC_POSE delta actions (N, 7 * robots) -> absolute actions (N, 10 * robots), per robot
    [goal position, goal orientation as rot6d, gripper], read off robosuite's own controller (module docstring).

    `env` is a `RobomimicEnv` built from the demo's `env_args`; `states` (N, D) are the flattened MuJoCo states before
    each action. The controller's goal is reset to the pose of the first state, as after an env reset (the OSC keeps
    its previous goal orientation when a step's rotation delta is exactly zero, so the demo is walked in order).
    Raises ValueError on shapes that do not fit the env.
    """
    rs_env = env.robosuite_env
    sim, robots = rs_env.sim, rs_env.robots
    states = np.asarray(states, dtype=np.float64)
    actions = np.asarray(actions, dtype=np.float64)
    per_robot = [robot.action_dim for robot in robots]
    if actions.ndim != 2 or actions.shape[1] != sum(per_robot):
        raise ValueError(f"actions have shape {actions.shape}; the env's {len(robots)} robot(s) take "
                         f"{sum(per_robot)} numbers per step")
    if states.ndim != 2 or len(states) != len(actions):
        raise ValueError(f"states have shape {states.shape}, expected one row per action ({len(actions)})")
    expected = sim.get_state().flatten().shape[0]
    if states.shape[1] != expected:
        raise ValueError(f"states have {states.shape[1]} entries per step, the {env.env_name} sim built from "
                         f"env_args has {expected}")
    for robot in robots:
        controller = robot.controller
        if getattr(controller, "name", None) != "OSC_POSE" or controller.control_dim != 6:
            raise ValueError(f"absolute actions need the OSC_POSE controller with fixed impedance, got "
                             f"{getattr(controller, 'name', type(controller).__name__)} "
                             f"(control_dim {controller.control_dim})")
        if not controller.use_delta:
            raise ValueError("the dataset's controller already takes absolute actions (control_delta=False)")
    out = np.zeros((len(actions), 10 * len(robots)), dtype=np.float64)
    for i, (state, action) in enumerate(zip(states, actions)):
        sim.set_state_from_flattened(state)
        sim.forward()
        start = 0
        for k, robot in enumerate(robots):
            controller = robot.controller
            arm = action[start:start + controller.control_dim]
            gripper = action[start + controller.control_dim:start + per_robot[k]]
            start += per_robot[k]
            controller.update(force=True)  # robot pose of this state
            if i == 0:
                controller.reset_goal()
            controller.set_goal(arm)
            out[i, 10 * k:10 * k + 3] = controller.goal_pos
            out[i, 10 * k + 3:10 * k + 9] = matrix_to_rot6d(controller.goal_ori)
            out[i, 10 * k + 9:10 * k + 10] = gripper
    return out


def _abs_action_env(path: str, env_args: str) -> Any:
    """The simulator that converts a file's delta actions (`RobomimicEnv` from its env_args, low-dim, no GL)."""
    from fm_policy.envs.robomimic import RobomimicEnv

    try:
        return RobomimicEnv.from_env_args(env_args)
    except (ValueError, TypeError, KeyError) as exc:
        raise DatasetError(path, f"cannot build the simulator from env_args ({exc})",
                           key="data.attrs/env_args") from exc


def convert_robomimic(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    obs_keys: Sequence[str] | None = None,
    filter_key: str | None = None,
    overwrite: bool = False,
    zarr_format: Literal[2, 3] = 2,
    progress: bool = True,
    abs_actions: bool = False,
) -> ReplayBuffer:
    """Convert robomimic hdf5 `in_path` to a zarr replay buffer at `out_path` and return it (open for appending).

    `obs_keys` selects observation keys (default: all under each demo's `obs/`); `filter_key` converts only the demos
    listed in `mask/<filter_key>` (e.g. "train"). A malformed file raises `DatasetError` naming the demo and key; the
    output is then removed, so a failed conversion never leaves a half-written store that looks valid.

    `abs_actions` stores 10-D absolute actions as `action` and the deltas as `action_delta` (module docstring); it
    needs `env_args` and every demo's `states` (DatasetError otherwise) and builds a simulator.
    """
    import h5py
    from tqdm import tqdm

    in_path, out_path = str(in_path), str(out_path)
    if not os.path.exists(in_path):
        raise DatasetError(in_path, "no such file")
    try:
        handle = h5py.File(in_path, "r")
    except OSError as exc:
        raise DatasetError(in_path, f"not a readable hdf5 file ({exc})") from exc
    with handle as f:
        if "data" not in f or not isinstance(f["data"], h5py.Group):
            raise DatasetError(in_path, "no 'data' group: not a robomimic dataset", key="data")
        data = f["data"]
        names = _demo_names(in_path, data, f.get("mask"), filter_key)
        env_args = data.attrs.get("env_args")
        if isinstance(env_args, bytes):
            env_args = env_args.decode()
        if env_args is not None:
            try:
                json.loads(env_args)
            except (TypeError, ValueError) as exc:
                raise DatasetError(in_path, f"env_args is not valid JSON ({exc})", key="data.attrs/env_args") from exc
        attrs: dict[str, Any] = {"source": os.path.abspath(in_path), "source_format": "robomimic-hdf5"}
        if env_args is not None:
            attrs["env_args"] = env_args
        if filter_key is not None:
            attrs["robomimic_filter"] = filter_key
        if abs_actions:  # checked before anything is written or a simulator is built
            if env_args is None:
                raise DatasetError(in_path, "abs_actions needs the simulator the demos were recorded in, but "
                                   "data.attrs has no env_args", key="data.attrs/env_args")
            no_states = [n for n in names if "states" not in data[n]]
            if no_states:
                raise DatasetError(in_path, f"abs_actions replays the stored simulator states, but demo(s) "
                                   f"{no_states[:5]} have no 'states' dataset", key=f"data/{no_states[0]}/states")
            attrs["action_space"] = ABS_ACTION_SPACE
        buffer = ReplayBuffer.create(out_path, zarr_format=zarr_format, attrs=attrs, overwrite=overwrite)
        env = None
        try:
            if abs_actions:
                env = _abs_action_env(in_path, env_args)
            for name in tqdm(names, desc=f"convert {os.path.basename(in_path)}", unit="demo", disable=not progress):
                arrays = _read_demo(in_path, name, data[name], obs_keys)
                if env is not None:
                    try:
                        # the actions re-read at their stored precision (arrays["action"] is already float32)
                        absolute = delta_to_absolute_actions(env, arrays["sim_state"], data[name]["actions"][()])
                    except ValueError as exc:
                        raise DatasetError(in_path, f"demo '{name}': cannot convert to absolute actions ({exc})",
                                           key=f"data/{name}") from exc
                    arrays["action_delta"] = arrays["action"]
                    arrays["action"] = absolute.astype(np.float32)
                images = {k: v for k, v in arrays.items() if v.dtype == np.uint8 and v.ndim == 4}
                # images: 64 frames per chunk (~1.3 MB at 84x84x3), so a training window touches one or two chunks
                buffer.add_episode(arrays, episode_meta={"demo_index": _demo_index(name)},
                                   chunks={k: 64 for k in images})
        except BaseException:
            buffer.close()
            import shutil

            shutil.rmtree(out_path, ignore_errors=True)
            raise
        finally:
            if env is not None:
                env.close()
    return buffer
