"""Ticket-ordered reductions on the GPU: many back-to-back launches, CUDA-graph replays and launches on two
streams give bitwise the first result.

The distillation CE (loss, teacher column sums, gradient) and the masked L1 (loss, mask sum) let the last
program to finish (an atomic ticket) add the others' partials in a fixed order. Under the CPU interpreter the
programs run one after another, so ordering bugs (a counter not at zero, a counter shared with another launch,
a partial read before it is visible) cannot show there: these tests run only on CUDA, at the design shapes,
with launches of other sizes in between so that counters are allocated and freed around the captured ones.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: ordering across programs")]

REPEATS = 200
CE_SHAPES = [(128, 8192), (4096, 1024)]  # split K (global head); one pass + column sum (a fused-head row chunk)
L1_SHAPE = (2 * 64, 1, 592, 128)  # both global views of a batch of 64


def _bits(x: torch.Tensor) -> torch.Tensor:
    """``x`` as integers of its width, so that comparisons are bitwise."""
    x = x.reshape(-1)
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]) if x.is_floating_point() else x


def _mismatches(outs, ref) -> torch.Tensor:
    """Number of differing elements over all outputs, on the device (no host sync)."""
    return sum((_bits(a) != _bits(b)).sum() for a, b in zip(outs, ref))


def _ce_case(n: int, k: int):
    """Inputs of one CE forward (bf16 logits, fp32 centre, tensor temperatures) and a closure running it."""
    import asit_kernels.distill_ce as ce

    dev = torch.device("cuda")
    student = (3 * torch.randn(n, k, device=dev)).bfloat16()
    teacher = (2 * torch.randn(n, k, device=dev)).bfloat16()
    center = 0.5 * torch.randn(k, device=dev)
    temps = torch.tensor(0.1, device=dev), torch.tensor(0.04, device=dev)
    return lambda: ce.distill_ce_forward(student, teacher, center, *temps)


def _l1_case():
    import asit_kernels.masked_l1 as l1

    dev = torch.device("cuda")
    pred = torch.randn(L1_SHAPE, device=dev).bfloat16()
    target = torch.randn(L1_SHAPE, device=dev)
    mask = torch.rand(L1_SHAPE, device=dev) < 0.4
    return lambda: l1.masked_l1_forward(pred, target, mask)[:2]


def _check(run, other, seed):
    """``run`` REPEATS times back to back (``other`` in between), as REPEATS replays of a captured graph (an
    eager ``other`` between replays), and on two streams at once: every result bitwise equals the first."""
    first = [x.clone() for x in run()]
    torch.cuda.synchronize()
    assert all(torch.isfinite(x.float()).all() for x in first), f"seed={seed}"
    bad = torch.zeros((), dtype=torch.int64, device="cuda")
    for _ in range(REPEATS):
        bad += _mismatches(run(), first)
        other()
    assert bad.item() == 0, f"back to back: {bad.item()} elements differ, seed={seed}"

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capturing stream
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    for _ in range(REPEATS):
        graph.replay()
        bad += _mismatches(outs, first)
        other()  # its counters come and go between replays
    assert bad.item() == 0, f"graph replays: {bad.item()} elements differ, seed={seed}"

    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    counts = [torch.zeros((), dtype=torch.int64, device="cuda") for _ in streams]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    for _ in range(REPEATS // 2):
        for stream, count in zip(streams, counts):
            with torch.cuda.stream(stream):
                count += _mismatches(run(), first)
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    assert sum(c.item() for c in counts) == 0, f"two streams: {[c.item() for c in counts]} differ, seed={seed}"


@pytest.mark.parametrize("n,k", CE_SHAPES)
def test_distill_ce_results_are_bitwise_repeatable(n, k, seed):
    other_shape = CE_SHAPES[1] if (n, k) == CE_SHAPES[0] else CE_SHAPES[0]
    _check(_ce_case(n, k), _ce_case(*other_shape), seed)


def test_masked_l1_results_are_bitwise_repeatable(seed):
    _check(_l1_case(), _ce_case(*CE_SHAPES[0]), seed)
