"""Gradual fine-tuning (GFT): the objective's end points (w = 0 is plain fine-tuning on the same draws; w = 1 has the
pre-trained model as its optimum), the weight schedules, `finetune()` end to end with exact resume and the w log,
config errors, the `--data` / `--method ft` CLI, and collecting Push-T variant demos with `--goal`.

(The variant goal itself being respected by the env and the expert is covered by tests/test_pusht_env.py and
tests/test_pusht_expert.py.)"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch
from fm_policy.datasets.replay_buffer import ReplayBuffer
from tiny_flow import pretrain_tiny_flow, tiny_state_store

from fm_policy.config import ConfigError, load_config
from fm_policy.factory import load_policy
from fm_policy.finetune.gft import SCHEDULES, GFTConfig, GFTFinetunePolicy, gft_finetune_policy, gft_weight
from fm_policy.finetune.run import FinetuneConfig, finetune
from fm_policy.flow_matching import LinearPath
from fm_policy.flow_policy import FlowPolicy

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny flow policy pre-trained for 30 steps by train() (its EMA folder, as GFT expects)."""
    root = tmp_path_factory.mktemp("gft")
    return pretrain_tiny_flow(root, tiny_state_store(root / "source.zarr", 4, 20.0, 0))


@pytest.fixture(scope="module")
def variant_store(tmp_path_factory) -> str:
    return tiny_state_store(tmp_path_factory.mktemp("gft_variant") / "variant.zarr", 3, -15.0, 1)


def _batch(policy: FlowPolicy, n: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    c = policy.config
    return {"state": torch.rand(n, c.n_obs_steps, 5, generator=g) * 300 + 100,
            "action": torch.rand(n, c.horizon, 2, generator=g) * 300 + 100}


# ---------------------------------------------------------------------------------------------------------------
# the objective


def test_w0_gft_loss_equals_plain_finetuning_loss_on_the_same_draws(pretrained):
    student = load_policy(pretrained)
    wrapper = gft_finetune_policy(student, GFTConfig(w0=0.7, anneal_fraction=0.5)).train()
    batch = _batch(student)
    wrapper.on_train_step(60, 100)  # past the anneal: w = 0
    assert wrapper.weight == 0.0
    torch.manual_seed(5)
    gft = wrapper.compute_loss(batch)["loss"]
    torch.manual_seed(5)
    plain = student.compute_loss(batch)["loss"]  # FlowPolicy's own flow-matching loss = plain fine-tuning
    assert torch.equal(gft, plain)
    # method "ft" is the same objective at every step
    ft = gft_finetune_policy(copy.deepcopy(student), GFTConfig(), method="ft").train()
    assert ft.teacher is None and ft.on_train_step(0, 100) == {"gft_w": 0.0}
    torch.manual_seed(5)
    assert torch.equal(ft.compute_loss(batch)["loss"], plain)


def test_intermediate_w_regresses_onto_the_blend_of_data_and_teacher_velocities(pretrained):
    student, teacher = load_policy(pretrained), load_policy(pretrained)
    with torch.no_grad():  # make the student differ from the teacher
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    wrapper = GFTFinetunePolicy(student, teacher, GFTConfig(w0=0.8, anneal_fraction=1.0)).train()
    wrapper.on_train_step(25, 100)
    w = wrapper.weight
    assert w == pytest.approx(0.6)
    batch = _batch(student)
    torch.manual_seed(9)
    out = wrapper.compute_loss(batch)
    # the same draws by hand: noise, then t, as FlowPolicy._loss
    torch.manual_seed(9)
    obs = {"state": batch["state"]}
    x1 = student.normalizer.normalize("action", batch["action"])
    noise = torch.randn(x1.shape)
    t = student.time_sampler.sample(x1.shape[0])
    x_t, u = LinearPath().sample(x1, t, noise)
    with torch.no_grad():
        pred = student.velocity(t, x_t, student.encode_obs(obs))
        v_pre = teacher.velocity(t, x_t, teacher.encode_obs(obs))
    expected = (pred - ((1 - w) * u + w * v_pre)).square().mean()
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(out["fm_loss"]) == pytest.approx(float((pred - u).square().mean()), rel=1e-5)
    wrapper.eval()  # validation: the true target objective (w = 0)
    torch.manual_seed(9)
    assert float(wrapper.compute_loss(batch)["loss"].detach()) == pytest.approx(float(out["fm_loss"]), rel=1e-5)


def test_w1_optimum_is_the_pretrained_model(pretrained):
    """At w = 1 the target is the teacher's own field, so the freshly initialised student (= teacher) has loss 0
    and zero gradient: the pre-trained model is a minimiser."""
    wrapper = gft_finetune_policy(load_policy(pretrained), GFTConfig(w0=1.0)).train()
    wrapper.on_train_step(0, 100)
    assert wrapper.weight == 1.0
    loss = wrapper.compute_loss(_batch(wrapper.model))["loss"]
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in wrapper.parameters())
    # only the student is trainable; the teacher is frozen and never in parameters()
    assert {id(p) for p in wrapper.parameters()} == {id(p) for p in wrapper.model.parameters()}
    assert not any(p.requires_grad for p in wrapper.teacher.parameters())


