"""WebDataset shards: manifest → shards → samples round trip, rank/worker splitting, corrupt members."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from asit.data import AudioEntry, PretrainDataset, collate_pretrain, load_audio
from asit.data.audio import decode_audio_bytes
from asit.data.shards import (
    ShardPretrainDataset,
    ShardSet,
    is_shard_source,
    open_shard_source,
    parse_shard_size,
    write_shards,
)

pytest.importorskip("webdataset")

SR = 16000
VIEWS = dict(sample_rate=SR, crop_seconds=0.5, num_mel_bins=32, target_frames=48, roll_prob=0.5)


@pytest.fixture
def corpus(tmp_path):
    """11 clips of random length, wav and flac, 16 and 8 kHz, some labelled."""
    rng = np.random.default_rng(0)
    entries = []
    for i in range(11):
        rate = SR if i % 3 else 8000
        ext = "flac" if i % 2 else "wav"
        path = tmp_path / "audio" / f"clip{i}.{ext}"
        path.parent.mkdir(exist_ok=True)
        sf.write(path, (0.3 * rng.standard_normal(int(rate * rng.uniform(0.2, 1.2)))).astype(np.float32), rate)
        labels = (("dog",) if i % 2 else ("cat", "dog")) if i % 4 else ()
        entries.append(AudioEntry(str(path), labels))
    return entries


def _pack(entries, tmp_path, size=3):
    return write_shards(entries, tmp_path / "shards" / "demo-%06d.tar", max_count=size)


def _members(url):
    with tarfile.open(url) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_parse_shard_size():
    assert parse_shard_size("1000") == (1000, None)
    assert parse_shard_size("256MB") == (None, 256_000_000)
    assert parse_shard_size("2GB") == (None, 2_000_000_000)
    for bad in ("", "-3", "1.5", "12TB", "0"):
        with pytest.raises(ValueError):
            parse_shard_size(bad)


def test_round_trip_manifest_to_shards_to_samples(corpus, tmp_path):
    index = _pack(corpus, tmp_path)
    doc = json.loads(index.read_text())
    assert [s["count"] for s in doc["shards"]] == [3, 3, 3, 2] and doc["total"] == 11
    assert doc["labels"] == ["cat", "dog"]

    # Members: audio bytes unchanged with the original extension, json with labels and path.
    shards = open_shard_source(index.parent)
    seen = {}
    for url in shards.urls:
        for name, data in _members(url).items():
            key, ext = name.split(".", 1)
            seen.setdefault(key, {})[ext] = data
    assert len(seen) == 11
    for key, member in seen.items():
        meta = json.loads(member["json"])
        entry = corpus[meta["index"]]
        assert int(key) == meta["index"] and meta["path"] == entry.path and tuple(meta["labels"]) == entry.labels
        ext = entry.path.rsplit(".", 1)[1]
        with open(entry.path, "rb") as fh:
            assert member[ext] == fh.read()
        assert torch.equal(decode_audio_bytes(member[ext], SR), load_audio(entry.path, SR))

    # Samples: same clips, labels and views as the map-style dataset for the same (seed, epoch, index).
    ds = ShardPretrainDataset(shards, seed=3, shuffle_buffer=4, **VIEWS)
    ds.set_epoch(1)
    ref = PretrainDataset(corpus, seed=3, label_vocab=["cat", "dog"], **VIEWS)
    ref.set_epoch(1)
    samples = list(ds)
    assert sorted(s["index"] for s in samples) == list(range(11))
    for s in samples:
        expected = ref[s["index"]]
        assert s["ok"] and torch.equal(s["label"], expected["label"])
        torch.testing.assert_close(s["views"], expected["views"], rtol=0, atol=0)
    batch = collate_pretrain(samples[:4])
    assert batch["views"].shape == (4, 2, 1, 48, 32) and batch["num_skipped"] == 0


def _packed_order(index):
    """Manifest indices in the order they were packed (shard by shard, member by member)."""
    shards = open_shard_source(index.parent)
    return [int(name.split(".", 1)[0]) for url in shards.urls for name in _members(url) if name.endswith(".json")]


def test_clips_are_packed_in_a_seeded_shuffled_order(corpus, tmp_path):
    # a class-sorted manifest must not give one-class shards: the packing order is shuffled by the seed
    order = _packed_order(_pack(corpus, tmp_path / "a"))
    assert sorted(order) == list(range(11)) and order != list(range(11))
    assert _packed_order(_pack(corpus, tmp_path / "b")) == order  # deterministic
    other = write_shards(corpus, tmp_path / "c" / "x-%06d.tar", max_count=3, shuffle_seed=1)
    assert _packed_order(other) != order
    kept = write_shards(corpus, tmp_path / "d" / "x-%06d.tar", max_count=3, shuffle_seed=None)
    assert _packed_order(kept) == list(range(11))


def test_brace_pattern_source_and_counts_without_index(corpus, tmp_path):
    index = _pack(corpus, tmp_path, size=4)
    pattern = f"shards:{index.parent}/demo-{{000000..000002}}.tar"
    assert is_shard_source(pattern) and is_shard_source(index.parent)
    assert not is_shard_source(tmp_path / "audio")
    assert open_shard_source(pattern).counts == [4, 4, 3]
    index.unlink()  # without the index the counts come from the tar headers
    assert open_shard_source(pattern).counts == [4, 4, 3]


def test_shuffle_is_deterministic_and_changes_with_epoch(corpus, tmp_path):
    shards = open_shard_source(_pack(corpus, tmp_path).parent)

    def order(epoch, seed=0):
        ds = ShardPretrainDataset(shards, seed=seed, shuffle_buffer=4, **VIEWS)
        ds.set_epoch(epoch)
        return [s["index"] for s in ds]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(2)) == list(range(11))


@pytest.mark.parametrize("workers,size", [(0, 2), (2, 2), (2, 4)])  # size 4: 3 shards, fewer than workers
def test_two_ranks_cover_every_clip_once_per_epoch(corpus, tmp_path, workers, size):
    shards = open_shard_source(_pack(corpus, tmp_path, size=size).parent)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            ds = ShardPretrainDataset(shards, rank=rank, world_size=2, seed=5, **VIEWS)
            ds.set_epoch(epoch)
            loader = DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=collate_pretrain)
            seen += [int(i) for batch in loader for i in batch["index"]]
        assert sorted(seen) == list(range(11)), f"epoch {epoch}"


def test_fixed_epoch_length_gives_equal_full_batches_and_skip(corpus, tmp_path):
    shards = open_shard_source(_pack(corpus, tmp_path, size=5).parent)  # 3 shards: 5, 5, 1
    for rank in (0, 1):  # rank 1 holds 1 or 5 clips: it cycles to fill its 8 samples
        ds = ShardPretrainDataset(shards, rank=rank, world_size=2, seed=1, samples_per_rank=8, batch_size=2,
                                  **VIEWS)
        loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_pretrain, drop_last=True)
        full = [b["index"].tolist() for b in loader]
        assert len(full) == 4 and all(len(b) == 2 for b in full)
        control = ds.epoch_control()
        control.set_epoch(0, skip=4)  # resume after two batches: the same last two batches
        assert [b["index"].tolist() for b in loader] == full[2:]


@pytest.mark.parametrize(("workers", "skip_batches"), [(2, 1), (3, 1), (3, 2)])
def test_resume_after_a_skip_not_a_multiple_of_the_workers_keeps_the_order(corpus, tmp_path, workers, skip_batches):
    # the DataLoader asks worker 0 first after a skip too: the workers must swap roles so that the batch
    # it gets is the one the uninterrupted epoch had at that point
    shards = open_shard_source(_pack(corpus, tmp_path, size=3).parent)  # 4 shards: 3, 3, 3, 2
    ds = ShardPretrainDataset(shards, rank=0, world_size=1, seed=2, samples_per_rank=11, batch_size=2,
                              shuffle_buffer=3, **VIEWS)
    loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=collate_pretrain, drop_last=True)
    full = [b["index"].tolist() for b in loader]
    assert len(full) == 5
    ds.epoch_control().set_epoch(0, skip=2 * skip_batches)
    assert [b["index"].tolist() for b in loader] == full[skip_batches:]


def test_corrupt_member_is_skipped_and_counted(corpus, tmp_path):
    bad = tmp_path / "audio" / "broken.wav"
    bad.write_bytes(b"RIFF not really a wave file" * 20)
    entries = [*corpus[:4], AudioEntry(str(bad), ("cat",))]
    shards = open_shard_source(_pack(entries, tmp_path).parent)
    ds = ShardPretrainDataset(shards, seed=0, **VIEWS)
    samples = list(ds)
    assert len(samples) == 5
    batch = collate_pretrain(samples)
    assert batch["views"].shape[0] == 4 and batch["num_skipped"] == 1
    assert batch["skip_reasons"] == ["unreadable"] and batch["skipped_indices"] == [4]


def test_bad_members_are_named_by_shard_and_member_not_by_stream(corpus, tmp_path, caplog):
    """The decoder's error used to read ``Error opening <_io.BytesIO object at 0x...>``; an empty member was
    ``unreadable``."""
    url = tmp_path / "raw-000000.tar"
    with tarfile.open(url, "w") as tar:
        for key, audio in (("000000001", b"RIFF not really a wave file" * 20), ("000000002", b"")):
            for name, data in ((f"{key}.wav", audio), (f"{key}.json", json.dumps({"index": int(key)}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    ds = ShardPretrainDataset(open_shard_source(f"shards:{url}"), **VIEWS)
    with caplog.at_level(logging.WARNING):
        samples = list(ds)
    assert {s["index"]: s["error"] for s in samples} == {1: "unreadable", 2: "empty"}
    assert "BytesIO" not in caplog.text
    assert f"{url}:000000001" in caplog.text and "member 000000001.wav" in caplog.text
    assert f"{url}:000000002" in caplog.text and "0-byte member 000000002.wav" in caplog.text


def test_member_without_metadata_is_skipped(corpus, tmp_path):
    url = tmp_path / "raw-000000.tar"
    with tarfile.open(url, "w") as tar:
        for name, data in (("000000001.wav", open(corpus[0].path, "rb").read()), ("000000001.json", b"{oops")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = ShardPretrainDataset(open_shard_source(f"shards:{url}"), **VIEWS)
    (sample,) = list(ds)
    assert not sample["ok"] and sample["error"] == "bad-metadata" and sample["index"] == -1


def _shard_trainer(tmp_path, *extra):
    from asit.config import load_config
    from asit.data import ensure_demo_dataset, load_manifest
    from asit.train import Pretrainer

    torch.set_num_threads(1)
    demo = ensure_demo_dataset(tmp_path / "demo", num_clips=16, sample_rate=SR, seconds=1.0, seed=0)
    index = write_shards(load_manifest(demo), tmp_path / "shards" / "d-%06d.tar", max_count=4)
    cfg = load_config("demo_cpu", [
        f"data.train_manifest=shards:{index.parent}", f"data.sample_rate={SR}", "data.num_workers=0",
        "data.crop_seconds=1.0", "data.target_frames=96", "data.num_mel_bins=32", "model.depth=1",
        "model.embed_dim=32", "model.num_heads=2", "model.head_out_cls=64", "model.head_out_tokens=32",
        "model.head_hidden=64", "model.head_bottleneck=16", "model.recon_hidden=32", "gmml.max_block_frac=0.9",
        "data.local_views=0", "loss.global_pairs=v1",
        "train.batch_size=4", "train.epochs=1", "train.max_steps_per_epoch=2", "train.progress=false",
        f"train.output_dir={tmp_path / 'run'}", *extra])
    return Pretrainer(cfg), index.parent


def test_engine_trains_on_shards(tmp_path):
    trainer, _ = _shard_trainer(tmp_path)
    try:
        trainer.setup()
        assert isinstance(trainer.dataset, ShardPretrainDataset)
        summary = trainer.train()
    finally:
        trainer.cleanup()
    assert summary["steps"] == 2 and np.isfinite(summary["last_loss"])


def test_resume_on_shards_with_another_worker_count_is_warned_about(tmp_path, caplog):
    # with shards the worker count sets the clip order, so it is not a free setting on resume (it is for manifests)
    from asit.train import Pretrainer

    trainer, _ = _shard_trainer(tmp_path)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    for workers, warned in ((0, False), (2, True)):
        caplog.clear()
        resumed = Pretrainer(_shard_trainer(tmp_path, f"data.num_workers={workers}")[0].cfg, resume=True)
        try:
            with caplog.at_level("WARNING", logger="asit.train.engine"):
                resumed.setup()
        finally:
            resumed.cleanup()
        messages = [r.getMessage() for r in caplog.records if "setting(s) changed" in r.getMessage()]
        assert bool(messages) == warned and all("data.num_workers: 0 there, 2 here" in m for m in messages)


def test_engine_counts_an_unreadable_shards_clips_as_skipped(tmp_path):
    trainer, folder = _shard_trainer(tmp_path, "train.max_steps_per_epoch=null", "data.max_bad_fraction=0.5")
    open(folder / "d-000002.tar", "wb").close()  # its 4 clips are lost
    try:
        trainer.setup()
        summary = trainer.train()
    finally:
        trainer.cleanup()
    assert summary["steps"] == 4 and trainer.bad_inputs == {"unreadable-shard": 4}


# ----------------------------------------------------------------- clip-level split, damaged shards

TINY = dict(sample_rate=SR, crop_seconds=0.01, fbank_on="device", roll_prob=0.0)


def _tiny_shards(tmp_path, sizes):
    """Hand-written shards of ``sizes`` clips (uneven on purpose), keys and indices 0..sum-1."""
    buf = io.BytesIO()
    sf.write(buf, np.full(400, 0.1, dtype=np.float32), SR, format="WAV")
    wav = buf.getvalue()
    urls, index = [], 0
    for s, size in enumerate(sizes):
        url = tmp_path / f"u-{s:06d}.tar"
        with tarfile.open(url, "w") as tar:
            for _ in range(size):
                for ext, data in (("wav", wav), ("json", json.dumps({"index": index}).encode())):
                    info = tarfile.TarInfo(f"{index:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                index += 1
        urls.append(str(url))
    return ShardSet(urls, list(sizes), [])


def _rank_indices(shards, rank, world, workers, epoch=0, **kw):
    """Per worker, the indices of one rank's epoch (workers run in-process, as each would in its own)."""
    ds = ShardPretrainDataset(shards, rank=rank, world_size=world, seed=7, shuffle_buffer=4, **TINY, **kw)
    ds.set_epoch(epoch)
    return [[s["index"] for s in ds._iter_worker(w, workers)] for w in range(workers)]


