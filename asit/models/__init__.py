"""Models: the timm ViT encoder, the projection / reconstruction heads and the student/teacher pair."""

from .asit import ASiTModel, StudentTeacher, build_asit, unwrap_model
from .heads import ProjectionHead, ReconstructionHead, WeightNormLinear
from .vit import (
    ATTN_BACKENDS,
    POS_EMBED_FITS,
    VIT_PRESETS,
    FlashAttnAttention,
    NaiveAttention,
    SdpaKernelAttention,
    build_backbone,
    encode,
    fit_pos_embed,
    flash_attn_available,
    resolve_attn_backend,
    token_grid,
)

__all__ = [
    "ATTN_BACKENDS",
    "POS_EMBED_FITS",
    "VIT_PRESETS",
    "ASiTModel",
    "FlashAttnAttention",
    "NaiveAttention",
    "SdpaKernelAttention",
    "ProjectionHead",
    "ReconstructionHead",
    "StudentTeacher",
    "WeightNormLinear",
    "build_asit",
    "build_backbone",
    "encode",
    "fit_pos_embed",
    "flash_attn_available",
    "resolve_attn_backend",
    "token_grid",
    "unwrap_model",
]
