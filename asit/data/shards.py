"""Sharded datasets: a manifest packed into WebDataset tar shards, and the pretraining views read back.

Writing (:func:`write_shards`, ``scripts/make_shards.py``): each clip becomes one tar sample
``{__key__: "000000042", <ext>: the audio file's bytes as they are (flac, wav, ...),
json: {"index": 42, "labels": [...], "path": "/original/path.flac"}}``, written with
``webdataset.ShardWriter``; ``index.json`` next to the shards lists each shard with its number of
clips, the total and the label vocabulary.

Reading (:class:`ShardPretrainDataset`): a ``torch.utils.data.IterableDataset`` that reads each
shard with webdataset's tar reader. Each epoch the shard list is permuted with ``(seed, epoch)`` (the
same on every rank); with the index's clip counts this orders the epoch's clips into one stream, of
which each rank takes a contiguous span and each DataLoader worker a contiguous run of whole batches
of its rank's span. The split is by clips, not by whole shards, so ranks and workers get exactly their
share whatever the shard sizes (a shard at a boundary is read by both sides, each keeping its own
clips), and every clip is used at most once per epoch while the ranks need no more clips than there
are. The clips of each worker pass through a seeded shuffle buffer. Audio is decoded from memory with
soundfile and turned into views by :class:`~asit.data.dataset.ClipViews` with the clip's manifest
index, so a clip gives exactly the views :class:`~asit.data.dataset.PretrainDataset` gives for the
same ``(seed, epoch, index)``; samples have the same dict layout, so
:func:`~asit.data.dataset.collate_pretrain` batches them and reports skipped clips. A shard that
delivers fewer clips than its index lists (cut short, unreadable) is named in a warning and each
missing clip is reported as a skipped sample (``truncated-shard`` / ``unreadable-shard``), so the
engine's per-epoch summary and ``data.max_bad_fraction`` count them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from tqdm.auto import tqdm

from asit.atomic_io import atomic_write_text

from .audio import AudioDecodeError, decode_audio_bytes
from .dataset import ClipViews
from .manifest import AudioEntry, ManifestError, label_vocabulary
from .samplers import check_skip, contiguous_share, epoch_permutation

__all__ = [
    "INDEX_NAME",
    "SHARD_PREFIX",
    "ShardPretrainDataset",
    "ShardSet",
    "is_shard_source",
    "open_shard_source",
    "parse_shard_size",
    "write_shards",
]

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"  # written next to the shards
INDEX_FORMAT = "asit-webdataset-shards/1"
SHARD_PREFIX = "shards:"  # manifest source prefix: shards:/dir/prefix-{000000..000009}.tar or shards:/dir
_META_EXT = "json"


@dataclass(frozen=True)
class ShardSet:
    """Shard files (paths or URLs), the number of clips in each, and the label vocabulary."""

    urls: list[str]
    counts: list[int]
    label_vocab: list[str]

    @property
    def total(self) -> int:
        return sum(self.counts)


# ---------------------------------------------------------------------------------------- writing


def parse_shard_size(text: str) -> tuple[int | None, int | None]:
    """``"1000"`` → at most 1000 clips per shard; ``"256MB"`` / ``"2GB"`` → at most that many bytes.

    Returns ``(max_count, max_bytes)``, one of them ``None``.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(mb|gb|MB|GB|[mMgG])?\s*", text)
    if not match:
        raise ValueError(f"shard size {text!r}: expected a clip count (1000) or a size (256MB, 2GB)")
    value, unit = float(match.group(1)), (match.group(2) or "").lower()
    if value <= 0:
        raise ValueError(f"shard size must be positive, got {text!r}")
    if not unit:
        if not value.is_integer():
            raise ValueError(f"shard size {text!r}: a clip count must be an integer")
        return int(value), None
    return None, int(value * (1e9 if unit.startswith("g") else 1e6))


def _audio_extension(path: str) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    if not ext or ext == _META_EXT or not ext.isalnum():
        return "audio"  # soundfile sniffs the format from the bytes anyway
    return ext


