"""Centre EMA update for the distillation loss, with an optional all-reduce over ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ._checks import check_tensor

__all__ = ["update_center_"]


def _default_all_reduce(buf: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)


@torch.no_grad()
def update_center_(
    center: torch.Tensor,
    teacher_sum: torch.Tensor,
    count: int | torch.Tensor,
    momentum: float,
    all_reduce: bool | Callable[[torch.Tensor], None] = False,
) -> torch.Tensor:
    """In place: ``center ← m · center + (1 - m) · Σ_ranks teacher_sum / Σ_ranks count``.

    Args:
        center: ``[K]`` fp32 buffer, updated in place and returned.
        teacher_sum: ``[K]`` column sums of this rank's teacher logits (from the CE op).
        count: how many rows this rank summed (int or 0-d tensor).
        momentum: EMA momentum ``m`` in [0, 1] (ASiT: 0.9).
        all_reduce: False for a local update; True to sum ``teacher_sum`` and ``count`` over the
            default process group (no-op when none is initialised); or a callable that sums a
            tensor in place across ranks (injected for tests and custom groups). Sum and count
            travel in one buffer, so it is a single collective.
    """
    check_tensor("center", center, ndim=1, dtypes=(torch.float32, torch.float64))
    check_tensor("teacher_sum", teacher_sum, ndim=1)
    if teacher_sum.shape != center.shape:
        raise ValueError(f"teacher_sum shape {tuple(teacher_sum.shape)} must equal center shape "
                         f"{tuple(center.shape)}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
    if teacher_sum.device != center.device:
        raise ValueError(f"teacher_sum is on {teacher_sum.device} but center is on {center.device}")
    if isinstance(count, torch.Tensor):
        count_t = count.to(device=center.device, dtype=center.dtype).reshape(1)
    else:  # filled on the device: no host-to-device copy (which would wait for the GPU queue)
        count_t = torch.full((1,), float(count), dtype=center.dtype, device=center.device)
    buf = torch.cat([teacher_sum.to(center.dtype), count_t])
    if all_reduce is True:
        _default_all_reduce(buf)
    elif callable(all_reduce):
        all_reduce(buf)
    elif all_reduce is not False:
        raise TypeError(f"all_reduce must be a bool or a callable, got {type(all_reduce).__name__}")
    mean = buf[:-1] / buf[-1].clamp_min(1.0)
    center.mul_(momentum).add_(mean, alpha=1.0 - momentum)
    return center
