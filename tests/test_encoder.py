"""asit.encoder: the file format, loading exported encoders and embedding audio of any length."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import asit
from asit.data import kaldi_fbank, normalize_fbank
from asit.data.fbank import batched_kaldi_fbank
from asit.data.transforms import pad_or_crop_random
from asit.encoder import AudioEncoder, EncoderError, export_encoder, load_encoder
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


def _rewrite_metadata(path, **changes):
    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}
    meta.update(changes)
    save_file(tensors, str(path), metadata=meta)


def test_num_heads_metadata_comes_first(tmp_path):
    """A width override leaves config.model.num_heads null; the exporter's num_heads entry must be used."""
    path = write_encoder(tmp_path / "e.safetensors", with_heads_in_config=False)
    _rewrite_metadata(path, num_heads="3", embed_dim="48", depth="2")
    assert load_encoder(path).backbone.blocks[0].attn.num_heads == 3
    # it wins over a config that says otherwise (48 / 6 would build, with the wrong attention)
    _rewrite_metadata(path, config=json.dumps({"model": {"arch": "tiny", "num_heads": 6}}))
    assert load_encoder(path).backbone.blocks[0].attn.num_heads == 3
    _rewrite_metadata(path, num_heads="5")
    with pytest.raises(EncoderError, match="does not divide"):
        load_encoder(path)


def test_export_encoder_roundtrip_and_checks(tmp_path):
    backbone = _tiny_backbone(4)
    path = export_encoder(backbone, tmp_path / "x.safetensors", sample_rate=SR, mean=MEAN, std=STD, step=3)
    enc = load_encoder(path)
    assert (enc.sample_rate, enc.mean, enc.std, enc.target_frames, enc.num_mel_bins) == (SR, MEAN, STD, FRAMES, MELS)
    assert enc.backbone.blocks[0].attn.num_heads == 3 and enc.metadata["step"] == "3"
    for k, v in backbone.state_dict().items():
        assert torch.equal(enc.backbone.state_dict()[k], v), k
    assert not list(tmp_path.glob("*.tmp"))
    # a state dict needs the two facts its shapes do not hold
    state = backbone.state_dict()
    with pytest.raises(EncoderError, match="img_size and num_heads"):
        export_encoder(state, tmp_path / "y.safetensors", sample_rate=SR, mean=MEAN, std=STD)
    export_encoder(state, tmp_path / "y.safetensors", sample_rate=SR, mean=MEAN, std=STD, img_size=(FRAMES, MELS),
                   num_heads=3)
    assert load_encoder(tmp_path / "y.safetensors").backbone.blocks[0].attn.num_heads == 3
    with pytest.raises(EncoderError, match="not a ViT"):  # positional grid of another input size
        export_encoder(state, tmp_path / "z.safetensors", sample_rate=SR, mean=MEAN, std=STD,
                       img_size=(2 * FRAMES, MELS), num_heads=3)
    with pytest.raises(EncoderError, match="does not divide"):
        export_encoder(state, tmp_path / "z.safetensors", sample_rate=SR, mean=MEAN, std=STD,
                       img_size=(FRAMES, MELS), num_heads=5)
    assert not (tmp_path / "z.safetensors").exists()


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