@pytest.mark.parametrize("world,workers,batch", [(1, 1, 1), (1, 2, 4), (1, 3, 2), (2, 2, 3), (2, 3, 4),
                                                 (2, 5, 6), (3, 2, 2), (3, 4, 1), (4, 3, 2)])
def test_every_clip_exactly_once_per_epoch_with_uneven_shards(tmp_path, world, workers, batch):
    shards = _tiny_shards(tmp_path, [7, 3, 9, 1, 4])  # 24 clips
    per_rank = 24 // world
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            parts = _rank_indices(shards, rank, world, workers, epoch, samples_per_rank=per_rank, batch_size=batch)
            assert all(len(p) % batch == 0 for p in parts)  # whole batches per worker
            seen += [i for p in parts for i in p]
        assert sorted(seen) == list(range(24)), (epoch, seen)
        # one pass (samples_per_rank=None) covers every clip once too
        seen = [i for rank in range(world) for p in _rank_indices(shards, rank, world, workers, epoch) for i in p]
        assert sorted(seen) == list(range(24))


def test_clip_split_is_deterministic_and_independent_of_workers(tmp_path):
    shards = _tiny_shards(tmp_path, [5, 2, 8, 3])
    kw = dict(samples_per_rank=8, batch_size=2)
    a = _rank_indices(shards, 1, 2, 3, epoch=4, **kw)
    assert a == _rank_indices(shards, 1, 2, 3, epoch=4, **kw)  # same seed and epoch: same order
    assert a != _rank_indices(shards, 1, 2, 3, epoch=5, **kw)
    same_clips = {i for p in _rank_indices(shards, 1, 2, 1, epoch=4, **kw) for i in p}
    assert {i for p in a for i in p} == same_clips  # which clips a rank gets does not depend on its workers


