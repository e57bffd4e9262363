"""Inference scheduling of the policy server: a bounded, fair, deadline-aware queue in front of the model.

What a shared robot-policy server needs so that no client can stall the others:

- **Bounded**: at most `max_queue` requests wait (all connections together); one more is refused at once with
  `Busy` (the client gets a `busy` error it can act on) instead of waiting behind an ever longer queue. When the
  queue is full, the refused request is the costliest one (then the one furthest ahead of its fair share, below),
  which may be a waiting request of a greedier client rather than the newcomer's.
- **Fair**: start-time fair queueing weighted by cost. Each connection has a virtual clock that advances by the
  network evaluations (NFE) its requests cost; the waiting request with the earliest virtual start runs next. A
  client that asks for 16x the work gets served 16x less often, and a new connection starts at the current clock
  (no credit for time it was away).
- **Preemptible expensive work**: requests costing more than `heavy_above` NFE (more than the server's default
  request), and requests the caller marks `background` (the server does so for a client that sends its next
  request before it has its reply: pipelining, flooding) run on a second lane with its own copy of the policy. Before every network evaluation that lane waits
  while any cheaper request is queued or running, so a well-behaved client waits for at most one network call of
  an abusive one, not for its whole 128-step solve. Only one lane computes at a time (the cheap lane also waits for
  the expensive lane's current network call to finish), so the two never compete for the CPU, and since each lane
  owns its own policy object, neither ever enters a model that another thread is inside (DDPM schedulers keep
  per-solve state).
- **Cancellable**: a job whose deadline passed or whose client gave up is dropped from the queue, and a running
  one is stopped before its next network evaluation (`Cancelled` raised inside the forward pre-hook).

The lanes call `run_light(jobs)` / `run_heavy(job)` given by the server; each returns one result per job, or an
exception instance for a job that failed alone (e.g. non-finite actions).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Busy", "Cancelled", "Job", "WorkQueue"]


class Busy(RuntimeError):
    """The queue holds `max_queue` requests already."""


class Cancelled(RuntimeError):
    """The job was cancelled (deadline passed, client gone, or the server is stopping)."""


@dataclass(eq=False)
class Job:
    request: Any  # InferRequest: .num_steps, .solver
    owner: Any  # the connection; WorkQueue keeps its virtual clock in `owner.vfinish`
    cost: int  # network evaluations
    deadline: float  # time.monotonic() by which it must be answered
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    future: Future = field(default_factory=Future)
    tag: float = 0.0  # virtual start time (fair queueing)
    seq: int = 0
    heavy: bool = False  # runs on the preemptible lane (set by submit)
    background: bool = False  # the caller asks for the preemptible lane whatever the cost (e.g. a pipelining client)
    cancelled: bool = False
    preemptions: int = 0


class _Context:
    """Per-lane state read by the forward hooks (one per lane thread, stored in a thread-local)."""

    def __init__(self, jobs: list[Job], heavy: bool) -> None:
        self.jobs, self.heavy = jobs, heavy


class WorkQueue:
    """See the module docstring. `start(modules)` installs the hooks and starts the lanes; `stop()` ends them."""

    def __init__(self, run_light: Callable[[list[Job]], list[Any]], run_heavy: Callable[[Job], Any] | None,
                 max_queue: int, max_batch: int = 1, heavy_above: int | None = None,
                 count: Callable[[str], None] | None = None) -> None:
        self.run_light, self.run_heavy = run_light, run_heavy
        self.max_queue, self.max_batch = int(max_queue), int(max_batch)
        self.heavy_above = heavy_above if run_heavy is not None else None
        self.count = count or (lambda key: None)
        self.cond = threading.Condition()
        self.light: list[Job] = []
        self.heavy: list[Job] = []
        self.vtime = 0.0
        self.seq = 0
        self.light_running = False
        self.heavy_in_call = False
        self.stopping = False
        self._local = threading.local()
        self._threads: list[threading.Thread] = []
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------ submitting (event loop thread)
    def submit(self, job: Job) -> Job:
        with self.cond:
            if self.stopping:
                raise Cancelled("the server is stopping")
            tag = max(self.vtime, float(getattr(job.owner, "vfinish", 0.0)))
            if len(self.light) + len(self.heavy) >= self.max_queue:
                # full: the costliest waiting request (of those equally costly, the one furthest ahead of its fair
                # share) is refused, the newcomer's own if that is it: costly clients cannot push cheap ones out
                worst = max(self.light + self.heavy, key=lambda j: (j.cost, j.tag, j.seq))
                if (worst.cost, worst.tag) <= (job.cost, tag):
                    raise Busy(f"{self.max_queue} requests are already waiting for the model")
                (self.heavy if worst.heavy else self.light).remove(worst)
                worst.owner.vfinish -= worst.cost
                self.count("busy_displaced")
                if not worst.future.done():
                    worst.future.set_exception(Busy(f"{self.max_queue} requests are waiting for the model, and "
                                                    "this client has had more than its share"))
            job.tag = tag
            job.owner.vfinish = job.tag + job.cost
            self.seq += 1
            job.seq = self.seq
            job.heavy = self.heavy_above is not None and (job.cost > self.heavy_above or job.background)
            (self.heavy if job.heavy else self.light).append(job)
            self.cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a waiting job, or stop a running one before its next network evaluation."""
        with self.cond:
            job.cancelled = True
            for pending in (self.light, self.heavy):
                if job in pending:
                    pending.remove(job)
            self.cond.notify_all()
        if not job.future.done():
            job.future.set_exception(Cancelled("cancelled"))

    def pending(self) -> dict[str, int]:
        with self.cond:
            return {"light": len(self.light), "heavy": len(self.heavy)}

    # ------------------------------------------------------------------ hooks (lane threads)
    def _pre_hook(self, module: Any, args: Any) -> None:
        ctx: _Context | None = getattr(self._local, "ctx", None)
        if ctx is None:
            return  # a call from some other thread (in-process use of the same policy): not ours to schedule
        if all(job.cancelled for job in ctx.jobs):
            raise Cancelled("cancelled before a network evaluation")
        if not ctx.heavy:
            return
        job = ctx.jobs[0]
        with self.cond:
            paused = False
            while (self.light or self.light_running) and not job.cancelled:
                if not paused:
                    paused = True
                    job.preemptions += 1
                    self.count("preempted")
                self.cond.wait(0.25)
            if job.cancelled:
                raise Cancelled("cancelled while paused")
            self.heavy_in_call = True

    def _post_hook(self, module: Any, args: Any, output: Any) -> None:
        ctx: _Context | None = getattr(self._local, "ctx", None)
        if ctx is not None and ctx.heavy:
            with self.cond:
                self.heavy_in_call = False
                self.cond.notify_all()

    # ------------------------------------------------------------------ lanes
    def _pop(self, pending: list[Job], advance: bool = True) -> Job:
        job = min(pending, key=lambda j: (j.tag, j.seq))
        pending.remove(job)
        if advance:  # the clock follows the cheap lane: a paused costly job is not "in service"
            self.vtime = max(self.vtime, job.tag)
        return job

    def _light_lane(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.light:
                    self.cond.wait()
                if not self.light:
                    return
                first = self._pop(self.light)
                batch = [first]
                key = (first.request.num_steps, first.request.solver)
                for job in sorted(self.light, key=lambda j: (j.tag, j.seq)):
                    if len(batch) >= self.max_batch:
                        break
                    if (job.request.num_steps, job.request.solver) == key:
                        self.light.remove(job)
                        batch.append(job)
                self.light_running = True
                while self.heavy_in_call:  # the expensive lane finishes its current network call, then pauses
                    self.cond.wait()
            try:
                self._run(batch, heavy=False)
            finally:
                with self.cond:
                    self.light_running = False
                    self.cond.notify_all()

    def _heavy_lane(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.heavy:
                    self.cond.wait()
                if not self.heavy:
                    return
                job = self._pop(self.heavy, advance=False)
            try:
                self._run([job], heavy=True)
            finally:
                with self.cond:
                    self.heavy_in_call = False  # also when the network raised between the two hooks
                    self.cond.notify_all()

    def _run(self, jobs: list[Job], heavy: bool) -> None:
        live = [job for job in jobs if not job.cancelled and not job.future.done()]
        if not live:
            return
        started = time.perf_counter()
        for job in live:
            job.started = started
        self._local.ctx = _Context(live, heavy)
        try:
            assert self.run_heavy is not None or not heavy
            results = [self.run_heavy(live[0])] if heavy else self.run_light(live)  # type: ignore[misc]
        except BaseException as exc:  # noqa: BLE001 - handed to every job of the batch
            results = [exc] * len(live)
        finally:
            self._local.ctx = None
        for job, result in zip(live, results, strict=True):
            if job.future.done():
                continue
            with contextlib.suppress(InvalidStateError):  # cancelled concurrently
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    # ------------------------------------------------------------------ lifecycle
    def start(self, modules: list[Any]) -> None:
        """Hook the network modules called once per evaluation (pause and cancel points); start the lanes."""
        for module in modules:
            if module is not None:
                self._hooks.append(module.register_forward_pre_hook(self._pre_hook))
                self._hooks.append(module.register_forward_hook(self._post_hook))
        lanes = [("light", self._light_lane)] + ([("heavy", self._heavy_lane)] if self.run_heavy else [])
        for name, target in lanes:
            thread = threading.Thread(target=target, name=f"fm-policy-{name}-lane", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Refuse new jobs, cancel the waiting ones, let running ones finish, join the lanes, remove the hooks."""
        with self.cond:
            self.stopping = True
            waiting = self.light + self.heavy
            self.light, self.heavy = [], []
            self.cond.notify_all()
        for job in waiting:
            if not job.future.done():
                job.future.set_exception(Cancelled("the server is stopping"))
        for thread in self._threads:
            thread.join(timeout_s)
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
