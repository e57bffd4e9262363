"""Training loop for any policy with `compute_loss(batch)`: AdamW, warm-up + cosine schedule, EMA, clipping,
atomic checkpoints and exact resume, progress bar, TensorBoard, optional rollout evaluation.

Exact resume: a checkpoint holds the model, EMA, optimizer and scheduler states, every RNG state, and the step. The
batch order is a pure function of (seed, epoch), so a resumed run skips the batches it already saw and then draws
exactly the batches, noise and flow times the uninterrupted run would have drawn (checked by a test).

Run directory::

    <run_dir>/config.yaml                    the resolved config
    <run_dir>/checkpoints/step_<N>/          policy/ (weights), ema/ (EMA weights, what evaluation uses),
                                             training_state.pt (optimizer, scheduler, EMA, RNG, step), manifest.json
    <run_dir>/checkpoints/latest             name of the newest complete checkpoint
    <run_dir>/tb/                            TensorBoard scalars
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from fm_policy.checkpoint import CheckpointError, verify_checkpoint_dir, write_checkpoint_dir
from fm_policy.datasets.policy_data import PolicyData
from fm_policy.datasets.sampler import make_dataloader
from fm_policy.errors import UserError

LATEST = "latest"
TRAINING_STATE = "training_state.pt"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 1e-6
    eps: float = 1e-8
    lr_scheduler: str = "cosine"  # any diffusers get_scheduler name: cosine, linear, constant_with_warmup, ...
    warmup_steps: int = 500
    grad_clip_norm: float | None = 1.0


@dataclass
class EMAConfig:
    enabled: bool = True
    power: float = 0.75  # diffusion_policy's EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power
    max_decay: float = 0.9999
    inv_gamma: float = 1.0
    update_after_step: int = 0


@dataclass
class LoopConfig:
    steps: int = 20000
    batch_size: int = 256
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    val_every: int = 1000
    val_batches: int = 8
    eval_every: int = 0  # rollout evaluation every N steps (0 = off); uses the EMA weights
    eval_episodes: int = 10
    eval_num_steps: list[int] = field(default_factory=lambda: [8])
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    torch_threads: int = 0  # 0 = leave torch's default
    progress: bool = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None. A corrupt newest one falls back to the one before."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    candidates = sorted(
        (p for p in folder.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=lambda p: int(p.name[5:])
    )
    for path in reversed(candidates):
        try:
            verify_checkpoint_dir(path)
            return path
        except CheckpointError as exc:
            print(f"warning: skipping {exc}")
    return None


def read_run_config(checkpoint_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The resolved config (run_dir/config.yaml, as a plain dict) of the training run that a saved policy belongs
    to: `run_dir/checkpoints/step_N/{policy,ema}` or `run_dir/checkpoints/step_N`. None for a policy saved on its
    own. Fine-tuning reads the pre-training data section from it; analysis tools read the store it trained on."""
    import yaml

    for parent in list(Path(checkpoint_dir).resolve().parents)[:4]:
        path = parent / "config.yaml"
        if path.exists() and (parent / "checkpoints").is_dir():
            return yaml.safe_load(path.read_text())
    return None


