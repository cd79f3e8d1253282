"""Tests for asit.models: timm-compatible encoder, heads, ASiT model and the EMA teacher."""

from __future__ import annotations

import sys
import types
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from asit.models import (
    VIT_PRESETS,
    ASiTModel,
    FlashAttnAttention,
    ProjectionHead,
    ReconstructionHead,
    StudentTeacher,
    WeightNormLinear,
    build_asit,
    build_backbone,
    encode,
    resolve_attn_backend,
    token_grid,
)
from asit.models import vit as vit_module

TINY = dict(embed_dim=64, depth=2, num_heads=2)
IMG = (64, 32)
HEAD = dict(out_cls=48, out_tokens=24, head_hidden=32, head_bottleneck=16, recon_hidden=32, recon_out=8)


def tiny_pair(**overrides) -> StudentTeacher:
    kwargs = dict(preset=TINY, img_size=IMG, **HEAD)
    kwargs.update(overrides)
    return build_asit(**kwargs)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- backbone


def test_backbone_state_dict_loads_into_timm_strict():
    backbone = build_backbone(img_size=IMG, **TINY)
    reference = VisionTransformer(
        img_size=IMG,
        patch_size=16,
        in_chans=1,
        num_classes=0,
        global_pool="",
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        **TINY,
    )
    assert list(backbone.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(backbone.state_dict(), strict=True)
    reference.eval()
    backbone.eval()
    x = torch.randn(2, 1, *IMG)
    torch.testing.assert_close(encode(backbone, x), reference.forward_features(x))
    for key in (
        "patch_embed.proj.weight",
        "cls_token",
        "pos_embed",
        "blocks.1.attn.qkv.weight",
        "norm.weight",
    ):
        assert key in backbone.state_dict()
    assert backbone.pos_embed.shape == (1, 1 + 4 * 2, 64)
    assert backbone.norm.eps == 1e-6


def test_full_size_shapes():
    st = build_asit(preset=dict(VIT_PRESETS["tiny"], depth=1), img_size=(592, 128), **HEAD)
    x = torch.randn(2, 1, 592, 128)
    assert token_grid(st.student.backbone, x) == (37, 8)
    out = st.student(x)
    assert out["tokens"].shape == (2, 297, 192)
    assert out["cls_logits"].shape == (2, 48)
    assert out["token_logits"].shape == (2, 296, 24)
    assert out["recon"].shape == (2, 1, 592, 128)
    with torch.no_grad():
        t_out = st.teacher(x)
    assert t_out["recon"] is None
    assert t_out["token_logits"].shape == (2, 296, 24)


def test_dynamic_size_local_view():
    st = build_asit(preset=dict(VIT_PRESETS["tiny"], depth=1), img_size=(592, 128), **HEAD)
    x = torch.randn(2, 1, 192, 128)
    assert token_grid(st.student.backbone, x) == (12, 8)
    out = st.student(x)
    assert out["tokens"].shape == (2, 1 + 12 * 8, 192)
    assert out["token_logits"].shape == (2, 96, 24)
    assert out["recon"].shape == (2, 1, 192, 128)
    assert st.student(x, with_recon=False)["recon"] is None


def test_non_multiple_input_uses_floor_grid():
    st = tiny_pair().eval()  # no drop path, so the two forwards are comparable
    x = torch.randn(2, 1, IMG[0] + 7, IMG[1] + 3)
    out = st.student(x)
    assert out["recon"].shape == (2, 1, *IMG)
    # the ignored rows / columns do not influence the output
    torch.testing.assert_close(out["tokens"], st.student(x[..., : IMG[0], : IMG[1]])["tokens"])


def test_sdpa_is_used(monkeypatch):
    backbone = build_backbone(img_size=IMG, **TINY)
    assert all(blk.attn.fused_attn for blk in backbone.blocks)
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    encode(backbone, torch.randn(1, 1, *IMG))
    assert len(calls) == TINY["depth"]


def test_attn_backend_resolution(monkeypatch):
    monkeypatch.setattr(vit_module, "flash_attn_available", lambda: False)
    assert resolve_attn_backend("sdpa") == "sdpa"
    assert resolve_attn_backend("auto") == "sdpa"
    with pytest.raises(ImportError, match="flash_attn"):
        build_backbone(img_size=IMG, attn_backend="flash_attn", **TINY)
    with pytest.raises(ValueError, match="attn_backend"):
        resolve_attn_backend("xformers")
    backbone = build_backbone(img_size=IMG, attn_backend="auto", **TINY)
    assert all(type(blk.attn) is not FlashAttnAttention for blk in backbone.blocks)


def test_flash_attn_path_layout_with_fake_package(monkeypatch):
    """With a stand-in flash_attn, the packed-qkv path must equal the SDPA path."""

    def fake_qkvpacked(qkv, dropout_p=0.0, softmax_scale=None):
        assert qkv.dim() == 5 and qkv.shape[2] == 3  # [B, N, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, Dh]
        return F.scaled_dot_product_attention(q, k, v, scale=softmax_scale).transpose(1, 2)

    monkeypatch.setitem(
        sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_qkvpacked_func=fake_qkvpacked)
    )
    monkeypatch.setattr(vit_module, "flash_attn_available", lambda: True)
    flash = build_backbone(img_size=IMG, attn_backend="auto", **TINY).eval()
    assert all(type(blk.attn) is FlashAttnAttention for blk in flash.blocks)
    sdpa = build_backbone(img_size=IMG, **TINY).eval()
    sdpa.load_state_dict(flash.state_dict(), strict=True)
    x = torch.randn(2, 1, *IMG)
    reference = encode(sdpa, x)
    torch.testing.assert_close(encode(flash, x), reference)  # CPU fp32: falls back to SDPA
    monkeypatch.setattr(FlashAttnAttention, "_use_flash", lambda self, *a: True)
    torch.testing.assert_close(encode(flash, x), reference)  # forced through the packed path


