"""Couplings of noise and action chunks: the minibatch-OT assignment (a permutation that never raises the transport
cost, the brute-force optimum on small batches, the observation cost keeping draws with their observations, the pad
mask), the config key (`policy.coupling`) in pre-training, GFT and plain fine-tuning, clear errors, and resuming runs
whose saved config predates the key."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import yaml
from tiny_flow import pretrain_tiny_flow, tiny_state_store

from fm_policy.config import ConfigError, load_config
from fm_policy.couplings import couple_noise, ode_path_length, ot_pair, transport_cost
from fm_policy.factory import load_policy
from fm_policy.finetune.gft import GFTConfig, gft_finetune_policy
from fm_policy.finetune.run import FinetuneConfig, finetune
from fm_policy.flow_policy import FlowPolicy
from fm_policy.train import load_train_config, train

torch.set_num_threads(1)


def _total(cost: torch.Tensor, perm: torch.Tensor) -> float:
    return float(cost[torch.arange(len(perm)), perm].sum())


# ---------------------------------------------------------------------------------------------------------------
# the assignment


@pytest.mark.parametrize("seed", range(5))
def test_ot_is_a_permutation_that_never_raises_the_transport_cost(seed):
    g = torch.Generator().manual_seed(seed)
    n = 3 + 7 * seed
    noise, actions = torch.randn(n, 8, 2, generator=g), torch.randn(n, 8, 2, generator=g) * 2 + 1
    cond = torch.randn(n, 6, generator=g)
    mask = torch.rand(n, 8, generator=g) > 0.2
    for obs, m, weight in ((None, None, 0.0), (cond, None, 0.5), (cond, mask, 3.0)):
        perm = ot_pair(noise, actions, obs, m, weight)
        assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(n))
        cost = transport_cost(noise, actions, obs, m, weight)
        identity = torch.arange(n)
        assert _total(cost, perm) <= _total(cost, identity) + 1e-9
        # the chunk part alone is never raised either (the identity costs nothing in observation terms)
        chunk = transport_cost(noise, actions, None, m)
        assert _total(chunk, perm) <= _total(chunk, identity) + 1e-9
    paired = couple_noise(noise, actions, cond, None, "ot", 0.0)
    assert torch.equal(paired, noise[ot_pair(noise, actions, cond, None, 0.0)])
    assert couple_noise(noise, actions, cond, None, "independent") is noise


@pytest.mark.parametrize("weight", [0.0, 0.3, 2.0])
def test_ot_equals_the_brute_force_optimum_for_five(weight):
    g = torch.Generator().manual_seed(11)
    noise, actions, cond = torch.randn(5, 4, 3, generator=g), torch.randn(5, 4, 3, generator=g), torch.randn(5, 2,
                                                                                                             generator=g)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[1, 2:] = False

    def total(perm) -> float:  # straight from the definition, not through transport_cost's expansion
        chunk = sum(float(((actions[j] - noise[p]).square() * mask[j, :, None]).sum()) / 12 for j, p in enumerate(perm))
        obs = sum(float((cond[j] - cond[p]).square().sum()) / 2 for j, p in enumerate(perm))
        return chunk + weight * obs

    best = min(total(p) for p in itertools.permutations(range(5)))
    found = ot_pair(noise, actions, cond, mask, weight).tolist()
    assert total(found) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_pad_mask_and_observation_cost_steer_the_pairing():
    # two samples: noise 0 sits on chunk 1 and noise 1 on chunk 0 -> OT swaps them
    actions = torch.tensor([[[0.0], [5.0]], [[3.0], [-5.0]]])
    noise = torch.tensor([[[3.0], [-5.0]], [[0.0], [5.0]]])
    assert ot_pair(noise, actions).tolist() == [1, 0]
    # the steps that make the swap worthwhile are padding: the loss ignores them, so must the pairing
    mask = torch.tensor([[True, False], [True, False]])
    assert ot_pair(torch.tensor([[[0.5], [-5.0]], [[3.5], [5.0]]]), actions, None, mask).tolist() == [0, 1]
    # distinct observations and a large weight: each sample keeps its own draw (the independent coupling) ...
    cond = torch.tensor([[0.0], [1.0]])
    assert ot_pair(noise, actions, cond, None, 1e3).tolist() == [0, 1]
    # ... identical observations swap freely at any weight
    assert ot_pair(noise, actions, torch.zeros(2, 1), None, 1e3).tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------------------------
# config


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return tiny_state_store(tmp_path_factory.mktemp("couplings") / "tiny.zarr", 4, 20.0, 0)


def _train_config(store: str, run_dir: Path, *overrides: str):
    return load_train_config(None, [
        f"data.path={store}", "data.obs_keys=[state]", "data.val_ratio=0.25", f"run_dir={run_dir}",
        "policy.network.kind=mlp", "policy.network.hidden_dims=[32,32]", "policy.network.time_embed_dim=16",
        "policy.horizon=8", "policy.n_action_steps=4", "loop.batch_size=16", "loop.steps=40", "loop.log_every=5",
        "loop.val_every=0", "loop.checkpoint_every=40", "loop.progress=false", "optim.lr=3e-3", "optim.warmup_steps=5",
        *overrides,
    ])


def _losses(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


def test_bad_coupling_values_are_clear_config_errors(store, tmp_path):
    with pytest.raises(ConfigError, match=r"policy.coupling 'sinkhorn' is unknown; choose one of \['independent', "
                                          r"'ot'\]"):
        train(_train_config(store, tmp_path / "bad", "policy.coupling=sinkhorn"))
    with pytest.raises(ConfigError, match="policy.coupling_cond_weight must be a finite number >= 0"):
        train(_train_config(store, tmp_path / "bad", "policy.coupling=ot", "policy.coupling_cond_weight=-1"))
    with pytest.raises(ConfigError, match="policy.coupling_cond_weight"):
        _train_config(store, tmp_path / "bad", "policy.coupling_cond_weight=heavy")  # OmegaConf: not a float
    ft = ["checkpoint=x", f"run_dir={tmp_path / 'ft'}", "method=ft"]
    with pytest.raises(ConfigError, match="policy.coupling 'exact' is unknown"):
        load_config(FinetuneConfig, None, [*ft, "policy.coupling=exact"]).validate()
    with pytest.raises(ConfigError, match="apply to --method gft or ft"):
        load_config(FinetuneConfig, None, [*ft, "method=mle", "policy.coupling=ot"]).validate()


def test_checkpoints_without_the_keys_load_with_the_independent_coupling(store, tmp_path):
    """A format-2 checkpoint written before the keys existed loads, and trains as it always did."""
    import json

    checkpoint = train(_train_config(store, tmp_path / "run", "loop.steps=5", "loop.checkpoint_every=5")) / "ema"
    meta = json.loads((checkpoint / "config.json").read_text())
    assert meta["format"] == 2 and meta["policy"]["coupling"] == "independent"
    del meta["policy"]["coupling"], meta["policy"]["coupling_cond_weight"]
    old = tmp_path / "old"
    old.mkdir()
    for name in ("model.safetensors", "normalizer.safetensors"):
        (old / name).write_bytes((checkpoint / name).read_bytes())
    (old / "config.json").write_text(json.dumps(meta))
    policy = load_policy(old)
    assert type(policy) is FlowPolicy and policy.config.coupling == "independent"


# ---------------------------------------------------------------------------------------------------------------
# training with it


@pytest.mark.parametrize("coupling", ["independent", "ot"])
def test_pretraining_lowers_the_loss_with_either_coupling(store, tmp_path, coupling):
    run_dir = tmp_path / coupling
    checkpoint = train(_train_config(store, run_dir, f"policy.coupling={coupling}", "policy.coupling_cond_weight=0",
                                     "loop.steps=150", "loop.log_every=15", "loop.checkpoint_every=150"))
    losses = _losses(run_dir)
    assert len(losses) == 10 and max(losses[-2:]) < 0.7 * losses[0], losses
    policy = load_policy(checkpoint / "ema")
    assert policy.config.coupling == coupling  # the checkpoint records how it was trained
    obs = {"state": torch.rand(4, 2, 5) * 300 + 100}
    measured = ode_path_length(policy, obs, num_steps=10)
    assert measured["path_length"] > 0 and measured["straightness"] >= 1.0 - 1e-5


def test_ot_changes_only_the_pairing(store, tmp_path):
    """With the same random state, ot and independent draw the same noise multiset and times; with a huge weight
    and distinct observations ot is the independent coupling exactly."""
    from fm_policy.factory import make_policy

    config = _train_config(store, tmp_path / "x").policy
    policy = make_policy(config, {"state": torch.rand(50, 5).numpy() * 300, "action": torch.rand(50, 2).numpy()},
                         ["state"])
    g = torch.Generator().manual_seed(0)
    x1, cond = torch.randn(12, 8, 2, generator=g), torch.randn(12, 10, generator=g)
    torch.manual_seed(1)
    noise, t = policy.training_draws(x1, cond, None)
    policy.config.coupling, policy.config.coupling_cond_weight = "ot", 0.0
    torch.manual_seed(1)
    paired, t_ot = policy.training_draws(x1, cond, None)
    assert torch.equal(t, t_ot) and not torch.equal(noise, paired)
    assert torch.equal(paired.flatten(1).sort(0).values, noise.flatten(1).sort(0).values)  # rows permuted
    policy.config.coupling_cond_weight = 1e6
    torch.manual_seed(1)
    assert torch.equal(policy.training_draws(x1, cond, None)[0], noise)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, store) -> Path:
    return pretrain_tiny_flow(tmp_path_factory.mktemp("pre"), store)


def _variant_loss(policy: FlowPolicy, store: str) -> float:
    """Mean flow-matching loss of `policy` (with an ot coupling) on windows of `store`, over fixed draws."""
    from fm_policy.datasets.policy_data import DataConfig, build_policy_data
    from fm_policy.datasets.sampler import make_dataloader

    policy.config.coupling, policy.config.coupling_cond_weight = "ot", 1.0
    c = policy.config
    data = build_policy_data(DataConfig(path=store, obs_keys=["state"], val_ratio=0.0), c.horizon, c.n_obs_steps,
                             c.n_action_steps)
    torch.manual_seed(0)
    with torch.no_grad():
        losses = [float(policy.compute_loss(batch)["loss"]) for _ in range(4)
                  for batch in make_dataloader(data.train, 16, seed=0)]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("method", ["gft", "ft"])
def test_finetuning_with_ot_trains(pretrained, tmp_path, method):
    variant = tiny_state_store(tmp_path / "variant.zarr", 3, -15.0, 1)
    run_dir = tmp_path / method
    config = load_config(FinetuneConfig, None, [
        f"checkpoint={pretrained}", f"run_dir={run_dir}", f"data.path={variant}", "data.obs_keys=[state]",
        "data.val_ratio=0.34", f"method={method}", "gft.w0=0.5", "gft.anneal_fraction=0.5", "loop.batch_size=16",
        "loop.steps=80", "loop.log_every=10", "loop.val_every=0", "loop.checkpoint_every=80", "loop.progress=false",
        "optim.lr=3e-3", "optim.warmup_steps=1", "policy.coupling=ot", "policy.coupling_cond_weight=1",
    ])
    checkpoint = finetune(config)
    tuned = load_policy(checkpoint / "policy")  # the trained weights (the EMA lags on so short a run)
    # the training loss moves with w; the plain (w = 0) objective on the new data, with the same coupling, falls
    before, after = _variant_loss(load_policy(pretrained), variant), _variant_loss(tuned, variant)
    assert after < 0.9 * before, (before, after)
    assert (tuned.config.coupling, tuned.config.coupling_cond_weight) == ("ot", 1.0)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["policy"]["coupling"] == "ot"


def test_gft_loss_uses_the_coupled_pairs(pretrained):
    """The GFT objective draws through the policy: at w = 0 it equals the policy's own OT loss on the same draws."""
    student = load_policy(pretrained)
    student.config.coupling, student.config.coupling_cond_weight = "ot", 0.0
    wrapper = gft_finetune_policy(student, GFTConfig(w0=0.5, anneal_fraction=0.5)).train()
    wrapper.on_train_step(80, 100)
    g = torch.Generator().manual_seed(3)
    batch = {"state": torch.rand(12, 2, 5, generator=g) * 300 + 100,
             "action": torch.rand(12, 8, 2, generator=g) * 300 + 100}
    torch.manual_seed(5)
    gft = wrapper.compute_loss(batch)["loss"]
    torch.manual_seed(5)
    assert torch.equal(gft, student.compute_loss(batch)["loss"])
    student.config.coupling = "independent"
    torch.manual_seed(5)
    assert not torch.equal(gft, student.compute_loss(batch)["loss"])