class Trainer:
    """Owns one training run: data, policy, optimisation state and the run directory."""

    def __init__(
        self,
        policy: torch.nn.Module,
        data: PolicyData,
        optim: OptimConfig,
        ema: EMAConfig,
        loop: LoopConfig,
        run_dir: str | os.PathLike,
        config_yaml: str,
        num_workers: int = 0,
    ):
        self.loop, self.optim_config, self.ema_config = loop, optim, ema
        self.run_dir = Path(run_dir)
        self.data = data
        self.num_workers = num_workers
        cpu = loop.device == "cpu" or (loop.device == "auto" and not torch.cuda.is_available())
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=loop.mixed_precision)
        if loop.device.startswith("cuda:"):
            torch.cuda.set_device(loop.device)
        self.policy = policy
        self.optimizer = torch.optim.AdamW(
            policy.parameters(), lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, eps=optim.eps
        )
        self.scheduler = get_scheduler(
            optim.lr_scheduler, self.optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=loop.steps
        )
        self.policy, self.optimizer, self.scheduler = self.accelerator.prepare(self.policy, self.optimizer, self.scheduler)
        self.ema = (
            EMAModel(
                self.unwrapped.parameters(),
                decay=ema.max_decay,
                use_ema_warmup=True,
                inv_gamma=ema.inv_gamma,
                power=ema.power,
                update_after_step=ema.update_after_step,
            )
            if ema.enabled
            else None
        )
        if self.ema is not None:
            self.ema.to(self.accelerator.device)
        self.step = 0
        self.batches_per_epoch = len(data.train) // loop.batch_size
        if self.batches_per_epoch == 0:
            raise UserError(
                f"batch_size {loop.batch_size} exceeds the {len(data.train)} training windows in {data.source}"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(config_yaml)
        self._writer = None

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.policy)

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        path = self.run_dir / "checkpoints" / f"step_{self.step}"
        policy = self.unwrapped

        def write(tmp: Path) -> None:
            policy.save_pretrained(tmp / "policy", atomic=False)
            if self.ema is not None:
                with self.ema_weights():
                    policy.save_pretrained(tmp / "ema", atomic=False)
            torch.save(
                {
                    "step": self.step,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "ema": self.ema.state_dict() if self.ema is not None else None,
                    "rng": rng_state(),
                },
                tmp / TRAINING_STATE,
            )

        write_checkpoint_dir(path, write)
        latest = self.run_dir / "checkpoints" / LATEST
        tmp_latest = latest.with_suffix(".tmp")
        tmp_latest.write_text(path.name)
        os.replace(tmp_latest, latest)
        self._prune_checkpoints()
        return path

    def _prune_checkpoints(self) -> None:
        folder = self.run_dir / "checkpoints"
        steps = sorted((p for p in folder.glob("step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
        for old in steps[: max(len(steps) - self.loop.keep_checkpoints, 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self, path: str | os.PathLike) -> None:
        path = Path(path)
        verify_checkpoint_dir(path)
        policy = self.unwrapped
        policy.load_weights(path / "policy")
        state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=False)
        # weights_only=False: numpy's RNG state is a tuple holding an ndarray; the file is one we wrote and verified
        # against its manifest above.
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise CheckpointError(f"{path}: saved without EMA, but this run has ema.enabled=true")
            self.ema.load_state_dict(state["ema"])
            self.ema.to(self.accelerator.device)
        set_rng_state(state["rng"])
        self.step = int(state["step"])

    class _EMAWeights:
        def __init__(self, trainer: Trainer):
            self.trainer = trainer

        def __enter__(self) -> None:
            params = list(self.trainer.unwrapped.parameters())
            self.trainer.ema.store(params)
            self.trainer.ema.copy_to(params)

        def __exit__(self, *exc: object) -> None:
            self.trainer.ema.restore(list(self.trainer.unwrapped.parameters()))

    def ema_weights(self) -> Trainer._EMAWeights:
        """Context manager: the policy holds the EMA weights inside, its own weights again after."""
        return Trainer._EMAWeights(self)

    # ---------------------------------------------------------------- loop
    def _batches(self, epoch: int, skip: int):
        loader = make_dataloader(
            self.data.train,
            self.loop.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            seed=self.loop.seed * 100_003 + epoch,
            skip_batches=skip,
            pin_memory=self.accelerator.device.type == "cuda",
        )
        for batch in loader:
            yield {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}

    def _log(self, scalars: dict[str, float]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, self.step)

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        if self.data.val is None:
            return None
        policy = self.unwrapped
        policy.eval()
        generator_state = torch.get_rng_state()  # validation must not shift the training RNG stream
        torch.manual_seed(0)
        losses = []
        loader = make_dataloader(self.data.val, self.loop.batch_size, shuffle=True, seed=0, drop_last=False)
        for i, batch in enumerate(loader):
            if i >= self.loop.val_batches:
                break
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            losses.append(float(policy.compute_loss(batch)["loss"]))
        torch.set_rng_state(generator_state)
        policy.train()
        return float(np.mean(losses)) if losses else None

    def train(self, evaluate=None) -> dict[str, Any]:
        """Run until `loop.steps`. `evaluate(policy) -> dict[str, float]` is called every `eval_every` steps."""
        loop = self.loop
        self.policy.train()
        bar = tqdm(total=loop.steps, initial=self.step, desc="train", unit="step", disable=not loop.progress)
        recent: list[float] = []
        # optional objective hook: a policy whose loss depends on training progress (e.g. the GFT weight schedule)
        # defines on_train_step(step, total_steps) -> scalars to log; a pure function of the step keeps resume exact
        step_hook = getattr(self.unwrapped, "on_train_step", None)
        step_scalars: dict[str, float] = {}
        last_time, last_step = time.perf_counter(), self.step
        history: dict[str, list] = {"step": [], "loss": []}
        while self.step < loop.steps:
            epoch, skip = divmod(self.step, self.batches_per_epoch)
            for batch in self._batches(epoch, skip):
                if step_hook is not None:
                    step_scalars = step_hook(self.step, loop.steps) or {}
                with self.accelerator.autocast():
                    loss = self.policy(batch)["loss"]  # forward = compute_loss, through the wrapper (DDP sync)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss.item()} at step {self.step}; lower optim.lr or check the data for outliers "
                        f"(the last good checkpoint is {latest_checkpoint(self.run_dir)})"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                self.accelerator.backward(loss)
                if self.optim_config.grad_clip_norm:
                    self.accelerator.clip_grad_norm_(self.policy.parameters(), self.optim_config.grad_clip_norm)
                self.optimizer.step()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.step(self.unwrapped.parameters())
                self.step += 1
                recent.append(float(loss.detach()))
                bar.update(1)

                if self.step % loop.log_every == 0 or self.step == loop.steps:
                    now = time.perf_counter()
                    rate = (self.step - last_step) / max(now - last_time, 1e-9)
                    last_time, last_step = now, self.step
                    mean_loss = float(np.mean(recent))
                    recent.clear()
                    history["step"].append(self.step)
                    history["loss"].append(mean_loss)
                    lr = self.scheduler.get_last_lr()[0]
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", steps_s=f"{rate:.1f}",
                                    **{k: f"{v:.3g}" for k, v in step_scalars.items()})
                    self._log({"train/loss": mean_loss, "train/lr": lr, "train/steps_per_s": rate,
                               "train/samples_per_s": rate * loop.batch_size,
                               **{f"train/{k}": v for k, v in step_scalars.items()}})
                if loop.val_every and self.step % loop.val_every == 0:
                    val = self.validation_loss()
                    if val is not None:
                        self._log({"val/loss": val})
                if evaluate is not None and loop.eval_every and self.step % loop.eval_every == 0:
                    with self.ema_weights() if self.ema is not None else contextlib.nullcontext():
                        self._log({f"eval/{k}": v for k, v in evaluate(self.unwrapped).items()})
                    self.policy.train()
                if self.step % loop.checkpoint_every == 0 or self.step == loop.steps:
                    self.save_checkpoint()
                if self.step >= loop.steps:
                    break
        bar.close()
        if self._writer is not None:
            self._writer.flush()
        return history

