"""The optimiser's parameter groups and gradient clipping, as DINO (and the ASiT authors) define them.

Plain functions of the model and the clipping settings; the recipe passes them in and calls them every
step. Nothing here reads the config.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["clip_gradients", "param_groups"]


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """DINO's ``get_params_groups`` (the authors' rule): no weight decay on biases and other 1-D parameters
    (the norms' weights); every other parameter, [CLS] token and positional embedding included, is decayed.
    Each group's ``apply_wd`` says whether the weight-decay schedule sets its ``weight_decay``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


def clip_gradients(model: nn.Module, clip: float, mode: str, *, host_reads: bool = False) -> torch.Tensor | None:
    """Clip ``model``'s gradients to norm ``clip`` (none when ``clip <= 0``) and return their total norm
    before clipping (a device tensor), or None without gradients. ``mode="global"``: one norm over all
    parameters; otherwise each parameter's gradient separately (the authors' DINO rule), without host syncs,
    or with ``host_reads=True`` exactly as DINO's ``clip_gradients`` runs it: one parameter at a time, its
    norm read on the host (``.item()``) and its gradient scaled only when the coefficient is below 1."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip <= 0 or not params:
        return torch.nn.utils.get_total_norm([p.grad for p in params]) if params else None
    if mode == "global":
        return torch.nn.utils.clip_grad_norm_(params, clip)
    if host_reads:
        return _clip_per_param_host(params, clip)
    # Authors' (DINO) clipping: each parameter's gradient separately, without host syncs.
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    norms = torch._foreach_norm([p.grad for p in params])
    scales = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_([p.grad for p in params], scales)
    return total


def _clip_per_param_host(params: list[torch.Tensor], clip: float) -> torch.Tensor:
    """DINO's ``utils.clip_gradients`` loop (a host read per parameter); returns the total norm."""
    norms = []
    for p in params:
        norm = p.grad.norm(2)
        norms.append(norm)
        coef = clip / (norm + 1e-6)
        if coef < 1:  # the host read
            p.grad.mul_(coef)
    return torch.linalg.vector_norm(torch.stack(norms))
