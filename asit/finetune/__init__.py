"""Fine-tuning a pretrained ASiT teacher encoder on a labelled task with the AST/SSAST recipe.

``run_finetune(load_finetune_config("esc50", ["encoder=runs/asit/teacher_encoder.safetensors"]))``
rebuilds the exported teacher backbone (``teacher_encoder.safetensors``), puts a fresh head on it
and trains both (docs/design.md §1 "Downstream", the paper's Table I protocol):

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

Modules: :mod:`~asit.finetune.config` (the recipe and its presets), :mod:`~asit.finetune.labels` (label
spaces, metadata labels, folds), :mod:`~asit.finetune.augment`, :mod:`~asit.finetune.data` (clips, batches,
balanced sampling), :mod:`~asit.finetune.model`, :mod:`~asit.finetune.trainer` (one run) and
:mod:`~asit.finetune.run` (:func:`run_finetune`, the cross-validation runner).
"""

from asit.data.samplers import WeightedDistributedSampler

from .augment import SpecAugment, add_noise_and_shift, apply_mixup, sample_mixup
from .config import (
    FINETUNE_PRESET_DIR,
    FinetuneConfig,
    FTAugmentConfig,
    FTDataConfig,
    FTModelConfig,
    FTOptimConfig,
    FTTrainConfig,
    available_presets,
    finetune_config_to_dict,
    load_finetune_config,
)
from .data import LabelledClips, balanced_sample_weights, collate_clips
from .labels import LabelSpace, assign_folds, labels_from_metadata, read_class_csv
from .model import FinetuneModel, load_finetuned_model
from .run import run_finetune
from .trainer import Finetuner, evaluate_scores, finetune_lr_schedule

__all__ = [
    "FINETUNE_PRESET_DIR",
    "FTAugmentConfig",
    "FTDataConfig",
    "FTModelConfig",
    "FTOptimConfig",
    "FTTrainConfig",
    "FinetuneConfig",
    "FinetuneModel",
    "Finetuner",
    "LabelSpace",
    "LabelledClips",
    "SpecAugment",
    "WeightedDistributedSampler",
    "add_noise_and_shift",
    "apply_mixup",
    "assign_folds",
    "available_presets",
    "balanced_sample_weights",
    "collate_clips",
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
