"""asit.eval.linear_probe and scripts/extract.py, scripts/linear_probe.py."""

from __future__ import annotations

import json
import os
import runpy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_encoder import SR, write_encoder  # tests/ is on sys.path under pytest

from asit.eval.extract import extract_embeddings, load_embeddings, save_embeddings
from asit.eval.linear_probe import (
    ProbeConfig,
    average_precision,
    cross_validate,
    fit_linear,
    mean_average_precision,
    probe_encoder,
    stratified_folds,
)

ROOT = Path(__file__).resolve().parents[1]


def brute_force_ap(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over positives of precision among all samples scoring at least as high."""
    pos = np.flatnonzero(targets)
    return float(np.mean([(targets[scores >= scores[i]]).mean() for i in pos]))


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_average_precision_matches_brute_force(n):
    rng = np.random.default_rng(n)
    for _ in range(20):
        targets = rng.random(n) < 0.4
        if not targets.any():
            targets[rng.integers(n)] = True
        scores = rng.integers(0, 4, n).astype(float)  # many ties
        if rng.random() < 0.5:
            scores = rng.standard_normal(n)
        assert average_precision(scores, targets) == pytest.approx(brute_force_ap(scores, targets))


def test_average_precision_edge_cases():
    assert average_precision([0.9, 0.1, 0.5], [1, 0, 1]) == pytest.approx(1.0)
    assert average_precision([0.1, 0.9], [1, 0]) == pytest.approx(0.5)
    assert average_precision([0.3, 0.3], [1, 0]) == pytest.approx(0.5)  # tie: both count
    assert np.isnan(average_precision([0.1, 0.2], [0, 0]))
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.7, 0.0]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
    # class 2 has no positive and is left out; class 0: AP (1 + 2/3) / 2, class 1: 1
    assert mean_average_precision(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_stratified_folds_balanced_and_deterministic():
    labels = [("a",)] * 23 + [("b",)] * 11 + [("c",)] * 6
    folds = stratified_folds(labels, 5, seed=3)
    assert np.array_equal(folds, stratified_folds(labels, 5, seed=3))
    assert not np.array_equal(folds, stratified_folds(labels, 5, seed=4))
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for cls in Counter(x[0] for x in labels):
        per_fold = np.bincount(folds[[i for i, x in enumerate(labels) if x[0] == cls]], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, cls
    with pytest.raises(ValueError, match="folds"):
        stratified_folds(labels[:3], 5, seed=0)


def test_fit_linear_separates_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g, dtype=torch.float64)
    y = x[:, :3].argmax(1)  # linearly separable
    a = fit_linear(x, y, multilabel=False, weight_decay=1e-4, max_iter=100)
    b = fit_linear(x, y, multilabel=False, weight_decay=1e-4, max_iter=100)
    assert torch.equal(a.weight, b.weight)
    assert (a(x).argmax(1) == y).float().mean() > 0.9
    strong = fit_linear(x, y, multilabel=False, weight_decay=10.0, max_iter=100)
    assert strong.weight.norm() < a.weight.norm()


def test_fit_linear_keeps_a_column_for_every_class():
    x = torch.randn(20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(20) % 2  # classes 0 and 1 of 4
    assert fit_linear(x, y, multilabel=False, weight_decay=1e-3, max_iter=10, num_classes=4).out_features == 4
    with pytest.raises(ValueError, match="out of range"):
        fit_linear(x, y + 3, multilabel=False, weight_decay=1e-3, max_iter=10, num_classes=4)


def test_cross_validate_sizes_every_fold_from_the_whole_label_set(monkeypatch):
    """The last class has a single clip: the training part of the fold that tests it lacks the class."""
    import asit.train.probes as probes  # where cross_validate looks fit_linear up

    widths = []

    def recording(*args, **kwargs):
        layer = fit_linear(*args, **kwargs)
        widths.append(layer.out_features)
        return layer

    monkeypatch.setattr(probes, "fit_linear", recording)
    rng = np.random.default_rng(0)
    labels = [("a",)] * 10 + [("b",)] * 10 + [("z",)]
    cross_validate(rng.standard_normal((21, 4)), labels, ProbeConfig(folds=3, max_iter=10))
    assert widths == [3, 3, 3]


def test_cross_validate_single_and_multi_label():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 8)) * 3
    y = np.arange(60) % 3
    x = centres[y] + rng.standard_normal((60, 8))
    labels = [(f"c{i}",) for i in y]
    res = cross_validate(x, labels, ProbeConfig(folds=4))
    assert res["metric"] == "accuracy" and res["task"] == "single-label"
    assert len(res["folds"]) == 4 and sum(f["n_test"] for f in res["folds"]) == 60
    assert res["mean"] > 0.9
    assert res["std"] == pytest.approx(np.std([f["accuracy"] for f in res["folds"]]))
    noise = cross_validate(rng.standard_normal((60, 8)), labels, ProbeConfig(folds=4))
    assert noise["mean"] < 0.7

    multi = [tuple(f"c{k}" for k in range(3) if (i >> k) & 1) or ("c0",) for i in range(60)]
    xm = np.stack([[float((i >> k) & 1) for k in range(3)] for i in range(60)]) + 0.3 * rng.standard_normal(
        (60, 3)
    )
    res = cross_validate(xm, multi, ProbeConfig(folds=3))
    assert res["metric"] == "mAP" and res["task"] == "multi-label" and res["mean"] > 0.9


def _mini_corpus(root: Path, n: int = 12) -> Path:
    rows = ["path,label"]
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = ("tone", "noise")[i % 2]
        t = np.arange(int(0.3 * SR)) / SR
        wave = np.sin(2 * np.pi * (300 + 50 * i) * t) if cls == "tone" else rng.standard_normal(t.size) * 0.3
        sf.write(root / f"{i}.wav", (0.5 * wave).astype(np.float32), SR)
        rows.append(f"{i}.wav,{cls}")
    (root / "broken.wav").write_bytes(b"not audio at all")
    rows.append("broken.wav,tone")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    return root / "m.csv"


def test_extract_skips_broken_and_roundtrips(tmp_path):
    from asit.data import load_manifest
    from asit.encoder import load_encoder

    enc = load_encoder(write_encoder(tmp_path / "e.safetensors"))
    entries = load_manifest(_mini_corpus(tmp_path))
    emb = extract_embeddings(enc, entries, batch_size=5, with_frames=True, progress=False)
    assert emb.clip.shape == (12, 48) and len(emb.paths) == 12
    assert emb.skipped_counts() == {"unreadable": 1}
    assert (
        emb.frames.shape[:2] == (12, emb.timestamps_s.size) and emb.num_frames.max() == emb.timestamps_s.size
    )
    back = load_embeddings(save_embeddings(emb, tmp_path / "o.npz"))
    np.testing.assert_array_equal(back.clip, emb.clip)
    assert back.labels == emb.labels and back.paths == emb.paths and back.skipped == emb.skipped
    np.testing.assert_array_equal(back.frames, emb.frames)


def test_probe_encoder_caches_embeddings(tmp_path, monkeypatch):
    enc_path = write_encoder(tmp_path / "e.safetensors")
    manifest = _mini_corpus(tmp_path)
    cfg = ProbeConfig(folds=3)
    first = probe_encoder(enc_path, manifest, cache_dir=tmp_path / "cache", cfg=cfg, progress=False)
    assert first["num_clips"] == 12 and first["skipped"] == {"unreadable": 1}
    rand = probe_encoder(
        enc_path, manifest, cache_dir=tmp_path / "cache", cfg=cfg, random_init=True, progress=False
    )
    assert rand["embeddings"] != first["embeddings"]

    import asit.eval.linear_probe as lp

    def no_extraction(*args, **kwargs):
        raise AssertionError("embeddings should come from the cache")

    monkeypatch.setattr(lp, "extract_embeddings", no_extraction)
    again = probe_encoder(enc_path, manifest, cache_dir=tmp_path / "cache", cfg=cfg, progress=False)
    assert again["folds"] == first["folds"]


def test_rewritten_audio_invalidates_the_embedding_cache(tmp_path):
    enc_path = write_encoder(tmp_path / "e.safetensors")
    manifest = _mini_corpus(tmp_path)
    cache = tmp_path / "cache"
    first = probe_encoder(enc_path, manifest, cache_dir=cache, cfg=ProbeConfig(folds=3), progress=False)
    again = probe_encoder(enc_path, manifest, cache_dir=cache, cfg=ProbeConfig(folds=3), progress=False)
    assert again["embeddings"] == first["embeddings"]
    clip = tmp_path / "3.wav"
    stamp = clip.stat()
    wave, sr = sf.read(clip, dtype="float32")
    sf.write(clip, -wave, sr)  # same size; keep the time stamp distinct even on a coarse clock
    os.utime(clip, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000_000))
    rewritten = probe_encoder(enc_path, manifest, cache_dir=cache, cfg=ProbeConfig(folds=3), progress=False)
    assert rewritten["embeddings"] != first["embeddings"]
    assert len(list(cache.glob("emb_*.npz"))) == 2


def _run(script: str, *args: str, capsys) -> tuple[int, str, str]:
    """Run a script's ``main`` in this process (a subprocess would pay torch's import again)."""
    main = runpy.run_path(str(ROOT / "scripts" / script), run_name="script_under_test")["main"]
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_scripts_end_to_end(tmp_path, capsys):
    enc_path = write_encoder(tmp_path / "e.safetensors")
    manifest = _mini_corpus(tmp_path)
    res = _run(
        "extract.py",
        "--encoder",
        str(enc_path),
        "--manifest",
        str(manifest),
        "--out",
        str(tmp_path / "emb.npz"),
        "--frames",
        "--batch-size",
        "4",
        "--no-progress",
        capsys=capsys,
    )
    assert res[0] == 0, res[2]
    assert "skipped 1 undecodable" in res[1]
    with np.load(tmp_path / "emb.npz") as data:
        assert data["clip"].shape == (12, 48) and data["frames"].ndim == 3
    res = _run(
        "linear_probe.py",
        "--encoder",
        str(enc_path),
        "--manifest",
        str(manifest),
        "--out",
        str(tmp_path / "probe.json"),
        "--folds",
        "3",
        "--random-init",
        "--no-progress",
        capsys=capsys,
    )
    assert res[0] == 0, res[2]
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["random_init"] is True and len(result["folds"]) == 3 and 0 <= result["mean"] <= 1
    bad = _run(
        "extract.py",
        "--encoder",
        str(tmp_path / "nope.safetensors"),
        "--manifest",
        str(manifest),
        "--out",
        str(tmp_path / "x.npz"),
        capsys=capsys,
    )
    assert bad[0] != 0 and "does not exist" in bad[2]


def test_scripts_write_next_to_the_encoder_without_out(tmp_path, capsys, monkeypatch):
    """Without --out nothing lands in the current folder: the results sit beside the encoder file."""
    run_dir, cwd = tmp_path / "run", tmp_path / "cwd"
    run_dir.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    enc_path = write_encoder(run_dir / "teacher_encoder.safetensors")
    manifest = _mini_corpus(tmp_path)
    res = _run("extract.py", "--encoder", str(enc_path), "--manifest", str(manifest), "--no-progress", capsys=capsys)
    assert res[0] == 0, res[2]
    with np.load(run_dir / "embeddings.npz") as data:
        assert data["clip"].shape == (12, 48)
    for extra, name in (((), "probe.json"), (("--random-init",), "probe_random_init.json")):
        res = _run("linear_probe.py", "--encoder", str(enc_path), "--manifest", str(manifest), "--folds", "3",
                   "--no-progress", *extra, capsys=capsys)
        assert res[0] == 0, res[2]
        assert str(run_dir / name) in res[1]
        assert json.loads((run_dir / name).read_text())["random_init"] is bool(extra)
    assert list(cwd.iterdir()) == []
    assert (run_dir / "embeddings").is_dir()
