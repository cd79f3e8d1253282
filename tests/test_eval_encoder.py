"""asit.eval.encoder: loading exported encoders and embedding audio of any length."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import asit
from asit.data import kaldi_fbank, normalize_fbank
from asit.eval import AudioEncoder, EncoderError, load_encoder
from asit.models import build_backbone, encode

SR = 8000
FRAMES, MELS, PATCH = 64, 32, 16
MEAN, STD = -5.0, 3.0


def _tiny_backbone(seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone(img_size=(FRAMES, MELS), patch_size=PATCH, embed_dim=48, depth=2, num_heads=3)


def write_encoder(path, backbone=None, *, with_heads_in_config: bool = True):
    """Write a file in the layout of ``Pretrainer.export_teacher_encoder``."""
    backbone = backbone or _tiny_backbone()
    tensors = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    config = (
        {"model": {"arch": "tiny", "num_heads": 3}} if with_heads_in_config else {"model": {"arch": "tiny"}}
    )
    meta = {
        "format": "asit-encoder-v1",
        "arch": "tiny",
        "patch_size": str(PATCH),
        "img_size": json.dumps([FRAMES, MELS]),
        "sample_rate": str(SR),
        "num_mel_bins": str(MELS),
        "mean": str(MEAN),
        "std": str(STD),
        "config": json.dumps(config),
        "step": "7",
    }
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.fixture
def encoder_file(tmp_path):
    return write_encoder(tmp_path / "teacher_encoder.safetensors")


def test_load_restores_weights_and_metadata(encoder_file):
    enc = load_encoder(encoder_file)
    ref = _tiny_backbone()
    assert (enc.sample_rate, enc.embed_dim, enc.num_mel_bins, enc.target_frames, enc.patch_size) == (
        SR,
        48,
        MELS,
        FRAMES,
        PATCH,
    )
    assert len(enc.backbone.blocks) == 2 and enc.backbone.blocks[0].attn.num_heads == 3
    for k, v in ref.state_dict().items():
        assert torch.equal(enc.backbone.state_dict()[k], v), k
    assert asit.load_encoder is load_encoder


def test_random_init_differs_and_is_seeded(encoder_file):
    a = load_encoder(encoder_file, random_init=True, seed=1)
    b = load_encoder(encoder_file, random_init=True, seed=1)
    c = load_encoder(encoder_file, random_init=True, seed=2)
    w = "blocks.0.attn.qkv.weight"
    assert torch.equal(a.backbone.state_dict()[w], b.backbone.state_dict()[w])
    assert not torch.equal(a.backbone.state_dict()[w], c.backbone.state_dict()[w])


def test_rejects_foreign_files(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(path), metadata={"format": "something-else"})
    with pytest.raises(EncoderError, match="not an asit encoder"):
        load_encoder(path)
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder(tmp_path / "missing.safetensors")


def test_num_heads_from_preset_must_match_width(tmp_path):
    path = write_encoder(tmp_path / "e.safetensors", with_heads_in_config=False)
    with pytest.raises(EncoderError, match="number of attention heads"):
        load_encoder(path)  # width 48 is not the tiny preset's 192


def test_features_match_pretraining_pipeline(encoder_file):
    enc = load_encoder(encoder_file)
    wave = torch.randn(2, SR) * 0.1 + 0.3  # DC offset: must be removed
    feats = enc.features(wave)
    frames = enc.num_fbank_frames(SR)
    assert feats.shape == (2, 1, frames, MELS)
    ref = normalize_fbank(kaldi_fbank(wave[1], SR, MELS, frames), MEAN, STD)
    torch.testing.assert_close(feats[1, 0], ref)


def test_single_window_equals_direct_forward(encoder_file):
    enc = load_encoder(encoder_file)
    n = int(SR * ((FRAMES - 1) * 0.010 + 0.025))  # exactly FRAMES fbank frames: one full window
    wave = torch.randn(3, n)
    out = enc.embed(wave, SR)
    tokens = encode(enc.backbone, enc.features(wave))  # [B, 1 + N, D]
    torch.testing.assert_close(out.clip, tokens[:, 0])
    per_time = tokens[:, 1:].reshape(3, FRAMES // PATCH, MELS // PATCH, -1).mean(2)
    torch.testing.assert_close(out.frames, per_time)
    assert out.timestamps_s.shape == (FRAMES // PATCH,)
    torch.testing.assert_close(out.timestamps_s, torch.tensor([0.0875, 0.2475, 0.4075, 0.5675]))


def test_long_audio_windows_and_pooling(encoder_file):
    enc = load_encoder(encoder_file)
    wave = torch.randn(2, int(SR * 1.5))  # 148 frames: windows at 0, 64, 128 (last one padded)
    out = enc.embed(wave, SR)
    frames = enc.num_fbank_frames(wave.shape[1])
    assert frames == 148
    n = -(-frames // PATCH)
    assert out.frames.shape == (2, n, 48) and out.num_frames.tolist() == [n, n]
    fb = enc.features(wave)[:, :, :, :]
    pad = normalize_fbank(torch.zeros(()), MEAN, STD).item()
    padded = torch.cat([fb, torch.full((2, 1, 3 * FRAMES - frames, MELS), pad)], dim=2)
    windows = padded.reshape(2, 1, 3, FRAMES, MELS).transpose(1, 2).reshape(6, 1, FRAMES, MELS)
    tokens = encode(enc.backbone, windows).reshape(2, 3, 1 + 8, -1)
    torch.testing.assert_close(out.clip, tokens[:, :, 0].mean(1))
    per_time = tokens[:, :, 1:].reshape(2, 3, 4, 2, -1).mean(3).reshape(2, 12, -1)
    torch.testing.assert_close(out.frames, per_time[:, :n])
    tok = enc.embed(wave, SR, pool="tokens").clip
    torch.testing.assert_close(tok, per_time[:, :n].mean(1))


def test_overlapping_windows_average_aligned_patches(encoder_file):
    enc = load_encoder(encoder_file, hop_frames=32)
    wave = torch.randn(1, SR)  # 98 frames: windows at 0, 32 (to 96) and 64 (padded)
    out = enc.embed(wave, SR)
    frames = enc.features(wave)[0, 0]
    pad = normalize_fbank(torch.zeros(()), MEAN, STD).item()
    frames = torch.cat([frames, torch.full((128 - frames.shape[0], MELS), pad)])
    wins = torch.stack([frames[s : s + FRAMES] for s in (0, 32, 64)]).unsqueeze(1)
    per_time = encode(enc.backbone, wins)[:, 1:].reshape(3, 4, 2, -1).mean(2)  # [3, 4, D]
    # time patch 2 (frames 32..47) is seen by windows 0 and 1
    torch.testing.assert_close(out.frames[0, 2], (per_time[0, 2] + per_time[1, 0]) / 2)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        load_encoder(encoder_file, hop_frames=20)


def test_short_audio_resampling_and_ragged_batches(encoder_file):
    enc = load_encoder(encoder_file)
    short = torch.randn(100)  # shorter than one fbank window
    longer = torch.randn(3 * SR)
    out = enc.embed([short, longer], sample_rate=2 * SR)  # resampled to SR
    n_long = -(-enc.num_fbank_frames(int(1.5 * SR)) // PATCH)
    assert out.num_frames.tolist() == [1, n_long]
    assert out.frames.shape == (2, n_long, 48)
    assert torch.all(out.frames[0, 1:] == 0)
    assert torch.isfinite(out.clip).all() and torch.all(out.timestamps_s.diff() > 0)
    alone = enc.embed(short, sample_rate=2 * SR)
    torch.testing.assert_close(alone.clip[0], out.clip[0])


def test_encoder_is_frozen(encoder_file):
    enc = load_encoder(encoder_file).train()
    assert not enc.training and not enc.backbone.training
    assert not any(p.requires_grad for p in enc.parameters())
    assert isinstance(enc, AudioEncoder)
