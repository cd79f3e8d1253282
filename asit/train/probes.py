"""Scoring fixed embeddings against labels: DINO's weighted k-NN classifier and a k-fold cross-validated
linear probe, with their metrics (accuracy, average precision) and the stratified fold split.

Pure NumPy / PyTorch functions of arrays, no files and no models: the pretraining monitor
(:mod:`asit.train.probe_monitor`) scores the teacher's embeddings with them, and the downstream probe
(:mod:`asit.eval.linear_probe`) and fine-tuning (:mod:`asit.finetune`) reuse the linear probe, metrics and
folds. The linear probe standardises the features with each training part's statistics and fits a linear
layer full-batch with L-BFGS (softmax cross-entropy for single-label data, per-class sigmoid for multi-label
data) plus an L2 penalty; single-label tasks report accuracy, multi-label tasks mean average precision.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ProbeConfig",
    "accuracy",
    "average_precision",
    "cross_validate",
    "fit_linear",
    "knn_accuracy",
    "knn_predict",
    "mean_average_precision",
    "stratified_folds",
]

log = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    """Options of the probe (saved in the results)."""

    folds: int = 5
    seed: int = 0
    weight_decay: float = 1e-3  # L2 penalty: 0.5 · wd · ||W||² added to the mean loss
    max_iter: int = 200  # L-BFGS iterations


# --------------------------------------------------------------------------- metrics


def accuracy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Top-1 accuracy of ``logits`` ``[N, K]`` against class indices ``targets`` ``[N]``."""
    return float((np.asarray(logits).argmax(1) == np.asarray(targets)).mean())


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision of one class: the mean, over the positives, of the precision at the
    score threshold of that positive (ties: every sample scoring at least as high counts, the
    same step function as scikit-learn's ``average_precision_score``). NaN without positives.

    Args:
        scores: ``[N]`` higher = more likely positive.
        targets: ``[N]`` 0/1 or bool.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    n_pos = int(targets.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], targets[order]
    tp = np.cumsum(t)
    # for a run of tied scores, every member sees the counts at the end of the run
    last_of_run = np.r_[s[1:] != s[:-1], True]
    run_end = _next_true_index(last_of_run)
    precision = tp[run_end] / (run_end + 1)
    return float(precision[t].sum() / n_pos)


def _next_true_index(flags: np.ndarray) -> np.ndarray:
    """For each position i, the smallest j >= i with ``flags[j]`` (the last element must be True)."""
    idx = np.where(flags, np.arange(flags.size), flags.size)
    return np.minimum.accumulate(idx[::-1])[::-1]


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean of :func:`average_precision` over the columns of ``[N, K]`` that have a positive."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    aps = [
        average_precision(scores[:, k], targets[:, k]) for k in range(scores.shape[1]) if targets[:, k].any()
    ]
    if not aps:
        raise ValueError("no class has a positive example: mAP is undefined")
    return float(np.mean(aps))


# --------------------------------------------------------------------------- folds and fitting


def stratified_folds(labels: Sequence[tuple[str, ...]], k: int, seed: int) -> np.ndarray:
    """Assign each clip to one of ``k`` folds, balancing classes; deterministic given ``seed``.

    Clips are grouped by a stratification key (their label for single-label data, their rarest
    label for multi-label data), each group is shuffled with ``seed`` and dealt round-robin,
    continuing where the previous group stopped so fold sizes differ by at most one.

    Returns:
        ``[N]`` int fold index.
    """
    n = len(labels)
    if k < 2 or k > n:
        raise ValueError(f"folds must be in [2, {n}] for {n} clips, got {k}")
    freq = Counter(label for ls in labels for label in ls)
    keys = [min(ls, key=lambda x: (freq[x], x)) if ls else "" for ls in labels]
    rng = np.random.default_rng(seed)
    fold = np.empty(n, dtype=np.int64)
    offset = 0
    for key in sorted(set(keys)):
        members = np.array([i for i, x in enumerate(keys) if x == key])
        members = members[rng.permutation(members.size)]
        fold[members] = (offset + np.arange(members.size)) % k
        offset += members.size
    return fold


def fit_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    multilabel: bool,
    weight_decay: float,
    max_iter: int,
    num_classes: int | None = None,
) -> torch.nn.Linear:
    """Fit ``Linear(D, K)`` full-batch with L-BFGS.

    Args:
        x: ``[N, D]`` (already standardised) float64 features.
        y: ``[N]`` class indices (single-label) or ``[N, K]`` 0/1 floats (multi-label).
        multilabel: sigmoid + binary cross-entropy instead of softmax cross-entropy.
        num_classes: ``K`` for single-label data: the size of the whole label set, which a
            training fold may not fully contain (default: the largest index in ``y`` plus one).
    """
    if multilabel:
        num_classes = y.shape[1]
    elif num_classes is None:
        num_classes = int(y.max()) + 1
    elif int(y.max()) >= num_classes:
        raise ValueError(f"class index {int(y.max())} is out of range for num_classes={num_classes}")
    layer = torch.nn.Linear(x.shape[1], num_classes, dtype=x.dtype)
    torch.nn.init.zeros_(layer.weight)  # convex problem: a fixed start makes the fit deterministic
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(
        layer.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = layer(x)
        if multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, y)
        else:
            loss = F.cross_entropy(logits, y)
        loss = loss + 0.5 * weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return layer.requires_grad_(False)