def write_shards(
    entries: list[AudioEntry],
    pattern: str | os.PathLike,
    *,
    max_count: int | None = 1000,
    max_bytes: int | None = None,
    index_path: str | os.PathLike | None = None,
    shuffle_seed: int | None = 0,
    progress: bool = False,
) -> Path:
    """Pack ``entries`` into WebDataset shards named by ``pattern`` (``dir/prefix-%06d.tar``).

    A new shard starts after ``max_count`` clips or once it holds ``max_bytes`` bytes (whichever
    comes first; ``None`` lifts a limit). The audio bytes are stored unchanged (no decoding, so an
    unreadable file is packed as it is and skipped at read time). Writes the index (default
    ``dir/index.json``, atomically) and returns its path. Keys are the clips' manifest indices.

    The clips are packed in an order shuffled by ``shuffle_seed`` (``None`` keeps the manifest's
    order): the reader shuffles shards and clips within a bounded buffer, so a manifest sorted by
    class (a scanned folder of class folders) would otherwise give batches of one class.
    ``progress`` shows a tqdm bar.
    """
    if not entries:
        raise ValueError("entries is empty: nothing to pack")
    pattern = os.fspath(pattern)
    try:
        pattern % 0
    except TypeError as exc:
        raise ValueError(f"pattern {pattern!r} needs one integer placeholder such as %06d") from exc
    if max_count is not None and max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    import webdataset as wds

    out_dir = Path(pattern).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    index = Path(index_path) if index_path is not None else out_dir / INDEX_NAME
    order = list(range(len(entries)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    counts: dict[str, int] = {}
    bar = tqdm(total=len(entries), unit="clip", desc="packing", disable=not progress)
    with wds.ShardWriter(pattern, maxcount=max_count or 2**62, maxsize=max_bytes or float("inf"), verbose=0) as writer:
        for i in order:
            entry = entries[i]
            bar.update()
            with open(entry.path, "rb") as fh:
                audio = fh.read()
            meta = {"index": i, "labels": list(entry.labels), "path": entry.path}
            writer.write({"__key__": f"{i:09d}", _audio_extension(entry.path): audio, _META_EXT: meta})
            counts[writer.fname] = counts.get(writer.fname, 0) + 1
    shards = [{"path": os.path.relpath(name, index.parent), "count": n} for name, n in counts.items()]
    doc = {"format": INDEX_FORMAT, "total": len(entries), "labels": label_vocabulary(entries), "shards": shards}
    bar.close()
    atomic_write_text(index, json.dumps(doc, indent=1))
    logger.info("packed %d clips into %d shards; index %s", len(entries), len(shards), index)
    return index


# ---------------------------------------------------------------------------------------- sources


def _read_index(index: Path) -> dict[str, Any] | None:
    """The index document, or ``None`` if ``index`` is not a shard index."""
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == INDEX_FORMAT else None


def is_shard_source(source: str | os.PathLike) -> bool:
    """Whether ``source`` names shards: ``shards:...`` or a folder holding a shard ``index.json``."""
    text = os.fspath(source)
    if text.startswith(SHARD_PREFIX):
        return True
    folder = Path(text).expanduser()
    return folder.is_dir() and _read_index(folder / INDEX_NAME) is not None


def _count_tar(url: str) -> int:
    """Clips in one shard without an index: distinct keys among its members."""
    keys = set()
    try:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.isfile():
                    base = os.path.basename(member.name)
                    keys.add((os.path.dirname(member.name), base.split(".", 1)[0]))
    except (OSError, tarfile.TarError) as exc:
        raise ManifestError(f"{url}: cannot read shard: {exc}") from exc
    return len(keys)


def open_shard_source(source: str | os.PathLike) -> ShardSet:
    """Resolve a shard source into a :class:`ShardSet`.

    ``source`` is ``shards:/dir/prefix-{000000..000009}.tar`` (brace expansion; counts from
    ``dir/index.json`` when it lists the shard, else by reading the tar headers),
    ``shards:/dir`` or a folder that holds the index.

    Raises:
        ManifestError: no index where one is needed, missing shard files, no shards.
    """
    import braceexpand

    text = os.fspath(source)
    body = text[len(SHARD_PREFIX):] if text.startswith(SHARD_PREFIX) else text
    path = Path(body).expanduser()
    if path.is_dir():
        index = path / INDEX_NAME
        doc = _read_index(index)
        if doc is None:
            raise ManifestError(f"{text}: no shard index {INDEX_NAME} in {path}")
        urls = [os.path.normpath(path / s["path"]) for s in doc["shards"]]
        counts = [int(s["count"]) for s in doc["shards"]]
        labels = list(doc.get("labels", []))
    else:
        urls = [os.path.normpath(Path(u).expanduser()) for u in braceexpand.braceexpand(body)]
        doc = _read_index(path.parent / INDEX_NAME) or {"shards": [], "labels": []}
        known = {os.path.normpath(path.parent / s["path"]): int(s["count"]) for s in doc["shards"]}
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise ManifestError(f"{text}: {len(missing)} of {len(urls)} shards do not exist: {missing[:5]}")
        counts = [known[u] if u in known else _count_tar(u) for u in urls]
        labels = list(doc.get("labels", []))
    if not urls:
        raise ManifestError(f"{text}: no shards")
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise ManifestError(f"{text}: {len(missing)} of {len(urls)} shards do not exist: {missing[:5]}")
    return ShardSet(urls, counts, labels)


# ---------------------------------------------------------------------------------------- reading


def _seed_int(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0])


def _buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A bounded shuffle: keep ``size`` items, emit a random one as each new item arrives."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def _split_batches(length: int, batch_size: int, workers: int, *, keep_rest: bool) -> list[int]:
    """Sizes of ``workers`` consecutive parts of ``length`` clips: whole batches dealt out round-robin
    (the DataLoader's order), the rest (``length % batch_size`` clips, if ``keep_rest``) to the worker
    whose turn comes next."""
    batches = length // batch_size
    sizes = [len(range(w, batches, workers)) * batch_size for w in range(workers)]
    if keep_rest:
        sizes[batches % workers] += length - batches * batch_size
    return sizes


def _is_complete(sample: dict[str, Any]) -> bool:
    return _META_EXT in sample and any(not k.startswith("__") and k != _META_EXT for k in sample)


def _tar_samples(url: str, count: int, errors: list[Exception]) -> Iterator[dict[str, Any]]:
    """The samples of one shard, read with webdataset's tar reader; read errors are appended to
    ``errors`` instead of raised. When the shard breaks off (an error, or fewer than the ``count``
    samples its index lists), a last sample missing its metadata or audio is the one cut short: it is
    left out (and counted with the shard's missing clips)."""
    import webdataset as wds

    def record(exn: Exception) -> bool:
        errors.append(exn)
        return True  # one shard per stream: after a broken tar the stream simply ends

    held, n = None, 0
    for sample in wds.tariterators.tarfile_samples([{"url": url}], handler=record):
        if held is not None:
            yield held
        held, n = sample, n + 1
    if held is not None and (_is_complete(held) or not (errors or n < count)):
        yield held


def _probe_shard(url: str) -> bool:
    """Whether the shard's first tar member can be read."""
    try:
        with tarfile.open(url, mode="r|*") as tar:
            return tar.next() is not None
    except (OSError, tarfile.TarError, EOFError):
        return False


def _brief(exn: Exception) -> str:
    text = str(exn.args[0]).split(" @ <", 1)[0] if exn.args else repr(exn)  # webdataset appends the stream
    return f"{type(exn).__name__}: {text[:200]}"


_STREAM_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _name_member(err: AudioDecodeError, member: str) -> AudioDecodeError:
    """``err`` naming the tar member: in place of a decoder's ``<_io.BytesIO object at 0x…>``, or in front."""
    detail = _STREAM_REPR.sub(f"member {member}", err.detail)
    if detail == err.detail:
        detail = f"member {member}: {err.detail}"
    return AudioDecodeError(err.path, err.reason, detail)


class ShardPretrainDataset(ClipViews, IterableDataset):
    """Pretraining views read from WebDataset shards (see the module docstring).

    Args:
        shards: a :class:`ShardSet` (from :func:`open_shard_source`).
        rank, world_size: this process's share; ``None`` takes them from ``torch.distributed``
            when it is initialised (else 0 and 1).
        samples_per_rank: ``None``: one pass over the shards per epoch, split across ranks (every
            clip once across ranks; ranks may differ by one clip). A number: exactly that many samples
            per rank and epoch (rounded down to whole batches), continuing into a reshuffled next pass
            when the ranks together need more clips than the shards hold — ranks then take the same
            number of steps, as DDP needs. With ``samples_per_rank * world_size`` at most the total,
            each clip appears at most once per epoch across all ranks and workers.
        batch_size: the workers' shares are whole batches, dealt out in the DataLoader's round-robin
            order, so each rank yields ``samples_per_rank // batch_size`` full batches and
            :meth:`set_skip` can skip whole batches.
        shuffle_buffer: clips in the per-worker shuffle buffer (1 disables it).
        **options: :class:`~asit.data.dataset.ClipViews` options (crop, views, fbank, seed, ...).

    Call :meth:`set_epoch` before each epoch (the shard permutation, the shuffle and the views
    depend on it). A member that cannot be decoded gives an ``ok=False`` placeholder with its
    reason, exactly like the map-style dataset; a sample without readable metadata has
    ``index = -1`` and reason ``"bad-metadata"``. Clips that the index lists but the shard does not
    deliver (a truncated or unreadable tar) give one ``ok=False`` placeholder each, ``index = -1`` and
    reason ``"truncated-shard"`` (some clips read) or ``"unreadable-shard"`` (none), with a warning
    naming the shard, so they are counted with the epoch's skipped clips instead of lost silently.
    Only when none of the rank's shards can be read does iterating raise (naming them).
    """

    def __init__(
        self,
        shards: ShardSet,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        samples_per_rank: int | None = None,
        batch_size: int = 1,
        shuffle_buffer: int = 256,
        **options: Any,
    ) -> None:
        if not shards.urls:
            raise ValueError("shards lists no shard files")
        if len(shards.counts) != len(shards.urls) or any(c < 0 for c in shards.counts):
            raise ValueError("shards.counts must give a non-negative clip count for each shard")
        if shards.total == 0:
            raise ValueError(f"the {len(shards.urls)} shards hold no clips")
        options.setdefault("label_vocab", shards.label_vocab or None)
        super().__init__(**options)
        if rank is None or world_size is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if initialised else 0
            world_size = dist.get_world_size() if initialised else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if samples_per_rank is not None and samples_per_rank < batch_size:
            raise ValueError(f"samples_per_rank={samples_per_rank} is less than one batch of {batch_size}")
        self.shards = shards
        self.rank, self.world_size = rank, world_size
        self.samples_per_rank = samples_per_rank
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.skip = 0

    def set_skip(self, samples: int) -> None:
        """Leave out this rank's first ``samples`` samples of the epoch (a multiple of the batch size;
        resuming mid-epoch). Needs ``samples_per_rank``."""
        if samples and self.samples_per_rank is None:
            raise ValueError("set_skip needs samples_per_rank (a fixed epoch length)")
        self.skip = check_skip(samples, self.batch_size)

    def epoch_control(self) -> _EpochControl:
        """An object whose ``set_epoch(epoch, skip)`` sets the epoch and the skip (the engine's sampler slot)."""
        return _EpochControl(self)

    # The epoch's stream: the shards in the order of pass 0's permutation, then of pass 1's, ... (the
    # same on every rank), with positions counted from the index's clip counts. Each rank takes one
    # contiguous span of it and each worker one contiguous part of its rank's span, so the split is by
    # clips, not by shards: a shard at a boundary is read by both sides, each keeping its own clips.

    def _shard_order(self, cycle: int) -> list[int]:
        return epoch_permutation(len(self.shards.urls), self.seed, self.epoch, cycle)

    def _rank_span(self) -> tuple[int, int]:
        """[start, stop) of this rank's positions in the epoch's stream."""
        if self.samples_per_rank is None:
            return contiguous_share(self.shards.total, self.rank, self.world_size)
        length = self.samples_per_rank // self.batch_size * self.batch_size
        return self.rank * length, (self.rank + 1) * length

    def _worker_span(self, worker: int, workers: int) -> tuple[int, int]:
        """[start, stop) of this worker's positions: its whole batches, consecutive in the rank's span."""
        start, stop = self._rank_span()
        sizes = _split_batches(stop - start, self.batch_size, workers, keep_rest=self.samples_per_rank is None)
        first = start + sum(sizes[:worker])
        return first, first + sizes[worker]

    def _worker_skip(self, worker: int, workers: int) -> int:
        """Samples of this worker's share that the rank's skip covers (the DataLoader's round-robin order)."""
        return len(range(worker, self.skip // self.batch_size, workers)) * self.batch_size

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """``(shard, lo, hi)``: the clips ``lo..hi-1`` of a shard cover positions [start, stop), in order."""
        total = self.shards.total
        cycle = start // total
        while cycle * total < stop:
            base = cycle * total
            for shard in self._shard_order(cycle):
                count = self.shards.counts[shard]
                lo, hi = max(start - base, 0), min(stop - base, count)
                if lo < hi:
                    yield shard, lo, hi
                base += count
            cycle += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # After a skip of s batches the DataLoader still asks worker 0 first, but the next batch in the
        # uninterrupted order is batch s, which worker s % workers held: each worker takes the role (its
        # share, skip and shuffle seed) of the worker whose batch the DataLoader now expects from it.
        role = (worker + self.skip // self.batch_size) % workers
        yield from self._iter_worker(role, workers)

    def _iter_worker(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        """The samples of worker role ``worker`` of ``workers`` (one per position of its span)."""
        start, stop = self._worker_span(worker, workers)
        skip = self._worker_skip(worker, workers)
        rng = random.Random(_seed_int(self.seed, self.epoch, self.rank, worker))
        state = {"read": 0, "probed": False}
        raw = (item for shard, lo, hi in self._pieces(start, stop) for item in self._read(shard, lo, hi, state))
        for n, item in enumerate(_buffer_shuffle(raw, self.shuffle_buffer, rng)):
            if n >= skip:
                yield self._decode(item)

    def _read(self, shard: int, lo: int, hi: int, state: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Clips ``lo..hi-1`` of one shard (raw tar samples); each clip the shard fails to deliver becomes
        a ``__lost__`` marker that :meth:`_decode` turns into a counted placeholder."""
        url, count = self.shards.urls[shard], self.shards.counts[shard]
        errors: list[Exception] = []
        read = 0
        for sample in _tar_samples(url, count, errors):
            if read == count:
                self._warn_once(url, "shard %s holds more clips than the %d its index lists; the rest are not "
                                "used (rebuild the index with scripts/make_shards.py)", url, count)
                break
            if read >= lo:
                yield sample
            read += 1
            if read == hi and hi < count:
                break
        state["read"] += max(min(read, hi) - lo, 0)
        lost = hi - max(read, lo)
        if lost <= 0:
            return
        reason = "truncated-shard" if read else "unreadable-shard"
        why = _brief(errors[0]) if errors else "the tar ends early"
        if not state["read"] and not state["probed"]:
            state["probed"] = True
            self._check_rank_readable(why)
        self._warn_once(url, "shard %s: read %d of the %d clips its index lists (%s); %d clip(s) counted as "
                        "skipped (%s)", url, min(read, count), count, why, lost, reason)
        marker = {"__lost__": reason, "__url__": url, "__detail__": why}
        for _ in range(lost):
            yield dict(marker)

    def _check_rank_readable(self, why: str) -> None:
        """Raise if none of the shards in this rank's span can be read (its epoch would be all placeholders)."""
        start, stop = self._rank_span()
        urls = list(dict.fromkeys(self.shards.urls[shard] for shard, _, _ in self._pieces(start, stop)))
        if urls and not any(_probe_shard(u) for u in urls):
            shown = ", ".join(urls[:5]) + (f", ... ({len(urls)} in all)" if len(urls) > 5 else "")
            raise RuntimeError(f"rank {self.rank}: none of its shards can be read ({why}): {shown}")

    def _warn_once(self, url: str, message: str, *args: Any) -> None:
        if url not in self._warned:
            self._warned.add(url)
            logger.warning(message, *args)

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
        if "__lost__" in raw:  # a clip the shard's index lists but the shard did not deliver (see _read)
            err = AudioDecodeError(url, raw["__lost__"], raw["__detail__"])
            return self.make_sample(err, -1, self.label_vector([]), url)
        name = f"{url}:{key}"
        try:
            meta = json.loads(raw[_META_EXT])
            index, labels = int(meta["index"]), list(meta.get("labels", []))
            name = f"{name} ({meta.get('path', '?')})"
        except (KeyError, TypeError, ValueError, UnicodeDecodeError):
            label = self.label_vector([])
            return self.make_sample(AudioDecodeError(name, "bad-metadata", "missing or malformed json"), -1,
                                    label, name)
        label = self.label_vector([self._label_position[x] for x in labels if x in self._label_position])
        audio_keys = [k for k in raw if not k.startswith("__") and k != _META_EXT]
        if not audio_keys:
            return self.make_sample(AudioDecodeError(name, "missing", "no audio member"), index, label, name)
        member, data = f"{key}.{audio_keys[0]}", raw[audio_keys[0]]
        if not data:
            return self.make_sample(AudioDecodeError(name, "empty", f"0-byte member {member}"), index, label, name)
        try:
            wave: torch.Tensor | AudioDecodeError = decode_audio_bytes(data, self.sample_rate, name=name)
        except AudioDecodeError as err:
            wave = _name_member(err, member)
        return self.make_sample(wave, index, label, name)


class _EpochControl:
    """The :class:`~asit.data.samplers.EpochControl` of a :class:`ShardPretrainDataset` (the engine's sampler
    slot): ``set_epoch(epoch, skip)`` sets the dataset's epoch and its skip."""

    def __init__(self, dataset: ShardPretrainDataset) -> None:
        self.dataset = dataset

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.dataset.set_epoch(epoch)
        self.dataset.set_skip(skip)
