"""Forward + backward benchmarks of the fused ops: ``ref`` (eager reference), ``ref_compiled``
(``torch.compile`` of the reference) and ``triton``.

Each case reports GB/s of the op's minimal traffic next to the session's copy bandwidth, and
peak memory on CUDA (pytest-benchmark ``extra_info``). The timed call includes the host's work
(checks, dispatch, launches) and a device sync, which is what one call costs. At docs/design.md §3's sizes
that is mostly host time on a fast GPU. So on CUDA each case also replays fwd + bwd from a CUDA graph
(``triton.testing.do_bench_cudagraph``) to time the device alone: ``device_ms`` and ``device_gbps``,
for the compiled reference and Triton (the eager GMML reference reads back a count, which a capture
cannot hold). A case whose capture fails records why in ``device_error`` instead. Shapes are
docs/design.md §3's on CUDA and smaller ones on CPU, where only ``ref`` runs. Run with ``pytest bench/``.
"""

from __future__ import annotations

import platform

import pytest
import torch
import triton

import asit.ops as ops

CUDA = torch.cuda.is_available()
# (op, shape): docs/design.md §3 on CUDA; reduced sizes on CPU so `pytest bench/` stays quick.
CASES = [
    ("gmml", (64, 1, 592, 128) if CUDA else (8, 1, 592, 128)),
    ("masked_l1", (64, 1, 592, 128) if CUDA else (8, 1, 592, 128)),
    ("ce_local", (37_888, 1024) if CUDA else (2048, 1024)),
    ("ce_global", (128, 8192)),
    ("ce_global", (128, 65_536) if CUDA else (16, 65_536)),
]
PROVIDERS = ["ref", "ref_compiled", "triton"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(op: str, shape: tuple[int, ...], dtype: torch.dtype, provider: str, device: torch.device):
    """Return ``(fn, bytes)``: a closure running forward + backward, and its minimal traffic."""
    backend = "reference" if provider.startswith("ref") else "triton"
    gen = torch.Generator(device=device).manual_seed(0)
    size = dtype.itemsize
    if op == "gmml":
        b, c, h, w = shape
        x = torch.randn(shape, device=device, generator=gen).to(dtype)
        blocks = ops.sample_gmml_blocks(b, h, w, generator=gen, device=device)
        fn = lambda: ops.gmml_corrupt(x, blocks, 16, backend=backend)
        alien_px = int(blocks.alien.sum()) * c * h * w * 0.3
        nbytes = 2 * x.numel() * size + alien_px * size + b * h * w + b * (h // 16) * (w // 16) * 4
    elif op == "masked_l1":
        pred = torch.randn(shape, device=device, generator=gen).to(dtype).requires_grad_()
        target = torch.randn(shape, device=device, generator=gen).to(dtype)
        mask = torch.rand(shape, device=device, generator=gen) < 0.5

        def fn():
            ops.masked_l1_loss(pred, target, mask, backend=backend).backward()

        n = pred.numel()
        nbytes = 2 * (2 * n * size + mask.numel()) + n * size  # fwd read, bwd read + write
    else:
        n, k = shape
        student = torch.randn(shape, device=device, generator=gen).to(dtype).requires_grad_()
        teacher = torch.randn(shape, device=device, generator=gen).to(dtype)
        center = torch.randn(k, device=device, generator=gen)

        def fn():
            out = ops.centered_softmax_cross_entropy(student, teacher, center, 0.1, 0.04, backend=backend)
            out.loss.backward()

        nbytes = 5 * n * k * size  # fwd: read s, t, write grad; bwd: read grad, write grad_s
    if provider == "ref_compiled":
        fn = torch.compile(fn)
    return fn, nbytes


def _device_time(fn, nbytes: float) -> dict:
    """Device time of ``fn`` replayed from a CUDA graph, or why it could not be captured."""
    try:
        ms = triton.testing.do_bench_cudagraph(fn, rep=20)
    except Exception as err:  # noqa: BLE001 - any capture failure is a finding to record, not a failed case
        torch.cuda.synchronize()
        first_line = (str(err).splitlines() or [""])[0]
        return {"device_error": f"{type(err).__name__}: {first_line[:120]}"}
    return {"device_ms": ms, "device_gbps": nbytes / (ms * 1e-3) / 1e9}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op,shape", CASES, ids=[f"{o}-{'x'.join(map(str, s))}" for o, s in CASES])
def test_bench(benchmark, op, shape, dtype, provider, device, copy_gbps):
    if provider == "triton" and not CUDA:
        pytest.skip("Triton kernels need a CUDA device "
                    "(the interpreter is a correctness tool, not a benchmark)")
    if provider == "ref_compiled" and not CUDA:
        pytest.skip("torch.compile of the reference takes tens of seconds per case on CPU; measured on CUDA")
    fn, nbytes = setup(op, shape, dtype, provider, device)
    fn()  # warm-up (compilation, autotuning, allocator)
    sync(device)
    if CUDA:
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        benchmark.extra_info["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20

    def run():
        fn()
        sync(device)

    benchmark.pedantic(run, rounds=20 if CUDA else 3, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    if CUDA and provider != "ref":
        benchmark.extra_info.update(_device_time(fn, nbytes))
    benchmark.extra_info.update(
        gbps=nbytes / median / 1e9, copy_gbps=copy_gbps, bytes=nbytes,
        device=torch.cuda.get_device_name(device) if CUDA else platform.processor() or "cpu",
        torch=torch.__version__, triton=triton.__version__)
