"""The batch ring (asit.data.ring): loader workers write batches into pre-allocated shared memory."""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from asit.data import collate_pretrain
from asit.data.ring import BatchRing, RingCollate, RingRef, resolve_ring_refs

B, V, L = 4, 2, 300


class Numbered(Dataset):
    """Sample i holds the value i everywhere; every 7th sample is a skipped (undecodable) clip."""

    def __len__(self) -> int:
        return 240

    def __getitem__(self, i: int) -> dict:
        return {"waves": torch.full((V, L), float(i)), "local_waves": torch.full((3, 50), -float(i)),
                "label": torch.zeros(0), "index": i, "ok": i % 7 != 3, "error": "" if i % 7 != 3 else "unreadable"}


class NumberedStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return (Numbered()[i] for i in range(16))


def test_an_iterable_dataset_is_refused() -> None:
    ring = BatchRing({"waves": (B, V, L)}, num_workers=1, prefetch_factor=1)
    loader = DataLoader(NumberedStream(), batch_size=B, num_workers=1, collate_fn=RingCollate(collate_pretrain, ring))
    try:
        with pytest.raises(TypeError, match="map-style"):
            next(iter(loader))
    finally:
        ring.release()


def _batches(ring_slots: int | None, consumer_delay: float) -> list[dict]:
    collate = collate_pretrain
    if ring_slots is not None:
        ring = BatchRing({"waves": (B, V, L), "local_waves": (B, 3, 50)}, num_workers=2, prefetch_factor=2)
        ring.slots_per_worker = ring_slots  # (the undersized case only)
        collate = RingCollate(collate_pretrain, ring)
    loader = DataLoader(Numbered(), batch_size=B, num_workers=2, prefetch_factor=2, collate_fn=collate)
    out = []
    for batch in loader:
        if ring_slots is not None:
            assert isinstance(batch["waves"], RingRef) and isinstance(batch["local_waves"], RingRef)
        out.append(resolve_ring_refs(batch))  # copied out before the next batch is asked for
        time.sleep(consumer_delay)  # a slow consumer: the workers run as far ahead as they may
    if ring_slots is not None:
        ring.release()
    return out


def test_ring_batches_equal_plain_batches() -> None:
    plain = _batches(None, 0.0)
    ringed = _batches(3, 0.01)  # prefetch_factor + 1 slots per worker: the default
    assert len(plain) == len(ringed) == 60
    for a, b in zip(plain, ringed):
        assert set(a) == set(b)
        for key in ("waves", "local_waves", "index"):
            assert torch.equal(a[key], b[key]), key
        assert a["skipped_indices"] == b["skipped_indices"] and a["num_skipped"] == b["num_skipped"]
    # the skipped clips are left out, so some batches hold fewer rows than the slot
    assert {len(b["index"]) for b in ringed} == {3, 4}


def test_an_undersized_ring_fails_loudly() -> None:
    """With one slot per worker a worker overwrites a batch before it is copied out: the slot's
    generation token says so, and the copy-out raises instead of returning another batch's data."""
    with pytest.raises(RuntimeError, match="reused before its batch was copied out"):
        _batches(1, 0.02)


def test_main_process_collate_and_unfit_entries_are_unchanged() -> None:
    ring = BatchRing({"waves": (B, V, L)}, num_workers=1, prefetch_factor=1)
    try:
        samples = [Numbered()[i] for i in range(B)]
        batch = RingCollate(collate_pretrain, ring)(samples)  # no worker: the collate as it is
        assert isinstance(batch["waves"], torch.Tensor) and batch["waves"].shape == (3, V, L)
        # a collate given a slot of another shape stacks into new memory
        other = torch.zeros(B, V, L + 1)
        batch = collate_pretrain(samples, out={"waves": other})
        assert batch["waves"].shape == (3, V, L) and batch["waves"].data_ptr() != other.data_ptr()
        fits = torch.zeros(B, V, L)
        batch = collate_pretrain(samples, out={"waves": fits})
        assert batch["waves"].data_ptr() == fits.data_ptr() and torch.equal(fits[:3], batch["waves"])
        assert ring.nbytes == 2 * B * V * L * 4
    finally:
        ring.release()
    with pytest.raises(RuntimeError, match="not known in this process"):
        RingRef(ring.id, "waves", 0, 1, token=1).materialize()
    with pytest.raises(ValueError, match="num_workers"):
        BatchRing({"waves": (B, V, L)}, num_workers=0, prefetch_factor=2)


def test_a_ring_larger_than_shared_memory_is_refused(monkeypatch) -> None:
    """A ring that /dev/shm cannot hold is refused up front, with the size it needs."""
    import asit.data.ring as ring_module

    assert ring_module.ring_bytes({"waves": (B, V, L)}, 2, 3) == 2 * 4 * B * V * L * 4
    monkeypatch.setattr(ring_module, "shared_memory_free", lambda path="/dev/shm": 1000)
    with pytest.raises(MemoryError, match="/dev/shm"):
        BatchRing({"waves": (B, V, L)}, num_workers=2, prefetch_factor=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory)")
def test_pinned_ring_batches_equal_plain_batches() -> None:
    ring = BatchRing({"waves": (B, V, L), "local_waves": (B, 3, 50)}, num_workers=2, prefetch_factor=2)
    loader = DataLoader(Numbered(), batch_size=B, num_workers=2, prefetch_factor=2, pin_memory=True,
                        collate_fn=RingCollate(collate_pretrain, ring))
    plain = _batches(None, 0.0)
    try:
        for a, b in zip(plain, loader):
            assert isinstance(b["waves"], torch.Tensor) and b["waves"].is_pinned()
            assert torch.equal(a["waves"], b["waves"]) and torch.equal(a["local_waves"], b["local_waves"])
            time.sleep(0.01)
    finally:
        ring.release()
