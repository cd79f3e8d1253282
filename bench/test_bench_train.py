"""Training-step throughput: the whole ASiT step (GMML, student forward + backward on the corrupted
views, teacher forward on the clean views, losses, clipping, AdamW, EMA, centres) in ``fast`` and
``reference`` mode, same run, same machine.

Reports samples/s, achieved TFLOP/s and MFU against a bf16 matmul measured in the same session
(FLOPs counted once per configuration with ``torch.utils.flop_counter``), and peak memory. In
reference mode the per-sample CPU GMML runs in the loader's collate (overlapped with the GPU in a
real run), so it is timed separately as ``collate_ms`` and not included in the step time.

On CUDA: ViT-S and ViT-B at batch 64, 592 × 128, plus ViT-S in fast mode with the per-step host
check (``train.sync_free=false``) to show what the sync-free step saves. Steps are queued back to
back (``STEPS_PER_ROUND`` per timed round, one device sync at its end) from a pinned batch, as the
trainer's loader gives them. Without CUDA: a tiny configuration, labelled as such, so the suite
still checks that the benchmark runs.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from asit.config import load_config
from asit.data import collate_pretrain
from asit.data.gmml_cpu import ReferenceGMMLCollate
from asit.train import Pretrainer

CUDA = torch.cuda.is_available()
if CUDA:
    CASES = [(arch, 64, mode) for arch in ("small", "base") for mode in ("fast", "reference")]
    CASES.insert(1, ("small", 64, "fast-host-checks"))
    SHAPE = (592, 128)
    STEPS_PER_ROUND = 4
else:
    CASES = [("tiny-cpu", 4, mode) for mode in ("fast", "reference")]
    SHAPE = (192, 64)
    STEPS_PER_ROUND = 1


@pytest.fixture(scope="module")
def peak_tflops() -> float | None:
    """Dense bf16 matmul TFLOP/s measured now (the MFU denominator); None on CPU."""
    if not CUDA:
        return None
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def _trainer(tmp_path, arch: str, batch: int, mode: str) -> Pretrainer:
    overrides = [
        f"train.output_dir={tmp_path / f'{arch}-{mode}'}", "data.num_workers=0", "train.progress=false",
        f"train.mode={mode.split('-')[0]}", f"train.batch_size={batch}", "data.demo_clips=" + str(max(2 * batch, 12)),
        f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1",
    ]
    if mode == "fast-host-checks":
        overrides.append("train.sync_free=false")
    if arch == "tiny-cpu":
        overrides += ["model.depth=2", "data.local_views=0", "loss.global_pairs=v1"]
        recipe = "demo_cpu"
    else:
        recipe = f"asit_vit_{arch}"
        overrides += ["data.train_manifest=demo", "data.sample_rate=16000", "data.demo_seconds=6.5"]
    return Pretrainer(load_config(recipe, overrides))


def _synthetic_samples(batch: int) -> list[dict]:
    t, f = SHAPE
    return [{"views": torch.randn(2, 1, t, f), "label": torch.zeros(0), "index": i, "ok": True, "error": ""}
            for i in range(batch)]


def _count_flops(trainer: Pretrainer, batch: dict) -> int:
    """FLOPs of one step, counted on the eager modules (compiled graphs bypass the counter)."""
    compiled = trainer.student_step, trainer.teacher_forward
    trainer.student_step = getattr(compiled[0], "_orig_mod", compiled[0])
    trainer.teacher_forward = trainer.teacher
    try:
        with FlopCounterMode(display=False) as counter:
            trainer.train_step(batch, epoch=1)
    finally:
        trainer.student_step, trainer.teacher_forward = compiled
    return counter.get_total_flops()


@pytest.mark.parametrize("arch,batch,mode", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_train_step(benchmark, tmp_path, arch, batch, mode, peak_tflops):
    trainer = _trainer(tmp_path, arch, batch, mode)
    trainer.setup()
    try:
        samples = _synthetic_samples(batch)
        if mode == "reference":
            collate = ReferenceGMMLCollate(collate_pretrain, seed=0, patch_size=16)
            start = time.perf_counter()
            batch_dict = collate(samples)
            collate_ms = (time.perf_counter() - start) * 1e3
        else:
            batch_dict = collate_pretrain(samples)
            collate_ms = 0.0
        if CUDA:  # the trainer's loader pins its batches (pin_memory=True), so the copy does not block
            batch_dict = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch_dict.items()}
        sync = torch.cuda.synchronize if CUDA else (lambda: None)
        for _ in range(3):  # warm-up: compilation, autotuning, allocator
            trainer.train_step(batch_dict, epoch=1)
        sync()
        flops = _count_flops(trainer, batch_dict)
        if CUDA:
            torch.cuda.reset_peak_memory_stats()

        def steps():
            for _ in range(STEPS_PER_ROUND):
                trainer.train_step(batch_dict, epoch=1)
            sync()

        benchmark.pedantic(steps, rounds=5 if CUDA else 3, iterations=1, warmup_rounds=1)
        median = benchmark.stats.stats.median / STEPS_PER_ROUND
        info = {
            "mode": mode, "sync_free": trainer.sync_free, "ms_per_step": median * 1e3, "arch": arch, "batch": batch,
            "samples_per_s": batch / median,
            "tflops": flops / median / 1e12, "flops_per_sample": flops / batch, "collate_ms": collate_ms,
            "precision": trainer.precision, "compiled": trainer.compiled,
            "device": torch.cuda.get_device_name() if CUDA else "cpu (tiny config, not the paper's model)",
        }
        if peak_tflops:
            info["peak_tflops"] = peak_tflops
            info["mfu"] = info["tflops"] / peak_tflops
            info["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        benchmark.extra_info.update(info)
        assert flops > 0
    finally:
        trainer.cleanup()
