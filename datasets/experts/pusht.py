"""Push-T planning expert: a push-primitive planner over the env's own pymunk physics.

Why a planner: Push-T has no public scripted expert, and greedy per-step optimisation (MPPI over target
sequences) fails because the final alignment needs non-greedy repositioning moves. Planning at the level of
*push primitives* (which edge to push, where, in which direction, how far, how fast) with the true simulator
as the model solves it (design: docs/experts.md, "Push-T planner").

One decision = one primitive:
  1. screen `n_screen` random primitives by simulating only the push (agent at rest next to the edge) in a
     private copy of the env's physics; score = mean distance of the 8 T-outline vertices to their goal
     positions + `step_penalty` per env step;
  2. CEM step: `n_refine` perturbations of the elite;
  3. for the `top_k` best, build the full target sequence (retreat out of the inflated T if needed ->
     shortest path around the T on a visibility graph -> straight in along the edge normal -> settle ->
     push) and simulate it from the TRUE current state; a candidate whose exact env coverage crosses the
     success threshold wins (earliest first), else the lowest keypoint error + `step_penalty` x steps;
  4. the winner's targets are executed open loop, then the expert replans.

Actions are absolute agent targets (the env's action space), clipped to [0, 512] and rounded to float32
values so that demos stored as float32 replay bit-for-bit. The goal pose is read from `env.goal_pose` at
every decision (task variants change it). The only randomness is the planner RNG
(`numpy.random.default_rng(seed)`), so the same env seed + planner seed give bitwise-identical actions.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from fm_policy.datasets.seeds import retry_planner_seed

__all__ = [
    "PushTExpertConfig",
    "PushTExpert",
    "run_expert_episode",
    "run_expert_episode_with_retries",
    "retry_planner_seed",
    "physics_env",
]

# --- T geometry, in the block's local frame (origin = middle of the top edge of the bar; PushTEnv.add_tee with
# scale 30). The outline is counter-clockwise in pymunk coordinates, so the outward normal of an edge with unit
# direction (tx, ty) is (ty, -tx). tests/test_pusht_expert.py checks both tables against the env's shapes.
T_OUTLINE = np.array(
    [(-60, 0), (60, 0), (60, 30), (15, 30), (15, 120), (-15, 120), (-15, 30), (-60, 30)], dtype=np.float64
)
# The T as two axis-aligned boxes (xmin, ymin, xmax, ymax): bar and stem. A mitre-buffered T is the union of the
# buffered boxes, which makes the path planner's collision tests exact and cheap.
T_BOXES = ((-60.0, 0.0, 60.0, 30.0), (-15.0, 30.0, 15.0, 120.0))

_EDGE_A = T_OUTLINE
_EDGE_VEC = np.roll(T_OUTLINE, -1, axis=0) - T_OUTLINE
_EDGE_LEN = np.linalg.norm(_EDGE_VEC, axis=1)
_EDGE_DIR = _EDGE_VEC / _EDGE_LEN[:, None]
_EDGE_NORMAL = np.stack([_EDGE_DIR[:, 1], -_EDGE_DIR[:, 0]], axis=1)  # outward
# Vertex i joins edge i-1 and edge i; it is concave where the outline turns clockwise.
_PREV_DIR = np.roll(_EDGE_DIR, 1, axis=0)
_VERTEX_CONCAVE = _PREV_DIR[:, 0] * _EDGE_DIR[:, 1] - _PREV_DIR[:, 1] * _EDGE_DIR[:, 0] < 0
_N_EDGES = len(T_OUTLINE)


@dataclass
class PushTExpertConfig:
    """Every knob of the planner; the defaults are the final setting measured in docs/results/pusht_expert.md."""

    n_screen: int = 160  # random primitives screened per decision (push-only rollouts, the main cost)
    n_refine: int = 48  # CEM perturbations of the best screened primitive
    top_k: int = 8  # best primitives re-simulated with their full approach path from the true state
    tilt_std: float = 0.35  # push direction: Gaussian tilt (rad) away from the edge's inward normal ...
    tilt_max: float = 1.0  # ... clipped so that the push still points into the edge
    push_length: tuple[float, float] = (2.0, 90.0)  # target travel beyond first contact (px), log-uniform
    push_speed: tuple[float, float] = (4.0, 10.0)  # target speed during the push (px per env step), uniform
    push_gap: float = 4.0  # the push starts at rest with the agent surface this far from the edge (px)
    refine_pos_std: float = 5.0  # CEM perturbation std of the contact point along the edge (px)
    refine_tilt_std: float = 0.15  # ... of the tilt (rad)
    refine_log_length_std: float = 0.3  # ... of log(push length)
    refine_speed_std: float = 1.0  # ... of the push speed (px per step)
    step_penalty: float = 0.25  # px of keypoint error that one env step is worth (shorter demos)
    approach_speed: float = 20.0  # target speed along the path around the T (px per env step)
    entry_speed: float = 8.0  # target speed of the straight-in move along the edge normal (px per env step)
    clearance: float = 7.0  # path nodes lie on the T buffered by agent radius + clearance (mitre joins)
    entry_gap: float = 7.0  # straight-in starts with the agent surface this far from the edge (>= clearance)
    settle_steps: int = 0  # steps holding the push start before pushing (1 made demos ~6 steps longer, no gain)
    coverage_check_error: float = 10.0  # compute the exact (shapely) coverage only below this keypoint error (px)


class _Primitive(NamedTuple):
    """One push: edge index, contact position in [0, 1] along the edge's usable part, tilt, length, speed."""

    edge: int
    u: float
    tilt: float
    length: float
    speed: float