def test_runs_saved_before_the_keys_resume(store, tmp_path):
    """A run directory whose config.yaml predates policy.coupling resumes (the new keys hold their defaults); another
    coupling is still refused."""
    run_dir = tmp_path / "run"
    train(_train_config(store, run_dir, "loop.steps=5", "loop.checkpoint_every=5"))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["policy"]["coupling"], saved["policy"]["coupling_cond_weight"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert train(_train_config(store, run_dir, "loop.steps=10", "loop.checkpoint_every=5")).name == "step_10"
    with pytest.raises(ConfigError, match=r"differs in \['policy.coupling'\]"):
        train(_train_config(store, run_dir, "loop.steps=15", "loop.checkpoint_every=5", "policy.coupling=ot"))


def test_finetune_runs_saved_before_the_policy_section_resume(tmp_path):
    from fm_policy.config import config_to_yaml
    from fm_policy.train import _check_resume_config, config_defaults_yaml

    config = load_config(FinetuneConfig, None, ["checkpoint=x", f"run_dir={tmp_path}", "method=ft"])
    saved = yaml.safe_load(config_to_yaml(config))
    del saved["policy"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    _check_resume_config(tmp_path, config_to_yaml(config), config_defaults_yaml(config))  # accepted
    config.policy.coupling = "ot"
    with pytest.raises(ConfigError, match="another config"):
        _check_resume_config(tmp_path, config_to_yaml(config), config_defaults_yaml(config))