def test_three_shards_over_two_loader_workers_use_each_clip_once(tmp_path):
    shards = _tiny_shards(tmp_path, [20, 20, 20])  # the split by whole shards gave workers 40 and 20 clips
    ds = ShardPretrainDataset(shards, rank=0, world_size=1, samples_per_rank=60, batch_size=4, seed=0, **TINY)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_pretrain, drop_last=True)
    seen = [i for b in loader for i in b["index"].tolist()]
    assert sorted(seen) == list(range(60))


@pytest.mark.parametrize("where", ["header", "data"])
def test_truncated_shard_is_counted_as_skipped_not_padded(tmp_path, caplog, where):
    shards = _tiny_shards(tmp_path, [10, 10])
    cut = shards.urls[1]
    wav3, json3 = tarfile.open(cut).getmembers()[6:8]
    with open(cut, "r+b") as fh:  # clip 13 cut short: in its json header (the tar seems to end) or its audio
        fh.truncate(json3.offset + 100 if where == "header" else wav3.offset_data + 100)
    ds = ShardPretrainDataset(shards, rank=0, world_size=1, samples_per_rank=20, batch_size=4, seed=0, **TINY)
    with caplog.at_level("WARNING", logger="asit.data.shards"):
        batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_pretrain, drop_last=True))
    good = [i for b in batches for i in b["index"].tolist()]
    reasons = [r for b in batches for r in b["skip_reasons"]]
    assert len(batches) == 5 and sorted(good) == list(range(13))  # clips 10..12 read, no duplicates
    assert reasons == ["truncated-shard"] * 7
    assert any(cut in r.getMessage() and "read 3 of the 10" in r.getMessage() for r in caplog.records)


def test_unreadable_shard_is_counted_and_named_unless_all_are(tmp_path, caplog):
    shards = _tiny_shards(tmp_path, [8, 8])
    open(shards.urls[1], "wb").close()  # a failed copy: zero bytes
    ds = ShardPretrainDataset(shards, rank=0, world_size=1, samples_per_rank=16, batch_size=4, seed=0, **TINY)
    batches = list(DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_pretrain, drop_last=True))
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(8))
    assert [r for b in batches for r in b["skip_reasons"]] == ["unreadable-shard"] * 8
    open(shards.urls[0], "wb").close()
    with pytest.raises(RuntimeError, match="none of its shards can be read") as info:
        list(ds)
    assert shards.urls[0] in str(info.value) and shards.urls[1] in str(info.value)


def test_shard_with_more_clips_than_its_index_warns(tmp_path, caplog):
    real = _tiny_shards(tmp_path, [6])
    stale = ShardSet(real.urls, [4], [])
    ds = ShardPretrainDataset(stale, seed=0, **TINY)
    with caplog.at_level("WARNING", logger="asit.data.shards"):
        assert sorted(s["index"] for s in ds) == [0, 1, 2, 3]
    assert any("more clips than the 4" in r.getMessage() for r in caplog.records)
