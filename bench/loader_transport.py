"""How fast batches travel from ``DataLoader`` workers to the main process, with and without the batch
ring (``asit.data.ring``): ``python bench/loader_transport.py [--workers N] [--seconds S]``.

Two measurements, each for the default transport (a new shared-memory segment per batch) and the ring:

* ``synthetic``: workers fill 94 MB batches (64 × 2 × 6 s at 32 kHz, float32) without decoding
  anything, and the main process copies each into a reused buffer, as the pin-memory thread
  copies it into pinned memory. This is the transport alone.
* ``dataset``: :class:`asit.data.PretrainDataset` on 10 s WAV clips (first one clip at a time in one
  thread, then through the loader), with the fbank in the workers
  (``views``, 37 MB per batch) or on the device (``waves``, 94 MB per batch, the fbank itself not run
  here), batches copied out the same way.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from test_bench_pipeline import _Forever  # the pipeline bench's endless sampler (this folder is on sys.path)
from torch.utils.data import DataLoader, Dataset, Sampler

from asit.data import PretrainDataset, collate_pretrain, ensure_demo_dataset, load_manifest
from asit.data.ring import BatchRing, RingCollate, RingRef

BATCH, VIEWS, SAMPLES, PREFETCH = 64, 2, 192_000, 2


class _Filled(Dataset):
    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, i: int) -> dict:
        return {"waves": torch.full((VIEWS, SAMPLES), float(i % 7)), "label": torch.zeros(0), "index": i,
                "ok": True, "error": ""}


def _rate(dataset: Dataset, sampler: Sampler | None, key: str, shape: tuple[int, ...], ring: bool, workers: int,
          seconds: float) -> tuple[float, float]:
    """(clips/s, ms per batch of the main process's copy)."""
    collate, batch_ring = collate_pretrain, None
    if ring:
        batch_ring = BatchRing({key: (BATCH, *shape)}, workers, PREFETCH)
        collate = RingCollate(collate_pretrain, batch_ring)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers, collate_fn=collate,
                        prefetch_factor=PREFETCH)
    dest = torch.empty(BATCH, *shape)
    it = iter(loader)
    try:
        for _ in range(2 * workers * PREFETCH):  # drain what the workers prepared before timing
            next(it)
        clips, copy_s, batches, start = 0, 0.0, 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            batch = next(it)
            t = time.perf_counter()
            value = batch[key]
            src = value.source() if isinstance(value, RingRef) else value
            dest[: len(src)].copy_(src)
            copy_s += time.perf_counter() - t
            clips, batches = clips + len(src), batches + 1
        return clips / (time.perf_counter() - start), copy_s / batches * 1e3
    finally:
        del it
        if batch_ring is not None:
            batch_ring.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{args.workers} workers, batch {BATCH}, prefetch_factor {PREFETCH}, {args.seconds:.0f} s per case")
    for ring in (False, True):
        rate, copy_ms = _rate(_Filled(), None, "waves", (VIEWS, SAMPLES), ring, args.workers, args.seconds)
        print(f"synthetic 94 MB batches, {'ring' if ring else 'new segment per batch'}: {rate:,.0f} clips/s "
              f"({rate / BATCH:.1f} batches/s), main-process copy {copy_ms:.1f} ms per batch")
    with tempfile.TemporaryDirectory() as tmp:
        entries = load_manifest(ensure_demo_dataset(tmp, num_clips=96, sample_rate=32000, seconds=10.0, seed=0))
        for fbank_on in ("loader", "device"):
            dataset = PretrainDataset(entries, sample_rate=32000, crop_seconds=6.0, num_views=VIEWS,
                                      num_mel_bins=128, target_frames=592, seed=0, fbank_on=fbank_on)
            key, shape = next(iter(dataset.sample_shapes().items()))
            start = time.perf_counter()
            for i in range(32):
                dataset[i]
            print(f"dataset, fbank on the {fbank_on}: one clip in one thread (decode, crops"
                  f"{', fbank' if fbank_on == 'loader' else ''}) {(time.perf_counter() - start) / 32 * 1e3:.2f} ms")
            for ring in (False, True):
                rate, copy_ms = _rate(dataset, _Forever(len(dataset)), key, shape, ring, args.workers, args.seconds)
                print(f"dataset, fbank on the {fbank_on} ({key}), {'ring' if ring else 'new segment per batch'}: "
                      f"{rate:,.0f} clips/s, main-process copy {copy_ms:.1f} ms per batch")


if __name__ == "__main__":
    main()
