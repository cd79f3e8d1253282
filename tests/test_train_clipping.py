"""Gradient clipping: the paper recipes clip each parameter's gradient separately, as the authors' DINO
``clip_gradients`` does; ``optim.clip_mode=global`` clips one norm over all of them."""

from __future__ import annotations

import torch
import torch.nn as nn

from asit.train.optim import clip_gradients


def _authors_clip(params: list[torch.Tensor], clip: float) -> None:
    """Port of DINO's ``utils.clip_gradients`` (the ASiT authors' training loop calls it every step)."""
    for p in params:
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)


def _model_with_grads(norms: list[float], seed: int) -> nn.ParameterList:
    g = torch.Generator().manual_seed(seed)
    model = nn.ParameterList()
    for i, norm in enumerate(norms):
        p = nn.Parameter(torch.zeros(3 + 2 * i, 5))
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        p.grad = (grad / grad.norm() * norm).float() if norm else torch.zeros_like(p)
        model.append(p)
    return model


def test_per_param_clipping_is_the_authors(seed):
    norms = [0.5, 2.9, 3.1, 10.0, 0.0, 3.0]  # below, at and above the threshold; an all-zero gradient
    ours, theirs = _model_with_grads(norms, seed), _model_with_grads(norms, seed)
    before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ours]))
    total = clip_gradients(ours, 3.0, "per_param")
    _authors_clip(list(theirs), 3.0)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(total, before)  # the norm before clipping, as the log reports it
    clipped = [p.grad.norm().item() for p in ours]
    assert max(clipped) <= 3.0 + 1e-5 and abs(clipped[0] - 0.5) < 1e-6


def test_global_and_per_param_differ_where_no_tensor_is_large(seed):
    """Six tensors of norm 2.5 (total 6.1, as at ViT-B initialisation: 6.2 with none above 3): the authors'
    per-parameter clip leaves them alone, the global clip scales all of them by 3 / 6.1."""
    per_param, global_ = _model_with_grads([2.5] * 6, seed), _model_with_grads([2.5] * 6, seed)
    original = [p.grad.clone() for p in per_param]
    clip_gradients(per_param, 3.0, "per_param")
    total = clip_gradients(global_, 3.0, "global")
    for p, g0 in zip(per_param, original, strict=True):
        torch.testing.assert_close(p.grad, g0)
    scale = 3.0 / total.item()
    assert 0.45 < scale < 0.5
    for p, g0 in zip(global_, original, strict=True):
        torch.testing.assert_close(p.grad, g0 * scale, rtol=1e-5, atol=1e-7)
