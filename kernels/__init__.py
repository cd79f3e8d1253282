"""Triton kernels behind ``asit.ops`` (imported as ``asit_kernels``; never imports ``asit``).

Each module holds the ``@triton.jit`` kernels of one fused op and plain host launchers
(``*_forward`` / ``*_backward``) that pick block sizes, allocate outputs and launch. Validation,
autograd and ``torch.library`` registration live in ``asit.ops.triton_dispatch``.
"""

from .distill_ce import distill_ce_backward, distill_ce_forward
from .gmml import gmml_forward
from .masked_l1 import masked_l1_backward, masked_l1_forward

__all__ = [
    "distill_ce_backward",
    "distill_ce_forward",
    "gmml_forward",
    "masked_l1_backward",
    "masked_l1_forward",
]
