"""asit: self-supervised Audio Spectrogram ViT (ASiT) pretraining, fused ops and downstream tools.

``asit.load_encoder`` is imported lazily, so ``import asit`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["load_encoder"]

if TYPE_CHECKING:
    from asit.encoder import load_encoder


def __getattr__(name: str) -> Any:
    if name == "load_encoder":
        from asit.encoder import load_encoder

        return load_encoder
    raise AttributeError(f"module 'asit' has no attribute {name!r}")
