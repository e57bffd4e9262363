"""Export: ONNX graphs run in onnxruntime and TorchScript modules match PyTorch and the policy's own sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from deploy_utils import tiny_policy

from fm_policy.cli import main
from fm_policy.deploy.export import ExportConfig, ExportError, export_policy, host_euler_loop


@pytest.fixture(scope="module")
def policy():
    return tiny_policy("unet")


@pytest.fixture(scope="module")
def onnx_dir(policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    export_policy(policy, out, ExportConfig(format="onnx"))
    return out


def _obs_and_noise(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"keypoints": torch.rand((batch, 2, 20), generator=g) * 512}, torch.randn((batch, 16, 2), generator=g)


def test_onnx_export_records_parity_per_graph(onnx_dir):
    manifest = json.loads((onnx_dir / "export.json").read_text())
    names = [g["name"] for g in manifest["graphs"]]
    assert names == ["encoder", "velocity", "fused_euler1", "fused_euler2"]
    for g in manifest["graphs"]:
        assert (onnx_dir / g["file"]).exists()
        assert 0 <= g["max_abs_error"] <= g["tolerance"] < 0.05, g
    assert manifest["obs_keys"] == ["keypoints"] and manifest["opset"] == 17 and "onnxruntime" in manifest["versions"]


def test_onnx_host_loop_and_fused_graphs_match_the_policy_sampler(policy, onnx_dir):
    import onnxruntime as ort

    obs, noise = _obs_and_noise(batch=3)
    for steps in (1, 2, 4):
        expected = policy.generate_chunk(obs, num_steps=steps, solver="euler", noise=noise).numpy()
        got = host_euler_loop(onnx_dir, {"keypoints": obs["keypoints"].numpy()}, noise.numpy(), steps)
        np.testing.assert_allclose(got, expected, atol=2e-3, rtol=1e-5)  # pixels: ~1e-6 relative to the 512 range
    for steps in (1, 2):
        session = ort.InferenceSession(str(onnx_dir / f"fused_euler{steps}.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {"keypoints": obs["keypoints"].numpy(), "noise": noise.numpy()})[0]
        expected = policy.generate_chunk(obs, num_steps=steps, solver="euler", noise=noise).numpy()
        np.testing.assert_allclose(got, expected, atol=2e-3, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_export_matches(policy, tmp_path):
    manifest = export_policy(policy, tmp_path, ExportConfig(format="torchscript", fused_steps=(2,)))
    assert [g.file for g in manifest.graphs] == ["encoder.pt", "velocity.pt", "fused_euler2.pt"]
    fused = torch.jit.load(str(tmp_path / "fused_euler2.pt"))
    obs, noise = _obs_and_noise()
    expected = policy.generate_chunk(obs, num_steps=2, solver="euler", noise=noise)
    torch.testing.assert_close(fused(obs["keypoints"], noise), expected, atol=2e-3, rtol=1e-5)


def test_ddpm_exports_encoder_and_denoiser_but_no_fused_graph(tmp_path):
    ddpm = tiny_policy("mlp", policy_type="ddpm")
    manifest = export_policy(ddpm, tmp_path, ExportConfig(fused_steps=()))
    assert [g.name for g in manifest.graphs] == ["encoder", "denoiser"]
    assert all(g.max_abs_error <= g.tolerance for g in manifest.graphs)
    with pytest.raises(ExportError, match="flow policies"):
        export_policy(ddpm, tmp_path / "fused", ExportConfig(fused_steps=(1,)))


def test_parity_check_fails_loudly(policy, tmp_path):
    with pytest.raises(ExportError, match="exceeds tolerance"):
        export_policy(policy, tmp_path, ExportConfig(fused_steps=(1,), atol=0.0, rtol=0.0))  # float32 is never exact
    with pytest.raises(ExportError, match="format"):
        ExportConfig(format="tflite")


def test_export_command(policy, tmp_path, capsys):
    policy.save_pretrained(tmp_path / "policy")
    assert main(["export", "--checkpoint", str(tmp_path / "policy"), "--out", str(tmp_path / "out"),
                 "--fused-steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "max abs error" in printed and (tmp_path / "out" / "fused_euler1.onnx").exists()
    assert main(["export", "--checkpoint", str(tmp_path / "missing")]) == 2  # one-line error, no traceback
