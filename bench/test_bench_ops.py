"""Forward + backward benchmarks of the fused ops: ``ref`` (eager reference), ``ref_compiled``
(``torch.compile`` of the reference) and ``triton``, at the design shapes of ``bench/kernel_report.py``.
The ``head_*`` cases time the output layer fused into the distillation loss
(``linear_centered_softmax_cross_entropy``, shape ``N x D x K``): ``triton`` is the fused op (row chunks,
cuBLAS matmuls around the CE kernel), the references make the full logits first.

    pytest bench/test_bench_ops.py --benchmark-json=ops.json     # ASIT_BENCH_ROWS=<csv> also appends rows

What each case records (pytest-benchmark ``extra_info``; ``bench/results.py`` turns them into rows):

- ``device_ms``: device time of one forward + backward (GMML: forward). The calls are captured in a
  CUDA graph and the graph is replayed between CUDA events, so host work (checks, dispatch,
  launches) is not in the figure; every call first sets the gradients to ``None``, so nothing
  accumulates from one replay to the next; the calls cycle through ``rotate`` copies of the inputs
  whose total exceeds the L2 cache (at least 4 copies and ``ROTATE_BYTES``), so no call finds its
  inputs in L2. Where a call cannot be captured (the eager GMML reference reads a count back to the
  host), ``GRAPH_CALLS`` calls are queued between CUDA events instead; ``device_method`` says which.
  ``gmml_sample`` (``sample_gmml_blocks(..., budget=256)``: the eager binary search against the
  Triton prefix kernels, one dtype) is always timed so: it draws from its own ``torch.Generator``,
  and the eager search is a few hundred small launches whose host cost is the point of the comparison.
- ``device_gbps``: the op's minimal bytes (``bytes``, from the formulas in ``bench/kernel_report.py``)
  over ``device_ms``, next to ``copy_gbps``, a device-to-device copy of ``COPY_BYTES`` timed the same
  way in the same run (read + write bytes), and ``copy_frac``, their ratio.
- ``peak_mem_mb``: incremental peak memory of one call, measured in a fresh process per case (this
  file run as a script with ``--peak``): inputs allocated and the op warmed up, then
  ``reset_peak_memory_stats`` and ``max_memory_allocated`` minus what was allocated before the call.
  ``ASIT_BENCH_PEAK=0`` skips it; ``ASIT_BENCH_PEAK=only`` measures nothing else (no device or host time).
- ``tflops``: ``head_*`` only, the op's matmul work (``8·N·D·K``: two logit matmuls, ``dh`` and ``dW``) over
  ``device_ms``; those cases are compute-bound, and their ``bytes`` count features, weights and gradients only
  (the logits never need to reach memory).
- ``host_us``: wall time per call with no synchronisation, over ``HOST_CALLS`` calls (when the device is
  the slower side, launches wait for queue slots and this approaches ``device_ms``). The benchmark's own
  rounds time one call followed by a device synchronisation.

On a machine without CUDA the shapes shrink, only ``ref`` runs (no timing claims: the figures there
check that the bench works), and the peak memory is skipped.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_report as kr  # noqa: E402  (bench/ is not a package)

import asit.ops as ops  # noqa: E402

CUDA = torch.cuda.is_available()
L2_BYTES = 50 * 2**20  # H100 / H200
ROTATE_BYTES = 3 * L2_BYTES  # inputs cycled through per timing: well past the L2
MIN_COPIES = 4
GRAPH_CALLS = 100  # calls per timing (captured in one graph, or queued between events)
REPLAYS = 5
HOST_CALLS = 30
COPY_BYTES = 2**30

# (op, shape): the kernel report's design shapes on CUDA, reduced ones on CPU so the bench stays quick.
VIEW = (kr.VIEWS * kr.BATCH, 1, kr.FRAMES, kr.MELS)
BOTTLENECK = 256  # the projection head's bottleneck width D
CASES = [
    ("gmml", (kr.BATCH, 1, kr.FRAMES, kr.MELS) if CUDA else (8, 1, kr.FRAMES, kr.MELS)),
    ("gmml_sample", (kr.BATCH, kr.FRAMES, kr.MELS) if CUDA else (8, kr.FRAMES, kr.MELS)),
    ("masked_l1", VIEW if CUDA else (8, 1, kr.FRAMES, kr.MELS)),
    ("ce_local", (kr.LOCAL_ROWS, kr.LOCAL_K) if CUDA else (1024, kr.LOCAL_K)),
    ("ce_global", (kr.GLOBAL_ROWS, kr.GLOBAL_KS[0]) if CUDA else (16, kr.GLOBAL_KS[0])),
    ("ce_global", (kr.GLOBAL_ROWS, kr.GLOBAL_KS[1]) if CUDA else (16, kr.GLOBAL_KS[1])),
    # the projection head's output layer + distillation loss: N x D (bottleneck) x K
    ("head_local", (kr.LOCAL_ROWS if CUDA else 1024, BOTTLENECK, kr.LOCAL_K)),
    ("head_global", (kr.GLOBAL_ROWS if CUDA else 16, BOTTLENECK, kr.GLOBAL_KS[1])),
    ("head_global", (kr.GLOBAL_ROWS if CUDA else 16, BOTTLENECK, kr.GLOBAL_KS[0])),
]
PROVIDERS = ["ref", "ref_compiled", "triton"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORWARD_ONLY = ("gmml", "gmml_sample")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- cases


def make_inputs(op: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """One copy of an op's inputs (the differentiated one a leaf that requires grad)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if op == "gmml_sample":  # the sampler's state: each call draws new blocks
        b, h, w = shape
        return dict(generator=gen, batch=b, height=h, width=w)
    if op == "gmml":
        b, _, h, w = shape
        return dict(x=torch.randn(shape, device=device, generator=gen).to(dtype),
                    blocks=ops.sample_gmml_blocks(b, h, w, generator=gen, device=device))
    if op == "masked_l1":  # pred in the model's dtype; the clean view stays fp32, as the trainer passes it
        mask_shape = (shape[0], 1, *shape[2:])
        return dict(pred=torch.randn(shape, device=device, generator=gen).to(dtype).requires_grad_(),
                    target=torch.randn(shape, device=device, generator=gen),
                    mask=torch.rand(mask_shape, device=device, generator=gen) < 0.5)
    if op.startswith("head_"):  # unit-norm features and weight rows, as the weight-normalised head gives
        n, d, k = shape

        def unit(rows: int) -> torch.Tensor:
            return torch.nn.functional.normalize(torch.randn(rows, d, device=device, generator=gen), dim=-1).to(dtype)

        return dict(h_s=unit(n).requires_grad_(), h_t=unit(n), weight=unit(k).requires_grad_(), teacher_weight=unit(k),
                    center=torch.randn(k, device=device, generator=gen))
    n, k = shape
    return dict(student=torch.randn(shape, device=device, generator=gen).to(dtype).requires_grad_(),
                teacher=torch.randn(shape, device=device, generator=gen).to(dtype),
                center=torch.randn(k, device=device, generator=gen))


