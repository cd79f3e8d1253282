"""The step's switches measured by bench/test_bench_train.py compute the same thing as the default path:
the attention backends (naive, SDPA held to one kernel), the teacher EMA variants (per-tensor, foreach,
fused; host and device momentum; the bf16 teacher copy) and the per-parameter clip with host reads."""

from __future__ import annotations

import pytest
import torch
from tiny_config import IMG

from asit.models import build_asit
from asit.models.vit import NaiveAttention, SdpaKernelAttention, build_backbone, resolve_attn_backend
from asit.train.optim import clip_gradients

TINY = dict(embed_dim=64, depth=2, num_heads=2)


@pytest.mark.parametrize("backend, cls", [("naive", NaiveAttention), ("sdpa_flash", SdpaKernelAttention),
                                          ("sdpa_cudnn", SdpaKernelAttention)])
def test_attention_backends_match_sdpa(backend, cls):
    assert resolve_attn_backend(backend) == backend
    torch.manual_seed(0)
    ref = build_backbone(img_size=IMG, attn_backend="sdpa", **TINY).eval()
    torch.manual_seed(0)
    other = build_backbone(img_size=IMG, attn_backend=backend, **TINY).eval()
    assert all(type(b.attn) is cls for b in other.blocks)
    assert other.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 1, *IMG)
    torch.testing.assert_close(other.forward_features(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # low precision: within bf16's error of SDPA
        low, ref_low = other.forward_features(x), ref.forward_features(x)
    assert (low.float() - ref_low.float()).abs().max() < 0.1


def test_naive_attention_gradients_match_sdpa():
    torch.manual_seed(0)
    ref = build_backbone(img_size=IMG, attn_backend="sdpa", **TINY)
    torch.manual_seed(0)
    naive = build_backbone(img_size=IMG, attn_backend="naive", **TINY)
    x = torch.randn(2, 1, *IMG)
    upstream = torch.randn(2, 1 + (IMG[0] // 16) * (IMG[1] // 16), 64)  # not all ones
    (ref.forward_features(x) * upstream).sum().backward()
    (naive.forward_features(x) * upstream).sum().backward()
    for (name, p), q in zip(ref.named_parameters(), naive.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def _pair():
    torch.manual_seed(0)
    pair = build_asit(preset=TINY, img_size=IMG, out_cls=32, out_tokens=16, head_hidden=32, head_bottleneck=8,
                      recon_hidden=32, recon_out=16)
    with torch.no_grad():
        for p in pair.student.parameters():
            p.add_(torch.randn_like(p))
    return pair


@pytest.mark.parametrize("kind", ["per_tensor", "fused"])
@pytest.mark.parametrize("device_momentum", [False, True])
def test_ema_variants_agree_with_foreach(kind, device_momentum):
    ref, other = _pair(), _pair()
    other.configure_ema(kind, teacher_dtype=torch.bfloat16)
    m = torch.tensor(0.9) if device_momentum else 0.9
    ref.update_teacher(m)
    other.update_teacher(m)
    for a, b in zip(ref.teacher.parameters(), other.teacher.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    for a, b in zip(other.teacher.parameters(), other.teacher_copy.parameters(), strict=True):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b)
    other.update_teacher(torch.tensor(1.0) if device_momentum else 1.0)  # momentum 1: unchanged
    for a, b in zip(ref.teacher.parameters(), other.teacher.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_unknown_ema_is_rejected():
    with pytest.raises(ValueError, match="ema"):
        _pair().configure_ema("lerp")


@pytest.mark.parametrize("clip", [0.01, 1.0, 100.0])
def test_per_param_clip_with_host_reads_matches_sync_free(clip):
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    b = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 8)
    for model in (a, b):
        model(x).square().sum().backward()
    total_a = clip_gradients(a, clip, "per_param", host_reads=True)
    total_b = clip_gradients(b, clip, "per_param")
    torch.testing.assert_close(total_a, total_b)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
        assert p.grad.norm() <= clip * (1 + 1e-5)