class _State(NamedTuple):
    """The simulator state the planner needs (the env's `state` observation lacks both velocities)."""

    agent_pos: tuple[float, float]
    agent_vel: tuple[float, float]
    block_pose: tuple[float, float, float]
    block_vel: tuple[float, float]
    block_angvel: float


def _read_state(sim: Any) -> _State:
    """Reads the true state of a PushTEnv, velocities included."""
    b = sim.block
    return _State(
        tuple(sim.agent.position),
        tuple(sim.agent.velocity),
        (b.position[0], b.position[1], b.angle),
        tuple(b.velocity),
        b.angular_velocity,
    )


def _state_vector(sim: Any) -> np.ndarray:
    """The env's `state` observation [agent_x, agent_y, block_x, block_y, angle mod 2pi], for any obs_type."""
    a, b = sim.agent.position, sim.block.position
    return np.array([a[0], a[1], b[0], b[1], sim.block.angle % (2 * np.pi)], dtype=np.float64)


def _outline_world(pose: tuple[float, float, float]) -> list[tuple[float, float]]:
    """World positions of the 8 T-outline vertices for a block pose (x, y, angle)."""
    x, y, th = pose
    c, s = math.cos(th), math.sin(th)
    return [(x + c * vx - s * vy, y + s * vx + c * vy) for vx, vy in T_OUTLINE.tolist()]


def _keypoint_error(pose: tuple[float, float, float], goal_vertices: list[tuple[float, float]]) -> float:
    """Mean distance of the T-outline vertices to their goal positions: a smooth proxy for coverage."""
    verts = _outline_world(pose)
    return sum(math.hypot(vx - gx, vy - gy) for (vx, vy), (gx, gy) in zip(verts, goal_vertices)) / len(verts)


