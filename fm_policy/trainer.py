"""Training loop for any policy with `compute_loss(batch)`: AdamW, warm-up + cosine schedule, EMA, clipping,
atomic checkpoints and exact resume, progress bar, TensorBoard, optional rollout evaluation.

Exact resume: a checkpoint holds the model, EMA, optimizer and scheduler states, every RNG state, and the step. The
batch order is a pure function of (seed, epoch), so a resumed run skips the batches it already saw and then draws
exactly the batches, noise and flow times the uninterrupted run would have drawn (checked by a test).

Data parallel (`accelerate launch` / `torchrun`, see README "Training on several GPUs or machines"): `loop.batch_size`
is the global batch of one optimizer step. It is cut into `loop.grad_accum_steps` micro-batches and each of those
into one shard per process (`fm_policy.datasets.sampler.shard_batch`); every process reads only its shards, DDP
averages the gradients, and per-sample noise and times are this process's rows of the global draw
(`fm_policy.distributed`). So N processes train on exactly the samples and random draws of one process with the same
global batch, every process's RNG state stays identical, and a run resumes exactly with another process count (the
batch size must still split evenly, else the resume is refused with the reason). EMA, checkpoints, validation,
rollout evaluation, TensorBoard and the session record live on the main process only.

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
from fm_policy.config import ConfigError
from fm_policy.datasets.policy_data import PolicyData
from fm_policy.datasets.sampler import make_dataloader
from fm_policy.distributed import sharded_draws, use_cpu
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
    device: str = "auto"  # auto | cpu | cuda | cuda:N (one process; launched processes use cuda:LOCAL_RANK)
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate; bf16 is the one to use on Ampere or newer GPUs)
    grad_accum_steps: int = 1  # micro-batches per optimizer step; batch_size stays the global batch of one step
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
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device: each launched process has its own
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if isinstance(state["cuda"], (list, tuple)):  # written before data-parallel training: every device's state
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Every RNG state as it was before the block (work done on the main process only must leave its RNG streams
    identical to the other processes')."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


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
        if loop.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"loop.mixed_precision '{loop.mixed_precision}' is unknown; choose no, fp16 or bf16")
        self.accelerator = Accelerator(cpu=use_cpu(loop.device), mixed_precision=loop.mixed_precision)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        if loop.device.startswith("cuda:"):
            if self.world > 1:
                raise ConfigError(f"loop.device={loop.device} names one GPU, but this run has {self.world} processes "
                                  "(each uses the GPU of its local rank); set loop.device=auto or cuda")
            torch.cuda.set_device(loop.device)
        if (loop.mixed_precision == "bf16" and self.accelerator.device.type == "cuda"
                and not torch.cuda.is_bf16_supported()):
            raise ConfigError("loop.mixed_precision=bf16: this GPU has no bf16 support; use fp16 or no")
        accum = loop.grad_accum_steps
        if accum < 1:
            raise ConfigError(f"loop.grad_accum_steps must be >= 1, got {accum}")
        if loop.batch_size % (accum * self.world):
            raise ConfigError(
                f"loop.batch_size={loop.batch_size} is the global batch of one optimizer step and must split evenly "
                f"into loop.grad_accum_steps={accum} micro-batches x {self.world} processes; choose a multiple of "
                f"{accum * self.world} (resuming keeps the global batch, so a resumed run needs a process count that "
                "divides it too)")
        self.micro_batch = loop.batch_size // (accum * self.world)  # samples per process per micro-batch
        self.policy = policy
        self.optimizer = torch.optim.AdamW(
            policy.parameters(), lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, eps=optim.eps
        )
        # The scheduler is stepped here once per optimizer step, not prepared: accelerate would step a prepared one
        # once per process (it assumes per-process batches), and the schedule must not depend on the process count.
        self.scheduler = get_scheduler(
            optim.lr_scheduler, self.optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=loop.steps
        )
        self.policy, self.optimizer = self.accelerator.prepare(self.policy, self.optimizer)
        self.ema = (  # only the main process saves and evaluates, so only it keeps the average
            EMAModel(
                self.unwrapped.parameters(),
                decay=ema.max_decay,
                use_ema_warmup=True,
                inv_gamma=ema.inv_gamma,
                power=ema.power,
                update_after_step=ema.update_after_step,
            )
            if ema.enabled and self.is_main
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
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.run_dir / "config.yaml.tmp"
            tmp.write_text(config_yaml)
            os.replace(tmp, self.run_dir / "config.yaml")
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
                    "processes": self.world,  # informational: a run resumes with any count that splits the batch
                    "grad_accum_steps": self.loop.grad_accum_steps,
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

    def checkpoint(self) -> None:
        """Every process calls this at a checkpoint step: the main process writes, the others wait for it."""
        if self.is_main:
            self.save_checkpoint()
        if self.world > 1:
            self.accelerator.wait_for_everyone()

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
        if self.ema_config.enabled and state["ema"] is None:
            raise CheckpointError(f"{path}: saved without EMA, but this run has ema.enabled=true")
        if self.ema is not None:
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
        """This process's micro-batches of each global batch of the epoch, from batch `skip` on: one list of
        `grad_accum_steps` batches of `micro_batch` samples per optimizer step."""
        accum = self.loop.grad_accum_steps
        loader = make_dataloader(
            self.data.train,
            self.loop.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            seed=self.loop.seed * 100_003 + epoch,
            skip_batches=skip,
            pin_memory=self.accelerator.device.type == "cuda",
            shard=self.rank,
            num_shards=self.world,
            micro_batches=accum,
        )
        size = self.micro_batch
        for batch in loader:
            batch = {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}
            yield [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(accum)]

    def _log(self, scalars: dict[str, float], step: int | None = None) -> None:
        if not self.is_main:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, self.step if step is None else step)

    def _train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over this process's micro-batches; returns its mean loss (this process's samples)."""
        accum, size = len(micro_batches), self.micro_batch
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for i, micro in enumerate(micro_batches):
            # gradients are all-reduced on the last micro-batch only
            sync = contextlib.nullcontext() if i == accum - 1 else self.accelerator.no_sync(self.policy)
            with sync:
                with sharded_draws(size, self.rank * size, size * self.world), self.accelerator.autocast():
                    loss = self.policy(micro)["loss"]  # forward = compute_loss, through the wrapper (DDP sync)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss.item()} at step {self.step}; lower optim.lr or check the data for outliers "
                        f"(the last good checkpoint is {latest_checkpoint(self.run_dir)})"
                    )
                self.accelerator.backward(loss / accum if accum > 1 else loss)
            losses.append(loss.detach())
        if self.optim_config.grad_clip_norm:
            self.accelerator.clip_grad_norm_(self.policy.parameters(), self.optim_config.grad_clip_norm)
        self.optimizer.step()
        if not self.optimizer.step_was_skipped:  # fp16: a step skipped for overflowing gradients does not count
            self.scheduler.step()
        if self.ema is not None:
            self.ema.step(self.unwrapped.parameters())
        return torch.stack(losses).mean() if accum > 1 else losses[0]

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        if self.data.val is None:
            return None
        policy = self.unwrapped
        policy.eval()
        losses = []
        with preserved_rng():  # validation must not shift the training RNG streams (nor make the main process's differ)
            torch.manual_seed(0)
            loader = make_dataloader(self.data.val, self.loop.batch_size, shuffle=True, seed=0, drop_last=False)
            for i, batch in enumerate(loader):
                if i >= self.loop.val_batches:
                    break
                batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
                losses.append(float(policy.compute_loss(batch)["loss"]))
        policy.train()
        return float(np.mean(losses)) if losses else None

    def _evaluate(self, evaluate) -> None:
        """Rollout evaluation of the EMA weights, on the main process: inline (`evaluate(policy) -> scalars`), or
        handed to a background evaluator (an object with `submit(step, policy)`, see `fm_policy.train`) that saves
        the weights and evaluates them in its own process while training continues."""
        with self.ema_weights() if self.ema is not None else contextlib.nullcontext(), preserved_rng():
            if hasattr(evaluate, "submit"):
                evaluate.submit(self.step, self.unwrapped)
            else:
                self._log({f"eval/{k}": v for k, v in evaluate(self.unwrapped).items()})
        self.policy.train()

    def _log_background(self, results) -> None:
        for step, scalars in results:
            self._log({f"eval/{k}": v for k, v in scalars.items()}, step=step)

    def train(self, evaluate=None) -> dict[str, Any]:
        """Run until `loop.steps`. `evaluate(policy) -> dict[str, float]` is called every `eval_every` steps (or
        `evaluate.submit(step, policy)` for a background evaluator), on the main process only."""
        loop = self.loop
        self.policy.train()
        background = evaluate is not None and hasattr(evaluate, "submit")
        bar = tqdm(total=loop.steps, initial=self.step, desc="train", unit="step",
                   disable=not loop.progress or not self.is_main)
        recent: list[float] = []
        # optional objective hook: a policy whose loss depends on training progress (e.g. the GFT weight schedule)
        # defines on_train_step(step, total_steps) -> scalars to log; a pure function of the step keeps resume exact
        step_hook = getattr(self.unwrapped, "on_train_step", None)
        step_scalars: dict[str, float] = {}
        last_time, last_step = time.perf_counter(), self.step
        history: dict[str, list] = {"step": [], "loss": []}
        while self.step < loop.steps:
            epoch, skip = divmod(self.step, self.batches_per_epoch)
            for micro_batches in self._batches(epoch, skip):
                if step_hook is not None:
                    step_scalars = step_hook(self.step, loop.steps) or {}
                loss = self._train_step(micro_batches)
                self.step += 1
                recent.append(float(loss.detach()))
                bar.update(1)

                if self.step % loop.log_every == 0 or self.step == loop.steps:
                    now = time.perf_counter()
                    rate = (self.step - last_step) / max(now - last_time, 1e-9)
                    last_time, last_step = now, self.step
                    mean_loss = float(np.mean(recent))
                    if self.world > 1:  # the mean over every process's samples, as one process would log it
                        mean_loss = float(self.accelerator.reduce(
                            torch.tensor(mean_loss, device=self.accelerator.device), reduction="mean"))
                    recent.clear()
                    history["step"].append(self.step)
                    history["loss"].append(mean_loss)
                    lr = self.scheduler.get_last_lr()[0]
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", steps_s=f"{rate:.1f}",
                                    **{k: f"{v:.3g}" for k, v in step_scalars.items()})
                    self._log({"train/loss": mean_loss, "train/lr": lr, "train/steps_per_s": rate,
                               "train/samples_per_s": rate * loop.batch_size,
                               **{f"train/{k}": v for k, v in step_scalars.items()}})
                if loop.val_every and self.step % loop.val_every == 0 and self.is_main:
                    val = self.validation_loss()
                    if val is not None:
                        self._log({"val/loss": val})
                if evaluate is not None and loop.eval_every and self.step % loop.eval_every == 0 and self.is_main:
                    self._evaluate(evaluate)
                if background and self.is_main:
                    self._log_background(evaluate.poll())
                if self.step % loop.checkpoint_every == 0 or self.step == loop.steps:
                    self.checkpoint()
                if self.step >= loop.steps:
                    break
        bar.close()
        if background and self.is_main:
            self._log_background(evaluate.close())
        if self._writer is not None:
            self._writer.flush()
        if self.world > 1:
            self.accelerator.wait_for_everyone()
        return history

