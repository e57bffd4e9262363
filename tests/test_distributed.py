"""Data-parallel training with real launchers: 2 CPU processes (gloo over loopback) against 1 process.

One `torchrun` launch runs `tests/dist_driver.py` on 2 processes: a straight 6-step run, the same run stopped after
its step-3 checkpoint, and a 2-step MLE fine-tune, recording each process's batches and a digest of its weights after
every step. One `accelerate launch` of the real `train-policy` resumes the stopped run. In this process: the same run
on 1 process, and the stopped run resumed on 1 process (another process count).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fm_policy.datasets.sampler import SequenceDataset
from tiny_flow import tiny_state_store

from fm_policy.checkpoint import verify_checkpoint_dir
from fm_policy.config import ConfigError
from fm_policy.factory import load_policy
from fm_policy.train import load_train_config, train

HERE = Path(__file__).parent
STEPS, STOP = 6, 3


def _args(store: str) -> list[str]:
    return [
        "--config", "quickstart", f"data.path={store}", "data.obs_keys=[state]", "data.val_ratio=0.2",
        "policy.network.kind=mlp", "policy.network.hidden_dims=[32,32]", "policy.network.time_embed_dim=16",
        "policy.horizon=8", "policy.n_action_steps=4", "loop.batch_size=16", f"loop.steps={STEPS}",
        "loop.log_every=1", "loop.val_every=3", f"loop.checkpoint_every={STOP}", "loop.keep_checkpoints=2",
        "loop.progress=false", "loop.torch_threads=1", "optim.lr=3e-3", "optim.warmup_steps=2", "ema.power=0.5",
        "loop.grad_accum_steps=2",
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE), "CUDA_VISIBLE_DEVICES": "",
            "SDL_VIDEODRIVER": "dummy", "TQDM_DISABLE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str]) -> None:
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{command[:6]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def _weights(checkpoint: Path, part: str) -> dict[str, torch.Tensor]:
    return load_policy(checkpoint / part).state_dict()


def _assert_close(a: Path, b: Path) -> None:
    for part in ("policy", "ema"):
        wa, wb = _weights(a, part), _weights(b, part)
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6, msg=f"{part}/{key}")


def _in_process_run(store: str, run_dir: Path, monkeypatch) -> list[list[int]]:
    """The same run on 1 process, recording its training batches."""
    batches: list[list[int]] = []
    gather = SequenceDataset.__getitem__

    def recording(self, index):
        batches.append([len(self), np.atleast_1d(np.asarray(index)).tolist()])
        return gather(self, index)

    monkeypatch.setattr(SequenceDataset, "__getitem__", recording)
    train(load_train_config("quickstart", [*_args(store)[2:], f"run_dir={run_dir}"]))
    monkeypatch.setattr(SequenceDataset, "__getitem__", gather)
    return batches


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_across_process_counts(tmp_path, monkeypatch):
    store = tiny_state_store(tmp_path / "store.zarr", n_episodes=6)
    record, straight, stopped = tmp_path / "record", tmp_path / "straight", tmp_path / "stopped"
    record.mkdir()
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(HERE / "dist_driver.py"), str(record), str(straight), str(stopped), str(STOP),
          str(tmp_path / "finetune"), "--", *_args(store)])
    logs = {(name, r): json.loads((record / f"{name}_rank{r}.json").read_text())
            for name in ("straight", "interrupted", "finetune") for r in (0, 1)}

    # identical weights on both processes after every optimizer step (DDP all-reduced the gradients)
    for name, steps in (("straight", STEPS), ("interrupted", STOP), ("finetune", 2)):
        assert len(logs[name, 0]["digests"]) == steps and logs[name, 0]["digests"] == logs[name, 1]["digests"]

    # each process gathered a disjoint half of every global batch (2 micro-batches x 2 processes x 4 windows);
    # together they are exactly the 1-process batches
    one = _in_process_run(store, tmp_path / "one", monkeypatch)
    n_train = max(n for n, _ in one)
    reference = [idx for n, idx in one if n == n_train]
    shards = [[idx for n, idx in logs["straight", r]["batches"] if n == n_train] for r in (0, 1)]
    assert len(reference) == len(shards[0]) == len(shards[1]) == STEPS
    for full, a, b in zip(reference, *shards):
        assert len(a) == len(b) == 8 and not set(a) & set(b)
        assert a[:4] + b[:4] + a[4:] + b[4:] == full  # micro-batch 1 (rank 0, rank 1), then micro-batch 2
    # validation batches were read by the main process only
    assert any(n != n_train for n, _ in logs["straight", 0]["batches"])
    assert all(n == n_train for n, _ in logs["straight", 1]["batches"])

    # one set of checkpoint files, one TensorBoard log, one session record
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["latest", "step_3", "step_6"]
    for step in (3, 6):
        verify_checkpoint_dir(straight / "checkpoints" / f"step_{step}")
    assert len(list((straight / "tb").iterdir())) == 1
    sessions = json.loads((straight / "training_sessions.json").read_text())
    assert len(sessions) == 1 and sessions[0]["processes"] == 2 and sessions[0]["steps"] == [0, STEPS]

    # 2 processes reach the weights 1 process reaches with the same global batch
    final = straight / "checkpoints" / f"step_{STEPS}"
    _assert_close(final, tmp_path / "one" / "checkpoints" / f"step_{STEPS}")

    # the stopped run: resumed on 1 process (another process count) and by `accelerate launch` on 2
    assert (stopped / "checkpoints" / "latest").read_text().strip() == f"step_{STOP}"
    shutil.copytree(stopped, tmp_path / "stopped_one")
    train(load_train_config("quickstart", [*_args(store)[2:], f"run_dir={tmp_path / 'stopped_one'}"]))
    _assert_close(final, tmp_path / "stopped_one" / "checkpoints" / f"step_{STEPS}")
    script = Path(sys.executable).with_name("train-policy")
    entry = [str(script)] if script.exists() else ["-m", "fm_policy.train"]
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
          str(_free_port()), *entry, *_args(store), f"run_dir={stopped}"])
    _assert_close(final, stopped / "checkpoints" / f"step_{STEPS}")
    sessions = json.loads((stopped / "training_sessions.json").read_text())
    assert [s["steps"] for s in sessions] == [[STOP, STEPS]]  # the stopped session never reached its record

    # fine-tuning under the launcher: one set of checkpoints, one code cache
    tuned = tmp_path / "finetune"
    assert sorted(p.name for p in (tuned / "checkpoints").iterdir()) == ["latest", "step_2"]
    assert (tuned / "codes.safetensors").exists() and not list(tuned.glob("*.tmp"))


def test_global_batch_must_split_across_processes_and_micro_batches(tmp_path):
    store = tiny_state_store(tmp_path / "store.zarr", n_episodes=6)
    config = load_train_config("quickstart", [*_args(store)[2:], f"run_dir={tmp_path / 'run'}",
                                              "loop.grad_accum_steps=3"])
    with pytest.raises(ConfigError, match=r"loop.batch_size=16 is the global batch .* multiple of 3"):
        train(config)


def test_gradient_accumulation_equals_one_large_batch(tmp_path, monkeypatch):
    """With every sample's noise and time fixed, 2 micro-batches of 8 step like one batch of 16 (the draws are the
    only thing accumulation changes: each micro-batch draws for its own samples)."""
    from fm_policy.datasets.sampler import shard_batch

    from fm_policy import flow_policy
    from fm_policy.flow_matching import TimeSampler

    assert shard_batch(np.arange(16), 0, 1, 2).tolist() == list(range(16))
    assert shard_batch(np.arange(16), 1, 2, 2).tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    monkeypatch.setattr(flow_policy, "sample_noise", lambda shape, device=None, dtype=None: torch.zeros(shape))
    monkeypatch.setattr(TimeSampler, "sample", lambda self, n, device=None, generator=None: torch.full((n,), 0.5))
    store = tiny_state_store(tmp_path / "store.zarr", n_episodes=6)
    final = {}
    for accum in (1, 2):
        run_dir = tmp_path / f"accum{accum}"
        train(load_train_config("quickstart", [*_args(store)[2:], f"run_dir={run_dir}", "loop.steps=3",
                                               "loop.checkpoint_every=3", f"loop.grad_accum_steps={accum}"]))
        final[accum] = run_dir / "checkpoints" / "step_3"
    _assert_close(final[1], final[2])


def test_background_evaluation_logs_results_at_their_step(tmp_path, capsys):
    """eval.background=true: the weights of step 4 are evaluated in a spawned process while training goes on; a step
    that comes due meanwhile is skipped; the result is logged at step 4 when training ends."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = tiny_state_store(tmp_path / "store.zarr", n_episodes=6)
    run_dir = tmp_path / "run"
    train(load_train_config("quickstart", [*_args(store)[2:], f"run_dir={run_dir}", "loop.steps=8",
                                           "loop.eval_every=4", "loop.eval_episodes=1", "loop.eval_num_steps=[1]",
                                           "eval.background=true", "eval.env=pusht", "loop.grad_accum_steps=1"]))
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    logged = {e.step for e in events.Scalars("eval/score_steps1")}
    assert 4 in logged and logged <= {4, 8}
    assert json.loads((run_dir / "eval" / "step_4" / "result.json").read_text()).keys() == {
        "score_steps1", "success_steps1"}
    assert not (run_dir / "eval" / "step_4" / "policy").exists()  # the evaluated copy of the weights is dropped
    if 8 not in logged:
        assert "still running; skipping" in capsys.readouterr().out
