"""The DALI pipeline graph: read, decode, resample, check, crop and roll in DALI; optionally the fbank too.

:func:`build_dali_pipeline` reads files with ``fn.readers.file`` and
:func:`build_dali_webdataset_pipeline` reads WebDataset tars with ``fn.readers.webdataset`` through
DALI index files (sharded by ``shard_id`` / ``num_shards``, each reader kept in its own shard). Both
decode with ``fn.decoders.audio`` (mono, resampled to ``sample_rate``), reduce the whole decoded clip
to its min, max, sum and length (what :func:`~asit.data.dali.clips.clip_check` judges) and cut the
views as :class:`~asit.data.dataset.ClipViews` does: with probability ``roll_prob`` the clip is rolled
circularly once (``roll_mode="clip"``; ``"view"`` rolls each global crop instead), then each view is a
random window of ``crop_seconds`` (zero-padded when the clip is shorter, as in
:func:`~asit.data.transforms.pad_or_crop_random`); local views are windows of the clip zero-padded to
``crop_seconds`` (``local_crop_from="padded"``) or of the clip itself. Then either

* ``fbank="torch"`` (default): the pipeline returns the waveform crops and the loader computes the
  Kaldi-exact fbank with :func:`~asit.data.fbank.batched_kaldi_fbank` on the target device, or
* ``fbank="dali"``: DALI computes log-mel filter banks itself (``preemphasis_filter`` →
  ``spectrogram`` with Kaldi's window → ``mel_filter_bank`` (HTK mel, 20 Hz to Nyquist) → log
  with Kaldi's floor), which differ from Kaldi's slightly (no per-frame DC removal; the
  pre-emphasis runs over the whole crop, not frame by frame); ``tests/test_data_dali.py``
  measures the difference.

The crops come from DALI's random generators, so the views differ from the torch backend's
(same distribution, different draws). ``nvidia.dali`` is imported only when a pipeline is built.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from ..fbank import AUDIOSET_MEAN, AUDIOSET_STD, KaldiFbank

__all__ = ["build_dali_pipeline", "build_dali_webdataset_pipeline", "dali_available"]


def dali_available() -> bool:
    """Whether ``nvidia.dali`` imports."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _import_dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
    except ImportError as exc:
        raise ImportError("the DALI backend needs NVIDIA DALI: pip install 'asit[dali]' "
                          "(nvidia-dali-cuda130)") from exc
    return dali, fn, types


def _crop(fn, types, dali, audio, length: int, roll_prob: float):
    """One random window of ``length`` samples (zero-padded past the end), rolled with prob. ``roll_prob``."""
    total = fn.cast(audio.shape()[0], dtype=types.FLOAT)
    start = fn.cast(dali.math.floor(fn.random.uniform(range=[0.0, 1.0]) * dali.math.max(total - length, 0.0)),
                    dtype=types.INT32)
    if roll_prob <= 0:
        return fn.slice(audio, start=start, shape=[length], axes=[0], out_of_bounds_policy="pad", fill_values=0.0)
    shift = fn.cast(dali.math.floor(fn.random.uniform(range=[0.0, 1.0]) * length), dtype=types.INT32)
    shift = shift * fn.cast(fn.random.coin_flip(probability=roll_prob), dtype=types.INT32)
    # torch.roll(crop, s) = [crop[L - s:], crop[:L - s]]: both parts sliced from the clip itself (zero past
    # its end, as the crop is), one copy of the samples fewer than rolling a cut crop (the crops are the
    # costliest part of the pipeline after the clip-wide checks)
    def part(offset, size):
        return fn.slice(audio, start=fn.reshape(offset, shape=[1]), shape=fn.reshape(size, shape=[1]), axes=[0],
                        out_of_bounds_policy="pad", fill_values=0.0)

    return fn.cat(part(start + (length - shift), shift), part(start, length - shift), axis=0)


