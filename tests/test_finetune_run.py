"""asit.finetune.run and scripts/finetune.py: end to end, cross-validation, DDP, test split, ESC-50 layout."""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_encoder import write_encoder  # tests/ is on sys.path under pytest

from asit.config import ConfigError
from asit.data import load_manifest
from asit.finetune import (
    FinetuneModel,
    Finetuner,
    LabelSpace,
    load_finetune_config,
    load_finetuned_model,
    run_finetune,
)

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    return write_encoder(root / "teacher_encoder.safetensors"), root / "cache"


def _demo_overrides(encoder, cache, out, *extra):
    # 120 clips of 0.64 s: each clip fits the encoder's 64-frame window at 8 kHz (longer demo clips
    # are mostly silence in their first window, the one evaluation sees)
    return [f"encoder={encoder}", f"data.cache_dir={cache}", "data.demo_clips=120", "data.demo_seconds=0.64",
            "data.num_workers=0", "train.batch_size=6", "train.progress=false", f"train.output_dir={out}", *extra]


def test_end_to_end_demo_finetune(demo_encoder, tmp_path):
    encoder, cache = demo_encoder
    out = tmp_path / "run"
    cfg = load_finetune_config("demo", _demo_overrides(encoder, cache, out, "train.epochs=2", "train.log_every=1",
                                                       "augment.mixup_prob=0", "train.average_start=1"))
    result = run_finetune(cfg)
    saved = json.loads((out / "results.json").read_text())
    assert saved["metric"] == "accuracy" and saved["task"] == "single-label"
    assert len(saved["classes"]) == 6 and len(saved["history"]) == 2
    # validation = the training clips here: above chance (1/6; its standard error over 120 clips is 0.034)
    # after 2 epochs even from this random-weight encoder (seeds 0-3 give 0.38-0.43)
    assert result["best"]["accuracy"] > 0.3
    assert saved["value"] == pytest.approx(result["best"]["accuracy"])
    assert set(saved["per_class"]) == set(saved["classes"])
    assert saved["averaged"]["n_models"] == 2
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["epoch"] == saved["best"]["epoch"] and ckpt["classes"] == saved["classes"]
    assert ckpt["value"] == pytest.approx(saved["best"]["accuracy"])
    assert "head.1.weight" in ckpt["model"] and "backbone.cls_token" in ckpt["model"]
    # the input normalisation travels with the model and the results (the encoder's statistics here)
    enc_meta = ckpt["encoder_metadata"]
    assert ckpt["normalization"] == {"mean": float(enc_meta["mean"]), "std": float(enc_meta["std"])}
    assert saved["normalization"] == {**ckpt["normalization"], "source": "encoder"}
    assert (out / "averaged.pt").is_file() and (out / "config.yaml").is_file()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("loss" in r and "lr" in r for r in records)
    assert sum("val_accuracy" in r for r in records) == 2


