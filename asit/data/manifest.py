"""Lists of audio clips: read from an AST-style JSON file, a CSV file or a folder of audio files.

Every source becomes a list of :class:`AudioEntry` (an absolute-ish file path plus zero or more
string labels). Problems are reported as :class:`ManifestError` whose message starts with the
manifest's path and names the offending line (CSV) or entry index (JSON).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AUDIO_EXTENSIONS", "AudioEntry", "ManifestError", "label_vocabulary", "load_manifest"]

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"})

# How many missing files a ManifestError spells out before summarising the rest as a count.
_MAX_LISTED_MISSING = 10


@dataclass(frozen=True)
class AudioEntry:
    """One clip: the path of its audio file and its labels (possibly none)."""

    path: str
    labels: tuple[str, ...] = ()


class ManifestError(ValueError):
    """A manifest could not be read; the message names the file and the line or entry."""


def load_manifest(source: str | os.PathLike, *, check_exists: bool = True) -> list[AudioEntry]:
    """Read a list of audio clips from ``source``.

    ``source`` may be

    * a ``.json`` file in the AST layout ``{"data": [{"wav": path, "labels": "a,b"}, ...]}``
      (``labels`` a comma-separated string or a list of strings, or absent);
    * a ``.csv`` file with rows ``path[,label]``; an optional first row ``path,label`` is
      recognised as a header; one label column, several labels separated by ``;``;
    * a directory, scanned recursively in sorted order for audio files
      (``.wav .flac .ogg .mp3 .aiff .aif``, any case); a file's label is its parent folder
      relative to the root (none for files directly in the root).

    Relative paths in a JSON or CSV manifest are resolved against the manifest's folder.
    With ``check_exists`` every listed file must exist; all missing ones are reported at once.

    Raises:
        ManifestError: unreadable or malformed manifest, missing files, or no entries at all.
    """
    src = Path(source).expanduser()
    if src.is_dir():
        entries = _scan_folder(src)
        located = [(e, f"entry {i}") for i, e in enumerate(entries)]
    elif not src.exists():
        raise ManifestError(f"{src}: manifest does not exist")
    elif src.suffix.lower() == ".json":
        located = _read_json(src)
    elif src.suffix.lower() == ".csv":
        located = _read_csv(src)
    else:
        raise ManifestError(f"{src}: unknown manifest type {src.suffix!r}; expected .json, .csv or a folder")

    if not located:
        raise ManifestError(f"{src}: manifest lists no audio files")
    if check_exists:
        _check_files_exist(src, located)
    entries = [entry for entry, _ in located]
    logger.info("loaded %d clips from %s", len(entries), src)
    return entries


def label_vocabulary(entries: Iterable[AudioEntry]) -> list[str]:
    """Return the sorted list of distinct labels used by ``entries``."""
    return sorted({label for entry in entries for label in entry.labels})


def _resolve(base: Path, raw: str) -> str:
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = base / path
    return os.path.normpath(path)


def _clean_labels(parts: Iterable[str]) -> tuple[str, ...]:
    return tuple(p.strip() for p in parts if p.strip())


def _read_json(src: Path) -> list[tuple[AudioEntry, str]]:
    try:
        with open(src, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{src} line {exc.lineno}: invalid JSON: {exc.msg}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{src}: cannot read manifest: {exc}") from exc

    if isinstance(doc, dict):
        if "data" not in doc:
            raise ManifestError(f'{src}: JSON manifest has no "data" key')
        items = doc["data"]
    else:
        items = doc
    if not isinstance(items, list):
        raise ManifestError(f'{src}: "data" must be a list of entries, got {type(items).__name__}')

    base = src.parent
    located = []
    for i, item in enumerate(items):
        where = f"entry {i}"
        if not isinstance(item, dict):
            raise ManifestError(f"{src} {where}: expected an object, got {type(item).__name__}")
        raw_path = item.get("wav")
        if not isinstance(raw_path, str) or not raw_path.strip():
            raise ManifestError(f'{src} {where}: missing or empty "wav" path')
        raw_labels = item.get("labels")
        if raw_labels is None:
            labels: tuple[str, ...] = ()
        elif isinstance(raw_labels, str):
            labels = _clean_labels(raw_labels.split(","))
        elif isinstance(raw_labels, list) and all(isinstance(x, str) for x in raw_labels):
            labels = _clean_labels(raw_labels)
        else:
            raise ManifestError(f'{src} {where}: "labels" must be a string or a list of strings')
        located.append((AudioEntry(_resolve(base, raw_path.strip()), labels), where))
    return located


def _is_header(row: list[str]) -> bool:
    names = [c.strip().lower() for c in row]
    return (
        bool(names)
        and names[0] in {"path", "wav", "file", "filename"}
        and all(n in {"label", "labels"} for n in names[1:])
    )


def _read_csv(src: Path) -> list[tuple[AudioEntry, str]]:
    base = src.parent
    located = []
    try:
        with open(src, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            first = True
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if first:
                    first = False
                    if _is_header(row):
                        continue
                where = f"line {line}"
                if len(row) > 2:
                    raise ManifestError(
                        f"{src} {where}: expected 'path[,label]' but found {len(row)} fields "
                        f"(quote a label that contains commas, or separate labels with ';')"
                    )
                raw_path = row[0].strip()
                if not raw_path:
                    raise ManifestError(f"{src} {where}: empty path")
                labels = _clean_labels(row[1].split(";")) if len(row) == 2 else ()
                located.append((AudioEntry(_resolve(base, raw_path), labels), where))
    except csv.Error as exc:
        raise ManifestError(f"{src}: malformed CSV: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{src}: cannot read manifest: {exc}") from exc
    return located


def _scan_folder(root: Path) -> list[AudioEntry]:
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        folder = Path(dirpath)
        rel = folder.relative_to(root).as_posix()
        labels = () if rel == "." else (rel,)
        for name in sorted(filenames):
            if Path(name).suffix.lower() in AUDIO_EXTENSIONS:
                entries.append(AudioEntry(os.path.normpath(folder / name), labels))
    return entries


def _check_files_exist(src: Path, located: list[tuple[AudioEntry, str]]) -> None:
    missing = [(where, entry.path) for entry, where in located if not os.path.isfile(entry.path)]
    if not missing:
        return
    shown = "; ".join(f"{where}: {path}" for where, path in missing[:_MAX_LISTED_MISSING])
    more = len(missing) - _MAX_LISTED_MISSING
    tail = f"; ... and {more} more" if more > 0 else ""
    raise ManifestError(f"{src}: {len(missing)} of {len(located)} listed files do not exist: {shown}{tail}")
