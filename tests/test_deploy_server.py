"""The policy server on a real loopback socket: metadata, exact answers, every kind of malformed input, auth, limits,
slow inference, disconnects, graceful shutdown, a bounded load test, and the `fm-policy serve` command itself.

A background client keeps requesting actions for the whole module; at the end it must have been answered every
time, so each malformed-input test also shows that the server keeps serving other clients.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from deploy_utils import observation, tiny_policy
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from fm_policy.deploy.client import AuthenticationError, LocalChunkSource, PolicyClient, ServerError
from fm_policy.deploy.codec import packb
from fm_policy.deploy.server import PolicyServer, ServerConfig, ServerThread

KEY = "test-key-123"
MAX_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def policy():
    return tiny_policy("mlp")


@pytest.fixture(scope="module")
def server(policy):
    config = ServerConfig(port=0, api_key=KEY, max_message_bytes=MAX_BYTES, max_clients=8, log_every=0)
    with ServerThread(PolicyServer(policy, config, model_name="tiny")) as running:
        yield running


class BackgroundClient(threading.Thread):
    """Requests an action chunk every few ms until stopped; records failures."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = PolicyClient(url, api_key=KEY)
        self.stop_event, self.ok, self.failures = threading.Event(), 0, []

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                reply = self.client.infer(observation(self.ok), timeout_s=10)
                assert reply.actions.shape == (15, 2) and np.isfinite(reply.actions).all()
                self.ok += 1
            except Exception as exc:  # noqa: BLE001 - any failure fails the module
                self.failures.append(repr(exc))
            time.sleep(0.005)


@pytest.fixture(scope="module", autouse=True)
def background(server):
    bg = BackgroundClient(server.url)
    bg.start()
    yield bg
    served_before = bg.ok
    time.sleep(0.2)
    bg.stop_event.set()
    bg.join(10)
    bg.client.close()
    assert bg.failures == [] and bg.ok > served_before > 0


@pytest.fixture
def client(server):
    with PolicyClient(server.url, api_key=KEY) as c:
        yield c


def _served_meanwhile(background, fn):
    """Run fn and check the background client got answers while it ran (the server kept serving others)."""
    before = background.ok
    result = fn()
    deadline = time.monotonic() + 5
    while background.ok <= before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert background.ok > before and background.failures == []
    return result


def test_metadata_on_connect(client):
    spec = client.spec
    assert spec.obs_shapes == {"keypoints": [20]} and spec.obs_dtypes == {"keypoints": "<f4"}
    assert (spec.action_dim, spec.horizon, spec.n_obs_steps, spec.n_action_steps) == (2, 16, 2, 8)
    assert spec.policy_type == "flow" and spec.num_steps == 4 and spec.model == "tiny" and spec.control_hz == 10
    assert spec.action_low == [50.0, 50.0] and spec.action_high == [450.0, 450.0]
    assert spec.chunk_len == 15 and "euler" in spec.solvers


def test_served_actions_equal_in_process(client, policy):
    local = LocalChunkSource(policy)
    noise = np.random.default_rng(1).standard_normal((16, 2)).astype(np.float32)
    for steps, solver in ((1, "euler"), (4, "euler"), (2, "midpoint")):
        served = client.infer(observation(3), num_steps=steps, solver=solver, noise=noise)
        expected = local.infer(observation(3), num_steps=steps, solver=solver, noise=noise).actions
        assert np.array_equal(served.actions, expected) and served.num_steps == steps
        timing = served.server_timing
        assert timing["infer_ms"] > 0 and timing["total_ms"] >= timing["infer_ms"] and served.roundtrip_ms > 0


def test_each_inference_call_is_timed_and_logged(client, caplog):
    import logging

    with caplog.at_level(logging.DEBUG, logger="fm_policy.deploy.server"):
        reply = client.infer(observation(), num_steps=2)
        deadline = time.monotonic() + 2
        while not any("infer" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if "infer" in r.getMessage()]
    assert any("2 steps euler" in line and "infer" in line and " ms" in line for line in lines), lines
    assert reply.server_timing["queue_ms"] >= 0


