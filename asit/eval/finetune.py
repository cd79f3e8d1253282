"""Fine-tuning a pretrained ASiT teacher encoder on a labelled task with the AST/SSAST recipe.

``run_finetune(load_finetune_config("esc50", ["encoder=runs/asit/teacher_encoder.safetensors"]))``
rebuilds the exported teacher backbone (``teacher_encoder.safetensors``), puts a fresh head on it
and trains both (DESIGN §1 "Downstream", the paper's Table I protocol):

* **Head**: ``LayerNorm(D) → Linear(D, K)`` (AST's ``mlp_head``) on a pooled vector: the mean of the
  data tokens (``model.pool=tokens``, SSAST's choice for patch models and our default), the [CLS]
  token (``cls``), or the average of the two (``both``).
* **Input**: the pretraining front end (Kaldi fbank, ``(x - mean) / (2 std)``, the encoder's
  statistics, or the training clips' with ``data.stats=corpus``, unless ``data.mean/std`` are set)
  over ``data.target_frames`` frames (default: the encoder's window). Other lengths resample the
  positional embedding over the new token grid (``model.pos_embed_fit=resample``, timm's way), or,
  with ``crop`` (the ESC-50 and Speech Commands presets), keep the centre positions of an axis
  shorter than in pretraining, as SSAST cuts them (1 s of a 6 s window: time positions 14–21 of 37);
  the choice is stored in ``best.pt`` / ``averaged.pt`` and :func:`load_finetuned_model` rebuilds
  the model with it. Training takes a random window of longer clips, evaluation the first; shorter
  clips are zero-padded as in pretraining.
* **Augmentation** (training only, on the device, per batch): mixup of the *waveforms* before the
  fbank (as AST does) with ``λ ~ Beta(α, α)`` (AST: α = 10) applied to each clip with probability
  ``augment.mixup_prob``, the partner being another clip of the batch, and the targets mixed with
  the same ``λ``; SpecAugment frequency and time masking (``torchaudio.transforms``, independent
  per clip, widths ``< freqm`` / ``< timem``) applied to the normalised fbank, masked values set to
  0 (the corpus mean; AST masks before normalising, which fills with ``(0 - mean) / (2 std)``);
  optionally AST's speech-commands noise (``+ U(0, 1) · u / 10``) and a ±10-frame time roll.
* **Sampling**: shuffled, or AudioSet-style balanced (``data.balanced_sampling``): a
  :class:`~torch.utils.data.WeightedRandomSampler` (with replacement) whose weight for a clip is
  the sum over its labels of ``1 / count(label)`` — AST's ``sum 1000 / (count + 0.01)`` up to the
  constant factor and the 0.01 smoothing. A clip drawn several times in one epoch gets a different
  random window each time.
* **Optimisation**: AdamW (AST's Adam betas ``(0.95, 0.999)``, weight decay 5e-7), a linear warm-up
  over ``optim.warmup_steps`` iterations, then either AST's step schedule (the lr multiplied by
  ``decay_factor`` every ``decay_every`` epochs from epoch ``decay_start``; AS-20K: halved every 5
  from 10) or a cosine to ``min_lr``. ``optim.loss=auto``: BCE-with-logits for multi-label tasks,
  cross-entropy (soft targets under mixup) for single-label ones; ``bce`` on a single-label task is
  BCE-with-logits on the one-hot (mixed) targets, as AST and SSAST train Speech Commands (the
  accuracy is still the argmax).
* **Evaluation** after every epoch: mAP (multi-label) or accuracy (single-label) plus per-class AP /
  accuracy; the best checkpoint by that metric is kept (``best.pt``, written atomically), and the
  weights of epochs ``average_start … average_end`` (1-based, inclusive) can be averaged (AST's
  weight averaging; ``averaged.pt``).
* **Cross-validation** (``data.cv_folds > 0``, ESC-50): folds from a metadata CSV's ``fold``
  column (``data.fold_csv``; when the file exists it must list every clip, or the run stops — the
  official folds are never swapped for others), else from the clips' paths (a ``foldN`` folder or
  ESC-50's ``N-…`` file names), else :func:`~asit.eval.linear_probe.stratified_folds`; the source
  used is logged and stored as ``fold_source``. One run per fold, and the mean and standard
  deviation over folds.
* **Labels**: a ``class_labels_indices.csv`` (``index,mid,display_name``; a manifest label matches
  the ``mid`` or the ``display_name``), else the sorted labels of the manifests. Clips without a
  label (a flat folder, e.g. ESC-50's ``audio/``) take the ``category`` (else ``target``) column of
  ``data.fold_csv`` (:func:`labels_from_metadata`).
* **Test split** (``data.test_manifest``, optional, not with cross-validation): after training the
  reported model (``train.report``: ``best`` read back from ``best.pt``, ``last`` or ``averaged``)
  is scored once on these clips; that score is the run's ``value`` (``value_split: test``, per-class
  values and the model under ``test``), the validation score stays as ``val_value``. Without it the
  value is the validation score (``value_split: val``): model selection and score on one split.
* **Outputs** under ``train.output_dir`` (per fold in ``fold_<k>/`` for CV): ``config.yaml``,
  ``log.jsonl`` (training loss and lr every ``log_every`` steps, a ``val_<metric>`` record per
  epoch), TensorBoard scalars, ``best.pt``, ``averaged.pt`` and ``results.json``.
* **Resume** (``train.resume``, ``--resume``): after every epoch ``last.pt`` (model, AdamW, the best
  epoch's scores, the running weight average, history; the best weights are in ``best.pt``) and one
  ``rng_epoch<E>_rank<r>.pt`` per process are written atomically with SHA-256 sidecars; a resumed
  run continues after the last finished epoch and ends bitwise equal to an uninterrupted one (same
  world size and hardware). Finished folds of a cross-validation are not rerun.

* **Long clips** (``train.eval_windows=all``): evaluation cuts each clip into ``ceil(length /
  window)`` windows of ``target_frames`` and averages their scores with equal weights: consecutive
  from the start, the last one ending at the clip's end (overlapping the one before), so every
  window is full of audio; a clip shorter than one window is one zero-padded window. The default
  scores the first window, which covers the whole clip in the AudioSet, ESC-50 and Speech Commands
  presets.

Works as a plain process or under ``torchrun`` (DDP; evaluation is sharded and gathered).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchaudio.transforms as TT
import yaml
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from asit.atomic_io import atomic_write_text
from asit.config import ConfigError, _build, load_tree
from asit.data import AudioDecodeError, AudioEntry, load_audio, load_manifest
from asit.data.fbank import batched_kaldi_fbank
from asit.data.samplers import WeightedDistributedSampler
from asit.models import POS_EMBED_FITS, build_backbone, encode

from .encoder import FRAME_LENGTH_S, FRAME_SHIFT_S, backbone_spec, load_encoder
from .linear_probe import _file_stamp, average_precision, stratified_folds

__all__ = [
    "FINETUNE_PRESET_DIR",
    "FinetuneConfig",
    "FinetuneModel",
    "Finetuner",
    "LabelSpace",
    "SpecAugment",
    "WeightedDistributedSampler",
    "apply_mixup",
    "assign_folds",
    "available_presets",
    "balanced_sample_weights",
    "evaluate_scores",
    "finetune_config_to_dict",
    "finetune_lr_schedule",
    "labels_from_metadata",
    "load_finetune_config",
    "load_finetuned_model",
    "read_class_csv",
    "run_finetune",
    "sample_mixup",
]

log = logging.getLogger(__name__)

FAULT_EPOCH_ENV = "ASIT_FT_FAULT_AFTER_EPOCH"  # tests: every process exits after this epoch's resume point

FINETUNE_PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "finetune"


# =========================================================================== configuration


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


# =========================================================================== labels and folds


@dataclass(frozen=True)
class LabelSpace:
    """Class names (output index order) and how manifest labels map onto them."""

    names: tuple[str, ...]  # human-readable, e.g. display_name
    index: dict[str, int]  # manifest label (mid, display name or plain label) → class index

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def encode(self, labels: Sequence[str], where: str = "") -> list[int]:
        try:
            return sorted({self.index[x] for x in labels})
        except KeyError as exc:
            raise ValueError(f"{where}: label {exc.args[0]!r} is not in the label map") from None

    @classmethod
    def from_entries(cls, entries: Sequence[AudioEntry]) -> LabelSpace:
        names = sorted({x for e in entries for x in e.labels})
        return cls(tuple(names), {n: i for i, n in enumerate(names)})


def read_class_csv(path: str | os.PathLike) -> LabelSpace:
    """Read an AudioSet-style ``class_labels_indices.csv`` (header ``index,mid,display_name``).

    A manifest label may be either the ``mid`` or the ``display_name``; the names reported are
    the display names. Only ``index`` and one of the two name columns are required.
    """
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "index" not in rows[0] or not ({"mid", "display_name"} & rows[0].keys()):
        raise ValueError(f"{path}: expected a header with 'index' and 'mid' and/or 'display_name'")
    size = len(rows)
    names: list[str | None] = [None] * size
    index: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        try:
            i = int(row["index"])
        except (TypeError, ValueError):
            raise ValueError(f"{path} line {line}: bad index {row.get('index')!r}") from None
        if not 0 <= i < size or names[i] is not None:
            raise ValueError(f"{path} line {line}: index {i} is out of range or repeated")
        mid, display = (row.get("mid") or "").strip(), (row.get("display_name") or "").strip()
        names[i] = display or mid
        for key in (mid, display):
            if key:
                index.setdefault(key, i)
    return LabelSpace(tuple(n or "" for n in names), index)


_FOLD_DIR = re.compile(r"^fold[_-]?(\d+)$", re.IGNORECASE)
_ESC50_NAME = re.compile(r"^(\d+)-[^-]+-[^-]+-\d+\.\w+$")  # {fold}-{clip id}-{take}-{target}.wav


def _fold_from_path(path: str) -> int | None:
    parts = Path(path).parts
    for part in parts[:-1]:
        if m := _FOLD_DIR.match(part):
            return int(m.group(1))
    if m := _ESC50_NAME.match(parts[-1]):
        return int(m.group(1))
    return None


_NAME_COLUMNS = ("filename", "path", "wav", "file")
_LABEL_COLUMNS = ("category", "target")  # ESC-50's meta/esc50.csv: class name, class number


def _read_metadata_csv(path: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Columns and rows, keyed by file name (without folders), of a clip metadata CSV."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        cols = list(reader.fieldnames or [])
        name_col = next((c for c in _NAME_COLUMNS if c in cols), None)
        if name_col is None:
            raise ValueError(f"{path}: a metadata CSV needs a file-name column, one of {'/'.join(_NAME_COLUMNS)}")
        rows = {Path(row[name_col]).name: row for row in reader}
    return cols, rows


def _folds_from_csv(entries: Sequence[AudioEntry], path: str) -> list[int | None]:
    cols, rows = _read_metadata_csv(path)
    if "fold" not in cols:
        raise ValueError(f"{path}: a fold CSV needs a 'fold' column")
    folds: list[int | None] = []
    for e in entries:
        row = rows.get(Path(e.path).name)
        try:
            folds.append(None if row is None else int(row["fold"]))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: bad fold {row['fold']!r} for {Path(e.path).name}") from None
    return folds


def labels_from_metadata(entries: Sequence[AudioEntry], path: str) -> list[AudioEntry]:
    """Give every clip without labels the ``category`` (else ``target``) of its row in a metadata CSV.

    For corpora whose labels live in a table rather than in folders, e.g. ESC-50's flat ``audio/``
    folder and ``meta/esc50.csv`` (``filename,fold,target,category,…``). Rows are matched by file name;
    clips that have labels keep them, and a CSV with neither column changes nothing.

    Raises:
        ValueError: an unlabelled clip has no row (or an empty label) in the CSV; the message names both.
    """
    if all(e.labels for e in entries):
        return list(entries)
    cols, rows = _read_metadata_csv(path)
    col = next((c for c in _LABEL_COLUMNS if c in cols), None)
    if col is None:
        return list(entries)
    out, missing = [], []
    for e in entries:
        label = "" if e.labels else (rows.get(Path(e.path).name) or {}).get(col, "").strip()
        if not e.labels and not label:
            missing.append(e.path)
        out.append(e if e.labels else dataclasses.replace(e, labels=(label,)))
    if missing:
        raise ValueError(f"{path}: no {col!r} for {len(missing)} unlabelled clip(s), e.g. {missing[0]} "
                         "(clips are matched to the CSV's rows by file name)")
    log.info("labels of %d clip(s) from the %r column of %s", sum(not e.labels for e in entries), col, path)
    return out


def assign_folds(
    entries: Sequence[AudioEntry], k: int, *, source: str = "auto", fold_csv: str | None = None, seed: int = 0
) -> np.ndarray:
    """Fold index ``0 … k-1`` of every clip.

    ``source``: ``"metadata"`` (the ``fold`` column of ``fold_csv``, matched by file name),
    ``"path"`` (a ``foldN`` folder in the path, or ESC-50's ``N-…`` file names), ``"stratified"``
    (:func:`stratified_folds` over the labels) or ``"auto"``: the CSV when ``fold_csv`` is a file,
    else the paths when every path names a fold, else stratified. Given fold numbers (e.g. ESC-50's
    1–5) are mapped in sorted order onto ``0 … k-1``.

    Raises:
        ValueError: the CSV (``metadata``, or ``auto`` with an existing ``fold_csv``) has no fold for
            some clip — the official folds are never silently replaced —, a clip's path names no fold
            (``path``), or the number of distinct folds is not ``k``.
    """
    return _assign_folds(entries, k, source=source, fold_csv=fold_csv, seed=seed)[0]


def _assign_folds(
    entries: Sequence[AudioEntry], k: int, *, source: str, fold_csv: str | None, seed: int
) -> tuple[np.ndarray, str]:
    """:func:`assign_folds` and the source used (``metadata``, ``path`` or ``stratified``)."""
    has_csv = bool(fold_csv) and os.path.isfile(fold_csv)
    if source == "metadata" and not has_csv:
        raise ValueError(f"data.fold_source=metadata but data.fold_csv={fold_csv!r} is not a file")
    if source in ("auto", "metadata") and has_csv:
        used, given = "metadata", _folds_from_csv(entries, str(fold_csv))
        missing = [e.path for e, f in zip(entries, given) if f is None]
        if missing:
            raise ValueError(f"{fold_csv}: no fold for {len(missing)} of {len(entries)} clip(s), e.g. "
                             f"{', '.join(missing[:3])} (matched by file name); fix the CSV or the manifest, or "
                             "set data.fold_source=path or stratified")
    elif source == "stratified":
        used, given = "stratified", []
    else:  # path, or auto without a CSV
        if fold_csv and source == "auto":
            log.warning("data.fold_csv=%s is not a file; taking the folds from the paths or stratifying", fold_csv)
        given = [_fold_from_path(e.path) for e in entries]
        used = "path"
        if source == "auto" and None in given:
            named = sum(f is not None for f in given)
            if named:
                log.warning("only %d of %d clips name a fold in their path: stratified folds for all", named,
                            len(given))
            used = "stratified"
    log.info("cross-validation folds from %s", f"{used} ({fold_csv})" if used == "metadata" else used)
    if used == "stratified":
        return stratified_folds([e.labels for e in entries], k, seed), used
    missing = [e.path for e, f in zip(entries, given) if f is None]
    if missing:
        raise ValueError(f"no fold for {len(missing)} clip(s), e.g. {missing[0]}")
    numbers = sorted({f for f in given if f is not None})
    if len(numbers) != k:
        raise ValueError(f"data.cv_folds={k} but the clips carry {len(numbers)} fold numbers {numbers}")
    order = {n: i for i, n in enumerate(numbers)}
    return np.array([order[f] for f in given], dtype=np.int64), used


def balanced_sample_weights(targets: np.ndarray) -> np.ndarray:
    """AudioSet-style sampling weight per clip: ``sum over its labels of 1 / count(label)``.

    Args:
        targets: ``[N, K]`` 0/1 multi-hot labels.

    Returns:
        ``[N]`` float64 weights (0 for a clip without labels: it is never drawn). AST uses
        ``sum 1000 / (count + 0.01)``: the same up to a constant factor and the smoothing.
    """
    targets = np.asarray(targets, dtype=np.float64)
    counts = targets.sum(0)  # [K]
    inverse = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    return targets @ inverse


# =========================================================================== augmentation


def sample_mixup(
    batch: int, alpha: float, prob: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a mixup plan: per clip ``λ`` (``Beta(α, α)`` with probability ``prob``, else 1) and a
    partner, another clip of the batch (a random cyclic derangement; itself only when ``batch == 1``).

    Returns:
        ``(lam [B] float32, partner [B] int64)`` on the CPU.
    """
    perm = rng.permutation(batch)
    partner = np.empty(batch, dtype=np.int64)
    partner[perm] = np.roll(perm, -1)
    mixed = rng.random(batch) < prob
    lam = np.where(mixed, rng.beta(alpha, alpha, size=batch), 1.0)
    return torch.from_numpy(lam.astype(np.float32)), torch.from_numpy(partner)


def apply_mixup(
    x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x' = λ x + (1 - λ) x[partner]`` and ``y' = λ y + (1 - λ) y[partner]`` with the same ``λ``.

    Args:
        x: ``[B, ...]`` inputs (waveforms ``[B, S]`` here). y: ``[B, K]`` (multi-/one-hot) targets.
        lam: ``[B]``; partner: ``[B]`` indices into the batch.
    """
    lam = lam.to(x.device, x.dtype)
    partner = partner.to(x.device)
    lx = lam.view(-1, *([1] * (x.dim() - 1)))
    ly = lam.to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
    return lx * x + (1 - lx) * x[partner], ly * y + (1 - ly) * y[partner]


class SpecAugment(nn.Module):
    """Frequency then time masking of ``[B, C, T, F]`` spectrograms, independent per clip.

    ``torchaudio.transforms.FrequencyMasking(freqm)`` / ``TimeMasking(timem)`` with ``iid_masks``:
    one band per axis and clip, of width uniform in ``[0, width)``, filled with 0.
    """

    def __init__(self, freqm: int, timem: int) -> None:
        super().__init__()
        self.freq = TT.FrequencyMasking(freqm, iid_masks=True) if freqm > 0 else None
        self.time = TT.TimeMasking(timem, iid_masks=True) if timem > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be [B, C, T, F], got shape {tuple(x.shape)}")
        x = x.transpose(-1, -2)  # torchaudio wants (..., freq, time)
        if self.freq is not None:
            x = self.freq(x)
        if self.time is not None:
            x = self.time(x)
        return x.transpose(-1, -2)


def add_noise_and_shift(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """AST's speech-commands augmentation: ``x + U(0,1) · u / 10`` (``u ~ U(0,1)`` per clip), then a
    circular time shift by an integer in ``[-10, 10)`` frames per clip. ``x``: ``[B, C, T, F]``."""
    B = x.shape[0]
    scale = torch.rand(B, 1, 1, 1, device=x.device, generator=generator) / 10
    x = x + torch.rand(x.shape, device=x.device, generator=generator) * scale
    shifts = torch.randint(-10, 10, (B,), generator=generator).tolist()
    return torch.stack([torch.roll(x[b], shifts[b], dims=-2) for b in range(B)])


# =========================================================================== schedule


def finetune_lr_schedule(cfg: FTOptimConfig, epochs: int, iters_per_epoch: int) -> np.ndarray:
    """Learning rate of every iteration, ``[epochs · iters_per_epoch]`` float64.

    ``lr_i = base(i) · min(1, (i + 1) / warmup_steps)`` where ``base`` is

    * ``step`` (AST's ``MultiStepLR`` stepped once per epoch): ``lr · decay_factor ** n(e)`` with
      ``n(e)`` the number of milestones ``decay_start, decay_start + decay_every, …`` that are
      ``<= e`` (``e`` the 0-based epoch). AS-20K: epochs 1–10 at ``lr``, 11–15 at ``lr / 2``, …;
    * ``cosine``: ``min_lr + (lr - min_lr) · (1 + cos(π · t)) / 2`` with ``t`` going 0 → 1 from the end
      of the warm-up to the last iteration.
    """
    if epochs <= 0 or iters_per_epoch <= 0:
        raise ValueError(f"epochs and iters_per_epoch must be > 0, got {epochs}, {iters_per_epoch}")
    total = epochs * iters_per_epoch
    it = np.arange(total)
    if cfg.schedule == "step":
        epoch = it // iters_per_epoch
        decays = np.where(epoch >= cfg.decay_start, (epoch - cfg.decay_start) // cfg.decay_every + 1, 0)
        base = cfg.lr * cfg.decay_factor ** decays
    else:
        warm = min(cfg.warmup_steps, total - 1)
        t = np.clip((it - warm) / max(total - 1 - warm, 1), 0.0, 1.0)
        base = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + np.cos(np.pi * t))
    warmup = np.minimum(1.0, (it + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    return (base * warmup).astype(np.float64)


# =========================================================================== metrics


def evaluate_scores(scores: np.ndarray, targets: np.ndarray, multilabel: bool) -> tuple[float, list[float | None]]:
    """The task metric and its per-class values.

    Multi-label: mAP over the classes with a positive, per class the AP (None without positives).
    Single-label (``targets`` ``[N, K]`` one-hot or ``[N]`` indices): top-1 accuracy, per class the
    accuracy on that class's clips (None for a class without clips).
    """
    scores = np.asarray(scores, dtype=np.float64)
    K = scores.shape[1]
    if multilabel:
        targets = np.asarray(targets) > 0.5
        per = [average_precision(scores[:, k], targets[:, k]) if targets[:, k].any() else None for k in range(K)]
        present = [v for v in per if v is not None]
        if not present:
            raise ValueError("no class has a positive example: mAP is undefined")
        return float(np.mean(present)), per
    targets = np.asarray(targets)
    truth = targets.argmax(1) if targets.ndim == 2 else targets
    correct = scores.argmax(1) == truth
    per = [float(correct[truth == k].mean()) if (truth == k).any() else None for k in range(K)]
    return float(correct.mean()), per


# =========================================================================== data


class LabelledClips(Dataset):
    """Clips with their target vectors; each item is a fixed-length waveform window.

    Training items are a random window of ``num_samples`` samples, drawn from a generator keyed on
    ``(seed, epoch, i)`` (``set_epoch``) and, for the ``r``-th repeat (``r > 0``) of a clip in one epoch
    of a sampler with replacement (the item key ``(i, r)``), on ``r`` too, so repeats get other crops.
    Evaluation items are the first window or, with ``all_windows=True``, ``W = ceil(L / S)`` windows
    stacked as ``wave [W, S]`` (their scores are averaged by the evaluation): consecutive from the
    start, except the last, which ends at the clip's end and so overlaps the one before it; every
    window is full of audio. Clips shorter than a window are zero-padded (one window). A clip that
    cannot be decoded gives ``None`` (dropped by :func:`collate_clips`).
    """

    def __init__(
        self, entries: Sequence[AudioEntry], targets: np.ndarray, *, sample_rate: int, num_samples: int,
        train: bool, seed: int = 0, all_windows: bool = False,
    ) -> None:
        self.entries = list(entries)
        self.targets = torch.as_tensor(targets, dtype=torch.float32)  # [N, K]
        self.sample_rate, self.num_samples, self.train, self.seed = sample_rate, num_samples, train, seed
        self.all_windows = all_windows and not train
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        i, repeat = key if isinstance(key, tuple) else (key, 0)
        entry = self.entries[i]
        try:
            wave = load_audio(entry.path, self.sample_rate)
        except AudioDecodeError as err:
            log.warning("skipping %s", err)
            return None
        n = self.num_samples
        if self.all_windows:
            if wave.numel() <= n:
                windows = F.pad(wave, (0, n - wave.numel())).unsqueeze(0)  # [1, S]
            else:  # the last window ends at the clip's end, overlapping the one before
                starts = [*range(0, wave.numel() - n, n), wave.numel() - n]
                windows = torch.stack([wave[s : s + n] for s in starts])  # [W, S]
            return {"wave": windows, "target": self.targets[i], "index": i}
        if wave.numel() > n:
            start = 0
            if self.train:
                rng = np.random.default_rng([self.seed, self.epoch, i, *([repeat] if repeat else [])])
                start = int(rng.integers(0, wave.numel() - n + 1))
            wave = wave[start : start + n]
        elif wave.numel() < n:
            wave = F.pad(wave, (0, n - wave.numel()))
        return {"wave": wave, "target": self.targets[i], "index": i}


def collate_clips(items: list[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
    """Stack the decodable items: ``wave [B, S]``, ``target [B, K]``, ``index [B]``. Items holding
    several windows (``wave [W_i, S]``) are concatenated into ``wave [ΣW_i, S]`` with ``owner``
    giving each window's position in the batch."""
    items = [x for x in items if x is not None]
    if not items:
        return {"wave": torch.empty(0, 0), "target": torch.empty(0, 0), "index": torch.empty(0, dtype=torch.long)}
    batch = {"target": torch.stack([x["target"] for x in items]), "index": torch.tensor([x["index"] for x in items])}
    if items[0]["wave"].dim() == 2:
        batch["wave"] = torch.cat([x["wave"] for x in items])
        batch["owner"] = torch.cat([torch.full((x["wave"].shape[0],), b) for b, x in enumerate(items)])
    else:
        batch["wave"] = torch.stack([x["wave"] for x in items])
    return batch


# =========================================================================== model


class FinetuneModel(nn.Module):
    """ViT backbone + ``LayerNorm → Linear`` head on the pooled tokens.

    ``forward(x [B, 1, T, F]) → logits [B, K]``. ``pool``: ``"tokens"`` (mean of the data tokens),
    ``"cls"`` ([CLS]) or ``"both"`` (the average of the two vectors). ``pos_embed_fit``: how the
    positional embedding meets inputs of another length than pretraining (:func:`asit.models.fit_pos_embed`).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, pool: str = "tokens",
                 pos_embed_fit: str = "resample") -> None:
        super().__init__()
        if pool not in ("tokens", "cls", "both"):
            raise ValueError(f"pool must be 'tokens', 'cls' or 'both', got {pool!r}")
        if pos_embed_fit not in POS_EMBED_FITS:
            raise ValueError(f"pos_embed_fit must be one of {POS_EMBED_FITS}, got {pos_embed_fit!r}")
        self.backbone = backbone
        self.pool, self.pos_embed_fit = pool, pos_embed_fit
        dim = int(backbone.embed_dim)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = encode(self.backbone, x, pos_embed_fit=self.pos_embed_fit)  # [B, 1 + N, D]
        cls, data = tokens[:, 0], tokens[:, 1:].mean(1)  # [B, D] each
        pooled = {"cls": cls, "tokens": data, "both": None}[self.pool]
        if pooled is None:
            pooled = 0.5 * (cls + data)
        return self.head(pooled)


def load_finetuned_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> FinetuneModel:
    """Rebuild a fine-tuned model from ``best.pt`` / ``averaged.pt``, in eval mode on ``device``.

    The architecture comes from the stored encoder metadata, the pooling and the positional-embedding
    fit from the checkpoint (files written before ``pos_embed_fit`` existed were trained with
    ``resample``); the class names are the checkpoint's ``classes``. The fbank statistics its input was
    normalised with are the checkpoint's ``normalization`` (``{"mean", "std"}``).
    """
    from asit.train.checkpoint import load_checkpoint

    state = load_checkpoint(path, required=("model", "classes", "encoder_metadata"))
    weights = state["model"]
    backbone_state = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    spec = backbone_spec(backbone_state, state["encoder_metadata"])
    model = FinetuneModel(build_backbone(**spec), len(state["classes"]), state.get("pool", "tokens"),
                          state.get("pos_embed_fit", "resample"))
    model.load_state_dict(weights)
    return model.to(device).eval()


# =========================================================================== training


def _resolve_manifest(source: str, d: FTDataConfig, seed: int) -> str:
    if source != "demo":
        return source
    from asit.data import ensure_demo_dataset

    root = Path(d.cache_dir) / "demo" if d.cache_dir else None
    return str(ensure_demo_dataset(root, num_clips=d.demo_clips, seconds=d.demo_seconds, seed=seed))


def _targets(entries: Sequence[AudioEntry], labels: LabelSpace, where: str) -> np.ndarray:
    y = np.zeros((len(entries), labels.num_classes), dtype=np.float32)
    for i, e in enumerate(entries):
        y[i, labels.encode(e.labels, f"{where} clip {e.path}")] = 1.0
    return y


class Finetuner:
    """One fine-tuning run (one fold): ``setup()``, ``train()`` → results dict, ``cleanup()``.

    Args:
        cfg: the recipe.
        train_entries, val_entries: the clips.
        labels: the class list.
        multilabel: task type (decides the loss and the metric).
        run_dir: where this run writes.
        test_entries: clips scored once after training with the reported model (none: no test score).
    """

    def __init__(self, cfg: FinetuneConfig, train_entries: Sequence[AudioEntry], val_entries: Sequence[AudioEntry],
                 labels: LabelSpace, multilabel: bool, run_dir: str | Path,
                 test_entries: Sequence[AudioEntry] = ()) -> None:
        from asit.train.distributed import init_distributed

        self.cfg, self.labels, self.multilabel = cfg, labels, multilabel
        self.train_entries, self.val_entries = list(train_entries), list(val_entries)
        self.test_entries = list(test_entries)
        self.run_dir = Path(run_dir)
        self.dist = init_distributed(cfg.train.device)
        self.device = self.dist.device
        loss = cfg.optim.loss if cfg.optim.loss != "auto" else ("bce" if multilabel else "ce")
        self.loss_kind = loss
        self.metric = "mAP" if multilabel else "accuracy"

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, d = self.cfg, self.cfg.data
        torch.manual_seed(cfg.train.seed)
        encoder = load_encoder(cfg.encoder, random_init=cfg.model.random_init, seed=cfg.train.seed)
        self.encoder_meta = dict(encoder.metadata)
        self.sample_rate, self.num_mel_bins = encoder.sample_rate, encoder.num_mel_bins
        if d.mean is not None:
            self.mean, self.std, self._stats_source = d.mean, d.std, "config"
        elif d.stats == "corpus":
            (self.mean, self.std), self._stats_source = self._corpus_stats(), "corpus"
        else:
            self.mean, self.std, self._stats_source = encoder.mean, encoder.std, "encoder"
        self.frames = d.target_frames or encoder.target_frames
        if self.frames % encoder.patch_size:
            raise ConfigError(f"data.target_frames={self.frames} is not a multiple of the patch size "
                              f"{encoder.patch_size}")
        spec = backbone_spec(encoder.backbone.state_dict(), self.encoder_meta)
        backbone = build_backbone(**spec, drop_path_rate=cfg.model.drop_path_rate)
        backbone.load_state_dict(encoder.backbone.state_dict())
        del encoder
        self.model = FinetuneModel(backbone, self.labels.num_classes, cfg.model.pool,
                                   cfg.model.pos_embed_fit).to(self.device)
        self.ddp_model: nn.Module = self.model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

        o = cfg.optim
        head = list(self.model.head.parameters())
        head_ids = {id(p) for p in head}
        groups = []
        for params, scale in (([p for p in self.model.parameters() if id(p) not in head_ids], 1.0),
                              (head, o.head_lr_scale)):
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]  # biases, norms, tokens' 1-D params
            groups += [{"params": decay, "weight_decay": o.weight_decay, "lr_scale": scale},
                       {"params": no_decay, "weight_decay": 0.0, "lr_scale": scale}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=o.betas)

        window = int(self.sample_rate * FRAME_LENGTH_S)
        shift = int(self.sample_rate * FRAME_SHIFT_S)
        num_samples = window + (self.frames - 1) * shift
        self.train_targets = _targets(self.train_entries, self.labels, "train")
        self.train_set = LabelledClips(self.train_entries, self.train_targets, sample_rate=self.sample_rate,
                                       num_samples=num_samples, train=True, seed=cfg.train.seed)
        r, w = self.dist.rank, self.dist.world_size
        if d.balanced_sampling:
            weights = balanced_sample_weights(self.train_targets)
            self.sampler = WeightedDistributedSampler(weights.tolist(), len(self.train_set), rank=r, world_size=w,
                                                      seed=cfg.train.seed, tag_repeats=True)
        else:
            self.sampler = DistributedSampler(self.train_set, num_replicas=w, rank=r, shuffle=True,
                                              seed=cfg.train.seed, drop_last=False)
        loader_kw = dict(num_workers=d.num_workers, collate_fn=collate_clips,
                         pin_memory=self.device.type == "cuda", persistent_workers=False)
        self.train_loader = DataLoader(self.train_set, batch_size=cfg.train.batch_size, sampler=self.sampler,
                                       drop_last=len(self.sampler) > cfg.train.batch_size, **loader_kw)

        def eval_loader(entries: list[AudioEntry], split: str) -> DataLoader:
            # every world_size-th clip per rank; predict() gathers them and puts them back in order
            clips = LabelledClips(entries, _targets(entries, self.labels, split), sample_rate=self.sample_rate,
                                  num_samples=num_samples, train=False, all_windows=cfg.train.eval_windows == "all")
            return DataLoader(Subset(clips, list(range(len(clips)))[r::w]),
                              batch_size=cfg.train.eval_batch_size or 2 * cfg.train.batch_size, shuffle=False,
                              **loader_kw)

        self.val_loader = eval_loader(self.val_entries, "val")
        self.test_loader = eval_loader(self.test_entries, "test") if self.test_entries else None
        steps = len(self.train_loader)
        if cfg.train.max_steps_per_epoch:
            steps = min(steps, cfg.train.max_steps_per_epoch)
        self.iters_per_epoch = steps
        self.lr_schedule = finetune_lr_schedule(o, cfg.train.epochs, steps)
        self.specaug = SpecAugment(cfg.augment.freqm, cfg.augment.timem)
        self.mix_rng = np.random.default_rng([cfg.train.seed, self.dist.rank])
        p = cfg.train.precision
        if p == "auto":
            p = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = torch.bfloat16 if p == "bf16" else None

        from asit.train.metrics import MetricWriter

        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "config.yaml", "w", encoding="utf-8") as fh:
                yaml.safe_dump(finetune_config_to_dict(cfg), fh, sort_keys=False)
        self.writer = MetricWriter(self.run_dir, enabled=self.dist.is_main)

    # ------------------------------------------------------------------ steps
    def features(self, waves: torch.Tensor) -> torch.Tensor:
        """Waveforms ``[B, S]`` → normalised fbank ``[B, 1, T, F]``."""
        fbank = batched_kaldi_fbank(waves, self.sample_rate, self.num_mel_bins, self.frames,
                                    normalize=(self.mean, self.std))  # [B, T, F]
        return fbank.unsqueeze(1)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.loss_kind == "bce":
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.cross_entropy(logits, target)  # soft (mixed) targets are class probabilities

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> float:
        a = self.cfg.augment
        wave = batch["wave"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        if a.mixup_prob > 0:
            lam, partner = sample_mixup(wave.shape[0], a.mixup_alpha, a.mixup_prob, self.mix_rng)
            wave, target = apply_mixup(wave, target, lam, partner)
        with torch.no_grad():
            x = self.specaug(self.features(wave))
            if a.noise:
                x = add_noise_and_shift(x)
        lr = float(self.lr_schedule[step])
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        with self._autocast():
            logits = self.ddp_model(x)
        loss = self._loss(logits, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        return float(loss.detach())

    def _batch_empty_anywhere(self, batch: dict[str, Any]) -> bool:
        """True when this rank's batch or any other rank's has no decodable clip. Ranks must skip
        together, or DDP's gradient all-reduce would pair up different steps and hang."""
        empty = batch["wave"].shape[0] == 0
        if not self.dist.distributed:
            return empty
        flag = torch.tensor([float(empty)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one tiny collective per step under DDP
        return bool(flag.item())

    @torch.no_grad()
    def predict(self, loader: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores (sigmoid or softmax) and targets of the validation clips (or ``loader``'s), gathered
        from all ranks."""
        self.model.eval()
        scores, targets, order = [], [], []
        for batch in self.val_loader if loader is None else loader:
            if batch["wave"].numel() == 0:
                continue
            with self._autocast():
                logits = self.model(self.features(batch["wave"].to(self.device))).float()
            prob = (torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, -1)).cpu()
            if "owner" in batch:  # several windows per clip: the mean of their scores
                clips = batch["target"].shape[0]
                counts = torch.bincount(batch["owner"], minlength=clips).unsqueeze(1).to(prob.dtype)
                prob = prob.new_zeros(clips, prob.shape[1]).index_add_(0, batch["owner"], prob) / counts
            scores.append(prob)
            targets.append(batch["target"])
            order.append(batch["index"])  # positions in the whole validation set
        self.model.train()
        part = (torch.cat(scores).numpy(), torch.cat(targets).numpy(), torch.cat(order).numpy()) if scores else None
        parts = [part]
        if self.dist.distributed:
            parts = [None] * self.dist.world_size
            dist.all_gather_object(parts, part)
        parts = [p for p in parts if p is not None]
        if not parts:
            raise RuntimeError("no evaluation clip could be decoded")
        s, t, idx = (np.concatenate(x) for x in zip(*parts))
        keep = np.argsort(idx, kind="stable")
        return s[keep], t[keep]

    def evaluate(self, loader: Any = None) -> dict[str, Any]:
        """The metric, per-class values and clip count on the validation clips (or ``loader``'s)."""
        scores, targets = self.predict(loader)
        value, per_class = evaluate_scores(scores, targets, self.multilabel)
        return {self.metric: value, "per_class": dict(zip(self.labels.names, per_class)), "n_clips": len(scores)}

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        """Train for ``train.epochs`` epochs, evaluating after each; returns the run's results."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        avg_start = t.average_start
        avg_end = min(t.average_end or t.epochs, t.epochs)
        averaged: dict[str, torch.Tensor] | None = None
        n_avg = 0
        best: dict[str, Any] | None = None
        history = []
        step = 0
        started = time.time()
        start_epoch, ev = 0, None
        resumed = self._load_resume_point() if t.resume else None
        if resumed is not None:
            start_epoch, step = resumed["epoch"], resumed["step"]
            best, history, ev = resumed["best"], resumed["history"], resumed["last_eval"]
            averaged, n_avg = resumed["averaged"], resumed["n_avg"]
            started -= resumed["wall_time_s"]
        self.model.train()
        for epoch in range(start_epoch, t.epochs):
            self.sampler.set_epoch(epoch)
            self.train_set.set_epoch(epoch)
            bar = tqdm(total=self.iters_per_epoch, desc=f"epoch {epoch + 1}/{t.epochs}", dynamic_ncols=True,
                       disable=not (self.dist.is_main and t.progress), leave=False)
            losses = []
            for i, batch in enumerate(self.train_loader):
                if i >= self.iters_per_epoch:
                    break
                if self._batch_empty_anywhere(batch):  # every clip undecodable, on some rank
                    step += 1
                    continue
                loss = self.train_step(batch, step)
                step += 1
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr_schedule[step - 1]:.2e}")
                if step % t.log_every == 0:
                    self.writer.write(step, {"loss": loss, "lr": float(self.lr_schedule[step - 1]), "epoch": epoch})
            bar.close()
            ev = self.evaluate()
            record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else None,
                      self.metric: ev[self.metric]}
            history.append(record)
            self.writer.write(step, {"epoch": epoch, f"val_{self.metric}": ev[self.metric],
                                     "train_loss_epoch": record["train_loss"]})
            self.writer.flush()
            if self.dist.is_main:
                log.info("epoch %d/%d: train loss %.4f, val %s %.4f", epoch + 1, t.epochs,
                         record["train_loss"] or float("nan"), self.metric, ev[self.metric])
            if best is None or ev[self.metric] > best[self.metric]:
                best = {"epoch": epoch + 1, **ev}
                if t.save_best:
                    self._save("best.pt", self.model.state_dict(), epoch + 1, ev[self.metric])
            if avg_start is not None and avg_start <= epoch + 1 <= avg_end:
                # a copy: on the CPU .float().cpu() would alias the live weights (and += would train them)
                state = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in self.model.state_dict().items()}
                n_avg += 1
                if averaged is None:
                    averaged = state
                else:  # running mean
                    for k, v in state.items():
                        averaged[k] += (v - averaged[k]) / n_avg
            self._save_resume_point({
                "epoch": epoch + 1, "step": step, "best": best, "history": history, "last_eval": ev,
                "averaged": averaged, "n_avg": n_avg, "wall_time_s": time.time() - started,
            })
            if os.environ.get(FAULT_EPOCH_ENV) == str(epoch + 1):  # test hook: die like a killed worker
                log.error("%s=%d: simulating a crash after this epoch (test hook)", FAULT_EPOCH_ENV, epoch + 1)
                os._exit(1)
        assert ev is not None  # train.epochs > 0 is validated, and a resume point holds its last evaluation
        last = {"epoch": t.epochs, **ev}
        result: dict[str, Any] = {"metric": self.metric, "best": best, "last": last, "history": history,
                                  "steps": step, "wall_time_s": time.time() - started,
                                  "normalization": {"mean": self.mean, "std": self.std, "source": self._stats_source}}
        if averaged is not None:
            with self._weights(averaged):
                ev_avg = self.evaluate()
                result["averaged"] = {"epochs": [avg_start, avg_end], "n_models": n_avg, **ev_avg}
                self._save("averaged.pt", self.model.state_dict(), t.epochs, ev_avg[self.metric])
            self.writer.write(step, {"epoch": t.epochs - 1, f"val_{self.metric}_averaged": ev_avg[self.metric]})
        chosen = result[t.report]
        result.update(value=chosen[self.metric], per_class=chosen["per_class"], report=t.report,
                      value_split="val", val_value=chosen[self.metric])
        if self.test_loader is not None:
            test = self._test(t.report, averaged)
            result["test"] = {"model": t.report, "epoch": chosen.get("epoch", t.epochs), **test}
            result.update(value=test[self.metric], per_class=test["per_class"], value_split="test")
            self.writer.write(step, {"epoch": t.epochs - 1, f"test_{self.metric}": test[self.metric]})
            if self.dist.is_main:
                log.info("test %s of the %s model: %.4f (validation %.4f)", self.metric, t.report,
                         test[self.metric], chosen[self.metric])
        self.writer.flush()
        if self.dist.is_main:
            _write_json(self.run_dir / "results.json", result)
        return result

    def _test(self, report: str, averaged: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """Evaluate the reported model (``best`` from ``best.pt``, ``last``, ``averaged``) on the test clips."""
        if report == "last":
            return self.evaluate(self.test_loader)
        if report == "best":
            from asit.train.checkpoint import load_checkpoint

            state = load_checkpoint(self.run_dir / "best.pt", required=("model",))["model"]
        else:
            assert averaged is not None  # report=averaged needs average_start (validated)
            state = averaged
        with self._weights(state):
            return self.evaluate(self.test_loader)

    @contextlib.contextmanager
    def _weights(self, state: dict[str, torch.Tensor]):
        """Run the block with ``state`` loaded into the model, then put the current weights back."""
        current = copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict({k: v.to(current[k].dtype) for k, v in state.items()})
        try:
            yield
        finally:
            self.model.load_state_dict(current)

    def _save(self, name: str, state: dict[str, torch.Tensor], epoch: int, value: float) -> None:
        if not self.dist.is_main:
            return
        from asit.train.checkpoint import atomic_save

        atomic_save({
            "model": {k: v.detach().cpu() for k, v in state.items()},
            "epoch": epoch, "metric": self.metric, "value": value,
            "classes": list(self.labels.names), "pool": self.cfg.model.pool,
            "pos_embed_fit": self.cfg.model.pos_embed_fit,
            "normalization": {"mean": self.mean, "std": self.std},  # the fbank statistics the model was trained on
            "config": finetune_config_to_dict(self.cfg), "encoder_metadata": self.encoder_meta,
        }, self.run_dir / name)

    # ------------------------------------------------------------------ resume
    def _rng_path(self, epoch: int, rank: int) -> Path:
        return self.run_dir / f"rng_epoch{epoch:04d}_rank{rank}.pt"

    def _rng_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state(),
                                 "mixup": json.dumps(self.mix_rng.bit_generator.state)}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _corpus_stats(self) -> tuple[float, float]:
        """``data.stats=corpus``: fbank mean and std of the training clips at the encoder's sample rate and
        mel bins (:func:`~asit.data.stats.compute_fbank_stats`). Rank 0 computes them once, caches them in
        ``fbank_stats.json`` in its run folder (keyed by the clips and settings, so a resumed run reuses
        them) and broadcasts them, so every rank uses the same values without reading that file, and an
        error on rank 0 stops every rank instead of leaving them waiting."""
        from asit.data.stats import compute_fbank_stats

        path = self.run_dir / "fbank_stats.json"
        holder: list[Any] = [None]
        if self.dist.is_main:
            try:
                digest = hashlib.sha256()
                for e in self.train_entries:  # audio rewritten at the same paths invalidates the cache too
                    size, mtime = _file_stamp(e.path)  # (None, None) when unreadable: skipped by the stats
                    digest.update(f"{e.path}\0{size}\0{mtime}\n".encode())
                key = {"sample_rate": self.sample_rate, "num_mel_bins": self.num_mel_bins,
                       "clips": digest.hexdigest()}
                try:
                    doc = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    doc = None
                if not (isinstance(doc, dict) and doc.get("key") == key):
                    log.info("data.stats=corpus: fbank statistics of %d training clips", len(self.train_entries))
                    stats = compute_fbank_stats(self.train_entries, sample_rate=self.sample_rate,
                                                num_mel_bins=self.num_mel_bins, num_workers=self.cfg.data.num_workers,
                                                progress=self.cfg.train.progress)
                    doc = {"key": key, "mean": stats.mean, "std": stats.std, "clips": stats.clips,
                           "skipped": stats.skipped}
                    atomic_write_text(path, json.dumps(doc, indent=1))
                holder = [(float(doc["mean"]), float(doc["std"]))]
                log.info("fbank statistics of the training clips: mean %.4f, std %.4f (%s)", *holder[0], path)
            except Exception as err:  # every rank must hear of it
                holder = [f"{type(err).__name__}: {err}"]
                if not self.dist.distributed:
                    raise
        if self.dist.distributed:
            dist.broadcast_object_list(holder, src=0)
        if isinstance(holder[0], str):
            raise ValueError(f"data.stats=corpus: computing the fbank statistics failed on rank 0: {holder[0]}")
        return holder[0]

    def _save_resume_point(self, progress: dict[str, Any]) -> None:
        """After an epoch: every rank writes its RNG states, then rank 0 writes ``last.pt``, which
        names that epoch (so a crash between the two leaves the previous, complete resume point)."""
        from asit.train.checkpoint import atomic_save

        epoch, rank = progress["epoch"], self.dist.rank
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.distributed:
            dist.barrier()
        atomic_save(self._rng_state(), self._rng_path(epoch, rank))
        if self.dist.distributed:
            dist.barrier()
        if self.dist.is_main:
            atomic_save({"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                         "optimizer": self.optimizer.state_dict(), "config": finetune_config_to_dict(self.cfg),
                         "iters_per_epoch": self.iters_per_epoch, "world_size": self.dist.world_size,
                         **progress}, self.run_dir / "last.pt")
        if self.dist.distributed:
            dist.barrier()
        for old in self.run_dir.glob(f"rng_epoch*_rank{rank}.pt*"):
            if not old.name.startswith(f"rng_epoch{epoch:04d}_"):
                old.unlink(missing_ok=True)

    def _load_resume_point(self) -> dict[str, Any] | None:
        """Restore model, optimiser and this rank's RNG states from ``last.pt``; None when absent."""
        from asit.train.checkpoint import load_checkpoint

        path = self.run_dir / "last.pt"
        if not path.exists():
            log.info("no %s yet: starting from scratch", path)
            return None
        state = load_checkpoint(path, map_location="cpu", required=("model", "optimizer", "epoch", "step"))
        mismatched = [f"{k}: {state[k]} there, {v} here" for k, v in (
            ("iters_per_epoch", self.iters_per_epoch), ("world_size", self.dist.world_size))
            if state[k] != v]
        saved_train = state["config"]["train"]
        if saved_train["epochs"] != self.cfg.train.epochs:
            mismatched.append(f"train.epochs: {saved_train['epochs']} there, {self.cfg.train.epochs} here")
        if mismatched:
            raise ConfigError(f"cannot resume from {path}: " + "; ".join(mismatched))
        rng = load_checkpoint(self._rng_path(state["epoch"], self.dist.rank), required=("torch", "mixup"))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.mix_rng.bit_generator.state = json.loads(rng["mixup"])
        if self.dist.is_main:  # the interrupted epoch's records would otherwise appear twice
            from asit.train.metrics import trim_log

            trim_log(self.run_dir / "log.jsonl", state["step"])
        log.info("resuming %s after epoch %d (step %d)", self.run_dir, state["epoch"], state["step"])
        return state

    def cleanup(self) -> None:
        self.writer.close()


def _write_json(path: Path, obj: Any) -> None:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    atomic_write_text(path, json.dumps(clean(obj), indent=2) + "\n")


def _is_multilabel(cfg: FTDataConfig, entries: Sequence[AudioEntry]) -> bool:
    if cfg.task != "auto":
        return cfg.task == "multi_label"
    return any(len(e.labels) != 1 for e in entries)


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune as ``cfg`` says (one run, or one per fold); returns and writes ``results.json``.

    The results hold ``metric``, ``value`` (the reported model's score: on ``data.test_manifest``
    when there is one, else on the validation clips — ``value_split`` says which, ``val_value`` is the
    validation score either way; for CV the mean over the held-out folds, with ``std``, ``folds`` and
    ``fold_source``), ``per_class`` and, per run, ``best`` / ``last`` / ``averaged`` validation
    evaluations, ``test`` and the per-epoch ``history``.
    """
    from asit.train.distributed import cleanup_distributed, init_distributed

    d = cfg.data
    out = Path(cfg.train.output_dir)

    def clips(source: str | None) -> list[AudioEntry]:
        if not source:
            return []
        entries = load_manifest(_resolve_manifest(source, d, cfg.train.seed))
        if d.fold_csv and os.path.isfile(d.fold_csv):  # e.g. ESC-50: a flat folder, labels in meta/esc50.csv
            entries = labels_from_metadata(entries, d.fold_csv)
        return entries

    train_entries, val_entries, test_entries = clips(d.train_manifest), clips(d.val_manifest), clips(d.test_manifest)
    labels = read_class_csv(d.label_csv) if d.label_csv else LabelSpace.from_entries(train_entries + val_entries)
    multilabel = _is_multilabel(d, train_entries + val_entries)
    if not multilabel:
        unlabelled = [e for e in train_entries + val_entries + test_entries if len(e.labels) != 1]
        if unlabelled:
            raise ValueError(f"single-label task but {len(unlabelled)} clip(s) have no or several labels, "
                             f"e.g. {unlabelled[0].path} (a folder manifest labels a clip by its sub-folder; "
                             "data.fold_csv may give labels in a 'category' or 'target' column)")
    info = init_distributed(cfg.train.device)
    base = {"name": cfg.name, "encoder": cfg.encoder, "task": "multi-label" if multilabel else "single-label",
            "classes": list(labels.names)}
    try:
        if d.cv_folds == 0:
            runner = Finetuner(cfg, train_entries, val_entries, labels, multilabel, out, test_entries)
            runner.setup()
            try:
                result = {**base, **runner.train()}
            finally:
                runner.cleanup()
        else:
            fold_of, fold_source = _assign_folds(train_entries, d.cv_folds, source=d.fold_source,
                                                 fold_csv=d.fold_csv, seed=cfg.train.seed)
            folds = []
            for k in range(d.cv_folds):
                train_k = [e for e, f in zip(train_entries, fold_of) if f != k]
                test_k = [e for e, f in zip(train_entries, fold_of) if f == k]
                done = out / f"fold_{k}" / "results.json"
                if cfg.train.resume and done.is_file():  # this fold finished before the interruption
                    log.info("fold %d already finished: reading %s", k, done)
                    folds.append({"fold": k, "n_train": len(train_k), "n_test": len(test_k),
                                  **json.loads(done.read_text(encoding="utf-8"))})
                    continue
                runner = Finetuner(cfg, train_k, test_k, labels, multilabel, out / f"fold_{k}")
                runner.setup()
                try:
                    folds.append({"fold": k, "n_train": len(train_k), "n_test": len(test_k), **runner.train()})
                finally:
                    runner.cleanup()
            values = np.array([f["value"] for f in folds])
            per_class = {}
            for name in labels.names:
                vals = [f["per_class"][name] for f in folds if f["per_class"].get(name) is not None]
                per_class[name] = float(np.mean(vals)) if vals else None
            result = {**base, "metric": folds[0]["metric"], "value": float(values.mean()),
                      "std": float(values.std()), "report": cfg.train.report, "value_split": "held-out folds",
                      "fold_source": fold_source, "per_class": per_class, "folds": folds}
        result["config"] = finetune_config_to_dict(cfg)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            _write_json(out / "results.json", result)
        return result
    finally:
        cleanup_distributed()