# --------------------------------------------------------------------------- heads


@pytest.mark.parametrize("trainable_g", [False, True])
def test_weight_norm_linear(trainable_g):
    layer = WeightNormLinear(16, 10, trainable_g=trainable_g)
    assert layer.weight_g.shape == (10, 1) and layer.weight_v.shape == (10, 16)
    assert layer.weight_g.requires_grad is trainable_g
    assert torch.all(layer.weight_g == 1)
    with torch.no_grad():
        layer.weight_v.mul_(torch.rand(10, 1) * 5 + 0.1)  # rows of different norms
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(10))
    # independent oracle: PyTorch's own weight-norm formula
    with torch.no_grad():
        layer.weight_g.copy_(torch.rand(10, 1) + 0.5)
    x = torch.randn(3, 5, 16)
    expected = x @ torch._weight_norm(layer.weight_v, layer.weight_g, 0).T
    y = layer(x)
    torch.testing.assert_close(y, expected)
    y.square().sum().backward()
    assert layer.weight_v.grad is not None
    assert (layer.weight_g.grad is not None) is trainable_g
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == ({"weight_g", "weight_v"} if trainable_g else {"weight_v"})


def test_projection_head_normalised_bottleneck_and_shapes():
    head = ProjectionHead(32, out_cls=40, out_tokens=20, hidden_dim=24, bottleneck_dim=12)
    assert [n for n in head.state_dict() if n.startswith("mlp.")] == [
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
    ]  # fmt: skip
    assert all(torch.all(head.mlp[i].bias == 0) for i in (0, 2, 4))
    assert isinstance(head.mlp[1], nn.GELU) and isinstance(head.mlp[3], nn.GELU) and len(head.mlp) == 5
    seen = []
    for layer in head.last_layers:
        layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    tokens = torch.randn(3, 1 + 6, 32) * 7
    cls_logits, token_logits = head(tokens)
    assert cls_logits.shape == (3, 40) and token_logits.shape == (3, 6, 20)
    assert len(seen) == 2
    for z in seen:
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(z.shape[:-1]))
    # recompute independently
    z = head.mlp(tokens)
    z = z / z.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(cls_logits, z[:, 0] @ head.last_layer.weight.T)
    torch.testing.assert_close(token_logits, z[:, 1:] @ head.last_layer_tokens.weight.T)
    assert head.last_layers == [head.last_layer, head.last_layer_tokens]


