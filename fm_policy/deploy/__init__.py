"""Deploying a policy to a robot controller (`pip install fm-policy[deploy]`); docs/deploy.md is the user guide.

Modules, each importable on its own (nothing here is imported eagerly, so a numpy-only controller can use the
client without torch being imported):

- `codec`: msgpack with explicit numpy encoding, no pickle;
- `protocol`: metadata (`PolicySpec`) and request validation;
- `server`: the websocket policy server (`fm-policy serve`), `ServerThread` for tests and benchmarks; it also
  speaks openpi's protocol, so the unmodified `openpi_client` works against it;
- `workqueue`: the server's bounded, cost-weighted fair, deadline-aware request queue with a preemptible lane;
- `client`: `PolicyClient` (sync, retrying connect) and `LocalChunkSource` (the same interface in process);
- `scheduler`: `ChunkScheduler`: receding horizon, temporal ensembling, async prefetch with overlap blending,
  clamping and the NaN/timeout guard;
- `controller`: the fixed-rate Push-T control loop driven through the server (example and end-to-end test);
- `export`: ONNX / TorchScript export with parity checks (`fm-policy export`).
"""
