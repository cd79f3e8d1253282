"""Fused ops for masked spectrogram modelling, usable without the rest of asit.

Each op lives in its own file beside its ``*_reference`` twin. It validates its arguments, then
settles the backend: CUDA tensors go to the Triton kernels in ``asit_kernels`` (through
``_triton.py``), everything else to the pure-PyTorch reference; ``backend=`` or the
``ASIT_OPS_BACKEND`` environment variable force either, and fp64 inputs of the ops whose kernels
accumulate in fp32 always use the reference. Shared result types live in ``_types.py``.
"""

from ._types import DistillCEOutput, GMMLBlocks, GMMLOutput
from .center import update_center_
from .distill_ce import centered_softmax_cross_entropy, centered_softmax_cross_entropy_reference
from .gmml import (
    expected_gmml_blocks,
    gmml_corrupt,
    gmml_corrupt_reference,
    gmml_shortfall,
    paint_block_mask,
    sample_gmml_blocks,
)
from .linear_distill_ce import (
    linear_centered_softmax_cross_entropy,
    linear_centered_softmax_cross_entropy_reference,
)
from .masked_l1 import masked_l1_loss, masked_l1_loss_reference

__all__ = [
    "DistillCEOutput",
    "GMMLBlocks",
    "GMMLOutput",
    "centered_softmax_cross_entropy",
    "centered_softmax_cross_entropy_reference",
    "expected_gmml_blocks",
    "gmml_corrupt",
    "gmml_corrupt_reference",
    "gmml_shortfall",
    "linear_centered_softmax_cross_entropy",
    "linear_centered_softmax_cross_entropy_reference",
    "masked_l1_loss",
    "masked_l1_loss_reference",
    "paint_block_mask",
    "sample_gmml_blocks",
    "update_center_",
]
