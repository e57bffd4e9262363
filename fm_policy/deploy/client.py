"""Controller-side client of the policy server: connect (with retries), read the metadata, request action chunks.

    with PolicyClient("ws://127.0.0.1:8000", api_key=...) as client:
        spec = client.spec                                   # shapes, dtypes, horizons, action range
        reply = client.infer({"keypoints": history})         # history: (n_obs_steps, 20)
        reply.actions                                        # (horizon - n_obs_steps + 1, action_dim), float32

Synchronous on purpose: robot control loops are mostly plain threads, and `websockets.sync` needs no event loop.
The connection retries while the server is still starting (refused / reset), but not on a 401, which no retry
fixes. A connection the server closed meanwhile (idle timeout, eviction) is re-opened by the next `infer`, once.
Each request carries an id, and replies to earlier, timed-out requests are discarded instead of being
mistaken for the answer to the current one. One request at a time per client (a lock enforces it); use one client
per thread for parallel requests.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State
from websockets.sync.client import ClientConnection, connect

from fm_policy.deploy.codec import packb, unpackb
from fm_policy.deploy.protocol import PolicySpec

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["AuthenticationError", "InferReply", "LocalChunkSource", "PolicyClient", "ServerError"]


class ServerError(RuntimeError):
    """The server answered a request with an error frame (`code` e.g. 'bad_shape'; the message says what)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"server refused the request ({code}): {message}")
        self.code = code


class AuthenticationError(ConnectionError):
    """The server refused the handshake because the API key is missing or wrong."""


@dataclass
class InferReply:
    actions: np.ndarray  # (chunk_len, action_dim) from the current step on
    request_id: Any
    num_steps: int
    server_timing: dict[str, float] = field(default_factory=dict)
    roundtrip_ms: float = float("nan")
    clamped: int = 0  # action values the server found outside the training range (clamped or flagged, see spec)


