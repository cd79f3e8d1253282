"""Numeric precision of a training step: which dtype ``train.precision`` means on this device, and the
autocast context for it. Plain functions of their arguments, shared by the recipes."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast", "resolve_precision"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, mode: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """``(name, autocast dtype or None for fp32)`` of ``precision`` on ``device``. ``auto``: fp32 on the CPU;
    on CUDA bf16, or fp16 with loss scaling in ``mode="authors"`` (the authors' setting).

    Raises:
        ValueError: fp16 off CUDA.
    """
    if precision == "auto":
        gpu = "fp16" if mode == "authors" else "bf16"
        precision = gpu if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    return precision, _DTYPES.get(precision)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op context for fp32 (``dtype=None``)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
