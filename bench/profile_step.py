"""Where a training step's time goes: torch.profiler over a few warm steps, summarised as JSON.

:func:`profile_steps` runs a step function under the profiler (CPU and, on CUDA, device activity), writes
the Chrome trace (open it in Perfetto or chrome://tracing) and a JSON summary next to it:

- ``parts``: device time per step grouped by part of the step. A kernel launched inside one of the
  ranges the Pretrainer names (``asit.gmml``, ``asit.losses``, ``asit.clip``, ``asit.ema``, the rest of
  ``asit.update`` and AdamW's own ``Optimizer.step`` range) belongs to that part; any other kernel (the
  forward and backward passes, losses' backward included) is sorted by its name into ``gemm``,
  ``attention`` (flash / fused attention kernels and the naive softmax; the naive attention's two batched
  matmuls count as ``gemm``), ``memcpy`` or ``elementwise`` (everything else: norms, GELU, adds, casts).
- ``top_kernels``: the kernels with the most device time per step, each with its part and calls per step.
- ``launches_per_step``; ``device_busy_ms`` and ``device_idle_ms`` per step: within the span from a step's
  first kernel start to its last kernel end, the time no kernel ran (the device waiting for the host).

On a machine without CUDA the "kernels" are the CPU profiler's outermost operators (``aten::linear``,
``autograd::engine::evaluate_function: AddmmBackward0``, ...), so the grouping and the writer are
testable on a tiny model; those numbers say nothing about a GPU.

    from profile_step import profile_steps
    summary = profile_steps(lambda: trainer.train_step(batch, epoch=1), out_dir=out, name="vit-b-fast")
"""

from __future__ import annotations

import bisect
import gzip
import json
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

__all__ = ["PARTS", "classify_kernel", "profile_steps", "summarize_trace"]

STEP_RANGE = "asit.step"
PARTS = ("gemm", "attention", "elementwise", "memcpy", "losses", "gmml", "clip", "optimizer", "ema")
# ranges whose kernels belong to one part whatever their names (innermost range wins)
_RANGE_PARTS = {"asit.gmml": "gmml", "asit.losses": "losses", "asit.clip": "clip", "asit.ema": "ema",
                "asit.update": "optimizer"}
_OPTIMIZER_RANGE = re.compile(r"^Optimizer\.(step|zero_grad)")
_GEMM = re.compile(r"gemm|matmul|cutlass|xmma|nvjet|cublas|wgrad|dgrad|conv2d|implicit_convolve|triton_tem_"
                   r"|^aten::(mm|addmm|bmm|baddbmm|linear|_convolution|convolution|mkldnn_convolution)$"
                   r"|(addmm|mm|bmm|convolution)backward")
_ATTENTION = re.compile(r"flash|fmha|attention|sdpa|softmax|cudnn.*attn", re.IGNORECASE)
_MEMCPY = re.compile(r"memcpy|memset|^aten::copy_$|^aten::to$|^aten::_to_copy$", re.IGNORECASE)
_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
_RANGE_CATS = ("user_annotation", "cpu_op")  # host-side ranges (the device timeline repeats them)


def classify_kernel(name: str, range_name: str | None = None) -> str:
    """The part (one of :data:`PARTS`) of a kernel or leaf operator called ``name``, launched inside the
    innermost profiler range ``range_name`` (None: outside every range this module knows)."""
    if range_name is not None:
        if range_name in _RANGE_PARTS:
            return _RANGE_PARTS[range_name]
        if _OPTIMIZER_RANGE.match(range_name):
            return "optimizer"
    if _MEMCPY.search(name):
        return "memcpy"
    if _ATTENTION.search(name):
        return "attention"
    if _GEMM.search(name.lower()):
        return "gemm"
    return "elementwise"


def _events(trace: dict | list) -> list[dict]:
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def _outermost_cpu_ops(ops: list[dict]) -> list[dict]:
    """CPU operators not inside another operator on the same thread."""
    by_tid: dict[Any, list[dict]] = defaultdict(list)
    for e in ops:
        by_tid[e.get("tid")].append(e)
    outer = []
    for evs in by_tid.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        end = float("-inf")
        for e in evs:
            if float(e["ts"]) >= end:
                outer.append(e)
                end = float(e["ts"]) + float(e["dur"])
    return outer


def _kernels(events: list[dict]) -> tuple[list[dict], str]:
    """``(kernels, kind)``: device kernels with their launch time (``launch_ts``), or the outermost CPU
    operators."""
    device = [e for e in events if e.get("cat") in _DEVICE_CATS]
    if device:
        launches = {e["args"]["correlation"]: float(e["ts"]) for e in events
                    if e.get("cat") in _LAUNCH_CATS and "correlation" in e.get("args", {})}
        out = []
        for e in device:
            corr = e.get("args", {}).get("correlation")
            out.append({**e, "launch_ts": launches.get(corr, float(e["ts"]))})
        return out, "device"
    outer = _outermost_cpu_ops([e for e in events if e.get("cat") == "cpu_op"])
    return [{**e, "launch_ts": float(e["ts"])} for e in outer], "cpu"


