"""Lists of audio clips: read from an AST-style JSON file, a JSON-lines file, a CSV file or a folder.

Every source becomes a list of :class:`AudioEntry` (an absolute-ish file path plus zero or more
string labels). Problems are reported as :class:`ManifestError` whose message starts with the
manifest's path and names the offending line (CSV, JSON-lines, JSON where it can be located) or
entry index (JSON).
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

from asit.atomic_io import atomic_write_text

__all__ = ["AUDIO_EXTENSIONS", "AudioEntry", "ManifestError", "label_vocabulary", "load_manifest", "write_manifest"]

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"})

# How many missing files a ManifestError spells out before summarising the rest as a count.
_MAX_LISTED_MISSING = 10

# Characters no path or label in a text manifest should hold: a line break in a CSV field means a
# quote was left open (and swallowed the rows after it); a NUL is a damaged file.
_FORBIDDEN = {"\n": "a line break", "\r": "a line break", "\x00": "a NUL character"}

# Where entry i of a manifest is, for messages: "line 3", "entry 4 (line 9)", the file's path, ...
Where = Callable[[int], str]


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
      (``labels`` a comma-separated string or a list of strings, or absent), or a plain list of
      such entries;
    * a ``.jsonl`` file (JSON lines): one such entry object per line;
    * a ``.csv`` file with rows ``path[,label]``; an optional first row ``path,label`` is
      recognised as a header; one label column, several labels separated by ``;``;
    * a directory, scanned recursively in sorted order for audio files
      (``.wav .flac .ogg .mp3 .aiff .aif``, any case); a file's label is its parent folder
      relative to the root (none for files directly in the root). Symlinked folders are followed
      once: a link back into the scanned tree (an alias or a loop) is not followed again.

    Text manifests may start with a UTF-8 byte-order mark (as spreadsheet programs write them).
    Relative paths in a JSON or CSV manifest are resolved against the manifest's folder.
    With ``check_exists`` every listed file must exist; all missing ones are reported at once.
    A path listed more than once is kept (each occurrence is a clip) with one warning.

    Raises:
        ManifestError: unreadable or malformed manifest, missing files, or no entries at all.
    """
    src = Path(source).expanduser()
    if src.is_dir():
        entries = _scan_folder(src)
        where: Where = lambda i: f"entry {i}"  # noqa: E731
    elif not src.exists():
        raise ManifestError(f"{src}: manifest does not exist")
    elif src.suffix.lower() == ".json":
        entries, where = _read_json(src)
    elif src.suffix.lower() == ".jsonl":
        entries, where = _read_json_lines(src)
    elif src.suffix.lower() == ".csv":
        entries, where = _read_csv(src)
    else:
        raise ManifestError(f"{src}: unknown manifest type {src.suffix!r}; expected .json, .jsonl, .csv or a "
                            "folder")

    if not entries:
        raise ManifestError(f"{src}: manifest lists no audio files")
    if check_exists:
        _check_files_exist(src, entries, where)
    _warn_duplicates(src, entries, where)
    logger.info("loaded %d clips from %s", len(entries), src)
    return entries


def label_vocabulary(entries: Iterable[AudioEntry]) -> list[str]:
    """Return the sorted list of distinct labels used by ``entries``."""
    return sorted({label for entry in entries for label in entry.labels})


def write_manifest(entries: Iterable[AudioEntry], path: str | os.PathLike) -> Path:
    """Write ``entries`` as a manifest that :func:`load_manifest` reads back as the same list, in the
    format the name's suffix says: ``.json`` (AST layout, ``"labels"`` comma-joined, or a list when a
    label holds a comma), ``.jsonl`` or ``.csv`` (``path,label``, labels joined by ``;``). Paths are
    written absolute (a relative one would be read relative to the new manifest's folder). The file is
    replaced atomically; returns its path.

    Raises:
        ManifestError: an unknown suffix, or a label the CSV format cannot hold (one with ``;``).
    """
    dst = Path(path).expanduser()
    kind = dst.suffix.lower()
    entries = [AudioEntry(os.path.abspath(e.path), e.labels) for e in entries]

    def item(entry: AudioEntry) -> dict:
        labels: str | list[str] = list(entry.labels)
        if not any("," in label for label in entry.labels):
            labels = ",".join(entry.labels)
        return {"wav": entry.path, "labels": labels}

    if kind == ".json":
        text = json.dumps({"data": [item(e) for e in entries]}, indent=1, ensure_ascii=False) + "\n"
    elif kind == ".jsonl":
        text = "".join(json.dumps(item(e), ensure_ascii=False) + "\n" for e in entries)
    elif kind == ".csv":
        for entry in entries:
            if any(";" in label for label in entry.labels):
                raise ManifestError(f"{dst}: label of {entry.path} holds a ';', which a CSV manifest cannot "
                                    "hold (write .json or .jsonl)")
        rows = [["path", "label"], *([e.path, ";".join(e.labels)] for e in entries)]
        buf = io.StringIO(newline="")
        csv.writer(buf, lineterminator="\n").writerows(rows)
        text = buf.getvalue()
    else:
        raise ManifestError(f"{dst}: unknown manifest type {dst.suffix!r}; expected .json, .jsonl or .csv")
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dst, text)
    return dst


