"""The ViT's numerics switches (``model.residual_dtype``, ``model.mlp_gelu``) compute what the default path
computes within their dtype's error, keep the parameters (checkpoints load across their values), keep the
residual stream bf16 where asked, reach student and teacher alike, and are validated with errors naming the
key; changing them (and ``train.ema`` / ``train.teacher_bf16``) on resume is handled as documented."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_train_engine import TINY as TINY_RUN
from test_train_engine import _env  # noqa: F401  (module fixture: temp ASIT_CACHE, 1 thread)
from tiny_config import IMG

from asit.config import ConfigError, load_config
from asit.models import build_asit
from asit.models.vit import (
    BF16StreamCast,
    BF16StreamLayerNorm,
    FP32LayerNorm,
    GeluTanhMlp,
    _gelu_epilogue,
    build_backbone,
    encode,
    linear_gelu_tanh,
)
from asit.train import Pretrainer
from asit.train.resume import RESUME_FREE_KEYS, warn_changed_config

TINY = dict(embed_dim=64, depth=2, num_heads=2)
N_TOKENS = 1 + (IMG[0] // 16) * (IMG[1] // 16)
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _pair_of_backbones(**switches):
    torch.manual_seed(0)
    ref = build_backbone(img_size=IMG, drop_path_rate=0.0, **TINY)
    torch.manual_seed(0)
    other = build_backbone(img_size=IMG, drop_path_rate=0.0, **TINY, **switches)
    other.load_state_dict(ref.state_dict())  # strict: the same parameters and buffers
    return ref, other


def _dtypes(model: nn.Module, x: torch.Tensor) -> dict[str, torch.dtype]:
    """The output dtype of ``norm_pre``, each block and its norms, and the final norm, by module name, under
    bf16 autocast on ``x``'s device."""
    seen: dict[str, torch.dtype] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out.dtype))
             for name, m in model.named_modules() if name == "norm_pre" or name == "norm"
             or name.count(".") == 1 and name.startswith("blocks.") or name.endswith((".norm1", ".norm2"))]
    try:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_bf16_residual_keeps_the_stream_bf16():
    ref, other = _pair_of_backbones(residual_dtype="bf16")
    assert type(other.norm_pre) is BF16StreamCast and type(other.norm) is FP32LayerNorm  # heads get fp32 as before
    assert all(type(b.norm1) is BF16StreamLayerNorm and type(b.norm2) is BF16StreamLayerNorm for b in other.blocks)
    x = torch.randn(2, 1, *IMG)
    seen = _dtypes(other, x)
    assert len(seen) == 2 + 2 * 3, seen
    assert {k: v for k, v in seen.items() if k != "norm"} == dict.fromkeys(set(seen) - {"norm"}, torch.bfloat16)
    assert seen["norm"] == torch.float32
    base = _dtypes(ref, x)  # the default: the stream is fp32 (pos-embed add; on CUDA autocast's LayerNorms too)
    assert base["blocks.0"] == base["blocks.1"] == torch.float32


def test_switches_trace_as_one_graph():
    """torch.compile sees the switches' autocast and grad-mode checks without a graph break."""
    _, other = _pair_of_backbones(residual_dtype="bf16", mlp_gelu="fused")
    x = torch.randn(2, 1, *IMG)
    compiled = torch.compile(other.forward_features, backend="aot_eager", fullgraph=True)
    with torch.autocast(**BF16):
        out = compiled(x)
        torch.testing.assert_close(out, other.forward_features(x), rtol=0, atol=0)
    out.sum().backward()
    assert other.blocks[0].mlp.fc1.weight.grad is not None


def test_bf16_residual_forward_and_gradients_close_to_default():
    ref, other = _pair_of_backbones(residual_dtype="bf16")
    torch.manual_seed(1)
    x = torch.randn(3, 1, *IMG)
    upstream = torch.randn(3, N_TOKENS, 64)  # not all ones
    torch.testing.assert_close(other.forward_features(x), ref.forward_features(x), rtol=0, atol=0)  # fp32: same
    with torch.autocast(**BF16):
        a, b = ref.forward_features(x), other.forward_features(x)
    assert a.dtype == b.dtype == torch.float32
    exact = ref.forward_features(x)
    err_default, err_bf16 = (a - exact).abs().max(), (b - exact).abs().max()
    assert err_bf16 < 0.1 and err_bf16 < 4 * err_default + 1e-2, (err_bf16, err_default)
    (a * upstream).sum().backward()
    (b * upstream).sum().backward()
    for (name, p), q in zip(ref.named_parameters(), other.parameters(), strict=True):
        assert q.grad.dtype == torch.float32
        rel = (q.grad - p.grad).norm() / p.grad.norm().clamp_min(1e-12)
        assert rel < 0.05, f"{name}: relative gradient difference {rel:.3g}"