def _window_of_rolled(fn, types, dali, audio, length: int, shift, span: int | None):
    """One random window of ``length`` samples of the clip rolled by ``shift`` (a per-clip INT32), the
    rolled clip followed by zeros; the start is uniform over ``max(clip length, span) - length`` (a
    ``span`` longer than the clip: windows of the clip zero-padded to ``span``).

    Built from two slices of the clip itself and a run of zeros, no copy of the rolled clip: window
    position ``i`` holds ``clip[(i - shift) mod T]`` while ``i < T``, then zeros."""
    whole = audio.shape()[0]
    total = fn.cast(whole, dtype=types.FLOAT)
    reach = total if span is None else dali.math.max(total, float(span))
    start = fn.cast(dali.math.floor(fn.random.uniform(range=[0.0, 1.0]) * dali.math.max(reach - length, 0.0)),
                    dtype=types.INT32)
    size = fn.cast(whole, dtype=types.INT32)
    valid = dali.math.clamp(size - start, 0, length)  # samples of the rolled clip in the window
    first = start - shift + size * fn.cast(start < shift, dtype=types.INT32)  # (start - shift) mod T
    head = dali.math.min(valid, dali.math.max(size - first, 0))  # from `first` to the clip's end

    def part(offset, count):
        return fn.slice(audio, start=fn.reshape(offset, shape=[1]), shape=fn.reshape(count, shape=[1]), axes=[0],
                        out_of_bounds_policy="pad", fill_values=0.0)

    # zeros: a slice starting at the clip's end, padded
    return fn.cat(part(first, head), part(start * 0, valid - head), part(size, length - valid), axis=0)


def _dali_fbank(fn, dali, crop, sample_rate: int, num_mel_bins: int, frames: int, mean: float, std: float):
    """DALI log-mel ``(frames, F)`` of one crop, normalised like :func:`~asit.data.fbank.normalize_fbank`."""
    kaldi = KaldiFbank(sample_rate, num_mel_bins, None)  # window sizes and Kaldi's window, nothing else
    wave = crop - fn.reductions.mean(crop)
    wave = fn.preemphasis_filter(wave, preemph_coeff=0.97, border="clamp")
    power = fn.spectrogram(wave, nfft=kaldi.fft_size, window_length=kaldi.window_size,
                           window_step=kaldi.window_shift, window_fn=kaldi.window.tolist(), power=2,
                           center_windows=False, layout="tf")  # [T, K]
    mel = fn.mel_filter_bank(power, nfilter=num_mel_bins, sample_rate=float(sample_rate), freq_low=20.0,
                             freq_high=sample_rate / 2.0, mel_formula="htk", normalize=False)  # [T, F]
    logmel = dali.math.log(dali.math.max(mel, float(np.finfo(np.float32).eps)))
    logmel = fn.slice(logmel, start=[0], shape=[frames], axes=[0], out_of_bounds_policy="pad", fill_values=0.0)
    return (logmel - mean) * (1.0 / (2.0 * std))