def test_client_converts_float64_and_tensors(client):
    import torch

    obs = observation(4)
    a = client.infer({"keypoints": obs["keypoints"].astype(np.float64)}, noise=np.zeros((16, 2))).actions
    b = client.infer({"keypoints": torch.from_numpy(obs["keypoints"])}, noise=np.zeros((16, 2))).actions
    assert np.array_equal(a, b)


def _request(**overrides):
    message = {"observation": observation(5), "request_id": "r1"}
    message.update(overrides)
    return packb(message)


BAD_REQUESTS = {
    "missing_key": (_request(observation={}), "bad_keys", "missing ['keypoints']"),
    "extra_key": (_request(observation={**observation(), "image": np.zeros((2, 3), np.float32)}), "bad_keys",
                  "unexpected ['image']"),
    "wrong_shape": (_request(observation={"keypoints": np.zeros((2, 19), np.float32)}), "bad_shape", "(2, 20)"),
    "no_history": (_request(observation={"keypoints": np.zeros(20, np.float32)}), "bad_shape", "expected (2, 20)"),
    "wrong_dtype": (_request(observation={"keypoints": np.zeros((2, 20), np.float64)}), "bad_dtype", "<f4"),
    "int_dtype": (_request(observation={"keypoints": np.zeros((2, 20), np.int32)}), "bad_dtype", "<f4"),
    "not_array": (_request(observation={"keypoints": [[0.0] * 20] * 2}), "bad_type", "numpy array"),
    "nan": (_request(observation={"keypoints": np.full((2, 20), np.nan, np.float32)}), "not_finite", "40 NaN"),
    "inf": (_request(observation={"keypoints": np.where(np.eye(2, 20) > 0, np.inf, 1).astype(np.float32)}),
            "not_finite", "NaN/inf"),
    "bad_noise": (_request(noise=np.zeros((8, 2), np.float32)), "bad_shape", "noise"),
    "num_steps_zero": (_request(num_steps=0), "bad_value", "num_steps"),
    "num_steps_huge": (_request(num_steps=10**9), "bad_value", "num_steps"),
    "num_steps_bool": (_request(num_steps=True), "bad_value", "num_steps"),
    "unknown_solver": (_request(solver="dopri5"), "bad_value", "solver"),
    "unknown_field": (_request(prompt="push the T"), "unknown_field", "prompt"),
    "not_a_map": (packb([1, 2, 3]), "bad_request", "map"),
    "garbage_bytes": (os.urandom(64) + b"\xc1", "bad_encoding", "cannot decode"),
    "lying_header": (packb({"observation": {"keypoints": {"__ndarray__": True, "data": b"\0" * 4, "dtype": "<f4",
                                                           "shape": [2, 20]}}}), "bad_encoding", "needs 160 bytes"),
    "object_dtype": (packb({"observation": {"keypoints": {"__ndarray__": True, "data": b"", "dtype": "|O",
                                                           "shape": [0]}}}), "bad_encoding", "object"),
    "text_frame": ("{\"observation\": 1}", "bad_encoding", "text frames"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_malformed_request_gets_error_frame_and_connection_stays_usable(name, client, background):
    frame, code, words = BAD_REQUESTS[name]
    reply = _served_meanwhile(background, lambda: client.send_raw(frame))
    assert reply["type"] == "error" and reply["error"]["code"] == code, reply
    assert words in reply["error"]["message"], reply["error"]["message"]
    assert client.infer(observation()).actions.shape == (15, 2)  # the same connection still works


def test_server_error_raises_on_client(client):
    with pytest.raises(ServerError, match="bad_value"):
        client.infer(observation(), num_steps=1000)


def test_oversize_message_closes_only_that_connection(server, background):
    with connect(server.url, additional_headers={"X-API-Key": KEY}, proxy=None, max_size=None) as ws:
        ws.recv(timeout=5)  # metadata
        big = packb({"observation": {"keypoints": np.zeros((2, MAX_BYTES // 8), np.float32)}})
        assert len(big) > MAX_BYTES

        def send_and_wait():
            ws.send(big)
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=5)
            return info.value

        closed = _served_meanwhile(background, send_and_wait)
    assert closed.rcvd is not None and closed.rcvd.code == 1009  # "message too big"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY + "x"}])
def test_wrong_or_missing_api_key_is_refused(server, background, headers):
    def attempt():
        with pytest.raises(AuthenticationError, match="401"):
            PolicyClient(server.url, api_key=headers.get("Authorization", "")[7:] or headers.get("X-API-Key"),
                         connect_timeout_s=5)

    _served_meanwhile(background, attempt)
    with pytest.raises(urllib.error.HTTPError) as info:  # /stats needs the key too
        urllib.request.urlopen(server.url.replace("ws://", "http://") + "/stats", timeout=5)
    assert info.value.code == 401


def test_x_api_key_header_and_healthz(server):
    with connect(server.url, additional_headers={"X-API-Key": KEY}, proxy=None) as ws:
        assert ws.recv(timeout=5)
    http = server.url.replace("ws://", "http://")
    with urllib.request.urlopen(http + "/healthz", timeout=5) as response:  # no key needed for health checks
        assert response.status == 200 and response.read() == b"OK\n"


def test_bounded_load_test_nothing_dropped(server, policy):
    """N concurrent clients x R requests each: every request answered, with its own id and the right actions."""
    n_clients, n_requests = 4, 15
    local = LocalChunkSource(policy)
    noise = np.random.default_rng(2).standard_normal((16, 2)).astype(np.float32)
    expected = {i: local.infer(observation(i), noise=noise).actions for i in range(n_requests)}
    before = server.server.stats_snapshot()["counts"].get("ok", 0)
    results: dict[int, list[float]] = {}
    errors: list[str] = []

    def worker(index: int) -> None:
        try:
            with PolicyClient(server.url, api_key=KEY) as c:
                latencies = []
                for i in range(n_requests):
                    reply = c.infer(observation(i), noise=noise, timeout_s=30)
                    assert np.array_equal(reply.actions, expected[i])
                    latencies.append(reply.roundtrip_ms)
                results[index] = latencies
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    wall = time.perf_counter() - start
    assert errors == [] and sorted(results) == list(range(n_clients))
    latencies = np.concatenate([results[i] for i in range(n_clients)])
    assert len(latencies) == n_clients * n_requests
    assert np.percentile(latencies, 99) < 5000 and n_clients * n_requests / wall > 1
    assert server.server.stats_snapshot()["counts"]["ok"] - before >= n_clients * n_requests


def test_micro_batching_serves_concurrent_clients_together(policy):
    """max_batch > 1: requests arriving together share one forward pass, and each still gets its own answer."""
    with ServerThread(PolicyServer(policy, ServerConfig(port=0, max_batch=8, log_every=0))) as running:
        fast = running.server._infer_batch

        def slowed(reqs):  # make requests pile up behind the running batch
            time.sleep(0.05)
            return fast(reqs)

        running.server._infer_batch = slowed  # type: ignore[method-assign]
        local = LocalChunkSource(policy)
        noise = np.random.default_rng(3).standard_normal((16, 2)).astype(np.float32)
        replies: dict[int, list] = {}

        def worker(i: int) -> None:
            with PolicyClient(running.url) as c:
                replies[i] = [c.infer(observation(i), noise=noise) for _ in range(4)]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(replies) == [0, 1, 2, 3]
        assert max(r.server_timing["batch"] for rs in replies.values() for r in rs) > 1
        for i, rs in replies.items():
            expected = local.infer(observation(i), noise=noise).actions
            for r in rs:  # batched float math: equal up to rounding, not bit for bit
                np.testing.assert_allclose(r.actions, expected, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------------------------- slow server (own instance)
@pytest.fixture
def slow_server(policy):
    """A server whose inference takes 0.4 s: for health-during-inference, disconnects and shutdown."""
    srv = PolicyServer(policy, ServerConfig(port=0, log_every=0, shutdown_grace_s=5))
    fast_infer = srv._infer_batch

    def slow_infer(reqs):
        time.sleep(0.4)
        return fast_infer(reqs)

    srv._infer_batch = slow_infer  # type: ignore[method-assign]
    running = ServerThread(srv).start()
    yield running
    running.stop()


def test_healthz_answers_during_slow_inference(slow_server):
    with PolicyClient(slow_server.url) as c:
        thread = threading.Thread(target=c.infer, args=(observation(),))
        thread.start()
        time.sleep(0.1)
        start = time.perf_counter()
        with urllib.request.urlopen(slow_server.url.replace("ws://", "http://") + "/healthz", timeout=5) as r:
            assert r.status == 200
        assert time.perf_counter() - start < 0.2  # not stuck behind the 0.4 s inference
        thread.join(5)


def test_client_disconnecting_mid_request_is_harmless(slow_server):
    with connect(slow_server.url, proxy=None) as ws:
        ws.recv(timeout=5)
        ws.send(packb({"observation": observation(), "request_id": 7}))
        time.sleep(0.1)  # the server is inside the inference now
        ws.socket.shutdown(socket.SHUT_RDWR)  # vanish without a close handshake, like a crashed controller
    deadline = time.monotonic() + 5
    counts = {}
    while time.monotonic() < deadline and not counts.get("dropped_reply_client_gone"):
        counts = slow_server.server.stats_snapshot()["counts"]
        time.sleep(0.05)
    assert counts.get("dropped_reply_client_gone") == 1
    with PolicyClient(slow_server.url) as c:  # and the server carries on
        assert c.infer(observation()).actions.shape == (15, 2)


def test_timed_out_reply_is_not_mistaken_for_the_next(slow_server):
    with PolicyClient(slow_server.url) as c:
        noise_a, noise_b = np.zeros((16, 2), np.float32), np.ones((16, 2), np.float32)
        with pytest.raises(TimeoutError):
            c.infer(observation(), noise=noise_a, timeout_s=0.1)
        late_ok = c.infer(observation(), noise=noise_b, timeout_s=5)
        local = LocalChunkSource(slow_server.server.policy).infer(observation(), noise=noise_b).actions
        assert np.array_equal(late_ok.actions, local)


def test_graceful_shutdown_answers_in_flight_requests(slow_server):
    c = PolicyClient(slow_server.url)
    replies = []
    thread = threading.Thread(target=lambda: replies.append(c.infer(observation(), timeout_s=5)))
    thread.start()
    time.sleep(0.1)
    slow_server.stop()  # while the inference runs
    thread.join(5)
    assert len(replies) == 1 and replies[0].actions.shape == (15, 2)
    with pytest.raises(ConnectionError):
        PolicyClient(slow_server.url, connect_timeout_s=0.5)


def test_client_retries_until_the_server_is_up(policy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    running = ServerThread(PolicyServer(policy, ServerConfig(port=port, log_every=0)))
    starter = threading.Timer(0.5, running.start)
    starter.start()
    try:
        start = time.monotonic()
        with PolicyClient(f"ws://127.0.0.1:{port}", connect_timeout_s=20, retry_interval_s=0.1) as c:
            assert time.monotonic() - start >= 0.4  # it really waited for the server
            assert c.infer(observation()).actions.shape == (15, 2)
    finally:
        starter.join()
        running.stop()
    with pytest.raises(ConnectionError, match="no policy server"):
        PolicyClient(f"ws://127.0.0.1:{port}", connect_timeout_s=0.3, retry_interval_s=0.1)


def test_max_clients_refuses_extra_connections(policy):
    with ServerThread(PolicyServer(policy, ServerConfig(port=0, max_clients=1, log_every=0))) as running:
        with PolicyClient(running.url), pytest.raises(ConnectionError, match="503"):
            PolicyClient(running.url, connect_timeout_s=0.3, retry_interval_s=0.1)
        with PolicyClient(running.url) as c:  # the slot is free again
            assert c.infer(observation()).actions.shape == (15, 2)


def test_serve_command_end_to_end(policy, tmp_path):
    """`fm-policy serve` in a subprocess: API key from the environment, health, a request, SIGTERM -> exit 0."""
    policy.save_pretrained(tmp_path / "policy")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FM_POLICY_TEST_KEY": KEY, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fm_policy", "serve", "--checkpoint", str(tmp_path / "policy"), "--port", str(port),
         "--api-key-env", "FM_POLICY_TEST_KEY", "--threads", "1", "--num-steps", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        with PolicyClient(f"ws://127.0.0.1:{port}", api_key=KEY, connect_timeout_s=60) as c:
            assert c.spec.num_steps == 2 and c.infer(observation()).actions.shape == (15, 2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"ws://127.0.0.1:{port}" in out and "server stopped" in err