def _per_time(enc, windows):
    """``[W, gh, D]`` data tokens of ``windows`` averaged over frequency, and [CLS] ``[W, D]``."""
    tokens = encode(enc.backbone, windows)
    return tokens[:, 1:].reshape(windows.shape[0], FRAMES // PATCH, MELS // PATCH, -1).mean(2), tokens[:, 0]


def test_short_clips_are_padded_like_pretraining(encoder_file):
    """Zero samples, not zero fbank values: the padded frames sit at Kaldi's log floor, as in pretraining."""
    enc = load_encoder(encoder_file)
    wave = torch.randn(SR // 2, generator=torch.Generator().manual_seed(0)) * 0.1  # 0.5 s: 48 of 64 frames
    out = enc.embed(wave, SR)
    crop = pad_or_crop_random(wave, enc.num_samples_for_frames(FRAMES), None)  # what ClipViews does
    pretrain = batched_kaldi_fbank(crop[None], SR, MELS, FRAMES, normalize=(MEAN, STD))  # [1, FRAMES, MELS]
    log_floor = (math.log(torch.finfo(torch.float32).eps) - MEAN) / (2 * STD)
    torch.testing.assert_close(pretrain[0, -1], torch.full((MELS,), log_floor))
    torch.testing.assert_close(enc.features(wave, FRAMES)[0, 0], pretrain[0], rtol=1e-4, atol=1e-4)
    per_time, cls = _per_time(enc, pretrain.unsqueeze(1))
    torch.testing.assert_close(out.clip[0], cls[0], rtol=1e-4, atol=1e-4)
    n = math.ceil(enc.num_fbank_frames(wave.numel()) / PATCH)
    assert out.num_frames.tolist() == [n] and n == 3
    torch.testing.assert_close(out.frames[0], per_time[0, :n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("frames, hop", [(65, 64), (148, 64), (160, 64), (98, 32), (200, 16), (137, 48)])
def test_window_starts_cover_the_clip_with_full_windows(encoder_file, frames, hop):
    enc = load_encoder(encoder_file, hop_frames=hop)
    starts = enc.window_starts(frames)
    assert starts[0] == 0 and starts[-1] + FRAMES == frames  # the last window ends at the clip's end
    assert all(b > a for a, b in zip(starts, starts[1:])) and all(s % hop == 0 for s in starts[:-1])
    assert all(b - a <= hop for a, b in zip(starts, starts[1:]))  # no gap: every frame is in a window
    assert enc.window_starts(FRAMES) == enc.window_starts(FRAMES - 5) == [0]


def test_long_audio_windows_and_pooling(encoder_file):
    enc = load_encoder(encoder_file)
    wave = torch.randn(2, int(SR * 1.5))  # 148 frames: windows at 0, 64 and 84 (ending at frame 148)
    frames = enc.num_fbank_frames(wave.shape[1])
    assert frames == 148 and enc.window_starts(frames) == [0, 64, 84]
    out = enc.embed(wave, SR)
    n = -(-frames // PATCH)  # 10 time patches, the last one 4 frames of audio
    assert out.frames.shape == (2, n, 48) and out.num_frames.tolist() == [n, n]
    assert out.timestamps_s.shape == (n,)
    fb = enc.features(wave)  # [2, 1, 148, F]: no padding anywhere
    windows = torch.stack([fb[:, :, s : s + FRAMES] for s in (0, 64, 84)], 1).reshape(6, 1, FRAMES, MELS)
    per_time, cls = _per_time(enc, windows)
    per_time, cls = per_time.reshape(2, 3, 4, -1), cls.reshape(2, 3, -1)
    torch.testing.assert_close(out.clip, cls.mean(1))
    # patches 0-7 from the aligned windows; 8 (frames 128-143) and 9 (144-147) from the last window's
    # nearest patch, its fourth (frames 132-147)
    expected = torch.cat([per_time[:, 0], per_time[:, 1], per_time[:, 2, 3:], per_time[:, 2, 3:]], 1)
    torch.testing.assert_close(out.frames, expected)
    tok = enc.embed(wave, SR, pool="tokens").clip
    torch.testing.assert_close(tok, expected.mean(1))


def test_tail_patches_come_from_the_nearest_patch_of_the_last_window(encoder_file):
    """167 frames: windows at 0, 64 and 103; patch 8 (frames 128-143) is nearest to the last window's patch
    2 (frames 135-150, 7 frames later), patch 9 (144-159) to patch 3 (151-166), patch 10 (160-166, under
    half a patch of audio) also to patch 3, the clip's last 16 frames."""
    enc = load_encoder(encoder_file)
    wave = torch.randn(1, enc.num_samples_for_frames(167), generator=torch.Generator().manual_seed(1))
    assert enc.window_starts(167) == [0, 64, 103]
    out = enc.embed(wave, SR)
    fb = enc.features(wave)[0, 0]
    per_time, _ = _per_time(enc, torch.stack([fb[s : s + FRAMES] for s in (0, 64, 103)]).unsqueeze(1))
    assert out.num_frames.tolist() == [11]
    torch.testing.assert_close(out.frames[0, 4:8], per_time[1])
    torch.testing.assert_close(out.frames[0, 8:], per_time[2, [2, 3, 3]])


def test_overlapping_windows_average_aligned_patches(encoder_file):
    enc = load_encoder(encoder_file, hop_frames=32)
    wave = torch.randn(1, SR)  # 98 frames: windows at 0, 32 and 34 (ending at frame 98)
    assert enc.window_starts(98) == [0, 32, 34]
    out = enc.embed(wave, SR)
    frames = enc.features(wave)[0, 0]
    per_time, cls = _per_time(enc, torch.stack([frames[s : s + FRAMES] for s in (0, 32, 34)]).unsqueeze(1))
    # time patch 2 (frames 32..47) is seen by windows 0 and 1; patch 6 (frames 96, 97) only by the last
    torch.testing.assert_close(out.frames[0, 2], (per_time[0, 2] + per_time[1, 0]) / 2)
    torch.testing.assert_close(out.frames[0, 5], per_time[1, 3])
    torch.testing.assert_close(out.frames[0, 6], per_time[2, 3])
    torch.testing.assert_close(out.clip[0], cls.mean(0))
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


def test_embed_takes_numpy_1d_batches_lists_and_multichannel(encoder_file):
    """A NumPy 1-D clip, a (B, T) batch, a list of (C, T) clips: down-mixed like the file loader (channel mean)."""
    import numpy as np

    enc = load_encoder(encoder_file)
    rng = np.random.default_rng(0)
    mono = (0.1 * rng.standard_normal(SR)).astype(np.float32)
    stereo = (0.1 * rng.standard_normal((2, SR // 2))).astype(np.float32)
    ref = enc.embed(torch.from_numpy(mono), SR).clip
    torch.testing.assert_close(enc.embed(mono, SR).clip, ref)  # used to fail: waves[0] must be 1-D, got ()
    torch.testing.assert_close(enc.embed(mono.astype(np.float64), SR).clip, ref)
    batch = enc.embed(np.stack([mono, mono[::-1].copy()]), SR)
    assert batch.clip.shape == (2, 48)
    torch.testing.assert_close(batch.clip[0], ref[0])
    mixed = enc.embed([mono, stereo, torch.from_numpy(stereo[:1])], SR)
    downmix = enc.embed(stereo.mean(axis=0), SR).clip
    torch.testing.assert_close(mixed.clip[1], downmix[0])
    torch.testing.assert_close(mixed.clip[2], enc.embed(stereo[0], SR).clip[0])
    assert mixed.num_frames.tolist()[0] > mixed.num_frames.tolist()[1]


@pytest.mark.parametrize(
    "waves, match",
    [
        (torch.tensor(0.5), r"shape \(\)"),
        (torch.zeros(2, 3, 100), r"shape \(2, 3, 100\)"),
        ([torch.zeros(2, 3, 100)], r"waves\[0\] has shape"),
        (torch.zeros(8000, 2), r"\[T, C\] layout"),
        ([torch.zeros(8000, 2)], r"more channels than samples"),
        (torch.zeros(100, dtype=torch.int16), "x / 32768"),
        ("clip.wav", "is a str"),
        ([[0.1, 0.2]], r"waves\[0\] is a list"),
    ],
)
def test_embed_refuses_other_shapes_naming_the_accepted_ones(encoder_file, waves, match):
    enc = load_encoder(encoder_file)
    with pytest.raises((TypeError, ValueError), match=match) as err:
        enc.embed(waves, SR)
    assert "dtype" in str(err.value) or "[B, T] batch" in str(err.value)
