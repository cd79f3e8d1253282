"""GMML the way the authors' code runs it: per sample, on the CPU, inside the data loader's collate,
one block at a time in a Python loop that re-counts the mask after each block.

Used by ``train.mode=authors`` (to measure the original pipeline shape next to ours) and by the
data benchmark. The fast path uses :func:`asit.ops.sample_gmml_blocks` + :func:`asit.ops.gmml_corrupt`
on the device instead. Semantics match: union-until-target, zeros mode ``U(zero_ratio)``, alien mode
``alien_ratio`` copied from another sample (or possibly itself with ``allow_self_alien``).
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["gmml_per_sample", "ReferenceGMMLCollate"]


def gmml_per_sample(views: torch.Tensor, rng: random.Random, *, zero_ratio=(0.5, 0.7), alien_ratio: float = 0.3,
                    alien_prob: float = 0.5, max_block_frac: float = 0.3,
                    allow_self_alien: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt ``views [N, 1, T, F]`` sample by sample; returns ``(corrupted, mask bool [N, 1, T, F])``."""
    n, _, h, w = views.shape
    corrupted = views.clone()
    masks = torch.zeros(n, 1, h, w, dtype=torch.bool)
    max_h, max_w = max(1, int(max_block_frac * h)), max(1, int(max_block_frac * w))
    for i in range(n):
        alien = n > 1 and rng.random() < alien_prob
        target = (alien_ratio if alien else rng.uniform(*zero_ratio)) * h * w
        mask = masks[i, 0]
        while mask.sum() < target:
            top, left = rng.randint(0, h - 1), rng.randint(0, w - 1)
            mask[top : top + rng.randint(1, max_h), left : left + rng.randint(1, max_w)] = True
        if alien:
            src = rng.randrange(n) if allow_self_alien else (i + rng.randint(1, n - 1)) % n
            corrupted[i, :, mask] = views[src, :, mask]
        else:
            corrupted[i, :, mask] = 0.0
    return corrupted, masks


class ReferenceGMMLCollate:
    """Collate, then GMML on each view on the CPU (picklable, so it runs in loader workers).

    Adds view-major ``corrupted``, ``mask`` and ``token_fraction`` to the batch. The Python RNG is
    seeded from ``seed`` and the batch's clip indices, so results do not depend on worker scheduling.
    """

    def __init__(self, collate, *, seed: int, patch_size: int, **gmml_kwargs: Any) -> None:
        self.collate = collate
        self.seed = seed
        self.patch_size = patch_size
        self.gmml_kwargs = gmml_kwargs

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(samples)
        views = batch["views"]  # [B, V, 1, T, F]
        if views.shape[0] == 0:
            return batch
        key = (self.seed, *[int(i) for i in batch["index"].tolist()])
        rng = random.Random(hash(key))
        corrupted, masks = [], []
        for v in range(views.shape[1]):
            c, m = gmml_per_sample(views[:, v], rng, **self.gmml_kwargs)
            corrupted.append(c)
            masks.append(m)
        mask = torch.cat(masks)
        batch["corrupted"] = torch.cat(corrupted)
        batch["mask"] = mask
        batch["token_fraction"] = F.avg_pool2d(mask.float(), self.patch_size, self.patch_size).flatten(1)
        return batch