def test_cross_validation_via_script(demo_encoder, tmp_path, monkeypatch):
    encoder, cache = demo_encoder
    out = tmp_path / "cv"
    argv = ["finetune.py", "--preset", "demo", *_demo_overrides(
        encoder, cache, out, "train.epochs=1", "data.val_manifest=null", "data.cv_folds=2",
        "train.max_steps_per_epoch=2", "train.average_start=null", "train.average_end=null",
        "train.save_best=false")]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "finetune.py"), run_name="__main__")
    assert exit_info.value.code == 0
    saved = json.loads((out / "results.json").read_text())
    assert [f["fold"] for f in saved["folds"]] == [0, 1]
    assert sum(f["n_test"] for f in saved["folds"]) == 120
    assert saved["value"] == pytest.approx(np.mean([f["value"] for f in saved["folds"]]))
    assert (out / "fold_0" / "results.json").is_file() and (out / "fold_1" / "log.jsonl").is_file()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_ranks_gather_the_whole_validation_set(demo_encoder, tmp_path):
    encoder, cache = demo_encoder
    out = tmp_path / "ddp"
    overrides = _demo_overrides(encoder, cache, out, "train.epochs=1", "train.max_steps_per_epoch=3",
                                "data.balanced_sampling=true", "train.average_start=null", "train.average_end=null")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(ROOT / "scripts" / "finetune.py"),
           "--preset", "demo", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    saved = json.loads((out / "results.json").read_text())
    assert saved["steps"] == 3 and saved["best"]["n_clips"] == 120  # every clip once, from both ranks
    # the gathered evaluation equals a single-process evaluation of the saved best model
    cfg = load_finetune_config("demo", overrides)
    entries = load_manifest(cache / "demo" / "n120-sr16000-0.64s-seed0" / "manifest.csv")  # the keyed demo folder
    runner = Finetuner(cfg, entries, entries, LabelSpace.from_entries(entries), False, tmp_path / "single")
    runner.setup()
    try:
        runner.model.load_state_dict(torch.load(out / "best.pt", weights_only=True)["model"])
        again = runner.evaluate()
    finally:
        runner.cleanup()
    assert again["accuracy"] == pytest.approx(saved["best"]["accuracy"])
    assert again["per_class"] == pytest.approx(saved["best"]["per_class"])


@pytest.mark.slow
def test_ddp_resume_after_a_crash_is_exact(demo_encoder, tmp_path):
    """Two torchrun ranks (mixup on: each rank has its own RNG streams) die after epoch 1; --resume ends
    with the same weights and results as an uninterrupted run. With data.stats=corpus: rank 0 computes the
    statistics and broadcasts them, the resumed run reads them back from its cache."""
    from asit.finetune.trainer import FAULT_EPOCH_ENV

    encoder, cache = demo_encoder

    def run(out, *extra_args, fault=None):
        overrides = _demo_overrides(encoder, cache, out, "train.epochs=2", "train.max_steps_per_epoch=2",
                                    "augment.mixup_prob=0.5", "train.average_start=null", "train.average_end=null",
                                    "data.stats=corpus")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(ROOT / "scripts" / "finetune.py"),
               "--preset", "demo", *extra_args, *overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop(FAULT_EPOCH_ENV, None)
        if fault is not None:
            env[FAULT_EPOCH_ENV] = str(fault)
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)

    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-4000:]
    crashed = run(tmp_path / "cut", fault=1)
    assert crashed.returncode != 0 and not (tmp_path / "cut" / "results.json").exists()
    assert sorted(p.name for p in (tmp_path / "cut").glob("rng_*.pt")) == [
        "rng_epoch0001_rank0.pt", "rng_epoch0001_rank1.pt"]
    resumed = run(tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "fbank statistics of 120 training clips" in full.stderr
    assert "fbank statistics of 120 training clips" not in resumed.stderr  # read back from the cache
    stats = json.loads((tmp_path / "full" / "fbank_stats.json").read_text())
    assert stats["clips"] == 120 and stats == json.loads((tmp_path / "cut" / "fbank_stats.json").read_text())
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("full", "cut"))
    assert a["history"] == b["history"] and a["steps"] == b["steps"] == 4
    wa, wb = (torch.load(tmp_path / d / "last.pt", weights_only=True)["model"] for d in ("full", "cut"))
    for k, v in wa.items():
        assert torch.equal(v, wb[k]), k


