"""asit.finetune.model: pooling, the head and the positional-embedding crop."""

from __future__ import annotations

import pytest
import torch

from asit.finetune import FinetuneModel
from asit.models import build_backbone, encode, fit_pos_embed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("pool", ["tokens", "cls", "both"])
def test_model_pools_and_head(pool):
    backbone = build_backbone(img_size=(32, 32), patch_size=16, embed_dim=24, depth=1, num_heads=2)
    model = FinetuneModel(backbone, 5, pool)
    out = model(torch.randn(3, 1, 48, 32))  # other lengths than the positional grid work
    assert out.shape == (3, 5)
    assert isinstance(model.head[0], torch.nn.LayerNorm) and model.head[1].out_features == 5


@pytest.mark.parametrize("old, new, start", [
    ((37, 8), (8, 8), (14, 0)),  # Speech Commands: 1 s of a 6 s window, SSAST's int(37/2) - int(8/2)
    ((37, 8), (32, 8), (2, 0)),  # ESC-50: 5 s
    ((7, 3), (4, 3), (1, 0)),
    ((7, 3), (6, 2), (0, 0)),
    ((5, 3), (5, 3), (0, 0)),
])
def test_fit_pos_embed_crop_keeps_the_centre_positions(old, new, start):
    D = 5
    pos = torch.randn(1, 1 + old[0] * old[1], D)
    out = fit_pos_embed(pos, new, old, "crop")
    grid = pos[:, 1:].reshape(1, *old, D)
    h, w = start
    assert out.shape == (1, 1 + new[0] * new[1], D)
    assert torch.equal(out[:, 0], pos[:, 0])  # [CLS] untouched
    assert torch.equal(out[:, 1:].reshape(1, *new, D), grid[:, h : h + new[0], w : w + new[1]])
    if new != old:
        assert not torch.allclose(fit_pos_embed(pos, new, old, "resample"), out)


def test_fit_pos_embed_crop_resamples_only_a_longer_axis():
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 1 + 7 * 3, 4)
    cut = torch.cat([pos[:, :1], pos[:, 1:].reshape(1, 7, 3, 4)[:, 1:5].reshape(1, 12, 4)], 1)  # time 7 -> 4
    torch.testing.assert_close(fit_pos_embed(pos, (4, 5), (7, 3), "crop"),
                               resample_abs_pos_embed(cut, new_size=(4, 5), old_size=(4, 3), num_prefix_tokens=1))
    torch.testing.assert_close(fit_pos_embed(pos, (9, 3), (7, 3), "crop"), fit_pos_embed(pos, (9, 3), (7, 3)))
    with pytest.raises(ValueError, match="mode"):
        fit_pos_embed(pos, (4, 3), (7, 3), "centre")


def test_crop_equals_a_model_built_for_the_shorter_input():
    """encode(..., pos_embed_fit='crop') on 4 of 7 time patches is exactly a ViT built for 4 time patches
    whose positional embedding is rows 1-4 of the pretraining one (SSAST builds its fine-tuning model so)."""
    torch.manual_seed(0)
    backbone = build_backbone(img_size=(112, 48), patch_size=16, embed_dim=24, depth=2, num_heads=2).eval()
    short = build_backbone(img_size=(64, 48), patch_size=16, embed_dim=24, depth=2, num_heads=2).eval()
    state = dict(backbone.state_dict())
    state["pos_embed"] = torch.cat([state["pos_embed"][:, :1],
                                    state["pos_embed"][:, 1:].reshape(1, 7, 3, 24)[:, 1:5].reshape(1, 12, 24)], 1)
    short.load_state_dict(state)
    x = torch.randn(3, 1, 64 + 9, 48)  # 9 trailing frames that fill no patch
    with torch.no_grad():
        want = short.forward_features(x[:, :, :64])
        torch.testing.assert_close(encode(backbone, x, pos_embed_fit="crop"), want)
        assert not torch.allclose(encode(backbone, x), want, atol=1e-3)  # resampling is another model
        full = torch.randn(2, 1, 112, 48)  # the pretraining grid: both are timm's forward
        torch.testing.assert_close(encode(backbone, full, pos_embed_fit="crop"), backbone.forward_features(full))
    model = FinetuneModel(backbone, 4, "tokens", "crop").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(want[:, 1:].mean(1)))
    with pytest.raises(ValueError, match="pos_embed_fit"):
        FinetuneModel(backbone, 4, "tokens", "cut")