def build_dali_pipeline(
    files: list[str],
    labels: list[int],
    *,
    batch_size: int,
    seed: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    shuffle: bool = True,
    stick_to_shard: bool | None = None,
    pad_last_batch: bool = True,
    **options: Any,
):
    """A built DALI pipeline over ``files`` (see the module docstring).

    ``labels`` are per-file integers passed through (the loader uses the manifest index).
    Outputs, per sample: ``label`` int32 ``(1,)``; ``stats`` float32 ``(4,)`` on the CPU: the min,
    max (both NaN ignored), sum and length of the whole decoded clip, which :class:`~asit.data.dali.DaliPretrainLoader`
    checks like :func:`~asit.data.audio.load_audio` does (:func:`~asit.data.dali.clips.clip_check`); with
    ``fbank="torch"``: ``waves`` float32 ``(V, crop)`` and, when ``local_views > 0``, ``local_waves``
    ``(L, local_crop)``; with ``fbank="dali"``: ``views`` float32 ``(V, T, F)`` normalised, and
    ``local_views`` ``(L, T_local, F)``. ``device_id=None`` runs everything on the CPU; with a GPU
    the crops (and the DALI fbank) move to it. The reader is named ``"reader"``. ``shuffle=False``
    reads ``files`` in the given order (each shard a contiguous part), as :class:`~asit.data.dali.DaliPretrainLoader`
    does with its own per-epoch permutation. The other ``options`` (sample rate, crops, views, fbank,
    threads, ``prefetch``, ``synchronous``) are :func:`_build_pipeline`'s.

    Sharding: shard ``shard_id`` of ``num_shards`` is a contiguous part of ``files``, and
    ``pad_last_batch=True`` repeats a shard's last clip to fill its last batch, so every shard's epoch
    is the same number of batches (the largest shard's). ``stick_to_shard`` (default: ``not
    shuffle``) keeps a reader in its own shard when it runs past the shard's end; DALI's default
    moves on into the next shard, where another rank reads. DALI refuses it together with
    ``shuffle`` (``shuffle_after_epoch``), which re-deals the whole list every epoch with the same
    seed on every rank, so the shards still partition each epoch.
    """
    if len(files) != len(labels):
        raise ValueError(f"{len(files)} files but {len(labels)} labels")
    if not files:
        raise ValueError("files is empty")
    stick_to_shard = _check_sharding(shard_id, num_shards, shuffle, stick_to_shard)

    def read(fn):
        return fn.readers.file(
            files=list(files), labels=[int(x) for x in labels], shard_id=shard_id, num_shards=num_shards,
            stick_to_shard=stick_to_shard, pad_last_batch=pad_last_batch,
            shuffle_after_epoch=shuffle, name="reader", **({"shuffle_after_epoch_seed": seed} if shuffle else {}))

    return _build_pipeline(read, batch_size=batch_size, seed=seed, **options)


def build_dali_webdataset_pipeline(
    paths: list[str],
    index_paths: list[str],
    *,
    batch_size: int,
    seed: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    stick_to_shard: bool = True,
    pad_last_batch: bool = True,
    **options: Any,
):
    """:func:`build_dali_pipeline` reading WebDataset tar shards with ``fn.readers.webdataset``.

    ``index_paths`` are DALI index files (``v1.2``), one per entry of ``paths`` (a tar may be listed
    more than once); each sample line names two components, ``audio`` and ``json``, by offset and
    size (see :func:`~asit.data.dali.clips.write_dali_index`). DALI reads the samples in the order the index files list
    them. The first output is the ``json`` member's bytes (uint8) instead of a label; the others are
    :func:`build_dali_pipeline`'s. Sharding as there (``shuffle`` is never on).
    """
    if len(paths) != len(index_paths):
        raise ValueError(f"{len(paths)} shards but {len(index_paths)} index files")
    if not paths:
        raise ValueError("paths is empty")
    stick_to_shard = _check_sharding(shard_id, num_shards, False, stick_to_shard)

    def read(fn):
        audio, meta = fn.readers.webdataset(
            paths=list(paths), index_paths=list(index_paths), ext=["audio", "json"], shard_id=shard_id,
            num_shards=num_shards, stick_to_shard=stick_to_shard, pad_last_batch=pad_last_batch,
            missing_component_behavior="error", name="reader")
        return audio, meta

    return _build_pipeline(read, batch_size=batch_size, seed=seed, **options)


def _check_sharding(shard_id: int, num_shards: int, shuffle: bool, stick_to_shard: bool | None) -> bool:
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} out of range for num_shards {num_shards}")
    if stick_to_shard is None:
        stick_to_shard = not shuffle
    if stick_to_shard and shuffle:
        raise ValueError("stick_to_shard=True needs shuffle=False (DALI refuses shuffle_after_epoch with it)")
    return stick_to_shard


