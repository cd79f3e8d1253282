"""Fine-tuning configuration: the ``FT*Config`` dataclasses, the shipped presets, loading and validation.

A recipe is a :class:`FinetuneConfig` (sections ``data``, ``model``, ``augment``, ``optim``, ``train``)
built from a preset YAML in ``asit/configs/finetune`` (or any YAML file) plus ``section.key=value``
overrides by :func:`load_finetune_config`, which rejects unknown keys and inconsistent settings with a
:class:`~asit.config.ConfigError` that names them. :func:`finetune_config_to_dict` gives the plain dict
stored in ``config.yaml`` and in every checkpoint; it loads again unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from asit.config import ConfigError, _build, load_tree

__all__ = [
    "FINETUNE_PRESET_DIR",
    "FTAugmentConfig",
    "FTDataConfig",
    "FTModelConfig",
    "FTOptimConfig",
    "FTTrainConfig",
    "FinetuneConfig",
    "available_presets",
    "finetune_config_to_dict",
    "load_finetune_config",
]

FINETUNE_PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "finetune"


@dataclass
class FTDataConfig:
    """Which clips, which labels, which folds."""

    train_manifest: str = "demo"  # JSON/CSV manifest, folder of class folders, or "demo"
    val_manifest: str | None = None  # required unless cv_folds > 0
    test_manifest: str | None = None  # scored once, after training, with the reported model (not with CV)
    label_csv: str | None = None  # class_labels_indices.csv (index,mid,display_name); None: manifest labels
    task: Literal["auto", "single_label", "multi_label"] = "auto"  # auto: single-label iff 1 label per clip
    target_frames: int | None = None  # fbank frames per example; None: the encoder's window
    mean: float | None = None  # fbank statistics; None: as data.stats says
    std: float | None = None
    # where mean/std come from when they are not set: "encoder" (its pretraining statistics) or "corpus"
    # (computed over the training clips before training, cached in the run folder; AST/SSAST normalise each
    # task with its own); a hand-set data.mean/std always wins
    stats: Literal["encoder", "corpus"] = "encoder"
    balanced_sampling: bool = False  # AudioSet-style WeightedRandomSampler
    cv_folds: int = 0  # > 0: k-fold cross-validation over train_manifest
    fold_source: Literal["auto", "metadata", "path", "stratified"] = "auto"
    fold_csv: str | None = None  # metadata CSV: a file-name column, `fold`, optionally `category`/`target` labels
    num_workers: int = 4
    demo_clips: int = 120
    demo_seconds: float = 3.0
    cache_dir: str | None = None  # demo data location; default $ASIT_CACHE or ~/.cache/asit


@dataclass
class FTModelConfig:
    """The backbone and the new head."""

    pool: Literal["tokens", "cls", "both"] = "tokens"
    drop_path_rate: float = 0.0  # AST/SSAST fine-tune without drop path
    random_init: bool = False  # same architecture, random weights: the baseline
    # positions for inputs whose token grid differs from pretraining: resample the whole grid (timm), or
    # crop: keep the centre positions of a shorter axis (SSAST's cut), resample only a longer one
    pos_embed_fit: Literal["resample", "crop"] = "resample"


@dataclass
class FTAugmentConfig:
    """AST training-time augmentation."""

    mixup_prob: float = 0.0  # probability that a clip is mixed (the "mixup" column of AST's recipes)
    mixup_alpha: float = 10.0  # λ ~ Beta(α, α); AST uses 10
    freqm: int = 0  # SpecAugment frequency-mask width bound (0: off)
    timem: int = 0  # SpecAugment time-mask width bound (0: off)
    noise: bool = False  # AST's speech-commands noise and ±10-frame roll


@dataclass
class FTOptimConfig:
    """AdamW, warm-up and the per-epoch schedule."""

    lr: float = 1e-4
    weight_decay: float = 5e-7
    betas: tuple[float, float] = (0.95, 0.999)
    head_lr_scale: float = 1.0  # lr multiplier of the new head
    warmup_steps: int = 1000  # linear warm-up, in iterations (AST: 1000)
    schedule: Literal["step", "cosine"] = "step"
    decay_start: int = 10  # step: first epoch (0-based count of finished epochs) with a decayed lr
    decay_every: int = 5
    decay_factor: float = 0.5
    min_lr: float = 0.0  # cosine: final lr
    clip_grad: float = 0.0  # global-norm clipping; 0 disables
    loss: Literal["auto", "bce", "ce"] = "auto"  # auto: BCE for multi-label, CE for single-label


@dataclass
class FTTrainConfig:
    """Length, batch, output and model selection."""

    epochs: int = 10
    batch_size: int = 16  # per process
    eval_batch_size: int | None = None  # default: 2 × batch_size
    max_steps_per_epoch: int | None = None
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    output_dir: str = "runs/finetune"
    log_every: int = 10
    progress: bool = True
    average_start: int | None = None  # 1-based first epoch of weight averaging (None: off)
    average_end: int | None = None  # 1-based last epoch, inclusive (None or past the end: the last epoch)
    report: Literal["best", "last", "averaged"] = "best"  # which model's score is the run's result
    save_best: bool = True
    resume: bool = False  # continue from <output_dir>/last.pt (per fold for CV) when it exists
    eval_windows: Literal["first", "all"] = "first"  # all: mean score over consecutive windows of each clip


@dataclass
class FinetuneConfig:
    """A whole fine-tuning recipe."""

    name: str = "custom"
    encoder: str = "runs/asit/teacher_encoder.safetensors"
    data: FTDataConfig = field(default_factory=FTDataConfig)
    model: FTModelConfig = field(default_factory=FTModelConfig)
    augment: FTAugmentConfig = field(default_factory=FTAugmentConfig)
    optim: FTOptimConfig = field(default_factory=FTOptimConfig)
    train: FTTrainConfig = field(default_factory=FTTrainConfig)


def available_presets() -> list[str]:
    """Names of the fine-tuning presets shipped in ``asit/configs/finetune``."""
    return sorted(p.stem for p in FINETUNE_PRESET_DIR.glob("*.yaml"))


def finetune_config_to_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), loadable again by :func:`load_finetune_config`."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def load_finetune_config(preset: str | Path | None = None, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """Load a preset (shipped name or YAML path; None = defaults) and apply ``key=value`` overrides.

    Values are parsed as YAML (``optim.lr=1e-4``, ``data.val_manifest=null``).

    Raises:
        ConfigError: unknown preset, key or value, or inconsistent settings; the message names them.
    """
    tree = load_tree(preset, overrides, recipe_dir=FINETUNE_PRESET_DIR, kind="fine-tuning preset",
                     shipped=available_presets)
    cfg = _build(FinetuneConfig, tree)
    _validate(cfg)
    return cfg


def _validate(cfg: FinetuneConfig) -> None:
    d, a, o, t = cfg.data, cfg.augment, cfg.optim, cfg.train
    checks = [
        (d.cv_folds == 0 or d.cv_folds >= 2, "data.cv_folds must be 0 (off) or >= 2"),
        (d.cv_folds > 0 or d.val_manifest is not None, "data.val_manifest is required unless data.cv_folds > 0"),
        (d.cv_folds == 0 or d.test_manifest is None,
         "data.test_manifest is not used with cross-validation (each fold's held-out part is its test set)"),
        (d.test_manifest is None or t.report != "best" or t.save_best,
         "data.test_manifest with train.report=best needs train.save_best (the best model is read from best.pt)"),
        (d.target_frames is None or d.target_frames > 0, "data.target_frames must be > 0"),
        (d.std is None or d.std > 0, "data.std must be > 0"),
        ((d.mean is None) == (d.std is None), "data.mean and data.std are set together (or both left unset)"),
        (d.num_workers >= 0, "data.num_workers must be >= 0"),
        (d.demo_clips > 0 and d.demo_seconds > 0, "data.demo_clips and data.demo_seconds must be > 0"),
        (0 <= a.mixup_prob <= 1, "augment.mixup_prob must be in [0, 1]"),
        (a.mixup_alpha > 0, "augment.mixup_alpha must be > 0"),
        (a.freqm >= 0 and a.timem >= 0, "augment.freqm and augment.timem must be >= 0"),
        (o.lr > 0, "optim.lr must be > 0"),
        (o.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (o.head_lr_scale > 0, "optim.head_lr_scale must be > 0"),
        (o.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (o.decay_every >= 1, "optim.decay_every must be >= 1"),
        (0 < o.decay_factor <= 1, "optim.decay_factor must be in (0, 1]"),
        (0 <= o.min_lr <= o.lr, "optim.min_lr must be in [0, optim.lr]"),
        (o.clip_grad >= 0, "optim.clip_grad must be >= 0"),
        (t.epochs > 0, "train.epochs must be > 0"),
        (t.seed >= 0, f"train.seed must be >= 0 (it seeds NumPy's generators), got {t.seed}"),
        (t.batch_size > 0, "train.batch_size must be > 0"),
        (t.eval_batch_size is None or t.eval_batch_size > 0, "train.eval_batch_size must be > 0"),
        (t.max_steps_per_epoch is None or t.max_steps_per_epoch > 0, "train.max_steps_per_epoch must be > 0"),
        (t.log_every > 0, "train.log_every must be > 0"),
        (t.average_start is None or 1 <= t.average_start <= t.epochs,
         "train.average_start must be in [1, train.epochs] (1-based; null disables weight averaging)"),
        (t.average_end is None or (t.average_start is not None and t.average_start <= t.average_end),
         "train.average_end needs train.average_start <= average_end (an end past train.epochs means the last)"),
        (t.report != "averaged" or t.average_start is not None, "train.report=averaged needs train.average_start"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
