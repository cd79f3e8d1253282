"""Kernel report: how every kernel the fused ops launch at the design shapes compiles for sm_90 and sm_80.

Runs on a machine without a GPU. For each case (op, shape, dtype) it asks the kernels' own
``*_launches`` functions, on meta tensors, for the launches the op would run — the same kernels,
grids, constexprs and ``num_warps`` — specialises the arguments as Triton's launcher does,
compiles each launch with ``triton.compile`` for a ``GPUTarget`` and reads registers, stack,
local (spill) and shared memory from the cubin with ``cuobjdump -res-usage``. From those it
derives the resident blocks per SM (registers × threads against 65,536 per SM, shared memory
against 228 KB on sm_90 / 164 KB on sm_80, 32 blocks and 2,048 threads per SM) and how the grid
covers the SMs (132 on an H100 SXM, 108 on an A100). ``min MB`` counts every tensor argument of a
launch read or written once; ``floor µs`` is that traffic at 3.0 TB/s. ``op MB`` is the minimal traffic
of the whole op call the launch belongs to, from the byte formulas below (:func:`distill_ce_bytes`,
:func:`masked_l1_bytes`, :func:`gmml_bytes`, :func:`gmml_sample_bytes`), which ``bench/test_bench_ops.py``
imports for its GB/s.

    python bench/kernel_report.py [--arch 90 80] [--hot] [--json rows.json]

The compile needs real (not interpreted) kernels: the script drops ``TRITON_INTERPRET`` before
importing Triton, so run it as its own process. Triton's cache goes to ``$ASIT_CACHE/triton-report``
(or a temporary directory), never to ``~/.triton``.
"""

from __future__ import annotations

import os
import sys
import tempfile

if __name__ == "__main__":  # before anything imports triton: the @jit decorator reads this flag
    os.environ.pop("TRITON_INTERPRET", None)
    _cache = os.path.join(os.environ.get("ASIT_CACHE") or tempfile.gettempdir(), "triton-report")
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_cache, "cache"))
    os.environ.setdefault("TRITON_HOME", _cache)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

# The GPU each architecture stands for: SM count, shared memory per SM, registers per SM, limits.
GPUS = {
    90: dict(gpu="H100 SXM", sms=132, smem=228 * 1024),
    80: dict(gpu="A100", sms=108, smem=164 * 1024),
}
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
RESERVED_SMEM_PER_BLOCK = 1024  # the driver's per-block reservation on sm_80 and later
HBM_BYTES_PER_S = 3.0e12  # measured H100 copy bandwidth (DESIGN §3)