def _build_pipeline(
    read,
    *,
    batch_size: int,
    sample_rate: int = 32000,
    crop_seconds: float = 6.0,
    num_views: int = 2,
    num_mel_bins: int = 128,
    target_frames: int = 592,
    mean: float = AUDIOSET_MEAN,
    std: float = AUDIOSET_STD,
    seed: int = 0,
    device_id: int | None = None,
    roll_prob: float = 0.5,
    roll_mode: Literal["clip", "view"] = "clip",
    local_crop_from: Literal["padded", "clip"] = "padded",
    local_views: int = 0,
    local_crop_seconds: float = 2.0,
    local_target_frames: int = 192,
    fbank: Literal["torch", "dali"] = "torch",
    num_threads: int = 2,
    prefetch: int = 2,
    synchronous: bool = False,
):
    """The pipeline after the reader ``read(fn) -> (encoded, first output)``: decode, check, crop, fbank.

    ``synchronous=True`` runs each batch to the end inside ``run()`` (no prefetching, no pipelined
    stages), so an error belongs to the batch being drawn (the loader uses it, with batches of one,
    to find a clip that fails).
    """
    dali, fn, types = _import_dali()
    if fbank not in ("torch", "dali"):
        raise ValueError(f"fbank must be 'torch' or 'dali', got {fbank!r}")
    if num_views < 1 or local_views < 0:
        raise ValueError(f"need num_views >= 1 and local_views >= 0, got {num_views}, {local_views}")
    if not 0.0 <= roll_prob <= 1.0:
        raise ValueError(f"roll_prob must be in [0, 1], got {roll_prob}")
    if roll_mode not in ("clip", "view") or local_crop_from not in ("padded", "clip"):
        raise ValueError(f"roll_mode must be 'clip' or 'view' and local_crop_from 'padded' or 'clip', got "
                         f"{roll_mode!r}, {local_crop_from!r}")
    crop = round(crop_seconds * sample_rate)
    local_crop = round(local_crop_seconds * sample_rate)
    timing = dict(exec_pipelined=False, exec_async=False, prefetch_queue_depth=1) if synchronous else dict(
        prefetch_queue_depth=prefetch)

    @dali.pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed, **timing)
    def pipeline():
        encoded, first = read(fn)
        audio, _ = fn.decoders.audio(encoded, downmix=True, sample_rate=float(sample_rate), dtype=types.FLOAT)
        # what load_audio checks, on the whole clip, in three reductions and no copy of the samples (an
        # abs() and a NaN mask cost three times the decoding): min and max skip NaN, the sum does not
        stats = fn.cat(*(fn.reshape(r(audio), shape=[1]) for r in (fn.reductions.min, fn.reductions.max,
                                                                   fn.reductions.sum)),
                       fn.cast(audio.shape(), dtype=types.FLOAT), axis=0)
        span = crop if local_crop_from == "padded" else None
        if roll_mode == "clip" and (roll_prob > 0 or span is not None):
            shift = fn.cast(dali.math.floor(fn.random.uniform(range=[0.0, 1.0]) * fn.cast(
                audio.shape()[0], dtype=types.FLOAT)), dtype=types.INT32)  # one roll for the whole clip
            shift = shift * fn.cast(fn.random.coin_flip(probability=roll_prob), dtype=types.INT32)
            views = [_window_of_rolled(fn, types, dali, audio, crop, shift, None) for _ in range(num_views)]
            local = [_window_of_rolled(fn, types, dali, audio, local_crop, shift, span) for _ in range(local_views)]
        else:
            views = [_crop(fn, types, dali, audio, crop, roll_prob if roll_mode == "view" else 0.0)
                     for _ in range(num_views)]
            local = [_crop(fn, types, dali, audio, local_crop, 0.0) for _ in range(local_views)]
        if device_id is not None:
            views, local = [v.gpu() for v in views], [v.gpu() for v in local]
        if fbank == "dali":
            views = [_dali_fbank(fn, dali, v, sample_rate, num_mel_bins, target_frames, mean, std) for v in views]
            local = [_dali_fbank(fn, dali, v, sample_rate, num_mel_bins, local_target_frames, mean, std)
                     for v in local]
        outputs = [first, stats, fn.stack(*views)]
        if local:
            outputs.append(fn.stack(*local))
        return tuple(outputs)

    pipe = pipeline()
    pipe.build()
    return pipe