class _PlanningModel:
    """A private PushTEnv physics copy (same class and constants as the real env) used for rollouts.

    It is rebuilt at every decision so that a plan depends only on the true state and the planner RNG.
    """

    def __init__(self, sim: Any):
        env = type(sim)(obs_type="state", block_cog=sim.block_cog, damping=sim.damping)
        env._setup()
        env.block.center_of_gravity = sim.block.center_of_gravity
        env.space.damping = sim.space.damping
        env.goal_pose = np.asarray(sim.goal_pose, dtype=np.float64)
        # The env counts contact points in a post-solve callback (~25% of the step time in the prototype); the
        # planner does not need them. pymunk 6 prints an error per contact for `None`, so install a no-op instead.
        env.collision_handeler.post_solve = _no_op_post_solve
        self.env = env
        self._space, self._agent, self._block = env.space, env.agent, env.block
        self._shapes = [*env.agent.shapes, *env._block_shapes]  # a list: set order would vary between runs
        self._kp, self._kv, self._dt = float(sim.k_p), float(sim.k_v), float(sim.dt)
        self._n_sub = int(1 / (sim.dt * sim.control_hz))  # same expression as PushTEnv.step

    def load(self, state: _State) -> None:
        """Puts the model in `state`, with an empty contact cache.

        Removing and re-adding the shapes drops pymunk's cached contacts (and their warm-start impulses), so a
        rollout's result does not depend on the rollout simulated before it.
        """
        self._space.remove(*self._shapes)
        self._space.add(*self._shapes)
        self._agent.position = state.agent_pos
        self._agent.velocity = state.agent_vel
        x, y, th = state.block_pose
        # Angle first: the block rotates about its centre of gravity (0, 45), so setting the position last
        # restores the exact pose.
        self._block.angle = th
        self._block.position = (x, y)
        self._block.velocity = state.block_vel
        self._block.angular_velocity = state.block_angvel

    def step(self, tx: float, ty: float) -> None:
        """One env step towards target (tx, ty): the env's PD law and substeps.

        Hand-written for speed with plain floats instead of Vec2d/ndarray arithmetic; the operations and their
        order are those of PushTEnv.step, so the agent motion is the same.
        """
        agent, space, kp, kv, dt = self._agent, self._space, self._kp, self._kv, self._dt
        for _ in range(self._n_sub):
            px, py = agent.position
            vx, vy = agent.velocity
            vx += (kp * (tx - px) + kv * (0.0 - vx)) * dt
            vy += (kp * (ty - py) + kv * (0.0 - vy)) * dt
            agent.velocity = (vx, vy)
            space.step(dt)

    def block_pose(self) -> tuple[float, float, float]:
        """Current block pose (x, y, angle)."""
        p = self._block.position
        return (p[0], p[1], self._block.angle)

    def coverage(self) -> float:
        """The env's own coverage (shapely intersection / T area) against the real env's goal pose."""
        return self.env._get_coverage()


def _no_op_post_solve(arbiter: Any, space: Any, data: Any) -> None:
    """Replaces the env's contact counter in the planning copy (see _PlanningModel.__init__)."""


