"""The pretraining data: the loader that ``data.backend`` and the source name, built from the config.

:func:`build_pretrain_data` opens the source (a manifest, a folder of shards or the demo corpus), settles
where the fbank runs (``data.fbank_on``) and builds the loader with its per-epoch control (a sampler that
takes ``set_epoch(epoch, skip)``): a torch ``DataLoader`` over a manifest (optionally with a shared-memory
batch ring, :func:`make_batch_ring`), over shards, or NVIDIA DALI. :func:`batch_views` finishes a loader
batch on the device. This module reads the config's ``data``, ``train``, ``gmml`` and ``model`` sections;
the loaders it builds do not.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from asit.config import Config, DataConfig
from asit.data.fbank import fbank_views
from asit.data.ring import BatchRing, RingCollate, resolve_ring_refs, ring_bytes, shared_memory_free

from .distributed import DistInfo

__all__ = ["PretrainData", "batch_views", "build_pretrain_data", "make_batch_ring"]

log = logging.getLogger(__name__)

_PREFETCH = 4  # batches each loader worker prepares ahead


@dataclass
class PretrainData:
    """What the recipe iterates: ``loader`` (batches), ``sampler`` (its ``set_epoch(epoch, skip)``: the
    sampler, the shard dataset's epoch control or the DALI loader itself), ``dataset`` (None with DALI),
    ``ring`` (the batch ring to release at the end, or None), ``iters_per_epoch`` and ``fbank_on``
    (``"device"`` or ``"loader"``)."""

    loader: Any
    sampler: Any
    dataset: Any
    ring: BatchRing | None
    iters_per_epoch: int
    fbank_on: str


def demo_manifest(cfg: Config, *, make: bool = True) -> str:
    """The ``manifest.csv`` of the demo corpus that ``data.demo_*``, ``data.sample_rate``, ``data.cache_dir``
    and ``train.seed`` name, written first when ``make`` (:func:`asit.data.ensure_demo_dataset`)."""
    from asit.data.demo import demo_dataset_dir, ensure_demo_dataset

    d = cfg.data
    root = Path(d.cache_dir) / "demo" if d.cache_dir else None
    params = dict(num_clips=d.demo_clips, sample_rate=d.sample_rate, seconds=d.demo_seconds, seed=cfg.train.seed)
    if make:
        return str(ensure_demo_dataset(root, **params))
    return str(demo_dataset_dir(root, **params) / "manifest.csv")


def _demo_source(cfg: Config, dist_info: DistInfo) -> str:
    """The demo corpus's manifest, made by rank 0 and broadcast to the others."""
    source = cfg.data.train_manifest
    if dist_info.is_main:
        source = demo_manifest(cfg)
    if dist_info.distributed:
        holder = [source]
        dist.broadcast_object_list(holder, src=0)
        source = holder[0]
    return source


def build_pretrain_data(cfg: Config, dist_info: DistInfo, *, gather: Callable[..., list[Any]]) -> PretrainData:
    """The loader of ``cfg.data`` for this rank (``gather``: an all-gather of Python objects, used by DALI's
    header check so every rank agrees on the clips).

    Raises:
        ValueError: the batch of all processes is larger than the dataset, or DALI in authors mode.
    """
    from asit.data import PretrainDataset, collate_pretrain, load_manifest
    from asit.data.samplers import EpochSampler
    from asit.data.shards import ShardPretrainDataset, is_shard_source, open_shard_source

    d, t, device = cfg.data, cfg.train, dist_info.device
    source = _demo_source(cfg, dist_info) if d.train_manifest == "demo" else d.train_manifest
    shards = open_shard_source(source) if is_shard_source(source) else None
    entries = load_manifest(source) if shards is None else []
    total = shards.total if shards is not None else len(entries)
    views = dict(sample_rate=d.sample_rate, crop_seconds=d.crop_seconds, num_views=d.num_views,
                 local_views=d.local_views, local_crop_seconds=d.local_crop_seconds, num_mel_bins=d.num_mel_bins,
                 target_frames=d.target_frames, local_target_frames=d.local_target_frames, mean=d.mean,
                 std=d.std, roll_prob=d.roll_prob, roll_mode=d.roll_mode, local_crop_from=d.local_crop_from,
                 seed=t.seed)
    fbank_on = d.fbank_on
    if fbank_on == "auto":
        fast_cuda = device.type == "cuda" and t.mode == "fast"
        fbank_on = "device" if fast_cuda and d.backend == "torch" else "loader"
    per_rank = total // dist_info.world_size
    iters = per_rank // t.batch_size
    if iters == 0:
        raise ValueError(f"train.batch_size={t.batch_size} × {dist_info.world_size} "
                         "process(es) "
                         f"is larger than the dataset ({total} clips in {source})")
    if t.max_steps_per_epoch:
        iters = min(iters, t.max_steps_per_epoch)
    if d.backend == "dali":
        if t.mode == "authors":
            raise ValueError("data.backend=dali runs in train.mode=fast")
        from asit.data.dali import DaliPretrainLoader

        # the loader counts its steps from the clips that pass its header check (every rank the same)
        loader = DaliPretrainLoader(
            shards if shards is not None else entries, batch_size=t.batch_size,
            shard_id=dist_info.rank, num_shards=dist_info.world_size,
            max_steps_per_epoch=t.max_steps_per_epoch or None,
            fbank=d.dali_fbank, device_id=(device.index or 0) if device.type == "cuda" else None,
            num_threads=max(1, d.num_workers), all_gather=gather,
            **views)
        if dist_info.is_main:
            log.info("data: DALI, %d clips from %s (%d left out before training; %d file headers read by this "
                     "process), %d steps/epoch of %d per process", total, source,
                     sum(loader.excluded.values()), loader.headers_checked, loader.steps_per_epoch, t.batch_size)
        # the loader takes set_epoch(epoch, skip)
        return PretrainData(loader, loader, None, None, loader.steps_per_epoch, fbank_on)
    views["fbank_on"] = fbank_on
    if shards is not None:
        dataset = ShardPretrainDataset(
            shards, rank=dist_info.rank, world_size=dist_info.world_size, batch_size=t.batch_size,
            samples_per_rank=iters * t.batch_size, shuffle_buffer=d.shuffle_buffer, **views)
        sampler = dataset.epoch_control()
    else:
        dataset = PretrainDataset(entries, **views)
        sampler = EpochSampler(len(entries), rank=dist_info.rank, world_size=dist_info.world_size,
                               seed=t.seed, num_samples=iters * t.batch_size)
    workers = d.num_workers
    collate = collate_pretrain
    if t.mode == "authors":  # GMML on the CPU in the loader, like the authors' code
        from asit.data.gmml_cpu import ReferenceGMMLCollate

        g = cfg.gmml
        collate = ReferenceGMMLCollate(
            collate_pretrain, seed=t.seed, patch_size=cfg.model.patch_size,
            zero_ratio=g.zero_ratio, alien_ratio=g.alien_ratio, alien_prob=g.alien_prob,
            max_block_frac=g.max_block_frac, allow_self_alien=g.allow_self_alien)
    ring = make_batch_ring(cfg, dataset, device, workers, _PREFETCH, from_manifest=shards is None,
                           is_main=dist_info.is_main)
    if ring is not None:
        collate = RingCollate(collate_pretrain, ring)
    loader = DataLoader(
        dataset, batch_size=t.batch_size, num_workers=workers,
        sampler=sampler if shards is None else None,
        collate_fn=collate, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=False, prefetch_factor=_PREFETCH if workers > 0 else None,
        # own generator: creating a loader iterator must not consume the global RNG (exact resume)
        generator=torch.Generator().manual_seed(t.seed))
    if dist_info.is_main:
        log.info("data: %d clips from %s, %d steps/epoch of %d per process, fbank on the %s", total, source,
                 iters, t.batch_size,
                 "device" if fbank_on == "device" else ("loader workers" if d.num_workers > 0 else "training process"))
    return PretrainData(loader, sampler, dataset, ring, iters, fbank_on)


def make_batch_ring(cfg: Config, dataset: Any, device: torch.device, workers: int, prefetch: int, *,
                    from_manifest: bool, is_main: bool = True) -> BatchRing | None:
    """The loader's :class:`~asit.data.ring.BatchRing` (``data.batch_ring``) for ``dataset``'s samples, or
    None: only in fast mode with loader workers over a manifest; ``auto`` only on CUDA and when the node's
    /dev/shm holds a ring per process (``LOCAL_WORLD_SIZE``).

    Raises:
        MemoryError: ``data.batch_ring=enabled`` and the ring does not fit.
    """
    d = cfg.data
    wanted = d.batch_ring == "enabled" or (d.batch_ring == "auto" and device.type == "cuda")
    # not with shards: an exhausted shard worker lets the others run more than prefetch batches ahead
    if not (wanted and workers > 0 and from_manifest and cfg.train.mode == "fast"):
        return None
    shapes = {k: (cfg.train.batch_size, *shape) for k, shape in dataset.sample_shapes().items()}
    if d.batch_ring == "enabled":
        return _log_ring(BatchRing(shapes, workers, prefetch), is_main)  # a clear error if it cannot fit
    # every process on this node allocates its own ring at about the same time: budget for all of them
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need, free = ring_bytes(shapes, workers, prefetch), shared_memory_free()
    if free is not None and need * local > 0.8 * free:
        log.warning("data: the batch rings would need %.2f GB of /dev/shm (%d process(es) on this node) and "
                    "%.2f GB are free; batches take the DataLoader's own, slower, transport instead "
                    "(data.batch_ring)", need * local / 2**30, local, free / 2**30)
        return None
    try:
        return _log_ring(BatchRing(shapes, workers, prefetch), is_main)
    except (MemoryError, RuntimeError) as err:  # e.g. another job filled /dev/shm meanwhile
        log.warning("data: no batch ring (%s); batches take the DataLoader's own transport", err)
        return None


def _log_ring(ring: BatchRing, is_main: bool) -> BatchRing:
    if is_main:
        log.info("data: batches through %.2f GB of shared memory (%d slots per worker)", ring.nbytes / 2**30,
                 ring.slots_per_worker)
    return ring


def batch_views(batch: dict[str, Any], d: DataConfig, device: torch.device) -> dict[str, Any]:
    """A loader batch with its fbank views: with ``data.fbank_on=device`` the loader sends waveform
    crops (``"waves"``, ``"local_waves"``), which are moved to ``device`` and turned into normalised
    views there, all clips in one call (:func:`~asit.data.fbank.fbank_views`, with ``d``'s settings).
    Batch-ring references (``data.batch_ring`` without pinning, i.e. on the CPU) are copied out first;
    other batches pass as they are."""
    batch = resolve_ring_refs(batch)
    if "waves" not in batch:
        return batch
    batch = dict(batch)
    for key, out, frames in (("waves", "views", d.target_frames),
                             ("local_waves", "local_views", d.local_target_frames)):
        if key in batch:
            waves = batch.pop(key).to(device, non_blocking=True)
            batch[out] = fbank_views(waves, d.sample_rate, d.num_mel_bins, frames, d.mean, d.std)
    return batch
