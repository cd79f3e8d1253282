"""Training-step throughput: the whole ASiT step (GMML, student forward + backward on the corrupted
views, teacher forward on the clean views, losses, clipping, AdamW, EMA, centres) in ``fast`` and
``authors`` mode, and fast mode with each lever switched on, interleaved in one process.

``test_modes``: per architecture (ViT-S and ViT-B at batch 64, 592 × 128 on CUDA), fast and authors
trainers built side by side; each timed round runs ``STEPS`` steps of every variant in turn (one device
sync per round, CUDA events), so the modes see the same machine state. ``test_levers``: ViT-B fast mode
against fast mode with one switch changed (:data:`LEVERS`; ``ASIT_BENCH_LEVERS=a,b`` picks some; variants
are built until ``ASIT_BENCH_LEVER_BUDGET_S`` of setup and compile time is spent).

Reported per variant: ms per step (median round), samples/s, achieved TFLOP/s (the step's FLOPs counted
once per architecture on the eager fast step with ``torch.utils.flop_counter``; the same useful work for
every variant), MFU against the bf16 matmul rate measured in this run (an 8192³ GEMM timed with CUDA
events) and against the device's spec peak (:data:`SPEC_PEAK_TFLOPS`), peak memory (what the variant
holds between steps plus its step's peak above that, as if it ran alone), speed-ups (fast
against authors, each lever against fast), and for the authors mode the per-sample CPU GMML collate time
of one batch (in a real run the loader workers overlap it with the GPU, so it is not in the step time).
``test_modes`` also profiles a few steps of each mode (``bench/profile_step.py``).

Output: ``$ASIT_BENCH_OUT`` (default: the test's temp dir) gets ``train_<test>.json`` and ``.md``
(rewritten after every round, so an interrupted run leaves its figures), ``train_summary.md`` and
``profiles/`` (summary JSON and gzipped Chrome trace per variant); with
``ASIT_BENCH_ROWS=<file.csv>`` the figures are appended as rows (``bench/results.py``). Batches are
synthetic and pinned, as the trainer's loader gives them. Without CUDA: a tiny model and 2 steps per
round, so ``pytest bench/`` checks that the benchmark runs; those figures say nothing about a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import torch
from profile_step import profile_steps
from results import append_rows
from torch.utils.flop_counter import FlopCounterMode

from asit.config import load_config
from asit.data import collate_pretrain
from asit.data.gmml_cpu import ReferenceGMMLCollate
from asit.models.vit import flash_attn_available
from asit.train import Pretrainer

CUDA = torch.cuda.is_available()
if CUDA:
    ARCHS = [("small", 64), ("base", 64)]
    LEVER_ARCH = ("base", 64)
    SHAPE = (592, 128)
    STEPS = int(os.environ.get("ASIT_BENCH_STEPS", "20"))
    ROUNDS = 3
    PROFILE_STEPS = 3
else:
    ARCHS = [("tiny-cpu", 4)]
    LEVER_ARCH = ("tiny-cpu", 4)
    SHAPE = (192, 64)
    STEPS = 2
    ROUNDS = 2
    PROFILE_STEPS = 2
# dense bf16 TFLOP/s without sparsity, from the vendor's data sheets (SXM parts; H200 has H100's cores)
SPEC_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "B200": 2250.0}

# fast mode with one switch changed, in order of interest (a lever that needs a package or a GPU is
# skipped where it cannot run)
LEVERS: dict[str, list[str]] = {
    "step-graph": ["train.cuda_graph=true"],  # the whole step as one CUDA graph (asit/train/step_graph.py)
    "residual-bf16": ["model.residual_dtype=bf16"],
    "teacher-bf16": ["train.ema=fused", "train.teacher_bf16=true"],
    "fused-head": ["loss.fused_head=true"],
    "ema-fused": ["train.ema=fused"],
    "sdpa-cudnn": ["model.attn_backend=sdpa_cudnn"],
    "gelu-fused": ["model.mlp_gelu=fused"],
    "ops-eager": ["train.ops_backend=reference"],  # the fused ops off: what the kernels bring to the step
    "cuda-graphs": ["train.compile_mode=reduce-overhead"],
    "sdpa-flash": ["model.attn_backend=sdpa_flash"],
    "flash-attn": ["model.attn_backend=flash_attn"],
    "host-checks": ["train.sync_free=false"],
    "max-autotune": ["train.compile_mode=max-autotune"],
}
_CUDA_ONLY = {"teacher-bf16", "residual-bf16", "gelu-fused", "cuda-graphs", "sdpa-cudnn", "sdpa-flash", "flash-attn",
              "host-checks", "max-autotune", "step-graph"}
_DEFAULT_LEVERS = [name for name in LEVERS if name != "max-autotune"]  # minutes of autotuning: ask for it


def _out_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("ASIT_BENCH_OUT") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def matmul_tflops() -> float | None:
    """Dense bf16 matmul TFLOP/s measured now with CUDA events (the measured-MFU denominator); None on CPU."""
    if not CUDA:
        return None
    n, reps = 8192, 20
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def spec_peak_tflops() -> float | None:
    """The device's spec dense bf16 peak from :data:`SPEC_PEAK_TFLOPS` (longest matching name), or None."""
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    hits = [k for k in SPEC_PEAK_TFLOPS if k in name]
    return SPEC_PEAK_TFLOPS[max(hits, key=len)] if hits else None


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return ""


