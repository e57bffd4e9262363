"""`fm-policy finetune --method mle|residual|gft|ft --checkpoint DIR [--data STORE] [--config YAML] [key=value ...]`.

Fine-tuning is training a policy object whose `compute_loss` is the fine-tuning objective (`MLEFinetunePolicy` for
mle/residual, `GFTFinetunePolicy` for gft (gradual fine-tuning) and ft (plain flow-matching fine-tuning)), so
the package's Trainer runs it unchanged: EMA, atomic checkpoints (each holding a normal loadable policy under
policy/ and ema/), exact resume of an interrupted run, TensorBoard. The pre-trained policy's normaliser, observation
keys and horizons are kept; the data section defaults to the pre-training run's (same store, same episode split).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from fm_policy.config import ConfigError, config_to_yaml, load_config
from fm_policy.couplings import check_coupling
from fm_policy.datasets.policy_data import DataConfig, build_policy_data
from fm_policy.datasets.sampler import SequenceDataset
from fm_policy.distributed import main_process_first
from fm_policy.factory import load_policy
from fm_policy.finetune.codes import (
    CODES_FILE,
    cached_codes,
    check_codes,
    checkpoint_content_hash,
    windows_content_hash,
)
from fm_policy.finetune.gft import GFTConfig, GFTFinetunePolicy, gft_finetune_policy
from fm_policy.finetune.mle import MLEConfig, MLEFinetunePolicy, mle_finetune_policy
from fm_policy.flow_policy import FlowPolicy
from fm_policy.networks.residual import ResidualConfig
from fm_policy.train import EvalConfig, run_trainer
from fm_policy.trainer import EMAConfig, LoopConfig, OptimConfig, read_run_config, seed_everything

METHODS: tuple[str, ...] = ("mle", "residual", "gft", "ft")
GFT_METHODS: tuple[str, ...] = ("gft", "ft")


@dataclass
class PolicyTrainingSettings:
    """Training-only settings of the tuned flow policy to change for a gft / ft run, under the same keys as
    `train-policy`'s policy section (`policy.coupling=ot`). Unset ("" / null) keeps the pre-trained checkpoint's; the
    fine-tuned checkpoints record what they were trained with."""

    coupling: str = ""  # "" = the checkpoint's | independent | ot (fm_policy.couplings, docs/gft.md "Couplings")
    coupling_cond_weight: float | None = None  # null = the checkpoint's; ot: cost of moving noise between observations

    def is_set(self) -> bool:
        return bool(self.coupling) or self.coupling_cond_weight is not None

    def validate(self) -> None:
        check_coupling(self.coupling or "independent",
                       0.0 if self.coupling_cond_weight is None else self.coupling_cond_weight)

    def apply(self, policy: FlowPolicy) -> None:
        """Set the given settings on `policy` (its training draws read them from its config)."""
        changes: dict[str, object] = {}
        if self.coupling:
            changes["coupling"] = self.coupling
        if self.coupling_cond_weight is not None:
            changes["coupling_cond_weight"] = float(self.coupling_cond_weight)
        if changes:
            policy.config = replace(policy.config, **changes)
            policy.config.validate()


@dataclass
class FinetuneConfig:
    """One fine-tuning run. `data.path: ""` (default) reuses the pre-training run's data section."""

    checkpoint: str = ""  # the pre-trained flow policy, e.g. runs/pusht_flow/checkpoints/step_20000/ema
    method: str = "mle"  # mle (FT-FM: the whole velocity network) | residual (ResFT-FM: a contracting residual)
    #                      | gft (gradual fine-tuning, docs/gft.md) | ft (plain flow-matching fine-tuning)
    run_dir: str = "runs/finetune"
    mle: MLEConfig = field(default_factory=MLEConfig)
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    gft: GFTConfig = field(default_factory=GFTConfig)
    # gft / ft: training-only settings of the tuned policy (policy.coupling=ot); unset = the checkpoint's
    policy: PolicyTrainingSettings = field(default_factory=PolicyTrainingSettings)
    data: DataConfig = field(default_factory=lambda: DataConfig(path=""))
    # docs/finetuning.md, "Defaults and why": lr 1e-5 for the full network; use optim.lr=1e-4 for method residual; gft/ft toward a changed
    # task need a larger one (docs/gft.md; the Push-T benchmark uses 3e-4)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=100))
    ema: EMAConfig = field(default_factory=EMAConfig)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=5000, batch_size=64, checkpoint_every=500,
                                                                val_every=500))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("finetune: no pre-trained checkpoint given (--checkpoint DIR or checkpoint=DIR)")
        if self.method not in METHODS:
            raise ConfigError(f"finetune: method '{self.method}' is unknown; choose one of {list(METHODS)}")
        if self.method in GFT_METHODS:
            self.gft.validate()
            self.policy.validate()
            return
        if self.policy.is_set():
            raise ConfigError(f"finetune: policy.coupling / policy.coupling_cond_weight apply to --method gft or ft; "
                              f"method {self.method} keeps the pre-trained policy's")
        self.mle.validate()
        if self.method == "residual":
            self.residual.validate()


