"""Run by tests/test_distributed.py under a launcher (torchrun / accelerate launch), once per process.

    dist_driver.py RECORD_DIR RUN_DIR INTERRUPTED_RUN_DIR STEP FINETUNE_RUN_DIR -- TRAIN_ARGS...

Runs the real entry points (`fm_policy.cli.train_main`, `fm_policy.cli.main(["finetune", ...])`) with two
recording hooks: every index batch the training windows are gathered for, and a digest of the weights after every
optimizer step, written to RECORD_DIR/<run>_rank<R>.json. Then it trains INTERRUPTED_RUN_DIR with the same arguments
but stops every process right after the checkpoint of step STEP (as a killed job would), and fine-tunes the first
run's final EMA policy for two steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch


def main() -> int:
    separator = sys.argv.index("--")
    record, run_dir, interrupted_dir, stop_step, finetune_dir = sys.argv[1:separator]
    train_args = sys.argv[separator + 1 :]
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)

    from fm_policy.datasets.sampler import SequenceDataset

    from fm_policy.cli import EXIT_INTERRUPTED, train_main
    from fm_policy.cli import main as cli_main
    from fm_policy.trainer import Trainer

    log: dict[str, list] = {"batches": [], "digests": []}
    gather, train_step, checkpoint = SequenceDataset.__getitem__, Trainer._train_step, Trainer.checkpoint

    def recording_gather(self, index):
        log["batches"].append([len(self), np.atleast_1d(np.asarray(index)).tolist()])
        return gather(self, index)

    def recording_step(self, micro_batches):
        loss = train_step(self, micro_batches)
        flat = torch.cat([p.detach().reshape(-1) for p in self.unwrapped.parameters()]).numpy()
        log["digests"].append(hashlib.sha256(flat.tobytes()).hexdigest())
        return loss

    def dump(name: str) -> None:
        Path(record, f"{name}_rank{rank}.json").write_text(json.dumps(log))
        log["batches"], log["digests"] = [], []

    SequenceDataset.__getitem__ = recording_gather
    Trainer._train_step = recording_step

    assert train_main([*train_args, f"run_dir={run_dir}"]) == 0
    dump("straight")

    def checkpoint_then_stop(self):
        checkpoint(self)
        if self.step == int(stop_step):
            raise KeyboardInterrupt

    Trainer.checkpoint = checkpoint_then_stop
    assert train_main([*train_args, f"run_dir={interrupted_dir}"]) == EXIT_INTERRUPTED
    Trainer.checkpoint = checkpoint
    dump("interrupted")

    final = Path(run_dir, "checkpoints", Path(run_dir, "checkpoints", "latest").read_text().strip(), "ema")
    assert cli_main(["finetune", "--method", "mle", "--checkpoint", str(final), f"run_dir={finetune_dir}",
                     "loop.steps=2", "loop.batch_size=16", "loop.checkpoint_every=2", "loop.val_every=0",
                     "loop.log_every=1", "loop.progress=false", "loop.torch_threads=1", "mle.decode_steps=1",
                     "mle.encode_solver=rk4", "mle.encode_steps=2", "mle.code_check_samples=0"]) == 0
    dump("finetune")
    return 0


if __name__ == "__main__":
    sys.exit(main())