def test_resume_refuses_a_different_length_and_skips_finished_folds(demo_encoder, tmp_path, caplog):
    encoder, cache = demo_encoder
    out = tmp_path / "cv"
    extra = ("train.epochs=1", "data.val_manifest=null", "data.cv_folds=2", "train.max_steps_per_epoch=2",
             "train.average_start=null", "train.average_end=null", "train.resume=true")
    first = run_finetune(load_finetune_config("demo", _demo_overrides(encoder, cache, out, *extra)))
    (out / "fold_1" / "results.json").unlink()  # as if the run died during fold 1's evaluation
    with caplog.at_level("INFO", logger="asit.finetune"):
        again = run_finetune(load_finetune_config("demo", _demo_overrides(encoder, cache, out, *extra)))
    assert "fold 0 already finished" in caplog.text
    assert again["value"] == first["value"] and again["folds"][0]["history"] == first["folds"][0]["history"]

    longer = load_finetune_config("demo", _demo_overrides(encoder, cache, out / "fold_1", "train.epochs=2",
                                                          "train.max_steps_per_epoch=2", "train.resume=true"))
    with pytest.raises(ValueError, match=r"cannot resume from .*last\.pt: .*train\.epochs: 1 there, 2 here"):
        run_finetune(longer)


def test_all_windows_evaluation_end_to_end(demo_encoder, tmp_path):
    encoder, cache = demo_encoder
    cfg = load_finetune_config("demo", [*_demo_overrides(encoder, cache, tmp_path / "run", "train.epochs=1",
                                                          "train.max_steps_per_epoch=2", "train.eval_windows=all",
                                                          "train.average_start=null", "train.average_end=null"),
                                        "data.demo_seconds=1.5", f"data.cache_dir={tmp_path / 'cache15'}"])
    result = run_finetune(cfg)
    assert result["last"]["n_clips"] == 120 and 0.0 <= result["last"]["accuracy"] <= 1.0
    with pytest.raises(ConfigError, match="eval_windows"):
        load_finetune_config("demo", ["train.eval_windows=some"])


def _write_esc50(root: Path, sr: int, samples: int, drop: str | None = None) -> list[str]:
    """The official ESC-50 layout in miniature: audio/{fold}-{id}-A-{target}.wav (flat) and meta/esc50.csv
    with 5 folds x 3 classes; ``drop``: a file left out of the CSV. Returns the categories by target."""
    import soundfile as sf

    categories = ["rain", "dog", "church_bells"]  # target order is not alphabetical
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    t = np.arange(samples) / sr
    for fold in range(1, 6):
        for target, category in enumerate(categories):
            name = f"{fold}-{100 * fold + target}-A-{target}.wav"
            noise = 0.01 * np.random.default_rng(fold).random(samples)
            wave = 0.3 * np.sin(2 * np.pi * (300 + 900 * target) * t) + noise
            sf.write(root / "audio" / name, wave.astype(np.float32), sr, subtype="FLOAT")
            if name != drop:
                rows.append(f"{name},{fold},{target},{category},False,{100 * fold + target},A")
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    return categories


def test_esc50_preset_on_the_official_layout(demo_encoder, tmp_path, caplog):
    """The esc50 preset on a flat audio/ folder + meta/esc50.csv: labels from `category`, the official folds
    from `fold` (recorded in results.json), the centre-cropped positional embedding; a clip missing from the
    CSV is an error naming the CSV and the clip."""
    encoder, _ = demo_encoder
    root, out = tmp_path / "ESC-50", tmp_path / "run"
    categories = _write_esc50(root, 8000, 4000)
    overrides = [f"encoder={encoder}", f"data.train_manifest={root / 'audio'}",
                 f"data.fold_csv={root / 'meta' / 'esc50.csv'}", "data.target_frames=48", "data.num_workers=0",
                 "train.epochs=1", "train.batch_size=4", "optim.warmup_steps=1", "train.progress=false",
                 f"train.output_dir={out}"]
    with caplog.at_level("INFO", logger="asit.finetune"):
        result = run_finetune(load_finetune_config("esc50", overrides))
    assert "cross-validation folds from metadata" in caplog.text
    saved = json.loads((out / "results.json").read_text())
    assert saved["classes"] == sorted(categories) and saved["fold_source"] == "metadata"
    assert [f["n_test"] for f in saved["folds"]] == [3] * 5 and result["value_split"] == "held-out folds"
    ckpt = torch.load(out / "fold_0" / "best.pt", weights_only=True)
    assert ckpt["pos_embed_fit"] == "crop" and ckpt["config"]["model"]["pos_embed_fit"] == "crop"

    bad = tmp_path / "bad"
    _write_esc50(bad, 8000, 4000, drop="3-301-A-1.wav")
    overrides = [o.replace(str(root), str(bad)) for o in overrides]
    with pytest.raises(ValueError, match=r"bad/meta/esc50\.csv: no 'category' .* e\.g\. .*3-301-A-1\.wav"):
        run_finetune(load_finetune_config("esc50", overrides))


