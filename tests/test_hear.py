"""asit.hear: the HEAR 2021 API (shapes, dtypes, timestamps)."""

from __future__ import annotations

import pytest
import torch
from test_eval_encoder import SR, write_encoder  # tests/ is on sys.path under pytest

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
    assert ts[0, 0] == pytest.approx(87.5) and torch.all(ts[:, -1] <= seconds * 1000 + 160)
    expected = -(-(1 + max(int(seconds * SR) - 200, 0) // 80) // 16)  # ceil(fbank frames / 16)
    assert ts.shape[1] == expected


def test_load_model_needs_a_path(monkeypatch):
    monkeypatch.delenv(hear.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="safetensors"):
        hear.load_model()
    with pytest.raises(ValueError, match="n_sounds"):
        hear.get_scene_embeddings(torch.zeros(10), None)
