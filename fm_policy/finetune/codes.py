"""Cached noise codes of the training windows for MLE fine-tuning with inversion pairing.

The inversion code of a window (its action chunk integrated backward through the *frozen* pre-trained field) never
changes during fine-tuning, yet re-solving it is most of an MLE step's cost (the default adaptive dopri5 encode
takes hundreds of network evaluations without gradients, rk4 x16 64, against 1-8 with gradients for the deployed
decode). So the codes of all training windows are
computed once, in large batches, and stored next to the run (`run_dir/codes.safetensors`, reused on resume); the
batches then carry them under "code" (see `MLEFinetunePolicy.compute_loss`).

The cache is keyed by content, not by location: the checkpoint's weights (the SHA-256 of its manifest's file list,
or of its files when it has no manifest) and the training windows' data (a digest of the arrays and of the window
index), plus the encode solver settings. A checkpoint copied elsewhere reuses the codes; new weights or new data at
the same path re-encode.

`check_codes` measures how good the pairing is: it re-decodes a sample of codes with an accurate forward solve of
the frozen field and compares the result with the data chunks (the run warns when the error is large).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from fm_policy.datasets.sampler import SequenceDataset
from fm_policy.solvers import FIXED_STEP_METHODS, solve

CODES_FILE = "codes.safetensors"
_POLICY_FILES = ("config.json", "model.safetensors", "normalizer.safetensors")


def checkpoint_content_hash(directory: str | os.PathLike) -> str:
    """SHA-256 of a saved policy's content, independent of where it lies: of its manifest's file list (names,
    sizes, SHA-256 of each file; a policy saved inside a training checkpoint is sealed by the checkpoint's manifest,
    whose entries under the policy's folder are used), else of the policy files themselves."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for sealed, prefix in ((directory, ""), (directory.parent, directory.name + "/")):
        manifest = sealed / "manifest.json"
        if manifest.is_file():
            try:
                files = json.loads(manifest.read_text())["files"]
            except (ValueError, KeyError, TypeError):
                break
            entries = {k[len(prefix):]: v for k, v in files.items() if k.startswith(prefix)}
            if entries:
                digest.update(json.dumps(entries, sort_keys=True).encode())
                return digest.hexdigest()
    for name in sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != "manifest.json"):
        digest.update(name.encode())
        with open(directory / name, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def windows_content_hash(dataset: SequenceDataset, keys: list[str]) -> str | None:
    """Digest of what the codes of `dataset` are a function of: the arrays under `keys` (observations, action) and
    the window index (which steps each window covers). None when the sampler does not hold its arrays in memory."""
    sampler = dataset.sampler
    arrays = getattr(sampler, "arrays", None)
    index = getattr(sampler, "index", None)
    if not isinstance(arrays, Mapping) or index is None or any(not isinstance(arrays.get(k), np.ndarray)
                                                               for k in keys):
        return None
    digest = hashlib.blake2b(digest_size=32)
    for key in [*sorted(keys), None]:
        value = np.ascontiguousarray(index if key is None else arrays[key])
        digest.update(f"{key}:{value.dtype}:{value.shape}".encode())
        digest.update(memoryview(value).cast("B"))
    return digest.hexdigest()


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


@torch.no_grad()
def check_codes(wrapper, dataset: SequenceDataset, codes: Tensor | None, samples: int, tol: float,
                seed: int = 0, rtol: float = 1e-7) -> dict[str, float]:
    """How well codes pair with their data: `samples` windows (drawn with `seed`) are decoded from their codes by an
    accurate forward solve of the frozen field (dopri5 at rtol = atol = `rtol`) and compared with their normalised
    data chunks. `codes`: the cached codes of every window of `dataset` (None: encode the sample now).

    Returns `code_redecode_rmse` (RMS over elements, normalised action units), `code_redecode_max` (the worst
    window's RMS) and `code_check_n`. Warns (UserWarning) when the RMS exceeds `tol`: the pairs then teach the sampler
    targets the accurate flow does not reach, and a more accurate encode (mle.encode_rtol / encode_solver) is needed.
    """
    model = wrapper.model
    n = min(samples, len(dataset))
    if n < 1:
        return {}
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(len(dataset), size=n, replace=False))
    batch = dataset[indices]
    obs = {k: batch[k] for k in model.obs_shapes}
    x1 = model.normalizer.normalize("action", batch["action"].to(model.device, torch.float32))
    z = codes[torch.from_numpy(indices)].to(x1) if codes is not None else wrapper.pair(obs, x1)
    ref_cond = (wrapper.reference.encode_obs(obs) if wrapper.reference is not None else model.encode_obs(obs))
    back = solve(lambda t, x: wrapper.reference_velocity(t, x, ref_cond), z, "dopri5", 1, rtol=rtol, atol=rtol).x
    per_window = (back - x1).square().flatten(1).mean(1)
    out = {"code_redecode_rmse": float(per_window.mean().sqrt()), "code_redecode_max": float(per_window.max().sqrt()),
           "code_check_n": float(n)}
    if not out["code_redecode_rmse"] <= tol or not math.isfinite(out["code_redecode_rmse"]):
        c = wrapper.mle_config
        warnings.warn(f"finetune: the noise codes pair poorly with their data: re-decoded accurately they miss the "
                      f"data chunks by an RMS of {out['code_redecode_rmse']:.3g} (normalised actions; tolerance "
                      f"mle.code_check_tol={tol:g}) with encode {c.encode_solver} "
                      + (f"rtol {c.encode_rtol:g}" if c.encode_solver not in FIXED_STEP_METHODS
                         else f"x{c.encode_steps}")
                      + "; encode more accurately (mle.encode_solver=dopri5, smaller mle.encode_rtol/encode_atol)",
                      UserWarning, stacklevel=2)
    return out
