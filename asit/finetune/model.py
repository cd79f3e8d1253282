"""The fine-tuning model: a pretrained ViT backbone with a new ``LayerNorm → Linear`` head, and its reloading.

:class:`FinetuneModel` pools the backbone's tokens (data-token mean, [CLS], or both) and fits the positional
embedding to inputs of another length than pretraining (resampled or centre-cropped).
:func:`load_finetuned_model` rebuilds one from a ``best.pt`` / ``averaged.pt`` checkpoint: the architecture
from the stored encoder metadata, pooling and positional fit from the checkpoint.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from asit.encoder import backbone_spec
from asit.models import POS_EMBED_FITS, build_backbone, encode

__all__ = ["FinetuneModel", "load_finetuned_model"]


class FinetuneModel(nn.Module):
    """ViT backbone + ``LayerNorm → Linear`` head on the pooled tokens.

    ``forward(x [B, 1, T, F]) → logits [B, K]``. ``pool``: ``"tokens"`` (mean of the data tokens),
    ``"cls"`` ([CLS]) or ``"both"`` (the average of the two vectors). ``pos_embed_fit``: how the
    positional embedding meets inputs of another length than pretraining (:func:`asit.models.fit_pos_embed`).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, pool: str = "tokens",
                 pos_embed_fit: str = "resample") -> None:
        super().__init__()
        if pool not in ("tokens", "cls", "both"):
            raise ValueError(f"pool must be 'tokens', 'cls' or 'both', got {pool!r}")
        if pos_embed_fit not in POS_EMBED_FITS:
            raise ValueError(f"pos_embed_fit must be one of {POS_EMBED_FITS}, got {pos_embed_fit!r}")
        self.backbone = backbone
        self.pool, self.pos_embed_fit = pool, pos_embed_fit
        dim = int(backbone.embed_dim)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = encode(self.backbone, x, pos_embed_fit=self.pos_embed_fit)  # [B, 1 + N, D]
        cls, data = tokens[:, 0], tokens[:, 1:].mean(1)  # [B, D] each
        pooled = {"cls": cls, "tokens": data, "both": None}[self.pool]
        if pooled is None:
            pooled = 0.5 * (cls + data)
        return self.head(pooled)


def load_finetuned_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> FinetuneModel:
    """Rebuild a fine-tuned model from ``best.pt`` / ``averaged.pt``, in eval mode on ``device``.

    The architecture comes from the stored encoder metadata, the pooling and the positional-embedding
    fit from the checkpoint (files written before ``pos_embed_fit`` existed were trained with
    ``resample``); the class names are the checkpoint's ``classes``. The fbank statistics its input was
    normalised with are the checkpoint's ``normalization`` (``{"mean", "std"}``).
    """
    from asit.train.checkpoint import load_checkpoint

    state = load_checkpoint(path, required=("model", "classes", "encoder_metadata"))
    weights = state["model"]
    backbone_state = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    spec = backbone_spec(backbone_state, state["encoder_metadata"])
    model = FinetuneModel(build_backbone(**spec), len(state["classes"]), state.get("pool", "tokens"),
                          state.get("pos_embed_fit", "resample"))
    model.load_state_dict(weights)
    return model.to(device).eval()
