"""Scripted experts for the robomimic tasks (Lift, PickPlaceCan, NutAssemblySquare): waypoint state machines on the
end effector, driven by the OSC_POSE delta action.

Why waypoints and not a motion planner: these tasks are top-down pick-and-place with free space above the table, so a
closed-loop sequence of end-effector targets (hover, descend, grasp, lift, transport, align, place, release,
retreat) solves them reliably, runs at simulator speed, and is easy to randomise for diverse demos.

Control (docs/experts.md, "robomimic waypoint experts"): position `a[:3] = clip(gain * (target - eef) / 0.05)`, planar yaw
`a[5] = clip(2 * yaw_err / 0.5)` (positive turns the downward-pointing gripper counter-clockwise), gripper `a[6]`
(+1 close, -1 open). A gain of ~3 removes the ~7 mm steady-state error that `err / 0.05` leaves. The position loop
stays closed during rotations because a pure yaw command also translates the end effector.

Each phase ends when its waypoint is reached or after its own step budget (a stall timeout), so one blocked approach
cannot eat the episode. Scene facts that are not in the low-dim observation (the Can's target bin, the Square peg and
the nut's handle site) are read from the simulator: the expert is privileged, the policy it teaches is not.

Randomised per episode from the expert's generator: hover height, position gain, grasp offset, the choice among the
object's symmetric grasp yaws that are close to the current yaw, transport height, an optional transport via-point
and a short pause after grasping. Only successful episodes are kept by the collector (the env's own success check).

`python -m fm_policy.datasets.experts.robomimic --task can --episodes 100` prints a seeded success count.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

OSC_POS_SCALE = 0.05  # metres per unit action (robosuite's OSC_POSE output_max for position)
OSC_ROT_SCALE = 0.5  # radians per unit action
YAW_GAIN = 2.0
OPEN, CLOSE = -1.0, 1.0
SQUARE_HANDLE_SITE = "SquareNut_handle_site"
SQUARE_PEG_BODY = "peg1"
CARRY_PHASES = ("lift", "via", "transport", "lower")
EMPTY_GRIPPER_WIDTH = 0.006  # metres between the fingers: below this they closed on nothing (a held can is ~0.066)
MAX_REGRASPS = 3


def yaw_from_quat_xyzw(q: np.ndarray) -> float:
    """Planar yaw (about world z) of a frame given as an xyzw quaternion: atan2(R[1,0], R[0,0])."""
    x, y, z, w = (float(v) for v in q)
    return float(np.arctan2(2.0 * (x * y + z * w), 1.0 - 2.0 * (y * y + z * z)))


def wrap(angle: float, period: float = 2 * np.pi) -> float:
    """Angle wrapped into [-period/2, period/2): the nearest equivalent under a `period` symmetry."""
    return float((angle + period / 2) % period - period / 2)


@dataclass
class RobomimicExpertConfig:
    """Ranges of the per-episode randomisation (uniform draws) and the fixed tolerances."""

    hover_height: tuple[float, float] = (0.06, 0.12)  # metres above the grasp point
    gain: tuple[float, float] = (2.5, 3.5)  # position gain (x err / 0.05)
    grasp_offset: float = 0.005  # +- metres in x and y (Can: half of it: the fingers are short)
    transport_height: tuple[float, float] = (1.00, 1.08)  # world z while carrying (table top is at 0.8)
    via_point_prob: float = 0.5  # probability of a random via-point on the way to the place target
    via_point_spread: float = 0.08  # +- metres of the via-point around the midpoint, in x and y
    other_yaw_prob: float = 0.2  # probability of using the second-nearest symmetric grasp yaw when it is close
    max_pause: int = 4  # extra steps (0..max_pause) holding still after the fingers closed
    reach_tolerance: float = 0.01  # metres: a waypoint counts as reached
    yaw_tolerance: float = 0.05  # radians


@dataclass
class _Phase:
    name: str
    budget: int  # stall timeout in steps
    step: Callable[[dict[str, np.ndarray]], tuple[np.ndarray, float | None, float, bool]]
    """obs -> (target eef position, yaw error to correct or None to hold yaw, gripper command, waypoint reached)"""


class RobomimicExpert:
    """Closed-loop waypoint expert for one robomimic task.

    Usage: `expert.reset(env, seed)` right after `env.reset(...)` (it reads the scene), then `expert.act(obs)` per step.
    `env` is a `fm_policy.envs.robomimic.RobomimicEnv`.
    """

    TASKS = ("lift", "can", "square")

    def __init__(self, task: str, config: RobomimicExpertConfig | None = None):
        if task not in self.TASKS:
            raise ValueError(f"no scripted robomimic expert for task '{task}'; available: {list(self.TASKS)}")
        self.task = task
        self.config = config or RobomimicExpertConfig()
        self.env: Any = None
        self.phases: list[_Phase] = []
        self.phase = self.phase_steps = 0

    # -- episode set-up ----------------------------------------------------------------------------------------------

    def reset(self, env: Any, seed: int) -> None:
        """Draw this episode's style from `seed` and build its phase list (the scene must already be reset)."""
        c, rng = self.config, np.random.default_rng(seed)
        self.env = env
        self.hover = float(rng.uniform(*c.hover_height))
        self.gain = float(rng.uniform(*c.gain))
        scale = 0.5 if self.task == "can" else 1.0
        self.grasp_offset = np.append(rng.uniform(-1, 1, 2) * c.grasp_offset * scale, 0.0)
        self.carry_z = float(rng.uniform(*c.transport_height))
        self.pause = int(rng.integers(0, c.max_pause + 1))
        self.use_other_yaw = bool(rng.random() < c.other_yaw_prob)
        self.via_offset = (np.append(rng.uniform(-1, 1, 2) * c.via_point_spread, 0.0)
                           if rng.random() < c.via_point_prob else None)
        self.phase = self.phase_steps = self.regrasps = 0
        self.hold: dict[str, Any] = {}  # values frozen when a phase starts (e.g. the lift height)
        self.phases = {"lift": self._lift_phases, "can": self._can_phases, "square": self._square_phases}[self.task]()

    def describe(self) -> dict[str, Any]:
        return {"name": f"RobomimicExpert/{self.task} (waypoint state machine)", "config": asdict(self.config)}

    @property
    def phase_name(self) -> str:
        return self.phases[self.phase].name

    # -- control -----------------------------------------------------------------------------------------------------

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The 7-D OSC_POSE delta action (float32) for observation `obs`; advances the phase clock."""
        phase = self.phases[self.phase]
        target, yaw_err, gripper, reached = phase.step(obs)
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        action = np.zeros(7)
        action[:3] = np.clip(self.gain * (target - eef) / OSC_POS_SCALE, -1.0, 1.0)
        if yaw_err is not None:
            action[5] = np.clip(YAW_GAIN * yaw_err / OSC_ROT_SCALE, -1.0, 1.0)
        action[6] = gripper
        self.phase_steps += 1
        if phase.name in CARRY_PHASES and _gripper_width(obs) < EMPTY_GRIPPER_WIDTH and self.regrasps < MAX_REGRASPS:
            # the fingers closed on nothing (a missed or slipped grasp): open and start over from the hover
            self.phase, self.phase_steps, self.hold, self.regrasps = 0, 0, {}, self.regrasps + 1
            self.use_other_yaw = False
            return action.astype(np.float32)
        if (reached or self.phase_steps >= phase.budget) and self.phase < len(self.phases) - 1:
            self.phase, self.phase_steps = self.phase + 1, 0
            self.hold = {}
        return action.astype(np.float32)

    def _reached(self, target: np.ndarray, eef: np.ndarray, yaw_err: float | None = None,
                 tolerance: float | None = None) -> bool:
        close = np.linalg.norm(target - eef) < (tolerance or self.config.reach_tolerance)
        return bool(close and (yaw_err is None or abs(yaw_err) < self.config.yaw_tolerance))

    def _grasp_yaw_error(self, object_yaw: float, gripper_yaw: float, period: float) -> float:
        """Yaw error to the object's nearest symmetric grasp (period 90 deg for a cube, 180 for a handle), or to the
        second-nearest one when this episode drew it and it is within 60 degrees (a different but short rotation)."""
        nearest = wrap(object_yaw - gripper_yaw, period)
        if self.use_other_yaw:
            other = nearest - np.sign(nearest) * period if nearest != 0 else period
            if abs(other) < np.radians(60):
                return float(other)
        return nearest

    def _frozen(self, key: str, value: Callable[[], Any]) -> Any:
        if key not in self.hold:
            self.hold[key] = value()
        return self.hold[key]

    # -- shared phases -----------------------------------------------------------------------------------------------

    def _pick_phases(self, grasp_point: Callable[[dict], np.ndarray], grasp_yaw: Callable[[dict], float | None],
                     descend_tolerance: float, close_steps: int) -> list[_Phase]:
        """hover above the grasp point (yaw aligned) -> descend -> close -> pause; `grasp_yaw(obs)` gives the yaw
        error to correct (None: keep the current yaw)."""

        def hover(obs: dict) -> tuple:
            target = grasp_point(obs) + self.grasp_offset + [0.0, 0.0, self.hover]
            yaw_err = grasp_yaw(obs)
            return target, yaw_err, OPEN, self._reached(target, _eef(obs), yaw_err)

        def descend(obs: dict) -> tuple:
            target = grasp_point(obs) + self.grasp_offset
            yaw_err = grasp_yaw(obs)
            return target, yaw_err, OPEN, self._reached(target, _eef(obs), tolerance=descend_tolerance)

        def close(obs: dict) -> tuple:  # hold the position where the fingers started closing
            return self._frozen("at", lambda: _eef(obs)), None, CLOSE, False

        return [_Phase("hover", 80, hover), _Phase("descend", 50, descend),
                _Phase("grasp", close_steps + self.pause, close)]

    def _carry_phases(self, carried_xy: Callable[[dict], np.ndarray], place_xy: np.ndarray,
                      yaw_err: Callable[[dict], float | None], xy_tolerance: float) -> list[_Phase]:
        """lift to the carry height -> (via-point) -> over the place target, moving so that `carried_xy(obs)` (the
        object's, not the gripper's, position) lands on `place_xy`."""

        def correction(obs: dict) -> np.ndarray:
            return np.append(place_xy - carried_xy(obs), 0.0)

        def lift(obs: dict) -> tuple:
            eef = _eef(obs)
            target = np.array([eef[0], eef[1], self.carry_z])
            return target, None, CLOSE, abs(self.carry_z - eef[2]) < 0.02

        def via(obs: dict) -> tuple:
            start = self._frozen("start", lambda: _eef(obs))
            goal = start + correction(obs)
            target = (start + goal) / 2 + self.via_offset
            target[2] = self.carry_z
            return target, None, CLOSE, self._reached(target, _eef(obs), tolerance=0.03)

        def transport(obs: dict) -> tuple:
            eef = _eef(obs)
            target = eef + correction(obs)
            target[2] = self.carry_z
            err = yaw_err(obs)
            done = np.linalg.norm(correction(obs)[:2]) < xy_tolerance and abs(self.carry_z - eef[2]) < 0.03
            return target, err, CLOSE, bool(done and (err is None or abs(err) < self.config.yaw_tolerance))

        phases = [_Phase("lift", 60, lift)]
        if self.via_offset is not None:
            phases.append(_Phase("via", 60, via))
        return phases + [_Phase("transport", 120, transport)]

    def _release_phases(self, open_steps: int) -> list[_Phase]:
        def release(obs: dict) -> tuple:
            return self._frozen("at", lambda: _eef(obs)), None, OPEN, False

        def retreat(obs: dict) -> tuple:  # straight up, away from the object: the success checks want the gripper far
            at = self._frozen("at", lambda: _eef(obs))
            return np.array([at[0], at[1], max(at[2] + 0.12, 1.05)]), None, OPEN, False

        return [_Phase("release", open_steps, release), _Phase("retreat", 400, retreat)]

    # -- tasks -------------------------------------------------------------------------------------------------------

    def _lift_phases(self) -> list[_Phase]:
        def cube(obs: dict) -> np.ndarray:
            return np.asarray(obs["object"][:3], dtype=np.float64)

        def cube_yaw_err(obs: dict) -> float:
            return self._grasp_yaw_error(yaw_from_quat_xyzw(obs["object"][3:7]),
                                         yaw_from_quat_xyzw(obs["robot0_eef_quat"]), np.pi / 2)

        def lift(obs: dict) -> tuple:
            start = self._frozen("start", lambda: _eef(obs))
            return np.array([start[0], start[1], start[2] + 0.15]), None, CLOSE, False

        return self._pick_phases(cube, cube_yaw_err, 0.006, close_steps=10) + [_Phase("lift", 200, lift)]

    def _can_phases(self) -> list[_Phase]:
        sim_env = self.env.robosuite_env
        target = np.asarray(sim_env.target_bin_placements[sim_env.object_to_id["can"]], dtype=np.float64)

        def can(obs: dict) -> np.ndarray:
            return np.asarray(obs["object"][:3], dtype=np.float64) + [0.0, 0.0, 0.005]

        def lower(obs: dict) -> tuple:
            eef = _eef(obs)
            goal = np.array([eef[0], eef[1], 0.95]) + np.append(target[:2] - np.asarray(obs["object"][:2]), 0.0)
            return goal, None, CLOSE, abs(eef[2] - 0.95) < 0.01

        return (self._pick_phases(can, lambda obs: None, 0.008, close_steps=8)
                + self._carry_phases(lambda obs: np.asarray(obs["object"][:2], dtype=np.float64), target[:2],
                                     lambda obs: None, xy_tolerance=0.01)
                + [_Phase("lower", 60, lower)] + self._release_phases(open_steps=8))

    def _square_phases(self) -> list[_Phase]:
        sim_env = self.env.robosuite_env
        sim = sim_env.sim
        peg = np.asarray(sim.data.body_xpos[sim.model.body_name2id(SQUARE_PEG_BODY)], dtype=np.float64).copy()
        handle_site = sim.model.site_name2id(SQUARE_HANDLE_SITE)

        def handle(obs: dict) -> np.ndarray:  # `sim` is this episode's (robosuite rebuilds it only on reset)
            return np.asarray(sim.data.site_xpos[handle_site], dtype=np.float64).copy()

        def nut_yaw(obs: dict) -> float:
            return yaw_from_quat_xyzw(obs["object"][3:7])

        def handle_yaw_err(obs: dict) -> float:  # fingers close across the handle when the gripper yaw = nut yaw
            return self._grasp_yaw_error(nut_yaw(obs), yaw_from_quat_xyzw(obs["robot0_eef_quat"]), np.pi)

        def square_yaw_err(obs: dict) -> float:  # turn the nut until its square hole lines up with the peg
            return -wrap(nut_yaw(obs), np.pi / 2)

        def nut_xy(obs: dict) -> np.ndarray:
            return np.asarray(obs["object"][:2], dtype=np.float64)

        def lower(obs: dict) -> tuple:
            eef = _eef(obs)
            target = eef + np.append(peg[:2] - nut_xy(obs), 0.0)
            target[2] = eef[2] - 0.03  # keep pushing down; the peg guides the nut
            return target, square_yaw_err(obs), CLOSE, float(obs["object"][2]) < 0.845

        return (self._pick_phases(handle, handle_yaw_err, 0.006, close_steps=10)
                + self._carry_phases(nut_xy, peg[:2], square_yaw_err, xy_tolerance=0.004)
                + [_Phase("lower", 80, lower)] + self._release_phases(open_steps=8))


def _gripper_width(obs: dict[str, np.ndarray]) -> float:
    qpos = np.asarray(obs["robot0_gripper_qpos"], dtype=np.float64)
    return float(qpos[0] - qpos[1])


def _eef(obs: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(obs["robot0_eef_pos"], dtype=np.float64)


def run_episode(env: Any, expert: RobomimicExpert, env_seed: int, expert_seed: int) -> tuple[bool, int]:
    """One seeded episode; returns (success, steps). The env terminates on success (RobomimicEnv's default)."""
    obs, _ = env.reset(seed=env_seed)
    expert.reset(env, expert_seed)
    steps = 0
    while True:
        obs, _, terminated, truncated, info = env.step(expert.act(obs))
        steps += 1
        if terminated or truncated:
            return bool(info["is_success"]), steps


def main() -> None:
    parser = argparse.ArgumentParser(description="success count of a scripted robomimic expert over seeded episodes")
    parser.add_argument("--task", choices=RobomimicExpert.TASKS, default="lift")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="first env seed; episode i uses env seed seed + i")
    parser.add_argument("--json", help="write the per-episode results here")
    args = parser.parse_args()
    from fm_policy.envs.registry import make_env

    env = make_env(f"robomimic/{args.task}")
    expert = RobomimicExpert(args.task)
    results, start, cpu_start = [], time.perf_counter(), time.process_time()
    for i in range(args.episodes):
        t0 = time.perf_counter()
        success, steps = run_episode(env, expert, args.seed + i, args.seed + i)
        results.append({"seed": args.seed + i, "success": success, "steps": steps,
                        "seconds": time.perf_counter() - t0, "last_phase": expert.phase_name, "regrasps": expert.regrasps})
        print(json.dumps(results[-1]), flush=True)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    wins = sum(r["success"] for r in results)
    summary = {"task": args.task, "episodes": len(results), "successes": wins,
               "mean_steps": float(np.mean([r["steps"] for r in results])),
               "wall_s_per_episode": wall / len(results), "cpu_s_per_episode": cpu / len(results)}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "episodes": results}, f, indent=1)
    env.close()


if __name__ == "__main__":
    main()
