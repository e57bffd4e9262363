"""Scripted Lift expert for `robomimic/lift`: a waypoint state machine on the end effector.

Phases: hover above the cube with the gripper yaw aligned to the cube (mod 90 degrees: a cube has four equivalent
grasps, so the nearest one is used, never a long rotation) -> descend to the cube centre -> close -> lift. Each phase
ends when its waypoint is reached or after a per-phase step budget (a stall timeout), so a blocked approach cannot eat
the whole episode. Control is closed-loop proportional in position (`a[:3]`) and yaw (`a[5]`) on the OSC_POSE delta
action; a gain of 3 removes the ~7 mm steady-state error that plain `err / 0.05` leaves (shared notes, experts.md 4.3).

Diversity for demos: hover height, approach gain and a +-5 mm grasp offset are drawn per episode from `rng`.
Run `python -m fm_policy.datasets.experts.robomimic_lift --episodes 20` for a seeded success count.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np

OSC_POS_SCALE = 0.05  # metres per unit action (robosuite's OSC_POSE output_max for position)
OSC_ROT_SCALE = 0.5  # radians per unit action


def _yaw_from_quat_xyzw(q: np.ndarray) -> float:
    """Planar yaw (about world z) of a frame given as an xyzw quaternion: atan2(R[1,0], R[0,0])."""
    x, y, z, w = (float(v) for v in q)
    r00 = 1.0 - 2.0 * (y * y + z * z)
    r10 = 2.0 * (x * y + z * w)
    return float(np.arctan2(r10, r00))


def _wrap(angle: float, period: float) -> float:
    """Angle wrapped into [-period/2, period/2): the nearest equivalent under a `period` symmetry."""
    return float((angle + period / 2) % period - period / 2)


@dataclass
class _Phase:
    name: str
    budget: int  # stall timeout (steps)


PHASES = (_Phase("hover", 60), _Phase("descend", 40), _Phase("grasp", 10), _Phase("lift", 80))


class LiftExpert:
    """Closed-loop waypoint policy; `act(obs)` takes the env's Dict observation and returns a 7-D action."""

    def __init__(self, rng: np.random.Generator | None = None):
        self.rng = rng if rng is not None else np.random.default_rng()
        self.reset()

    def reset(self) -> None:
        """New episode: fresh phase clock and freshly drawn style parameters."""
        self.phase, self.phase_steps = 0, 0
        self.hover_height = float(self.rng.uniform(0.06, 0.12))
        self.gain = float(self.rng.uniform(2.5, 3.5))
        self.grasp_offset = np.append(self.rng.uniform(-0.005, 0.005, 2), 0.0)
        self.lift_target_z: float | None = None

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        cube = np.asarray(obs["object"][:3], dtype=np.float64)
        cube_yaw = _yaw_from_quat_xyzw(obs["object"][3:7])
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        yaw_err = _wrap(cube_yaw - _yaw_from_quat_xyzw(obs["robot0_eef_quat"]), np.pi / 2)
        name = PHASES[self.phase].name
        if name == "hover":
            target, gripper = cube + self.grasp_offset + [0.0, 0.0, self.hover_height], -1.0
            done = np.linalg.norm(target - eef) < 0.01 and abs(yaw_err) < 0.05
        elif name == "descend":
            target, gripper = cube + self.grasp_offset, -1.0
            done = np.linalg.norm(target - eef) < 0.006
        elif name == "grasp":
            target, gripper, done = eef, 1.0, False  # hold still while the fingers close (phase budget ends it)
        else:  # lift
            if self.lift_target_z is None:
                self.lift_target_z = float(eef[2]) + 0.15
            target, gripper, done = np.array([eef[0], eef[1], self.lift_target_z]), 1.0, False
        action = np.zeros(7)
        action[:3] = np.clip(self.gain * (target - eef) / OSC_POS_SCALE, -1.0, 1.0)
        if name in ("hover", "descend"):
            action[5] = np.clip(2.0 * yaw_err / OSC_ROT_SCALE, -1.0, 1.0)
        action[6] = gripper
        self.phase_steps += 1
        if (done or self.phase_steps >= PHASES[self.phase].budget) and self.phase < len(PHASES) - 1:
            self.phase, self.phase_steps = self.phase + 1, 0
        return action


def run_episode(env: object, seed: int, expert: LiftExpert) -> tuple[bool, int]:
    """One seeded episode; returns (success, steps). The env terminates on success (RobomimicEnv's default)."""
    obs, info = env.reset(seed=seed)  # type: ignore[attr-defined]
    expert.reset()
    steps = 0
    while True:
        obs, _, terminated, truncated, info = env.step(expert.act(obs))  # type: ignore[attr-defined]
        steps += 1
        if terminated or truncated:
            return bool(info["is_success"]), steps


def main() -> None:
    parser = argparse.ArgumentParser(description="success count of the scripted Lift expert over seeded episodes")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="first env seed; episode i uses seed + i")
    args = parser.parse_args()
    from fm_policy.envs.registry import make_env

    env = make_env("robomimic/lift")
    expert = LiftExpert(np.random.default_rng(args.seed))
    results = []
    start = time.perf_counter()
    for i in range(args.episodes):
        results.append(run_episode(env, args.seed + i, expert))
        print(f"seed {args.seed + i}: success={results[-1][0]} steps={results[-1][1]}", flush=True)
    seconds = time.perf_counter() - start
    wins = sum(s for s, _ in results)
    print(f"success {wins}/{len(results)}; mean steps {np.mean([n for _, n in results]):.1f}; "
          f"{seconds / len(results):.2f} s per episode")
    env.close()


if __name__ == "__main__":
    main()