def _trainer(tmp_path: Path, arch: str, batch: int, mode: str, extra: list[str]) -> Pretrainer:
    overrides = [
        f"train.output_dir={tmp_path / 'runs' / f'{arch}-{mode}-{len(extra)}'}", "data.num_workers=0",
        "train.progress=false", f"train.mode={mode}", f"train.batch_size={batch}",
        f"data.demo_clips={max(2 * batch, 12)}", f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1",
    ]
    if arch == "tiny-cpu":
        overrides += ["model.depth=2", "data.local_views=0", "loss.global_pairs=v1"]
        recipe = "demo_cpu"
    else:
        recipe = f"asit_vit_{arch}"
        overrides += ["data.train_manifest=demo", "data.sample_rate=16000", "data.demo_seconds=6.5"]
    trainer = Pretrainer(load_config(recipe, overrides + extra))
    trainer.setup()
    trainer.step = trainer.iters_per_epoch  # past the warm-up (lr 0) and the frozen last layer
    return trainer


def _batch(batch: int, mode: str) -> tuple[dict, float]:
    """A synthetic collated batch (pinned on CUDA) and the collate's ms (the authors' CPU GMML)."""
    t, f = SHAPE
    g = torch.Generator().manual_seed(0)
    samples = [{"views": torch.randn(2, 1, t, f, generator=g), "label": torch.zeros(0), "index": i, "ok": True,
                "error": ""} for i in range(batch)]
    collate = ReferenceGMMLCollate(collate_pretrain, seed=0, patch_size=16) if mode == "authors" else collate_pretrain
    start = time.perf_counter()
    out = collate(samples)
    collate_ms = (time.perf_counter() - start) * 1e3 if mode == "authors" else 0.0
    if CUDA:
        out = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out, collate_ms


def _count_flops(trainer: Pretrainer, batch: dict) -> int:
    """FLOPs of one step, counted on the eager modules (compiled graphs bypass the counter)."""
    compiled = trainer.student_step, trainer.teacher_forward
    trainer.student_step = getattr(compiled[0], "_orig_mod", compiled[0])
    trainer.teacher_forward = getattr(compiled[1], "_orig_mod", compiled[1])
    try:
        with FlopCounterMode(display=False) as counter:
            trainer.train_step(batch, epoch=1)
    finally:
        trainer.student_step, trainer.teacher_forward = compiled
    return counter.get_total_flops()


class _Variant:
    """One trainer and its batch, timed round after round."""

    def __init__(self, name: str, trainer: Pretrainer, batch: dict, collate_ms: float, setup_s: float) -> None:
        self.name, self.trainer, self.batch = name, trainer, batch
        self.info: dict[str, Any] = {"collate_ms": collate_ms, "setup_s": setup_s}
        self.round_ms: list[float] = []
        self.peak = 0
        self.resident = 0  # bytes this variant holds between steps (weights, optimiser state, buffers)

    def warm_up(self, steps: int = 3) -> None:
        for _ in range(steps):
            self.trainer.train_step(self.batch, epoch=1)
        if CUDA:
            torch.cuda.synchronize()

    def timed_round(self) -> None:
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        for _ in range(STEPS):
            self.trainer.train_step(self.batch, epoch=1)
        if CUDA:
            end.record()
            torch.cuda.synchronize()
            self.round_ms.append(start.elapsed_time(end) / STEPS)
            # the other variants' weights stay resident: count this one's own (at setup) plus its step's
            self.peak = max(self.peak, self.resident + torch.cuda.max_memory_allocated() - before)
        else:
            self.round_ms.append((time.perf_counter() - t0) * 1e3 / STEPS)


