"""Figures from run outputs: training curves from ``log.jsonl``, per-class bars from results JSON.

* :func:`plot_training_log` reads the JSON-lines log that pretraining or fine-tuning writes
  (:class:`asit.train.metrics.MetricWriter`) and draws one panel per loss term (``loss``,
  ``global``, ``local``, ``recon``, any ``*_loss``), one for the learning rate (log scale) and,
  when the log has them, one for the validation metrics (``val_*``). Incident records (with an
  ``"event"`` key) are skipped.
* :func:`plot_results` reads a fine-tuning or linear-probe results JSON and draws a horizontal bar
  per class (``per_class``, sorted; the best and worst ``top`` when there are many), or per fold
  when the file has no per-class scores.

matplotlib runs with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["loss_terms", "plot_results", "plot_training_log", "read_log"]

_LOSS_KEYS = ("loss", "global", "local", "recon")


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The regular records of a ``log.jsonl`` (incidents with an ``"event"`` key left out)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number}: invalid JSON: {err.msg}") from err
            if isinstance(record, dict) and "event" not in record and "step" in record:
                records.append(record)
    return records


def loss_terms(records: list[dict[str, Any]]) -> list[str]:
    """Loss keys present in ``records``: the known terms first, then any ``*_loss`` (not ``val_*``)."""
    keys = {k for r in records for k, v in r.items() if _is_number(v)}
    extra = sorted(k for k in keys if k.endswith("_loss") and not k.startswith("val_") and k not in _LOSS_KEYS)
    return [k for k in _LOSS_KEYS if k in keys] + extra


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if _is_number(r.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_log(log_path: str | os.PathLike, out: str | os.PathLike, *, title: str | None = None) -> Path:
    """Loss / learning-rate (/ validation) curves of a run as a PNG; returns ``out``.

    Raises:
        ValueError: the log has no loss term and no learning rate to plot.
    """
    records = read_log(log_path)
    losses = loss_terms(records)
    has_lr = any(_is_number(r.get("lr")) for r in records)
    val_keys = sorted({k for r in records for k, v in r.items() if k.startswith("val_") and _is_number(v)})
    panels = [("loss", k) for k in losses] + ([("lr", "lr")] if has_lr else []) + ([("val", None)] if val_keys else [])
    if not losses and not has_lr:
        raise ValueError(f"{log_path}: no loss term or learning rate in the log")
    plt = _pyplot()
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (kind, key) in zip(axes.flat, panels):
        if kind == "val":
            for k in val_keys:
                ax.plot(*_series(records, k), marker="o", label=k)
            ax.set_title("validation")
            ax.legend(fontsize=8)
        else:
            steps, values = _series(records, key)
            ax.plot(steps, values, color="tab:orange" if kind == "lr" else "tab:blue")
            ax.set_title("learning rate" if kind == "lr" else key)
            if kind == "lr" and values and min(values) > 0:
                ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title or str(log_path), fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_results(results_path: str | os.PathLike, out: str | os.PathLike, *, top: int = 30) -> Path:
    """Per-class (or, without per-class scores, per-fold) bar chart of a results JSON; returns ``out``.

    With more than ``2 · top`` classes only the ``top`` best and ``top`` worst are drawn.

    Raises:
        ValueError: the file has neither ``per_class`` scores nor ``folds``.
    """
    with open(results_path, encoding="utf-8") as fh:
        result = json.load(fh)
    metric = result.get("metric", "score")
    per_class = {k: v for k, v in (result.get("per_class") or {}).items() if _is_number(v)}
    if per_class:
        items = sorted(per_class.items(), key=lambda kv: kv[1], reverse=True)
        if len(items) > 2 * top:
            items = items[:top] + [("…", float("nan"))] + items[-top:]
        what = "class"
    elif result.get("folds"):
        items = [(f"fold {f.get('fold', i)}", f.get(metric, f.get("value"))) for i, f in enumerate(result["folds"])]
        items = [(k, v) for k, v in items if _is_number(v)]
        what = "fold"
    else:
        raise ValueError(f"{results_path}: no per_class scores and no folds to plot")
    if not items:
        raise ValueError(f"{results_path}: no finite scores to plot")
    plt = _pyplot()
    names = [k for k, _ in items]
    values = [v for _, v in items]
    fig, ax = plt.subplots(figsize=(7.0, max(2.5, 0.25 * len(items) + 1.2)))
    ax.barh(range(len(items)), [0 if not _is_number(v) else v for v in values], color="tab:blue")
    ax.set_yticks(range(len(items)), names, fontsize=7 if len(items) > 30 else 9)
    ax.invert_yaxis()
    ax.set_xlabel(f"{'AP' if metric == 'mAP' and what == 'class' else metric}")
    overall = result.get("value", result.get("mean"))
    if _is_number(overall):
        ax.axvline(overall, color="tab:red", linestyle="--", label=f"{metric} = {overall:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{result.get('name', Path(results_path).stem)}: {metric} per {what}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
