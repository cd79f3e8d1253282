"""A CPU stand-in for ``torch.cuda.set_sync_debug_mode``: records the tensor operations that
would make the host wait for a CUDA device (reading a value, a data-dependent shape, a copy to
the host, a tensor built from host data), so a test on the CPU can check that code meant to run
sync-free on a GPU does not ask. It sees only calls that go through ``__torch_function__``
(not what C++ kernels do inside), so the CUDA test under ``set_sync_debug_mode("error")`` stays
the final word.
"""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode

# Methods that hand a tensor's value to Python, or copy it to the host.
_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__",
          "__format__", "__repr__", "equal", "allclose", "is_nonzero"}
# Operations whose output shape depends on the values (the host must wait for the count).
_DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"}
# Tensors made from host data: on a GPU, a blocking host-to-device copy (torch.full/zeros fill instead).
_FROM_HOST = {"tensor", "as_tensor", "scalar_tensor"}


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostReads(TorchFunctionMode):
    """Context manager; ``.reads`` lists ``(operation, where)`` for every host read inside it.

    ``allow(fn)`` wraps a function so that its body is not inspected (for ops whose CUDA path is a
    Triton kernel while their CPU path, the one a CPU test runs, reads back)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in _READS or name in _DATA_DEPENDENT or name in _FROM_HOST or (
                name in ("__getitem__", "__setitem__") and _bool_index(args)):
            frame = traceback.extract_stack(limit=3)[0]
            self.reads.append((name, f"{frame.filename}:{frame.lineno}"))
        return func(*args, **(kwargs or {}))

    @staticmethod
    def allow(fn):
        def unchecked(*args, **kwargs):
            with torch._C.DisableTorchFunction():
                return fn(*args, **kwargs)

        return unchecked