def op_bytes(op: str, shape: tuple[int, ...], inputs: dict) -> int:
    """Minimal traffic of one call (``bench/kernel_report.py``'s formulas; each input counted once)."""
    if op == "gmml_sample":
        return kr.gmml_sample_bytes(shape[0])
    if op == "gmml":
        x = inputs["x"]
        return kr.gmml_bytes(*x.shape, x.element_size(), kr.PATCH, inputs["blocks"].boxes.shape[1])
    if op == "masked_l1":
        pred, target, mask = inputs["pred"], inputs["target"], inputs["mask"]
        return kr.masked_l1_bytes(pred.numel(), pred.element_size(), target.element_size(),
                                  mask.numel() * mask.element_size())
    if op.startswith("head_"):
        return head_bytes(*shape, inputs["h_s"].element_size())
    return kr.distill_ce_bytes(*shape, inputs["student"].element_size())


def head_bytes(n: int, d: int, k: int, itemsize: int) -> int:
    """Output layer + distillation loss, forward + backward, without the logits in memory: ``h_s``, ``h_t``,
    ``W`` and ``W_t`` read, the fp32 centre read and teacher sums written, ``dh_s`` written, the fp32 ``dW``
    written, and both gradients read and written once more by the backward's scaling."""
    grads = n * d * itemsize + 4 * k * d
    return (2 * n * d + 2 * k * d) * itemsize + 8 * k + 3 * grads


