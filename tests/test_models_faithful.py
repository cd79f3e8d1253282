"""The recipes' model defaults follow the authors' code: ImageNet initialisation converted as their v2
does it, plain bicubic positional resizing for local views, the [CLS] token's initial scale, and the
presets' corruption ratio and clipping mode."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from asit.config import load_config
from asit.models import build_asit, build_backbone, encode, fit_pos_embed
from asit.models.pretrained import ImageNetInitError, convert_imagenet_vit, load_imagenet_init

WIDTH = dict(embed_dim=48, depth=2, num_heads=3)
HEAD = dict(out_cls=32, out_tokens=16, head_hidden=24, head_bottleneck=8, recon_hidden=16, recon_out=8)


def _authors_resize(grid_tokens: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Port of the authors' local-view resize: plain bicubic over the [D, H, W] grid, [CLS] kept aside."""
    d = grid_tokens.shape[-1]
    img = grid_tokens.reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)
    return F.interpolate(img, size=new, mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, d)


def test_bicubic_fit_is_plain_bicubic_and_differs_from_antialiased(seed):
    pos = torch.randn(1, 1 + 37 * 8, 20, dtype=torch.float64)
    out = fit_pos_embed(pos.float(), (12, 8), (37, 8), mode="bicubic")
    want = torch.cat([pos[:, :1], _authors_resize(pos[:, 1:], (37, 8), (12, 8))], dim=1)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    antialiased = fit_pos_embed(pos.float(), (12, 8), (37, 8), mode="resample")
    assert (antialiased - out).abs().max() > 0.1  # a downsample: antialiasing changes it a lot on noise


def test_local_views_use_the_models_fit_and_global_views_are_untouched(seed):
    st = build_asit(preset=WIDTH, img_size=(64, 32), **HEAD)
    student = st.student.eval()
    assert student.pos_embed_fit == "bicubic"
    local = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        got = student(local, with_recon=False)["tokens"]
        want = encode(student.backbone, local, pos_embed_fit="bicubic")
        timm_way = encode(student.backbone, local, pos_embed_fit="resample")
        full = torch.randn(2, 1, 64, 32)
        same_grid = student(full, with_recon=False)["tokens"]
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, timm_way)
    with torch.no_grad():
        torch.testing.assert_close(same_grid, student.backbone.forward_features(full))


@pytest.mark.parametrize("std", [0.02, 1e-6])
def test_cls_token_initial_scale(std, seed):
    values = torch.cat([build_backbone(img_size=(32, 32), cls_token_std=std, embed_dim=768, depth=1,
                                       num_heads=12).cls_token.flatten() for _ in range(3)])
    assert math.isclose(values.std().item(), std, rel_tol=0.15)


def test_cls_token_std_must_be_positive():
    with pytest.raises(ValueError, match="cls_token_std"):
        build_backbone(img_size=(32, 32), cls_token_std=0.0, **WIDTH)


def _imagenet_vit(**kw) -> VisionTransformer:
    return VisionTransformer(img_size=224, patch_size=16, in_chans=3, num_classes=10, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **{**WIDTH, **kw})


def test_imagenet_init_is_converted_as_the_authors_do(tmp_path, seed):
    src = _imagenet_vit()
    path = tmp_path / "vit_imagenet.pth"
    torch.save({"model": src.state_dict()}, path)  # DeiT-style wrapper
    st = build_asit(preset=WIDTH, img_size=(592, 128), init=str(path), **HEAD)
    s = src.state_dict()
    for model in (st.student.backbone, st.teacher.backbone):
        got = model.state_dict()
        torch.testing.assert_close(got["patch_embed.proj.weight"],
                                   s["patch_embed.proj.weight"].sum(dim=1, keepdim=True))
        grid = _authors_resize(s["pos_embed"][:, 1:].double(), (14, 14), (37, 8)).float()
        torch.testing.assert_close(got["pos_embed"], torch.cat([s["pos_embed"][:, :1], grid], dim=1))
        for name in ("cls_token", "blocks.1.mlp.fc2.weight", "blocks.0.attn.qkv.bias", "norm.weight"):
            torch.testing.assert_close(got[name], s[name])
    assert st.student.head is not None and st.student.recon_head is not None  # heads keep their random init


def test_distilled_checkpoints_drop_the_distillation_token(seed):
    src = _imagenet_vit()
    state = dict(src.state_dict())
    state["dist_token"] = torch.zeros(1, 1, WIDTH["embed_dim"])
    marker = torch.full((1, 1, WIDTH["embed_dim"]), 7.0)
    state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], marker, state["pos_embed"][:, 1:]], dim=1)
    backbone = build_backbone(img_size=(592, 128), in_chans=1, **WIDTH)
    out = convert_imagenet_vit(state, backbone)
    assert out["pos_embed"].shape == backbone.pos_embed.shape
    assert not (out["pos_embed"] == 7.0).any()


def test_imagenet_init_errors_name_the_key_and_the_way_out(tmp_path, monkeypatch):
    backbone = build_backbone(img_size=(592, 128), in_chans=1, **WIDTH)
    with pytest.raises(ImageNetInitError, match="model.init=.*no such file"):
        load_imagenet_init(backbone, str(tmp_path / "missing.pth"))
    wide = tmp_path / "wide.pth"
    torch.save(_imagenet_vit(embed_dim=96).state_dict(), wide)
    with pytest.raises(ImageNetInitError, match="model.arch must match"):
        load_imagenet_init(backbone, str(wide))
    import timm

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ImageNetInitError, match=r"model.init='vit_base_patch16_224'.*set model.init=/path/to"):
        load_imagenet_init(backbone, "vit_base_patch16_224")


def test_presets_follow_the_authors():
    for name in ("asit_vit_base", "asit_vit_small", "asit_v2_vit_base"):
        cfg = load_config(name)
        assert cfg.optim.clip_mode == "per_param", name
        assert cfg.model.cls_token_std == 0.02 and cfg.model.local_pos_embed == "bicubic", name
    v1, v2 = load_config("asit_vit_base"), load_config("asit_v2_vit_base")
    assert v1.gmml.zero_ratio == (0.5, 0.7) and v1.model.init is None
    assert v2.gmml.zero_ratio == (0.5, 0.5)
    assert v2.model.init == "vit_base_patch16_224"
    assert load_config("asit_v2_vit_base", ["model.init=null"]).model.init is None
