"""PretrainDataset shapes, reproducible randomness, bad clips, and collation."""

import logging

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from asit.data import (
    AudioEntry,
    PretrainDataset,
    collate_pretrain,
    item_generator,
    kaldi_fbank,
    load_audio,
    normalize_fbank,
    pad_or_crop_random,
)

SR = 16000
SMALL = dict(sample_rate=SR, crop_seconds=1.0, num_mel_bins=32, target_frames=96, roll_prob=0.5)


def _write_noise(path, seconds, seed, sr=SR):
    rng = np.random.default_rng(seed)
    sf.write(path, (0.3 * rng.standard_normal(int(seconds * sr))).astype(np.float32), sr)
    return str(path)


@pytest.fixture
def clips(tmp_path):
    return [
        AudioEntry(_write_noise(tmp_path / "a.wav", 3.0, 0), ("dog",)),
        AudioEntry(_write_noise(tmp_path / "b.wav", 0.5, 1), ("cat", "dog")),  # shorter than a crop
        AudioEntry(_write_noise(tmp_path / "c.wav", 2.0, 2), ()),
    ]


def test_default_shapes_and_values(tmp_path):
    entry = AudioEntry(_write_noise(tmp_path / "long.wav", 7.0, 5, sr=32000), ("x",))
    ds = PretrainDataset([entry], label_vocab=["x", "y"], local_views=3, roll_prob=0.0)
    sample = ds[0]
    assert sample["views"].shape == (2, 1, 592, 128) and sample["views"].dtype == torch.float32
    assert sample["local_views"].shape == (3, 1, 192, 128)
    assert torch.equal(sample["label"], torch.tensor([1.0, 0.0]))
    assert sample["index"] == 0 and sample["ok"] is True and sample["error"] == ""
    # The first view is the normalised fbank of the crop drawn from the item's own generator.
    wave = load_audio(entry.path, 32000)
    view = sample["views"][0, 0]
    g = item_generator(0, 0, 0)
    crop = pad_or_crop_random(wave, 192000, g)
    expected = normalize_fbank(kaldi_fbank(crop, 32000), -4.2677393, 4.5689974)
    torch.testing.assert_close(view, expected)
    assert not torch.equal(sample["views"][0], sample["views"][1])


def test_short_clip_is_padded_and_labels_multi_hot(clips):
    ds = PretrainDataset(clips, label_vocab=["cat", "dog"], **SMALL)
    sample = ds[1]
    assert sample["views"].shape == (2, 1, 96, 32)
    assert torch.equal(sample["label"], torch.tensor([1.0, 1.0]))
    assert torch.equal(ds[2]["label"], torch.zeros(2))
    assert torch.isfinite(sample["views"]).all()
    # 0.5 s of signal then zeros: the padded tail has much lower energy than the start.
    view = sample["views"][0, 0]
    assert view[:40].mean() > view[60:].mean() + 1.0


def test_no_vocab_gives_empty_label(clips):
    sample = PretrainDataset(clips, **SMALL)[0]
    assert sample["label"].shape == (0,)
    assert "local_views" not in sample


def test_same_seed_epoch_index_gives_identical_views_in_any_order(clips):
    a = PretrainDataset(clips, **SMALL, seed=7)
    b = PretrainDataset(clips, **SMALL, seed=7)
    first = [a[i]["views"] for i in range(3)]
    second = [b[i]["views"] for i in reversed(range(3))][::-1]
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    # The two views of one item are different crops.
    assert not torch.equal(first[0][0], first[0][1])


def test_epoch_and_seed_change_the_crops(clips):
    ds = PretrainDataset(clips, **SMALL, seed=7)
    epoch0 = ds[0]["views"]
    ds.set_epoch(1)
    epoch1 = ds[0]["views"]
    ds.set_epoch(0)
    assert torch.equal(ds[0]["views"], epoch0)
    assert not torch.equal(epoch0, epoch1)
    assert not torch.equal(PretrainDataset(clips, **SMALL, seed=8)[0]["views"], epoch0)


def test_views_do_not_depend_on_worker_count(clips):
    ds = PretrainDataset(clips, **SMALL, local_views=2, local_crop_seconds=0.25, local_target_frames=24)
    ds.set_epoch(3)
    serial = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_pretrain)))
    loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate_pretrain)
    parallel = list(loader)
    assert torch.equal(serial["views"], torch.cat([b["views"] for b in parallel]))
    assert torch.equal(serial["local_views"], torch.cat([b["local_views"] for b in parallel]))