def make_call(op: str, provider: str):
    """``call(inputs)``: one forward + backward (GMML: forward), gradients reset to ``None`` first."""
    if op == "gmml_sample":
        backend = "triton" if provider == "triton" else "reference"

        def loss(generator, batch, height, width):
            return ops.sample_gmml_blocks(batch, height, width, generator=generator, device=generator.device,
                                          budget=kr.GMML_BUDGET, backend=backend)
    elif op == "gmml":
        if provider == "triton":
            def loss(x, blocks):
                return ops.gmml_corrupt(x, blocks, kr.PATCH, backend="triton")
        else:
            def loss(x, blocks):
                return ops.gmml_corrupt_reference(x, blocks, kr.PATCH)
    elif op == "masked_l1":
        if provider == "triton":
            def loss(pred, target, mask):
                return ops.masked_l1_loss(pred, target, mask, backend="triton")
        else:
            loss = ops.masked_l1_loss_reference
    elif op.startswith("head_"):
        if provider == "triton":
            def loss(h_s, h_t, weight, teacher_weight, center):
                return ops.linear_centered_softmax_cross_entropy(h_s, h_t, weight, center, 0.1, 0.04,
                                                                 teacher_weight=teacher_weight, backend="triton").loss
        else:
            def loss(h_s, h_t, weight, teacher_weight, center):
                return ops.linear_centered_softmax_cross_entropy_reference(h_s, h_t, weight, center, 0.1, 0.04,
                                                                           teacher_weight=teacher_weight).loss
    elif provider == "triton":
        def loss(student, teacher, center):
            return ops.centered_softmax_cross_entropy(student, teacher, center, 0.1, 0.04, backend="triton").loss
    else:
        def loss(student, teacher, center):
            return ops.centered_softmax_cross_entropy_reference(student, teacher, center, 0.1, 0.04).loss
    if provider == "ref_compiled":
        loss = torch.compile(loss, dynamic=False)

    def call(inputs: dict):
        for t in inputs.values():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.grad = None
        out = loss(**inputs)
        if op not in FORWARD_ONLY:
            out.backward()
        return out

    return call


