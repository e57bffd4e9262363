"""Websocket policy server (`fm-policy serve`): one loaded policy, many controllers, msgpack frames, no pickle.

Design (after openpi's `WebsocketPolicyServer`, with the failure modes its users hit closed off):

- Binds to 127.0.0.1 unless told otherwise: a robot policy should not be reachable from the network by accident.
  With `api_key` set, the websocket handshake must carry `Authorization: Bearer <key>` (or `X-API-Key`); a wrong or
  missing key is refused with HTTP 401 before any frame is exchanged. Keys are compared in constant time.
- Every request is validated (`fm_policy.deploy.protocol.validate_request`): keys, shapes, dtypes, finite values,
  sampler settings. A bad request gets an error frame that names the problem and the connection stays usable;
  undecodable bytes and text frames get an error frame too. Frames larger than `max_message_bytes` are refused by
  the websocket layer itself (close code 1009) before they are buffered, so one client cannot exhaust memory.
- Inference runs on one worker thread, off the event loop: a slow call does not block `GET /healthz`, handshakes or
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
import hmac
import http
import json
import logging
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

from fm_policy.deploy.codec import CodecError, packb, unpackb
from fm_policy.deploy.protocol import (
    InferRequest,
    PolicySpec,
    RequestError,
    error_frame,
    spec_from_policy,
    validate_request,
)

__all__ = ["PolicyServer", "ServerConfig", "ServerThread"]

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger("fm_policy.deploy.server")


@dataclass
class ServerConfig:
    """Network, safety and logging settings of `PolicyServer` (`fm-policy serve` flags map onto these)."""

    host: str = "127.0.0.1"  # localhost only by default; 0.0.0.0 exposes the robot policy to the network
    port: int = 8000  # 0 picks a free port (tests, benchmarks)
    api_key: str | None = None
    max_message_bytes: int = 4 * 1024 * 1024  # images of a few cameras fit; a runaway client does not
    max_clients: int = 32
    num_steps: int | None = None  # default sampler steps (None: the policy's num_inference_steps)
    max_num_steps: int = 128  # upper bound a request may ask for (DDPM-100 fits), so no client can stall the model
    max_batch: int = 1  # >1: requests queued at the same time (same steps/solver) run as one batch
    control_hz: float = 10.0  # advertised to clients; the server itself is not rate-limited
    shutdown_grace_s: float = 5.0
    log_every: int = 100  # INFO latency summary every N inference calls (per-call lines are DEBUG)
    ping_interval_s: float | None = 20.0

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes={self.max_message_bytes} is too small for any observation")
        if self.max_clients < 1 or self.max_num_steps < 1 or self.max_batch < 1:
            raise ValueError("max_clients, max_num_steps and max_batch must be >= 1")
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
        self.policy = policy.eval()
        self.config = config or ServerConfig()
        self.spec: PolicySpec = spec_from_policy(policy, self.config.num_steps, self.config.max_num_steps,
                                                 self.config.control_hz, model_name)
        self.stats = _Stats()
        self._metadata = packb(self.spec.to_metadata())
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fm-policy-infer")
        self._in_flight = 0
        self._requests: asyncio.Queue | None = None
        self._draining = False
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None

    # ------------------------------------------------------------------ inference (worker thread)
    def _infer_batch(self, reqs: list[InferRequest]) -> tuple[list[np.ndarray], float]:
        """Run the policy on validated requests that share num_steps and solver, as one batch.

        Returns each request's actions from the current step on, and the ms the batch took. A request without
        noise gets fresh Gaussian noise when batched with one that has it (the policy takes all or none).
        """
        import torch

        policy, device = self.policy, self.policy.device
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

    async def _batch_loop(self) -> None:
        """Feed queued requests to the inference thread, up to `max_batch` compatible ones at a time."""
        loop = asyncio.get_running_loop()
        assert self._requests is not None
        held: list[tuple[InferRequest, asyncio.Future, float]] = []  # incompatible with the last batch: next
        while True:
            first = held.pop(0) if held else await self._requests.get()
            batch, key = [first], (first[0].num_steps, first[0].solver)
            while len(batch) < self.config.max_batch and not self._requests.empty():
                item = self._requests.get_nowait()
                (batch if (item[0].num_steps, item[0].solver) == key else held).append(item)
            started = time.perf_counter()
            try:
                actions, infer_ms = await loop.run_in_executor(self._executor, self._infer_batch, [b[0] for b in batch])
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future, queued), action in zip(batch, actions, strict=True):
                if not future.done():  # cancelled if its client left
                    future.set_result((action, infer_ms, (started - queued) * 1e3, len(batch)))

    # ------------------------------------------------------------------ websocket side (event loop)
    def _authorized(self, request: Request) -> bool:
        if self.config.api_key is None:
            return True
        given = request.headers.get("X-API-Key")
        auth = request.headers.get("Authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), self.config.api_key.encode())

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """HTTP before the websocket upgrade: health and stats endpoints, authentication, connection limit."""
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if not self._authorized(request):
            self.stats.count("unauthorized")
            log.warning("refused %s: missing or wrong API key", connection.remote_address)
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
        if path == "/stats":
            return connection.respond(http.HTTPStatus.OK, json.dumps(self.stats_snapshot()) + "\n")
        if self._draining:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "server is shutting down\n")
        if len(connection.server.connections) >= self.config.max_clients:  # open ones; this one is not yet
            self.stats.count("refused_busy")
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"server has its maximum of {self.config.max_clients} clients\n")
        return None

    def stats_snapshot(self) -> dict[str, Any]:
        return {**self.stats.snapshot(), "in_flight": self._in_flight, "draining": self._draining}

    async def _reply(self, message: Any, peer: Any) -> dict[str, Any]:
        """One request frame -> one reply frame (actions or an error that says what is wrong)."""
        received = time.perf_counter()
        request_id = None
        try:
            if isinstance(message, str):
                raise RequestError("text frames are not accepted; send binary msgpack frames", "bad_encoding")
            try:
                decoded = unpackb(message)
            except CodecError as exc:
                raise RequestError(f"cannot decode request: {exc}", "bad_encoding") from None
            if isinstance(decoded, dict) and isinstance(decoded.get("request_id"), (str, int)):
                request_id = decoded["request_id"]
            if self._draining:
                raise RequestError("server is shutting down; reconnect to another instance", "shutting_down")
            req = validate_request(decoded, self.spec)
        except RequestError as exc:
            self.stats.count(f"error:{exc.code}")
            log.info("bad request from %s (%s): %s", peer, exc.code, exc)
            return error_frame(exc.code, str(exc), request_id)

        assert self._requests is not None
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._in_flight += 1
        try:
            self._requests.put_nowait((req, future, time.perf_counter()))
            actions, infer_ms, queue_ms, batch_size = await future
        except Exception as exc:
            self.stats.count("error:internal")
            log.exception("inference failed for request %r from %s", request_id, peer)
            return error_frame("internal_error", f"inference failed: {type(exc).__name__}: {exc}", request_id)
        finally:
            self._in_flight -= 1
        total_ms = (time.perf_counter() - received) * 1e3
        self.stats.record(infer_ms, total_ms)
        log.debug("request %r from %s: %d steps %s, batch %d, infer %.2f ms, queue %.2f ms, total %.2f ms",
                  request_id, peer, req.num_steps, req.solver, batch_size, infer_ms, queue_ms, total_ms)
        n_ok = self.stats.counts["ok"]
        if self.config.log_every and n_ok % self.config.log_every == 0:
            snap = self.stats.snapshot()["infer_ms"]
            log.info("%d inference calls; recent infer p50 %.2f ms, p99 %.2f ms", n_ok, snap["p50"], snap["p99"])
        return {"type": "actions", "actions": actions, "request_id": request_id, "num_steps": req.num_steps,
                "solver": req.solver,
                "server_timing": {"infer_ms": infer_ms, "queue_ms": queue_ms, "total_ms": total_ms,
                                  "batch": batch_size}}

    async def _handler(self, ws: ServerConnection) -> None:
        peer = ws.remote_address
        self.stats.count("connections")
        log.info("client %s connected", peer)
        try:
            await ws.send(self._metadata)
            async for message in ws:
                reply = await self._reply(message, peer)
                try:
                    await ws.send(packb(reply))
                except ConnectionClosed:
                    self.stats.count("dropped_reply_client_gone")
                    log.info("client %s left before its reply (request %r)", peer, reply.get("request_id"))
                    raise
        except ConnectionClosed as exc:
            if (exc.rcvd is not None and exc.rcvd.code == 1009) or (exc.sent is not None and exc.sent.code == 1009):
                self.stats.count("error:message_too_big")
                log.info("closed %s: message larger than %d bytes", peer, self.config.max_message_bytes)
        finally:
            log.info("client %s disconnected", peer)

    # ------------------------------------------------------------------ lifecycle
    async def run(self, ready: Callable[[int], None] | None = None) -> None:
        """Serve until `stop()` is called (or SIGINT/SIGTERM via `serve_forever`), then shut down gracefully."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._requests = asyncio.Queue()
        batcher = asyncio.ensure_future(self._batch_loop())
        cfg = self.config
        async with serve(self._handler, cfg.host, cfg.port, process_request=self._process_request,
                         max_size=cfg.max_message_bytes, compression=None, ping_interval=cfg.ping_interval_s,
                         logger=logging.getLogger("fm_policy.deploy.websockets")) as server:
            self.port = int(server.sockets[0].getsockname()[1])
            log.info("serving %s policy %s at ws://%s:%d (auth %s)", self.spec.policy_type, self.spec.model or "",
                     cfg.host, self.port, "on" if cfg.api_key else "off")
            if ready is not None:
                ready(self.port)
            await self._stop.wait()
            await self._drain(server)
        batcher.cancel()
        self._executor.shutdown(wait=True)
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
