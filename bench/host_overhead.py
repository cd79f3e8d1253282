"""Host (Python) work per call of the fused ops, without the kernels: ``python bench/host_overhead.py``.

On a GPU a call's host work (checks, ``torch.library`` dispatch, autograd, block arithmetic,
output allocation) adds to each launch, and at docs/design.md §3's sizes it is most of a call's time. This
script measures it on any machine. The Triton kernel launches are replaced with no-ops, so the
Triton path runs on tiny CPU tensors without a GPU or the interpreter. It prints µs per forward +
backward (GMML: forward) for the Triton path and the eager reference, one thread.
"""

from __future__ import annotations

import time

import torch


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _stub_kernels() -> None:
    import asit_kernels.distill_ce as distill_ce
    import asit_kernels.gmml as gmml
    import asit_kernels.masked_l1 as masked_l1

    for module in (masked_l1, distill_ce, gmml):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(module, name, _NoLaunch())


def _us_per_call(fn, calls: int = 2000) -> float:
    for _ in range(100):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    torch.set_num_threads(1)
    _stub_kernels()
    import asit.ops as ops

    pred = torch.randn(2, 1, 16, 16, requires_grad=True)
    target, mask = torch.randn(2, 1, 16, 16), torch.rand(2, 1, 16, 16) < 0.5
    student, teacher, center = torch.randn(4, 64, requires_grad=True), torch.randn(4, 64), torch.zeros(64)
    x, blocks = torch.randn(2, 1, 32, 32), ops.sample_gmml_blocks(2, 32, 32)
    cases = {
        "masked_l1 fwd+bwd": lambda b: ops.masked_l1_loss(pred, target, mask, backend=b).backward(),
        "distill_ce fwd+bwd": lambda b: ops.centered_softmax_cross_entropy(
            student, teacher, center, 0.1, 0.04, backend=b).loss.backward(),
        "gmml fwd": lambda b: ops.gmml_corrupt(x, blocks, 16, backend=b),
    }
    for name, case in cases.items():
        triton_us = _us_per_call(lambda case=case: case("triton"))
        eager_us = _us_per_call(lambda case=case: case("reference"))
        print(f"{name}: Triton path {triton_us:.0f} µs of host work (launches stubbed), eager reference "
              f"{eager_us:.0f} µs (tiny CPU tensors)")


if __name__ == "__main__":
    main()