class PolicyClient:
    """Synchronous websocket client of `fm-policy serve` (see the module docstring)."""

    def __init__(self, url: str = "ws://127.0.0.1:8000", api_key: str | None = None, connect_timeout_s: float = 30.0,
                 retry_interval_s: float = 0.5, max_message_bytes: int = 16 * 1024 * 1024) -> None:
        self.url = url
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._max_size = max_message_bytes
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._open(connect_timeout_s, retry_interval_s)
        self._dtypes = {k: np.dtype(v) for k, v in self.spec.obs_dtypes.items()}

    def _open(self, timeout_s: float, retry_interval_s: float) -> None:
        self._ws: ClientConnection = self._connect(timeout_s, retry_interval_s)
        meta = unpackb(self._ws.recv(timeout=timeout_s))
        if not isinstance(meta, dict) or meta.get("type") != "metadata":
            self._ws.close()
            raise ConnectionError(f"{self.url}: the first frame is not policy metadata; is this an fm-policy server?")
        self.spec = PolicySpec.from_metadata(meta)

    def _connect(self, timeout_s: float, retry_interval_s: float) -> ClientConnection:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                # proxy=None: a loopback robot link must never be routed through an HTTP(S)_PROXY from the environment
                # __enter__: the connection's lifetime is this client's (close()), not a `with` block
                return connect(self.url, additional_headers=self._headers, compression=None, proxy=None,
                               max_size=self._max_size, open_timeout=max(1.0, min(10.0, timeout_s))).__enter__()
            except InvalidStatus as exc:
                if exc.response.status_code == 401:
                    raise AuthenticationError(f"{self.url}: server refused the API key (HTTP 401)") from None
                if time.monotonic() >= deadline:
                    raise ConnectionError(f"{self.url}: handshake refused with HTTP {exc.response.status_code}") from None
            except (OSError, TimeoutError) as exc:  # refused / reset while the server starts
                if time.monotonic() >= deadline:
                    raise ConnectionError(f"{self.url}: no policy server after {timeout_s:.0f} s ({exc})") from None
            time.sleep(retry_interval_s)

    def prepare(self, observation: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Observation history arrays in the dtypes the server expects (float64 or tensors converted here)."""
        out = {}
        for key, value in observation.items():
            if hasattr(value, "detach"):
                value = value.detach().cpu().numpy()
            dtype = self._dtypes.get(key)
            out[key] = np.ascontiguousarray(value, dtype=dtype) if dtype is not None else np.asarray(value)
        return out

    def infer(self, observation: Mapping[str, Any], num_steps: int | None = None, solver: str | None = None,
              noise: np.ndarray | None = None, timeout_s: float | None = None) -> InferReply:
        """One action chunk for an observation history {key: (n_obs_steps, *shape)}.

        Raises ServerError on an error frame, TimeoutError past `timeout_s` (the connection stays usable; the late
        reply is discarded when it comes), ConnectionError if the server closed the connection.
        """
        with self._lock:
            request_id = next(self._ids)
            message: dict[str, Any] = {"observation": self.prepare(observation), "request_id": request_id}
            if num_steps is not None:
                message["num_steps"] = int(num_steps)
            if solver is not None:
                message["solver"] = solver
            if noise is not None:
                message["noise"] = np.ascontiguousarray(noise, dtype=np.float32)
            start = time.perf_counter()
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            frame = packb(message)
            for attempt in (0, 1):
                if self._ws.state is not State.OPEN:  # closed by the server meanwhile (idle): one reconnect
                    self._open(5.0 if timeout_s is None else max(timeout_s, 0.5), 0.1)
                try:
                    self._ws.send(frame)
                    while True:
                        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                        reply = unpackb(self._ws.recv(timeout=left))
                        if isinstance(reply, dict) and reply.get("request_id") == request_id:
                            break  # anything else answers an earlier request that timed out
                    break
                except ConnectionClosed as exc:
                    # the server closes a connection normally (1000) only while no request of it is in flight (idle
                    # limit, eviction): this request crossed that close and was never served, so re-send it once
                    if attempt == 0 and exc.rcvd is not None and exc.rcvd.code == 1000:
                        continue
                    raise ConnectionError(f"{self.url}: connection closed ({exc})") from None
            roundtrip_ms = (time.perf_counter() - start) * 1e3
        if reply.get("type") == "error":
            err = reply.get("error") or {}
            raise ServerError(str(err.get("code")), str(err.get("message")))
        return InferReply(actions=np.asarray(reply["actions"]), request_id=request_id,
                          num_steps=int(reply.get("num_steps", 0)), server_timing=dict(reply.get("server_timing", {})),
                          roundtrip_ms=roundtrip_ms, clamped=int(reply.get("clamped", 0)))

    def send_raw(self, data: bytes | str) -> Any:
        """Send an arbitrary frame and return the decoded reply (protocol tests and debugging only)."""
        with self._lock:
            self._ws.send(data)
            return unpackb(self._ws.recv(timeout=30))

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalChunkSource:
    """The same `infer` interface on a policy in this process: the controller runs unchanged with or without a server.

    Runs exactly what the server runs (`generate_chunk` on a batch of one, actions from the current step on, the
    same output check: NaN/inf raise ServerError('non_finite_output'), `action_range` clamps or flags as the
    server's option of that name does), so in-process and served rollouts with the same noise are bit-identical.
    """

    def __init__(self, policy: Any, num_steps: int | None = None, control_hz: float = 10.0,
                 action_range: str = "clamp") -> None:
        from fm_policy.deploy.protocol import spec_from_policy

        self.policy = policy.eval()
        self.spec = spec_from_policy(policy, num_steps=num_steps, max_num_steps=max(128, num_steps or 0),
                                     control_hz=control_hz)
        self.spec.action_range_mode = action_range

    def infer(self, observation: Mapping[str, Any], num_steps: int | None = None, solver: str | None = None,
              noise: np.ndarray | None = None, timeout_s: float | None = None) -> InferReply:
        import torch

        device = self.policy.device
        dtypes = self.spec.obs_dtypes  # float32 low-dim keys, uint8 camera images
        obs = {k: torch.as_tensor(np.asarray(v, dtype=np.dtype(dtypes.get(k, "<f4"))))[None].to(device)
               for k, v in observation.items()}
        noise_t = None if noise is None else torch.as_tensor(np.asarray(noise, dtype=np.float32))[None].to(device)
        steps = num_steps or self.spec.num_steps
        start = time.perf_counter()
        with torch.inference_mode():
            chunk = self.policy.generate_chunk(obs, num_steps=steps, solver=solver or self.spec.solver, noise=noise_t)
        actions = chunk[0, self.spec.n_obs_steps - 1:].to("cpu", torch.float32).numpy()
        ms = (time.perf_counter() - start) * 1e3
        from fm_policy.deploy.protocol import RequestError, check_actions

        try:
            actions, outside = check_actions(actions, self.spec, self.spec.action_range_mode)
        except RequestError as exc:
            raise ServerError(exc.code, str(exc)) from None
        return InferReply(actions=actions, request_id=None, num_steps=steps, server_timing={"infer_ms": ms},
                          roundtrip_ms=ms, clamped=outside)

    def close(self) -> None:
        pass