class _Ranges:
    """The profiler ranges (record_function) of interest, for innermost-range lookups by time. Ranges on
    any thread count: the autograd engine launches the backward's kernels from its own thread while the
    main thread waits inside ``asit.backward``."""

    def __init__(self, events: list[dict]) -> None:
        wanted = [e for e in events if e.get("cat") in _RANGE_CATS
                  and (e["name"].startswith("asit.") or _OPTIMIZER_RANGE.match(e["name"]))]
        self.ranges = sorted(((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in wanted),
                             key=lambda r: r[0])
        self.starts = [r[0] for r in self.ranges]

    def innermost(self, ts: float, names: Callable[[str], bool] = lambda n: n != STEP_RANGE) -> str | None:
        best = None
        for start, end, name in self.ranges[: bisect.bisect_right(self.starts, ts)]:
            if start <= ts <= end and names(name) and (best is None or start >= best[0]):
                best = (start, name)
        return best[1] if best else None


def _busy(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``intervals``."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def summarize_trace(trace: dict | list, *, top: int = 25) -> dict[str, Any]:
    """The summary (see the module docstring) of a Chrome trace whose steps ran inside ``asit.step``
    ranges. Times in ms per step."""
    events = _events(trace)
    steps = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
                   if e["name"] == STEP_RANGE and e.get("cat") in _RANGE_CATS)
    if not steps:
        raise ValueError(f"the trace has no {STEP_RANGE!r} ranges: run each step inside record_function"
                         f"({STEP_RANGE!r})")
    kernels, kind = _kernels(events)
    ranges = _Ranges(events)
    step_starts = [s for s, _ in steps]
    per_step: list[list[tuple[float, float]]] = [[] for _ in steps]
    parts: dict[str, float] = dict.fromkeys(PARTS, 0.0)
    by_kernel: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    counted = 0
    for k in kernels:
        i = bisect.bisect_right(step_starts, k["launch_ts"]) - 1
        if i < 0 or k["launch_ts"] > steps[i][1]:
            continue  # launched outside the profiled steps
        part = classify_kernel(k["name"], ranges.innermost(k["launch_ts"]))
        dur = float(k["dur"])
        parts[part] += dur
        entry = by_kernel[(k["name"][:160], part)]
        entry[0] += dur
        entry[1] += 1
        per_step[i].append((float(k["ts"]), float(k["ts"]) + dur))
        counted += 1
    n = len(steps)
    busy = [_busy(iv) for iv in per_step]
    spans = [(max(e for _, e in iv) - min(s for s, _ in iv)) if iv else 0.0 for iv in per_step]
    busy_ms, span_ms = sum(busy) / n / 1e3, sum(spans) / n / 1e3
    total = sum(parts.values()) or 1.0
    ranked = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "kernels_from": kind,
        "steps": n,
        "step_wall_ms": sum(e - s for s, e in steps) / n / 1e3,
        "launches_per_step": counted / n,
        "device_busy_ms": busy_ms,
        "device_span_ms": span_ms,
        "device_idle_ms": span_ms - busy_ms,
        "device_idle_fraction": (span_ms - busy_ms) / span_ms if span_ms else 0.0,
        "parts_ms": {p: v / n / 1e3 for p, v in parts.items()},
        "parts_share": {p: v / total for p, v in parts.items()},
        "top_kernels": [{"name": name, "part": part, "ms_per_step": v[0] / n / 1e3, "calls_per_step": v[1] / n}
                        for (name, part), v in ranked],
    }


def profile_steps(step: Callable[[], Any], *, out_dir: str | Path, name: str, steps: int = 3, warmup: int = 2,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``step`` ``warmup`` times, then ``steps`` times under torch.profiler (each inside an
    ``asit.step`` range); write ``<out_dir>/<name>.trace.json.gz`` (Chrome trace, gzipped: Perfetto opens
    it as it is) and ``<out_dir>/<name>.profile.json`` (:func:`summarize_trace` plus ``extra``) and return
    the summary."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP_RANGE):
                step()
        sync()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"{name}.trace.json"
    prof.export_chrome_trace(str(raw))
    with open(raw, encoding="utf-8") as fh:
        trace = json.load(fh)
    trace_path = out / f"{name}.trace.json.gz"
    with open(raw, "rb") as src, gzip.open(trace_path, "wb", compresslevel=6) as dst:
        dst.write(src.read())
    raw.unlink()
    summary = summarize_trace(trace)
    summary = {"name": name, "device": torch.cuda.get_device_name() if cuda else "cpu", **(extra or {}),
               **summary, "trace": trace_path.name}
    (out / f"{name}.profile.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
