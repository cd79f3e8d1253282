"""The HEAR 2021 benchmark API (https://hearbenchmark.com) for an exported ASiT encoder.

    import asit.hear as hear
    model = hear.load_model("runs/x/teacher_encoder.safetensors")
    scene = hear.get_scene_embeddings(audio, model)            # [n_sounds, D]
    emb, ts = hear.get_timestamp_embeddings(audio, model)      # [n_sounds, T, D], [n_sounds, T] ms

``audio`` is ``[n_sounds, n_samples]`` at ``model.sample_rate``. Scene embeddings are the mean
[CLS] over windows; timestamp embeddings are one per 160 ms time patch (the tokens averaged over
frequency), stamped at the patch centre. HEAR suggests a hop of at most 50 ms; the patch grid
gives 160 ms, the model's native resolution.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from asit.eval.encoder import AudioEncoder, load_encoder

__all__ = ["HearModel", "get_scene_embeddings", "get_timestamp_embeddings", "load_model"]

ENV_VAR = "ASIT_HEAR_ENCODER"


class HearModel(nn.Module):
    """An :class:`AudioEncoder` with the attributes HEAR requires."""

    def __init__(self, encoder: AudioEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.sample_rate = encoder.sample_rate
        self.scene_embedding_size = encoder.embed_dim
        self.timestamp_embedding_size = encoder.embed_dim


def load_model(model_file_path: str = "") -> HearModel:
    """Load an exported encoder (``teacher_encoder.safetensors``); on CUDA when available.

    An empty path falls back to the ``ASIT_HEAR_ENCODER`` environment variable.
    """
    path = model_file_path or os.environ.get(ENV_VAR, "")
    if not path:
        raise ValueError(f"load_model needs the path of a teacher_encoder.safetensors (or set ${ENV_VAR})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return HearModel(load_encoder(path, device=device))


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
    """Frame embeddings ``[n_sounds, T, D]`` and their centre times ``[n_sounds, T]`` in milliseconds."""
    audio = _check_audio(audio)
    out = model.encoder.embed(audio, model.sample_rate)
    n = audio.shape[0]
    timestamps = (out.timestamps_s.double() * 1000.0).float().unsqueeze(0).expand(n, -1).contiguous()
    return out.frames.float(), timestamps