def test_bf16_residual_also_on_the_fitted_pos_embed_path():
    _, other = _pair_of_backbones(residual_dtype="bf16")
    seen = {}
    other.blocks[0].register_forward_hook(lambda _m, _i, out: seen.__setitem__("block", out.dtype))
    with torch.autocast(**BF16):
        out = encode(other, torch.randn(2, 1, 48, IMG[1]), pos_embed_fit="crop")  # encode's own token path
    assert seen["block"] == torch.bfloat16 and out.dtype == torch.float32


def test_bf16_layernorm_matches_fp32_within_bf16():
    norm = nn.LayerNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    fast = nn.LayerNorm(64, eps=1e-6)
    fast.load_state_dict(norm.state_dict())
    fast.__class__ = BF16StreamLayerNorm
    x = (torch.randn(5, 7, 64) * 3 + 50).to(torch.bfloat16)  # a large mean: statistics need fp32
    with torch.autocast(**BF16):
        out = fast(x)
    assert out.dtype == torch.bfloat16
    ref = norm(x.float())
    torch.testing.assert_close(out.float(), ref, rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item())
    torch.testing.assert_close(fast(x.float()), ref, rtol=0, atol=0)  # fp32 input: nn.LayerNorm itself


def test_fused_gelu_mlp_is_the_tanh_gelu():
    ref, other = _pair_of_backbones(mlp_gelu="fused")
    assert all(type(b.mlp) is GeluTanhMlp for b in other.blocks)
    for b in ref.blocks:
        b.mlp.act = nn.GELU(approximate="tanh")
    x = torch.randn(3, 1, *IMG)
    upstream = torch.randn(3, N_TOKENS, 64)
    with torch.no_grad():
        torch.testing.assert_close(other.forward_features(x), ref.forward_features(x), rtol=1e-6, atol=1e-6)
    (ref.forward_features(x) * upstream).sum().backward()
    (other.forward_features(x) * upstream).sum().backward()
    for (name, p), q in zip(ref.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    with torch.autocast(**BF16):  # under bf16 autocast: within bf16's error of the exact-GELU default
        low = other.forward_features(x)
    torch.testing.assert_close(low, ref.forward_features(x), rtol=0.05, atol=0.05)


def test_addmm_activation_on_this_torch():
    """What :func:`linear_gelu_tanh` relies on: its ``_addmm_activation`` call is ``x·Wᵀ + b`` and a GELU (the
    exact one on the CPU, so the CPU takes the separate ops) and has no derivative (so a gradient does too)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 5, 8), torch.randn(12, 8), torch.randn(12)
    torch.testing.assert_close(_gelu_epilogue(x, w, b), F.gelu(F.linear(x, w, b)), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="not implemented"):
        _gelu_epilogue(x, w.requires_grad_(), b).sum().backward()
    torch.testing.assert_close(linear_gelu_tanh(x, w, b), F.gelu(F.linear(x, w, b), approximate="tanh"))


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.float32, torch.float32)])
def test_gelu_epilogue_runs_in_the_autocast_dtype(x_dtype, w_dtype):
    """Autocast has no rule for ``_addmm_activation``: the epilogue casts its operands itself, so a bf16 stream
    meets fp32 weights (or a bf16 teacher copy meets an fp32 stream) in autocast's dtype, as ``F.linear`` would."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 5, 8).to(x_dtype), torch.randn(12, 8).to(w_dtype), torch.randn(12).to(w_dtype)
    ref = F.gelu(F.linear(x.double(), w.double(), b.double()))  # the CPU's epilogue is the exact GELU
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _gelu_epilogue(x, w, b)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), ref, rtol=0.02, atol=0.05)
    out = _gelu_epilogue(x, w, b)  # no autocast: the promoted dtype
    assert out.dtype == torch.promote_types(x_dtype, w_dtype)
    torch.testing.assert_close(out.double(), ref, rtol=0.02, atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuBLASLt GELU epilogue and CUDA autocast's fp32 "
                    "LayerNorm rule need a CUDA device")