def test_test_manifest_scores_the_reported_model(demo_encoder, tmp_path):
    """data.test_manifest: after training the best model (train.report=best, read from best.pt) is scored on
    the test clips; that is the reported value, the validation score stays as val_value. The saved best.pt
    reloads (load_finetuned_model) with its pooling and cropped positions. BCE and crop on, as in scv2."""
    from asit.finetune.data import _resolve_manifest

    encoder, cache = demo_encoder
    out = tmp_path / "run"
    overrides = _demo_overrides(encoder, cache, out, "train.epochs=3", "train.max_steps_per_epoch=5",
                                "train.average_start=null", "train.average_end=null", "train.report=best",
                                "optim.loss=bce", "model.pos_embed_fit=crop", "data.target_frames=48",
                                "augment.mixup_prob=0.6", "augment.noise=true")
    cfg = load_finetune_config("demo", overrides)
    entries = load_manifest(_resolve_manifest("demo", cfg.data, cfg.train.seed))
    test_entries = entries[1::3]  # 40 clips, every class
    (tmp_path / "test.csv").write_text("path,label\n" + "".join(f"{e.path},{e.labels[0]}\n" for e in test_entries))
    cfg = load_finetune_config("demo", [*overrides, f"data.test_manifest={tmp_path / 'test.csv'}"])
    result = run_finetune(cfg)
    saved = json.loads((out / "results.json").read_text())
    assert saved["value_split"] == "test" and saved["test"]["model"] == "best"
    assert saved["test"]["epoch"] == saved["best"]["epoch"] and saved["test"]["n_clips"] == 40
    assert saved["value"] == pytest.approx(saved["test"]["accuracy"]) == pytest.approx(result["value"])
    assert saved["val_value"] == pytest.approx(saved["best"]["accuracy"])
    assert saved["per_class"] == pytest.approx(saved["test"]["per_class"])

    # independently: the weights in best.pt (and last.pt) on the test clips
    runner = Finetuner(cfg, entries, test_entries, LabelSpace.from_entries(entries), False, tmp_path / "oracle")
    runner.setup()
    try:
        scores = {}
        for name in ("last.pt", "best.pt"):  # best.pt's weights stay loaded
            runner.model.load_state_dict(torch.load(out / name, weights_only=True)["model"])
            scores[name] = runner.evaluate()["accuracy"]
        x = runner.features(torch.randn(3, 4000))  # [3, 1, 48, F]: 3 of the encoder's 4 time patches
        runner.model.eval()
        with torch.no_grad():
            want = runner.model(x)
    finally:
        runner.cleanup()
    assert saved["test"]["accuracy"] == pytest.approx(scores["best.pt"])
    if saved["best"]["epoch"] != 3 and scores["best.pt"] != scores["last.pt"]:
        assert saved["test"]["accuracy"] != pytest.approx(scores["last.pt"])

    loaded = load_finetuned_model(out / "best.pt")
    assert loaded.pos_embed_fit == "crop" and loaded.pool == torch.load(out / "best.pt", weights_only=True)["pool"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want)
        resampled = FinetuneModel(loaded.backbone, loaded.head[1].out_features, loaded.pool, "resample").eval()
        resampled.head = loaded.head
        assert not torch.allclose(resampled(x), want, atol=1e-4)

    with pytest.raises(ConfigError, match="test_manifest"):
        load_finetune_config("esc50", ["data.test_manifest=t.json"])