def test_checkpoints_hold_a_plain_flow_policy(pretrained, tmp_path):
    wrapper = gft_finetune_policy(load_policy(pretrained), GFTConfig())
    wrapper.save_pretrained(tmp_path / "saved")
    loaded = load_policy(tmp_path / "saved")
    assert type(loaded) is FlowPolicy
    assert set(loaded.state_dict()) == set(wrapper.model.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# schedules


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("total,fraction", [(1000, 0.6), (97, 0.3), (10, 1.0)])
def test_schedule_starts_at_w0_reaches_zero_at_the_fraction_and_stays(schedule, total, fraction):
    config = GFTConfig(schedule=schedule, w0=0.8, anneal_fraction=fraction, stages=4, beta=0.5)
    ws = [gft_weight(s, total, config) for s in range(total)]
    end = math.ceil(fraction * total)  # first step with s >= fraction * total
    assert ws[0] == pytest.approx(0.8)
    assert all(w == 0.0 for w in ws[end:])
    assert all(w > 0.0 for w in ws[:end])  # positive until the configured fraction ...
    assert all(a >= b for a, b in itertools.pairwise(ws))  # ... and never increasing
    assert all(0.0 <= w <= 0.8 for w in ws)


def test_schedule_shapes():
    lin, cos = GFTConfig(schedule="linear", w0=0.6, anneal_fraction=0.5), GFTConfig(schedule="cosine", w0=0.6,
                                                                                      anneal_fraction=0.5)
    assert gft_weight(25, 100, lin) == pytest.approx(0.3)
    assert gft_weight(25, 100, cos) == pytest.approx(0.3)  # cosine crosses w0 / 2 at mid-anneal too ...
    assert gft_weight(10, 100, cos) > gft_weight(10, 100, lin)  # ... but starts flatter
    step = GFTConfig(schedule="step", w0=0.8, anneal_fraction=0.5, stages=5, beta=0.5)
    assert [gft_weight(s, 100, step) for s in (0, 9, 10, 29, 30, 49, 50)] == pytest.approx(
        [0.8, 0.8, 0.4, 0.2, 0.1, 0.05, 0.0])
    assert gft_weight(0, 100, GFTConfig(w0=0.0)) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# finetune() end to end


def _ft_config(checkpoint: Path, run_dir: Path, data: str, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [
        f"checkpoint={checkpoint}", f"run_dir={run_dir}", f"data.path={data}", "data.obs_keys=[state]",
        "data.val_ratio=0.34", "method=gft", "gft.w0=0.9", "gft.anneal_fraction=0.5", "loop.batch_size=16",
        "loop.steps=8", "loop.log_every=1", "loop.val_every=4", "loop.val_batches=1", "loop.checkpoint_every=4",
        "loop.progress=false", "optim.lr=1e-3", "optim.warmup_steps=1", *overrides,
    ])


@pytest.mark.parametrize("kill_at", [
    3,  # an epoch boundary (3 batches per epoch here), mid-anneal (w = 0.45)
    2,  # mid-epoch, mid-anneal (the DataLoader's own generator keeps this exact)
])
def test_gft_finetune_resume_is_exact_and_logs_w(pretrained, variant_store, tmp_path, monkeypatch, kill_at):
    """Killed after a checkpoint during the anneal, the same command resumes to the weights of an uninterrupted
    run: w is a function of the restored step, and the teacher is rebuilt from the checkpoint."""
    from fm_policy.trainer import Trainer

    overrides = ("loop.steps=12", f"loop.checkpoint_every={kill_at}", "loop.val_every=3", "loop.keep_checkpoints=10")
    straight = finetune(_ft_config(pretrained, tmp_path / "straight", variant_store, *overrides))
    assert straight.name == "step_12"
    events = b"".join(p.read_bytes() for p in (tmp_path / "straight" / "tb").glob("events.*"))
    assert b"train/gft_w" in events and b"val/loss" in events
    before = load_policy(pretrained).state_dict()
    after = load_policy(straight / "ema").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    save = Trainer.save_checkpoint

    def save_then_die(self):
        path = save(self)
        if self.step == kill_at:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(_ft_config(pretrained, tmp_path / "resumed", variant_store, *overrides))
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    resumed = finetune(_ft_config(pretrained, tmp_path / "resumed", variant_store, *overrides))
    for part in ("policy", "ema"):
        a, b = load_policy(straight / part).state_dict(), load_policy(resumed / part).state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{part}/{key} differs after resume"


def test_gft_differs_from_ft_only_through_the_teacher(pretrained, variant_store, tmp_path):
    """Same seed, same data: gft and ft draw identical batches, noise and times, so their runs differ only by w."""
    gft = finetune(_ft_config(pretrained, tmp_path / "gft", variant_store, "loop.steps=4", "loop.val_every=0"))
    ft = finetune(_ft_config(pretrained, tmp_path / "ft", variant_store, "loop.steps=4", "loop.val_every=0",
                             "method=ft"))
    same_w0 = finetune(_ft_config(pretrained, tmp_path / "gft0", variant_store, "loop.steps=4", "loop.val_every=0",
                                  "gft.w0=0"))
    a, b, c = (load_policy(p / "policy").state_dict() for p in (gft, ft, same_w0))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_bad_gft_configs_raise_config_errors(pretrained, variant_store, tmp_path):
    for override, message in [("gft.schedule=exp", "gft.schedule 'exp'"), ("gft.w0=1.5", "gft.w0"),
                              ("gft.anneal_fraction=0", "gft.anneal_fraction"), ("gft.stages=0", "gft.stages"),
                              ("gft.beta=1.0", "gft.beta"), ("method=gradual", "method 'gradual'")]:
        with pytest.raises(ConfigError, match=message):
            finetune(_ft_config(pretrained, tmp_path / "bad", variant_store, override))
    # a teacher must share the student's normalised action space
    teacher = load_policy(pretrained)
    teacher.normalizer.load_state_dict({k: v * 2 for k, v in teacher.normalizer.state_dict().items()})
    with pytest.raises(ConfigError, match="normaliser differs"):
        GFTFinetunePolicy(load_policy(pretrained), teacher, GFTConfig())


def test_cli_finetune_ft_with_data(pretrained, variant_store, tmp_path, capsys):
    from fm_policy.cli import main

    run_dir = tmp_path / "cli"
    assert main(["finetune", "--method", "ft", "--checkpoint", str(pretrained), "--data", variant_store,
                 f"run_dir={run_dir}", "data.obs_keys=[state]", "loop.steps=2", "loop.batch_size=8",
                 "loop.val_every=0", "loop.checkpoint_every=2", "loop.progress=false"]) == 0
    assert variant_store in (run_dir / "config.yaml").read_text()
    assert type(load_policy(run_dir / "checkpoints" / "step_2" / "ema")) is FlowPolicy
    capsys.readouterr()
    assert main(["finetune", "--method", "gft", "--checkpoint", str(pretrained), f"run_dir={tmp_path / 'b'}",
                 "gft.schedule=exp"]) == 2
    assert "gft.schedule" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Push-T variant demos


def test_collect_goal_variant_stores_the_goal_and_reaches_it(tmp_path, capsys):
    """`fm-policy collect --goal X,Y,ANGLE` records expert demos of the variant; the goal is in the attributes and
    the stored episode ends with the block at that goal, not at the default one."""
    pytest.importorskip("gym_pusht")
    from fm_policy.cli import main

    goal = (190.0, 310.0, -1.0)
    out = str(tmp_path / "variant.zarr")
    assert main(["collect", "--episodes", "1", "--seed", "5", "--obs", "state", "--out", out,
                 "--goal", "190,310,-1.0", "--no-progress"]) == 0
    with ReplayBuffer.open(out) as buffer:
        attrs = buffer.attrs
        state = buffer.load(["state"])["state"]
    assert attrs["source"]["goal_pose"] == pytest.approx(list(goal))
    assert attrs["fm_policy_collect"]["generation"]["env_kwargs"] == {"goal_pose": list(goal)}
    block = state[-1, 2:5]  # the last observation before the success step: block x, y, angle
    assert math.hypot(block[0] - goal[0], block[1] - goal[1]) < 20.0
    assert math.hypot(block[0] - 256.0, block[1] - 256.0) > 40.0
    with pytest.raises(SystemExit) as bad:  # argparse: usage error, exit 2
        main(["collect", "--episodes", "1", "--out", str(tmp_path / "x.zarr"), "--goal", "1,2"])
    assert bad.value.code == 2 and "X,Y,ANGLE" in capsys.readouterr().err


def test_benchmark_arms_parse_and_pair_like_with_like():
    """The GFT benchmark's arms: method, coupling, schedule override and seed count from one spec, and each arm is
    compared only with the arm that differs from it in one respect."""
    from fm_policy.eval.benchmarks.bench_gft import Arm, BenchConfig, _split_arms, comparison_pairs, steps_to_threshold

    specs = _split_arms("scratch,ft,gft,ft+ot*3,gft+ot*3,gft(w0=0.3,anneal=1)*3")
    assert specs[-1] == "gft(w0=0.3,anneal=1)*3"
    arms = [Arm.parse(s) for s in specs]
    assert arms[3] == Arm("ft", "ot", seeds=3) and arms[3].n_seeds(5) == 3 and arms[0].n_seeds(5) == 5
    assert arms[5].name == "gft(w0=0.3,anneal=1)" and arms[5].w0 == 0.3 and arms[5].anneal == 1.0
    assert arms[5].folder == "gft_w0=0.3_anneal=1"
    pairs = set(comparison_pairs(BenchConfig(methods=specs)))
    assert pairs == {("ft", "scratch"), ("gft", "ft"), ("gft", "scratch"), ("ft+ot", "ft"), ("gft+ot", "ft+ot"),
                     ("gft+ot", "gft"), ("gft(w0=0.3,anneal=1)", "gft")}
    for bad in ("sgd", "ft(w0=0.3)", "gft(lr=1)"):
        with pytest.raises(SystemExit):
            Arm.parse(bad)
    curve = [{"step": 500, "success": 0.1}, {"step": 1000, "success": 0.35}, {"step": 1500, "success": 0.2}]
    assert steps_to_threshold(curve, 0.3) == 1000 and steps_to_threshold(curve, 0.5) is None
