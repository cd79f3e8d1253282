"""Label spaces and cross-validation folds of a fine-tuning task.

:class:`LabelSpace` fixes the output order of the classes: an AudioSet-style ``class_labels_indices.csv``
(:func:`read_class_csv`, a manifest label matching a ``mid`` or a ``display_name``) or the sorted labels of
the manifests. :func:`labels_from_metadata` labels clips of a flat folder from a metadata CSV (ESC-50's
``meta/esc50.csv``), and :func:`assign_folds` gives every clip its cross-validation fold from that CSV's
``fold`` column, from the paths, or by stratified assignment; an existing fold CSV that misses a clip is an
error, never a silent switch to other folds.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asit.data import AudioEntry
from asit.eval.linear_probe import stratified_folds

__all__ = ["LabelSpace", "assign_folds", "labels_from_metadata", "read_class_csv"]

log = logging.getLogger(__name__)


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


def _targets(entries: Sequence[AudioEntry], labels: LabelSpace, where: str) -> np.ndarray:
    y = np.zeros((len(entries), labels.num_classes), dtype=np.float32)
    for i, e in enumerate(entries):
        y[i, labels.encode(e.labels, f"{where} clip {e.path}")] = 1.0
    return y