class _Frame:
    """The block's pose as a rigid transform, plus the path-planning geometry of the T at that pose."""

    def __init__(self, pose: tuple[float, float, float], agent_radius: float, clearance: float):
        self.x, self.y, th = pose
        self.c, self.s = math.cos(th), math.sin(th)
        self.r = agent_radius
        node_off = agent_radius + clearance
        # Obstacle for visibility tests: the T buffered 1 px less than the nodes, so that node-to-node moves
        # along the buffer's edges are visible while the agent keeps ~`clearance` px from the T.
        self.check_boxes = _grow_boxes(node_off - 1.0)
        self.node_boxes = _grow_boxes(node_off)
        # Path nodes: the convex vertices of the T buffered by node_off with mitre joins (a right-angle corner
        # moves by node_off along both adjacent outward normals). Concave vertices never lie on a shortest path.
        self.nodes = [
            tuple(T_OUTLINE[i] + node_off * (_EDGE_NORMAL[i - 1] + _EDGE_NORMAL[i]))
            for i in range(_N_EDGES)
            if not _VERTEX_CONCAVE[i]
        ]

    def to_world(self, p: tuple[float, float]) -> tuple[float, float]:
        """Local (block frame) point -> world point."""
        return (self.x + self.c * p[0] - self.s * p[1], self.y + self.s * p[0] + self.c * p[1])

    def to_local(self, p: tuple[float, float]) -> tuple[float, float]:
        """World point -> local (block frame) point."""
        dx, dy = p[0] - self.x, p[1] - self.y
        return (self.c * dx + self.s * dy, -self.s * dx + self.c * dy)

    def visible(self, p: tuple[float, float], q: tuple[float, float]) -> bool:
        """Whether the local segment p-q stays out of the (open) buffered T."""
        return not any(_segment_enters_box(p, q, b) for b in self.check_boxes)

    def retreat(self, p: tuple[float, float]) -> tuple[float, float] | None:
        """Shortest axis-aligned (local frame) move out of the node buffer, or None if p is already outside.

        The agent ends every push touching the T; it has to back off before a path around the T can start.
        """
        if not any(_inside_box(p, b) for b in self.node_boxes):
            return None
        best = None
        for ux, uy in ((1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)):
            t, q = 0.0, p
            while True:  # walk along the axis until outside both boxes (at most two hops)
                inside = [b for b in self.node_boxes if _inside_box(q, b)]
                if not inside:
                    break
                t += max(_box_exit_distance(q, (ux, uy), b) for b in inside) + 1.0
                q = (p[0] + t * ux, p[1] + t * uy)
            if best is None or t < best[0]:
                best = (t, q)
        return best[1]

    def shortest_path(self, start: tuple[float, float], goal: tuple[float, float]) -> list[tuple[float, float]]:
        """Shortest collision-free local path start -> goal (excluding start) on the visibility graph."""
        pts = [start, goal, *self.nodes]
        n = len(pts)
        dist = [math.inf] * n
        prev = [-1] * n
        dist[0] = 0.0
        heap = [(0.0, 0)]
        while heap:
            d, i = heapq.heappop(heap)
            if i == 1:
                break
            if d > dist[i]:
                continue
            for j in range(1, n):
                if j == i:
                    continue
                nd = d + math.dist(pts[i], pts[j])
                if nd < dist[j] and self.visible(pts[i], pts[j]):
                    dist[j], prev[j] = nd, i
                    heapq.heappush(heap, (nd, j))
        if prev[1] < 0:  # defensive: no visible route (not seen in practice); go straight
            return [goal]
        path, i = [], 1
        while i != 0:
            path.append(pts[i])
            i = prev[i]
        return path[::-1]


def _grow_boxes(d: float) -> tuple[tuple[float, float, float, float], ...]:
    """The T's boxes buffered by d with mitre joins."""
    return tuple((x0 - d, y0 - d, x1 + d, y1 + d) for x0, y0, x1, y1 in T_BOXES)


def _inside_box(p: tuple[float, float], b: tuple[float, float, float, float]) -> bool:
    """Strictly inside an axis-aligned box."""
    return b[0] < p[0] < b[2] and b[1] < p[1] < b[3]


def _box_exit_distance(p: tuple[float, float], u: tuple[float, float], b: tuple[float, float, float, float]) -> float:
    """Distance from p (inside box b) to b's boundary along the axis direction u."""
    if u[0] > 0:
        return b[2] - p[0]
    if u[0] < 0:
        return p[0] - b[0]
    if u[1] > 0:
        return b[3] - p[1]
    return p[1] - b[1]


def _segment_enters_box(p: tuple[float, float], q: tuple[float, float], b: tuple[float, float, float, float]) -> bool:
    """Liang-Barsky clip: whether segment p-q has a part of positive length strictly inside box b."""
    dx, dy = q[0] - p[0], q[1] - p[1]
    t0, t1 = 0.0, 1.0
    for den, num in ((-dx, p[0] - b[0]), (dx, b[2] - p[0]), (-dy, p[1] - b[1]), (dy, b[3] - p[1])):
        if den == 0.0:
            if num <= 0.0:
                return False
        elif den < 0.0:
            t0 = max(t0, num / den)
        else:
            t1 = min(t1, num / den)
    return t1 - t0 > 1e-9


def _resample(points: list[tuple[float, float]], step: float) -> list[tuple[float, float]]:
    """Targets every `step` px along a polyline (excluding its first point, ending exactly at its last)."""
    seg = [math.dist(a, b) for a, b in zip(points, points[1:])]
    total = sum(seg)
    if total <= 1e-9:
        return []
    n = math.ceil(total / step - 1e-9)
    out, i, acc = [], 0, 0.0
    for k in range(1, n + 1):
        s = min(k * step, total)
        while i < len(seg) - 1 and acc + seg[i] < s:
            acc += seg[i]
            i += 1
        f = 0.0 if seg[i] == 0.0 else min((s - acc) / seg[i], 1.0)
        a, b = points[i], points[i + 1]
        out.append((a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1])))
    return out


