"""Websocket policy server (`fm-policy serve`): one loaded policy, many controllers, msgpack frames, no pickle.

Design (after openpi's `WebsocketPolicyServer`, with the failure modes its users hit closed off):

- Binds to 127.0.0.1 unless told otherwise: a robot policy should not be reachable from the network by accident.
  With `api_key` set, the websocket handshake must carry `Authorization: Bearer <key>` (or openpi's
  `Authorization: Api-Key <key>`, or `X-API-Key`); a wrong or missing key is refused with HTTP 401 before any frame
  is exchanged, more than one credential header with 400, and an address that failed `auth_fail_limit` times within
  `auth_fail_window_s` with 429 until the window has passed. Keys are compared in constant time.
- Two request dialects (`protocol`): this package's `{"observation": {...}}` envelope, and openpi's flat
  observation map with bytes-key msgpack-numpy arrays, answered as `{"actions": ...}` so the unmodified
  `openpi_client` `WebsocketClientPolicy` and `ActionChunkBroker` work (`fm_policy.deploy.protocol`).
- Bounded work (`fm_policy.deploy.workqueue`): a request costs num_steps x evaluations per step (rk4: 4) network
  evaluations, at most `max_nfe`; at most `max_queue` requests wait (more get `busy`); waiting requests are served
  in cost-weighted fair order across connections; requests costlier than the default, and those of a client that
  sends its next request before reading its reply (flooding), run preemptibly on a copy of the policy; every
  request is answered or refused within `request_timeout_s` (`deadline_exceeded`). Frames are decoded and validated
  on a thread pool with a bounded decoder, never on the event loop. Each connection buffers at most
  `max_queued_frames` frames (then TCP backpressure), and one that sends nothing for `idle_timeout_s` is closed; when `max_clients` are connected, the longest-idle one (idle > `idle_evict_s`) makes room for a new one.
- Checked outputs: a chunk with NaN/inf is never sent as actions (`non_finite_output` error); actions outside the
  training range are clamped (`action_range="clamp"`, default) or only counted (`"flag"`): the reply's `clamped`
  says how many values were outside, the metadata's `action_range_mode` which of the two the server does.
- Error replies and log lines never echo received data at length; bad-request INFO lines are limited per connection.
- Every request is validated (`fm_policy.deploy.protocol.validate_request`): keys, shapes, dtypes, finite values,
  sampler settings. A bad request gets an error frame that names the problem and the connection stays usable;
  undecodable bytes and text frames get an error frame too. Frames larger than `max_message_bytes` are refused by
  the websocket layer itself (close code 1009) before they are buffered, so one client cannot exhaust memory.
- Inference runs on worker threads, off the event loop: a slow call does not block `GET /healthz`, handshakes or
  other clients' frames, and the model is never entered by two threads at once (requests from concurrent clients
  queue for it; the time spent queueing is reported as `queue_ms`). With `max_batch > 1`, requests that queue at
  the same time with the same sampler settings run as one batch: several controllers then cost little more than
  one. Off by default, because a batched float computation is not bit-identical to the same request run alone,
  and exact replays (served == in process) are worth more to most users than throughput.
- Each call's latency is measured (`server_timing` in the reply, per-call DEBUG log lines, an INFO summary with
  p50/p99 every `log_every` calls, and `GET /stats`).
- Graceful shutdown (SIGINT/SIGTERM, or `stop()`): stop accepting connections, let in-flight inferences finish and
  be answered (up to `shutdown_grace_s`), answer new requests with a `shutting_down` error, then close with 1001.
- A client that disconnects mid-request costs nothing but the wasted inference: the reply is dropped and counted.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import http
import json
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from websockets.asyncio.server import Request, Response, Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from fm_policy.deploy.codec import CodecError, packb, short_repr, unpackb
from fm_policy.deploy.protocol import (
    ACTION_RANGE_MODES,
    DIALECTS,
    InferRequest,
    PolicySpec,
    RequestError,
    check_actions,
    detect_dialect,
    error_frame,
    spec_from_policy,
    validate_request,
)
from fm_policy.deploy.workqueue import Busy, Cancelled, Job, WorkQueue

__all__ = ["PolicyServer", "ServerConfig", "ServerThread", "check_actions"]

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger("fm_policy.deploy.server")

BAD_REQUEST_LOG_LINES = 5  # INFO lines about bad requests per connection; the rest are counted in /stats only


def _copy_policy(policy: Any) -> Any:
    """A deep copy of the policy without the forward hooks other servers may have put on it; None if impossible."""
    memo: dict[int, Any] = {}
    for module in policy.modules():
        memo[id(module._forward_pre_hooks)] = type(module._forward_pre_hooks)()
        memo[id(module._forward_hooks)] = type(module._forward_hooks)()
    try:
        return copy.deepcopy(policy, memo).eval()
    except Exception as exc:  # noqa: BLE001 - preemption is an optimisation; serve without it
        log.warning("cannot copy the policy for the preemptible lane (%s); costly requests run in line", exc)
        return None


class _Conn:
    """Per-connection state: activity for the idle limits, fair-queue clock, seeded noise, log budget."""

    _ids = iter(range(1, 2**62))

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.id = next(self._ids)
        self.peer = ws.remote_address
        self.last_active = time.monotonic()
        self.busy = False
        self.vfinish = 0.0
        self.generator: Any = None
        self.bad_logged = 0


class _AuthThrottle:
    """Failed handshakes per remote address in a sliding window; a full window locks the address out (429)."""

    def __init__(self, limit: int, window_s: float, max_addresses: int = 10000) -> None:
        self.limit, self.window_s, self.max_addresses = limit, window_s, max_addresses
        self.failures: dict[str, deque[float]] = {}

    def retry_after(self, address: str) -> float:
        """Seconds until `address` may try again (0: it may now)."""
        times = self.failures.get(address)
        if not times:
            return 0.0
        now = time.monotonic()
        while times and now - times[0] > self.window_s:
            times.popleft()
        return self.window_s - (now - times[0]) if len(times) >= self.limit else 0.0

    def fail(self, address: str) -> int:
        if address not in self.failures and len(self.failures) >= self.max_addresses:
            now = time.monotonic()
            for key in [k for k, v in self.failures.items() if not v or now - v[-1] > self.window_s]:
                del self.failures[key]
            if len(self.failures) >= self.max_addresses:  # still full: forget the oldest address
                del self.failures[next(iter(self.failures))]
        times = self.failures.setdefault(address, deque(maxlen=self.limit))
        times.append(time.monotonic())
        return len(times)


@dataclass
class ServerConfig:
    """Network, safety and logging settings of `PolicyServer` (`fm-policy serve` flags map onto these)."""

    host: str = "127.0.0.1"  # localhost only by default; 0.0.0.0 exposes the robot policy to the network
    port: int = 8000  # 0 picks a free port (tests, benchmarks)
    api_key: str | None = None
    max_message_bytes: int | None = None  # None: twice a full float64 request of this policy + 64 KiB (<= 64 MiB)
    max_clients: int = 32
    num_steps: int | None = None  # default sampler steps (None: the policy's num_inference_steps)
    max_num_steps: int = 128  # upper bound a request may ask for (DDPM-100 fits)
    max_nfe: int = 128  # most network evaluations one request may cost (steps x evaluations per step; rk4: 4)
    max_queue: int = 32  # requests waiting for the model, all connections together; one more gets `busy`
    request_timeout_s: float = 5.0  # answered or refused (`deadline_exceeded`) by then; its work is cancelled
    preempt: bool = True  # requests costlier than the default run on a policy copy, paused while cheaper ones wait
    max_batch: int = 1  # >1: requests queued at the same time (same steps/solver) run as one batch
    control_hz: float = 10.0  # advertised to clients; the server itself is not rate-limited
    protocol: str = "auto"  # auto: each request answered in its own dialect | fm | openpi
    action_range: str = "clamp"  # clamp | flag | none: actions outside the training range
    seed: int | None = None  # noise of requests that send none: per connection, torch.Generator().manual_seed(seed)
    idle_timeout_s: float | None = 120.0  # close a connection that sends no request for this long
    idle_evict_s: float = 5.0  # with max_clients connected, a connection idle this long is closed for a newcomer
    max_queued_frames: int = 2  # received frames buffered per connection before the server stops reading it
    auth_fail_limit: int = 10  # failed handshakes per address within auth_fail_window_s before 429
    auth_fail_window_s: float = 60.0
    shutdown_grace_s: float = 5.0
    log_every: int = 100  # INFO latency summary every N inference calls (per-call lines are DEBUG)
    ping_interval_s: float | None = 20.0

    def __post_init__(self) -> None:
        if self.max_message_bytes is not None and self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes={self.max_message_bytes} is too small for any observation")
        if min(self.max_clients, self.max_num_steps, self.max_batch, self.max_nfe, self.max_queue,
               self.max_queued_frames, self.auth_fail_limit) < 1:
            raise ValueError("max_clients, max_num_steps, max_nfe, max_queue, max_batch, max_queued_frames and "
                             "auth_fail_limit must be >= 1")
        if not self.request_timeout_s > 0 or (self.idle_timeout_s is not None and not self.idle_timeout_s > 0):
            raise ValueError("request_timeout_s and idle_timeout_s must be positive")
        if self.protocol not in ("auto", *DIALECTS):
            raise ValueError(f"protocol must be one of {('auto', *DIALECTS)}, got {self.protocol!r}")
        if self.action_range not in ACTION_RANGE_MODES:
            raise ValueError(f"action_range must be one of {ACTION_RANGE_MODES}, got {self.action_range!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string (or None for no authentication)")


class _Stats:
    """Counters and a window of recent latencies (thread-safe: read from /stats while inference updates them)."""

    def __init__(self, window: int = 10000) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.infer_ms: deque[float] = deque(maxlen=window)
        self.total_ms: deque[float] = deque(maxlen=window)

    def record(self, infer_ms: float, total_ms: float) -> None:
        with self.lock:
            self.counts["ok"] += 1
            self.infer_ms.append(infer_ms)
            self.total_ms.append(total_ms)

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            out: dict[str, Any] = {"counts": dict(self.counts)}
            for name, values in (("infer_ms", self.infer_ms), ("total_ms", self.total_ms)):
                arr = np.asarray(values, dtype=np.float64)
                out[name] = ({"n": int(arr.size), "p50": float(np.percentile(arr, 50)),
                              "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean())} if arr.size else None)
        return out


class PolicyServer:
    """Serves one loaded policy (`fm_policy.policy.load_policy`) over websockets; see the module docstring."""

    def __init__(self, policy: Any, config: ServerConfig | None = None, model_name: str = "") -> None:
        from fm_policy.solvers import STAGES

        self.policy = policy.eval()
        self.config = cfg = config or ServerConfig()
        self.spec: PolicySpec = spec_from_policy(policy, cfg.num_steps, cfg.max_num_steps, cfg.control_hz, model_name)
        spec = self.spec
        spec.solver_nfe = {s: int(STAGES.get(s, 1)) for s in spec.solvers}  # DDPM / DDIM: one call per step
        spec.max_nfe = max(int(cfg.max_nfe), spec.request_nfe(spec.num_steps, spec.solver))  # the default always fits
        spec.action_range_mode = cfg.action_range
        spec.request_timeout_s = float(cfg.request_timeout_s)
        spec.dialects = list(DIALECTS) if cfg.protocol == "auto" else [cfg.protocol]
        if cfg.max_message_bytes is None:  # twice a full request in float64 (what openpi clients may send) + headers
            request_bytes = sum(4 * spec.n_obs_steps * math.prod(s) for s in spec.obs_shapes.values())
            request_bytes += 4 * spec.horizon * spec.action_dim
            self.max_message_bytes = min(2 * 2 * request_bytes + 64 * 1024, 64 * 1024 * 1024)
        else:
            self.max_message_bytes = int(cfg.max_message_bytes)
        self.stats = _Stats()
        self._metadata = packb(spec.to_metadata())
        self._default_nfe = spec.request_nfe(spec.num_steps, spec.solver)
        # a copy of the policy for the preemptible lane: its solver state (DDPM schedulers) is its own
        self._heavy_policy = _copy_policy(self.policy) if cfg.preempt and spec.max_nfe > self._default_nfe else None
        self._decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fm-policy-decode")
        self._queue: WorkQueue | None = None
        self._conns: dict[Any, _Conn] = {}
        self._auth = _AuthThrottle(cfg.auth_fail_limit, cfg.auth_fail_window_s)
        self._in_flight = 0
        self._draining = False
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None

    # ------------------------------------------------------------------ inference (lane threads)
    def _infer_on(self, policy: Any, reqs: list[InferRequest]) -> tuple[list[np.ndarray], float]:
        """Run `policy` on validated requests that share num_steps and solver, as one batch.

        Returns each request's actions from the current step on, and the ms the batch took. A request without
        noise gets fresh Gaussian noise when batched with one that has it (the policy takes all or none).
        """
        import torch

        device = policy.device
        # np.stack copies: arrays decoded from a frame are read-only views of it, which torch refuses to wrap
        obs = {k: torch.from_numpy(np.stack([r.observation[k] for r in reqs])).to(device) for k in self.spec.obs_shapes}
        noise = None
        if any(r.noise is not None for r in reqs):
            shape = (self.spec.horizon, self.spec.action_dim)
            noise = torch.from_numpy(np.stack([
                r.noise if r.noise is not None else np.random.standard_normal(shape).astype(np.float32) for r in reqs
            ])).to(device)
        start = time.perf_counter()
        with torch.inference_mode():
            chunk = policy.generate_chunk(obs, num_steps=reqs[0].num_steps, solver=reqs[0].solver, noise=noise)
        actions = chunk[:, self.spec.n_obs_steps - 1:].to("cpu", torch.float32).numpy()
        return list(actions), (time.perf_counter() - start) * 1e3

    def _infer_batch(self, reqs: list[InferRequest]) -> tuple[list[np.ndarray], float]:
        """The server's own policy on a batch (the cheap lane; tests slow it down by replacing this method)."""
        return self._infer_on(self.policy, reqs)

    def _finish(self, job: Job, actions: np.ndarray, infer_ms: float, batch: int) -> Any:
        """Output check of one job's actions, in the lane thread: (actions, clamped, timing) or the error."""
        try:
            checked, outside = check_actions(actions, self.spec, self.config.action_range)
        except RequestError as exc:
            return exc
        return checked, outside, {"infer_ms": infer_ms, "queue_ms": (job.started - job.enqueued) * 1e3,
                                  "batch": batch, "preempted": job.preemptions}

    def _run_light(self, jobs: list[Job]) -> list[Any]:
        actions, infer_ms = self._infer_batch([j.request for j in jobs])
        return [self._finish(j, a, infer_ms, len(jobs)) for j, a in zip(jobs, actions, strict=True)]

    def _run_heavy(self, job: Job) -> Any:
        (actions,), infer_ms = self._infer_on(self._heavy_policy, [job.request])
        return self._finish(job, actions, infer_ms, 1)

    # ------------------------------------------------------------------ websocket side (event loop)
    def _credential(self, request: Request) -> tuple[str | None, str | None]:
        """(the key the handshake presents, or None; a reason to refuse it with 400, or None)."""
        headers = request.headers
        given = headers.get_all("X-API-Key") + headers.get_all("Authorization")
        if len(given) > 1:
            return None, "send exactly one credential header (X-API-Key or Authorization), not several"
        if not given:
            return None, None
        value = given[0].strip()
        if headers.get_all("Authorization"):
            scheme, _, value = value.partition(" ")
            if scheme.lower() not in ("bearer", "api-key"):
                return None, None
            value = value.strip()
        return value, None

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """HTTP before the websocket upgrade: health and stats endpoints, authentication, connection limit."""
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.config.api_key is not None:
            address = str(connection.remote_address[0]) if connection.remote_address else "?"
            wait_s = self._auth.retry_after(address)
            if wait_s > 0:
                self.stats.count("auth_throttled")
                response = connection.respond(http.HTTPStatus.TOO_MANY_REQUESTS,
                                              f"too many failed attempts from this address; retry in {math.ceil(wait_s)} s\n")
                response.headers["Retry-After"] = str(math.ceil(wait_s))
                return response
            key, duplicate = self._credential(request)
            if duplicate is not None:
                self.stats.count("bad_auth_header")
                self._auth.fail(address)
                return connection.respond(http.HTTPStatus.BAD_REQUEST, duplicate + "\n")
            if key is None or not hmac.compare_digest(key.encode("utf-8", "replace"),
                                                      self.config.api_key.encode()):
                self.stats.count("unauthorized")
                failures = self._auth.fail(address)
                if failures == 1 or failures == self.config.auth_fail_limit:
                    log.warning("refused %s: missing or wrong API key%s", connection.remote_address,
                                " (address locked out for the window)" if failures >= self.config.auth_fail_limit
                                else "")
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
        if path == "/stats":
            return connection.respond(http.HTTPStatus.OK, json.dumps(self.stats_snapshot()) + "\n")
        if self._draining:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "server is shutting down\n")
        if len(connection.server.connections) >= self.config.max_clients and not self._evict_idle():
            self.stats.count("refused_busy")
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"server has its maximum of {self.config.max_clients} clients\n")
        return None

    def _evict_idle(self) -> bool:
        """Close the longest-idle connection (idle > idle_evict_s, nothing in flight) to make room; True if one."""
        now = time.monotonic()
        idle = [c for c in self._conns.values() if not c.busy and now - c.last_active > self.config.idle_evict_s]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.last_active)
        victim.busy = True  # not chosen twice
        self.stats.count("evicted_idle")
        log.info("closing idle client %s to make room for a new one", victim.peer)
        asyncio.ensure_future(victim.ws.close(1000, "idle while the server was full"))
        return True

    def stats_snapshot(self) -> dict[str, Any]:
        queued = self._queue.pending() if self._queue is not None else {"light": 0, "heavy": 0}
        return {**self.stats.snapshot(), "in_flight": self._in_flight, "queued": queued,
                "connections": len(self._conns), "draining": self._draining}

    def _parse(self, conn: _Conn, message: bytes) -> tuple[str, Any, InferRequest | RequestError]:
        """Decode and validate one frame (decode pool thread): (dialect, request_id, request or error)."""
        dialect, request_id = "fm", None
        try:
            try:
                decoded = unpackb(message)
            except CodecError as exc:
                raise RequestError(f"cannot decode request: {exc}", "bad_encoding") from None
            dialect = detect_dialect(decoded, self.spec)
            rid = decoded.get("request_id") if isinstance(decoded, dict) else None
            if isinstance(rid, str) and len(rid) <= 128 or isinstance(rid, int) and not isinstance(rid, bool) \
                    and -2**63 <= rid < 2**64:
                request_id = rid
            if dialect not in self.spec.dialects:
                raise RequestError(
                    f"this server speaks {self.spec.dialects[0]} only; "
                    + ("send {'observation': {key: array}}" if self.spec.dialects[0] == "fm"
                       else "send the observation map itself"), "bad_request")
            req = validate_request(decoded, self.spec, dialect)
            if req.noise is None and self.config.seed is not None:
                import torch

                if conn.generator is None:
                    conn.generator = torch.Generator().manual_seed(int(self.config.seed))
                req.noise = torch.randn((self.spec.horizon, self.spec.action_dim), generator=conn.generator).numpy()
            return dialect, request_id, req
        except RequestError as exc:
            return dialect, request_id, exc
        except Exception as exc:  # whatever a hostile frame triggers, it is a bad request
            log.debug("unexpected error validating a request", exc_info=True)
            return dialect, request_id, RequestError(f"malformed request ({type(exc).__name__})", "bad_request")

    def _encode_reply(self, dialect: str, reply: dict[str, Any]) -> bytes | str:
        if reply.get("type") == "error" and dialect == "openpi":
            return json.dumps(reply)  # openpi's client raises RuntimeError with a text frame's content
        if dialect == "openpi":
            reply = {k: v for k, v in reply.items() if k not in ("type", "num_steps", "solver")
                     and not (k == "request_id" and v is None)}
        return packb(reply, openpi=dialect == "openpi")

    def _refuse(self, conn: _Conn, dialect: str, exc: RequestError, request_id: Any) -> bytes | str:
        self.stats.count(f"error:{exc.code}")
        if conn.bad_logged < BAD_REQUEST_LOG_LINES:
            conn.bad_logged += 1
            suffix = "; further bad requests from this client are not logged" \
                if conn.bad_logged == BAD_REQUEST_LOG_LINES else ""
            log.info("bad request from %s (%s): %s%s", conn.peer, exc.code, short_repr(str(exc), 200), suffix)
        return self._encode_reply(dialect, error_frame(exc.code, str(exc), request_id))

    async def _reply(self, conn: _Conn, message: Any, pipelined: bool = False) -> tuple[bytes | str, Any]:
        """One request frame -> (one reply frame: actions or an error that says what is wrong, request id)."""
        received = time.perf_counter()
        if isinstance(message, str):
            return self._refuse(conn, "fm", RequestError("text frames are not accepted; send binary msgpack frames",
                                                         "bad_encoding"), None), None
        loop = asyncio.get_running_loop()
        dialect, request_id, req = await loop.run_in_executor(self._decode_pool, self._parse, conn, message)
        if not isinstance(req, RequestError) and self._draining:
            req = RequestError("server is shutting down; reconnect to another instance", "shutting_down")
        if isinstance(req, RequestError):
            return self._refuse(conn, dialect, req, request_id), request_id

        assert self._queue is not None
        job = Job(req, conn, self.spec.request_nfe(req.num_steps, req.solver),
                  deadline=time.monotonic() + self.config.request_timeout_s, background=pipelined)
        self._in_flight += 1
        try:
            try:
                self._queue.submit(job)
            except Busy as exc:
                return self._refuse(conn, dialect, RequestError(f"server busy: {exc}; retry shortly", "busy"),
                                    request_id), request_id
            except Cancelled:
                return self._refuse(conn, dialect, RequestError("server is shutting down", "shutting_down"),
                                    request_id), request_id
            try:
                actions, outside, timing = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)),
                                                                  timeout=self.config.request_timeout_s)
            except asyncio.TimeoutError:
                self._queue.cancel(job)
                return self._refuse(conn, dialect, RequestError(
                    f"not answered within request_timeout_s={self.config.request_timeout_s:g} s (server overloaded, "
                    f"or a request too costly for it); cancelled", "deadline_exceeded"), request_id), request_id
            except RequestError as exc:  # the output check refused the actions
                return self._refuse(conn, dialect, exc, request_id), request_id
            except Busy as exc:  # displaced from the full queue by a client with a smaller share
                return self._refuse(conn, dialect, RequestError(f"server busy: {exc}; retry shortly", "busy"),
                                    request_id), request_id
            except Cancelled:
                return self._refuse(conn, dialect, RequestError("server is shutting down", "shutting_down"),
                                    request_id), request_id
            except Exception as exc:  # noqa: BLE001 - a failure inside the model: no traceback to the client
                self.stats.count("error:internal")
                log.error("inference failed for request %s from %s: %s: %s", short_repr(request_id), conn.peer,
                          type(exc).__name__, short_repr(str(exc), 300))
                return self._encode_reply(dialect, error_frame("internal_error", f"inference failed ({type(exc).__name__})",
                                                               request_id)), request_id
        finally:
            self._in_flight -= 1
        total_ms = (time.perf_counter() - received) * 1e3
        self.stats.record(timing["infer_ms"], total_ms)
        if outside:
            self.stats.count("actions_out_of_range")
        log.debug("request %s from %s: %d steps %s, batch %d, infer %.2f ms, queue %.2f ms, total %.2f ms",
                  short_repr(request_id), conn.peer, req.num_steps, req.solver, timing["batch"], timing["infer_ms"],
                  timing["queue_ms"], total_ms)
        n_ok = self.stats.counts["ok"]
        if self.config.log_every and n_ok % self.config.log_every == 0:
            snap = self.stats.snapshot()["infer_ms"]
            log.info("%d inference calls; recent infer p50 %.2f ms, p99 %.2f ms", n_ok, snap["p50"], snap["p99"])
        reply = {"type": "actions", "actions": actions, "request_id": request_id, "num_steps": req.num_steps,
                 "solver": req.solver, "clamped": outside, "server_timing": {**timing, "total_ms": total_ms}}
        return self._encode_reply(dialect, reply), request_id

    async def _handler(self, ws: ServerConnection) -> None:
        conn = _Conn(ws)
        peer = conn.peer
        self._conns[ws] = conn
        self.stats.count("connections")
        log.info("client %s connected", peer)
        idle_s = self.config.idle_timeout_s
        try:
            await ws.send(self._metadata)
            while True:
                try:
                    message = await asyncio.wait_for(ws.recv(), timeout=idle_s)
                except asyncio.TimeoutError:
                    self.stats.count("closed_idle")
                    log.info("closing %s: no request for %g s", peer, idle_s)
                    await ws.close(1000, f"idle for {idle_s:g} s")
                    break
                conn.busy, conn.last_active = True, time.monotonic()
                # the next frame is already here: this client does not wait for its replies (pipelining, flooding),
                # so its requests run on the preemptible lane, behind everyone who does wait
                pipelined = len(getattr(getattr(ws, "recv_messages", None), "frames", ())) > 0
                if pipelined:
                    self.stats.count("pipelined")
                frame, request_id = await self._reply(conn, message, pipelined)
                conn.busy, conn.last_active = False, time.monotonic()
                try:
                    await ws.send(frame)
                except ConnectionClosed:
                    self.stats.count("dropped_reply_client_gone")
                    log.info("client %s left before its reply (request %s)", peer, short_repr(request_id))
                    raise
        except ConnectionClosed as exc:
            if (exc.rcvd is not None and exc.rcvd.code == 1009) or (exc.sent is not None and exc.sent.code == 1009):
                self.stats.count("error:message_too_big")
                log.info("closed %s: message larger than %d bytes", peer, self.max_message_bytes)
        finally:
            self._conns.pop(ws, None)
            log.info("client %s disconnected", peer)

    # ------------------------------------------------------------------ lifecycle
    async def run(self, ready: Callable[[int], None] | None = None) -> None:
        """Serve until `stop()` is called (or SIGINT/SIGTERM via `serve_forever`), then shut down gracefully."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        cfg = self.config
        heavy = self._heavy_policy
        self._queue = WorkQueue(self._run_light, self._run_heavy if heavy is not None else None, cfg.max_queue,
                                cfg.max_batch, heavy_above=self._default_nfe, count=self.stats.count)
        nets = [getattr(p, "net", None) for p in (self.policy, heavy) if p is not None]
        self._queue.start([n for n in nets if hasattr(n, "register_forward_pre_hook")])
        try:
            async with serve(self._handler, cfg.host, cfg.port, process_request=self._process_request,
                             max_size=self.max_message_bytes, max_queue=cfg.max_queued_frames, compression=None,
                             ping_interval=cfg.ping_interval_s, open_timeout=10, close_timeout=2,
                             logger=logging.getLogger("fm_policy.deploy.websockets")) as server:
                self.port = int(server.sockets[0].getsockname()[1])
                log.info("serving %s policy %s at ws://%s:%d (auth %s, dialects %s, max %d NFE per request, "
                         "timeout %g s)", self.spec.policy_type, self.spec.model or "", cfg.host, self.port,
                         "on" if cfg.api_key else "off", "+".join(self.spec.dialects), self.spec.max_nfe,
                         cfg.request_timeout_s)
                if ready is not None:
                    ready(self.port)
                await self._stop.wait()
                await self._drain(server)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self._queue.stop)
            self._decode_pool.shutdown(wait=True)
        log.info("server stopped")

    async def _drain(self, server: Server) -> None:
        self._draining = True
        deadline = time.monotonic() + self.config.shutdown_grace_s
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # let the last replies leave the socket buffers
        server.close(close_connections=True)
        await server.wait_closed()

    def stop(self) -> None:
        """Ask a running server to shut down (thread-safe)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def serve_forever(self, ready: Callable[[int], None] | None = None) -> None:
        """Blocking entry point for `fm-policy serve`: SIGINT/SIGTERM trigger the graceful shutdown."""
        import signal

        async def main() -> None:
            loop = asyncio.get_running_loop()
            task = asyncio.ensure_future(self.run(ready))
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, self.stop)
                except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
                    pass
            await task

        asyncio.run(main())


class ServerThread:
    """A `PolicyServer` on a background thread with its own event loop (tests, benchmarks, in-process examples).

        with ServerThread(PolicyServer(policy, ServerConfig(port=0))) as server:
            client = PolicyClient(server.url)
    """

    def __init__(self, server: PolicyServer, start_timeout_s: float = 30.0) -> None:
        self.server = server
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.start_timeout_s = start_timeout_s

    @property
    def url(self) -> str:
        host = self.server.config.host
        return f"ws://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.server.port}"

    def start(self) -> ServerThread:
        def target() -> None:
            try:
                asyncio.run(self.server.run(ready=lambda _: self._ready.set()))
            except BaseException as exc:  # noqa: BLE001 - re-raised by start() in the caller's thread
                self._error = exc
                self._ready.set()

        self._thread = threading.Thread(target=target, name="fm-policy-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout_s):
            raise TimeoutError(f"policy server did not start within {self.start_timeout_s} s")
        if self._error is not None:
            raise RuntimeError(f"policy server failed to start: {self._error}") from self._error
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful shutdown; calling it again (or after the server stopped) does nothing."""
        if self._thread is None or not self._thread.is_alive():
            return
        self.server.stop()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
