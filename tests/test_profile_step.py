"""bench/profile_step.py: kernels sorted into the step's parts by name and by the Pretrainer's profiler
ranges, per-step launches and device idle time from a Chrome trace, and the JSON and trace it writes
for a real (tiny, CPU) training step."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from test_train_engine import TINY, _env  # noqa: F401  (module fixture: temp ASIT_CACHE, 1 thread)

from asit.config import load_config
from asit.train import Pretrainer

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("profile_step", ROOT / "bench" / "profile_step.py")
profile_step = importlib.util.module_from_spec(_spec)
sys.modules["profile_step"] = profile_step
_spec.loader.exec_module(profile_step)


@pytest.mark.parametrize("name, range_name, part", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", None, "gemm"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "asit.backward", "gemm"),
    ("aten::addmm", "asit.student_forward", "gemm"),
    ("triton_tem_fused_mm_3", None, "gemm"),
    ("flash_fwd_kernel", "asit.student_forward", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90", None, "attention"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", None, "attention"),
    ("triton_poi_fused_add_gelu_7", "asit.student_forward", "elementwise"),
    ("Memcpy HtoD (Pinned -> Device)", None, "memcpy"),
    ("sm90_xmma_gemm_bf16", "asit.losses", "losses"),
    ("triton_per_fused_gmml_0", "asit.gmml", "gmml"),
    ("void at::native::lerp_kernel", "asit.ema", "ema"),
    ("multi_tensor_apply_kernel", "Optimizer.step#AdamW.step", "optimizer"),
    ("aten::norm", "asit.clip", "clip"),
    ("aten::add_", "asit.update", "optimizer"),
])
def test_classify_kernel(name, range_name, part):
    assert profile_step.classify_kernel(name, range_name) == part


def _x(name, ts, dur, cat, **args):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "tid": 1, "args": args}


def test_device_trace_summary():
    """Two steps; kernels launched from CPU ranges (the backward's from another thread) and run later on
    the device, with a gap inside each step."""
    events = [
        _x("asit.step", 0, 100, "user_annotation"), _x("asit.step", 100, 100, "user_annotation"),
        _x("asit.losses", 10, 10, "user_annotation"), _x("asit.losses", 110, 10, "user_annotation"),
        _x("asit.ema", 150, 10, "user_annotation"),
        _x("asit.step", 40, 60, "gpu_user_annotation"),  # the device timeline's copy of a range: not a step
    ]
    for step in (0, 100):
        events += [_x("cudaLaunchKernel", step + 5, 1, "cuda_runtime", correlation=step + 1),
                   _x("cudaLaunchKernel", step + 12, 1, "cuda_runtime", correlation=step + 2),
                   _x("gemm_kernel", step + 50, 20, "kernel", correlation=step + 1),
                   _x("reduce_kernel", step + 80, 10, "kernel", correlation=step + 2)]
    events += [_x("cudaLaunchKernel", 155, 1, "cuda_runtime", correlation=500),
               _x("lerp_kernel", 190, 5, "kernel", correlation=500),
               _x("stray_kernel", 400, 5, "kernel", correlation=999)]  # launched outside every step
    s = profile_step.summarize_trace({"traceEvents": events})
    assert s["kernels_from"] == "device" and s["steps"] == 2
    assert s["launches_per_step"] == pytest.approx(2.5)
    assert s["parts_ms"]["gemm"] == pytest.approx(0.020)
    assert s["parts_ms"]["losses"] == pytest.approx(0.010)
    assert s["parts_ms"]["ema"] == pytest.approx(0.0025)
    # step 0: kernels 50-70, 80-90 → span 40, busy 30; step 1: 150-170, 180-190, 190-195 → span 45, busy 35
    assert s["device_span_ms"] == pytest.approx(0.0425)
    assert s["device_idle_ms"] == pytest.approx(0.010)
    assert s["top_kernels"][0]["name"] == "gemm_kernel" and s["top_kernels"][0]["calls_per_step"] == 1
    with pytest.raises(ValueError, match="asit.step"):
        profile_step.summarize_trace({"traceEvents": events[2:]})


@pytest.mark.parametrize("mode", ["fast", "authors"])
def test_profile_of_a_tiny_training_step(tmp_path, mode):
    trainer = Pretrainer(load_config("demo_cpu", [*TINY, f"train.output_dir={tmp_path / 'run'}",
                                                  "train.device=cpu", f"train.mode={mode}"]))
    trainer.setup()
    try:
        batch = next(iter(trainer.loader))
        summary = profile_step.profile_steps(lambda: trainer.train_step(batch, epoch=1), out_dir=tmp_path,
                                             name=f"tiny-{mode}", steps=2, warmup=1, extra={"mode": mode})
        assert summary["name"] == f"tiny-{mode}"
    finally:
        trainer.cleanup()
    written = json.loads((tmp_path / f"tiny-{mode}.profile.json").read_text())
    assert written["mode"] == mode and written["steps"] == 2 and written["kernels_from"] == "cpu"
    assert written["trace"].endswith(".trace.json.gz") and (tmp_path / written["trace"]).stat().st_size > 0
    ms = written["parts_ms"]
    assert ms["gemm"] > 0 and ms["losses"] > 0 and ms["optimizer"] > 0 and ms["ema"] > 0
    assert (ms["gmml"] > 0) == (mode == "fast")  # authors mode: GMML ran in the loader's collate
    assert ms["clip"] > 0
    assert ms["attention"] > 0  # SDPA's CPU kernel, or the naive attention's softmax
    assert written["launches_per_step"] > 20
    assert sum(written["parts_share"].values()) == pytest.approx(1.0)