def cross_validate(
    features: np.ndarray, labels: Sequence[tuple[str, ...]], cfg: ProbeConfig | None = None
) -> dict[str, Any]:
    """k-fold cross-validated linear probe of ``features`` ``[N, D]``.

    Single-label when every clip has exactly one label (metric: accuracy), otherwise
    multi-label (metric: mAP). Clips without labels are dropped in the single-label case.

    Returns:
        ``{"task", "metric", "classes", "folds": [{"fold", "n_train", "n_test", metric}],
        "mean", "std", "config"}``; ``std`` is the population standard deviation over folds.
    """
    cfg = cfg or ProbeConfig()
    labels = [tuple(x) for x in labels]
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] != len(labels):
        raise ValueError(f"features must be [N, D] with N = {len(labels)} labels, got {features.shape}")
    multilabel = any(len(x) != 1 for x in labels if x)
    if not multilabel:
        keep = [i for i, x in enumerate(labels) if x]
        if len(keep) < len(labels):
            log.warning("dropping %d unlabelled clips", len(labels) - len(keep))
        features, labels = features[keep], [labels[i] for i in keep]
    classes = sorted({c for ls in labels for c in ls})
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes to probe, found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    if multilabel:
        y_all = np.zeros((len(labels), len(classes)))
        for i, ls in enumerate(labels):
            y_all[i, [index[c] for c in ls]] = 1.0
        metric, y_t = "mAP", torch.from_numpy(y_all)
    else:
        y_all = np.array([index[ls[0]] for ls in labels])
        metric, y_t = "accuracy", torch.from_numpy(y_all)

    fold_of = stratified_folds(labels, cfg.folds, cfg.seed)
    x_all = torch.from_numpy(features)
    per_fold = []
    for k in range(cfg.folds):
        test = torch.from_numpy(fold_of == k)
        train = ~test
        mean = x_all[train].mean(0)
        std = x_all[train].std(0).clamp_min(1e-6)
        x_train, x_test = (x_all[train] - mean) / std, (x_all[test] - mean) / std
        layer = fit_linear(
            x_train,
            y_t[train],
            multilabel=multilabel,
            weight_decay=cfg.weight_decay,
            max_iter=cfg.max_iter,
            num_classes=len(classes),  # a class absent from this training part keeps its column
        )
        logits = layer(x_test).numpy()
        y_test = y_all[test.numpy()]
        value = mean_average_precision(logits, y_test) if multilabel else accuracy(logits, y_test)
        per_fold.append({"fold": k, "n_train": int(train.sum()), "n_test": int(test.sum()), metric: value})
    values = np.array([f[metric] for f in per_fold])
    return {
        "task": "multi-label" if multilabel else "single-label",
        "metric": metric,
        "classes": classes,
        "folds": per_fold,
        "mean": float(values.mean()),
        "std": float(values.std()),
        "config": asdict(cfg),
    }


# --------------------------------------------------------------------------- weighted k-NN (DINO)


def knn_predict(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    exclude_self: bool = False,
) -> torch.Tensor:
    """DINO's weighted k-NN classifier (``eval_knn.py``): cosine similarity to every training sample, the
    ``k`` most similar vote for their class with weight ``exp(similarity / temperature)``, the class with the
    largest summed vote wins (ties: the lowest class index).

    Args:
        train: ``[M, D]`` training features (normalised here to unit length).
        train_labels: ``[M]`` class indices in ``[0, num_classes)``.
        test: ``[N, D]`` features to classify.
        k: neighbours voting; at most the number of candidates (``M``, or ``M - 1`` with ``exclude_self``).
        exclude_self: ``test`` is ``train`` (same rows, same order): sample ``i`` never votes for itself
            (leave-one-out).

    Returns:
        ``[N]`` predicted class indices.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if exclude_self and test.shape != train.shape:
        raise ValueError(f"exclude_self needs test == train, got shapes {tuple(test.shape)}, {tuple(train.shape)}")
    candidates = train.shape[0] - int(exclude_self)
    if candidates < 1:
        raise ValueError("k-NN needs at least one candidate neighbour")
    k = min(k, candidates)
    train_n = F.normalize(train.double(), dim=1)
    test_n = F.normalize(test.double(), dim=1)
    sim = test_n @ train_n.T  # [N, M] cosine similarities
    if exclude_self:
        sim.fill_diagonal_(float("-inf"))
    top_sim, top_idx = sim.topk(k, dim=1)  # [N, k]
    votes = torch.zeros(test.shape[0], num_classes, dtype=sim.dtype)
    votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())  # [N, K]
    return votes.argmax(1)


def knn_accuracy(features: np.ndarray, labels: np.ndarray, *, k: int = 20, temperature: float = 0.07) -> float:
    """Leave-one-out accuracy of :func:`knn_predict`: every sample is classified by the votes of its ``k``
    nearest *other* samples. No split to draw, so the score is deterministic and uses every labelled clip.

    Args:
        features: ``[N, D]``.
        labels: ``[N]`` integer class indices.
    """
    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features must be [N, D] and labels [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    pred = knn_predict(x, y, x, num_classes=int(y.max()) + 1, k=k, temperature=temperature, exclude_self=True)
    return float((pred == y).double().mean())
