"""The real, unmodified `openpi-client` package (PyPI) against the policy server's openpi dialect.

`WebsocketClientPolicy` connects with its `Authorization: Api-Key` header, reads the metadata frame, sends a flat
observation map with openpi's bytes-key msgpack-numpy encoding and decodes the `{"actions": ...}` reply with its
own decoder; `ActionChunkBroker` turns each chunk into one action per call. With the server's `seed` option the
noise of a connection's k-th request is the k-th draw of torch.Generator().manual_seed(seed), so the served actions
must equal in-process inference with the same draws, bit for bit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from deploy_utils import ACTION_HIGH, ACTION_LOW, observation, tiny_policy

from fm_policy.deploy.client import LocalChunkSource, PolicyClient
from fm_policy.deploy.server import PolicyServer, ServerConfig, ServerThread

websocket_client_policy = pytest.importorskip("openpi_client.websocket_client_policy",
                                              reason="openpi-client is installed by scripts/setup.sh with the dev extra")
from openpi_client.action_chunk_broker import ActionChunkBroker

KEY = "openpi-key"
SEED = 1234
# openpi_client 0.1.2 calls websockets' connect() without a context manager, which websockets >= 16 warns about
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # websockets >= 15 routes connections through HTTP(S)_PROXY from the environment; openpi's client does not opt
    # out, and every byte here must stay on loopback
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def policy():
    return tiny_policy("mlp")


@pytest.fixture(scope="module")
def server(policy):
    config = ServerConfig(port=0, api_key=KEY, seed=SEED, log_every=0)
    with ServerThread(PolicyServer(policy, config, model_name="tiny")) as running:
        yield running


def _openpi(server) -> websocket_client_policy.WebsocketClientPolicy:
    return websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server.server.port, api_key=KEY)


def _draws(n: int, spec) -> list[np.ndarray]:
    generator = torch.Generator().manual_seed(SEED)
    return [torch.randn((spec.horizon, spec.action_dim), generator=generator).numpy() for _ in range(n)]


def test_openpi_client_gets_actions_equal_to_in_process(server, policy):
    client = _openpi(server)
    meta = client.get_server_metadata()
    assert meta["type"] == "metadata" and meta["obs_shapes"] == {"keypoints": [20]} and "openpi" in meta["dialects"]
    local = LocalChunkSource(policy)
    noises = _draws(3, local.spec)
    for k in range(3):
        reply = client.infer(observation(k))  # the flat openpi observation map, float32 history
        expected = local.infer(observation(k), noise=noises[k])
        assert set(reply) >= {"actions", "server_timing", "clamped"} and "type" not in reply
        assert isinstance(reply["actions"], np.ndarray) and reply["actions"].dtype == np.float32
        assert reply["actions"].shape == (15, 2) and np.array_equal(reply["actions"], expected.actions)
        assert reply["clamped"] == expected.clamped
        assert reply["server_timing"]["infer_ms"] > 0
    # a second connection replays the same noise stream from the start
    again = _openpi(server).infer(observation(0))
    assert np.array_equal(again["actions"], local.infer(observation(0), noise=noises[0]).actions)


def test_openpi_float64_and_explicit_noise_and_controls(server, policy):
    client, local = _openpi(server), LocalChunkSource(policy)
    noise = np.random.default_rng(5).standard_normal((16, 2))  # float64, converted like the observation
    obs64 = {"keypoints": observation(7)["keypoints"].astype(np.float64)}
    reply = client.infer({**obs64, "noise": noise, "num_steps": np.int64(2), "solver": "midpoint"})
    expected = local.infer(observation(7), noise=noise.astype(np.float32), num_steps=2, solver="midpoint").actions
    assert np.array_equal(reply["actions"], expected)


def test_action_chunk_broker_yields_one_action_per_call(server, policy):
    broker = ActionChunkBroker(_openpi(server), action_horizon=8)
    local = LocalChunkSource(policy)
    noises = _draws(2, local.spec)
    chunks = [local.infer(observation(10), noise=noises[0]).actions, local.infer(observation(11), noise=noises[1]).actions]
    for tick in range(16):  # 2 chunks x 8 executed actions; a new request every 8 calls
        out = broker.infer(observation(10 if tick < 8 else 11))
        assert out["actions"].shape == (2,) and np.array_equal(out["actions"], chunks[tick // 8][tick % 8])
        assert isinstance(out["server_timing"], dict)


def test_openpi_errors_are_text_frames_the_client_raises(server):
    client = _openpi(server)
    with pytest.raises(RuntimeError, match="Error in inference server") as info:
        client.infer({"keypoints": np.zeros((2, 19), np.float32)})
    text = str(info.value).split("\n", 1)[1]
    assert json.loads(text)["error"]["code"] == "bad_shape" and len(text) < 600
    with pytest.raises(RuntimeError, match="bad_keys"):
        client.infer({"keypoint": np.zeros((2, 20), np.float32), "prompt": "push the T"})
    with pytest.raises(RuntimeError, match="not_finite"):
        client.infer({"keypoints": np.full((2, 20), 1e300)})  # float64 beyond float32: inf after conversion
    assert client.infer(observation())["actions"].shape == (15, 2)  # the connection stays usable


def test_openpi_out_of_range_actions_are_clamped_and_counted(server):
    reply = _openpi(server).infer({"keypoints": np.full((2, 20), 1e6, np.float32)})
    assert reply["clamped"] > 0
    assert reply["actions"].min() >= ACTION_LOW and reply["actions"].max() <= ACTION_HIGH


def test_openpi_wrong_key_is_refused(server):
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus, match="401"):
        websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server.server.port, api_key="wrong")


def test_fm_client_and_openpi_share_one_server(server, policy):
    with PolicyClient(server.url, api_key=KEY) as client:
        noise = np.ones((16, 2), np.float32)
        assert np.array_equal(client.infer(observation(1), noise=noise).actions,
                              LocalChunkSource(policy).infer(observation(1), noise=noise).actions)
        assert client.spec.action_range_mode == "clamp" and client.spec.max_nfe == 128


def test_openpi_only_server_refuses_the_envelope(policy):
    with ServerThread(PolicyServer(policy, ServerConfig(port=0, protocol="openpi", log_every=0))) as running, \
            PolicyClient(running.url) as client:
        from fm_policy.deploy.client import ServerError

        with pytest.raises((ServerError, ConnectionError, ValueError)):
            client.infer(observation())
        reply = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", running.server.port).infer(observation())
        assert reply["actions"].shape == (15, 2)
