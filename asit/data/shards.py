"""Sharded datasets: a manifest packed into WebDataset tar shards, and the pretraining views read back.

Writing (:func:`write_shards`, ``scripts/make_shards.py``): each clip becomes one tar sample
``{__key__: "000000042", <ext>: the audio file's bytes as they are (flac, wav, ...),
json: {"index": 42, "labels": [...], "path": "/original/path.flac"}}``, written with
``webdataset.ShardWriter``; ``index.json`` next to the shards lists each shard with its number of
clips, the total and the label vocabulary.

Reading (:class:`ShardPretrainDataset`): a ``torch.utils.data.IterableDataset`` built on
``webdataset.WebDataset``. Each epoch the shard list is permuted with ``(seed, epoch)`` (the same
on every rank), split across ranks (``rank::world_size``) and then across DataLoader workers
(``webdataset.split_by_worker``; when a rank has fewer shards than workers, every worker reads
the rank's shards and keeps every ``num_workers``-th clip), and the clips of each worker pass
through a seeded shuffle buffer. Audio is decoded from memory with soundfile and turned into
views by :class:`~asit.data.dataset.ClipViews` with the clip's manifest index, so a clip gives
exactly the views :class:`~asit.data.dataset.PretrainDataset` gives for the same
``(seed, epoch, index)``; samples have the same dict layout, so
:func:`~asit.data.dataset.collate_pretrain` batches them and reports skipped clips.
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
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .audio import AudioDecodeError, decode_audio_bytes
from .dataset import ClipViews
from .manifest import AudioEntry, ManifestError, label_vocabulary

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
) -> Path:
    """Pack ``entries`` into WebDataset shards named by ``pattern`` (``dir/prefix-%06d.tar``).

    A new shard starts after ``max_count`` clips or once it holds ``max_bytes`` bytes (whichever
    comes first; ``None`` lifts a limit). The audio bytes are stored unchanged (no decoding, so an
    unreadable file is packed as it is and skipped at read time). Writes the index (default
    ``dir/index.json``) and returns its path. Keys are the clips' manifest indices.
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
    counts: dict[str, int] = {}
    with wds.ShardWriter(pattern, maxcount=max_count or 2**62, maxsize=max_bytes or float("inf"), verbose=0) as writer:
        for i, entry in enumerate(entries):
            with open(entry.path, "rb") as fh:
                audio = fh.read()
            meta = {"index": i, "labels": list(entry.labels), "path": entry.path}
            writer.write({"__key__": f"{i:09d}", _audio_extension(entry.path): audio, _META_EXT: meta})
            counts[writer.fname] = counts.get(writer.fname, 0) + 1
    shards = [{"path": os.path.relpath(name, index.parent), "count": n} for name, n in counts.items()]
    doc = {"format": INDEX_FORMAT, "total": len(entries), "labels": label_vocabulary(entries), "shards": shards}
    tmp = index.with_name(index.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    tmp.replace(index)
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


def _split_by_rank(src: Iterator[dict[str, Any]], rank: int, world_size: int) -> Iterator[dict[str, Any]]:
    """WebDataset node splitter with an explicit rank (no process group needed)."""
    yield from islice(src, rank, None, world_size)


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


class ShardPretrainDataset(ClipViews, IterableDataset):
    """Pretraining views read from WebDataset shards (see the module docstring).

    Args:
        shards: a :class:`ShardSet` (from :func:`open_shard_source`).
        rank, world_size: this process's share; ``None`` takes them from ``torch.distributed``
            when it is initialised (else 0 and 1).
        samples_per_rank: ``None``: one pass over this rank's shards per epoch (every clip once
            across ranks). A number: exactly that many samples per rank and epoch, cycling over the
            rank's shards when they hold fewer (reshuffled each cycle) and stopping early when they
            hold more — ranks then take the same number of steps, as DDP needs.
        batch_size: with ``samples_per_rank``, the workers' shares are whole batches, dealt out in
            the DataLoader's round-robin order, so each rank yields ``samples_per_rank //
            batch_size`` full batches and :meth:`set_skip` can skip whole batches.
        shuffle_buffer: clips in the per-worker shuffle buffer (1 disables it).
        **options: :class:`~asit.data.dataset.ClipViews` options (crop, views, fbank, seed, ...).

    Call :meth:`set_epoch` before each epoch (the shard permutation, the shuffle and the views
    depend on it). A member that cannot be decoded gives an ``ok=False`` placeholder with its
    reason, exactly like the map-style dataset; a sample without readable metadata has
    ``index = -1`` and reason ``"bad-metadata"``.
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
        options.setdefault("label_vocab", shards.label_vocab or None)
        super().__init__(**options)
        if rank is None or world_size is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if initialised else 0
            world_size = dist.get_world_size() if initialised else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if len(shards.urls) < world_size:
            raise ValueError(f"{len(shards.urls)} shards cannot be split across {world_size} ranks; "
                             "write smaller shards")
        if samples_per_rank is not None and samples_per_rank < batch_size:
            raise ValueError(f"samples_per_rank={samples_per_rank} is less than one batch of {batch_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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
        if samples % self.batch_size:
            raise ValueError(f"skip of {samples} samples is not a multiple of batch_size={self.batch_size}")
        self.skip = int(samples)

    def epoch_control(self) -> _EpochControl:
        """An object whose ``set_epoch(epoch, skip)`` sets the epoch and the skip (the engine's sampler slot)."""
        return _EpochControl(self)

    def _shard_order(self, cycle: int) -> list[str]:
        order = np.random.default_rng([self.seed, self.epoch, cycle]).permutation(len(self.shards.urls))
        return [self.shards.urls[i] for i in order]

    def _raw_samples(self, worker: int, workers: int, cycle: int) -> Iterator[dict[str, Any]]:
        """This rank's and worker's tar samples for one pass over the shards, shuffled."""
        import webdataset as wds

        per_rank = len(range(self.rank, len(self.shards.urls), self.world_size))
        by_shard = per_rank >= workers
        stream = wds.WebDataset(
            self._shard_order(cycle), shardshuffle=False, empty_check=False,
            nodesplitter=partial(_split_by_rank, rank=self.rank, world_size=self.world_size),
            workersplitter=wds.split_by_worker if by_shard else None,
            handler=wds.warn_and_continue,
        )
        items: Iterator[dict[str, Any]] = iter(stream)
        if not by_shard:  # too few shards for the workers: split the clips instead
            items = islice(items, worker, None, workers)
        rng = random.Random(_seed_int(self.seed, self.epoch, cycle, self.rank, worker))
        return _buffer_shuffle(items, self.shuffle_buffer, rng)

    def _worker_quota(self, worker: int, workers: int) -> tuple[int | None, int]:
        """(samples this worker yields, samples it skips first) for the epoch."""
        if self.samples_per_rank is None:
            return None, 0
        batches = self.samples_per_rank // self.batch_size
        skipped = self.skip // self.batch_size
        quota = len(range(worker, batches, workers)) * self.batch_size
        return quota, len(range(worker, skipped, workers)) * self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        quota, skip = self._worker_quota(worker, workers)
        emitted, cycle = 0, 0
        while quota is None or emitted < quota:
            produced = False
            for raw in self._raw_samples(worker, workers, cycle):
                produced = True
                if emitted >= skip:
                    yield self._decode(raw)
                emitted += 1
                if quota is not None and emitted >= quota:
                    return
            if quota is None:
                return
            if not produced:
                raise RuntimeError(f"rank {self.rank} worker {worker}: its shards hold no readable clips")
            cycle += 1

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
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
        try:
            wave: torch.Tensor | AudioDecodeError = decode_audio_bytes(raw[audio_keys[0]], self.sample_rate,
                                                                       name=name)
        except AudioDecodeError as err:
            wave = err
        return self.make_sample(wave, index, label, name)


class _EpochControl:
    """Fills the engine's sampler slot: ``set_epoch(epoch, skip)`` for a :class:`ShardPretrainDataset`."""

    def __init__(self, dataset: ShardPretrainDataset) -> None:
        self.dataset = dataset

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.dataset.set_epoch(epoch)
        self.dataset.set_skip(skip)