def test_projection_head_shared_v2():
    head = ProjectionHead(32, out_cls=40, out_tokens=None, hidden_dim=24, bottleneck_dim=12, trainable_g=True)
    assert head.last_layer_tokens is None and head.shared
    assert head.last_layers == [head.last_layer]
    assert not any(k.startswith("last_layer_tokens") for k in head.state_dict())
    tokens = torch.randn(2, 5, 32)
    cls_logits, token_logits = head(tokens)
    assert cls_logits.shape == (2, 40) and token_logits.shape == (2, 4, 40)
    z = head.embed(tokens)
    torch.testing.assert_close(token_logits, head.last_layer(z[:, 1:]))
    assert head.last_layer.weight_g.requires_grad


@pytest.mark.parametrize("in_chans", [1, 3])
def test_reconstruction_head_equals_transposed_convolution(in_chans):
    """The per-token matmul is the ConvTranspose2d(kernel = stride = p) it replaces, values and gradients."""
    torch.manual_seed(0)
    head = ReconstructionHead(24, hidden_dim=16, out_dim=12, patch_size=4, in_chans=in_chans).double()
    nn.init.normal_(head.convTrans.bias)
    gh, gw = 3, 5
    tokens = torch.randn(2, gh * gw, 24, dtype=torch.float64, requires_grad=True)
    out = head(tokens, (gh, gw))
    y = head.mlp(tokens).transpose(1, 2).reshape(2, -1, gh, gw)
    expected = head.convTrans(y)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [tokens, head.convTrans.weight, head.convTrans.bias], g)
    grads_ref = torch.autograd.grad(expected, [tokens, head.convTrans.weight, head.convTrans.bias], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # under autocast the output has the compute dtype, as the convolution's had (the L1 target follows it)
    head = head.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(tokens.detach().float(), (gh, gw))
        expected = head.convTrans(head.mlp(tokens.detach().float()).transpose(1, 2).reshape(2, -1, gh, gw))
    assert out.dtype == expected.dtype == torch.bfloat16


@pytest.mark.parametrize("hidden,out", [(32, 8), (32, 32)])
def test_reconstruction_head_shapes_and_patch_layout(hidden, out):
    head = ReconstructionHead(32, hidden_dim=hidden, out_dim=out, patch_size=4, in_chans=1)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (32, hidden),
        (hidden, hidden),
        (hidden, out),
    ]
    assert isinstance(head.mlp[-1], nn.GELU)
    gh, gw = 3, 5
    assert head(torch.randn(2, gh * gw, 32), (gh, gw)).shape == (2, 1, gh * 4, gw * 4)
    # one non-zero token (h, w) = (1, 3) must only paint its own 4x4 patch (biases are zero → GELU(0) = 0)
    tokens = torch.zeros(1, gh * gw, 32)
    tokens[0, 1 * gw + 3] = torch.randn(32) * 5
    with torch.no_grad():
        delta = head(tokens, (gh, gw)) - head(torch.zeros_like(tokens), (gh, gw))
    changed = delta[0, 0].abs() > 0
    assert changed[4:8, 12:16].any()
    changed[4:8, 12:16] = False
    assert not changed.any()
    with pytest.raises(ValueError, match="grid"):
        head(torch.randn(1, 7, 32), (gh, gw))


# --------------------------------------------------------------------------- ASiT model / teacher


def test_student_state_dict_prefixes_and_teacher_init():
    st = tiny_pair()
    keys = list(st.student.state_dict())
    assert {k.split(".")[0] for k in keys} == {"backbone", "head", "recon_head"}
    assert "recon_head.convTrans.weight" in keys and "head.last_layer.weight_g" in keys
    assert st.teacher.recon_head is None
    assert all(not p.requires_grad for p in st.teacher.parameters())
    t_sd = st.teacher.state_dict()
    for k, v in st.student.state_dict().items():
        if not k.startswith("recon_head."):
            assert torch.equal(v, t_sd[k]), k
    # drop path only in the student
    assert st.student.backbone.blocks[1].drop_path1.drop_prob > 0
    assert isinstance(st.teacher.backbone.blocks[1].drop_path1, nn.Identity)


def test_teacher_stays_eval_and_has_no_grad():
    st = tiny_pair()
    st.train()
    assert st.student.training and not st.teacher.training
    assert not any(m.training for m in st.teacher.modules())
    out = st.teacher(torch.randn(2, 1, *IMG))
    assert not out["cls_logits"].requires_grad


def _perturb(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))