def _pretraining_data(checkpoint: Path) -> DataConfig | None:
    """The data section of the run the checkpoint came from (runs/NAME/config.yaml above checkpoints/step_N/ema)."""
    run = read_run_config(checkpoint)
    if not run or not isinstance(run.get("data"), dict):
        return None
    return DataConfig(**{k: v for k, v in run["data"].items() if k in DataConfig.__dataclass_fields__})


def resolve_data_config(config: FinetuneConfig, pretrained: FlowPolicy) -> DataConfig:
    """The data to fine-tune on, always with the pre-trained policy's observation keys."""
    data = config.data
    if not data.path:
        inherited = _pretraining_data(Path(config.checkpoint))
        if inherited is None:
            raise ConfigError(f"finetune: data.path is empty and no pre-training config.yaml was found above "
                              f"{config.checkpoint}; set data.path=STORE")
        # settings given on the command line (anything not at its default) win over the inherited ones: an override
        # such as data.max_train_episodes=3 must not be dropped silently
        defaults = DataConfig()
        for name in DataConfig.__dataclass_fields__:
            value = getattr(config.data, name)
            if name != "path" and value != getattr(defaults, name):
                setattr(inherited, name, value)
        inherited.num_workers = config.data.num_workers  # a resource setting of this run, not of the pre-training
        data = inherited
    keys = list(pretrained.obs_shapes)
    if sorted(data.obs_keys) != keys:
        print(f"finetune: using the pre-trained policy's observation keys {keys} (data.obs_keys was {data.obs_keys})")
    data.obs_keys = keys
    return data


def build_finetune_policy(config: FinetuneConfig, device: str = "cpu") -> MLEFinetunePolicy | GFTFinetunePolicy:
    """Load the pre-trained policy and wrap it for `config.method`."""

    pretrained = load_policy(config.checkpoint, device=device)
    if type(pretrained) is not FlowPolicy:
        raise ConfigError(f"finetune: {config.checkpoint} is a '{pretrained.config.type}' policy; "
                          "fine-tuning starts from a plain flow policy")
    if config.method in GFT_METHODS:
        config.policy.apply(pretrained)
        teacher = None
        if config.method == "gft" and config.gft.teacher and config.gft.w0 > 0:
            teacher = load_policy(config.gft.teacher, device=device)
            if type(teacher) is not FlowPolicy:
                raise ConfigError(f"finetune: gft.teacher {config.gft.teacher} is a '{teacher.config.type}' policy; "
                                  "the teacher must be a plain flow policy")
        return gft_finetune_policy(pretrained, config.gft, teacher, config.method)
    return mle_finetune_policy(pretrained, config.mle, config.method, config.residual)


def _check_data_matches(policy: MLEFinetunePolicy | GFTFinetunePolicy, arrays: dict) -> None:
    for key, shape in policy.obs_shapes.items():
        if tuple(arrays[key].shape[1:]) != tuple(shape):
            raise ConfigError(f"finetune: data '{key}' has per-step shape {arrays[key].shape[1:]}, the pre-trained "
                              f"policy expects {shape}")
    if arrays["action"].shape[-1] != policy.config.action_dim:
        raise ConfigError(f"finetune: data actions have {arrays['action'].shape[-1]} dims, the policy "
                          f"{policy.config.action_dim}")


def code_fingerprint(config: FinetuneConfig, policy: MLEFinetunePolicy, train: SequenceDataset) -> dict[str, object]:
    """What the cached codes are a function of, by content: the pre-trained checkpoint's content hash (not its path),
    the training windows' data digest (the store's path only when the data are not in memory), the encode solver
    settings. Not the method: mle and residual encode with the same frozen field."""
    c = config.mle
    keys = [*policy.obs_shapes, "action"]
    data_hash = windows_content_hash(train, keys)
    skip = {"num_workers"} if data_hash is None else {"num_workers", "path"}  # loader workers: no effect on codes
    return {"checkpoint": checkpoint_content_hash(config.checkpoint),
            "data": {k: v for k, v in asdict(config.data).items() if k not in skip}, "data_hash": data_hash,
            "encode": [c.encode_solver, c.encode_steps, c.encode_rtol, c.encode_atol], "windows": len(train)}


