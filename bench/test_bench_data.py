"""Data pipeline throughput per CPU core: the authors' per-clip path against ours, batched.

Both turn a batch of waveforms (2 views × 6 s at 32 kHz each, docs/design.md §1) into normalised fbanks
and a GMML-corrupted copy with its mask:

* ``authors``: per clip and view, ``torchaudio.compliance.kaldi.fbank`` (through
  :func:`asit.data.kaldi_fbank`), then the authors' GMML painter, a Python while-loop per
  sample that draws one block at a time until ``mask.sum()`` reaches the target;
* ``ours``: one :func:`asit.data.fbank.batched_kaldi_fbank` call for the batch (normalising in
  place, as the loader does), then :func:`asit.ops.sample_gmml_blocks` + :func:`asit.ops.gmml_corrupt`
  (on a CPU the painter reuses the canvas the sampler painted).

``ours_blocks_presampled`` times ours with the blocks sampled beforehand (as when the GPU samples
them). It is not ours minus the sampler: on a CPU the sampler paints candidate blocks one at a
time, counting the pixels each newly covers, and hands that canvas to the painter, so ours paints
once, while here the painter paints afresh every round. (On a GPU a vectorised binary search over
the batch finds the same blocks.) Decoding and cropping are the same for both and left out.
``torch.set_num_threads(1)`` makes the figures per core. Clips/s goes into ``extra_info`` (with
the ratio to the authors', in ours). ``worker_per_clip`` times one loader worker per clip (decode
and crops included), and ``dali_cpu`` DALI's loader on the CPU. Run with
``pytest bench/test_bench_data.py``.
"""

from __future__ import annotations

import math
import platform
import random

import pytest
import torch

import asit.ops as ops
from asit.data import AUDIOSET_MEAN, AUDIOSET_STD, kaldi_fbank, normalize_fbank
from asit.data.fbank import batched_kaldi_fbank

SR = 32000
BATCH = 16  # clips
VIEWS = 2
SAMPLES = 6 * SR
FRAMES, BINS = 592, 128
MEAN, STD = AUDIOSET_MEAN, AUDIOSET_STD
_RESULTS: dict[str, float] = {}


def _waves() -> torch.Tensor:
    """``[B, V, T]`` harmonic tones with noise: a stand-in for decoded, cropped clips."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(SAMPLES) / SR
    f0 = 100 + 400 * torch.rand(BATCH, VIEWS, 1, generator=g)
    tones = sum(torch.sin(2 * math.pi * k * f0 * t) / k for k in range(1, 6))
    return 0.2 * tones + 0.05 * torch.randn(BATCH, VIEWS, SAMPLES, generator=g)


def authors_gmml(x: torch.Tensor, batch: torch.Tensor, rng: random.Random):
    """The authors' painter for one ``(1, T, F)`` view: blocks drawn one at a time in Python."""
    _, h, w = x.shape
    mask = torch.zeros_like(x)
    alien = rng.random() < 0.5
    target = (0.3 if alien else rng.uniform(0.5, 0.7)) * h * w
    while mask.sum() < target:
        bh, bw = rng.randint(1, int(0.3 * h)), rng.randint(1, int(0.3 * w))
        top, left = rng.randint(0, h - 1), rng.randint(0, w - 1)
        mask[:, top : top + bh, left : left + bw] = 1
    if alien:  # like the authors, the source may be the sample itself
        other = batch[rng.randrange(batch.shape[0])]
        return x * (1 - mask) + other * mask, mask
    return x * (1 - mask), mask