def test_corrupt_clip_is_reported_not_raised(clips, tmp_path, caplog):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
    entries = [clips[0], AudioEntry(str(bad), ("dog",)), clips[2]]
    ds = PretrainDataset(
        entries, label_vocab=["dog"], local_views=1, local_target_frames=24, local_crop_seconds=0.25, **SMALL
    )
    with caplog.at_level(logging.WARNING, logger="asit.data.dataset"):
        sample = ds[1]
        ds[1]
    assert sample["ok"] is False and sample["error"] == "unreadable"
    assert sample["views"].shape == (2, 1, 96, 32) and not sample["views"].any()
    assert sample["local_views"].shape == (1, 1, 24, 32)
    warnings = [r for r in caplog.records if "broken.wav" in r.getMessage()]
    assert len(warnings) == 1  # once per file

    batch = collate_pretrain([ds[i] for i in range(3)])
    assert batch["views"].shape == (2, 2, 1, 96, 32)
    assert batch["local_views"].shape == (2, 1, 1, 24, 32)
    assert batch["label"].shape == (2, 1)
    assert batch["index"].tolist() == [0, 2]
    assert batch["num_skipped"] == 1
    assert batch["skip_reasons"] == ["unreadable"]
    assert batch["skipped_indices"] == [1]
    assert torch.equal(batch["views"][1], ds[2]["views"])


def test_collate_of_only_bad_samples_gives_empty_batch(tmp_path):
    bad = tmp_path / "empty.wav"
    bad.write_bytes(b"")
    ds = PretrainDataset([AudioEntry(str(bad))], **SMALL)
    batch = collate_pretrain([ds[0], ds[0]])
    assert batch["views"].shape == (0, 2, 1, 96, 32)
    assert batch["num_skipped"] == 2 and batch["index"].numel() == 0


def test_invalid_arguments(clips):
    with pytest.raises(ValueError, match="entries is empty"):
        PretrainDataset([])
    with pytest.raises(ValueError, match="num_views"):
        PretrainDataset(clips, num_views=0)
    with pytest.raises(ValueError, match="roll_prob"):
        PretrainDataset(clips, roll_prob=1.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_fbank_is_skipped_not_batched(clips, monkeypatch, bad):
    """The last guard after decoding: a NaN/Inf anywhere in a clip's views (here from a patched fbank)
    turns the sample into a counted skip."""
    import asit.data.dataset as dataset_module

    real = dataset_module.batched_kaldi_fbank

    def poisoned(waves, *args, **kwargs):
        out = real(waves, *args, **kwargs)
        out[-1, 7, 3] = bad
        return out

    monkeypatch.setattr(dataset_module, "batched_kaldi_fbank", poisoned)
    sample = PretrainDataset(clips, **SMALL)[0]
    assert not sample["ok"] and sample["error"] == "non-finite"
    assert torch.isfinite(sample["views"]).all()


def test_device_fbank_sends_the_same_crops_and_gives_the_same_views(clips, tmp_path):
    """fbank_on="device": the workers send the waveform crops (same generator draws as the loader
    path), and fbank_views of the collated batch equals the loader's per-clip views."""
    from asit.data.fbank import fbank_views

    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"not audio at all" * 8)
    entries = [clips[0], clips[1], AudioEntry(str(bad)), clips[2]]
    options = dict(SMALL, local_views=2, local_crop_seconds=0.25, local_target_frames=24)
    on_loader = PretrainDataset(entries, **options)
    on_device = PretrainDataset(entries, **options, fbank_on="device")
    for ds in (on_loader, on_device):
        ds.set_epoch(2)
    sample = on_device[1]  # shorter than a crop: zero-padded
    assert set(sample) >= {"waves", "local_waves"} and "views" not in sample and "local_views" not in sample
    assert sample["waves"].shape == (2, SR) and sample["local_waves"].shape == (2, SR // 4)
    skipped = on_device[2]
    assert not skipped["ok"] and skipped["waves"].shape == (2, SR) and not skipped["waves"].any()
    assert skipped["local_waves"].shape == (2, SR // 4)

    loader_batch = collate_pretrain([on_loader[i] for i in range(4)])
    device_batch = collate_pretrain([on_device[i] for i in range(4)])
    assert device_batch["waves"].shape == (3, 2, SR) and device_batch["local_waves"].shape == (3, 2, SR // 4)
    assert device_batch["num_skipped"] == 1 and torch.equal(device_batch["index"], loader_batch["index"])
    mean, std = -4.2677393, 4.5689974
    views = fbank_views(device_batch["waves"], SR, 32, 96, mean, std)
    local = fbank_views(device_batch["local_waves"], SR, 32, 24, mean, std)
    torch.testing.assert_close(views, loader_batch["views"], rtol=0, atol=1e-5)
    torch.testing.assert_close(local, loader_batch["local_views"], rtol=0, atol=1e-5)
    for ds in (on_loader, on_device):
        shapes = ds.sample_shapes()
        sample = ds[0]
        assert set(shapes) == {k for k in sample if k.endswith(("views", "waves"))}
        assert all(tuple(sample[k].shape) == shape for k, shape in shapes.items())
    with pytest.raises(ValueError, match="fbank_on"):
        PretrainDataset(entries, fbank_on="gpu")
    with pytest.raises(ValueError, match=r"\(B, V, L\)"):
        fbank_views(device_batch["waves"][0], SR, 32, 96, mean, std)
