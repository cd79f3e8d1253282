"""asit.encoder.interop: export to plain timm, import of the authors' (DINO-layout) checkpoints."""

from __future__ import annotations

import argparse
import json
import runpy
from pathlib import Path

import pytest
import torch
from test_encoder import FRAMES, MELS, PATCH, SR, write_encoder  # tests/ is on sys.path under pytest

import asit.hear as hear
from asit.encoder import EncoderError, backbone_spec, load_encoder
from asit.encoder.interop import export_authors_checkpoint, import_authors_checkpoint, to_timm, transpose_patch_layout
from asit.models import build_backbone, encode

ROOT = Path(__file__).resolve().parents[1]

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


def _authors_file(path: Path, teacher_state, *, arch: str = "vit_tiny48") -> Path:
    """What the authors' main_ASiT.py saves (DINO's layout): networks, optimiser, loss, scaler, epoch,
    and the argparse.Namespace of its command line."""
    student = _authors_layout(teacher_state, ddp=True)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    opt = torch.optim.AdamW(params, lr=5e-4)
    sum(p.sum() for p in params).backward()
    opt.step()
    args = argparse.Namespace(arch=arch, patch_size=16, lr=5e-4, batch_size_per_gpu=32, data_path="/data/as2m",
                              use_fp16=True, epochs=100, out_dim=8192, teacher_temp=0.07)
    torch.save({"student": student, "teacher": _authors_layout(teacher_state, ddp=False),
                "optimizer": opt.state_dict(), "epoch": 100, "args": args,
                "asit_loss": {"center": torch.zeros(1, 8192), "center_local": torch.zeros(1, 1, 1024)},
                "fp16_scaler": torch.amp.GradScaler("cpu").state_dict()}, path)
    return path


def test_import_reads_the_authors_file_with_its_argparse_namespace(tmp_path):
    ours = _backbone(2).state_dict()
    state = import_authors_checkpoint(_authors_file(tmp_path / "checkpoint.pth", ours), img_size=(FRAMES, MELS))
    assert set(state) == set(ours) and all(torch.equal(state[k], ours[k]) for k in ours)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_import_wraps_unreadable_files_in_encoder_errors(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"certainly not a checkpoint")
    with pytest.raises(EncoderError, match="garbage.pth: cannot read it with torch.load"):
        import_authors_checkpoint(garbage)
    other = tmp_path / "other.pth"
    torch.save({"teacher": {"backbone.x": torch.zeros(1)}, "hook": _Evil()}, other)
    with pytest.raises(EncoderError, match="other.pth: .*weights_only=False"):
        import_authors_checkpoint(other)
    with pytest.raises(EncoderError, match="does not exist"):
        import_authors_checkpoint(tmp_path / "missing.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(EncoderError, match="not a checkpoint dict"):
        import_authors_checkpoint(tmp_path / "list.pth")


def test_export_authors_infers_heads_from_args_or_width(tmp_path):
    torch.manual_seed(0)  # a ViT-S-wide, 1-block backbone: args.arch "vit_small" -> 6 heads
    small = build_backbone(img_size=(FRAMES, MELS), patch_size=PATCH, embed_dim=384, depth=1, num_heads=6)
    ckpt = _authors_file(tmp_path / "small.pth", small.state_dict(), arch="vit_small")
    out = export_authors_checkpoint(ckpt, tmp_path / "small.safetensors", img_size=(FRAMES, MELS), sample_rate=SR)
    enc = load_encoder(out)
    assert enc.backbone.blocks[0].attn.num_heads == 6 and enc.sample_rate == SR
    meta = enc.metadata
    assert meta["arch"] == "authors-v1" and json.loads(meta["config"])["source"]["epoch"] == 100
    # v2 defaults to 16 kHz; without args, the one preset of that width decides
    raw = {"teacher": _authors_layout(small.state_dict(), ddp=False)}
    assert load_encoder(export_authors_checkpoint(raw, tmp_path / "v2.safetensors", version="v2",
                                                  img_size=(FRAMES, MELS))).sample_rate == 16000
    with pytest.raises(EncoderError, match="--num-heads"):  # width 48 matches no preset
        export_authors_checkpoint(_authors_file(tmp_path / "t.pth", _backbone().state_dict()),
                                  tmp_path / "t.safetensors", img_size=(FRAMES, MELS))


def test_authors_checkpoint_end_to_end_through_the_script(tmp_path, capsys):
    """The authors' .pth -> scripts/import_authors.py -> an encoder file, with the authors' weights in it,
    that loading, HEAR, the linear probe and a (two-step) fine-tune all accept."""
    from test_eval_linear_probe import _mini_corpus

    from asit.eval.linear_probe import ProbeConfig, probe_encoder
    from asit.finetune import load_finetune_config, run_finetune

    ours = _backbone(7)
    ckpt = _authors_file(tmp_path / "checkpoint.pth", ours.state_dict())
    out = tmp_path / "authors.safetensors"
    main = runpy.run_path(str(ROOT / "scripts" / "import_authors.py"), run_name="script_under_test")["main"]
    args = [str(ckpt), "--out", str(out), "--img-size", str(FRAMES), str(MELS), "--sample-rate", str(SR),
            "--mean", "-5", "--std", "3"]
    assert main(args) == 1 and "--num-heads" in capsys.readouterr().err  # width 48: heads must be given
    assert main([*args, "--num-heads", "3"]) == 0, capsys.readouterr().err
    assert "3 heads" in capsys.readouterr().out

    enc = load_encoder(out)
    assert (enc.sample_rate, enc.mean, enc.std, enc.target_frames, enc.num_mel_bins) == (SR, -5.0, 3.0, FRAMES, MELS)
    x = torch.randn(2, 1, FRAMES, MELS)
    with torch.no_grad():
        torch.testing.assert_close(encode(enc.backbone, x), encode(ours.eval(), x))
    audio = torch.randn(2, SR) * 0.1
    model = hear.load_model(str(out))
    assert hear.get_scene_embeddings(audio, model).shape == (2, 48)
    assert hear.get_timestamp_embeddings(audio, model)[0].shape[:2] == (2, 6 + 6 + 6 + 5)  # 4 grids, none past 1 s
    assert backbone_spec(enc.backbone.state_dict(), enc.metadata)["num_heads"] == 3

    (tmp_path / "corpus").mkdir()
    probe = probe_encoder(out, _mini_corpus(tmp_path / "corpus"), cache_dir=tmp_path / "emb",
                          cfg=ProbeConfig(folds=2, max_iter=20), progress=False)
    assert probe["num_clips"] == 12 and probe["embed_dim"] == 48
    cfg = load_finetune_config("demo", [
        f"encoder={out}", f"data.cache_dir={tmp_path / 'cache'}", "data.demo_clips=12", "data.demo_seconds=0.64",
        "data.num_workers=0", "train.batch_size=6", "train.progress=false", f"train.output_dir={tmp_path / 'ft'}",
        "train.epochs=1", "train.max_steps_per_epoch=2", "train.average_start=null", "train.average_end=null",
        "train.save_best=false"])
    result = run_finetune(cfg)
    assert len(result["history"]) == 1 and (tmp_path / "ft" / "results.json").is_file()
