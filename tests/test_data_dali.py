"""The DALI input pipeline on the CPU: shapes and normalisation, fbank parity with the torch path,
sharding, and a short engine run with ``data.backend=dali``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from asit.data import AudioEntry, PretrainDataset, ensure_demo_dataset, load_manifest

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'asit[dali]')")
from asit.data.dali import DaliPretrainLoader, build_dali_pipeline, clip_check  # noqa: E402
from asit.data.dali.pipeline import _crop, _window_of_rolled  # noqa: E402

SR = 16000
SMALL = dict(sample_rate=SR, crop_seconds=1.0, num_mel_bins=32, target_frames=96)
# fbank="dali" against the Kaldi fbank, in log-mel units (before normalisation). Measured on the
# demo corpus: mean |diff| ≈ 0.013 at 32 kHz / 128 bins. The residue comes from the per-frame
# DC removal and frame-wise pre-emphasis DALI does not do (largest in the lowest bands).
DALI_FBANK_MEAN_TOL = 0.05


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """The shards' member tables (and anything else cached) go to a folder of this module's own, not
    to ``~/.cache/asit``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASIT_CACHE", str(tmp_path_factory.mktemp("asit-cache")))
        yield


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Clips exactly one crop long at the target rate: the crop is the whole clip, whatever the draw."""
    root = ensure_demo_dataset(tmp_path_factory.mktemp("demo"), num_clips=12, sample_rate=SR, seconds=1.0, seed=0)
    return load_manifest(root)


def test_cpu_pipeline_shapes_and_normalisation(demo):
    loader = DaliPretrainLoader(demo, batch_size=4, num_views=2, local_views=2, local_crop_seconds=0.5,
                                local_target_frames=48, label_vocab=["tone", "chirp"], seed=0, **SMALL)
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3
    b = batches[0]
    assert b["views"].shape == (4, 2, 1, 96, 32) and b["views"].dtype == torch.float32
    assert b["local_views"].shape == (4, 2, 1, 48, 32)
    assert b["label"].shape == (4, 2) and b["index"].dtype == torch.int64
    assert b["num_skipped"] == 0 and b["skip_reasons"] == []
    for i, row in zip(b["index"].tolist(), b["label"]):
        assert row.tolist() == [float(x in demo[i].labels) for x in ("tone", "chirp")]
    # Normalised: AudioSet statistics put real audio at roughly zero mean, |x| of order 1.
    assert abs(b["views"].mean().item()) < 1.0 and 0.05 < b["views"].std().item() < 2.0
    assert sorted(i for x in batches for i in x["index"].tolist()) == list(range(12))


@pytest.mark.parametrize("fbank", ["torch", "dali"])
def test_fbank_parity_with_torch_path(demo, fbank):
    loader = DaliPretrainLoader(demo, batch_size=6, roll_prob=0.0, fbank=fbank, **SMALL)
    ref = PretrainDataset(demo, roll_prob=0.0, **SMALL)
    for batch in loader:
        expected = torch.stack([ref[i]["views"] for i in batch["index"].tolist()])
        diff = (batch["views"] - expected).abs() * (2 * ref.std)  # back to log-mel units
        print(f"fbank={fbank}: mean |diff| {diff.mean():.4f}, p99 {diff.flatten().quantile(0.99):.4f}, "
              f"max {diff.max():.3f} (log-mel)")
        if fbank == "torch":  # same decoded samples, same Kaldi fbank: equal up to float rounding
            torch.testing.assert_close(batch["views"], expected, rtol=0, atol=1e-5)
        else:
            assert diff.mean() < DALI_FBANK_MEAN_TOL


def test_two_shards_cover_the_data(demo):
    seen = []
    for shard in (0, 1):
        loader = DaliPretrainLoader(demo, batch_size=3, shard_id=shard, num_shards=2, seed=4, **SMALL)
        assert len(loader) == 2
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            seen.append((shard, epoch, [i for b in loader for i in b["index"].tolist()]))
    for epoch in (0, 1):
        indices = [i for shard, e, idx in seen if e == epoch for i in idx]
        assert sorted(indices) == list(range(12)), f"epoch {epoch}"
    assert seen[0][2] != seen[1][2]  # reshuffled between epochs


def test_resume_position_replays_the_stream(demo, monkeypatch):
    full = DaliPretrainLoader(demo, batch_size=4, seed=2, **SMALL)
    stream = [b for epoch in (0, 1, 2) for b in (full.set_epoch(epoch) or full)]
    epochs = [sorted(i for b in stream[3 * e : 3 * e + 3] for i in b["index"].tolist()) for e in range(3)]
    assert epochs == [list(range(12))] * 3  # every clip once per epoch
    assert len({tuple(b["index"].tolist()) for b in stream}) > 3  # and a new order each epoch

    resumed = DaliPretrainLoader(demo, batch_size=4, seed=2, **SMALL)
    runs = []  # pipeline batches drawn: placing the stream must not replay the earlier epochs
    real_run = resumed._run
    monkeypatch.setattr(resumed, "_run", lambda: runs.append(1) or real_run())
    resumed.set_epoch(2, skip=4)
    assert len(runs) == 1  # only the skipped batch of epoch 2
    again = list(resumed)
    assert [b["index"].tolist() for b in again] == [b["index"].tolist() for b in stream[7:]]
    for a, b in zip(again, stream[7:]):
        assert torch.equal(a["views"], b["views"])


def test_shards_split_one_permutation_but_not_the_crop_seed(demo, monkeypatch):
    import asit.data.dali.clips as dali_module

    built = []
    real = dali_module.build_dali_pipeline

    def spy(files, labels, **kwargs):
        built.append((list(labels), kwargs["seed"]))
        return real(files, labels, **kwargs)

    monkeypatch.setattr(dali_module, "build_dali_pipeline", spy)
    for shard in (0, 1):
        loader = DaliPretrainLoader(demo, batch_size=2, seed=5, shard_id=shard, num_shards=2, **SMALL)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
    (s0e0, s0e1, s1e0, s1e1) = built
    for a, b in ((s0e0, s1e0), (s0e1, s1e1)):  # each pipeline reads its own rank's share only
        assert not set(a[0]) & set(b[0]) and sorted(a[0] + b[0]) == list(range(12))
    assert s0e0[0] != s0e1[0]  # a new permutation each epoch
    assert len({s0e0[1], s0e1[1], s1e0[1], s1e1[1]}) == 4  # crop seeds: per shard and per epoch


def _junk(tmp_path, count: int) -> list[AudioEntry]:
    paths = []
    for k in range(count):
        path = tmp_path / f"junk{k}.wav"
        path.write_bytes(b"not audio" * 100)
        paths.append(AudioEntry(str(path)))
    return paths


def test_ranks_read_disjoint_clips_and_report_left_out_clips_once(demo, tmp_path):
    """Two ranks over a manifest with unreadable files: the steps come from the kept clips (no rank
    runs out and wraps into another's), no clip is read by both ranks, and every left-out file is
    reported as skipped exactly once per epoch across the ranks, with its reason."""
    entries = [*demo, *_junk(tmp_path, 4)]  # 12 good + 4 unreadable; batches of 3 → 2 steps per rank
    for epoch in (0, 1):
        read, reported = [], []
        for shard in (0, 1):
            loader = DaliPretrainLoader(entries, batch_size=3, shard_id=shard, num_shards=2, seed=3, **SMALL)
            assert len(loader) == 2 and loader.excluded == {"unreadable": 4}
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == 2
            read.append([i for b in batches for i in b["index"].tolist()])
            reported += [(i, r) for b in batches for i, r in zip(b["skipped_indices"], b["skip_reasons"])]
            assert sum(b["num_skipped"] for b in batches) == sum(len(b["skip_reasons"]) for b in batches)
        assert not set(read[0]) & set(read[1]) and sorted(read[0] + read[1]) == list(range(12))
        assert sorted(reported) == [(i, "unreadable") for i in range(12, 16)]


def _loaders_in_threads(entries, ranks: int, **kwargs) -> tuple[list, list]:
    """``DaliPretrainLoader``s of ``ranks`` ranks built at once in threads that exchange through an
    in-process ``all_gather``: the loaders (None where one raised) and the exceptions raised."""
    import threading

    barrier, posted = threading.Barrier(ranks), [None] * ranks
    loaders: list = [None] * ranks
    errors: list = []

    def all_gather_for(rank):
        def all_gather(obj):
            posted[rank] = obj
            barrier.wait(timeout=30)
            out = list(posted)
            barrier.wait(timeout=30)
            return out
        return all_gather

    def build(rank):
        try:
            loaders[rank] = DaliPretrainLoader(entries, shard_id=rank, num_shards=ranks,
                                               all_gather=all_gather_for(rank), **kwargs)
        except Exception as exc:  # noqa: BLE001 (returned to the test)
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank is stuck in the exchange"
    return loaders, errors


def test_ranks_split_the_header_check_and_agree_on_its_verdicts(demo, tmp_path, monkeypatch):
    """With ``all_gather`` each of 3 ranks reads a third of the headers; all end with the verdicts,
    steps and batches of a loader that read them all."""
    from asit.data.dali import clips as dali_module

    entries = [*demo, *_junk(tmp_path, 5)]  # 12 good + 5 unreadable
    checked: dict[int, list[int]] = {}
    check = dali_module._check_files

    def counting(entries, sample_rate, part=(0, 1)):
        good, reasons = check(entries, sample_rate, part)
        checked[part[0]] = sorted([*good, *reasons])
        return good, reasons

    monkeypatch.setattr(dali_module, "_check_files", counting)
    ranks = 3
    loaders, errors = _loaders_in_threads(entries, ranks, batch_size=2, seed=3, **SMALL)
    assert not errors, errors
    assert sorted(checked) == [0, 1, 2] and sorted(i for v in checked.values() for i in v) == list(range(17))
    assert all(len(v) <= 6 for v in checked.values())  # a third each
    shares = {rank: len(v) for rank, v in checked.items()}
    for rank, loader in enumerate(loaders):
        alone = DaliPretrainLoader(entries, batch_size=2, shard_id=rank, num_shards=ranks, seed=3, **SMALL)
        assert loader._left_out == alone._left_out and list(loader._left_out) == list(range(12, 17))
        assert loader.excluded == {"unreadable": 5} and len(loader) == len(alone) == 2
        assert loader.headers_checked == shares[rank] and alone.headers_checked == 17
        for a, b in zip(loader, alone, strict=True):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["views"], b["views"])
            assert a["skipped_indices"] == b["skipped_indices"]


def test_a_header_check_failing_on_one_rank_is_raised_on_every_rank(demo, monkeypatch):
    """An unexpected error in one rank's part of the check reaches every rank after the exchange, so no
    rank waits in it for one that has given up."""
    from asit.data.dali import clips as dali_module

    check = dali_module._check_files

    def failing_on_rank_1(entries, sample_rate, part=(0, 1)):
        if part[0] == 1:
            raise MemoryError("while decoding a file to find its reason")
        return check(entries, sample_rate, part)

    monkeypatch.setattr(dali_module, "_check_files", failing_on_rank_1)
    loaders, errors = _loaders_in_threads(demo, 3, batch_size=2, seed=0, **SMALL)
    assert loaders == [None] * 3 and len(errors) == 3
    assert all("failed on rank 1: MemoryError: while decoding" in str(e) for e in errors)


def test_files_past_load_audios_duration_cap_are_left_out(demo, tmp_path, monkeypatch):
    """A file longer than MAX_SECONDS (load_audio's cap: an hour) is left out as ``too-long`` from its
    header, as the torch backend skips it, instead of being decoded whole by every DALI thread."""
    from asit.data.dali import clips as dali_module

    monkeypatch.setattr(dali_module, "MAX_SECONDS", 1.5)  # the demo clips last 1 s
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(2 * SR, np.float32), SR)
    loader = DaliPretrainLoader([*demo, AudioEntry(str(long), ("tone",))], batch_size=4, seed=0, **SMALL)
    assert loader.excluded == {"too-long": 1} and loader._left_out == {len(demo): "too-long"}


def test_steps_count_only_the_kept_clips(demo, tmp_path):
    entries = [*demo[:6], *_junk(tmp_path, 10)]
    assert len(DaliPretrainLoader(entries, batch_size=3, **SMALL)) == 2
    assert len(DaliPretrainLoader(entries, batch_size=3, max_steps_per_epoch=1, **SMALL)) == 1
    with pytest.raises(ValueError, match="fewer than a batch"):
        DaliPretrainLoader(entries, batch_size=2, shard_id=1, num_shards=4, **SMALL)


def test_undecodable_file_is_left_out(demo, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio" * 100)
    loader = DaliPretrainLoader([*demo[:4], AudioEntry(str(bad))], batch_size=2, **SMALL)
    assert loader.excluded == {"unreadable": 1}
    assert sorted(i for b in loader for i in b["index"].tolist()) == [0, 1, 2, 3]


def test_non_finite_and_out_of_range_clips_are_dropped_and_reported(demo, tmp_path, caplog):
    """NaN/Inf or huge float samples never reach a batch: the rows are dropped and reported with the torch
    backend's reasons (load_audio's rule: NaN/Inf anywhere in the clip, or a peak beyond MAX_ABS_SAMPLE)."""
    rng = np.random.default_rng(0)
    bad = {}
    for name, reason in (("nan", "non-finite"), ("inf", "non-finite"), ("huge", "out-of-range")):
        x = (0.1 * rng.standard_normal(SR)).astype(np.float32)
        if name == "nan":
            x[-1] = np.nan  # past any 0.5 s crop's start: the check covers the whole clip, not the crop
        elif name == "inf":
            x[::1000] = np.inf
        else:
            x *= 1e30
        path = tmp_path / f"{name}.wav"
        sf.write(path, x, SR, subtype="FLOAT")
        bad[str(path)] = reason
    entries = [*demo[:5], *(AudioEntry(p) for p in bad)]
    loader = DaliPretrainLoader(entries, batch_size=8, local_views=1, local_crop_seconds=0.5, local_target_frames=48,
                                label_vocab=["tone", "chirp"], seed=0, **SMALL)
    with caplog.at_level("WARNING", logger="asit.data.dali"):
        (batch,) = list(loader)
    assert sorted(batch["index"].tolist()) == [0, 1, 2, 3, 4]
    assert batch["views"].shape[0] == batch["local_views"].shape[0] == batch["label"].shape[0] == 5
    assert torch.isfinite(batch["views"]).all() and torch.isfinite(batch["local_views"]).all()
    for i, row in zip(batch["index"].tolist(), batch["label"]):
        assert row.tolist() == [float(x in demo[i].labels) for x in ("tone", "chirp")]
    reported = dict(zip(batch["skipped_indices"], batch["skip_reasons"]))
    assert reported == {5 + k: reason for k, reason in enumerate(bad.values())}
    assert batch["num_skipped"] == 3 and all(p in caplog.text for p in bad)


def test_non_finite_views_are_dropped_on_the_cpu(demo, monkeypatch):
    """The last guard: a view row that comes out non-finite anyway is dropped and reported."""
    loader = DaliPretrainLoader(demo[:4], batch_size=4, seed=0, **SMALL)
    real = loader._views

    def poisoned(data, frames):
        views = real(data, frames)
        views[1, 0, 0, 3, 2] = float("nan")
        return views

    monkeypatch.setattr(loader, "_views", poisoned)
    (batch,) = list(loader)
    assert batch["views"].shape[0] == 3 and torch.isfinite(batch["views"]).all()
    assert batch["skip_reasons"] == ["non-finite"] and len(batch["skipped_indices"]) == 1
    assert batch["skipped_indices"][0] not in batch["index"].tolist()


def _corrupt_body_flac(path, seed: int = 0) -> None:
    """A FLAC whose header is intact (soundfile's header check passes) but whose frames are noise bytes."""
    x = (0.3 * np.random.default_rng(seed).standard_normal(SR)).astype(np.float32)
    sf.write(path, x, SR, format="FLAC")
    data = bytearray(path.read_bytes())
    cut = len(data) // 3
    data[cut:] = np.random.default_rng(seed + 1).integers(0, 256, len(data) - cut, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def test_file_failing_mid_run_is_left_out_counted_and_replayed_identically(demo, tmp_path, caplog):
    """A clip whose data DALI cannot decode does not stop the stream; a resumed loader meets it at
    the same point and continues with the same batches."""
    bad = tmp_path / "bad.flac"
    _corrupt_body_flac(bad)
    assert sf.info(str(bad)).frames == SR  # the header is fine: only decoding the data fails
    entries = [*demo[:8], AudioEntry(str(bad))]
    loader = DaliPretrainLoader(entries, batch_size=3, seed=1, **SMALL)
    assert loader.excluded == {}  # passes the up-front check
    with caplog.at_level("WARNING", logger="asit.data.dali"):
        stream = [b for epoch in range(3) for b in (loader.set_epoch(epoch) or loader)]
    assert len(stream) == 9 and all(torch.isfinite(b["views"]).all() for b in stream)
    assert all(8 not in b["index"].tolist() for b in stream)
    # every epoch starts from the whole list, so the file is met, left out and reported once per epoch
    reported = [(b["skipped_indices"], b["skip_reasons"]) for b in stream if b["num_skipped"]]
    assert reported == [([8], ["undecodable"])] * 3
    assert loader.excluded == {"undecodable": 1} and str(bad) in caplog.text

    # a resumed run (a fresh loader placed at epoch 2) meets the failure again and continues identically
    resumed = DaliPretrainLoader(entries, batch_size=3, seed=1, **SMALL)
    resumed.set_epoch(2)
    again = list(resumed)
    assert [b["index"].tolist() for b in again] == [b["index"].tolist() for b in stream[6:]]
    for a, b in zip(again, stream[6:]):
        assert torch.equal(a["views"], b["views"])
    assert resumed.excluded == {"undecodable": 1}
    # rewinding the first loader restarts from the full list and meets the same failure at the same point
    loader.set_epoch(0)
    assert [b["index"].tolist() for b in loader] == [b["index"].tolist() for b in stream[:3]]
    assert loader.excluded == {"undecodable": 1}


def _mp3(path) -> str:
    sf.write(path, (0.1 * np.random.default_rng(0).standard_normal(SR)).astype(np.float32), SR, format="MP3")
    assert sf.info(str(path)).frames > 0  # soundfile reads it: the header check alone would pass it
    return str(path)


def test_formats_dali_cannot_decode_are_left_out_up_front(demo, tmp_path):
    """DALI's decoder has no MP3 (soundfile has): such files are left out before training, counted, and
    reported like any left-out file."""
    song = _mp3(tmp_path / "song.mp3")
    loader = DaliPretrainLoader([*demo[:4], AudioEntry(song)], batch_size=2, **SMALL)
    assert loader.excluded == {"unsupported-by-dali": 1}
    batches = list(loader)
    assert sorted(i for b in batches for i in b["index"].tolist()) == [0, 1, 2, 3]
    assert [(i, r) for b in batches for i, r in zip(b["skipped_indices"], b["skip_reasons"])] == [
        (4, "unsupported-by-dali")]


def test_a_failure_whose_error_names_no_file_is_traced_by_decoding_one_at_a_time(demo, tmp_path, caplog):
    """DALI's "unimplemented format" error names no file: the loader decodes the clips the pipeline was
    reading one at a time, leaves the failing one out, names it, and goes on."""
    song = _mp3(tmp_path / "song.mp3")
    loader = DaliPretrainLoader([*demo[:5], AudioEntry(song)], batch_size=3, check_files=False, seed=0, **SMALL)
    assert loader.excluded == {}
    with caplog.at_level("WARNING", logger="asit.data.dali"):
        batches = list(loader)
    assert len(batches) == 2 and all(torch.isfinite(b["views"]).all() for b in batches)
    assert all(5 not in b["index"].tolist() for b in batches)
    assert [(i, r) for b in batches for i, r in zip(b["skipped_indices"], b["skip_reasons"])] == [(5, "undecodable")]
    assert loader.excluded == {"undecodable": 1}
    assert song in caplog.text and "unimplemented format" in caplog.text


def test_a_failure_no_clip_reproduces_is_raised(demo, monkeypatch):
    loader = DaliPretrainLoader(demo[:4], batch_size=2, **SMALL)
    loader.set_epoch(0)

    def boom():
        raise RuntimeError("Critical error in pipeline:\nencountered:\n\nsomething else broke\n")

    monkeypatch.setattr(loader.pipe, "run", boom)
    with pytest.raises(RuntimeError, match="no clip it was reading fails alone: something else broke"):
        next(iter(loader))


def test_pipeline_resamples_and_pads_short_clips(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, (0.5 * np.sin(np.arange(4410) / 10)).astype(np.float32), 44100)  # 0.1 s at 44.1 kHz
    pipe = build_dali_pipeline([str(path)], [0], batch_size=1, sample_rate=SR, crop_seconds=0.5, num_views=2,
                               roll_prob=0.0, seed=0, device_id=None)
    label, stats, waves = pipe.run()
    waves = np.array(waves.as_tensor())[0]  # [V, 8000]
    assert waves.shape == (2, 8000) and np.array(label.as_tensor()).item() == 0
    low, high, total, samples = np.array(stats.as_tensor())[0]  # of the whole decoded clip
    assert -0.51 <= low < -0.45 and 0.45 < high <= 0.51 and np.isfinite(total) and 1590 <= samples <= 1610
    assert clip_check(low, high, total, samples) is None
    assert np.abs(waves[:, :1500]).max() > 0.1 and np.all(waves[:, 1700:] == 0)  # ≈1600 samples, then zeros


@pytest.mark.parametrize(
    ("stats", "reason"),
    [
        ((-0.5, 0.5, 1.0, 100), None),
        ((float(np.finfo(np.float32).max), -float(np.finfo(np.float32).max), 0.0, 0), "empty"),  # no samples
        ((-0.5, 0.5, float("nan"), 100), "non-finite"),  # a NaN sample: min and max skip it, the sum does not
        ((float(np.finfo(np.float32).max), -float(np.finfo(np.float32).max), float("nan"), 100), "non-finite"),
        ((-float("inf"), 0.5, -float("inf"), 100), "non-finite"),
        ((-0.5, float("inf"), float("nan"), 100), "non-finite"),
        ((-2e6, 0.5, -2e6, 100), "out-of-range"),
        ((-3e6, 2e6, float("nan"), 100), "non-finite"),  # NaN too: the sum cannot overflow at 3e6 × 100
        ((-3e36, 3e36, float("nan"), 1e3), "out-of-range"),  # the partial sums may have overflowed both ways
    ],
)
def test_clip_check_follows_load_audio(stats, reason):
    why = clip_check(*stats)
    assert (why and why[0]) == reason


@pytest.mark.parametrize("length", [1, 5, 12, 40])
def test_rolled_crops_are_rotations_of_a_zero_padded_window(length):
    """Every crop is ``torch.roll`` of the clip's window ``[start, start + L)`` (zeros past the end),
    over clips longer and shorter than the crop, with and without a roll."""
    import nvidia.dali as dali
    from nvidia.dali import fn, pipeline_def, types

    crop = 12
    clips = [np.arange(1, length + 1, dtype=np.float32) + 1000 * k for k in range(16)]

    @pipeline_def(batch_size=len(clips), num_threads=1, device_id=None, seed=11)
    def pipe():
        x = fn.external_source(source=lambda: clips, batch=True, dtype=types.FLOAT)
        return tuple(_crop(fn, types, dali, x, crop, 0.5) for _ in range(4))

    p = pipe()
    p.build()
    shifts = set()
    for out in p.run():
        for clip, row in zip(clips, (np.array(t) for t in out), strict=True):
            matches = []
            for shift in range(crop):
                window = np.roll(row, -shift)
                start = int(window[0] - clip[0])
                expected = np.zeros(crop, np.float32)
                part = clip[start : start + crop]
                expected[: len(part)] = part
                if 0 <= start <= max(length - crop, 0) and np.array_equal(window, expected):
                    matches.append(shift)
            assert matches, f"{row} is no rotation of a window of {clip}"
            shifts.update(matches)
    assert 0 in shifts and len(shifts) > 2  # unrolled crops and several rolls were drawn


@pytest.mark.parametrize("length", [1, 5, 12, 40])
def test_views_of_one_rolled_clip(length):
    """roll_mode=clip: every view of a clip, local ones too, is a window of the same rolled clip followed
    by zeros; the local windows may start anywhere in the clip padded to the global crop (span 20)."""
    import nvidia.dali as dali
    from nvidia.dali import fn, pipeline_def, types
    from test_data_views import _rolled_window_shift

    crop, local, span = 12, 4, 20
    clips = [np.arange(1, length + 1, dtype=np.float32) + 1000 * k for k in range(16)]

    @pipeline_def(batch_size=len(clips), num_threads=1, device_id=None, seed=5)
    def pipe():
        x = fn.external_source(source=lambda: clips, batch=True, dtype=types.FLOAT)
        shift = fn.cast(dali.math.floor(fn.random.uniform(range=[0.0, 1.0]) * fn.cast(x.shape()[0], dtype=types.FLOAT)),
                        dtype=types.INT32) * fn.cast(fn.random.coin_flip(probability=0.5), dtype=types.INT32)
        return (*(_window_of_rolled(fn, types, dali, x, crop, shift, None) for _ in range(2)),
                *(_window_of_rolled(fn, types, dali, x, local, shift, span) for _ in range(3)))

    p = pipe()
    p.build()
    rolled = past_end = 0
    for _ in range(3):
        outs = [[np.array(t) for t in out] for out in p.run()]
        for k, clip in enumerate(clips):
            rows = [out[k] for out in outs]
            assert all(len(r) == crop for r in rows[:2]) and all(len(r) == local for r in rows[2:])
            common = set.intersection(*(_rolled_window_shift(clip, r) for r in rows))
            assert common, f"views {rows} of {clip} are not windows of one rolled clip"
            rolled += 0 not in common
            past_end += sum(not r.any() for r in rows[2:])
    assert rolled > 0 or length == 1  # (a one-sample clip rolls onto itself)
    if length < span - local:
        assert past_end > 0  # local windows wholly inside the padding occur


def test_pipeline_shards_stay_in_their_part(demo):
    """build_dali_pipeline's own sharding: a reader that runs past its shard's end stays in it (DALI's
    default would move on into the next rank's clips)."""
    files, labels = [e.path for e in demo[:5]], list(range(5))
    seen = []
    for shard in (0, 1):
        pipe = build_dali_pipeline(files, labels, batch_size=2, shard_id=shard, num_shards=2, shuffle=False,
                                   roll_prob=0.0, seed=0, **SMALL)
        seen.append({int(x) for _ in range(4) for x in np.array(pipe.run()[0].as_tensor()).ravel()})
    assert seen == [{0, 1}, {2, 3, 4}]


def test_engine_runs_with_dali_backend(tmp_path, monkeypatch):
    from asit.config import load_config
    from asit.train import Pretrainer

    monkeypatch.setenv("ASIT_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    cfg = load_config("demo_cpu", [
        "data.backend=dali", f"data.sample_rate={SR}", "data.demo_clips=16", "data.demo_seconds=1.5",
        "data.num_workers=1", "data.crop_seconds=1.0", "data.target_frames=96", "data.num_mel_bins=32",
        "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.head_out_cls=64",
        "model.head_out_tokens=32", "model.head_hidden=64", "model.head_bottleneck=16", "model.recon_hidden=32",
        "gmml.max_block_frac=0.9", "data.local_views=0", "loss.global_pairs=v1",
        "train.batch_size=4", "train.epochs=1", "train.max_steps_per_epoch=2",
        "train.progress=false", f"train.output_dir={tmp_path / 'run'}"])
    trainer = Pretrainer(cfg)
    try:
        trainer.setup()
        assert isinstance(trainer.loader, DaliPretrainLoader)
        summary = trainer.train()
    finally:
        trainer.cleanup()
    assert summary["steps"] == 2 and np.isfinite(summary["last_loss"])


def _engine_config(tmp_path, manifest, *extra):
    from asit.config import load_config

    return load_config("demo_cpu", [
        "data.backend=dali", f"data.sample_rate={SR}", f"data.train_manifest={manifest}",
        "data.num_workers=1", "data.crop_seconds=1.0", "data.target_frames=96", "data.num_mel_bins=32",
        "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.head_out_cls=64",
        "model.head_out_tokens=32", "model.head_hidden=64", "model.head_bottleneck=16", "model.recon_hidden=32",
        "gmml.max_block_frac=0.9", "data.local_views=0", "loss.global_pairs=v1",
        "train.batch_size=4", "train.epochs=1", "train.progress=false", f"train.output_dir={tmp_path / 'run'}",
        *extra])


@pytest.mark.parametrize("limit", [0.5, 0.05])
def test_engine_counts_left_out_files_and_stops_past_max_bad_fraction(demo, tmp_path, limit):
    """The engine takes its steps per epoch from the DALI loader's kept clips and counts the files left out
    up front in its per-epoch summary; past data.max_bad_fraction the run stops."""
    import csv

    from asit.train import Pretrainer
    from asit.train.bad_data import BadDataError

    manifest = tmp_path / "train.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([[e.path] for e in [*demo, *_junk(tmp_path, 2)]])
    torch.set_num_threads(1)
    trainer = Pretrainer(_engine_config(tmp_path, manifest, f"data.max_bad_fraction={limit}"))
    try:
        trainer.setup()
        assert trainer.iters_per_epoch == 3  # 12 readable clips // 4, not 14 // 4
        if limit == 0.05:  # 2 of 14 clips
            with pytest.raises(BadDataError, match="unreadable"):
                trainer.train()
            return
        summary = trainer.train()
    finally:
        trainer.cleanup()
    assert summary["steps"] == 3 and trainer.bad_inputs == {"unreadable": 2}


# ------------------------------------------------------------------ WebDataset shards (make_shards.py)


@pytest.fixture(scope="module")
def demo_shards(demo, tmp_path_factory):
    from asit.data.shards import open_shard_source, write_shards

    folder = tmp_path_factory.mktemp("shards")
    write_shards(demo, folder / "demo-%06d.tar", max_count=5)  # 3 tars: 5, 5, 2 clips
    return open_shard_source(folder)


def test_shards_give_the_manifest_views_and_split_across_ranks(demo, demo_shards):
    """fn.readers.webdataset over make_shards.py's tars: over two ranks every clip once per epoch, no clip
    on both, its manifest index and labels from the json member, and the views of the manifest path."""
    ref = PretrainDataset(demo, roll_prob=0.0, **SMALL)
    vocab = demo_shards.label_vocab
    for epoch in (0, 1):
        read = []
        for shard in (0, 1):
            loader = DaliPretrainLoader(demo_shards, batch_size=3, shard_id=shard, num_shards=2, roll_prob=0.0,
                                        seed=1, **SMALL)
            assert len(loader) == 2 and loader.excluded == {}
            loader.set_epoch(epoch)
            for batch in loader:
                assert batch["num_skipped"] == 0
                index = batch["index"].tolist()
                read.append(index)
                for i, row in zip(index, batch["label"]):
                    assert row.tolist() == [float(x in demo[i].labels) for x in vocab]
                expected = torch.stack([ref[i]["views"] for i in index])
                torch.testing.assert_close(batch["views"], expected, rtol=0, atol=1e-5)
            loader.close()
        ranks = [sum(read[:2], []), sum(read[2:], [])]
        assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == list(range(12))


def test_shard_stream_resumes_mid_epoch_identically(demo_shards):
    full = DaliPretrainLoader(demo_shards, batch_size=3, seed=2, **SMALL)
    stream = [b for epoch in (0, 1) for b in (full.set_epoch(epoch) or full)]
    assert [sorted(i for b in stream[4 * e : 4 * e + 4] for i in b["index"].tolist()) for e in (0, 1)] == [
        list(range(12))] * 2
    resumed = DaliPretrainLoader(demo_shards, batch_size=3, seed=2, **SMALL)
    resumed.set_epoch(1, skip=6)
    again = list(resumed)
    assert [b["index"].tolist() for b in again] == [b["index"].tolist() for b in stream[6:]]
    for a, b in zip(again, stream[6:]):
        assert torch.equal(a["views"], b["views"])
    full.close()
    resumed.close()


def _tar(path, members: dict[str, bytes]) -> str:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_shard_audio_headers_get_the_manifest_checks_also_from_the_cache(demo, tmp_path, monkeypatch):
    """Members whose audio header cannot be read, says no samples, a rate load_audio refuses, more than
    MAX_SECONDS, or MP3 (named .wav) are left out up front with the manifest check's reasons; a second
    loader reads the same verdicts from the member-table cache."""
    import io
    import json as jsonlib

    from asit.data.dali import clips as dali_module
    from asit.data.shards import ShardSet

    monkeypatch.setattr(dali_module, "MAX_SECONDS", 1.5)  # the demo clips last 1 s

    def wav(samples: int) -> bytes:
        buf = io.BytesIO()
        sf.write(buf, np.zeros(samples, np.float32), SR, format="WAV", subtype="PCM_16")
        return buf.getvalue()

    members = {}
    for k, entry in enumerate(demo[:6]):
        members[f"{k}.wav"] = open(entry.path, "rb").read()
        members[f"{k}.json"] = jsonlib.dumps({"index": k, "labels": []}).encode()
    low = io.BytesIO()
    sf.write(low, np.zeros(100, np.float32), 500, format="WAV", subtype="PCM_16")  # under MIN_FILE_RATE
    members.update({"7.json": b'{"index": 7}', "7.wav": wav(0),  # a header, no samples
                    "8.json": b'{"index": 8}', "8.wav": wav(2 * SR),  # 2 s
                    "9.json": b'{"index": 9}', "9.wav": b"not audio at all",
                    "10.json": b'{"index": 10}', "10.wav": open(_mp3(tmp_path / "song.mp3"), "rb").read(),
                    "11.json": b'{"index": 11}', "11.wav": low.getvalue()})
    shards = ShardSet([_tar(tmp_path / "t.tar", members)], [11], ["tone", "chirp"])
    scans = []
    scan = dali_module._ShardClips._scan
    monkeypatch.setattr(dali_module._ShardClips, "_scan", lambda self, t, url: scans.append(url) or scan(self, t, url))
    for _ in range(2):
        loader = DaliPretrainLoader(shards, batch_size=2, seed=0, **SMALL)
        assert loader.excluded == {"empty": 1, "too-long": 1, "unreadable": 1, "unsupported-by-dali": 1,
                                   "bad-sample-rate": 1} and len(loader) == 3
        assert {i for b in loader for i in b["index"].tolist()} == set(range(6))
        loader.close()
    assert len(scans) == 1  # the second time from the cache


def test_an_io_error_reading_an_audio_header_is_not_cached_as_a_bad_clip(demo, tmp_path, monkeypatch):
    """soundfile turns read errors into "cannot decode"; one that may pass must not be cached as an
    unreadable clip: the next run reads the header again."""
    import tarfile

    from asit.data.shards import open_shard_source, write_shards

    write_shards(demo, tmp_path / "s-%06d.tar", max_count=6)  # 2 tars of 6 clips
    extract = tarfile.TarFile.extractfile

    class Failing:
        def read(self, size=-1):
            raise OSError(5, "Input/output error")

        def seek(self, offset, whence=0):
            return 0

        def tell(self):
            return 0

    def flaky(self, member):
        return Failing() if member.name.startswith("000000008.") else extract(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", flaky)
    loader = DaliPretrainLoader(open_shard_source(tmp_path), batch_size=2, seed=0, **SMALL)
    lost = sum(loader.excluded.values())
    assert 1 <= lost <= 4 and set(loader.excluded) <= {"unreadable", "truncated-shard"}  # clips 8.. of tar 2
    loader.close()
    monkeypatch.setattr(tarfile.TarFile, "extractfile", extract)
    loader = DaliPretrainLoader(open_shard_source(tmp_path), batch_size=2, seed=0, **SMALL)
    assert loader.excluded == {} and len(loader) == 6
    loader.close()


def test_bad_shard_members_are_skipped_and_counted(demo, tmp_path, caplog):
    """Members DALI cannot use never stop the run: an MP3 and incomplete samples are left out up front,
    undecodable audio is traced by DALI's error and left out mid-run, a malformed json drops its row;
    each is reported once in the epoch with its reason and manifest index (-1 where none is known)."""
    import json as jsonlib

    from asit.data.shards import ShardSet, write_shards

    _corrupt_body_flac(tmp_path / "bad.flac")
    entries = [*demo[:9], AudioEntry(str(tmp_path / "bad.flac")), AudioEntry(_mp3(tmp_path / "song.mp3")),
               *_junk(tmp_path, 1)]  # 9: flac with garbage frames, 10: mp3, 11: junk
    write_shards(entries, tmp_path / "s-%06d.tar", max_count=5)
    wav = open(demo[0].path, "rb").read()
    extra = _tar(tmp_path / "extra.tar", {
        "a.wav": wav,  # no json: bad-metadata
        "b.json": jsonlib.dumps({"index": 20, "labels": []}).encode(),  # no audio: missing
        "c.json": b"{not json", "c.wav": wav,  # malformed json: dropped from its batch
        "d.json": jsonlib.dumps({"index": 21, "labels": []}).encode(), "d.wav": wav,  # fine
    })
    shards = ShardSet([*(str(tmp_path / f"s-00000{k}.tar") for k in range(3)), extra], [5, 5, 2, 4],
                      ["tone", "chirp"])
    loader = DaliPretrainLoader(shards, batch_size=3, seed=0, **SMALL)
    # the audio headers are read with the tar headers: the junk is left out up front, as from a manifest
    assert loader.excluded == {"unsupported-by-dali": 1, "bad-metadata": 1, "missing": 1, "unreadable": 1}
    assert len(loader) == 4  # 12 clips kept: 10 good, the flac, the malformed json (found when read)
    with caplog.at_level("WARNING", logger="asit.data.dali"):
        batches = list(loader)
    assert all(torch.isfinite(b["views"]).all() for b in batches)
    assert {i for b in batches for i in b["index"].tolist()} == {*range(9), 21}
    reported = sorted((r, i) for b in batches for i, r in zip(b["skipped_indices"], b["skip_reasons"]))
    assert reported == [("bad-metadata", -1), ("bad-metadata", -1), ("missing", 20), ("undecodable", 9),
                        ("unreadable", 11), ("unsupported-by-dali", 10)]
    assert sum(b["num_skipped"] for b in batches) == 6
    assert "000000009.flac" in caplog.text and "named in DALI's error" in caplog.text  # the flac's error names it
    loader.close()

    # without the header check the MP3 and the junk reach DALI: their errors ("Format not recognised")
    # name no member, and the loader traces them by decoding the clips one at a time
    caplog.clear()
    loader = DaliPretrainLoader(shards, batch_size=3, seed=0, check_files=False, **SMALL)
    with caplog.at_level("WARNING", logger="asit.data.dali"):
        batches = list(loader)
    assert all(torch.isfinite(b["views"]).all() for b in batches)
    reported = [(r, i) for b in batches for i, r in zip(b["skipped_indices"], b["skip_reasons"])]
    assert ("undecodable", 11) in reported and ("undecodable", 10) in reported
    assert "s-000002.tar:000000011" in caplog.text and "found by decoding the clips one at a time" in caplog.text
    loader.close()


def test_a_damaged_tar_counts_its_missing_clips(demo, tmp_path):
    from asit.data.shards import open_shard_source, write_shards

    write_shards(demo, tmp_path / "s-%06d.tar", max_count=6)
    cut = tmp_path / "s-000001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 3])  # an interrupted copy
    for check_files in (True, False):  # the tar members are checked either way (no crash building the index)
        loader = DaliPretrainLoader(open_shard_source(tmp_path), batch_size=2, seed=0, check_files=check_files,
                                    **SMALL)
        lost = loader.excluded["truncated-shard"]  # the torch shard reader's reason for the same clips
        assert 3 <= lost < 6 and sum(loader.excluded.values()) == lost
        batches = list(loader)
        assert len({i for b in batches for i in b["index"].tolist()}) == 2 * len(loader) and len(loader) >= 3
        assert sum(b["skip_reasons"].count("truncated-shard") for b in batches) == lost
        loader.close()


def test_member_tables_are_cached_per_version_of_each_tar(demo, tmp_path, monkeypatch, caplog):
    """The tars' headers are read once: a second loader takes the member tables from the cache (and says
    again what stopped a damaged tar), a changed tar is scanned anew, and an unwritable cache only costs
    the scan."""
    from asit.data.dali import clips as dali_module
    from asit.data.shards import open_shard_source, write_shards

    monkeypatch.setenv("ASIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "shards"
    write_shards(demo, folder / "s-%06d.tar", max_count=5)  # 3 tars
    scanned = []
    scan = dali_module._ShardClips._scan
    monkeypatch.setattr(dali_module._ShardClips, "_scan",
                        lambda self, t, url: scanned.append(os.path.basename(url)) or scan(self, t, url))

    def load():
        loader = DaliPretrainLoader(open_shard_source(folder), batch_size=2, seed=0, **SMALL)
        members = [(m.key, m.audio, m.json, m.tar) for m in loader._clips.members]
        first = next(iter(loader))
        loader.close()
        return members, first, dict(loader.excluded)

    members, first, _ = load()
    assert sorted(scanned) == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    assert len(list((tmp_path / "cache" / "dali-members").glob("*.json"))) == 3
    scanned.clear()
    again, first_again, _ = load()
    assert scanned == [] and again == members
    assert torch.equal(first_again["views"], first["views"]) and torch.equal(first_again["index"], first["index"])

    cut = folder / "s-000001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 3])  # changed: its size and mtime
    _, _, excluded = load()
    assert scanned == ["s-000001.tar"] and excluded["truncated-shard"] >= 3
    scanned.clear()
    caplog.clear()
    with caplog.at_level("WARNING", logger="asit.data.dali"):
        _, _, excluded_again = load()
    assert scanned == [] and excluded_again == excluded and "s-000001.tar: cannot read past" in caplog.text

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("ASIT_CACHE", str(tmp_path / "a-file"))  # no folder can be made there
    assert load()[0][:5] == members[:5] and len(scanned) == 3


def test_a_tar_unreadable_for_a_moment_is_not_remembered_as_damaged(demo, tmp_path, monkeypatch):
    """An I/O error while reading a tar's headers leaves its clips out of this run only: the member-table
    cache keeps clean scans and damaged tars, not read errors that may pass."""
    import tarfile

    from asit.data.shards import open_shard_source, write_shards

    write_shards(demo, tmp_path / "s-%06d.tar", max_count=6)  # 2 tars of 6 clips
    real_open = tarfile.open

    def flaky(name, *args, **kwargs):
        if str(name).endswith("s-000001.tar"):
            raise OSError(5, "Input/output error")
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(tarfile, "open", flaky)
    loader = DaliPretrainLoader(open_shard_source(tmp_path), batch_size=2, seed=0, **SMALL)
    assert loader.excluded == {"unreadable-shard": 6}
    loader.close()
    monkeypatch.setattr(tarfile, "open", real_open)
    loader = DaliPretrainLoader(open_shard_source(tmp_path), batch_size=2, seed=0, **SMALL)
    assert loader.excluded == {} and len(loader) == 6
    loader.close()


def test_a_stale_index_is_read_as_it_lists_like_the_torch_reader(demo, tmp_path, caplog):
    # the tars hold more clips than index.json says: only the listed ones are read, with a warning
    from asit.data.shards import INDEX_NAME, open_shard_source, write_shards

    index = write_shards(demo, tmp_path / "s-%06d.tar", max_count=6)
    doc = json.loads(index.read_text())
    for shard in doc["shards"]:
        shard["count"] = min(shard["count"], 4)
    doc["total"] = sum(shard["count"] for shard in doc["shards"])
    (tmp_path / INDEX_NAME).write_text(json.dumps(doc))
    with caplog.at_level("WARNING"):
        loader = DaliPretrainLoader(open_shard_source(tmp_path), batch_size=2, seed=0, **SMALL)
    assert len(loader._clips) == doc["total"] and "more than the 4 its index lists" in caplog.text
    assert len({i for b in loader for i in b["index"].tolist()}) == 2 * len(loader)
    loader.close()


def test_engine_trains_from_shards_with_dali(demo_shards, tmp_path):
    from asit.train import Pretrainer

    folder = os.path.dirname(demo_shards.urls[0])
    torch.set_num_threads(1)
    trainer = Pretrainer(_engine_config(tmp_path, f"shards:{folder}", "train.max_steps_per_epoch=2"))
    try:
        trainer.setup()
        assert isinstance(trainer.loader, DaliPretrainLoader) and trainer.iters_per_epoch == 2
        summary = trainer.train()
    finally:
        trainer.cleanup()
    assert summary["steps"] == 2 and np.isfinite(summary["last_loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (DALI's GPU stages)")
@pytest.mark.parametrize("fbank", ["torch", "dali"])
def test_gpu_pipeline_matches_the_cpu_pipeline(demo, fbank):
    """With ``device_id`` the crops move to the GPU and the fbank runs there (ours or DALI's operators):
    the same draws, so the same views as on the CPU up to the FFT's rounding (the cross-device tolerance
    of the fbank tests)."""
    kwargs = dict(batch_size=4, num_views=2, seed=3, fbank=fbank, **SMALL)
    cpu = next(iter(DaliPretrainLoader(demo, device_id=None, **kwargs)))
    gpu = next(iter(DaliPretrainLoader(demo, device_id=0, **kwargs)))
    assert gpu["views"].is_cuda and gpu["views"].shape == cpu["views"].shape
    assert torch.equal(gpu["index"].cpu(), cpu["index"])
    # 3e-3 in log-mel units, and the normalisation divides by 2 std (≈ 9.1)
    assert (gpu["views"].cpu() - cpu["views"]).abs().max().item() <= 3e-3
