"""asit.eval.interop: export to plain timm, import of the authors' (DINO-layout) checkpoints."""

from __future__ import annotations

import pytest
import torch
from test_eval_encoder import FRAMES, MELS, PATCH, write_encoder  # tests/ is on sys.path under pytest

from asit.eval import EncoderError, load_encoder
from asit.eval.interop import import_authors_checkpoint, to_timm, transpose_patch_layout
from asit.models import build_backbone, encode

GRID = (FRAMES // PATCH, MELS // PATCH)  # (4, 2)


def _backbone(seed=0):
    torch.manual_seed(seed)
    return build_backbone(img_size=(FRAMES, MELS), patch_size=PATCH, embed_dim=48, depth=2, num_heads=3)


def _authors_layout(state, *, ddp: bool):
    prefix = "module." if ddp else ""
    net = {f"{prefix}backbone.{k}": v.clone() for k, v in state.items()}
    net[f"{prefix}head.mlp.0.weight"] = torch.randn(64, 48)
    net[f"{prefix}head_recons.convTrans.weight"] = torch.randn(48, 1, 16, 16)
    return net


@pytest.mark.parametrize("from_path", [False, True])
def test_to_timm_loads_strict_and_matches(tmp_path, from_path):
    path = write_encoder(tmp_path / "e.safetensors", _backbone())
    enc = load_encoder(path)
    model = to_timm(path if from_path else enc)
    assert type(model).__name__ == "VisionTransformer" and model.num_classes == 0
    assert tuple(model.patch_embed.img_size) == (FRAMES, MELS)
    x = torch.randn(2, 1, FRAMES, MELS)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), encode(enc.backbone, x))


@pytest.mark.parametrize("ddp", [False, True])
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_import_strips_prefixes_and_heads(tmp_path, ddp, which):
    teacher, student = _backbone(0).state_dict(), _backbone(1).state_dict()
    ckpt = {
        "teacher": _authors_layout(teacher, ddp=ddp),
        "student": _authors_layout(student, ddp=ddp),
        "epoch": 99,
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    state = import_authors_checkpoint(path, which=which, img_size=(FRAMES, MELS))
    ref = teacher if which == "teacher" else student
    assert set(state) == set(ref)
    for k in ref:
        assert torch.equal(state[k], ref[k]), k
    model = _backbone(5)
    model.load_state_dict(state, strict=True)


def test_import_rejects_wrong_shapes_and_missing_keys():
    state = _backbone().state_dict()
    with pytest.raises(EncoderError, match="shape mismatch"):
        import_authors_checkpoint({"teacher": _authors_layout(state, ddp=True)}, img_size=(2 * FRAMES, MELS))
    partial = _authors_layout(state, ddp=False)
    del partial["backbone.norm.weight"]
    with pytest.raises(EncoderError, match="lacks"):
        import_authors_checkpoint({"teacher": partial}, img_size=(FRAMES, MELS))
    with pytest.raises(EncoderError, match="no 'backbone.' keys"):
        import_authors_checkpoint({"teacher": {"head.w": torch.zeros(1)}}, img_size=(FRAMES, MELS))
    with pytest.raises(ValueError, match="v2"):
        import_authors_checkpoint({"teacher": partial}, version="v1", transpose_patches=True)


def _freq_first(state):
    """What a model trained on (B, 1, F, T) input holds: the transpose of our layout."""
    out = dict(state)
    out["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].transpose(-1, -2).contiguous()
    pos = state["pos_embed"]
    grid = pos[:, 1:].reshape(1, GRID[0], GRID[1], -1).transpose(1, 2).reshape(1, GRID[0] * GRID[1], -1)
    out["pos_embed"] = torch.cat([pos[:, :1], grid], dim=1)
    return out


def test_v2_transpose_patches_roundtrip_and_function():
    ours = _backbone().state_dict()
    ckpt = {"teacher": _authors_layout(_freq_first(ours), ddp=True)}
    state = import_authors_checkpoint(ckpt, version="v2", transpose_patches=True, img_size=(FRAMES, MELS))
    for k in ours:
        assert torch.equal(state[k], ours[k]), k
    # functional check: the frequency-first model on transposed input == our model on time-first input
    freq_first = build_backbone(img_size=(MELS, FRAMES), patch_size=PATCH, embed_dim=48, depth=2, num_heads=3)
    freq_first.load_state_dict(_freq_first(ours))
    model = _backbone(3)
    model.load_state_dict(state)
    x = torch.randn(2, 1, FRAMES, MELS)
    with torch.no_grad():
        torch.testing.assert_close(
            encode(model, x)[:, 0], encode(freq_first, x.transpose(-1, -2))[:, 0], rtol=1e-4, atol=1e-5
        )
    # a grid that does not match the number of positions is refused
    with pytest.raises(ValueError, match="positions"):
        transpose_patch_layout(ours, (3, 3))
