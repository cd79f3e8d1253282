"""A frozen ASiT encoder for downstream use: waveforms in, clip and frame embeddings out.

:func:`load_encoder` reads the ``teacher_encoder.safetensors`` that
:meth:`asit.train.Pretrainer.export_teacher_encoder` writes (timm parameter names plus metadata:
architecture, input size, sample rate, fbank statistics) and rebuilds the backbone with
:func:`asit.models.build_backbone`. :class:`AudioEncoder` then turns audio of any length into

* **clip embeddings** ``[B, D]``: the mean over windows of the [CLS] token (``pool="cls"``, the
  default: [CLS] is what the global self-distillation loss trains), or the mean of the frame
  embeddings (``pool="tokens"``);
* **frame embeddings** ``[B, N, D]``: one vector per time patch (16 fbank frames = 160 ms), the
  data tokens averaged over the frequency patches, with the time of each patch centre.

The input pipeline is exactly the pretraining one (docs/design.md §1): mean removal, Kaldi fbank,
``(fbank - mean) / (2 * std)``. A clip shorter than one window (``target_frames`` frames) is
zero-padded *as a waveform* before the fbank, as pretraining pads short crops (the padded frames
hit Kaldi's log floor). A longer clip is cut into windows every ``hop_frames`` frames, and the last
window is moved back to end at the clip's end, so every window is real audio (it overlaps the one
before); see :meth:`AudioEncoder.embed` for how the frame embeddings of the overlap are combined.

The file format itself (writing, metadata, rebuilding the architecture) is :mod:`asit.encoder.format`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio.functional as AF
from timm.models.vision_transformer import VisionTransformer

from asit.data import kaldi_fbank, normalize_fbank
from asit.models import build_backbone, encode

from .format import ENCODER_FORMAT, EncoderError, backbone_spec, read_encoder_metadata

__all__ = ["FRAME_LENGTH_S", "FRAME_SHIFT_S", "AudioEncoder", "EncoderOutput", "load_encoder"]

# Kaldi fbank framing used everywhere in asit (asit.data.features): 25 ms windows every 10 ms.
FRAME_SHIFT_S = 0.010
FRAME_LENGTH_S = 0.025

Pool = Literal["cls", "tokens"]


@dataclass
class EncoderOutput:
    """Embeddings of a batch of clips.

    Attributes:
        clip: ``[B, D]`` one vector per clip.
        frames: ``[B, N, D]`` one vector per time patch; ``N`` is the largest count in the batch,
            rows past ``num_frames[b]`` are zeros.
        timestamps_s: ``[N]`` centre of each time patch in seconds (the same for every clip).
        num_frames: ``[B]`` number of valid time patches of each clip.
    """

    clip: torch.Tensor
    frames: torch.Tensor
    timestamps_s: torch.Tensor
    num_frames: torch.Tensor


def load_encoder(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    random_init: bool = False,
    seed: int = 0,
    hop_frames: int | None = None,
    pool: Pool = "cls",
    batch_size: int = 32,
) -> AudioEncoder:
    """Load an exported ASiT encoder (``teacher_encoder.safetensors``).

    Args:
        path: file written by :func:`export_encoder` (``Pretrainer.export_teacher_encoder``,
            ``scripts/import_authors.py``).
        device: where the model runs.
        random_init: build the same architecture with random weights (seeded by ``seed``)
            instead of loading the stored ones: the baseline for probing experiments.
        hop_frames, pool, batch_size: see :class:`AudioEncoder`.

    Raises:
        EncoderError: the file is missing, is not an asit encoder, or its tensors do not match.
    """
    from safetensors.torch import load_file

    name = os.fspath(path)
    meta = read_encoder_metadata(name)
    fmt = meta.get("format")
    if fmt != ENCODER_FORMAT:
        raise EncoderError(f"{name}: format {fmt!r} is not {ENCODER_FORMAT!r} (not an asit encoder export)")
    state = load_file(name, device="cpu")
    try:
        spec = backbone_spec(state, meta)
        if int(meta["patch_size"]) != spec["patch_size"]:
            raise EncoderError(f"metadata patch_size {meta['patch_size']} != tensors' {spec['patch_size']}")
        sample_rate, num_mel_bins = int(meta["sample_rate"]), int(meta["num_mel_bins"])
        mean, std = float(meta["mean"]), float(meta["std"])
    except (KeyError, ValueError) as exc:
        raise EncoderError(f"{name}: bad or missing metadata: {exc}") from exc
    if spec["img_size"][1] != num_mel_bins:
        raise EncoderError(f"{name}: img_size {spec['img_size']} disagrees with num_mel_bins={num_mel_bins}")

    if random_init:
        torch.manual_seed(seed)
    backbone = build_backbone(**spec)
    if not random_init:
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise EncoderError(f"{name}: tensors do not match the architecture {spec}: {exc}") from exc
    encoder = AudioEncoder(
        backbone,
        sample_rate=sample_rate,
        num_mel_bins=num_mel_bins,
        mean=mean,
        std=std,
        hop_frames=hop_frames,
        pool=pool,
        batch_size=batch_size,
    )
    encoder.metadata = meta
    return encoder.to(device)


class AudioEncoder(nn.Module):
    """A frozen ViT backbone plus the fbank front end it was pretrained with.

    Args:
        backbone: timm ``VisionTransformer`` from :func:`asit.models.build_backbone`; its
            ``img_size`` is ``(target_frames, num_mel_bins)``.
        sample_rate: the rate the model was pretrained at; :meth:`embed` resamples to it.
        mean, std: fbank normalisation statistics used in pretraining.
        hop_frames: distance between windows in fbank frames; default ``target_frames``
            (non-overlapping). Must be a multiple of the patch size so that the time patches
            of overlapping windows line up (their embeddings are then averaged). Whatever the
            hop, the last window of a long clip ends at the clip's end (:meth:`window_starts`).
        pool: clip embedding: ``"cls"`` (mean over windows of [CLS]) or ``"tokens"`` (mean of
            the frame embeddings, padding excluded).
        batch_size: windows per forward pass.
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        *,
        sample_rate: int,
        num_mel_bins: int,
        mean: float,
        std: float,
        hop_frames: int | None = None,
        pool: Pool = "cls",
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        ph, pw = (int(s) for s in backbone.patch_embed.patch_size)
        frames, mels = (int(s) for s in backbone.patch_embed.img_size)
        if mels != num_mel_bins:
            raise ValueError(f"backbone img_size {frames}x{mels} does not match num_mel_bins={num_mel_bins}")
        if ph != pw:
            raise ValueError(f"non-square patches {ph}x{pw} are not supported")
        if pool not in ("cls", "tokens"):
            raise ValueError(f"pool must be 'cls' or 'tokens', got {pool!r}")
        self.sample_rate = int(sample_rate)
        self.num_mel_bins = int(num_mel_bins)
        self.target_frames = frames
        self.patch_size = ph
        self.embed_dim = int(backbone.embed_dim)
        self.mean, self.std = float(mean), float(std)
        self.hop_frames = int(hop_frames) if hop_frames is not None else frames
        if self.hop_frames <= 0 or self.hop_frames % ph != 0 or self.hop_frames > frames:
            raise ValueError(
                f"hop_frames must be a positive multiple of patch_size={ph} and at most "
                f"target_frames={frames}, got {self.hop_frames}"
            )
        self.pool: Pool = pool
        self.batch_size = int(batch_size)
        self.metadata: dict[str, str] = {}

    @property
    def device(self) -> torch.device:
        return self.backbone.cls_token.device

    def train(self, mode: bool = True) -> AudioEncoder:
        return super().train(False)  # always frozen: no dropout / drop path

    # ------------------------------------------------------------------ front end
    def num_fbank_frames(self, num_samples: int) -> int:
        """Fbank frames Kaldi produces for ``num_samples`` samples (at least one: short input is padded)."""
        shift = int(self.sample_rate * FRAME_SHIFT_S)
        length = int(self.sample_rate * FRAME_LENGTH_S)
        return 1 + max(num_samples - length, 0) // shift

    def num_samples_for_frames(self, frames: int) -> int:
        """Fewest samples that give ``frames`` fbank frames (pretraining's crop length for ``target_frames``)."""
        return int(self.sample_rate * FRAME_LENGTH_S) + (frames - 1) * int(self.sample_rate * FRAME_SHIFT_S)

    def features(self, waves: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Normalised log-mel features, exactly as in pretraining.

        Args:
            waves: ``[B, T]`` (or ``[T]``) waveforms at :attr:`sample_rate`.
            num_frames: output length in frames: longer input is cut, shorter input is zero-padded
                as a waveform first, like pretraining pads short clips; default: every frame of the
                input (:meth:`num_fbank_frames`).

        Returns:
            ``[B, 1, frames, F]`` float32.
        """
        if waves.dim() == 1:
            waves = waves.unsqueeze(0)
        if waves.dim() != 2:
            raise ValueError(f"waves must be [B, T] or [T], got shape {tuple(waves.shape)}")
        frames = num_frames if num_frames is not None else self.num_fbank_frames(waves.shape[-1])
        out = [self._fbank(w, frames) for w in waves]
        return torch.stack(out).unsqueeze(1)  # [B, 1, frames, F]

    def _fbank(self, wave: torch.Tensor, frames: int) -> torch.Tensor:
        """``[frames, F]`` normalised fbank of ``wave``, zero-padded in the waveform domain when short.

        Pretraining pads a short clip with zero samples, so its padded frames hit Kaldi's log floor
        (``log(eps)``); padding the fbank itself with zeros would give the model values it never saw.
        """
        need = self.num_samples_for_frames(frames)
        if wave.numel() < need:
            wave = F.pad(wave, (0, need - wave.numel()))
        fbank = kaldi_fbank(wave, self.sample_rate, self.num_mel_bins, frames)  # [frames, F]
        return normalize_fbank(fbank, self.mean, self.std)

    def window_starts(self, num_frames: int) -> list[int]:
        """Start frames of the windows that cover a clip of ``num_frames`` fbank frames.

        One window (padded) for a clip up to ``target_frames`` frames; otherwise windows every
        :attr:`hop_frames` frames while they fit in the clip, then, unless the last of them
        already ends at the clip's end, one more window ending exactly there (overlapping its
        predecessor, not aligned to the patch grid). Every window is then real audio.
        """
        window, hop = self.target_frames, self.hop_frames
        if num_frames <= window:
            return [0]
        starts = list(range(0, num_frames - window + 1, hop))
        if starts[-1] + window < num_frames:
            starts.append(num_frames - window)
        return starts

    def timestamps(self, num_patches: int) -> torch.Tensor:
        """Centre, in seconds, of each time patch: the mean of its frames' window centres.

        Fbank frame ``i`` covers ``[i·10 ms, i·10 ms + 25 ms)``, so patch ``j`` (frames
        ``16j … 16j+15``) is centred at ``(16j + 7.5) · 10 ms + 12.5 ms``.
        """
        j = torch.arange(num_patches, dtype=torch.float64)
        centre = (j * self.patch_size + (self.patch_size - 1) / 2) * FRAME_SHIFT_S + FRAME_LENGTH_S / 2
        return centre.to(torch.float32)

    # ------------------------------------------------------------------ model
    def forward_windows(self, x: torch.Tensor) -> torch.Tensor:
        """Run the ViT on ``[W, 1, target_frames, F]`` windows → tokens ``[W, 1 + gh·gw, D]``."""
        return encode(self.backbone, x)

    def _windows(self, wave: torch.Tensor) -> tuple[torch.Tensor, list[int], int]:
        """Windows ``[W, 1, target_frames, F]`` of one clip, their start frames and the clip's frame count."""
        frames = self.num_fbank_frames(wave.numel())
        starts = self.window_starts(frames)
        fbank = self._fbank(wave, max(frames, self.target_frames))  # [max(L, window), F]
        windows = torch.stack([fbank[s : s + self.target_frames] for s in starts]).unsqueeze(1)
        return windows, starts, frames

    @torch.inference_mode()
    def embed(
        self,
        waves: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
        sample_rate: int,
        *,
        pool: Pool | None = None,
    ) -> EncoderOutput:
        """Embed a batch of clips of any length.

        Windows are placed by :meth:`window_starts`. Frame embeddings live on the clip's patch grid
        (patch ``j`` = fbank frames ``16j … 16j+15``; ``ceil(frames / 16)`` of them, the last one
        possibly partial): a patch seen by several grid-aligned windows (``hop_frames`` <
        ``target_frames``) gets their mean; a patch past the aligned windows, covered only by the
        final window that ends at the clip's end, takes that window's patch nearest in time (at
        most half a patch, 80 ms, away, except for a final patch holding under half a patch of
        audio, which takes the clip's last 16 frames). They are real model outputs, never
        interpolated. ``pool="cls"`` averages [CLS] over the windows, ``pool="tokens"`` the frame
        embeddings.

        Args:
            waves: torch tensors or NumPy float arrays: a single clip ``[T]``; a ``[B, T]`` batch of
                mono clips; or a list of clips of any lengths, each ``[T]`` or multichannel ``[C, T]``
                (channels averaged, as :func:`asit.data.load_audio` down-mixes files). A 2-D array is
                always a batch of mono clips, never one stereo clip: pass a stereo clip as ``[x]``.
                Anything else raises ``ValueError``/``TypeError`` listing these shapes.
            sample_rate: their sample rate; resampled to :attr:`sample_rate` when different.
            pool: overrides the encoder's clip pooling (``"cls"`` or ``"tokens"``).

        Returns:
            :class:`EncoderOutput` on the encoder's device, float32.
        """
        pool = pool or self.pool
        if pool not in ("cls", "tokens"):
            raise ValueError(f"pool must be 'cls' or 'tokens', got {pool!r}")
        clips = _as_list(waves)
        if not clips:
            raise ValueError("waves is empty: need at least one clip")
        device, p = self.device, self.patch_size
        grid_t = self.target_frames // p

        all_windows, owners, starts = [], [], []
        valid_patches = []
        for b, wave in enumerate(clips):
            wave = wave.to(device=device, dtype=torch.float32)
            if sample_rate != self.sample_rate:
                wave = AF.resample(wave, orig_freq=int(sample_rate), new_freq=self.sample_rate)
            windows, wstarts, frames = self._windows(wave)
            all_windows.append(windows)
            owners += [b] * len(wstarts)
            starts += wstarts
            valid_patches.append(math.ceil(frames / p))
        windows = torch.cat(all_windows)  # [W, 1, target_frames, F]

        tokens = torch.cat(
            [
                self.forward_windows(windows[i : i + self.batch_size])
                for i in range(0, windows.shape[0], self.batch_size)
            ]
        )  # [W, 1 + N, D]
        W, D = tokens.shape[0], tokens.shape[-1]
        cls = tokens[:, 0]  # [W, D]
        per_time = tokens[:, 1:].reshape(W, grid_t, -1, D).mean(2)  # [W, gh, D]: mean over frequency

        B = len(clips)
        n_max = max(max(valid_patches), grid_t)  # a short clip's single window spans grid_t patches
        frame_sum = tokens.new_zeros(B, n_max, D)
        frame_cnt = tokens.new_zeros(B, n_max, 1)
        cls_sum, win_cnt = tokens.new_zeros(B, D), tokens.new_zeros(B, 1)
        tail = []  # windows ending at their clip's end, off the patch grid
        for w, (b, s) in enumerate(zip(owners, starts)):
            cls_sum[b] += cls[w]
            win_cnt[b] += 1
            if s % p:
                tail.append((w, b, s))
                continue
            j = s // p
            frame_sum[b, j : j + grid_t] += per_time[w]
            frame_cnt[b, j : j + grid_t] += 1
        for w, b, s in tail:  # the patches no aligned window reached: the nearest patch of this window
            first = int((frame_cnt[b, :, 0] > 0).sum())  # aligned windows cover patches [0, first)
            for j in range(first, valid_patches[b]):
                k = min(max((j * p - s + p // 2) // p, 0), grid_t - 1)
                frame_sum[b, j] = per_time[w, k]
                frame_cnt[b, j] = 1
        n_max = max(valid_patches)
        frames_out = (frame_sum / frame_cnt.clamp_min(1))[:, :n_max]  # [B, N, D]
        num_frames = torch.tensor(valid_patches, device=device)
        valid = (torch.arange(n_max, device=device)[None] < num_frames[:, None]).unsqueeze(-1)  # [B, N, 1]
        frames_out = frames_out * valid
        if pool == "cls":
            clip = cls_sum / win_cnt
        else:
            clip = frames_out.sum(1) / num_frames[:, None]
        return EncoderOutput(
            clip=clip,
            frames=frames_out,
            timestamps_s=self.timestamps(n_max).to(device),
            num_frames=num_frames,
        )


_ACCEPTED = (
    "a 1-D clip [T], a [B, T] batch of mono clips, or a list of clips of any lengths, each [T] or "
    "multichannel [C, T] (torch tensors or NumPy float arrays)"
)


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _as_tensor(x: object, what: str) -> torch.Tensor:
    """``x`` (tensor or NumPy array) as a floating tensor; anything else is refused naming ``what``."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        raise TypeError(f"{what} is a {type(x).__name__}; embed takes {_ACCEPTED}")
    if not t.is_floating_point():
        hint = " (convert PCM first, e.g. x / 32768 for 16-bit)" if t.dtype in _INT_DTYPES else ""
        raise TypeError(f"{what} has dtype {t.dtype}; embed takes float samples in [-1, 1]{hint}")
    return t


def _downmix(clip: torch.Tensor) -> torch.Tensor:
    """``[C, T]`` → ``[T]``: the mean of the channels, the rule :func:`asit.data.load_audio` applies to files."""
    return clip[0] if clip.shape[0] == 1 else clip.float().mean(dim=0)


def _as_list(waves: object) -> list[torch.Tensor]:
    """The clips of ``waves`` as 1-D tensors.

    A 2-D array is a ``[B, T]`` batch of mono clips; a 2-D *element of a list* is one clip ``[C, T]``
    whose channels are averaged. Shapes that can only be soundfile's ``[T, C]`` layout (more
    channels than samples) are refused with a hint to transpose.
    """
    if isinstance(waves, (torch.Tensor, np.ndarray)):
        t = _as_tensor(waves, "waves")
        if t.dim() == 1:
            return [t]
        if t.dim() == 2:
            if t.shape[1] <= 8 < t.shape[0]:
                raise ValueError(
                    f"waves has shape {tuple(t.shape)}: a 2-D array is a [B, T] batch of mono clips, and "
                    f"clips of {t.shape[1]} samples look like soundfile's [T, C] layout; pass a stereo clip "
                    f"as a list element [C, T] (e.g. [x.T]) or down-mix it (x.mean(1)); embed takes {_ACCEPTED}")
            return list(t)
        raise ValueError(f"waves has shape {tuple(t.shape)}; embed takes {_ACCEPTED}")
    if isinstance(waves, (str, bytes)) or not isinstance(waves, Sequence):
        raise TypeError(f"waves is a {type(waves).__name__}; embed takes {_ACCEPTED}")
    out = []
    for i, w in enumerate(waves):
        t = _as_tensor(w, f"waves[{i}]")
        if t.dim() == 2:
            if t.shape[0] > t.shape[1]:
                raise ValueError(
                    f"waves[{i}] has shape {tuple(t.shape)}: a 2-D clip is [C, T] (channels first) and this "
                    f"one has more channels than samples; transpose soundfile's [T, C] layout (x.T); "
                    f"embed takes {_ACCEPTED}")
            t = _downmix(t)
        if t.dim() != 1:
            raise ValueError(f"waves[{i}] has shape {tuple(t.shape)}; embed takes {_ACCEPTED}")
        out.append(t)
    return out
