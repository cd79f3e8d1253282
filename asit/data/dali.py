"""NVIDIA DALI input pipeline: decode, resample, random crops and rolls in DALI; the fbank after it.

:func:`build_dali_pipeline` reads files with ``fn.readers.file`` (sharded by ``shard_id`` /
``num_shards``, each reader kept in its own shard), decodes with ``fn.decoders.audio`` (mono,
resampled to ``sample_rate``) and cuts the views: a random window of ``crop_seconds`` (zero-padded
when the clip is shorter, as in :func:`~asit.data.transforms.pad_or_crop_random`), circularly
rolled with probability ``roll_prob`` (:func:`~asit.data.transforms.random_roll`). Then either

* ``fbank="torch"`` (default): the pipeline returns the waveform crops and
  :class:`DaliPretrainLoader` computes the Kaldi-exact fbank with
  :func:`~asit.data.fbank.batched_kaldi_fbank` on the target device (the GPU in training), or
* ``fbank="dali"``: DALI computes log-mel filter banks itself (``preemphasis_filter`` →
  ``spectrogram`` with Kaldi's window → ``mel_filter_bank`` (HTK mel, 20 Hz to Nyquist) → log
  with Kaldi's floor), which differ from Kaldi's slightly (no per-frame DC removal; the
  pre-emphasis runs over the whole crop, not frame by frame); ``tests/test_data_dali.py``
  measures the difference.

:class:`DaliPretrainLoader` runs the pipeline (on the CPU with ``device_id=None``) and yields
batches in :func:`~asit.data.dataset.collate_pretrain`'s layout. Each epoch it permutes the list
with ``(seed, epoch)`` (the same on every rank), gives each rank a contiguous share of it
and builds a pipeline over this rank's share alone, so each epoch every
clip is read once across ranks, ranks never read each other's clips, and a resumed run places the
stream without replaying earlier epochs. Bad files are handled in three places, and every clip left
out is reported in ``num_skipped``/``skip_reasons``/``skipped_indices`` like the torch backend's
collate reports them, so the trainer's per-epoch summary and ``data.max_bad_fraction`` count them:

* every file's header is checked up front (``check_files``): files soundfile cannot open are
  left out with load_audio's reason, and files in a format DALI's decoder lacks
  (:data:`DALI_UNSUPPORTED_FORMATS`: MP3) with ``"unsupported-by-dali"``; each is reported in
  the batch where the epoch's permutation places it (on one rank), and the steps per epoch count
  only the kept clips;
* a file whose header is fine but whose data DALI fails to decode mid-run is left out on the
  spot (DALI's error names it; when it names none, the clips the pipeline was reading are run
  one at a time through a synchronous copy of it to find the one that fails; if none does, the
  error is raised): the pipeline is rebuilt over this rank's clips not read yet,
  less that one, and the batch is drawn again (reason ``"undecodable"``, logged by name). Every
  epoch starts from the full list again, so such a file is met (and reported) once per epoch,
  and each epoch's stream depends only on ``(seed, epoch)``: a resumed run replays it identically;
* clips that decode to NaN/Inf samples or samples beyond ``MAX_ABS_SAMPLE`` (the rule of
  :func:`~asit.data.audio.load_audio`, checked on the whole decoded clip inside the pipeline) are
  dropped from their batch and reported in it (``"non-finite"``, ``"out-of-range"``).

WebDataset shards (``scripts/make_shards.py``, ``data.train_manifest=shards:...``) are read with
``fn.readers.webdataset``: the tars' headers and each clip's audio header are read once to find
each clip's audio and ``json`` members (about 0.1 ms per clip from the page cache, a few minutes
per process at AudioSet-2M scale) and cached per tar (``$ASIT_CACHE/dali-members``: about 2 µs per
clip in later runs), and each pipeline gets DALI index files listing exactly the clips it is to
read, in the epoch's order (the tars permuted, each tar's clips permuted), so ranks, left-out
clips and rebuilds work as for files. Up front, clips without an audio member (``"missing"``),
without a ``json`` member (``"bad-metadata"``), whose audio header fails the manifest check
(:func:`_header_reason`: ``"unreadable"``, ``"empty"``, ``"bad-sample-rate"``, ``"too-long"``,
``"unsupported-by-dali"``) and clips an index lists but a damaged tar lacks (``"truncated-shard"``,
``"unreadable-shard"``) are left out; audio whose header is fine but whose data is damaged is found
mid-run, and a malformed ``json`` drops its row.

The crops come from DALI's random generators, so the views differ from the torch backend's
(same distribution, different draws).
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
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..atomic_io import atomic_write_text
from .audio import MAX_ABS_SAMPLE, MAX_FILE_RATE, MAX_SECONDS, MIN_FILE_RATE, AudioDecodeError, load_audio
from .fbank import KaldiFbank, fbank_views
from .features import AUDIOSET_MEAN, AUDIOSET_STD
from .manifest import AudioEntry
from .shards import ShardSet

__all__ = [
    "DALI_UNSUPPORTED_FORMATS",
    "DaliPretrainLoader",
    "build_dali_pipeline",
    "build_dali_webdataset_pipeline",
    "dali_available",
    "write_dali_index",
]

logger = logging.getLogger(__name__)

_LOG_FLOOR = float(np.log(np.finfo(np.float32).eps))  # Kaldi's floor: log(float32 eps) ≈ -15.94


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


def _dali_fbank(fn, dali, crop, sample_rate: int, num_mel_bins: int, frames: int, mean: float, std: float):
    """DALI log-mel ``(frames, F)`` of one crop, normalised like :func:`~asit.data.features.normalize_fbank`."""
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
    max (both NaN ignored), sum and length of the whole decoded clip, which :class:`DaliPretrainLoader`
    checks like :func:`~asit.data.audio.load_audio` does (:func:`clip_check`); with
    ``fbank="torch"``: ``waves`` float32 ``(V, crop)`` and, when ``local_views > 0``, ``local_waves``
    ``(L, local_crop)``; with ``fbank="dali"``: ``views`` float32 ``(V, T, F)`` normalised, and
    ``local_views`` ``(L, T_local, F)``. ``device_id=None`` runs everything on the CPU; with a GPU
    the crops (and the DALI fbank) move to it. The reader is named ``"reader"``. ``shuffle=False``
    reads ``files`` in the given order (each shard a contiguous part), as :class:`DaliPretrainLoader`
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
    size (see :func:`write_dali_index`). DALI reads the samples in the order the index files list
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
        views = [_crop(fn, types, dali, audio, crop, roll_prob) for _ in range(num_views)]
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


# Formats soundfile opens but DALI's audio decoder (libsndfile without MPEG, reading from memory) does
# not: measured with nvidia-dali 2.4 over every format/subtype soundfile writes (WAV/WAVEX of any
# sample type, FLAC, OGG Vorbis and Opus, AIFF, AU, W64, RF64, CAF incl. ALAC, ... all decode).
# A format missing here still cannot stop a run: the loader then finds the clip that fails (_probe).
DALI_UNSUPPORTED_FORMATS = frozenset({"MP3", "SD2"})


def _check_files(entries: list[AudioEntry], sample_rate: int,
                 part: tuple[int, int] = (0, 1)) -> tuple[list[int], dict[int, str]]:
    """Indices of the entries whose header soundfile reads in a format DALI decodes, and the reason of
    each other one (load_audio's reasons, or ``"unsupported-by-dali"``). ``part=(k, n)`` checks only the
    entries ``k, k + n, k + 2n, ...``."""
    import soundfile as sf

    good, reasons = [], {}
    for i in range(part[0], len(entries), part[1]):
        entry = entries[i]
        try:
            info = sf.info(entry.path)
            why = _header_reason(_sound(info))
            if why is not None:
                reasons[i] = why
                continue
        except Exception:  # libsndfile raises several types; all mean "cannot decode"
            try:  # load_audio gives the reason ("missing", "unreadable", ...)
                load_audio(entry.path, sample_rate)
                reasons[i] = "unreadable"
            except AudioDecodeError as err:
                reasons[i] = err.reason
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
    """The clips of a manifest for :class:`DaliPretrainLoader`: clip ``i`` is ``entries[i]``."""

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
        return np.random.default_rng([seed, epoch]).permutation(len(self.entries)).tolist()

    def build(self, clips: list[int], **args: Any):
        return build_dali_pipeline([self.entries[i].path for i in clips], clips, shuffle=False, pad_last_batch=False,
                                   **args)

    def rows(self, first, clips: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict[int, tuple[str, str]]]:
        index = torch.from_numpy(np.array(first.as_tensor())).reshape(-1).to(torch.int64)  # [B] = the clip ids
        return index, self.labels[index], {}

    def close(self) -> None:
        pass


def _header_reason(sound: tuple[int, int, int, str] | str) -> str | None:
    """Why a clip with this audio header is left out, by load_audio's rules and DALI's formats (None: kept).
    ``sound`` is ``(frames, sample rate, channels, soundfile format)``, or the reason the header could
    not be read."""
    if isinstance(sound, str):
        return sound
    frames, rate, channels, fmt = sound
    if not MIN_FILE_RATE <= rate <= MAX_FILE_RATE:
        return "bad-sample-rate"
    if channels < 1:
        return "unreadable"
    if frames > MAX_SECONDS * rate:  # load_audio's cap: DALI would decode it whole
        return "too-long"
    if frames <= 0:
        return "empty"
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
        return "unreadable"  # what load_audio says of an empty file
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
    """The clips of WebDataset shards (``scripts/make_shards.py``) for :class:`DaliPretrainLoader`.

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
                reasons[i] = "unreadable"  # what load_audio says of an empty file
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
        for t in np.random.default_rng([seed, epoch]).permutation(len(self.shards.urls)).tolist():
            clips = by_tar.get(t, [])
            order += [clips[k] for k in np.random.default_rng([seed, epoch, t, 2]).permutation(len(clips))]
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


class DaliPretrainLoader:
    """Batches of pretraining views from a DALI pipeline, in :func:`~asit.data.dataset.collate_pretrain`'s layout.

    ``source`` is a manifest's entries (read with ``fn.readers.file``) or a
    :class:`~asit.data.shards.ShardSet` of WebDataset shards (read with ``fn.readers.webdataset``,
    see :class:`_ShardClips`; labels from the ``json`` members, with the shards' label vocabulary
    unless ``label_vocab`` is given; ``index_dir`` is where its DALI index files go, default a
    temporary folder).

    Each batch: ``views`` float32 ``(B, V, 1, T, F)`` normalised, ``local_views``
    ``(B, L, 1, T_local, F)`` when ``local_views > 0``, ``label`` multi-hot ``(B, K)``,
    ``index`` int64 ``(B,)`` (manifest indices), ``num_skipped``, ``skip_reasons`` and
    ``skipped_indices`` (the clips of this batch's share that were left out, see the module
    docstring); the views on ``cuda:device_id`` (the CPU for ``device_id=None``), ``label`` and
    ``index`` on the CPU.

    Sharding: each epoch the clips are put in an order seeded by ``(seed, epoch)`` (the same on every
    rank: a permutation of the manifest; for shards, the tars permuted and each tar's clips permuted)
    and the clips that passed the check are cut into ``num_shards`` contiguous shares; each rank's
    pipeline reads only its own share, so ranks never read each other's clips. One pass of ``iter()``
    yields ``steps_per_epoch`` batches of the current epoch: by default the smallest share's clips //
    ``batch_size`` (the same on every rank, as DDP needs), capped by ``max_steps_per_epoch``; an
    explicit ``steps_per_epoch`` larger than that repeats the rank's own clips. :meth:`set_epoch`
    ``(epoch, skip)`` starts an epoch's pipeline and, for a resumed run, draws the first ``skip``
    samples of that epoch again.

    Clips that fail the check up front are left out and counted in :attr:`excluded`; they are also
    reported as skipped clips in the batch where the epoch's order places them (each on one rank),
    so the trainer's per-epoch summary and ``data.max_bad_fraction`` see them like the torch
    backend's. With a manifest, ``all_gather`` (``obj -> [obj of rank 0, obj of rank 1, ...]``, such
    as ``torch.distributed.all_gather_object``, called once by every rank) splits the header check:
    each rank reads every ``num_shards``-th header and the verdicts are exchanged; without it every
    rank reads them all. Other keyword arguments go to :func:`build_dali_pipeline`.
    """

    def __init__(
        self,
        source: list[AudioEntry] | ShardSet,
        *,
        batch_size: int,
        sample_rate: int = 32000,
        num_mel_bins: int = 128,
        target_frames: int = 592,
        local_views: int = 0,
        local_target_frames: int = 192,
        mean: float = AUDIOSET_MEAN,
        std: float = AUDIOSET_STD,
        shard_id: int = 0,
        num_shards: int = 1,
        device_id: int | None = None,
        fbank: Literal["torch", "dali"] = "torch",
        steps_per_epoch: int | None = None,
        max_steps_per_epoch: int | None = None,
        label_vocab: list[str] | None = None,
        check_files: bool = True,
        index_dir: str | None = None,
        all_gather: Callable[[Any], list[Any]] | None = None,
        **pipeline_options: Any,
    ) -> None:
        if isinstance(source, ShardSet):
            if not source.urls:
                raise ValueError("shards lists no shard files")
            self._clips: _FileClips | _ShardClips = _ShardClips(source, label_vocab, index_dir)
        else:
            if not source:
                raise ValueError("entries is empty")
            self._clips = _FileClips(source, label_vocab)
            self.entries = self._clips.entries
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} out of range for num_shards {num_shards}")
        clips = self._clips
        self.headers_checked = 0  # audio headers this process read with soundfile (a manifest's files)
        if check_files and all_gather is not None and num_shards > 1 and isinstance(clips, _FileClips):
            # each process checks every num_shards-th header (at AudioSet scale a minute per process
            # warm, far more from cold storage), then the verdicts are exchanged: all ranks keep the same
            try:
                good, mine = clips.check(sample_rate, part=(shard_id, num_shards))
                error = None
            except Exception as exc:  # noqa: BLE001 (raised below on every rank, not here alone: no deadlock)
                good, mine, error = [], {}, f"{type(exc).__name__}: {exc}"
            self.headers_checked = len(good) + len(mine)
            parts = all_gather((mine, error))
            failed = [(rank, why) for rank, (_, why) in enumerate(parts) if why]
            if failed:
                raise RuntimeError("DALI loader: the header check failed on rank "
                                   + "; on rank ".join(f"{rank}: {why}" for rank, why in failed))
            self._left_out = dict(sorted(kv for part, _ in parts for kv in part.items()))
            keep = [i for i in range(len(clips)) if i not in self._left_out]
        elif check_files:
            keep, self._left_out = clips.check(sample_rate)
            if isinstance(clips, _FileClips):
                self.headers_checked = len(clips)
        elif isinstance(clips, _ShardClips):  # the tar members still (read from the headers already)
            keep, self._left_out = clips.check(sample_rate, formats=False)
        else:
            keep, self._left_out = list(range(len(clips))), {}
        self.excluded: Counter[str] = Counter(self._left_out.values())
        if self.excluded:
            logger.warning("DALI loader: left out %d clips that cannot be decoded: %s (e.g. %s)",
                           sum(self.excluded.values()), dict(self.excluded),
                           ", ".join(clips.name(i) for i in list(self._left_out)[:3]))
        if not keep:
            raise ValueError("no decodable clips")
        per_shard = len(keep) // num_shards  # the smallest share
        natural = per_shard // batch_size
        if natural == 0:
            raise ValueError(f"{len(keep)} decodable clips of {len(clips)} give {per_shard} per process for "
                             f"{num_shards} process(es): fewer than a batch of {batch_size}")
        self.batch_size = batch_size
        self.shard_id, self.num_shards = shard_id, num_shards
        self.sample_rate, self.num_mel_bins = sample_rate, num_mel_bins
        self.target_frames, self.local_target_frames = target_frames, local_target_frames
        self.mean, self.std = mean, std
        self.fbank = fbank
        self.local_views = local_views
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.keep = list(keep)
        self._seed = int(pipeline_options.pop("seed", 0))
        # the loader deals out the shards itself: each pipeline reads one rank's list, whole
        self._pipeline_args = dict(
            batch_size=batch_size, sample_rate=sample_rate, num_mel_bins=num_mel_bins, target_frames=target_frames,
            local_views=local_views, local_target_frames=local_target_frames, mean=mean, std=std,
            device_id=device_id, fbank=fbank, **pipeline_options)
        self._failed: set[int] = set()  # clips that failed to decode mid-run (in any epoch)
        self._pending: list[int] = []  # clips left out since the last batch, reported with the next
        self._warned: set[int] = set()  # clips whose skip was logged (once per clip)
        self.steps_per_epoch = steps_per_epoch or natural
        if max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, max_steps_per_epoch)
        if self.steps_per_epoch > natural:
            logger.warning("DALI loader: %d steps of %d clips per epoch, but the smallest of the %d shares holds %d "
                           "decodable clips: clips come more than once per epoch (each rank its own)",
                           self.steps_per_epoch, batch_size, num_shards, per_shard)
        self.epoch = 0
        self.pipe = None  # built per epoch by set_epoch (or the first iter())

    def __len__(self) -> int:
        return self.steps_per_epoch

    def close(self) -> None:
        """Release the pipeline (and the DALI index files of a shard source)."""
        self.pipe = None
        self._clips.close()

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Start epoch ``epoch`` after its first ``skip`` samples (a multiple of the batch size).

        Every epoch has a pipeline of its own over an order of the clips seeded by
        ``(seed, epoch)``, so placing the stream costs at most the skipped batches of this epoch,
        never the earlier epochs."""
        if skip % self.batch_size:
            raise ValueError(f"skip of {skip} samples is not a multiple of batch_size={self.batch_size}")
        self.epoch = int(epoch)
        self._plan_epoch()
        self._rebuilds = 0  # pipelines of this epoch rebuilt after a failure
        self._step = 0  # batches drawn in this epoch
        self._start_pipeline()
        while self._step < skip // self.batch_size:
            self._run()
            self._step += 1
        self._pending = []  # failures met while replaying were reported when the stream first passed them

    def _plan_epoch(self) -> None:
        """This rank's clips for the epoch, and the step at which each left-out clip is reported.

        The epoch's order covers every clip; the kept ones are cut into ``num_shards`` contiguous shares
        and a left-out clip belongs to the batch of the kept clip that follows it (the last one at the
        end), so over the ranks each is reported once, in proportion to the clips the epoch reads."""
        kept: list[int] = []
        owner: list[tuple[int, int]] = []  # (left-out clip, position in the kept order of its batch)
        for i in self._clips.order(self._seed, self.epoch):
            if i in self._left_out:
                owner.append((i, len(kept)))
            else:
                kept.append(i)
        bounds = [r * len(kept) // self.num_shards for r in range(self.num_shards + 1)]
        start, stop = bounds[self.shard_id], bounds[self.shard_id + 1]
        self._shard = kept[start:stop]  # this epoch's clips, less those that fail in it
        self._left_out_at: dict[int, list[int]] = {}
        for i, k in owner:
            k = min(k, len(kept) - 1)
            if start <= k < stop:
                self._left_out_at.setdefault((k - start) // self.batch_size, []).append(i)

    def _start_pipeline(self) -> None:
        """A pipeline over this rank's clips from the current position on (after a rebuild: those not
        read yet); when they run out, the reader wraps around them, never into another rank's."""
        self._files = self._shard[self._step * self.batch_size :] or self._shard
        self._pipe_batches = 0  # batches this pipeline has returned
        # the crops' seed is per shard, or every rank would draw the same crop offsets for its i-th clip
        seed = int(np.random.default_rng([self._seed, self.epoch, self._rebuilds, 1, self.shard_id]).integers(2**31))
        self.pipe = None  # release the old pipeline first
        self.pipe = self._clips.build(self._files, seed=seed, **self._pipeline_args)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.pipe is None:
            self.set_epoch(self.epoch)
        while self._step < self.steps_per_epoch:
            outputs = self._run()
            batch = self._batch(outputs, self._step)
            self._step += 1
            yield batch
        self.pipe, self.epoch = None, self.epoch + 1  # a further iter() without set_epoch: the next epoch

    def _run(self):
        """One batch from the pipeline with the clips it holds; a clip DALI fails to decode is left out and
        the pipeline rebuilt."""
        while True:
            try:
                outputs = self.pipe.run()
                first = self._pipe_batches * self.batch_size
                clips = [self._files[p % len(self._files)] for p in range(first, first + self.batch_size)]
                self._pipe_batches += 1
                return outputs, clips
            except RuntimeError as err:
                bad = self._culprit(str(err))
                found = "named in DALI's error"
                if bad is None:  # DALI's error names no file (e.g. "unimplemented format"): find the clip
                    bad, found = self._probe(), "found by decoding the clips one at a time"
                if bad is None:
                    raise RuntimeError(f"DALI pipeline failed on shard {self.shard_id} in epoch {self.epoch + 1}, "
                                       "and no clip it was reading fails alone: " + _first_line(str(err))) from err
                self._shard.remove(bad)
                self._pending.append(bad)
                if bad not in self._failed:
                    self._failed.add(bad)
                    self.excluded["undecodable"] += 1
                self._rebuilds += 1
                logger.warning("DALI loader: %s cannot be decoded (%s; %s); left out of epoch %d, its pipeline "
                               "rebuilt over this rank's remaining clips", self._clips.name(bad),
                               _first_line(str(err)), found, self.epoch + 1)
                if not self._shard:
                    raise ValueError(f"no decodable clips left on shard {self.shard_id}") from err
                self._start_pipeline()

    def _probe(self) -> int | None:
        """The first clip the failed pipeline was reading (its current batch and those it prefetched)
        that fails alone, run through the same stages in a synchronous pipeline of batches of one."""
        ahead = self._pipeline_args.get("prefetch", 2) + 2  # batches the pipeline may have started
        start = self._pipe_batches * self.batch_size
        candidates = list(dict.fromkeys(self._files[p % len(self._files)]
                                        for p in range(start, start + ahead * self.batch_size)))
        args = {**self._pipeline_args, "batch_size": 1, "num_threads": 1}
        probe = self._clips.build(candidates, seed=0, synchronous=True, **args)
        for i in candidates:
            try:
                probe.run()
            except RuntimeError:
                return i
        return None

    def _culprit(self, message: str) -> int | None:
        """The clip of this rank a DALI error message names (the audio decoder says ``Error decoding file <path>``)."""
        match = re.search(r"Error decoding (?:audio )?file (.+?)\.(?: |$)", message, re.MULTILINE)
        if match:
            named = match.group(1)
            for i in self._shard:
                if self._clips.source(i) == named:
                    return i
        named_in = [i for i in self._shard if self._clips.source(i) in message]
        return max(named_in, key=lambda i: len(self._clips.source(i))) if named_in else None

    def _tensor(self, tensor_list) -> torch.Tensor:
        if self.device.type == "cpu":
            return torch.from_numpy(np.array(tensor_list.as_tensor()))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out

    def _views(self, data: torch.Tensor, frames: int) -> torch.Tensor:
        """Pipeline output ``(B, V, ...)`` → normalised fbanks ``(B, V, 1, T, F)``."""
        if self.fbank == "dali":
            return data.unsqueeze(2)
        return fbank_views(data, self.sample_rate, self.num_mel_bins, frames, self.mean, self.std)

    def _batch(self, run: tuple[Any, list[int]], step: int) -> dict[str, Any]:
        """A batch in :func:`~asit.data.dataset.collate_pretrain`'s layout from the pipeline's outputs.

        Clips whose decoded samples :func:`~asit.data.audio.load_audio` would refuse (NaN/Inf:
        ``"non-finite"``, beyond ±``MAX_ABS_SAMPLE``: ``"out-of-range"``) are dropped and reported in
        ``skip_reasons``/``skipped_indices``, like the torch backend's collate does (and, from shards,
        clips whose ``json`` member does not parse: ``"bad-metadata"``). On the CPU the views
        themselves are checked as well (the torch backend's last guard); on a GPU that check would wait
        for the queued training step, and finite samples within the range give finite views anyway.
        """
        outputs, clips = run
        index, labels, reasons = self._clips.rows(outputs[0], clips)  # [B], [B, K], {row: (reason, detail)}
        stats = np.array(outputs[1].as_tensor()).reshape(-1, 4)  # [B, 4]: min, max, sum, samples
        rows = {"views": self._tensor(outputs[2])}
        if self.local_views > 0:
            rows["local_views"] = self._tensor(outputs[3])
        for row, clip_stats in enumerate(stats):
            if row not in reasons:
                why = clip_check(*clip_stats)
                if why is not None:
                    reasons[row] = why
        dropped = {}  # clip -> (reason, detail)
        if reasons:  # rows picked by a host index: no wait for the device
            keep = torch.tensor([r for r in range(len(index)) if r not in reasons], dtype=torch.int64)
            dropped = {clips[row]: why for row, why in reasons.items()}
            rows = {k: v[keep.to(v.device)] for k, v in rows.items()}
            index, labels, clips = index[keep], labels[keep], [clips[r] for r in keep.tolist()]
        views = {"views": self._views(rows["views"], self.target_frames)}
        if self.local_views > 0:
            views["local_views"] = self._views(rows["local_views"], self.local_target_frames)
        if self.device.type == "cpu":  # a sum is NaN/Inf when any element is (see ClipViews.make_sample)
            finite = torch.ones(len(index), dtype=torch.bool)
            for v in views.values():
                finite &= torch.isfinite(v.flatten(1).sum(1))
            if not finite.all():
                dropped.update({clips[r]: ("non-finite", "non-finite fbank") for r in (~finite).nonzero().flatten()})
                views = {k: v[finite] for k, v in views.items()}
                index, labels = index[finite], labels[finite]
        for clip, (reason, detail) in dropped.items():
            if clip not in self._warned:
                self._warned.add(clip)
                logger.warning("DALI loader: skipping clip %d: %s", self._clips.index(clip),
                               AudioDecodeError(self._clips.name(clip), reason, detail))
        skipped = [(i, self._left_out[i]) for i in self._left_out_at.get(step, [])]
        skipped += [(i, "undecodable") for i in self._pending] + [(i, r) for i, (r, _) in dropped.items()]
        self._pending = []
        return {
            **views,
            # on the host, like the torch loader's: copying it to the GPU here (pageable memory) would wait
            # for the GPU queue before every step; pretraining does not use it
            "label": labels,
            "index": index,
            "num_skipped": len(skipped),
            "skip_reasons": [r for _, r in skipped],
            "skipped_indices": [self._clips.index(i) for i, _ in skipped],
        }


def _first_line(message: str) -> str:
    """The line of a DALI error that says what failed (DALI wraps it in several lines of context)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for k, line in enumerate(lines):
        if "Error decoding" in line:
            return line[:300]
        if line == "encountered:" and k + 1 < len(lines):  # what the failing operator reported
            return lines[k + 1][:300]
    return lines[-1][:300] if lines else "no message"