# Design shapes (DESIGN §1–3): batch 64, two global views of 592 × 128, patch 16, 296 tokens a view.
BATCH, VIEWS, FRAMES, MELS, PATCH = 64, 2, 592, 128, 16
LOCAL_ROWS, LOCAL_K = VIEWS * BATCH * (FRAMES // PATCH) * (MELS // PATCH), 1024  # 37,888 × 1,024
GLOBAL_ROWS, GLOBAL_KS = VIEWS * BATCH, (8192, 65536)
HEAD_CHUNK_ROWS = 4096  # rows per chunk of asit.ops.linear_centered_softmax_cross_entropy (its default)
GMML_BUDGET = 256  # gmml.candidate_budget: box slots per sample
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# One-program epilogues of a hot op: reported, but not held to the occupancy and grid rules.
EPILOGUES: set[str] = {"gmml_prefix_kernel"}  # one program per sample: a running sum over its histogram
META = torch.device("meta")


# ---------------------------------------------------------------- minimal bytes of each op call
# What an op must move at the least: every input read once and every output written once. With a
# gradient, the forward writes the unscaled gradient once and the backward reads and writes it once
# to scale it by the upstream gradient (unknown until then): the traffic of an autograd op whose
# forward and backward are separate calls.


def distill_ce_bytes(n: int, k: int, itemsize: int, need_grad: bool = True) -> int:
    """Centred softmax cross-entropy over ``n × k`` logits of ``itemsize`` bytes: student, teacher and the
    fp32 centre read once, fp32 row losses and teacher column sums written; with ``need_grad``, the
    gradient written (forward), then read and written (backward), and the fp32 per-row upstream gradient read."""
    nbytes = 2 * n * k * itemsize + 4 * k + 4 * n + 4 * k
    if need_grad:
        nbytes += 3 * n * k * itemsize + 4 * n
    return nbytes


def masked_l1_bytes(numel: int, pred_itemsize: int, target_itemsize: int, mask_bytes: int,
                    need_grad: bool = True) -> int:
    """Masked L1 over ``numel`` elements: pred, target and the mask (``mask_bytes`` as stored, before any
    broadcast) each read once; with ``need_grad``, the gradient in pred's dtype written (forward), then
    read and written (backward)."""
    nbytes = numel * (pred_itemsize + target_itemsize) + mask_bytes
    if need_grad:
        nbytes += 3 * numel * pred_itemsize
    return nbytes


def gmml_bytes(batch: int, channels: int, height: int, width: int, itemsize: int, patch: int,
               box_slots: int = GMML_BUDGET) -> int:
    """GMML corruption (forward only): the view read once and the corrupted view written once, the bool
    mask ``[B, 1, H, W]`` and the fp32 token fractions written, the int32 boxes and per-sample alien flag
    and source index read. (An alien sample's fill re-reads pixels of the view, already counted.)"""
    pixels = batch * channels * height * width
    return (2 * pixels * itemsize + batch * height * width + 4 * batch * (height // patch) * (width // patch)
            + 16 * batch * box_slots + 9 * batch)


def gmml_sample_bytes(batch: int, box_slots: int = GMML_BUDGET, box_itemsize: int = 8) -> int:
    """GMML sampling's prefix search: the candidate boxes (int64 as drawn) and the fp32 targets read, the
    int64 counts written. The kernels' per-sample histogram (int32, zeroed, added to, read) is counted too:
    the search cannot do without one."""
    return batch * box_slots * 4 * box_itemsize + 4 * batch + 8 * batch + 3 * 4 * batch * box_slots


@dataclass(frozen=True)
class Case:
    """One op call at a design shape; ``build`` returns its launches (on meta tensors)."""

    op: str
    shape: str
    dtype: str
    hot: bool
    build: Callable[[], list]
    op_bytes: int = 0  # minimal traffic of the op call (the formulas above)


@dataclass
class Row:
    """One compiled launch and what it implies on the target GPU."""

    arch: int
    op: str
    shape: str
    dtype: str
    kernel: str
    hot: bool
    constexprs: str
    num_warps: int
    regs: int
    spill_bytes: int  # stack frame + local memory per thread (spills land in the stack frame)
    stack_bytes: int
    local_bytes: int
    smem_bytes: int
    blocks_per_sm: int
    limited_by: str
    programs: int
    sms: int
    waves: float
    fills_gpu: bool
    min_mb: float
    floor_us: float
    op_mb: float


def launch_name(launch) -> str:
    """The kernel's name without underscores, as the report prints it."""
    return launch.kernel.fn.__name__.strip("_")


def hot_keys(cases: list[Case]) -> list[tuple[str, str, str, str]]:
    """``(op, shape, dtype, kernel)`` of every hot launch, without compiling anything."""
    return [(c.op, c.shape, c.dtype, launch_name(launch)) for c in cases if c.hot for launch in c.build()
            if launch_name(launch) not in EPILOGUES]


def _meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device=META)


def design_cases() -> list[Case]:
    """Every op call of a training step at the design shapes, fp32 and bf16."""
    import asit_kernels.distill_ce as ce
    import asit_kernels.gmml as gmml
    import asit_kernels.gmml_sample as sample
    import asit_kernels.masked_l1 as l1

    cases = []
    temp = _meta((), torch.float32)
    for dname, dtype in DTYPES.items():
        for label, n, k in [("local", LOCAL_ROWS, LOCAL_K)] + [("global", GLOBAL_ROWS, k) for k in GLOBAL_KS]:
            shape = f"{label} {n}x{k}"

            def fwd(n=n, k=k, dtype=dtype, need_grad=True):
                s, t, c = _meta((n, k), dtype), _meta((n, k), dtype), _meta((k,), torch.float32)
                return ce.distill_ce_forward_launches(s, t, c, temp, temp, need_grad)[1]

            def bwd(n=n, k=k, dtype=dtype):
                return ce.distill_ce_backward_launches(_meta((n, k), dtype), _meta((n,), torch.float32))

            size = dtype.itemsize
            cases.append(Case("distill_ce fwd+grad", shape, dname, True, fwd, distill_ce_bytes(n, k, size)))
            cases.append(Case("distill_ce fwd (no grad)", shape, dname, False, lambda f=fwd: f(need_grad=False),
                              distill_ce_bytes(n, k, size, need_grad=False)))
            cases.append(Case("distill_ce bwd", shape, dname, True, bwd, distill_ce_bytes(n, k, size)))

        # loss.fused_head: the CE kernel on one row chunk of the local loss (linear_distill_ce's default chunk);
        # the fused op scales its own dh and dW, so no CE backward launch
        def chunk_fwd(dtype=dtype, n=HEAD_CHUNK_ROWS, k=LOCAL_K):
            s, t, c = _meta((n, k), dtype), _meta((n, k), dtype), _meta((k,), torch.float32)
            return ce.distill_ce_forward_launches(s, t, c, temp, temp, True)[1]

        cases.append(Case("distill_ce fwd+grad (fused head chunk)", f"chunk {HEAD_CHUNK_ROWS}x{LOCAL_K}", dname, True,
                          chunk_fwd, distill_ce_bytes(HEAD_CHUNK_ROWS, LOCAL_K, dtype.itemsize)))

        # the loss sees both views at once: pred in the model's dtype, the fp32 clean view as it comes
        view = (VIEWS * BATCH, 1, FRAMES, MELS)
        numel = VIEWS * BATCH * FRAMES * MELS
        for need_grad in (True, False):
            def l1_fwd(dtype=dtype, need_grad=need_grad, view=view):
                return l1.masked_l1_forward_launches(_meta(view, dtype), _meta(view, torch.float32),
                                                     _meta(view, torch.bool), need_grad)[1]

            cases.append(Case(f"masked_l1 fwd{'+grad' if need_grad else ' (no grad)'}", "x".join(map(str, view)),
                              dname, need_grad, l1_fwd, masked_l1_bytes(numel, dtype.itemsize, 4, numel, need_grad)))

        def l1_bwd(dtype=dtype, view=view):
            return l1.masked_l1_backward_launches(_meta(view, dtype), temp, temp)

        cases.append(Case("masked_l1 bwd", "x".join(map(str, view)), dname, True, l1_bwd,
                          masked_l1_bytes(numel, dtype.itemsize, 4, numel)))

        def gmml_fwd(dtype=dtype):
            x = _meta((BATCH, 1, FRAMES, MELS), dtype)
            boxes = _meta((BATCH, GMML_BUDGET, 4), torch.int32)
            return gmml.gmml_forward_launches(x, boxes, _meta((BATCH,), torch.bool), _meta((BATCH,), torch.int64),
                                              PATCH)[1]

        cases.append(Case("gmml", f"{BATCH}x1x{FRAMES}x{MELS}", dname, True, gmml_fwd,
                          gmml_bytes(BATCH, 1, FRAMES, MELS, dtype.itemsize, PATCH)))

    def gmml_sample():  # the sampler's draws are int64 and its targets fp32 whatever the model's dtype
        boxes = _meta((BATCH, GMML_BUDGET, 4), torch.int64)
        return sample.gmml_prefix_launches(boxes, _meta((BATCH,), torch.float32), FRAMES, MELS)[1]

    cases.append(Case("gmml sample (prefix)", f"{BATCH}x{FRAMES}x{MELS} budget {GMML_BUDGET}", "int64", True,
                      gmml_sample, gmml_sample_bytes(BATCH)))
    return cases


def _cuobjdump() -> str:
    import triton

    shipped = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(shipped) if shipped.exists() else shutil.which("cuobjdump")
    if not found:
        raise RuntimeError("cuobjdump not found (expected in triton/backends/nvidia/bin/)")
    return found


def _resources(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the one function in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not found:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{text}")
    return dict(zip(("regs", "stack", "shared", "local"), map(int, found.groups())))


def specialize(launch, arch: int):
    """``(source, options, target)`` of one launch for ``sm_<arch>``, specialised as Triton's launcher does.

    Mirrors ``JITFunction.run``: the binder turns the arguments into a signature (pointer dtypes,
    ``i32``/``i64``, ints equal to 1 as constexprs) and alignment attributes (16-byte divisibility).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = launch.kernel
    if not isinstance(kernel, JITFunction):
        raise RuntimeError("kernels were imported under TRITON_INTERPRET=1; run the report as its own process")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(launch.kwargs), bound, specialization,
                                                              options)
    return ASTSource(kernel, signature, constexprs, attrs), options, target


def compile_resources(launch, arch: int, memo: dict) -> tuple[dict[str, int], int]:
    """``(cuobjdump resources, num_warps)`` of a launch; identical specialisations are compiled once."""
    import triton

    src, options, target = specialize(launch, arch)
    key = (arch, src.hash(), repr(sorted(options.__dict__.items())))
    if key not in memo:
        compiled = triton.compile(src, target=target, options=options.__dict__)
        res = _resources(compiled.asm["cubin"])
        res["shared"] += compiled.metadata.shared  # static (cubin) + dynamic (launch) shared memory
        memo[key] = res, compiled.metadata.num_warps
    return memo[key]


def blocks_per_sm(regs: int, threads: int, smem: int, arch: int) -> tuple[int, str]:
    """Resident blocks per SM and the resource that limits them (CUDA occupancy rules)."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    limits = {
        "regs": (REGS_PER_SM // regs_per_warp) // warps,
        "smem": GPUS[arch]["smem"] // (smem + RESERVED_SMEM_PER_BLOCK),
        "threads": MAX_THREADS_PER_SM // threads,
        "blocks": MAX_BLOCKS_PER_SM,
    }
    which = min(limits, key=limits.get)
    return limits[which], which


def _min_bytes(launch) -> int:
    return sum(a.numel() * a.element_size() for a in launch.args if isinstance(a, torch.Tensor))


def report(cases: list[Case], archs: tuple[int, ...] = (90, 80)) -> list[Row]:
    """Compile every launch of ``cases`` for each arch (identical configurations compiled once)."""
    rows, memo = [], {}
    for arch in archs:
        sms = GPUS[arch]["sms"]
        for case in cases:
            for launch in case.build():
                consts = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in launch.kwargs.items()
                                  if k not in ("num_warps", "num_stages"))
                res, warps = compile_resources(launch, arch, memo)
                smem = res["shared"]
                blocks, limit = blocks_per_sm(res["regs"], warps * 32, smem, arch)
                programs = 1
                for g in launch.grid:
                    programs *= g
                nbytes = _min_bytes(launch)
                name = launch_name(launch)
                rows.append(Row(
                    arch=arch, op=case.op, shape=case.shape, dtype=case.dtype, kernel=name,
                    hot=case.hot and name not in EPILOGUES, constexprs=consts,
                    num_warps=warps, regs=res["regs"], spill_bytes=res["stack"] + res["local"],
                    stack_bytes=res["stack"], local_bytes=res["local"],
                    smem_bytes=smem, blocks_per_sm=blocks, limited_by=limit, programs=programs, sms=sms,
                    waves=round(programs / (sms * max(blocks, 1)), 2), fills_gpu=programs >= sms * max(blocks, 1),
                    min_mb=round(nbytes / 1e6, 2), floor_us=round(nbytes / HBM_BYTES_PER_S * 1e6, 1),
                    op_mb=round(case.op_bytes / 1e6, 2)))
    return rows


def format_table(rows: list[Row]) -> str:
    """Plain-text table, one line per launch."""
    head = ("sm", "op", "shape", "dtype", "kernel", "constexprs", "warps", "regs", "spill", "smem",
            "blk/SM", "limit", "programs", "waves", "min MB", "floor µs", "op MB")
    body = [(f"sm_{r.arch}", r.op + (" *" if r.hot else ""), r.shape, r.dtype, r.kernel, r.constexprs, r.num_warps,
             r.regs, r.spill_bytes, r.smem_bytes, r.blocks_per_sm, r.limited_by, f"{r.programs}/{r.sms}",
             r.waves, r.min_mb, r.floor_us, r.op_mb) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(* = hot: held to no spills, >= 2 blocks/SM and a full first wave by the CPU test)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(GPUS))
    parser.add_argument("--hot", action="store_true", help="only the hot configurations")
    parser.add_argument("--json", type=Path, help="also write the rows here as JSON")
    args = parser.parse_args(argv)
    cases = [c for c in design_cases() if c.hot or not args.hot]
    rows = report(cases, tuple(args.arch))
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
