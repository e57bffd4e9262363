"""MLE-of-reconstructions fine-tuning: inversion on a trained toy flow, the objective reducing the 1-step
reconstruction error, persistence of the tuned policy, and `finetune()` end to end (with exact resume) on a tiny
zarr store with a checkpoint pre-trained by `train()`."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_flow import pretrain_tiny_flow, tiny_state_store

from fm_policy.config import ConfigError, load_config
from fm_policy.factory import load_policy
from fm_policy.finetune.mle import OBJECTIVE_FILE, MLEConfig, MLEFinetunePolicy, mle_finetune_policy
from fm_policy.finetune.run import FinetuneConfig, finetune
from fm_policy.flow_policy import FlowPolicy, FlowPolicyConfig
from fm_policy.networks.residual import ResidualConfig
from fm_policy.normalizer import Normalizer
from fm_policy.residual_policy import ResidualFlowPolicy
from fm_policy.solvers import solve

torch.set_num_threads(1)


def _toy_batch(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """2-D toy: obs o ~ U(-1, 1); action (o, +-0.6 (1 + o) / 2 + small noise): bimodal in its second coordinate."""
    o = torch.rand(n, generator=generator) * 2 - 1
    sign = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    action = torch.stack([o, 0.3 * sign * (1 + o)], dim=-1) + 0.03 * torch.randn(n, 2, generator=generator)
    return {"state": o.reshape(n, 1, 1), "action": action.reshape(n, 1, 2)}


@pytest.fixture(scope="module")
def toy_flow() -> FlowPolicy:
    """A tiny flow policy trained for 300 steps on the toy problem (~2 s)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    config = FlowPolicyConfig(n_obs_steps=1, horizon=1, n_action_steps=1,
                          network={"kind": "mlp", "hidden_dims": [64, 64], "time_embed_dim": 16},
                          obs_shapes={"state": [1]}, action_dim=2)
    fit = _toy_batch(2000, generator)
    normalizer = Normalizer.fit({"state": fit["state"][:, 0].numpy(), "action": fit["action"][:, 0].numpy()})
    policy = FlowPolicy(config, normalizer)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(300):
        loss = policy.compute_loss(_toy_batch(256, generator))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy.eval()


def _reconstruction_error(wrapper: MLEFinetunePolicy, batch: dict[str, torch.Tensor], steps: int) -> float:
    """MSE of the deployed decode (`steps` Euler steps) of the inverted codes against the data chunks."""
    with torch.no_grad():
        obs = {"state": batch["state"]}
        x1 = wrapper.normalizer.normalize("action", batch["action"])
        z = wrapper.pair(obs, x1)
        return float((wrapper.decode(z, wrapper.model.encode_obs(obs), steps) - x1).square().mean())


@pytest.mark.parametrize("encode,decode", [
    ({"encode_solver": "dopri5", "encode_rtol": 1e-7, "encode_atol": 1e-7}, ("rk4", 256)),
    ({"encode_solver": "rk4", "encode_steps": 256}, ("dopri5", 1)),
])
def test_backward_then_forward_inversion_reconstructs_data(toy_flow, encode, decode):
    """Encode with one accurate solver, decode with another: the code is the flow's true preimage of the data.

    (Decoding with the encode's own fixed-step solver would close the loop even with inaccurate codes: on this
    field, whose sinusoidal time features vary fast in t, rk4 with 32 steps is 0.1 off the true codes yet its own
    round trip closes to 1e-4.)
    """
    wrapper = mle_finetune_policy(copy.deepcopy(toy_flow), MLEConfig(**encode), "mle")
    batch = _toy_batch(16, torch.Generator().manual_seed(1))
    x1 = toy_flow.normalizer.normalize("action", batch["action"])
    cond = toy_flow.encode_obs({"state": batch["state"]})
    z = wrapper.encode(x1, cond)
    with torch.no_grad():
        back = solve(lambda t, x: toy_flow.velocity(t, x, cond), z, decode[0], decode[1], rtol=1e-7, atol=1e-7).x
    assert (back - x1).abs().max() < 5e-4  # measured ~6e-5
    assert 0.5 < float(z.std()) < 1.5  # the codes of a trained flow are roughly N(0, I)


