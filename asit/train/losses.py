"""The ASiT objective: global ([CLS], cross-view) and local (data tokens, same view)
self-distillation plus masked reconstruction. The module owns the two centres.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn

from asit.ops import (
    centered_softmax_cross_entropy,
    linear_centered_softmax_cross_entropy,
    masked_l1_loss,
    update_center_,
)

__all__ = ["ASiTLoss", "CenterStats"]


class CenterStats(NamedTuple):
    """What the centre EMA needs from one step: column sums of this rank's teacher logits and how
    many rows they sum (before any all-reduce)."""

    global_sum: torch.Tensor  # [Kc]
    global_count: int
    local_sum: torch.Tensor  # [Kt]
    local_count: int


class ASiTLoss(nn.Module):
    """``w_g · L_global + w_l · L_local + w_r · L_recon`` with EMA centres.

    Centres are buffers (saved in checkpoints). ``forward`` uses the current values and returns,
    next to the loss terms, the teacher statistics of the step; the caller applies them with
    :meth:`update_centers_` once it knows the step is good (the engine skips non-finite steps), as
    DINO/ASiT do after the loss. The update sums across ranks through ``all_reduce`` (injected, so
    the module is testable without a process group); under DDP every rank must call it.

    ``fused_head=True`` computes the local loss with the output layer fused into it
    (:func:`asit.ops.linear_centered_softmax_cross_entropy`): the model outputs then carry ``token_embed``
    and ``token_weight`` (an :class:`~asit.models.ASiTModel` built with ``token_logits=False``) instead of
    ``token_logits``, and the ``[V·B·N, K_tok]`` logits are never held whole.
    """

    def __init__(self, out_cls: int, out_tokens: int, *, student_temp: float = 0.1,
                 center_momentum: float = 0.9, weight_global: float = 1.0, weight_local: float = 1.0,
                 weight_recon: float = 2.0, local_tokens: str = "all", global_pairs: str = "v1",
                 all_reduce: bool | Callable[[torch.Tensor], None] = False,
                 backend: str | None = None, fused_head: bool = False) -> None:
        super().__init__()
        self.fused_head = fused_head
        self.backend = backend  # asit.ops backend: None = auto (Triton on CUDA), "reference" = eager
        if local_tokens not in ("all", "corrupted"):
            raise ValueError(f"local_tokens must be 'all' or 'corrupted', got {local_tokens!r}")
        if global_pairs not in ("v1", "v2"):
            raise ValueError(f"global_pairs must be 'v1' or 'v2', got {global_pairs!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.weights = (weight_global, weight_local, weight_recon)
        self.local_tokens = local_tokens
        self.global_pairs = global_pairs
        self.all_reduce = all_reduce
        self.register_buffer("center_global", torch.zeros(out_cls))
        self.register_buffer("center_local", torch.zeros(out_tokens))

    def _global_rows(self, s_cls: torch.Tensor, s_local_cls: torch.Tensor | None, t_cls: torch.Tensor,
                     batch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Pair student and teacher [CLS] rows. Returns (student rows, teacher rows, how many times
        each teacher row was repeated)."""
        s_views = list(s_cls.split(batch))  # global views, each [B, K]
        t_views = list(t_cls.split(batch))
        if self.global_pairs == "v1":
            # student view 1 ↔ teacher view 2 and vice versa
            return torch.cat([s_views[0], s_views[1]]), torch.cat([t_views[1], t_views[0]]), 1
        if s_local_cls is not None:
            s_views += list(s_local_cls.split(batch))
        s_rows, t_rows = [], []
        for ti, t in enumerate(t_views):
            for si, s in enumerate(s_views):
                if si != ti:  # same-view pairs are skipped
                    s_rows.append(s)
                    t_rows.append(t)
        return torch.cat(s_rows), torch.cat(t_rows), len(s_views) - 1

    def forward(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                clean: torch.Tensor, mask: torch.Tensor, token_fraction: torch.Tensor,
                teacher_temp: float, student_local_cls: torch.Tensor | None = None,
                ) -> tuple[dict[str, torch.Tensor], CenterStats]:
        """Args:
            student: outputs on the corrupted global views (view-major ``[V·B, ...]``):
                ``cls_logits [V·B, Kc]``, ``token_logits [V·B, N, Kt]``, ``recon [V·B, 1, T, F]``;
                with ``fused_head``, ``token_embed [V·B, N, Db]`` and ``token_weight [Kt, Db]`` instead of
                ``token_logits``.
            teacher: outputs on the clean global views: ``cls_logits``, ``token_logits`` (or, with
                ``fused_head``, ``token_embed`` and ``token_weight``).
            clean: ``[V·B, 1, T, F]`` clean views (reconstruction targets).
            mask: ``[V·B, 1, T, F]`` bool, True = corrupted pixel.
            token_fraction: ``[V·B, N]`` corrupted fraction per token.
            teacher_temp: ``τ_t`` for this step.
            student_local_cls: v2 only, ``[L·B, Kc]`` student [CLS] logits of the clean local views.

        Returns: ``(terms, stats)``: a dict with ``loss`` (weighted total, with gradient) and the
        detached terms ``global``, ``local``, ``recon``; and the :class:`CenterStats` of this step
        for :meth:`update_centers_`. The centres are not changed here.
        """
        num_views = 2
        batch = clean.shape[0] // num_views
        s_rows, t_rows, repeats = self._global_rows(student["cls_logits"], student_local_cls,
                                                    teacher["cls_logits"], batch)
        glob = centered_softmax_cross_entropy(s_rows, t_rows, self.center_global, self.student_temp,
                                              teacher_temp, backend=self.backend)
        weights = None
        if self.local_tokens == "corrupted":
            weights = (token_fraction.flatten() > 0).to(torch.float32)
        local, local_count = self._local(student, teacher, teacher_temp, weights)
        recon_pred = student["recon"]
        target = clean[..., : recon_pred.shape[-2], : recon_pred.shape[-1]]
        rec_mask = mask[..., : recon_pred.shape[-2], : recon_pred.shape[-1]]
        recon = masked_l1_loss(recon_pred, target, rec_mask, backend=self.backend)  # fp32 target, as it comes
        wg, wl, wr = self.weights
        total = wg * glob.loss + wl * local.loss + wr * recon
        stats = CenterStats(glob.teacher_sum.detach() / repeats, t_rows.shape[0] // repeats,
                            local.teacher_sum.detach(), local_count)
        terms = {"loss": total, "global": glob.loss.detach(), "local": local.loss.detach(),
                 "recon": recon.detach()}
        return terms, stats

    def _local(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], teacher_temp: float,
               weights: torch.Tensor | None):
        """The local (data-token) loss and how many teacher rows it summed."""
        if not self.fused_head:
            s_tok = student["token_logits"].flatten(0, 1)  # [V·B·N, Kt]
            t_tok = teacher["token_logits"].flatten(0, 1)
            return centered_softmax_cross_entropy(s_tok, t_tok, self.center_local, self.student_temp, teacher_temp,
                                                  weights, backend=self.backend), t_tok.shape[0]
        if "token_embed" not in student or "token_embed" not in teacher:
            raise KeyError("loss.fused_head=true needs the models' token_embed and token_weight outputs "
                           "(build them with token_logits=False), not token_logits")
        h_s = student["token_embed"].flatten(0, 1)  # [V·B·N, Db]
        h_t = teacher["token_embed"].flatten(0, 1)
        out = linear_centered_softmax_cross_entropy(h_s, h_t, student["token_weight"], self.center_local,
                                                    self.student_temp, teacher_temp, weights,
                                                    teacher_weight=teacher["token_weight"], backend=self.backend)
        return out, h_t.shape[0]

    @torch.no_grad()
    def update_centers_(self, stats: CenterStats) -> None:
        """EMA step of both centres with one step's teacher statistics (a collective under DDP)."""
        update_center_(self.center_global, stats.global_sum, stats.global_count, self.center_momentum,
                       self.all_reduce)
        update_center_(self.center_local, stats.local_sum, stats.local_count, self.center_momentum,
                       self.all_reduce)
