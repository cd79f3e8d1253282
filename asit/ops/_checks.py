"""Argument validation shared by the ops: every message names the offending argument."""

from __future__ import annotations

import math
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BACKENDS = ("auto", "reference", "triton")


def check_tensor(name: str, value: object, *, ndim: int | tuple[int, ...] | None = None,
                 dtypes: tuple[torch.dtype, ...] | None = FLOAT_DTYPES) -> torch.Tensor:
    """Raise TypeError/ValueError naming ``name`` unless ``value`` is a tensor of the given rank/dtype."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {value.dtype}; supported: {names}")
    return value


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError if the given tensors (None skipped) live on different devices."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_positive_finite(name: str, value: float | torch.Tensor) -> None:
    """Temperatures and momenta given as Python numbers must be finite and positive."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        return  # tensor values are not inspected: that would force a host sync
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def check_row_options(weights: torch.Tensor | None, rows: int, reduction: str) -> None:
    """The row losses' options: optional floating ``weights`` with one entry per row, and ``reduction``
    ``"mean"`` or ``"none"``."""
    if weights is not None:
        check_tensor("weights", weights, ndim=1)
        if weights.shape[0] != rows:
            raise ValueError(f"weights must have {rows} entries (N), got {weights.shape[0]}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Pick 'reference' or 'triton'.

    ``backend`` wins, then the ``ASIT_OPS_BACKEND`` environment variable, then ``auto``:
    CUDA tensors use Triton, everything else the PyTorch reference.
    """
    choice = backend if backend is not None else os.environ.get("ASIT_OPS_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "reference"
    return choice
