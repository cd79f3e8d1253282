"""The pretraining dataset: several random views of each clip, as normalised fbanks."""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from .audio import AudioDecodeError, load_audio
from .fbank import AUDIOSET_MEAN, AUDIOSET_STD, batched_kaldi_fbank
from .manifest import AudioEntry
from .transforms import pad_or_crop_random, random_roll

__all__ = ["ClipViews", "PretrainDataset", "collate_pretrain", "item_generator"]

logger = logging.getLogger(__name__)


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, epoch, index)``.

    Each item gets its own stream, so its views do not depend on the number of workers or
    the order in which items are fetched.
    """
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    value = (int(state[0]) << 31) ^ int(state[1])  # 63 bits: always a valid torch seed
    return torch.Generator().manual_seed(value)


class ClipViews:
    """The per-clip part of the pretraining input: a decoded waveform → a sample dict of views.

    Shared by the map-style :class:`PretrainDataset` and the sharded
    :class:`~asit.data.shards.ShardPretrainDataset`, so both give identical views for the same
    ``(seed, epoch, index)``. With probability ``roll_prob`` the whole clip is first rolled
    circularly once (``roll_mode="clip"``, the authors' way; ``"view"`` rolls each global crop
    separately instead). Each global view is then an independent random crop of ``crop_seconds``
    (zero-padded if the clip is shorter), turned into the Kaldi fbank
    (:func:`~asit.data.fbank.batched_kaldi_fbank`, all views of a clip in one call) cut or padded to
    ``target_frames`` and normalised with ``mean``/``std``. Local views are random crops of
    ``local_crop_seconds`` cut or padded to ``local_target_frames``, taken from the clip after it is
    zero-padded to ``crop_seconds`` (``local_crop_from="padded"``, as the authors' v2) or from the
    clip as it is (``"clip"``).

    With ``fbank_on="device"`` the sample holds the waveform crops instead (``"waves"`` ``(V, L)``
    and ``"local_waves"``), the same crops from the same generator draws, and the consumer turns a
    batch of them into views with :func:`~asit.data.fbank.fbank_views` (the trainer does, on the GPU).
    """

    def __init__(
        self,
        *,
        sample_rate: int = 32000,
        crop_seconds: float = 6.0,
        num_views: int = 2,
        local_views: int = 0,
        local_crop_seconds: float = 2.0,
        num_mel_bins: int = 128,
        target_frames: int = 592,
        local_target_frames: int = 192,
        mean: float = AUDIOSET_MEAN,
        std: float = AUDIOSET_STD,
        roll_prob: float = 0.5,
        roll_mode: Literal["clip", "view"] = "clip",
        local_crop_from: Literal["padded", "clip"] = "padded",
        seed: int = 0,
        label_vocab: list[str] | None = None,
        fbank_on: Literal["loader", "device"] = "loader",
    ) -> None:
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        if local_views < 0:
            raise ValueError(f"local_views must be >= 0, got {local_views}")
        if crop_seconds <= 0 or (local_views > 0 and local_crop_seconds <= 0):
            raise ValueError(f"crop lengths must be positive, got {crop_seconds}, {local_crop_seconds}")
        if not 0.0 <= roll_prob <= 1.0:
            raise ValueError(f"roll_prob must be in [0, 1], got {roll_prob}")
        if std <= 0:
            raise ValueError(f"std must be positive, got {std}")
        if fbank_on not in ("loader", "device"):
            raise ValueError(f"fbank_on must be 'loader' or 'device', got {fbank_on!r}")
        if roll_mode not in ("clip", "view"):
            raise ValueError(f"roll_mode must be 'clip' or 'view', got {roll_mode!r}")
        if local_crop_from not in ("padded", "clip"):
            raise ValueError(f"local_crop_from must be 'padded' or 'clip', got {local_crop_from!r}")
        self.roll_mode = roll_mode
        self.local_crop_from = local_crop_from
        self.fbank_on = fbank_on
        self.sample_rate = sample_rate
        self.crop_samples = round(crop_seconds * sample_rate)
        self.local_crop_samples = round(local_crop_seconds * sample_rate)
        self.num_views = num_views
        self.local_views = local_views
        self.num_mel_bins = num_mel_bins
        self.target_frames = target_frames
        self.local_target_frames = local_target_frames
        self.mean = mean
        self.std = std
        self.roll_prob = roll_prob
        self.seed = seed
        self.epoch = 0
        self.label_vocab = list(label_vocab) if label_vocab is not None else []
        self._label_position = {label: i for i, label in enumerate(self.label_vocab)}
        self._warned: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops are produced."""
        self.epoch = int(epoch)

    def label_vector(self, rows: list[int]) -> torch.Tensor:
        """Multi-hot float32 ``(len(label_vocab),)`` with ones at ``rows``."""
        label = torch.zeros(len(self.label_vocab), dtype=torch.float32)
        label[rows] = 1.0
        return label

    def _views(self, wave: torch.Tensor, count: int, length: int, frames: int, roll: float,
               g: torch.Generator) -> torch.Tensor:
        """``count`` random crops → normalised fbanks ``(count, 1, frames, F)``, one batched fbank call
        (with ``fbank_on="device"``: the crops ``(count, length)``)."""
        crops = []
        for _ in range(count):  # crop then roll, view after view: the generator's draw order
            crop = pad_or_crop_random(wave, length, g)
            crops.append(random_roll(crop, roll, g) if roll > 0 else crop)
        waves = torch.stack(crops)  # [V, length]
        if self.fbank_on == "device":
            return waves
        views = batched_kaldi_fbank(waves, self.sample_rate, self.num_mel_bins, frames,
                                    normalize=(self.mean, self.std))  # [V, T, F]
        return views.unsqueeze(1)

    def make_sample(self, wave: torch.Tensor | AudioDecodeError, index: int, label: torch.Tensor,
                    path: str) -> dict[str, Any]:
        """The sample dict of clip ``index`` from its decoded ``wave`` ``(T,)`` (or its decode error).

        Randomness comes from :func:`item_generator` with ``(seed, epoch, index)``.
        """
        sample: dict[str, Any] = {"label": label, "index": index, "ok": True, "error": ""}
        if isinstance(wave, AudioDecodeError):
            return self._skip(sample, index, wave)
        g = item_generator(self.seed, self.epoch, index)
        key, local_key = self._keys()
        view_roll = self.roll_prob
        if self.roll_mode == "clip":
            view_roll = 0.0
            if self.roll_prob > 0:
                wave = random_roll(wave, self.roll_prob, g)  # once, before any view is cut from it
        # [V, 1, T, F] views (or [V, L] crops)
        sample[key] = self._views(wave, self.num_views, self.crop_samples, self.target_frames, view_roll, g)
        if self.local_views > 0:
            if self.local_crop_from == "padded" and wave.shape[0] < self.crop_samples:
                wave = torch.nn.functional.pad(wave, (0, self.crop_samples - wave.shape[0]))
            sample[local_key] = self._views(
                wave, self.local_views, self.local_crop_samples, self.local_target_frames, 0.0, g
            )  # [L, 1, T_local, F] (or [L, L_local])
        # load_audio rules out NaN/Inf and overflowing samples; this guard keeps any other
        # surprise from ever reaching a batch. A sum is NaN/Inf when any element is (log-mel values
        # are far too small for a finite sum to overflow, and so are samples in [-1, 1]), and costs
        # one pass without a bool copy. (The fbank of finite crops is finite: its log has a floor.)
        if not all(torch.isfinite(sample[k].sum()) for k in (key, local_key) if k in sample):
            return self._skip(sample, index, AudioDecodeError(path, "non-finite", "non-finite fbank"))
        return sample

    def _skip(self, sample: dict[str, Any], index: int, err: AudioDecodeError) -> dict[str, Any]:
        """Turn ``sample`` into a placeholder (zeros, ``ok=False``) and warn once per file."""
        if err.path not in self._warned:
            self._warned.add(err.path)
            logger.warning("skipping clip %d: %s", index, err)
        sample.update(ok=False, error=err.reason)
        for key, shape in self.sample_shapes().items():
            sample[key] = torch.zeros(shape)
        return sample

    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each view entry of a sample (``views``/``local_views``, or the crops
        ``waves``/``local_waves`` with ``fbank_on="device"``)."""
        key, local_key = self._keys()
        if self.fbank_on == "device":
            shapes = {key: (self.num_views, self.crop_samples)}
            local = (self.local_views, self.local_crop_samples)
        else:
            shapes = {key: (self.num_views, 1, self.target_frames, self.num_mel_bins)}
            local = (self.local_views, 1, self.local_target_frames, self.num_mel_bins)
        if self.local_views > 0:
            shapes[local_key] = local
        return shapes

    def _keys(self) -> tuple[str, str]:
        """The sample keys of the global and local views: fbanks, or crops with ``fbank_on="device"``."""
        return ("waves", "local_waves") if self.fbank_on == "device" else ("views", "local_views")


class PretrainDataset(ClipViews, Dataset):
    """Clips turned into ``num_views`` global (and optionally ``local_views`` local) fbank views.

    The views are made by :class:`ClipViews` (see there for crops, roll, fbank, normalisation).

    A sample is a dict:

    * ``"views"``: float32 ``(V, 1, T, F)``;
    * ``"local_views"``: float32 ``(L, 1, T_local, F)``, only when ``local_views > 0``;
    * ``"label"``: float32 multi-hot ``(len(label_vocab),)`` (empty without a vocabulary);
    * ``"index"``: the item's index; ``"ok"``: whether it decoded;
      ``"error"``: ``""`` or the failure reason (e.g. ``"unreadable"``).

    A clip that fails to decode is not raised: its sample has zero tensors, ``ok=False`` and
    the reason, and a warning is logged once per file (per worker process).
    :func:`collate_pretrain` drops such samples and reports them.

    Randomness comes from :func:`item_generator` with ``(seed, epoch, index)``; call
    :meth:`set_epoch` before each epoch. With ``persistent_workers=True`` the workers hold
    their own copy of the dataset, so the epoch must reach them another way.
    """

    def __init__(self, entries: list[AudioEntry], **options: Any) -> None:
        if not entries:
            raise ValueError("entries is empty: the dataset needs at least one clip")
        super().__init__(**options)
        self.entries = list(entries)
        self._label_rows = self._label_indices()

    def _label_indices(self) -> list[list[int]]:
        rows, unknown = [], set()
        for entry in self.entries:
            row = []
            for label in entry.labels:
                if label in self._label_position:
                    row.append(self._label_position[label])
                elif self.label_vocab:
                    unknown.add(label)
            rows.append(row)
        if unknown:
            logger.warning(
                "%d labels are not in label_vocab and are ignored: %s", len(unknown), sorted(unknown)[:10]
            )
        return rows

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.entries):
            raise IndexError(f"index {index} out of range for {len(self.entries)} clips")
        entry = self.entries[index]
        try:
            wave: torch.Tensor | AudioDecodeError = load_audio(entry.path, self.sample_rate)
        except AudioDecodeError as err:
            wave = err
        return self.make_sample(wave, index, self.label_vector(self._label_rows[index]), entry.path)


def collate_pretrain(samples: list[dict[str, Any]], out: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Stack the decodable samples of a batch; drop and report the others.

    Returns a dict with ``"views"`` ``(B, V, 1, T, F)``, ``"local_views"``
    ``(B, L, 1, T_local, F)`` when present (or the crops ``"waves"`` ``(B, V, L)`` and
    ``"local_waves"`` from a dataset with ``fbank_on="device"``), ``"label"`` ``(B, K)``, ``"index"`` (int64 ``(B,)``),
    ``"num_skipped"`` (int), ``"skip_reasons"`` (list of reason strings) and
    ``"skipped_indices"`` (list of dataset indices). ``B`` may be 0 if every sample failed;
    the caller must then skip the step.

    ``out`` optionally maps keys to preallocated tensors of at least ``len(samples)`` rows (the
    :class:`~asit.data.ring.BatchRing` slots of a loader worker): an entry whose rows fit is stacked
    into ``out[key][:B]`` and returned as that view.
    """
    if not samples:
        raise ValueError("collate_pretrain got an empty list of samples")
    good = [s for s in samples if s["ok"]]
    bad = [s for s in samples if not s["ok"]]

    def stack(key: str) -> torch.Tensor:
        if not good:
            return samples[0][key].new_zeros((0, *samples[0][key].shape))
        first = good[0][key]
        dest = None if out is None else out.get(key)
        if dest is not None and dest.shape[1:] == first.shape and dest.dtype == first.dtype and len(good) <= len(dest):
            return torch.stack([s[key] for s in good], out=dest[: len(good)])
        return torch.stack([s[key] for s in good])

    key = "waves" if "waves" in samples[0] else "views"
    batch: dict[str, Any] = {
        key: stack(key),
        "label": stack("label"),
        "index": torch.tensor([s["index"] for s in good], dtype=torch.int64),
        "num_skipped": len(bad),
        "skip_reasons": [s["error"] for s in bad],
        "skipped_indices": [s["index"] for s in bad],
    }
    for local_key in ("local_views", "local_waves"):
        if local_key in samples[0]:
            batch[local_key] = stack(local_key)
    return batch
