"""Loader batches through pre-allocated shared memory (``data.batch_ring``).

By default a ``DataLoader`` worker stacks each batch into freshly allocated memory and moves it
to a new shared-memory segment to send it. The main process then maps that segment and copies it
into pinned memory. For a batch of 64 clips that is 94 MiB of waveform crops
(``data.fbank_on=device``) or 37 MiB of fbank views, written into untouched pages twice in the
worker and read from untouched pages in the main process. Page faults dominate that traffic. On
the 2-core development machine (``python bench/loader_transport.py``), two workers moved 13–14 such
batches of 64 per second (858–903 clips/s), and 71–99 per second (4,527–6,349 clips/s) through this
ring.

:class:`BatchRing` allocates, in the main process before the workers start, ``slots_per_worker``
slots per worker for each large batch entry, in shared memory that is touched once. A worker
stacks its batch straight into its next slot (:class:`RingCollate`) and sends a small
:class:`RingRef` in place of the tensor. The main process copies the slot out: into pinned memory
in the loader's pin-memory thread (``RingRef.pin_memory``, used on CUDA), or with
:func:`resolve_ring_refs` otherwise.

Why a slot is never overwritten while it is read: a ``DataLoader`` keeps at most
``prefetch_factor`` batches outstanding per worker. It hands worker ``w`` its ``j + k``-th batch
only after the main process has received that worker's ``j + k - prefetch_factor``-th batch. With
``k = prefetch_factor + 1`` slots, that is batch ``j + 1`` or later, and batch ``j`` was copied
out before it (by the pin thread, or by the consumer before it asks for the next batch). Batches
come back in order. Copy a batch out before you ask for the next one.

That argument assumes what :class:`~asit.train.Pretrainer` does: a map-style dataset (an
:class:`~torch.utils.data.IterableDataset` worker that runs dry lets the others run further ahead,
so :class:`RingCollate` refuses one), one live iterator per loader, and with
``persistent_workers=True`` epochs that are read to the end. As a safety net each slot carries a
generation token in shared memory. A worker marks the slot as being written, writes it, then
stamps a token unique to that write, which its :class:`RingRef` carries. The copy-out checks the
token before and after copying and raises if the slot was reused, so a violation fails loudly
instead of training on another batch's data.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

__all__ = ["BatchRing", "RingCollate", "RingRef", "resolve_ring_refs", "ring_bytes", "shared_memory_free"]

_RINGS: dict[int, BatchRing] = {}  # the rings of this process, by id (RingRef carries the id)
_IDS = itertools.count()


def ring_bytes(shapes: dict[str, tuple[int, ...]], num_workers: int, prefetch_factor: int) -> int:
    """Bytes of shared memory a :class:`BatchRing` with these settings allocates (float32)."""
    per_slot = sum(4 * int(torch.Size(shape).numel()) for shape in shapes.values())
    return per_slot * num_workers * (prefetch_factor + 1)


def shared_memory_free(path: str = "/dev/shm") -> int | None:
    """Free bytes of the shared-memory file system, or None where there is none to ask (not Linux)."""
    if not os.path.isdir(path):
        return None
    return shutil.disk_usage(path).free


class BatchRing:
    """Shared-memory slots for the large entries of loader batches.

    Args:
        shapes: per batch key, the shape of one batch ``(batch_size, ...)`` (float32).
        num_workers: the loader's workers.
        prefetch_factor: the loader's ``prefetch_factor``; each worker gets one slot more.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], num_workers: int, prefetch_factor: int) -> None:
        if num_workers < 1 or prefetch_factor < 1:
            raise ValueError(f"a batch ring needs num_workers >= 1 and prefetch_factor >= 1, got "
                             f"{num_workers}, {prefetch_factor}")
        need, free = ring_bytes(shapes, num_workers, prefetch_factor), shared_memory_free()
        if free is not None and need > free:
            raise MemoryError(f"a batch ring needs {need / 2**30:.2f} GB of shared memory but /dev/shm has "
                              f"{free / 2**30:.2f} GB free (fewer loader workers or a smaller batch, a larger "
                              "/dev/shm, e.g. docker --shm-size, or data.batch_ring=disabled)")
        self.slots_per_worker = prefetch_factor + 1
        self.num_workers = num_workers
        slots = num_workers * self.slots_per_worker
        # zeros moved to shared memory: every page is touched here, before the workers start
        self.buffers = {key: torch.zeros((slots, *shape), dtype=torch.float32).share_memory_()
                        for key, shape in shapes.items()}
        self.tokens = torch.zeros(slots, dtype=torch.int64).share_memory_()  # per slot: the write it holds
        self.id = next(_IDS)
        _RINGS[self.id] = self

    @property
    def nbytes(self) -> int:
        """Shared memory held by the ring."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def release(self) -> None:
        """Forget the ring in this process (its memory goes when the last reference does)."""
        _RINGS.pop(self.id, None)


@dataclass(frozen=True)
class RingRef:
    """Rows ``[:rows]`` of slot ``slot`` of ring ``ring_id``'s entry ``key``, as written by the write
    ``token``: what a worker sends."""

    ring_id: int
    key: str
    slot: int
    rows: int
    token: int

    def _ring(self) -> BatchRing:
        ring = _RINGS.get(self.ring_id)
        if ring is None:
            raise RuntimeError(f"batch ring {self.ring_id} is not known in this process: a RingRef must be "
                               "read in the process that created the ring")
        return ring

    def source(self) -> torch.Tensor:
        """The rows in the ring, in place (valid until the slot is reused: copy them)."""
        return self._ring().buffers[self.key][self.slot, : self.rows]

    def _copy(self, pin: bool) -> torch.Tensor:
        ring = self._ring()
        self._check(ring)
        src = ring.buffers[self.key][self.slot, : self.rows]
        out = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin).copy_(src)
        self._check(ring)  # a writer that started during the copy changed the token
        return out

    def _check(self, ring: BatchRing) -> None:
        if int(ring.tokens[self.slot]) != self.token:
            raise RuntimeError(f"batch ring slot {self.slot} was reused before its batch was copied out: the ring "
                               "expects one live iterator per loader, read in order (see asit.data.ring)")

    def pin_memory(self, device: Any = None) -> torch.Tensor:
        """A pinned copy (called by the ``DataLoader``'s pin-memory thread)."""
        return self._copy(pin=True)

    def materialize(self) -> torch.Tensor:
        """A plain copy, for loaders that do not pin."""
        return self._copy(pin=False)


def resolve_ring_refs(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with every :class:`RingRef` replaced by a copy of its rows (other entries as they are)."""
    if not any(isinstance(v, RingRef) for v in batch.values()):
        return batch
    return {k: v.materialize() if isinstance(v, RingRef) else v for k, v in batch.items()}


class RingCollate:
    """Wraps a collate function that takes ``out=`` (a dict of preallocated batch tensors), such as
    :func:`asit.data.collate_pretrain`: in a loader worker the large entries are stacked into the
    worker's next ring slot and sent as :class:`RingRef`; in the main process (``num_workers=0``)
    the collate runs as it is."""

    def __init__(self, collate: Callable[..., dict[str, Any]], ring: BatchRing) -> None:
        self.collate = collate
        self.ring = ring
        self._count = 0  # batches this worker has collated (each worker process has its own copy)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        info = get_worker_info()
        if info is None:
            return self.collate(samples)
        if isinstance(info.dataset, IterableDataset):
            raise TypeError("a batch ring needs a map-style dataset: an IterableDataset worker that runs dry lets "
                            "the others run further ahead than the ring has slots")
        if info.id >= self.ring.num_workers:
            raise RuntimeError(f"loader worker {info.id} has no slots in a ring made for "
                               f"{self.ring.num_workers} workers")
        slot = info.id * self.ring.slots_per_worker + self._count % self.ring.slots_per_worker
        self._count += 1
        # unique to this write: the worker's seed differs per worker and per iterator (epoch)
        token = hash((info.seed, info.id, self._count)) & (2**62 - 1) or 1
        self.ring.tokens[slot] = -1  # being written
        out = {key: buf[slot] for key, buf in self.ring.buffers.items()}
        batch = self.collate(samples, out=out)
        self.ring.tokens[slot] = token
        for key, buf in out.items():
            value = batch.get(key)
            # the entry went into the slot unless the collate could not use it (another shape)
            if isinstance(value, torch.Tensor) and value.numel() and value.data_ptr() == buf.data_ptr():
                batch[key] = RingRef(self.ring.id, key, slot, value.shape[0], token)
        return batch
