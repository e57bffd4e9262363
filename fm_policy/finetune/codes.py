"""Cached noise codes of the training windows for MLE fine-tuning with inversion pairing.

The inversion code of a window (its action chunk integrated backward through the *frozen* pre-trained field) never
changes during fine-tuning, yet re-solving it is most of an MLE step's cost (rk4 x16 = 64 network evaluations
without gradients, against 1-8 with gradients for the deployed decode). So the codes of all training windows are
computed once, in large batches, and stored next to the run (`run_dir/codes.safetensors`, reused on resume); the
batches then carry them under "code" (see `MLEFinetunePolicy.compute_loss`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from fm_policy.datasets.sampler import SequenceDataset

CODES_FILE = "codes.safetensors"


@torch.no_grad()
def encode_windows(wrapper, dataset: SequenceDataset, batch_size: int = 1024, progress: bool = True) -> Tensor:
    """Inversion codes (len(dataset), horizon, action_dim) of every window of `dataset`, in window order."""
    model = wrapper.model
    codes = torch.empty(len(dataset), *model.noise_shape)
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc="encode windows", disable=not progress, leave=False):
        indices = np.arange(start, min(start + batch_size, len(dataset)))
        batch = dataset[indices]
        obs = {k: batch[k] for k in model.obs_shapes}
        x1 = model.normalizer.normalize("action", batch["action"].to(model.device, torch.float32))
        codes[indices] = wrapper.pair(obs, x1).cpu()
    return codes


def cached_codes(wrapper, dataset: SequenceDataset, path: Path, fingerprint: dict[str, object],
                 progress: bool = True) -> Tensor:
    """The codes stored at `path` if they were made for the same `fingerprint` (checkpoint, data, encode solver,
    window count), else freshly encoded and written atomically."""
    key = json.dumps(fingerprint, sort_keys=True, default=str)
    if path.exists():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                stored = (f.metadata() or {}).get("fingerprint")
            if stored == key:
                codes = load_file(str(path))["codes"]
                if codes.shape[0] == len(dataset):
                    return codes
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # a damaged cache is only a cache: re-encode
            print(f"finetune: ignoring unreadable code cache {path} ({exc})")
    codes = encode_windows(wrapper, dataset, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"codes": codes.contiguous()}, str(tmp), metadata={"fingerprint": key})
    os.replace(tmp, path)
    return codes