def test_ema_momentum_formula():
    st = tiny_pair()
    _perturb(st.student)
    _perturb(st.teacher)
    s = {k: v.clone() for k, v in st.student.state_dict().items()}
    t = {k: v.clone() for k, v in st.teacher.state_dict().items()}
    st.update_teacher(0.9)
    new_t = st.teacher.state_dict()
    assert set(new_t) == set(t)
    for k in t:
        torch.testing.assert_close(new_t[k], 0.9 * t[k] + 0.1 * s[k], msg=k)
    for k, v in st.student.state_dict().items():  # the student is untouched
        assert torch.equal(v, s[k])


def test_ema_momentum_one_and_zero():
    st = tiny_pair()
    _perturb(st.student)
    t_before = {k: v.clone() for k, v in st.teacher.state_dict().items()}
    st.update_teacher(1.0)
    for k, v in st.teacher.state_dict().items():
        assert torch.equal(v, t_before[k]), k
    st.update_teacher(0.0)
    s = st.student.state_dict()
    for k, v in st.teacher.state_dict().items():
        assert torch.equal(v, s[k]), k


def test_ema_skips_student_recon_head_and_checks_names():
    student = tiny_pair().student
    teacher = tiny_pair().student  # a teacher that keeps a reconstruction head
    recon_before = {k: v.clone() for k, v in teacher.recon_head.state_dict().items()}
    st = StudentTeacher(student, teacher)
    _perturb(st.student)
    st.update_teacher(0.0)
    for k, v in st.teacher.recon_head.state_dict().items():
        assert torch.equal(v, recon_before[k])
    other = build_asit(preset=dict(TINY, depth=1), img_size=IMG, **HEAD).teacher
    with pytest.raises(ValueError, match="differ"):
        StudentTeacher(tiny_pair().student, other)


def test_gradient_flows_from_both_heads():
    st = tiny_pair()
    x = torch.randn(2, 1, *IMG)
    for name in ("cls_logits", "token_logits", "recon"):
        st.student.zero_grad(set_to_none=True)
        st.student(x)[name].square().mean().backward()
        grad = st.student.backbone.patch_embed.proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
        assert st.student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0, name
        head_grad = st.student.head.mlp[0].weight.grad
        recon_grad = st.student.recon_head.mlp[0].weight.grad
        assert (head_grad is not None) == (name != "recon")
        assert (recon_grad is not None) == (name == "recon")


def test_asit_model_without_recon_head():
    backbone = build_backbone(img_size=IMG, **TINY)
    model = ASiTModel(backbone, ProjectionHead(64, out_cls=8, out_tokens=4, hidden_dim=16, bottleneck_dim=8))
    out = model(torch.randn(1, 1, *IMG))
    assert out["recon"] is None and out["token_logits"].shape == (1, 8, 4)


def test_build_asit_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        build_asit(preset="huge", img_size=IMG)


@pytest.mark.slow
def test_compiled_backbone_matches_eager():
    backbone = build_backbone(img_size=IMG, embed_dim=32, depth=1, num_heads=2).eval()
    x = torch.randn(2, 1, *IMG)
    eager = encode(backbone, x)
    compiled = torch.compile(partial(encode, backbone), fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-4, atol=1e-5)


def test_cached_lists_follow_dtype_conversion():
    st = tiny_pair().to(torch.float64)
    _perturb(st.student)
    st.update_teacher(0.0)
    assert st.teacher.backbone.pos_embed.dtype == torch.float64
    assert torch.equal(st.teacher.backbone.pos_embed, st.student.backbone.pos_embed)


@pytest.mark.filterwarnings("ignore:Grad strides do not match")  # ConvT weight [C, 1, p, p]
def test_ema_with_ddp_wrapped_student(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        pair = tiny_pair()
        ddp = DistributedDataParallel(pair.student)
        st = StudentTeacher(ddp, pair.teacher)  # the wrapper is unwrapped, parameters shared
        assert st.student is pair.student
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.5)
        out = ddp(torch.randn(2, 1, *IMG))
        (out["cls_logits"].sum() + out["token_logits"].sum() + out["recon"].sum()).backward()
        opt.step()
        st.update_teacher(0.0)
        assert torch.equal(
            st.teacher.backbone.blocks[0].attn.qkv.weight, ddp.module.backbone.blocks[0].attn.qkv.weight
        )
    finally:
        dist.destroy_process_group()