def _to_action_grid(targets: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Clips targets to the action box [0, 512] and rounds them to float32 values (exact float32 replay)."""
    arr = np.clip(np.asarray(targets, dtype=np.float64).reshape(-1, 2), 0.0, 512.0).astype(np.float32)
    return [(float(x), float(y)) for x, y in arr]


class PushTExpert:
    """Push-primitive planning expert for gym-pusht's PushTEnv (see the module docstring for the algorithm).

    `sim` arguments are the unwrapped `gym_pusht.envs.pusht.PushTEnv` after `reset`; the expert reads its
    true state (agent and block velocities included) and its `goal_pose`. Attributes: `config`, `rng` (the
    planner RNG) and `n_plans` (primitives planned since the last reset).
    """

    def __init__(self, config: PushTExpertConfig | None = None, seed: int = 0):
        self.config = config or PushTExpertConfig()
        if self.config.entry_gap < self.config.clearance:
            raise ValueError("entry_gap must be >= clearance (the straight-in must start outside the node buffer)")
        self.reset(seed)

    def reset(self, seed: int) -> None:
        """Starts a new episode: new planner RNG `numpy.random.default_rng(seed)`, empty target queue."""
        self.rng = np.random.default_rng(seed)
        self._queue: deque[tuple[float, float]] = deque()
        self.n_plans = 0

    def act(self, sim: Any) -> np.ndarray:
        """Next absolute target (2,), float64; plans a new primitive from the true state when the queue is empty."""
        if not self._queue:
            self.plan(sim)
        return np.array(self._queue.popleft(), dtype=np.float64)

    def plan(self, sim: Any) -> np.ndarray:
        """Plans the next primitive from sim's true state; returns its (k, 2) targets and queues them for act()."""
        cfg = self.config
        model = _PlanningModel(sim)
        state = _read_state(sim)
        frame = _Frame(state.block_pose, next(iter(sim.agent.shapes)).radius, cfg.clearance)
        goal_vertices = _outline_world(tuple(float(v) for v in sim.goal_pose))

        scored = [(self._screen(model, frame, state, p, goal_vertices), p) for p in self._sample(cfg.n_screen)]
        elite = min(scored, key=lambda sp: sp[0])[1]
        scored += [(self._screen(model, frame, state, p, goal_vertices), p) for p in self._perturb(elite, frame.r)]
        scored.sort(key=lambda sp: sp[0])

        best_key, best_targets = None, None
        for _, prim in scored[: cfg.top_k]:
            targets = _to_action_grid(self._full_sequence(frame, state.agent_pos, prim))
            key, n_used = self._evaluate(model, state, targets, goal_vertices, sim.success_threshold)
            if best_key is None or key < best_key:
                best_key, best_targets = key, targets[:n_used]
        self._queue = deque(best_targets)
        self.n_plans += 1
        return np.array(best_targets, dtype=np.float64)

    # --- sampling -------------------------------------------------------------------------------------------

    def _sample(self, n: int) -> list[_Primitive]:
        """n random primitives (vectorised draws from the planner RNG)."""
        cfg, rng = self.config, self.rng
        edges = rng.integers(0, _N_EDGES, n)
        us = rng.random(n)
        tilts = np.clip(rng.normal(0.0, cfg.tilt_std, n), -cfg.tilt_max, cfg.tilt_max)
        lo, hi = cfg.push_length
        lengths = np.exp(rng.uniform(math.log(lo), math.log(hi), n))
        speeds = rng.uniform(*cfg.push_speed, n)
        return [_Primitive(*row) for row in zip(edges.tolist(), us.tolist(), tilts.tolist(), lengths.tolist(),
                                                speeds.tolist())]

    def _perturb(self, elite: _Primitive, radius: float) -> list[_Primitive]:
        """CEM step: Gaussian perturbations of the elite on the same edge, clipped to the sampling ranges."""
        cfg, rng, n = self.config, self.rng, self.config.n_refine
        usable = max(_EDGE_LEN[elite.edge] - self._concave_margins(elite.edge, radius).sum(), 1.0)
        us = np.clip(elite.u + rng.normal(0.0, cfg.refine_pos_std / usable, n), 0.0, 1.0)
        tilts = np.clip(elite.tilt + rng.normal(0.0, cfg.refine_tilt_std, n), -cfg.tilt_max, cfg.tilt_max)
        lengths = np.clip(elite.length * np.exp(rng.normal(0.0, cfg.refine_log_length_std, n)), *cfg.push_length)
        speeds = np.clip(elite.speed + rng.normal(0.0, cfg.refine_speed_std, n), *cfg.push_speed)
        return [_Primitive(elite.edge, *row) for row in zip(us.tolist(), tilts.tolist(), lengths.tolist(),
                                                             speeds.tolist())]

    # --- primitive geometry ---------------------------------------------------------------------------------

    def _concave_margins(self, edge: int, radius: float) -> np.ndarray:
        """Length kept free at each end of an edge: agent radius + clearance next to a concave corner.

        With this margin the agent fits beside the other box of the T, and the straight-in ray starts outside
        the path planner's obstacle (the T is "normal-visible": every edge's outward normal ray is free).
        """
        m = radius + self.config.clearance
        return np.array([m if _VERTEX_CONCAVE[edge] else 0.0, m if _VERTEX_CONCAVE[(edge + 1) % _N_EDGES] else 0.0])

    def _push_geometry(self, frame: _Frame, prim: _Primitive) -> tuple[tuple[float, float], ...]:
        """Local points of a primitive: straight-in entry, push start (agent at rest) and push end."""
        cfg, r = self.config, frame.r
        m0, m1 = self._concave_margins(prim.edge, r)
        along = m0 + prim.u * (_EDGE_LEN[prim.edge] - m0 - m1)
        ax, ay = _EDGE_A[prim.edge]
        tx, ty = _EDGE_DIR[prim.edge]
        nx, ny = _EDGE_NORMAL[prim.edge]
        cx, cy = ax + along * tx, ay + along * ty
        ct, st = math.cos(prim.tilt), math.sin(prim.tilt)
        dx, dy = -(ct * nx - st * ny), -(st * nx + ct * ny)  # inward normal rotated by the tilt
        entry = (cx + (r + cfg.entry_gap) * nx, cy + (r + cfg.entry_gap) * ny)
        start = (cx + (r + cfg.push_gap) * nx, cy + (r + cfg.push_gap) * ny)
        travel = cfg.push_gap + prim.length
        return entry, start, (start[0] + travel * dx, start[1] + travel * dy)

    def _full_sequence(self, frame: _Frame, agent_pos: tuple[float, float],
                       prim: _Primitive) -> list[tuple[float, float]]:
        """World targets: retreat if needed -> path around the T -> straight in -> settle -> push."""
        cfg = self.config
        entry, start, end = self._push_geometry(frame, prim)
        here = frame.to_local(agent_pos)
        path = [here]
        back = frame.retreat(here)
        if back is not None:
            path.append(back)
        path += frame.shortest_path(path[-1], entry)
        world = [frame.to_world(p) for p in path]
        start_w, end_w = frame.to_world(start), frame.to_world(end)
        return (
            _resample(world, cfg.approach_speed)
            + _resample([world[-1], start_w], cfg.entry_speed)
            + [start_w] * cfg.settle_steps
            + _resample([start_w, end_w], prim.speed)
        )

    # --- rollouts -------------------------------------------------------------------------------------------

    def _screen(self, model: _PlanningModel, frame: _Frame, state: _State, prim: _Primitive,
                goal_vertices: list[tuple[float, float]]) -> float:
        """Push-only rollout from rest at the push start; keypoint error + step penalty (inf if unreachable)."""
        _, start, end = self._push_geometry(frame, prim)
        start_w = frame.to_world(start)
        if not (0.0 <= start_w[0] <= 512.0 and 0.0 <= start_w[1] <= 512.0):
            return math.inf  # behind a wall / outside the action box: the agent cannot get there
        targets = _to_action_grid(_resample([start_w, frame.to_world(end)], prim.speed))
        model.load(_State(start_w, (0.0, 0.0), state.block_pose, (0.0, 0.0), 0.0))
        for tx, ty in targets:
            model.step(tx, ty)
        return _keypoint_error(model.block_pose(), goal_vertices) + self.config.step_penalty * len(targets)

    def _evaluate(self, model: _PlanningModel, state: _State, targets: list[tuple[float, float]],
                  goal_vertices: list[tuple[float, float]], threshold: float) -> tuple[tuple[int, float], int]:
        """Full rollout from the true state. Returns a sort key and the number of targets to execute.

        Crossing the success threshold at step k ends the episode in the env, so such a candidate is kept only
        up to k and ranks before every non-crossing one (earliest first).
        """
        cfg = self.config
        model.load(state)
        for k, (tx, ty) in enumerate(targets, start=1):
            model.step(tx, ty)
            err = _keypoint_error(model.block_pose(), goal_vertices)
            if err < cfg.coverage_check_error and model.coverage() > threshold:
                return (0, float(k)), k
        return (1, err + cfg.step_penalty * len(targets)), len(targets)  # push targets are never empty


def physics_env(env: Any) -> Any:
    """The gym-pusht PushTEnv behind `env`: gym-pusht's env (wrapped or not) or fm_policy.envs.PushTEnv (`.sim`)."""
    base = env.unwrapped
    return getattr(base, "sim", base)


def run_expert_episode(sim_env: Any, env_seed: int, planner_seed: int, max_steps: int = 300,
                       config: PushTExpertConfig | None = None) -> dict[str, Any]:
    """Runs one expert episode on a Push-T env (see physics_env) and returns what a demo needs.

    Returns a dict with `actions` (T, 2) float64 targets, `states` (T, 5) state observations before each action
    (obs_type independent), `success`, `steps` (T), `coverage` (final), `wall_time` (s), `n_primitives`,
    `env_seed` and `planner_seed`.
    """
    t0 = time.perf_counter()
    sim_env.reset(seed=env_seed)
    sim = physics_env(sim_env)
    expert = PushTExpert(config, seed=planner_seed)
    actions, states = [], []
    success, coverage = False, float(sim._get_coverage())
    for _ in range(max_steps):
        states.append(_state_vector(sim))
        action = expert.act(sim)
        actions.append(action)
        _, _, terminated, truncated, info = sim_env.step(action)
        coverage = float(info["coverage"])
        if terminated or truncated:
            success = bool(info["is_success"])
            break
    return {
        "actions": np.array(actions, dtype=np.float64).reshape(-1, 2),
        "states": np.array(states, dtype=np.float64).reshape(-1, 5),
        "success": success,
        "steps": len(actions),
        "coverage": coverage,
        "wall_time": time.perf_counter() - t0,
        "n_primitives": expert.n_plans,
        "env_seed": env_seed,
        "planner_seed": planner_seed,
    }


def run_expert_episode_with_retries(sim_env: Any, env_seed: int, planner_seed: int, max_retries: int = 2,
                                    max_steps: int = 300, config: PushTExpertConfig | None = None) -> dict[str, Any]:
    """run_expert_episode, retried on failure with planner seeds retry_planner_seed(planner_seed, 1..max_retries).

    Returns the first successful attempt (or the last one) with `attempts` (number run) and `total_wall_time`.
    """
    total = 0.0
    for attempt in range(max_retries + 1):
        result = run_expert_episode(sim_env, env_seed, retry_planner_seed(planner_seed, attempt), max_steps, config)
        total += result["wall_time"]
        if result["success"]:
            break
    result.update(attempts=attempt + 1, total_wall_time=total)
    return result
