"""Triton kernels behind ``asit.ops`` (imported as ``asit_kernels``; never imports ``asit``).

Each module holds the ``@triton.jit`` kernels of one fused op and plain host launchers
(``*_forward`` / ``*_backward``). Each launcher runs the launch list of its ``*_launches`` twin, which
picks block sizes (from ``_utils``), allocates outputs and returns them with the launches;
``bench/kernel_report.py`` compiles those same launches for sm_90/sm_80 on a CPU machine. Validation,
autograd and ``torch.library`` registration live in ``asit.ops._triton``.
"""

from .distill_ce import distill_ce_backward, distill_ce_forward
from .gmml import gmml_forward
from .gmml_sample import first_cover_dtype, gmml_prefix
from .masked_l1 import masked_l1_backward, masked_l1_forward

__all__ = [
    "distill_ce_backward",
    "distill_ce_forward",
    "first_cover_dtype",
    "gmml_forward",
    "gmml_prefix",
    "masked_l1_backward",
    "masked_l1_forward",
]