def _figures(v: _Variant, arch: str, batch: int, flops: int, matmul: float | None) -> dict[str, Any]:
    ms = sorted(v.round_ms)[len(v.round_ms) // 2]
    t = v.trainer
    info = {"arch": arch, "batch": batch, "mode": t.cfg.train.mode, "ms_per_step": ms,
            "samples_per_s": batch / ms * 1e3, "tflops": flops / (ms / 1e3) / 1e12, "flops_per_sample": flops / batch,
            "rounds": len(v.round_ms), "steps_per_round": STEPS, "precision": t.precision, "compiled": t.compiled,
            "sync_free": t.sync_free, "ema": t.pair.ema, "teacher_bf16": t.pair.teacher_copy is not None,
            "attn_backend": t.cfg.model.attn_backend, "compile_mode": t.cfg.train.compile_mode, **v.info}
    if matmul:
        info["peak_tflops"] = matmul
        info["mfu"] = info["tflops"] / matmul
    spec = spec_peak_tflops()
    if spec:
        info["spec_tflops"] = spec
        info["mfu_spec"] = info["tflops"] / spec
    if CUDA:
        info["peak_mem_gb"] = v.peak / 2**30
    return info


def _device() -> str:
    return torch.cuda.get_device_name() if CUDA else "cpu (tiny config, not the paper's model)"


def _pct(x: float | None) -> str:
    return f"{x:.1%}" if x else ""


def _write(out: Path, test: str, results: dict[str, Any], matmul: float | None, base: str | None) -> None:
    """``train_<test>.json`` (all figures so far), ``train_<test>.md`` and ``train_summary.md`` (every
    ``train_*.md`` in ``out``)."""
    for name, info in results.items():
        if base in results and name != base and "ms_per_step" in info and "ms_per_step" in results[base]:
            info["speedup_vs_" + base.split(":")[-1]] = results[base]["ms_per_step"] / info["ms_per_step"]
    doc = {"device": _device(), "date": date.today().isoformat(), "commit": _commit(), "torch": torch.__version__,
           "matmul_tflops": matmul, "spec_tflops": spec_peak_tflops(), "steps_per_round": STEPS,
           "results": results}
    (out / f"train_{test}.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    lines = [f"## {test} ({doc['device']}, {doc['date']}, {doc['commit']}; bf16 matmul {matmul or 0:.0f} TFLOP/s)",
             "", "| variant | ms/step | samples/s | MFU (measured) | MFU (spec) | peak GiB | speed-up | note |",
             "|---|---|---|---|---|---|---|---|"]
    for name, info in results.items():
        if "ms_per_step" not in info:
            lines.append(f"| {name} | | | | | | | {info.get('error', 'not run')} |")
            continue
        up = next((f"{v:.2f}x vs {k[11:]}" for k, v in info.items() if k.startswith("speedup_vs_")), "")
        lines.append(f"| {name} | {info['ms_per_step']:.1f} | {info['samples_per_s']:.0f} | "
                     f"{_pct(info.get('mfu'))} | {_pct(info.get('mfu_spec'))} | {info.get('peak_mem_gb', 0):.1f} | "
                     f"{up} | {info.get('profile', '')} |")
    (out / f"train_{test}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    parts = [f.read_text(encoding="utf-8") for f in sorted(out.glob("train_*.md")) if f.name != "train_summary.md"]
    (out / "train_summary.md").write_text("\n".join(parts), encoding="utf-8")


def _rows(test: str, results: dict[str, Any]) -> None:
    """Append the figures to ``$ASIT_BENCH_ROWS`` (bench/results.py columns) when it is set."""
    path = os.environ.get("ASIT_BENCH_ROWS")
    if not path:
        return
    units = {"ms_per_step": "ms", "samples_per_s": "samples/s", "tflops": "TFLOP/s", "peak_tflops": "TFLOP/s",
             "spec_tflops": "TFLOP/s", "mfu": "ratio", "mfu_spec": "ratio", "peak_mem_gb": "GiB", "collate_ms": "ms",
             "speedup_vs_fast": "x", "speedup_vs_authors": "x", "launches_per_step": "count",
             "device_idle_fraction": "ratio"}
    rows = []
    for name, info in results.items():
        config = ";".join(f"{k}={v}" for k, v in info.items()
                          if k not in units and k != "profile" and not isinstance(v, dict))
        for key, unit in units.items():
            if isinstance(info.get(key), (int, float)):
                rows.append({"benchmark": "train", "case": name, "metric": key, "x": f"batch={info['batch']}",
                             "value": f"{info[key]:.6g}", "unit": unit,
                             "machine": os.environ.get("ASIT_BENCH_MACHINE", ""),
                             "device": _device(), "software": f"torch {torch.__version__}",
                             "date": date.today().isoformat(), "commit": _commit(),
                             "command": f"pytest bench/test_bench_train.py::{test}", "config": config})
    append_rows(rows, path)


def _run(tmp_path: Path, test: str, arch: str, batch: int, specs: list[tuple[str, str, list[str]]],
         matmul: float | None, base: str, *, budget_s: float = float("inf"), profile: bool = False) -> dict:
    """Build the variants ``(name, mode, overrides)`` (until ``budget_s`` of setup is spent), time them in
    interleaved rounds, optionally profile each, write the JSON and summary after every round."""
    out = _out_dir(tmp_path)
    results: dict[str, dict[str, Any]] = {}
    variants: list[_Variant] = []
    started = time.perf_counter()
    flops = 0
    for name, mode, extra in specs:
        if time.perf_counter() - started > budget_s:
            results[name] = {"error": f"not built: setup budget of {budget_s:.0f} s spent"}
            continue
        t0 = time.perf_counter()
        held = torch.cuda.memory_allocated() if CUDA else 0
        try:
            trainer = _trainer(tmp_path, arch, batch, mode, extra)
            batch_dict, collate_ms = _batch(batch, mode)
            v = _Variant(name, trainer, batch_dict, collate_ms, 0.0)
            v.warm_up()
            v.info["setup_s"] = time.perf_counter() - t0
            v.resident = (torch.cuda.memory_allocated() - held) if CUDA else 0
            if not flops:  # the first variant is fast mode: count its useful work once
                flops = _count_flops(trainer, batch_dict)
            variants.append(v)
        except Exception as err:  # a lever that cannot run here (no kernel for this GPU, compile failure)
            results[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            continue
    assert flops > 0
    for _ in range(ROUNDS):
        for v in variants:
            v.timed_round()
            results[v.name] = _figures(v, arch, batch, flops, matmul)
        _write(out, test, results, matmul, base)
    if profile:
        for v in variants:
            summary = profile_steps(lambda v=v: v.trainer.train_step(v.batch, epoch=1), out_dir=out / "profiles",
                                    name=f"{v.name.replace(':', '-')}", steps=PROFILE_STEPS, warmup=1,
                                    extra={"mode": v.trainer.cfg.train.mode, "arch": arch, "batch": batch})
            results[v.name].update(launches_per_step=summary["launches_per_step"],
                                   device_idle_fraction=summary["device_idle_fraction"],
                                   parts_ms=summary["parts_ms"],
                                   profile=f"idle {summary['device_idle_fraction']:.0%}, "
                                           f"{summary['launches_per_step']:.0f} launches")
        _write(out, test, results, matmul, base)
    for v in variants:
        v.trainer.cleanup()
    _rows(test, results)
    return results


@pytest.mark.parametrize("arch,batch", ARCHS, ids=[a for a, _ in ARCHS])
def test_modes(tmp_path, arch, batch, matmul_tflops):
    """Fast against authors mode, interleaved, with a profile of each."""
    specs = [(f"{arch}:fast", "fast", []), (f"{arch}:authors", "authors", [])]
    results = _run(tmp_path, f"modes_{arch}", arch, batch, specs, matmul_tflops, f"{arch}:authors", profile=True)
    assert all("ms_per_step" in r for r in results.values()), results
    assert results[f"{arch}:fast"]["speedup_vs_authors"] > 0


def test_levers(tmp_path, matmul_tflops):
    """Fast mode against fast mode with one lever on, interleaved."""
    arch, batch = LEVER_ARCH
    wanted = [n.strip() for n in os.environ.get("ASIT_BENCH_LEVERS", ",".join(_DEFAULT_LEVERS)).split(",") if n.strip()]
    unknown = set(wanted) - set(LEVERS)
    if unknown:
        raise ValueError(f"ASIT_BENCH_LEVERS: unknown levers {sorted(unknown)}; choose from {list(LEVERS)}")
    if not CUDA:
        wanted = [n for n in wanted if n not in _CUDA_ONLY]
    if "flash-attn" in wanted and not flash_attn_available():
        wanted.remove("flash-attn")
    specs = [(f"{arch}:fast", "fast", [])] + [(f"{arch}:{n}", "fast", LEVERS[n]) for n in wanted]
    budget = float(os.environ.get("ASIT_BENCH_LEVER_BUDGET_S", "inf"))
    results = _run(tmp_path, "levers", arch, batch, specs, matmul_tflops, f"{arch}:fast", budget_s=budget)
    assert "ms_per_step" in results[f"{arch}:fast"], results
