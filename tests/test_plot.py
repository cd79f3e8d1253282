"""asit.eval.plots and scripts/plot.py: curves from real pretraining / fine-tuning logs, per-class bars."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from test_encoder import write_encoder  # tests/ is on sys.path under pytest
from test_train_engine import TINY

from asit.config import load_config
from asit.eval.plots import loss_terms, plot_results, plot_training_log, read_log
from asit.finetune import load_finetune_config, run_finetune
from asit.train import Pretrainer

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrain_log(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    cfg = load_config("demo_cpu", [*TINY, f"data.cache_dir={out / 'cache'}", "train.epochs=1",
                                   "train.image_every_epochs=0", f"train.output_dir={out / 'run'}"])
    trainer = Pretrainer(cfg)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    return out / "run" / "log.jsonl"


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finetune")
    encoder = write_encoder(root / "teacher_encoder.safetensors")
    cfg = load_finetune_config("demo", [
        f"encoder={encoder}", f"data.cache_dir={root / 'cache'}", "data.demo_clips=36", "data.demo_seconds=0.64",
        "data.num_workers=0", "train.batch_size=6", "train.epochs=2", "train.log_every=1", "train.progress=false",
        f"train.output_dir={root / 'run'}"])
    run_finetune(cfg)
    return root / "run"


def _assert_png(path: Path, min_px: int = 200) -> np.ndarray:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= min_px and image.shape[1] >= min_px
    assert image[..., :3].std() > 0.01  # something drawn, not a blank canvas
    return image


def test_pretraining_log_curves(pretrain_log, tmp_path):
    records = read_log(pretrain_log)
    assert len(records) >= 3
    assert loss_terms(records) == ["loss", "global", "local", "recon"]
    image = _assert_png(plot_training_log(pretrain_log, tmp_path / "curves.png"))
    assert image.shape[1] > image.shape[0]  # panels side by side: 4 losses + lr in a 3-wide grid


def test_finetune_log_and_results(finetune_run, tmp_path):
    records = read_log(finetune_run / "log.jsonl")
    assert loss_terms(records) == ["loss"]
    assert any("val_accuracy" in r for r in records)
    _assert_png(plot_training_log(finetune_run / "log.jsonl", tmp_path / "ft_curves.png"))
    result = json.loads((finetune_run / "results.json").read_text())
    assert set(result["per_class"]) == set(result["classes"])
    _assert_png(plot_results(finetune_run / "results.json", tmp_path / "classes.png"))


def test_log_reader_skips_incidents_and_nulls(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"step": 1, "loss": 2.0, "lr": 1e-4}, {"step": 2, "event": "nonfinite_skip", "loss": None},
            {"step": 3, "loss": None, "lr": 2e-4, "recon": 0.5}, {"step": 4, "loss": 1.5, "lr": 3e-4, "recon": 0.4}]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    records = read_log(log)
    assert [r["step"] for r in records] == [1, 3, 4]
    assert loss_terms(records) == ["loss", "recon"]
    _assert_png(plot_training_log(log, tmp_path / "c.png"))
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        read_log(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text('{"step": 1, "epoch": 0}\n')
    with pytest.raises(ValueError, match="no loss term"):
        plot_training_log(tmp_path / "empty.jsonl", tmp_path / "e.png")


def test_results_without_per_class_plot_folds_and_many_classes_are_cut(tmp_path):
    probe = {"metric": "accuracy", "mean": 0.5, "folds": [{"fold": k, "accuracy": 0.4 + 0.05 * k} for k in range(5)]}
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    _assert_png(plot_results(tmp_path / "probe.json", tmp_path / "probe.png"))
    many = {"metric": "mAP", "value": 0.3, "per_class": {f"class {i}": i / 527 for i in range(527)}}
    many["per_class"]["class 3"] = None  # a class without positives
    (tmp_path / "many.json").write_text(json.dumps(many))
    short = _assert_png(plot_results(tmp_path / "many.json", tmp_path / "many.png", top=10))
    assert short.shape[0] < 1000  # 21 bars, not 526
    (tmp_path / "none.json").write_text(json.dumps({"metric": "mAP"}))
    with pytest.raises(ValueError, match="no per_class"):
        plot_results(tmp_path / "none.json", tmp_path / "none.png")


def test_plot_script(finetune_run, tmp_path, monkeypatch, capsys):
    for src, out in ((finetune_run / "log.jsonl", tmp_path / "a.png"), (finetune_run / "results.json", None)):
        argv = ["plot.py", str(src)] + (["-o", str(out)] if out else [])
        monkeypatch.setattr("sys.argv", argv)
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / "scripts" / "plot.py"), run_name="__main__")
        assert exit_info.value.code == 0
        _assert_png(out or src.with_suffix(".png"))
    monkeypatch.setattr("sys.argv", ["plot.py", str(tmp_path / "missing.jsonl")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "plot.py"), run_name="__main__")
    assert exit_info.value.code == 1
    assert "error" in capsys.readouterr().err