def n_copies(one_copy_bytes: int) -> int:
    """Input copies to cycle through: at least ``MIN_COPIES`` and ``ROTATE_BYTES`` in all (on CUDA)."""
    if not CUDA:
        return MIN_COPIES
    return max(MIN_COPIES, -(-ROTATE_BYTES // max(one_copy_bytes, 1)))


def _input_bytes(inputs: dict) -> int:
    total = 0
    for value in inputs.values():
        for t in (value if isinstance(value, tuple) else (value,)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------- timing


def device_ms(call, copies: list, device: torch.device, graph: bool = True,
              calls: int = GRAPH_CALLS) -> tuple[float, str]:
    """Median device time of one ``call`` over ``calls`` calls cycling through ``copies``, and the
    method: ``cudagraph`` (captured once, replayed ``REPLAYS`` times between events), ``events`` (calls
    queued between events, when a call cannot be captured) or ``cpu-wall`` (no CUDA)."""
    calls = max(calls, len(copies))
    if device.type != "cuda":
        times = []
        for i in range(len(copies)):
            t0 = time.perf_counter()
            call(copies[i])
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3, "cpu-wall"
    side = torch.cuda.Stream(device)  # warm-up (compilation, autotuning, allocator) off the default stream
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for copy in copies:
            call(copy)
    torch.cuda.current_stream(device).wait_stream(side)
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    method = "events"
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(calls):
                    call(copies[i % len(copies)])
            g.replay()
            sync(device)
            times = []
            for _ in range(REPLAYS):
                start.record()
                g.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / calls)
            return statistics.median(times), "cudagraph"
        except Exception as err:  # noqa: BLE001 - a capture failure falls back to queued calls, and says so
            sync(device)
            method = f"events ({type(err).__name__} in capture)"
    times = []
    for _ in range(REPLAYS):
        start.record()
        for i in range(calls):
            call(copies[i % len(copies)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times), method


def host_us(call, copies: list, device: torch.device) -> float:
    """Wall time per call without synchronisation (µs), over ``HOST_CALLS`` calls."""
    sync(device)
    t0 = time.perf_counter()
    for i in range(HOST_CALLS):
        call(copies[i % len(copies)])
    elapsed = time.perf_counter() - t0
    sync(device)
    return elapsed / HOST_CALLS * 1e6


@pytest.fixture(scope="module")
def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth (GB/s, read + write bytes), timed as the ops are: a graph of copies."""
    nbytes = COPY_BYTES if CUDA else 32 * 2**20
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms, _ = device_ms(lambda _: dst.copy_(src), [None] * MIN_COPIES, device, calls=10)  # 10 x 1 GB: a few ms
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------- peak memory (fresh process)


def peak_mem_mb(op: str, shape: tuple[int, ...], dname: str, provider: str) -> float:
    """Incremental peak memory of one call (MiB), from this file run as a script in a fresh process."""
    cmd = [sys.executable, __file__, "--peak", op, "x".join(map(str, shape)), dname, provider]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory process failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mem_mb"]


def _peak_main(op: str, shape: str, dname: str, provider: str) -> None:
    device = torch.device("cuda")
    inputs = make_inputs(op, tuple(int(s) for s in shape.split("x")), DTYPES[dname], device, seed=0)
    call = make_call(op, provider)
    call(inputs)  # warm-up: compilation and the kernels' first launch
    for t in inputs.values():
        if isinstance(t, torch.Tensor):
            t.grad = None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    call(inputs)
    sync(device)
    print(json.dumps({"peak_mem_mb": (torch.cuda.max_memory_allocated(device) - base) / 2**20}))


# ---------------------------------------------------------------- the benchmark


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("op,shape", CASES, ids=[f"{o}-{'x'.join(map(str, s))}" for o, s in CASES])
def test_bench(benchmark, op, shape, dname, provider, device, copy_bandwidth):
    if provider == "triton" and not CUDA:
        pytest.skip("Triton kernels need a CUDA device (the interpreter is a correctness tool, not a benchmark)")
    if provider == "ref_compiled" and not CUDA:
        pytest.skip("torch.compile of the reference takes tens of seconds per case on a CPU; measured on CUDA")
    if op == "gmml_sample" and (dname != "fp32" or provider == "ref_compiled"):
        pytest.skip("sampling has no data dtype, and is timed eager against Triton")
    if os.environ.get("ASIT_BENCH_PEAK") == "only":  # the peak memory alone (a fresh process per case)
        if not CUDA:
            pytest.skip("ASIT_BENCH_PEAK=only measures CUDA memory")
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # a row to carry extra_info, no timing
        benchmark.extra_info.update(peak_mem_mb=peak_mem_mb(op, shape, dname, provider), untimed=True,
                                    device=torch.cuda.get_device_name(device), torch=torch.__version__,
                                    triton=triton.__version__)
        return
    dtype = DTYPES[dname]
    first = make_inputs(op, shape, dtype, device, seed=0)
    copies = [first] + [make_inputs(op, shape, dtype, device, seed=i) for i in range(1, n_copies(_input_bytes(first)))]
    nbytes = op_bytes(op, shape, first)
    call = make_call(op, provider)
    # the eager GMML reference reads the boxes back to the host: not capturable; the sampler: see the docstring
    ms, method = device_ms(call, copies, device,
                           graph=not ((op == "gmml" and provider != "triton") or op == "gmml_sample"))
    host = host_us(call, copies, device)

    def run():
        call(first)
        sync(device)

    benchmark.pedantic(run, rounds=20 if CUDA else 3, iterations=1, warmup_rounds=1)
    gbps = nbytes / (ms * 1e-3) / 1e9
    info = dict(device_ms=ms, device_gbps=gbps, copy_gbps=copy_bandwidth, copy_frac=gbps / copy_bandwidth,
                host_us=host, bytes=nbytes, rotate=len(copies), device_method=method,
                device=torch.cuda.get_device_name(device) if CUDA else platform.processor() or "cpu",
                torch=torch.__version__, triton=triton.__version__)
    if op.startswith("head_"):
        info["tflops"] = 8 * shape[0] * shape[1] * shape[2] / (ms * 1e-3) / 1e12
    copies.clear()
    if CUDA and os.environ.get("ASIT_BENCH_PEAK", "1") != "0":
        torch.cuda.empty_cache()  # the fresh process measures its own increment, but needs the room
        info["peak_mem_mb"] = peak_mem_mb(op, shape, dname, provider)
    benchmark.extra_info.update(info)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--peak":
        _peak_main(*sys.argv[2:])
    else:
        sys.exit("usage: python bench/test_bench_ops.py --peak OP SHAPE DTYPE PROVIDER (pytest runs the bench)")
