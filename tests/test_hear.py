"""asit.hear: the HEAR 2021 API (shapes, dtypes, timestamps)."""

from __future__ import annotations

import pytest
import torch
from test_encoder import SR, write_encoder  # tests/ is on sys.path under pytest

import asit.hear as hear


@pytest.fixture
def model(tmp_path):
    return hear.load_model(str(write_encoder(tmp_path / "e.safetensors")))


def test_attributes(model):
    assert isinstance(model.sample_rate, int) and model.sample_rate == SR
    assert model.scene_embedding_size == model.timestamp_embedding_size == 48


@pytest.mark.parametrize("seconds", [0.05, 2.0])
def test_embeddings_shapes_dtypes_and_timestamps(model, seconds):
    audio = torch.randn(3, int(seconds * SR)) * 0.1
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (3, 48) and scene.dtype == torch.float32 and torch.isfinite(scene).all()
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert emb.dtype == ts.dtype == torch.float32
    assert emb.shape[:2] == ts.shape and emb.shape[0] == 3 and emb.shape[2] == 48
    assert torch.all(ts.diff(dim=1) > 0)
    duration = seconds * 1000
    assert torch.all(ts <= duration) and torch.equal(ts[0], ts[-1])  # HEAR: every timestamp inside the clip
    frames = 1 + max(int(seconds * SR) - 200, 0) // 80
    if seconds > 1:  # four grids of patches 40 ms apart, those centred past the clip's end left out
        grids = [87.5 + 10 * o + 160 * j for o in (0, 4, 8, 12) for j in range(-(-(frames - o) // 16))]
        assert ts[0].tolist() == sorted(t for t in grids if t <= duration)
        torch.testing.assert_close(ts[0].diff(), torch.full((ts.shape[1] - 1,), 40.0))
        assert ts[0, -1] > duration - 40
    else:  # shorter than the first patch centre (87.5 ms): one frame, at the clip's middle
        assert ts.shape[1] == 1 and ts[0, 0] == pytest.approx(duration / 2)


@pytest.mark.parametrize("seconds", [0.2, 0.5, 1.07, 1.98, 2.74, 4.0])
@pytest.mark.parametrize("hop_ms", [40, 160])
def test_timestamps_pass_the_hear_validator_rules(tmp_path, seconds, hop_ms):
    """The checks of hear-validator: regular spacing (1 ms), last timestamp within 2 hops of the end and
    never past it; a 0.5 s clip used to end at 527.5 ms."""
    model = hear.load_model(str(write_encoder(tmp_path / "e.safetensors")), timestamp_hop_ms=hop_ms)
    _, ts = hear.get_timestamp_embeddings(torch.randn(2, int(seconds * SR)) * 0.1, model)
    duration = 1000 * int(seconds * SR) / SR
    assert float(ts.max()) <= duration and ts[0, 0] == pytest.approx(87.5)
    if ts.shape[1] > 1:
        diff = ts[0].double().diff()
        assert float((diff - hop_ms).abs().max()) < 1e-3
        assert float(ts.max()) >= duration - 2 * hop_ms


def test_dense_timestamps_are_real_outputs_of_shifted_inputs(tmp_path):
    """Every 4th timestamp embedding is the native grid's; the others equal embedding the clip advanced."""
    path = str(write_encoder(tmp_path / "e.safetensors"))
    dense, native = hear.load_model(path), hear.load_model(path, timestamp_hop_ms=160)
    audio = torch.randn(2, 3 * SR, generator=torch.Generator().manual_seed(0)) * 0.1
    emb, ts = hear.get_timestamp_embeddings(audio, dense)
    emb0, ts0 = hear.get_timestamp_embeddings(audio, native)
    assert torch.equal(ts[:, ::4][:, : ts0.shape[1]], ts0) and torch.equal(emb[:, ::4][:, : ts0.shape[1]], emb0)
    advanced = native.encoder.embed(audio[:, 8 * SR // 100 :], SR).frames  # 8 frames = 80 ms later
    shifted = emb[:, 2::4]  # the advanced grid's last patch, centred past the clip's end, is left out
    assert shifted.shape[1] == advanced.shape[1] - 1
    torch.testing.assert_close(shifted, advanced[:, : shifted.shape[1]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="timestamp_hop_ms"):
        hear.load_model(path, timestamp_hop_ms=50)


def test_last_timestamp_of_a_long_clip_comes_from_its_final_window(tmp_path):
    """2.05 s = 203 fbank frames, 13 patches (the last centred at 2007.5 ms, inside the clip); the 64-frame
    windows start at 0, 64, 128 and 139 (ending with the clip), so the last patch (frames 192-202) is an output
    of the clip's final 64 frames of audio, not of a zero-padded window. At 2 s the same patch would be centred
    past the clip's end and is left out."""
    model = hear.load_model(str(write_encoder(tmp_path / "e.safetensors")), timestamp_hop_ms=160)
    audio = torch.randn(2, 205 * SR // 100, generator=torch.Generator().manual_seed(3)) * 0.1
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert emb.shape[1] == ts.shape[1] == 13 and model.encoder.window_starts(203) == [0, 64, 128, 139]
    start = 139 * SR // 100  # frame 139, in samples
    final = model.encoder.embed(audio[:, start : start + model.encoder.num_samples_for_frames(64)], SR).frames
    assert final.shape[1] == 4
    torch.testing.assert_close(emb[:, 12], final[:, 3], rtol=1e-4, atol=1e-4)
    _, ts2 = hear.get_timestamp_embeddings(audio[:, : 2 * SR], model)
    assert ts2.shape[1] == 12 and float(ts2.max()) == 1847.5


def test_load_model_needs_a_path(monkeypatch):
    monkeypatch.delenv(hear.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="safetensors"):
        hear.load_model()
    with pytest.raises(ValueError, match="n_sounds"):
        hear.get_scene_embeddings(torch.zeros(10), None)