def authors_path(waves: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = random.Random(0)
    views = torch.stack([
        normalize_fbank(kaldi_fbank(waves[b, v], SR, BINS, FRAMES), MEAN, STD).unsqueeze(0)
        for b in range(waves.shape[0]) for v in range(waves.shape[1])
    ])  # [B·V, 1, T, F]
    return [authors_gmml(view, views, rng) for view in views]


def our_path(waves: torch.Tensor, generator: torch.Generator, blocks: ops.GMMLBlocks | None = None):
    views = batched_kaldi_fbank(waves.reshape(-1, SAMPLES), SR, BINS, FRAMES,
                                normalize=(MEAN, STD)).unsqueeze(1)  # [B·V, 1, T, F], normalised
    if blocks is None:
        blocks = ops.sample_gmml_blocks(views.shape[0], FRAMES, BINS, generator=generator)
    return ops.gmml_corrupt(views, blocks, 16, backend="reference")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _record(benchmark, name: str) -> float:
    clips_per_s = BATCH / benchmark.stats.stats.median
    _RESULTS[name] = clips_per_s
    benchmark.extra_info.update(
        clips_per_s_per_core=round(clips_per_s, 2), batch=BATCH, views=VIEWS, seconds_per_view=6,
        sample_rate=SR, threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
        torch=torch.__version__,
    )
    return clips_per_s


def test_data_authors_per_clip(benchmark, one_thread):
    waves = _waves()
    out = benchmark.pedantic(authors_path, args=(waves,), rounds=3, iterations=1, warmup_rounds=1)
    assert len(out) == BATCH * VIEWS and torch.isfinite(out[0][0]).all()
    _record(benchmark, "authors")


def test_data_ours_batched(benchmark, one_thread):
    waves = _waves()
    g = torch.Generator().manual_seed(0)
    out = benchmark.pedantic(our_path, args=(waves, g), rounds=5, iterations=1, warmup_rounds=1)
    assert out.corrupted.shape == (BATCH * VIEWS, 1, FRAMES, BINS) and torch.isfinite(out.corrupted).all()
    ours = _record(benchmark, "ours")
    if "authors" in _RESULTS:
        benchmark.extra_info["speedup_vs_authors"] = round(ours / _RESULTS["authors"], 2)


def test_data_ours_blocks_presampled(benchmark, one_thread):
    """Ours without the block sampler (e.g. sampled on the GPU or ahead of time): its CPU cost apart."""
    waves = _waves()
    g = torch.Generator().manual_seed(0)
    blocks = ops.sample_gmml_blocks(BATCH * VIEWS, FRAMES, BINS, generator=g)
    out = benchmark.pedantic(our_path, args=(waves, g, blocks), rounds=5, iterations=1, warmup_rounds=1)
    assert torch.isfinite(out.corrupted).all()
    ours = _record(benchmark, "ours_presampled")
    if "authors" in _RESULTS:
        benchmark.extra_info["speedup_vs_authors"] = round(ours / _RESULTS["authors"], 2)


# ---- One loader worker: decode, crops and (optionally) the fbank, per clip --------------------------


@pytest.fixture(scope="module")
def wav_corpus(tmp_path_factory):
    """10 s 32 kHz WAV clips, four batches' worth (the worker case reads the first batch, DALI cycles)."""
    from asit.data import ensure_demo_dataset, load_manifest

    root = ensure_demo_dataset(tmp_path_factory.mktemp("wav_demo"), num_clips=4 * BATCH, sample_rate=SR,
                               seconds=10.0, seed=0)
    return load_manifest(root)


@pytest.mark.parametrize("fbank_on", ["loader", "device"])
def test_data_worker_per_clip(benchmark, one_thread, wav_corpus, fbank_on):
    """What one ``DataLoader`` worker does per clip (:class:`asit.data.PretrainDataset`): decode a 10 s
    32 kHz WAV (page cache), two random 6 s crops with the v1 roll, and with ``fbank_on="loader"`` the
    normalised fbank of both; ``"device"`` leaves the fbank to the trainer's device. No GMML. Clips/s
    per worker (one thread) bounds what ``num_workers`` workers can feed, transport aside."""
    from asit.data import PretrainDataset

    dataset = PretrainDataset(wav_corpus, sample_rate=SR, fbank_on=fbank_on)
    key = next(iter(dataset.sample_shapes()))  # "views", or the crops "waves"
    out = benchmark.pedantic(lambda: [dataset[i] for i in range(BATCH)], rounds=5, iterations=1, warmup_rounds=1)
    assert len(out) == BATCH and torch.isfinite(out[0][key]).all()
    _record(benchmark, f"worker_{fbank_on}")
    benchmark.extra_info.update(fbank_on=fbank_on, includes_decode=True, views=VIEWS)


# ---- DALI on the CPU: decode + crop in DALI, then the fbank (ours in torch, or DALI's own) ----------


@pytest.fixture(scope="module")
def dali_corpus(wav_corpus):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'asit[dali]')")
    return wav_corpus


@pytest.mark.parametrize("fbank", ["torch", "dali"])
def test_data_dali_cpu(benchmark, one_thread, dali_corpus, fbank):
    """Clips/s of :class:`asit.data.dali.DaliPretrainLoader` on the CPU: decode 10 s WAV clips, 2 random
    6 s crops with roll, fbank, normalise. Unlike the cases above this includes decoding and has no GMML.
    Not strictly per core: DALI's one worker thread prefetches (2 batches) beside the one torch thread."""
    from asit.data.dali import DaliPretrainLoader

    loader = DaliPretrainLoader(dali_corpus, batch_size=BATCH, sample_rate=SR, num_views=VIEWS, num_mel_bins=BINS,
                                target_frames=FRAMES, fbank=fbank, num_threads=1, seed=0, steps_per_epoch=10_000)
    batches = iter(_cycle(loader))  # one long epoch: no pipeline built inside the timed rounds
    out = benchmark.pedantic(lambda: next(batches), rounds=5, iterations=1, warmup_rounds=1)
    assert out["views"].shape == (BATCH, VIEWS, 1, FRAMES, BINS) and torch.isfinite(out["views"]).all()
    _record(benchmark, f"dali_cpu_{fbank}")
    benchmark.extra_info.update(fbank=fbank, includes_decode=True)


def _cycle(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1