def finetune(config: FinetuneConfig) -> Path:
    """Fine-tune (or resume) the run described by `config`; returns the newest checkpoint directory.

    The checkpoint's policy/ and ema/ folders are normal policies: "flow" for method mle, "flow_residual" for
    method residual (load either with `load_policy` once `fm_policy.finetune` is imported).
    """
    config.validate()
    if config.loop.torch_threads:
        torch.set_num_threads(config.loop.torch_threads)
    seed_everything(config.loop.seed)
    policy = build_finetune_policy(config)
    pcfg = policy.config
    config.data = resolve_data_config(config, policy.model)
    data = build_policy_data(config.data, pcfg.horizon, pcfg.n_obs_steps, pcfg.n_action_steps)
    _check_data_matches(policy, data.arrays)
    code_check: dict[str, float] = {}
    if config.method not in GFT_METHODS and config.mle.pairing == "inversion":
        c = config.mle
        codes = None
        if c.cache_codes:
            with main_process_first(config.loop.device):  # data-parallel: the main process encodes, others read
                codes = cached_codes(policy, data.train, Path(config.run_dir) / CODES_FILE,
                                     code_fingerprint(config, policy, data.train), progress=config.loop.progress)
            data.train = SequenceDataset(data.train.sampler, {"code": codes})
        code_check = check_codes(policy, data.train, codes, c.code_check_samples, c.code_check_tol,
                                 seed=config.loop.seed)
        if code_check:
            print(f"finetune: codes re-decoded accurately miss their data by RMS {code_check['code_redecode_rmse']:.3g}"
                  f" (worst window {code_check['code_redecode_max']:.3g}; {int(code_check['code_check_n'])} windows, "
                  f"normalised actions)")
    n_trainable = sum(p.numel() for p in policy.parameters())
    n_total = sum(p.numel() for p in policy.model.parameters())
    if isinstance(policy, GFTFinetunePolicy):
        g = policy.gft_config
        objective = (f"{g.schedule} schedule w0 {g.w0:g} -> 0 at {g.anneal_fraction:g} of {config.loop.steps} steps"
                     + (f" ({g.stages} stages, beta {g.beta:g})" if g.schedule == "step" else "")
                     + f", teacher {g.teacher or config.checkpoint}" if g.w0 > 0 else "plain flow matching (w = 0)")
        c = policy.model.config
        objective += f", {c.coupling} coupling" + (f" (cond weight {c.coupling_cond_weight:g})"
                                                   if c.coupling == "ot" else "")
    else:
        steps = config.mle.decode_steps_choices or config.mle.decode_steps
        objective = (f"decode {config.mle.decode_solver} x{steps}, pairing {config.mle.pairing}, "
                     f"fm_weight {policy.fm_weight:g} (relative to the NLL)")
    return run_trainer(
        policy, data, config,
        describe=f"finetune {config.method} of {config.checkpoint}: {n_trainable / 1e6:.3f} M of "
                 f"{n_total / 1e6:.2f} M parameters trainable; {objective}; "
                 f"{len(data.train)} training windows of {data.source}",
        session_extra={"method": config.method, **({"code_check": code_check} if code_check else {})},
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fm-policy finetune",
        description="Fine-tune a pre-trained flow policy: by MLE of reconstructions (mle, FT-FM), through a "
                    "contracting residual (residual, ResFT-FM), by gradual fine-tuning toward new data (gft), or by "
                    "plain flow-matching fine-tuning (ft).",
        epilog="Examples: fm-policy finetune --method mle --checkpoint runs/pusht_flow/checkpoints/step_20000/ema "
               "run_dir=runs/pusht_ftfm mle.decode_steps=1 loop.steps=5000; "
               "fm-policy finetune --method gft --checkpoint runs/pusht_flow/checkpoints/step_20000/ema "
               "--data data/pusht_goal.zarr run_dir=runs/pusht_gft optim.lr=3e-4 gft.w0=0.7 gft.anneal_fraction=0.6",
    )
    parser.add_argument("--method", choices=METHODS,
                        help="mle (whole network), residual, gft or ft (default: the config's)")
    parser.add_argument("--checkpoint", help="the pre-trained policy directory (default: the config's checkpoint)")
    parser.add_argument("--data", help="the store to fine-tune on, e.g. new demos (same as data.path=STORE; "
                                       "default: the pre-training run's data)")
    parser.add_argument("--config", help="a YAML file, or the name of a config shipped in configs/")
    parser.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. mle.decode_steps=2")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = load_config(FinetuneConfig, args.config, args.overrides)
    if args.method:
        config.method = args.method
    if args.checkpoint:
        config.checkpoint = args.checkpoint
    if args.data:
        config.data.path = args.data
    if args.print_config:
        print(config_to_yaml(config))
        return 0
    checkpoint = finetune(config)
    print(f"checkpoint: {checkpoint} (evaluate with: fm-policy eval --checkpoint {checkpoint / 'ema'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