def test_cuda_gelu_epilogue_and_bf16_stream():
    torch.manual_seed(0)
    x, w, b = (torch.randn(4, 37, 64, device="cuda"), torch.randn(256, 64, device="cuda"),
               torch.randn(256, device="cuda"))
    ref = F.gelu(F.linear(x.double(), w.double(), b.double()), approximate="tanh")
    with torch.no_grad():
        torch.testing.assert_close(linear_gelu_tanh(x, w, b).double(), ref, rtol=1e-3, atol=1e-3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = linear_gelu_tanh(x, w, b)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), ref, rtol=0.02, atol=0.05)
    ref_, other = _pair_of_backbones(mlp_gelu="fused", residual_dtype="bf16")
    for b_ in ref_.blocks:
        b_.mlp.act = nn.GELU(approximate="tanh")
    ref_, other = ref_.cuda(), other.cuda()
    xs = torch.randn(2, 1, *IMG, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(other.forward_features(xs), ref_.forward_features(xs), rtol=0.05, atol=0.1)
    seen = _dtypes(other, xs)  # CUDA autocast runs LayerNorm in fp32: the bf16 norms must step outside it
    assert seen.pop("norm") == torch.float32 and set(seen.values()) == {torch.bfloat16}, seen
    assert _dtypes(ref_, xs)["blocks.0.norm1"] == torch.float32  # the default's round trip


def test_switches_reach_student_teacher_and_teacher_copy():
    torch.manual_seed(0)
    pair = build_asit(preset=TINY, img_size=IMG, out_cls=32, out_tokens=16, head_hidden=32, head_bottleneck=8,
                      recon_hidden=32, recon_out=16, residual_dtype="bf16", mlp_gelu="fused")
    pair.configure_ema("fused", teacher_dtype=torch.bfloat16)
    for model in (pair.student, pair.teacher, pair.teacher_copy):
        assert type(model.backbone.norm_pre) is BF16StreamCast
        assert all(type(b.mlp) is GeluTanhMlp and type(b.norm1) is BF16StreamLayerNorm
                   for b in model.backbone.blocks)
    torch.manual_seed(0)
    plain = build_asit(preset=TINY, img_size=IMG, out_cls=32, out_tokens=16, head_hidden=32, head_bottleneck=8,
                       recon_hidden=32, recon_out=16)
    plain.load_state_dict(pair.state_dict())  # strict: a checkpoint loads across the switches' values
    seen = {}
    pair.teacher_copy.backbone.blocks[1].register_forward_hook(lambda _m, _i, out: seen.__setitem__("b", out.dtype))
    with torch.no_grad(), torch.autocast(**BF16):
        out = pair.teacher_copy(torch.randn(2, 1, *IMG), with_recon=False)
    assert seen["b"] == torch.bfloat16 and torch.isfinite(out["cls_logits"]).all()


def test_bad_switch_values_are_rejected():
    with pytest.raises(ValueError, match="residual_dtype"):
        build_backbone(img_size=IMG, residual_dtype="fp16", **TINY)
    with pytest.raises(ValueError, match="mlp_gelu"):
        build_backbone(img_size=IMG, mlp_gelu="tanh", **TINY)
    with pytest.raises(ConfigError, match="model.mlp_gelu"):
        load_config("demo_cpu", ["model.mlp_gelu=tanh"])
    for precision in ("fp32", "fp16"):
        with pytest.raises(ConfigError, match="model.residual_dtype=bf16 needs train.precision bf16"):
            load_config("demo_cpu", ["model.residual_dtype=bf16", f"train.precision={precision}"])


def test_bf16_residual_needs_bf16_at_setup(tmp_path):
    trainer = Pretrainer(load_config("demo_cpu", [*TINY_RUN, f"train.output_dir={tmp_path}", "train.device=cpu",
                                                  "model.residual_dtype=bf16"]))  # auto: fp32 on the CPU
    with pytest.raises(ValueError, match="model.residual_dtype=bf16 needs bf16 precision"):
        trainer.setup()
    trainer.cleanup()


def test_training_step_with_both_switches(tmp_path):
    trainer = Pretrainer(load_config("demo_cpu", [
        *TINY_RUN, f"train.output_dir={tmp_path}", "train.device=cpu", "train.precision=bf16",
        "model.residual_dtype=bf16", "model.mlp_gelu=fused", "train.teacher_bf16=true", "train.ema=fused"]))
    trainer.setup()
    try:
        assert type(trainer.student.backbone.norm_pre) is BF16StreamCast
        assert type(trainer.teacher_forward.backbone.blocks[0].mlp) is GeluTanhMlp
        trainer.step = trainer.iters_per_epoch  # past the warm-up, where lr starts at 0
        before = [p.detach().clone() for p in trainer.student.parameters()]
        result = trainer.train_step(next(iter(trainer.loader)), epoch=1)
        assert not result.skipped
        assert any(not torch.equal(a, p) for a, p in zip(before, trainer.student.parameters(), strict=True))
    finally:
        trainer.cleanup()


@pytest.mark.parametrize("key, value, free", [
    ("train.ema", "fused", True), ("train.teacher_bf16", True, True), ("model.residual_dtype", "bf16", True),
    ("model.mlp_gelu", "fused", False),  # the tanh GELU is another function: warned
])
def test_resume_across_switch_values(caplog, key, value, free):
    assert (key in RESUME_FREE_KEYS) is free
    section, name = key.split(".")
    saved = {"train": {"ema": "foreach", "teacher_bf16": False}, "model": {"residual_dtype": "fp32",
                                                                          "mlp_gelu": "separate"}}
    now = {s: dict(v) for s, v in saved.items()}
    now[section][name] = value
    with caplog.at_level(logging.WARNING, logger="asit.train.resume"):
        warn_changed_config(Path("ckpt.pt"), saved, now, RESUME_FREE_KEYS)
    assert (key in caplog.text) is not free