def _tune(wrapper: MLEFinetunePolicy, steps: int, lr: float) -> None:
    optimizer = torch.optim.Adam(wrapper.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(3)
    wrapper.train()
    for _ in range(steps):
        loss = wrapper.compute_loss(_toy_batch(128, generator))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _gain(toy_flow: FlowPolicy, method: str, kind: str, decode_steps: int, steps: int, lr: float) -> float:
    """Held-out reconstruction error (deployed decode of inverted codes) after / before `steps` MLE steps."""
    torch.manual_seed(0)
    # a cheap fixed-step encode: these tests are about the objective, and the held-out error uses the same codes
    config = MLEConfig(encode_solver="rk4", encode_steps=8, decode_steps=decode_steps, sigma=0.1)
    wrapper = mle_finetune_policy(copy.deepcopy(toy_flow), config, method,
                                  ResidualConfig(kind=kind, width=16, cond_hidden=32))
    held_out = _toy_batch(256, torch.Generator().manual_seed(2))
    before = _reconstruction_error(wrapper, held_out, decode_steps)
    _tune(wrapper, steps, lr)
    return _reconstruction_error(wrapper, held_out, decode_steps) / before


def test_mle_finetuning_reduces_one_step_reconstruction_error(toy_flow):
    assert _gain(toy_flow, "mle", "monotone", decode_steps=1, steps=40, lr=1e-3) < 0.7


@pytest.mark.parametrize("decode_steps", [2, 4])
def test_mle_finetuning_reduces_multi_step_reconstruction_error(toy_flow, decode_steps):
    """FT-FM through a 2- and 4-step Euler sampler, with the default (relative) flow-matching anchor: the held-out
    N-step reconstruction error drops (measured: to 0.02 / 0.03 of its value before, from 0.050 / 0.015)."""
    assert _gain(toy_flow, "mle", "monotone", decode_steps=decode_steps, steps=40, lr=1e-3) < 0.2


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_terminal_refiner_helps_a_little_after_four_steps_and_not_after_one(toy_flow, decode_steps):
    """A contracting terminal refinement stage (2 Euler steps of a monotone residual after the base flow), trained by
    MLE of reconstructions. Measured after 40 steps: 0.84 of the 4-step error before (0.83 after 150 steps; the same
    residual inside the velocity reaches 0.09), 0.96 of the 1-step error. A contracting map after the flow can pull
    outputs together, not apart, and the few-step outputs of this toy are already too close together (about the
    conditional mean), so the stage only trims them; this pins both the gain and the limitation."""
    torch.manual_seed(0)
    config = MLEConfig(encode_solver="rk4", encode_steps=8, decode_steps=decode_steps, sigma=0.1)
    residual = ResidualConfig(kind="monotone", width=16, cond_hidden=32, placement="terminal", refine_steps=2)
    wrapper = mle_finetune_policy(copy.deepcopy(toy_flow), config, "residual", residual)
    held_out = _toy_batch(256, torch.Generator().manual_seed(2))
    before = _reconstruction_error(wrapper, held_out, decode_steps)
    _tune(wrapper, 40, 1e-2)
    ratio = _reconstruction_error(wrapper, held_out, decode_steps) / before
    assert ratio < 0.92 if decode_steps == 4 else ratio > 0.9


@pytest.mark.parametrize("kind", ["monotone", "damped"])
def test_contracting_residual_reduces_two_step_reconstruction_error(toy_flow, kind):
    assert _gain(toy_flow, "residual", kind, decode_steps=2, steps=40, lr=1e-2) < 0.5


def test_contracting_residual_cannot_fix_one_step_decoding_but_a_free_one_can(toy_flow):
    """Pins the limitation documented in fm_policy.networks.residual: the 1-step decode z -> z + v(0, z) of the
    pre-trained flow is nearly constant (about the conditional mean), the needed correction is an expansion, and a
    residual with mu(dr/dx) <= 0 can only remove expansion. An unconstrained residual fixes it at once."""
    assert _gain(toy_flow, "residual", "monotone", decode_steps=1, steps=40, lr=1e-2) > 0.8
    assert _gain(toy_flow, "residual", "free", decode_steps=1, steps=40, lr=1e-2) < 0.2


def test_independent_pairing_learned_sigma_and_persistence(toy_flow, tmp_path):
    wrapper = mle_finetune_policy(copy.deepcopy(toy_flow), MLEConfig(pairing="independent", sigma_mode="per_dim"),
                                  "mle")
    out = wrapper.compute_loss(_toy_batch(32, torch.Generator().manual_seed(4)))
    assert set(out) == {"loss", "nll", "recon_mse", "sigma", "fm_loss"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert wrapper.objective.log_sigma.shape == (1, 2) and wrapper.objective.log_sigma.grad.abs().sum() > 0
    with torch.no_grad():
        wrapper.objective.log_sigma.fill_(-1.5)
    wrapper.save_pretrained(tmp_path / "tuned")
    assert (tmp_path / "tuned" / OBJECTIVE_FILE).exists()
    loaded = load_policy(tmp_path / "tuned")  # a fully fine-tuned flow policy is a plain flow policy
    assert type(loaded) is FlowPolicy and loaded.config.type == "flow"
    fresh = mle_finetune_policy(copy.deepcopy(toy_flow), MLEConfig(sigma_mode="per_dim"), "mle")
    fresh.load_weights(tmp_path / "tuned")
    assert torch.equal(fresh.objective.log_sigma, torch.full((1, 2), -1.5))


def test_trainable_selection_and_trainable_only_parameters(toy_flow):
    last = mle_finetune_policy(copy.deepcopy(toy_flow), MLEConfig(trainable="last"), "mle")
    names = [n for n, p in last.named_parameters() if p.requires_grad]
    assert names == ["model.net.out.weight", "model.net.out.bias"]
    assert len(list(last.parameters())) == 2  # what the Trainer's optimiser and EMA see
    assert not any(p.requires_grad for p in last.reference.parameters())
    residual = mle_finetune_policy(copy.deepcopy(toy_flow), MLEConfig(), "residual")
    assert residual.reference is None and isinstance(residual.model, ResidualFlowPolicy)
    assert all(n.startswith("model.residual.") for n, p in residual.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="trainable=last"):
        mle_finetune_policy(copy.deepcopy(toy_flow), MLEConfig(trainable="last"), "residual")
    with pytest.raises(ConfigError, match="pairing"):
        MLEConfig(pairing="ot").validate()


# ---------------------------------------------------------------------------------------------------------------
# finetune() end to end


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny store (as in test_policy_training) and a flow policy pre-trained on it for 30 steps by train()."""
    root = tmp_path_factory.mktemp("ft")
    return pretrain_tiny_flow(root, tiny_state_store(root / "tiny.zarr"))


def _ft_config(checkpoint: Path, run_dir: Path, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [
        f"checkpoint={checkpoint}", f"run_dir={run_dir}", "loop.batch_size=16", "loop.steps=6", "loop.log_every=2",
        "loop.val_every=3", "loop.val_batches=1", "loop.checkpoint_every=3", "loop.progress=false",
        "optim.lr=1e-3", "optim.warmup_steps=1", "mle.encode_solver=rk4", "mle.encode_steps=4", *overrides,
    ])


@pytest.mark.parametrize("method,expected", [("mle", FlowPolicy), ("residual", ResidualFlowPolicy)])
def test_finetune_runs_checkpoints_and_loads(pretrained, tmp_path, method, expected):
    # data.path is left empty: the store and split come from the pre-training run's config.yaml
    # monotone: its weight W starts at exactly 0, so "the residual trained" reads as "W is no longer 0"
    checkpoint = finetune(_ft_config(pretrained, tmp_path / method, f"method={method}", "residual.width=16",
                                     "residual.kind=monotone"))
    assert checkpoint.name == "step_6" and (tmp_path / method / "tb").is_dir()
    policy = load_policy(checkpoint / "ema")
    assert type(policy) is expected
    obs = {"state": torch.rand(3, 2, 5) * 300 + 100}
    chunk = policy.predict_action_chunk(obs, num_steps=1)
    assert chunk.shape == (3, 4, 2) and torch.isfinite(chunk).all()
    before = load_policy(pretrained).state_dict()
    after = load_policy(checkpoint / "policy").state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert bool(changed) == (method == "mle")  # a residual run leaves the base weights untouched
    if method == "residual":
        assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in after.items() if k == "residual.weight")


def test_inherited_data_keeps_command_line_overrides(pretrained, tmp_path):
    """data.path left empty inherits the pre-training data section, but a data.* override given with it still
    applies (it was once dropped silently: data.max_train_episodes=1 encoded every window)."""
    from fm_policy.finetune.run import resolve_data_config
    from fm_policy.flow_policy import FlowPolicy

    config = _ft_config(pretrained, tmp_path / "ovr", "method=mle", "data.max_train_episodes=1", "data.val_ratio=0.5")
    data = resolve_data_config(config, FlowPolicy.from_pretrained(pretrained))
    assert data.path and data.max_train_episodes == 1 and data.val_ratio == 0.5


@pytest.mark.parametrize("overrides", [
    ("method=residual", "mle.sigma_mode=scalar", "residual.width=16", "residual.kind=damped"),
    # FT-FM: the whole network (a frozen reference copy encodes), an any-step model whose per-batch step count is
    # drawn from the global RNG, the flow-matching anchor (which draws noise and times), per-element sigma, cached codes
    ("method=mle", "mle.sigma_mode=per_dim", "mle.decode_steps_choices=[1,2,4]", "mle.deploy_steps=2"),
    ("method=mle", "mle.trainable=last", "mle.last_layers=2", "mle.cache_codes=false"),
], ids=["residual", "mle-any-step", "mle-last-layers"])
def test_finetune_resume_is_exact(pretrained, tmp_path, monkeypatch, overrides):
    """Killed after the step-3 checkpoint, the same command resumes to the weights (and learned sigma) of an
    uninterrupted run: the trainable-only parameter list, the RNG streams (step-count draws, the anchor's noise) and
    the sigma sidecar round-trip through the Trainer."""
    from fm_policy.trainer import Trainer

    straight = finetune(_ft_config(pretrained, tmp_path / "straight", *overrides))
    save = Trainer.save_checkpoint

    def save_then_die(self):
        path = save(self)
        if self.step == 3:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(_ft_config(pretrained, tmp_path / "resumed", *overrides))
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    resumed = finetune(_ft_config(pretrained, tmp_path / "resumed", *overrides))
    learned_sigma = "mle.sigma_mode=fixed" not in overrides and any("sigma_mode" in o for o in overrides)
    for part in ("policy", "ema"):
        a, b = load_policy(straight / part).state_dict(), load_policy(resumed / part).state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{part}/{key} differs after resume"
        assert (straight / part / OBJECTIVE_FILE).exists() == learned_sigma
        if learned_sigma:
            sa = (straight / part / OBJECTIVE_FILE).read_bytes()
            assert sa == (resumed / part / OBJECTIVE_FILE).read_bytes()
    before = load_policy(pretrained).state_dict()  # and the run did tune something
    assert any(not torch.equal(before[k], v) for k, v in load_policy(straight / "policy").state_dict().items()
               if k in before) == ("method=mle" in overrides)


def test_finetune_rejects_bad_configs(pretrained, tmp_path):
    with pytest.raises(ConfigError, match="no pre-trained checkpoint"):
        finetune(load_config(FinetuneConfig, None, [f"run_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="method 'rl'"):
        finetune(_ft_config(pretrained, tmp_path / "x", "method=rl"))
    with pytest.raises(ConfigError, match="mle.decode_solver"):
        finetune(_ft_config(pretrained, tmp_path / "x", "mle.decode_solver=heun"))


def test_finetune_and_analyze_flow_through_the_cli(pretrained, tmp_path, capsys):
    """`fm-policy finetune` and `fm-policy analyze-flow` reach the library; bad input is one line, exit 2."""
    from fm_policy.cli import main

    run_dir = tmp_path / "cli"
    assert main(["finetune", "--method", "residual", "--checkpoint", str(pretrained), f"run_dir={run_dir}",
                 "loop.steps=2", "loop.batch_size=8", "loop.val_every=0", "loop.checkpoint_every=2",
                 "loop.progress=false", "mle.encode_steps=2", "residual.width=8"]) == 0
    assert type(load_policy(run_dir / "checkpoints" / "step_2" / "ema")) is ResidualFlowPolicy
    capsys.readouterr()
    assert main(["analyze-flow", "--checkpoint", str(run_dir / "checkpoints" / "step_2" / "ema"), "--n", "4",
                 "--num-steps", "2", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["jac_residual_max"] <= -stats["certified_rate_min"] + 1e-4
    # certified rate, measured refined field, ISS-style gains (refined and base), what the residual learned, pairing
    assert {"jac_full_max", "gain_noise_max", "gain_obs_max", "base_gain_obs_max", "base_gain_noise_max",
            "residual_drift_norm_mean", "residual_xdep_norm_mean", "code_redecode_rmse"} <= set(stats)
    assert main(["finetune", "--checkpoint", str(pretrained), "run_dir=" + str(tmp_path / "bad"), "mle.nope=1"]) == 2
    assert "mle.nope" in capsys.readouterr().err


def test_cached_codes_are_the_inversions_and_are_reused(pretrained, tmp_path):
    """The code cache holds exactly what on-the-fly inversion gives each window, and a resumed run reuses it."""
    from fm_policy.datasets.policy_data import build_policy_data

    from fm_policy.finetune.codes import CODES_FILE
    from fm_policy.finetune.run import build_finetune_policy, resolve_data_config

    config = _ft_config(pretrained, tmp_path / "run", "loop.steps=3")
    finetune(config)
    cache = tmp_path / "run" / CODES_FILE
    stamp = cache.stat().st_mtime_ns
    codes = load_file(cache)["codes"]
    wrapper = build_finetune_policy(_ft_config(pretrained, tmp_path / "x"))
    pcfg = wrapper.config
    data = build_policy_data(resolve_data_config(config, wrapper.model), pcfg.horizon, pcfg.n_obs_steps,
                             pcfg.n_action_steps)
    assert codes.shape == (len(data.train), *wrapper.noise_shape)
    batch = data.train[np.arange(5)]
    x1 = wrapper.normalizer.normalize("action", batch["action"])
    fresh = wrapper.pair({"state": batch["state"]}, x1)
    torch.testing.assert_close(codes[:5], fresh, rtol=1e-5, atol=1e-5)
    finetune(_ft_config(pretrained, tmp_path / "run", "loop.steps=6"))  # resume: same fingerprint, cache reused
    assert cache.stat().st_mtime_ns == stamp


def test_finetuned_policy_deploys_at_its_tuned_step_count(pretrained, tmp_path, capsys):
    """A model tuned through a 2-step sampler is saved as a 2-step policy: select_action, the harness, the server
    spec and analyze-flow all default to 2 steps (the pre-trained policy's default is 8)."""
    from fm_policy.eval.run import evaluate_policy

    from fm_policy.cli import main
    from fm_policy.deploy.protocol import spec_from_policy

    assert load_policy(pretrained).config.num_inference_steps == 8
    checkpoint = finetune(_ft_config(pretrained, tmp_path / "two", "mle.decode_steps=2", "loop.steps=3"))
    policy = load_policy(checkpoint / "ema")
    assert (policy.config.num_inference_steps, policy.config.solver) == (2, "euler")
    used: list[int] = []
    sample = policy._sample
    policy._sample = lambda cond, steps, solver, noise: used.append(steps) or sample(cond, steps, solver, noise)
    policy.reset()
    policy.select_action({"state": torch.rand(1, 5) * 300 + 100})
    evaluate_policy(policy, "pusht", {"max_episode_steps": 8}, n_episodes=1, progress=False)
    assert used and set(used) == {2}, used
    assert spec_from_policy(policy).num_steps == 2
    capsys.readouterr()
    assert main(["analyze-flow", "--checkpoint", str(checkpoint / "ema"), "--n", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_steps"] == 2
    with pytest.raises(ConfigError, match="mle.deploy_steps"):
        finetune(_ft_config(pretrained, tmp_path / "any", "mle.decode_steps_choices=[1,2]"))
    any_step = finetune(_ft_config(pretrained, tmp_path / "any", "mle.decode_steps_choices=[1,2]",
                                   "mle.deploy_steps=1", "loop.steps=3"))
    assert load_policy(any_step / "ema").config.num_inference_steps == 1


# ---------------------------------------------------------------------------------------------------------------
# the pairing: accurate by default, checked by the run, cached by content


def _code_rmse(policy: FlowPolicy, batch: dict[str, torch.Tensor], config: MLEConfig) -> float:
    """RMS distance of the codes of `config`'s encode from the true preimages (dopri5 at 1e-7)."""
    wrapper = mle_finetune_policy(copy.deepcopy(policy), config, "mle")
    x1 = policy.normalizer.normalize("action", batch["action"])
    cond = policy.encode_obs({"state": batch["state"]})
    with torch.no_grad():
        truth = solve(lambda t, x: policy.velocity(t, x, cond), x1, "dopri5", 1, t0=1.0, t1=0.0, rtol=1e-7,
                      atol=1e-7).x
    return float((wrapper.encode(x1, cond) - truth).square().mean().sqrt())


def test_default_encode_is_accurate_where_the_old_default_was_not(toy_flow):
    """On the toy policy (sinusoidal time features that vary fast in t) the former default, rk4 x16, gives codes 0.19
    RMS off the true preimages; the default adaptive encode is within 1e-3 (measured 6e-4)."""
    batch = _toy_batch(64, torch.Generator().manual_seed(7))
    assert _code_rmse(toy_flow, batch, MLEConfig(encode_solver="rk4", encode_steps=16)) > 0.1
    assert _code_rmse(toy_flow, batch, MLEConfig()) < 2e-3


def test_code_check_measures_the_pairing_and_warns_when_it_is_poor(toy_flow):
    from fm_policy.finetune.codes import check_codes

    class Windows:  # the two things check_codes reads of a SequenceDataset
        def __init__(self, batch):
            self.batch = batch

        def __len__(self):
            return len(self.batch["action"])

        def __getitem__(self, indices):
            return {k: v[torch.as_tensor(indices)] for k, v in self.batch.items()}

    windows = Windows(_toy_batch(64, torch.Generator().manual_seed(8)))
    poor = mle_finetune_policy(copy.deepcopy(toy_flow), MLEConfig(encode_solver="rk4", encode_steps=2), "mle")
    with pytest.warns(UserWarning, match="pair poorly"):
        out = check_codes(poor, windows, None, samples=32, tol=0.01)
    assert out["code_check_n"] == 32 and out["code_redecode_rmse"] > 0.01
    assert out["code_redecode_max"] >= out["code_redecode_rmse"]
    good = mle_finetune_policy(copy.deepcopy(toy_flow), MLEConfig(), "mle")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = check_codes(good, windows, None, samples=32, tol=0.01)
    assert out["code_redecode_rmse"] < 1e-3
    # cached codes are checked as they are: wrong codes are caught
    codes = torch.zeros(64, 1, 2)
    with pytest.warns(UserWarning, match="pair poorly"):
        check_codes(good, windows, codes, samples=16, tol=0.01)


def test_the_run_records_the_code_check_and_warns_on_a_poor_encode(pretrained, tmp_path):
    with pytest.warns(UserWarning, match="pair poorly"):
        finetune(_ft_config(pretrained, tmp_path / "poor", "loop.steps=1", "loop.checkpoint_every=1",
                            "mle.encode_steps=1", "mle.code_check_tol=1e-6"))
    session = json.loads((tmp_path / "poor" / "training_sessions.json").read_text())[-1]
    assert session["code_check"]["code_redecode_rmse"] > 1e-6 and session["code_check"]["code_check_n"] == 81


def test_code_cache_is_keyed_by_checkpoint_content_not_path(pretrained, tmp_path, monkeypatch):
    """The same weights copied elsewhere reuse a run's codes; other weights at that same path are encoded anew."""
    import shutil

    from fm_policy.finetune import codes as codes_module
    from fm_policy.finetune.codes import CODES_FILE, checkpoint_content_hash

    encoded: list[int] = []
    encode_windows = codes_module.encode_windows
    monkeypatch.setattr(codes_module, "encode_windows",
                        lambda *a, **k: encoded.append(1) or encode_windows(*a, **k))
    finetune(_ft_config(pretrained, tmp_path / "a", "loop.steps=1", "loop.checkpoint_every=1"))
    assert len(encoded) == 1
    first = load_file(tmp_path / "a" / CODES_FILE)["codes"]

    run_root = pretrained.parents[2]  # .../pre (config.yaml, checkpoints/step_30/ema)
    moved = tmp_path / "moved" / "pre"
    shutil.copytree(run_root, moved)
    copy_ckpt = moved / pretrained.relative_to(run_root)
    assert checkpoint_content_hash(copy_ckpt) == checkpoint_content_hash(pretrained)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / CODES_FILE, tmp_path / "b" / CODES_FILE)
    finetune(_ft_config(copy_ckpt, tmp_path / "b", "loop.steps=1", "loop.checkpoint_every=1"))
    assert len(encoded) == 1  # reused: same content, other path
    assert torch.equal(load_file(tmp_path / "b" / CODES_FILE)["codes"], first)

    changed = load_policy(copy_ckpt)
    with torch.no_grad():
        changed.net.out.bias.add_(0.5)
    changed.save_pretrained(copy_ckpt)  # new weights at the same path
    assert checkpoint_content_hash(copy_ckpt) != checkpoint_content_hash(pretrained)
    (tmp_path / "c").mkdir()
    shutil.copy(tmp_path / "a" / CODES_FILE, tmp_path / "c" / CODES_FILE)
    finetune(_ft_config(copy_ckpt, tmp_path / "c", "loop.steps=1", "loop.checkpoint_every=1"))
    assert len(encoded) == 2  # stale codes are not used
    assert not torch.allclose(load_file(tmp_path / "c" / CODES_FILE)["codes"], first, atol=1e-3)


def test_terminal_refiner_saves_loads_and_starts_at_the_base_policy(pretrained, tmp_path):
    """`residual.placement=terminal` through `finetune`: the saved policy loads as a residual policy with its
    refinement stage (same actions after loading), declares no fused export, and before training reproduces the
    base policy exactly (the zero-init monotone refiner is the identity)."""
    from fm_policy.residual_policy import TerminalResidualFlowPolicy

    base = load_policy(pretrained)
    fresh = ResidualFlowPolicy.from_base(base, ResidualConfig(kind="monotone", width=8, cond_hidden=8,
                                                              placement="terminal", refine_steps=3))
    assert type(fresh) is TerminalResidualFlowPolicy and not type(fresh).supports_fused_export
    obs = {"state": torch.rand(3, 2, 5) * 300 + 100}
    noise = torch.randn(3, 8, 2)
    assert torch.equal(fresh.eval().generate_chunk(obs, 2, noise=noise), base.generate_chunk(obs, 2, noise=noise))

    checkpoint = finetune(_ft_config(pretrained, tmp_path / "term", "method=residual", "residual.width=8",
                                     "residual.placement=terminal", "residual.refine_steps=3", "mle.decode_steps=2",
                                     "loop.steps=3", "optim.lr=1e-2"))
    tuned = load_policy(checkpoint / "policy")
    assert type(tuned) is TerminalResidualFlowPolicy and isinstance(tuned, ResidualFlowPolicy)
    assert tuned.config.residual.placement == "terminal" and tuned.refine_steps == 3
    again = load_policy(checkpoint / "policy")
    a = tuned.generate_chunk(obs, noise=noise)
    assert torch.equal(a, again.generate_chunk(obs, noise=noise))
    assert not torch.equal(a, base.generate_chunk(obs, 2, noise=noise))  # the stage changed the actions
    # the flow itself is the base's: only the stage differs
    cond = tuned.encode_obs(obs)
    flow = solve(lambda t, x: tuned.velocity(t, x, cond), noise, "euler", 2).x
    base_flow = solve(lambda t, x: base.velocity(t, x, cond), noise, "euler", 2).x
    assert torch.equal(flow, base_flow)
    torch.testing.assert_close(tuned.normalizer.normalize("action", a), tuned.refine(flow, cond))
