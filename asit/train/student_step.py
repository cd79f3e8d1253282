"""The module DDP wraps in pretraining: the student on the step's corrupted global views and (v2) its clean
local views, in one forward, so DDP sees one graph per step."""

from __future__ import annotations

import torch
import torch.nn as nn

from asit.models import ASiTModel

__all__ = ["StudentStep"]


class StudentStep(nn.Module):
    """What DDP wraps: the student applied to the corrupted global views and (v2) the clean local
    views, in one forward so DDP sees one graph per step."""

    def __init__(self, student: ASiTModel) -> None:
        super().__init__()
        self.student = student

    def forward(self, corrupted: torch.Tensor, local_views: torch.Tensor | None = None):
        out = self.student(corrupted)
        local_cls = None
        if local_views is not None:
            local_cls = self.student(local_views, with_recon=False)["cls_logits"]
        return out, local_cls
