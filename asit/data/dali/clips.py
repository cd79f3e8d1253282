"""The clip inventory of the DALI loader: which clips a pipeline may read, where they are, and why others are not.

A source is a manifest's files (:class:`_FileClips`) or WebDataset shards (:class:`_ShardClips`);
either gives each clip a number, a name for messages, its manifest index, the epoch's order of all
clips, and a built pipeline over any list of them. Clips a DALI pipeline cannot be trusted with are
found before training, with :func:`~asit.data.audio.load_audio`'s reasons:

* files: each header is checked by load_audio's header rules (``_check_files``,
  :func:`~asit.data.audio.check_header`), and files in a format DALI's decoder lacks (:data:`DALI_UNSUPPORTED_FORMATS`)
  get ``"unsupported-by-dali"``;
* shards: the tars' headers and each clip's audio header are read once to find each clip's audio
  and ``json`` members (about 0.1 ms per clip from the page cache) and cached per tar
  (``$ASIT_CACHE/dali-members``, keyed on the tar's path, size, modification time and inode, and
  on libsndfile's version); clips without an audio member (``"missing"``), without a ``json``
  member (``"bad-metadata"``), whose audio header fails the manifest check (:func:`_header_reason`:
  ``"unreadable"``, ``"empty"``, ``"bad-sample-rate"``, ``"too-long"``, ``"unsupported-by-dali"``)
  and clips an index lists but a damaged tar lacks (``"truncated-shard"``, ``"unreadable-shard"``)
  are left out. Each shard pipeline gets DALI index files (:func:`write_dali_index`) listing exactly
  the clips it is to read, in order.

After decoding, :func:`clip_check` judges each clip from the pipeline's reductions (NaN/Inf:
``"non-finite"``, beyond ``MAX_ABS_SAMPLE``: ``"out-of-range"``).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...atomic_io import atomic_write_text
from ..audio import MAX_ABS_SAMPLE, MAX_SECONDS, AudioDecodeError, check_header, header_reason
from ..manifest import AudioEntry
from ..samplers import epoch_permutation
from ..shards import ShardSet
from .pipeline import build_dali_pipeline, build_dali_webdataset_pipeline

__all__ = ["DALI_UNSUPPORTED_FORMATS", "clip_check", "write_dali_index"]

logger = logging.getLogger(__name__)


def clip_check(low: float, high: float, total: float, samples: float) -> tuple[str, str] | None:
    """:func:`~asit.data.audio.load_audio`'s verdict on a decoded clip from its min, max and sum (DALI's
    reductions: min and max skip NaN, the sum does not) and its length: ``(reason, detail)``, or None.

    The sum is NaN when a sample is, or when partial sums overflow to both infinities, which needs a
    peak of at least ``FLT_MAX / samples``: below that a NaN sum means NaN samples. Above it (samples
    beyond 1e31 in a 10-minute clip) the clip is out of range either way, and is reported so."""
    if samples == 0:  # a header and no frames (min and max of nothing: +FLT_MAX, -FLT_MAX)
        return ("empty", "no audio samples")
    if not (np.isfinite(low) and np.isfinite(high)) or low > high:  # an infinity, or NaN only (min > max)
        return ("non-finite", "NaN or Inf samples")
    peak = max(abs(float(low)), abs(float(high)))
    if np.isnan(total) and peak * float(samples) < float(np.finfo(np.float32).max):
        return ("non-finite", "NaN or Inf samples")
    if peak > MAX_ABS_SAMPLE:
        return ("out-of-range", f"peak sample {peak:.3g}")
    return None



# Formats soundfile opens but DALI's audio decoder (libsndfile without MPEG, reading from memory) does
# not: measured with nvidia-dali 2.4 over every format/subtype soundfile writes (WAV/WAVEX of any
# sample type, FLAC, OGG Vorbis and Opus, AIFF, AU, W64, RF64, CAF incl. ALAC, ... all decode).
# A format missing here still cannot stop a run: the loader then finds the clip that fails (_probe).
DALI_UNSUPPORTED_FORMATS = frozenset({"MP3", "SD2"})


def _check_files(entries: list[AudioEntry], sample_rate: int,
                 part: tuple[int, int] = (0, 1)) -> tuple[list[int], dict[int, str]]:
    """Indices of the entries whose header passes load_audio's header checks
    (:func:`~asit.data.audio.check_header`) in a format DALI decodes, and the reason of each other one
    (load_audio's reasons, or ``"unsupported-by-dali"``). ``part=(k, n)`` checks only the entries
    ``k, k + n, k + 2n, ...``. ``sample_rate`` is not needed by the header rules (kept for the callers)."""
    good, reasons = [], {}
    for i in range(part[0], len(entries), part[1]):
        try:
            header = check_header(entries[i].path, max_seconds=MAX_SECONDS)
        except AudioDecodeError as err:
            reasons[i] = err.reason
            continue
        if header.format in DALI_UNSUPPORTED_FORMATS:
            reasons[i] = "unsupported-by-dali"
            continue
        good.append(i)
    return good, reasons


def write_dali_index(path: str | os.PathLike, samples: list[tuple[int, int, str, int, int, str]]) -> None:
    """Write a DALI WebDataset index file (format ``v1.2``) listing ``samples`` in this order.

    Each sample is ``(audio offset, audio size, audio name, json offset, json size, json name)``:
    the data offsets (multiples of 512) and sizes of its two tar members. The components are named
    ``audio`` and ``json`` whatever the members' extensions, so one reader output takes any audio.
    """
    if not samples:
        raise ValueError("a DALI index needs at least one sample")
    lines = [f"v1.2 {len(samples)}"]
    for a_off, a_size, a_name, j_off, j_size, j_name in samples:
        lines.append(f"audio {a_off} {a_size} {_token(a_name)} json {j_off} {j_size} {_token(j_name)}")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def _token(name: str) -> str:
    """A member name as one whitespace-free token (DALI only shows it in messages)."""
    return re.sub(r"\s", "_", name) or "_"


class _FileClips:
    """The clips of a manifest for :class:`~asit.data.dali.DaliPretrainLoader`: clip ``i`` is ``entries[i]``."""

    def __init__(self, entries: list[AudioEntry], label_vocab: list[str] | None) -> None:
        self.entries = list(entries)
        vocab = list(label_vocab) if label_vocab is not None else []
        position = {label: k for k, label in enumerate(vocab)}
        self.labels = torch.zeros(len(entries), len(vocab))  # [N, K] multi-hot, by manifest index
        for i, entry in enumerate(entries):
            self.labels[i, [position[x] for x in entry.labels if x in position]] = 1.0

    def __len__(self) -> int:
        return len(self.entries)

    def check(self, sample_rate: int, part: tuple[int, int] = (0, 1)) -> tuple[list[int], dict[int, str]]:
        return _check_files(self.entries, sample_rate, part)

    def name(self, i: int) -> str:
        return self.entries[i].path

    source = name  # how DALI names the clip in its errors

    def index(self, i: int) -> int:
        return i

    def order(self, seed: int, epoch: int) -> list[int]:
        return epoch_permutation(len(self.entries), seed, epoch)

    def build(self, clips: list[int], **args: Any):
        return build_dali_pipeline([self.entries[i].path for i in clips], clips, shuffle=False, pad_last_batch=False,
                                   **args)

    def rows(self, first, clips: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict[int, tuple[str, str]]]:
        index = torch.from_numpy(np.array(first.as_tensor())).reshape(-1).to(torch.int64)  # [B] = the clip ids
        return index, self.labels[index], {}

    def close(self) -> None:
        pass


def _header_reason(sound: tuple[int, int, int, str] | str) -> str | None:
    """Why a clip with this audio header is left out, by load_audio's header rules
    (:func:`~asit.data.audio.header_reason`) and DALI's formats (None: kept). ``sound`` is
    ``(frames, sample rate, channels, soundfile format)``, or the reason the header could not be read."""
    if isinstance(sound, str):
        return sound
    frames, rate, channels, fmt = sound
    verdict = header_reason(frames, rate, channels, max_seconds=MAX_SECONDS)  # the module's (tests lower it)
    if verdict is not None:
        return verdict[0]
    if fmt in DALI_UNSUPPORTED_FORMATS:
        return "unsupported-by-dali"
    return None


class _ReadWatch:
    """A file's ``read``/``seek``/``tell`` for soundfile, remembering an ``OSError`` that soundfile's
    callbacks would turn into "cannot decode"."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.error = fh, None

    def read(self, size: int = -1) -> bytes:
        try:
            return self.fh.read(size)
        except OSError as exc:
            self.error = exc
            raise

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            return self.fh.seek(offset, whence)
        except OSError as exc:
            self.error = exc
            raise

    def tell(self) -> int:
        return self.fh.tell()


def _member_header(tar: tarfile.TarFile, info: tarfile.TarInfo) -> tuple[int, int, int, str] | str:
    """The audio header of a tar member, read by soundfile through tarfile (not the clip's samples:
    a few kB for WAV or FLAC, more for OGG, whose length libsndfile reads at the end). An ``OSError``
    reading it is raised (it may pass: the verdict must not be cached), not taken as a bad file."""
    import soundfile as sf

    if info.size == 0:
        return "empty"  # what load_audio says of a 0-byte file
    watch = _ReadWatch(tar.extractfile(info))
    try:
        header = sf.info(watch)
    except Exception:  # libsndfile raises several types; all mean "cannot decode"
        header = None
    if watch.error is not None:
        raise watch.error
    return "unreadable" if header is None else _sound(header)


def _sound(info: Any) -> tuple[int, int, int, str]:
    """``(frames, sample rate, channels, format)`` of a ``soundfile.info`` result, as :func:`_header_reason`
    takes it (and the member-table cache stores it)."""
    return (int(info.frames), int(info.samplerate), int(info.channels), str(info.format))


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Python's cyclic garbage collector paused (for code that builds many objects without cycles)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_MEMBER_CACHE_VERSION = 3  # of the cached member tables' layout (3: audio headers with channels)


def _libsndfile_version() -> str:
    """The audio headers' verdicts depend on it (e.g. MP3 support came with libsndfile 1.1)."""
    import soundfile as sf

    return str(sf.__libsndfile_version__)


def _member_cache_dir() -> str:
    """Where the shards' member tables are cached: ``$ASIT_CACHE/dali-members``, else
    ``~/.cache/asit/dali-members``."""
    root = os.environ.get("ASIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "asit")
    return os.path.join(root, "dali-members")


@dataclass
class _Member:
    key: str
    audio: tuple[int, int, str] | None = None  # data offset, size, member name
    json: tuple[int, int, str] | None = None
    tar: int = 0
    # the audio member's header (_member_header); "unreadable" until read, which an OSError may stop
    sound: tuple[int, int, int, str] | str = "unreadable"


class _ShardClips:
    """The clips of WebDataset shards (``scripts/make_shards.py``) for :class:`~asit.data.dali.DaliPretrainLoader`.

    The tars' member tables are read once (the tar headers, and each clip's audio header for
    :meth:`check`), and cached per tar, to find each clip's audio and ``json`` members; a clip is
    one key. Each pipeline gets DALI index files (:func:`write_dali_index`, in a
    temporary folder) listing exactly the clips it is to read, in order, one file per run of
    consecutive clips from the same tar. A clip's manifest index and labels come from its ``json``
    member, as in :class:`~asit.data.shards.ShardPretrainDataset`.
    """

    def __init__(self, shards: ShardSet, label_vocab: list[str] | None, index_dir: str | None = None) -> None:
        self.shards = shards
        vocab = list(label_vocab) if label_vocab is not None else list(shards.label_vocab)
        self.label_vocab = vocab
        self._position = {label: k for k, label in enumerate(vocab)}
        self.members: list[_Member] = []
        # clips the index lists but a damaged tar lacks: (reason, as the torch reader says it; name)
        self.short: dict[int, tuple[str, str]] = {}
        for t, url in enumerate(shards.urls):
            found = self._members(t, url)
            if len(found) > shards.counts[t]:  # a stale index: read what it lists, as the torch reader does
                logger.warning("DALI loader: shard %s holds %d clips, more than the %d its index lists; the rest are "
                               "not read (rewrite the index with the shards)", url, len(found), shards.counts[t])
                found = found[: shards.counts[t]]
            missing = shards.counts[t] - len(found)
            if missing > 0:
                logger.warning("DALI loader: %s holds %d readable clips, its index lists %d; the missing ones are "
                               "counted as skipped", url, len(found), shards.counts[t])
            self.members.extend(found)
            for _ in range(max(missing, 0)):
                self.short[len(self.members)] = ("truncated-shard" if found else "unreadable-shard",
                                                 f"{url} (damaged: {len(found)} of {shards.counts[t]} clips)")
                self.members.append(_Member(key="?", tar=t))
        self._tmp = tempfile.TemporaryDirectory(prefix="asit-dali-index-", dir=index_dir)
        self._written: list[str] = []
        self._builds = 0
        self._indices: dict[int, int] = {}

    def _members(self, t: int, url: str) -> list[_Member]:
        """The clips of one tar: from the member-table cache when it was scanned before at this size,
        modification time and inode (reading the headers costs about 0.1 ms per clip from the page cache, minutes
        per process at AudioSet scale, far more from cold or network storage), else scanned and cached."""
        stat, where = os.stat(url), os.path.abspath(url)
        key = {"version": _MEMBER_CACHE_VERSION, "libsndfile": _libsndfile_version(), "path": where,
               "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
        path = os.path.join(_member_cache_dir(), hashlib.sha1(os.fsencode(where)).hexdigest() + ".json")
        try:
            # many small objects without cycles: paused, the collector would rescan the ones kept so far
            # again and again (9x slower over a few tars)
            with open(path, encoding="utf-8") as fh, _no_gc():
                cached = json.load(fh)
                if all(cached[k] == v for k, v in key.items()):
                    if cached["damage"]:
                        logger.warning("DALI loader: %s: cannot read past %d clips: %s", url,
                                       len(cached["members"]), cached["damage"])
                    return [_Member(key=k, audio=tuple(a) if a else None, json=tuple(j) if j else None, tar=t,
                                    sound=h if isinstance(h, str) else tuple(h))
                            for k, a, j, h in cached["members"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no cache, or one from another version of the file: scan it
        members, damage, lasting = self._scan(t, url)
        if not lasting:  # an I/O error may pass (storage, permissions): scan again next time
            return members
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_text(path, json.dumps({**key, "damage": damage,
                                                "members": [(m.key, m.audio, m.json, m.sound) for m in members]}))
        except OSError as exc:  # a read-only cache costs the scan next time, nothing else
            logger.debug("DALI loader: member table of %s not cached: %s", url, exc)
        return members

    def _scan(self, t: int, url: str) -> tuple[list[_Member], str | None, bool]:
        """The clips of one tar from its headers, what stopped the scan early (None if nothing: a damaged
        tar gives the clips before the damage), and whether that lasts as long as the file is unchanged
        (not after an I/O error)."""
        size = os.path.getsize(url)
        members: list[_Member] = []
        damage, lasting = None, True
        try:
            with tarfile.open(url) as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    folder, base = os.path.split(info.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)  # DALI's rule: the first dot of the file name
                    key = os.path.join(folder, stem)
                    if not members or members[-1].key != key:
                        members.append(_Member(key=key, tar=t))
                    if info.offset_data + info.size > size:
                        raise tarfile.TarError(f"member {info.name} cut short")
                    where = (info.offset_data, info.size, info.name)
                    if ext.lower() == "json":
                        members[-1].json = where
                    elif members[-1].audio is None:
                        members[-1].audio = where
                        members[-1].sound = _member_header(tar, info)
        except (OSError, tarfile.TarError) as exc:
            if members and (members[-1].audio is None or members[-1].json is None):
                members.pop()  # the clip the damage cut through (counted with the ones the index lists in vain)
            damage, lasting = str(exc), not isinstance(exc, OSError)
            logger.warning("DALI loader: %s: cannot read past %d clips: %s", url, len(members), exc)
        return members, damage, lasting

    def __len__(self) -> int:
        return len(self.members)

    def check(self, sample_rate: int, formats: bool = True) -> tuple[list[int], dict[int, str]]:
        """Clips with a ``json`` member and an audio member whose header passes the manifest check's rules
        (:func:`_header_reason`: readable, not empty, at most ``MAX_SECONDS``, a format DALI decodes);
        reasons for the others. ``formats=False`` skips the header rules (the members are checked whatever
        ``check_files`` says: a clip without them cannot enter a DALI index file)."""
        good, reasons = [], {}
        for i, m in enumerate(self.members):
            if i in self.short:
                reasons[i] = self.short[i][0]
            elif m.json is None:
                reasons[i] = "bad-metadata"
            elif m.audio is None:
                reasons[i] = "missing"
            elif m.audio[1] == 0:
                reasons[i] = "empty"  # what load_audio says of a 0-byte file
            elif formats and (why := _header_reason(m.sound)) is not None:
                reasons[i] = why
            else:
                good.append(i)
        return good, reasons

    def name(self, i: int) -> str:
        m = self.members[i]
        return self.short[i][1] if i in self.short else f"{self.shards.urls[m.tar]}:{m.key}"

    def source(self, i: int) -> str:
        m = self.members[i]
        return f"{self.shards.urls[m.tar]}:{m.audio[0]}:{_token(m.audio[2])}" if m.audio else self.name(i)

    def index(self, i: int) -> int:
        """The clip's manifest index, from its ``json`` member (-1 if it has none that says)."""
        if i not in self._indices:
            m = self.members[i]
            index = -1
            if m.json is not None:
                try:
                    with open(self.shards.urls[m.tar], "rb") as fh:
                        fh.seek(m.json[0])
                        index = int(json.loads(fh.read(m.json[1]))["index"])
                except (OSError, KeyError, TypeError, ValueError):
                    pass
            self._indices[i] = index
        return self._indices[i]

    def order(self, seed: int, epoch: int) -> list[int]:
        """The tars in a permuted order, each tar's clips permuted (all by ``(seed, epoch)``): DALI reads
        one tar's clips after the other."""
        by_tar: dict[int, list[int]] = {}
        for i, m in enumerate(self.members):
            by_tar.setdefault(m.tar, []).append(i)
        order = []
        for t in epoch_permutation(len(self.shards.urls), seed, epoch):
            clips = by_tar.get(t, [])
            order += [clips[k] for k in epoch_permutation(len(clips), seed, epoch, t, 2)]
        return order

    def build(self, clips: list[int], **args: Any):
        for path in self._written:  # the previous pipeline's index files (DALI read them when it was built)
            os.unlink(path)
        self._written, paths = [], []
        self._builds += 1
        run: list[int] = []
        for k, i in enumerate(clips):
            run.append(i)
            if k + 1 == len(clips) or self.members[clips[k + 1]].tar != self.members[i].tar:
                m = self.members[i]
                path = os.path.join(self._tmp.name, f"{self._builds}-{len(self._written)}.idx")
                write_dali_index(path, [(*self.members[c].audio, *self.members[c].json) for c in run])
                self._written.append(path)
                paths.append(self.shards.urls[m.tar])
                run = []
        return build_dali_webdataset_pipeline(paths, self._written, pad_last_batch=False, **args)

    def rows(self, first, clips: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict[int, tuple[str, str]]]:
        index = torch.full((len(clips),), -1, dtype=torch.int64)
        labels = torch.zeros(len(clips), len(self.label_vocab))
        bad = {}
        for row in range(len(clips)):
            try:
                meta = json.loads(np.array(first[row]).tobytes())
                index[row] = self._indices.setdefault(clips[row], int(meta["index"]))
                labels[row, [self._position[x] for x in meta.get("labels", []) if x in self._position]] = 1.0
            except (KeyError, TypeError, ValueError, UnicodeDecodeError):
                bad[row] = ("bad-metadata", "missing or malformed json")
        return index, labels, bad

    def close(self) -> None:
        self._tmp.cleanup()