def _resolve(base: Path, raw: str) -> str:
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = base / path
    return os.path.normpath(path)


def _check_text(src: Path, where: Callable[[], str], what: str, value: str) -> None:
    for char, name in _FORBIDDEN.items():
        if char in value:
            hint = " (a quote left open?)" if char in "\r\n" and src.suffix.lower() == ".csv" else ""
            raise ManifestError(f"{src} {where()}: {what} {value[:60]!r} contains {name}{hint}")


def _clean_labels(src: Path, where: Callable[[], str], parts: Iterable[str]) -> tuple[str, ...]:
    labels = tuple(p.strip() for p in parts if p.strip())
    for label in labels:
        _check_text(src, where, "label", label)
    return labels


def _entry(src: Path, where: Callable[[], str], item: object) -> AudioEntry:
    """One JSON / JSON-lines entry ``{"wav": path, "labels": "a,b" | [...]}``; ``where()`` names it in
    an error (called only then: finding a JSON entry's line takes a second pass over the file)."""
    if not isinstance(item, dict):
        raise ManifestError(f"{src} {where()}: expected an object, got {type(item).__name__}")
    raw_path = item.get("wav")
    if not isinstance(raw_path, str) or not raw_path.strip():
        raise ManifestError(f'{src} {where()}: missing or empty "wav" path')
    _check_text(src, where, "path", raw_path)
    raw_labels = item.get("labels")
    if raw_labels is None:
        labels: tuple[str, ...] = ()
    elif isinstance(raw_labels, str):
        labels = _clean_labels(src, where, raw_labels.split(","))
    elif isinstance(raw_labels, list) and all(isinstance(x, str) for x in raw_labels):
        labels = _clean_labels(src, where, raw_labels)
    else:
        raise ManifestError(f'{src} {where()}: "labels" must be a string or a list of strings')
    return AudioEntry(_resolve(src.parent, raw_path.strip()), labels)


def _read_text(src: Path) -> str:
    try:
        with open(src, encoding="utf-8-sig", newline="") as f:  # -sig: a leading byte-order mark is dropped
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{src}: cannot read manifest: {exc}") from exc


def _read_json(src: Path) -> tuple[list[AudioEntry], Where]:
    text = _read_text(src)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{src} line {exc.lineno}: invalid JSON: {exc.msg}") from exc

    if isinstance(doc, dict):
        if "data" not in doc and "shards" in doc:  # make_shards.py's index.json
            raise ManifestError(f"{src}: this is a shard index, not a manifest (the index of WebDataset shards "
                                f"that make_shards.py writes); pass shards:{src.parent} "
                                f"(data.train_manifest=shards:{src.parent})")
        if "data" not in doc:
            raise ManifestError(f'{src}: JSON manifest has no "data" key')
        items = doc["data"]
    else:
        items = doc
    if not isinstance(items, list):
        raise ManifestError(f'{src}: "data" must be a list of entries, got {type(items).__name__}')

    @cache
    def lines() -> list[int] | None:  # found only when a message needs them
        return _json_entry_lines(text)

    def where(i: int) -> str:
        found = lines()
        return f"entry {i} (line {found[i]})" if found is not None and i < len(found) else f"entry {i}"

    return [_entry(src, partial(where, i), item) for i, item in enumerate(items)], where


def _json_entry_lines(text: str) -> list[int] | None:
    """The line on which each entry of a JSON manifest's entry list starts (the ``"data"`` list of an
    object, or a top-level list), or ``None`` when the layout is something else."""
    decoder = json.JSONDecoder()
    blank = re.compile(r"[ \t\n\r]*")

    def skip(pos: int) -> int:
        return blank.match(text, pos).end()

    try:
        pos = skip(0)
        if text.startswith("{", pos):
            pos = skip(pos + 1)
            while True:
                if text.startswith("}", pos):
                    return None
                key, pos = decoder.raw_decode(text, pos)
                pos = skip(skip(pos) + 1)  # past the colon
                if key == "data":
                    break
                _, pos = decoder.raw_decode(text, pos)
                pos = skip(pos)
                if text.startswith(",", pos):
                    pos = skip(pos + 1)
        if not text.startswith("[", pos):
            return None
        starts = []
        pos = skip(pos + 1)
        while not text.startswith("]", pos) and pos < len(text):
            starts.append(pos)
            _, pos = decoder.raw_decode(text, pos)
            pos = skip(pos)
            if text.startswith(",", pos):
                pos = skip(pos + 1)
    except (ValueError, AttributeError):
        return None
    breaks = [m.start() for m in re.finditer("\n", text)]
    return [bisect.bisect_left(breaks, start) + 1 for start in starts]


