"""The fine-tuning entry point: :func:`run_finetune` runs one recipe, as a single split or a cross-validation.

It reads the manifests (the built-in demo set for ``"demo"``), labels flat folders from ``data.fold_csv``,
fixes the label space and the task type, then runs one :class:`~asit.finetune.trainer.Finetuner` on the
train / validation (/ test) clips, or one per fold with the mean and standard deviation over the held-out
folds (finished folds are not rerun on resume), and writes ``results.json`` in ``train.output_dir``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from asit.data import AudioEntry, load_manifest

from .config import FinetuneConfig, FTDataConfig, finetune_config_to_dict
from .data import _resolve_manifest
from .labels import LabelSpace, _assign_folds, labels_from_metadata, read_class_csv
from .trainer import Finetuner, _write_json

__all__ = ["run_finetune"]

log = logging.getLogger(__name__)


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
