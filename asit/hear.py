"""The HEAR 2021 benchmark API (https://hearbenchmark.com) for an exported ASiT encoder.

    import asit.hear as hear
    model = hear.load_model("runs/x/teacher_encoder.safetensors")
    scene = hear.get_scene_embeddings(audio, model)            # [n_sounds, D]
    emb, ts = hear.get_timestamp_embeddings(audio, model)      # [n_sounds, T, D], [n_sounds, T] ms

``audio`` is ``[n_sounds, n_samples]`` at ``model.sample_rate``. Scene embeddings are the mean
[CLS] over windows (the last window of a long clip ends at the clip's end: all windows are real
audio); timestamp embeddings are the data tokens averaged over frequency, one per time patch (16
fbank frames = 160 ms) of the clip, stamped at the patch centre (patches only the final window
reaches take its nearest patch: :meth:`asit.encoder.AudioEncoder.embed`). HEAR recommends a hop of at most
50 ms, so by default (``timestamp_hop_ms=40``) the clip is also embedded advanced by 40, 80 and
120 ms and the four patch grids are interleaved: a 40 ms hop of real model outputs (not
interpolated) for four forward passes. ``timestamp_hop_ms=160`` gives the native grid alone.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from asit.encoder import FRAME_SHIFT_S, AudioEncoder, load_encoder

__all__ = ["HearModel", "get_scene_embeddings", "get_timestamp_embeddings", "load_model"]

ENV_VAR = "ASIT_HEAR_ENCODER"


class HearModel(nn.Module):
    """An :class:`AudioEncoder` with the attributes HEAR requires."""

    def __init__(self, encoder: AudioEncoder, timestamp_hop_ms: float = 40.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.sample_rate = encoder.sample_rate
        self.scene_embedding_size = encoder.embed_dim
        self.timestamp_embedding_size = encoder.embed_dim
        frame_ms = FRAME_SHIFT_S * 1000.0
        step = round(timestamp_hop_ms / frame_ms)  # in fbank frames
        if step < 1 or abs(step * frame_ms - timestamp_hop_ms) > 1e-6 or encoder.patch_size % step:
            raise ValueError(
                f"timestamp_hop_ms must be a multiple of {frame_ms:g} ms that divides the "
                f"{encoder.patch_size * frame_ms:g} ms patch (e.g. 40 or 160), got {timestamp_hop_ms}")
        self.timestamp_hop_ms = float(timestamp_hop_ms)
        self.hop_frames = step


def load_model(model_file_path: str = "", timestamp_hop_ms: float = 40.0) -> HearModel:
    """Load an exported encoder (``teacher_encoder.safetensors``); on CUDA when available.

    An empty path falls back to the ``ASIT_HEAR_ENCODER`` environment variable.
    ``timestamp_hop_ms``: spacing of the timestamp embeddings (a divisor of the 160 ms patch).
    """
    path = model_file_path or os.environ.get(ENV_VAR, "")
    if not path:
        raise ValueError(f"load_model needs the path of a teacher_encoder.safetensors (or set ${ENV_VAR})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return HearModel(load_encoder(path, device=device), timestamp_hop_ms)


def _check_audio(audio: torch.Tensor) -> torch.Tensor:
    if not isinstance(audio, torch.Tensor) or audio.dim() != 2:
        raise ValueError(
            f"audio must be a [n_sounds, n_samples] tensor, got {getattr(audio, 'shape', type(audio))}"
        )
    return audio


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """``[n_sounds, D]`` float32 clip embeddings on the model's device."""
    audio = _check_audio(audio)
    return model.encoder.embed(audio, model.sample_rate).clip.float()


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame embeddings ``[n_sounds, T, D]`` and their centre times ``[n_sounds, T]`` in milliseconds.

    The times are evenly spaced (``model.timestamp_hop_ms``) and lie inside the clip: frames whose patch
    centre falls past the clip's end are left out, so the last timestamp is within one hop of the end (a
    clip shorter than the first centre, 87.5 ms, keeps its one frame, stamped at the clip's middle).
    """
    audio = _check_audio(audio)
    n, samples_per_frame = audio.shape[0], int(round(model.sample_rate * FRAME_SHIFT_S))
    embeddings, times = [], []
    frames = model.encoder.num_fbank_frames(audio.shape[1])
    for offset in range(0, model.encoder.patch_size, model.hop_frames):  # in fbank frames
        if offset and offset >= frames:  # the clip ends before this grid's first patch would start
            break
        start = offset * samples_per_frame
        out = model.encoder.embed(audio[:, start:], model.sample_rate)
        embeddings.append(out.frames.float())
        times.append(out.timestamps_s.double() * 1000.0 + offset * FRAME_SHIFT_S * 1000.0)
    all_times = torch.cat(times)
    order = torch.argsort(all_times, stable=True)  # interleave the shifted grids by time
    # HEAR wants every timestamp inside the clip: a final partial patch's centre can lie past the end, so
    # those frames are dropped (the grid stays regular; the frame before is at most one hop from the end)
    duration_ms = audio.shape[1] / model.sample_rate * 1000.0
    inside = order[all_times[order] <= duration_ms]
    if inside.numel() == 0:  # a clip shorter than the first centre (87.5 ms): its one frame, at its middle
        inside, all_times = order[:1], torch.full_like(all_times, duration_ms / 2)
    timestamps = all_times[inside].float().unsqueeze(0).expand(n, -1).contiguous()
    return torch.cat(embeddings, dim=1)[:, inside.to(embeddings[0].device)], timestamps