def _read_json_lines(src: Path) -> tuple[list[AudioEntry], Where]:
    entries, lines = [], []
    for number, line in enumerate(_read_text(src).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{src} {where}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
        entries.append(_entry(src, lambda w=where: w, item))
        lines.append(number)
    return entries, lambda i: f"line {lines[i]}"


def _is_header(row: list[str]) -> bool:
    names = [c.strip().lower() for c in row]
    return (
        bool(names)
        and names[0] in {"path", "wav", "file", "filename"}
        and all(n in {"label", "labels"} for n in names[1:])
    )


def _read_csv(src: Path) -> tuple[list[AudioEntry], Where]:
    base = src.parent
    entries, lines = [], []
    try:
        with open(src, encoding="utf-8-sig", newline="") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            reader = csv.reader(f, strict=True)  # strict: an open quote at the end is an error, not a field
            first = True
            while True:
                line = reader.line_num + 1  # where this row starts (a quoted field may span lines)
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    raise ManifestError(f"{src} line {line}: malformed CSV: {exc} (a quote left open?)") from exc
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
                _check_text(src, lambda w=where: w, "path", raw_path)
                labels = _clean_labels(src, lambda w=where: w, row[1].split(";")) if len(row) == 2 else ()
                entries.append(AudioEntry(_resolve(base, raw_path), labels))
                lines.append(line)
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{src}: cannot read manifest: {exc}") from exc
    return entries, lambda i: f"line {lines[i]}"


def _scan_folder(root: Path) -> list[AudioEntry]:
    """Audio files under ``root``; each folder is scanned once, however many links lead to it."""
    real_root = os.path.realpath(root)
    seen = {_folder_id(root)}
    not_followed: list[str] = []
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for name in sorted(dirnames):
            path = os.path.join(dirpath, name)
            try:
                ident = _folder_id(path)
            except OSError:  # a dangling link
                continue
            # a link into the tree itself is an alias of a folder scanned under its own name (or a loop)
            alias = os.path.islink(path) and _inside(os.path.realpath(path), real_root)
            if alias or ident in seen:
                not_followed.append(path)
                continue
            seen.add(ident)
            keep.append(name)
        dirnames[:] = keep
        folder = Path(dirpath)
        rel = folder.relative_to(root).as_posix()
        labels = () if rel == "." else (rel,)
        for name in sorted(filenames):
            if Path(name).suffix.lower() in AUDIO_EXTENSIONS:
                entries.append(AudioEntry(os.path.normpath(folder / name), labels))
    if not_followed:
        logger.warning("%s: %d linked folder(s) lead to folders scanned already (an alias or a loop) and were "
                       "not scanned again, e.g. %s", root, len(not_followed), not_followed[0])
    return entries


def _folder_id(path: str | os.PathLike) -> tuple[int, int]:
    st = os.stat(path)  # follows links: the folder itself
    return st.st_dev, st.st_ino


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _check_files_exist(src: Path, entries: list[AudioEntry], where: Where) -> None:
    missing = [i for i, entry in enumerate(entries) if not os.path.isfile(entry.path)]
    if not missing:
        return
    shown = "; ".join(f"{where(i)}: {entries[i].path}" for i in missing[:_MAX_LISTED_MISSING])
    more = len(missing) - _MAX_LISTED_MISSING
    tail = f"; ... and {more} more" if more > 0 else ""
    raise ManifestError(f"{src}: {len(missing)} of {len(entries)} listed files do not exist: {shown}{tail}")


def _warn_duplicates(src: Path, entries: list[AudioEntry], where: Where) -> None:
    first: dict[str, int] = {}
    repeats = []
    for i, entry in enumerate(entries):
        if first.setdefault(entry.path, i) != i:
            repeats.append(i)
    if repeats:
        i = repeats[0]
        logger.warning("%s: %d %s a path listed before (each is used as a separate clip), e.g. %s (%s) "
                       "repeats %s", src, len(repeats), "entry repeats" if len(repeats) == 1 else "entries repeat",
                       where(i), entries[i].path, where(first[entries[i].path]))
