"""asit.finetune.trainer: schedule, metrics, losses, windowed evaluation, corpus statistics, exact resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_encoder import write_encoder  # tests/ is on sys.path under pytest
from test_finetune_run import _demo_overrides

from asit.config import ConfigError
from asit.data import load_manifest
from asit.finetune import (
    Finetuner,
    LabelSpace,
    evaluate_scores,
    finetune_lr_schedule,
    load_finetune_config,
    run_finetune,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_as20k_step_schedule():
    cfg = load_finetune_config("as20k").optim
    iters = 200
    lr = finetune_lr_schedule(cfg, 25, iters)
    assert lr.shape == (25 * iters,)
    # linear warm-up over the first 1000 iterations
    np.testing.assert_allclose(lr[:1000], 5e-5 * np.arange(1, 1001) / 1000)
    per_epoch = lr[::iters][5:]  # first iteration of epochs 6 … 25 (after the warm-up)
    expected = [5e-5] * 5 + [2.5e-5] * 5 + [1.25e-5] * 5 + [6.25e-6] * 5  # 1-based epochs 6-10, 11-15, …
    np.testing.assert_allclose(per_epoch, expected)
    assert np.all(lr[10 * iters : 11 * iters] == 2.5e-5)  # epoch 11 constant


def test_cosine_schedule_endpoints():
    cfg = load_finetune_config("demo", ["optim.warmup_steps=4", "optim.lr=1e-3", "optim.min_lr=1e-5"]).optim
    lr = finetune_lr_schedule(cfg, 3, 10)
    np.testing.assert_allclose(lr[:4], 1e-3 * np.arange(1, 5) / 4)
    assert lr[4] == pytest.approx(1e-3) and lr[-1] == pytest.approx(1e-5)
    assert np.all(np.diff(lr[4:]) <= 0)


def test_evaluate_scores_per_class():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.7, 0.0]])
    value, per = evaluate_scores(scores, np.array([0, 1, 0]), multilabel=False)
    assert value == pytest.approx(2 / 3) and per == [0.5, 1.0, None]
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
    value, per = evaluate_scores(scores, targets, multilabel=True)
    assert per[2] is None and per[1] == pytest.approx(1.0) and per[0] == pytest.approx(1.0)
    assert value == pytest.approx(1.0)


@pytest.fixture(scope="module")
def demo_encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    return write_encoder(root / "teacher_encoder.safetensors"), root / "cache"


def test_resume_after_an_interrupted_epoch_is_exact(demo_encoder, tmp_path, monkeypatch):
    """Kill the run (an exception) in epoch 3, after epoch 2's resume point, resume with train.resume=true:
    the weights, AdamW state and results equal an uninterrupted run's, bit for bit. Mixup, SpecAugment,
    noise and weight averaging are on, so every RNG stream that a resume must restore is exercised."""
    from asit.finetune import Finetuner

    encoder, cache = demo_encoder
    extra = ("train.epochs=3", "train.max_steps_per_epoch=4", "augment.mixup_prob=0.5", "augment.noise=true",
             "train.average_start=2", "train.resume=true")
    full = run_finetune(load_finetune_config("demo", _demo_overrides(encoder, cache, tmp_path / "full", *extra)))

    out = tmp_path / "cut"
    cfg = load_finetune_config("demo", _demo_overrides(encoder, cache, out, *extra))
    real_step = Finetuner.train_step

    def crash_in_epoch_3(self, batch, step):
        if step == 10:  # the 3rd step of epoch 3, after the log record of step 10 (log_every=2)
            raise KeyboardInterrupt("simulated crash in epoch 3")
        return real_step(self, batch, step)

    monkeypatch.setattr(Finetuner, "train_step", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(cfg)
    assert not (out / "results.json").exists()
    assert sorted(p.name for p in out.glob("rng_*.pt")) == ["rng_epoch0002_rank0.pt"]
    assert any(json.loads(line)["step"] == 10 for line in (out / "log.jsonl").read_text().splitlines())
    monkeypatch.setattr(Finetuner, "train_step", real_step)
    resumed = run_finetune(cfg)

    assert resumed["history"] == full["history"] and resumed["best"] == full["best"]
    # the log holds every step once: the crashed run's records after its resume point were dropped
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    full_records = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    strip = [{k: v for k, v in r.items() if k != "time"} for r in records]
    assert strip == [{k: v for k, v in r.items() if k != "time"} for r in full_records]
    assert resumed["averaged"] == full["averaged"] and resumed["steps"] == full["steps"] == 12
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg"], b["optimizer"]["state"][i]["exp_avg"]), i
    for k, v in a["averaged"].items():
        assert torch.equal(v, b["averaged"][k]), k
    # the average of epochs 2 and 3 is not the last weights (it once aliased them on the CPU)
    assert not torch.equal(a["averaged"]["head.1.weight"], a["model"]["head.1.weight"])


def test_all_windows_evaluation_averages_the_scores_of_each_clip(tmp_path):
    """eval_windows=all: a clip of 2.5 windows is cut into 3 (the last one ending at the clip's end) and
    its score is the mean of the windows' scores, computed independently here with the model on each window."""
    import soundfile as sf
    import torch.nn as nn

    from asit.finetune import Finetuner, LabelledClips, collate_clips

    sr, n = 8000, 8000
    g = torch.Generator().manual_seed(0)
    lengths = (n // 3, 2 * n + n // 2, n)
    waves = [0.3 * torch.randn(length, generator=g) for length in lengths]
    rows = ["path,label"]
    for i, wave in enumerate(waves):
        sf.write(tmp_path / f"c{i}.wav", wave.numpy(), sr, subtype="FLOAT")
        rows.append(f"c{i}.wav,{'ab'[i % 2]}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    entries = load_manifest(tmp_path / "m.csv")
    targets = np.eye(2, dtype=np.float32)[[0, 1, 0]]

    items = [LabelledClips(entries, targets, sample_rate=sr, num_samples=n, train=False, all_windows=True)[i]
             for i in range(3)]
    assert [x["wave"].shape for x in items] == [(1, n), (3, n), (1, n)]
    assert torch.equal(items[1]["wave"][:2].flatten(), waves[1][: 2 * n])
    assert torch.equal(items[1]["wave"][2], waves[1][-n:])  # no padding: the clip's last n samples
    batch = collate_clips(items)
    assert batch["wave"].shape == (5, n) and batch["owner"].tolist() == [0, 1, 1, 1, 2]

    class Fake(Finetuner):  # only what predict() uses
        def __init__(self):
            self.model = nn.Linear(n, 2)
            self.multilabel, self.device, self.autocast_dtype = False, torch.device("cpu"), None
            self.val_loader = [batch]
            self.dist = type("D", (), {"distributed": False})()

        def features(self, waves):
            return waves

    fake = Fake()
    scores, got_targets = fake.predict()
    with torch.no_grad():
        per_window = torch.softmax(fake.model(batch["wave"]), -1)
    want = torch.stack([per_window[0], per_window[1:4].mean(0), per_window[4]])
    assert torch.allclose(torch.from_numpy(scores), want, atol=1e-6)
    assert np.array_equal(got_targets, targets)


def test_single_label_bce_loss(demo_encoder, tmp_path):
    """optim.loss=bce on a single-label task (the Speech Commands presets, as AST/SSAST): BCE-with-logits
    on the one-hot (mixup-mixed) targets; auto keeps cross-entropy."""
    encoder, _ = demo_encoder
    labels = LabelSpace(("a", "b", "c"), {"a": 0, "b": 1, "c": 2})
    logits = torch.randn(5, 3, dtype=torch.float64)
    target = torch.eye(3, dtype=torch.float64)[[0, 2, 1, 1, 0]]
    target = 0.7 * target + 0.3 * target.roll(1, 0)  # mixed
    for preset in ("scv1", "scv2"):
        cfg = load_finetune_config(preset, [f"encoder={encoder}"])
        assert cfg.optim.loss == "bce"
        runner = Finetuner(cfg, [], [], labels, False, tmp_path)
        want = -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean()
        torch.testing.assert_close(runner._loss(logits, target).double(), want)
    ce = Finetuner(load_finetune_config("demo"), [], [], labels, False, tmp_path)
    want = -(target * F.log_softmax(logits, -1)).sum(1).mean()
    torch.testing.assert_close(ce._loss(logits, target).double(), want)


def test_corpus_statistics_are_computed_once_and_cached(demo_encoder, tmp_path, monkeypatch):
    """data.stats=corpus: the fbank mean/std of the training clips at the encoder's rate and mel bins, computed
    by rank 0 before training and cached in the run folder (a resumed run reuses them; other clips recompute)."""
    import asit.data.stats as stats_module
    from asit.data import ensure_demo_dataset
    from asit.data.stats import compute_fbank_stats

    encoder, _ = demo_encoder
    entries = load_manifest(ensure_demo_dataset(tmp_path / "clips", num_clips=7, sample_rate=8000, seconds=0.5,
                                                seed=3))
    names = sorted({x for e in entries for x in e.labels})
    labels = LabelSpace(tuple(names), {n: i for i, n in enumerate(names)})
    cfg = load_finetune_config("demo", [f"encoder={encoder}", "data.stats=corpus", "data.num_workers=0",
                                        "train.progress=false"])
    want = compute_fbank_stats(entries, sample_rate=8000, num_mel_bins=32, progress=False)
    assert want.clips == 7 and want.mean != pytest.approx(-4.2677393, abs=0.1)  # not the AudioSet value

    def setup(train):
        runner = Finetuner(cfg, train, entries[:2], labels, False, tmp_path / "run")
        try:
            runner.setup()
            return runner.mean, runner.std
        finally:
            runner.cleanup()

    assert setup(entries) == (pytest.approx(want.mean), pytest.approx(want.std))
    assert json.loads((tmp_path / "run" / "fbank_stats.json").read_text())["clips"] == 7
    calls = []
    real = stats_module.compute_fbank_stats
    monkeypatch.setattr(stats_module, "compute_fbank_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert setup(entries) == (pytest.approx(want.mean), pytest.approx(want.std)) and calls == []  # cached
    other = compute_fbank_stats(entries[:4], sample_rate=8000, num_mel_bins=32, progress=False)
    assert setup(entries[:4]) == (pytest.approx(other.mean), pytest.approx(other.std)) and calls == [1]

    assert load_finetune_config("esc50", ["data.mean=-5", "data.std=4"]).data.mean == -5  # hand-set values win
    os.utime(entries[0].path, ns=(1, 1))  # audio rewritten at the same path: recomputed
    calls.clear()
    assert setup(entries) == (pytest.approx(want.mean), pytest.approx(want.std)) and calls == [1]
    with pytest.raises(ConfigError, match="set together"):
        load_finetune_config("demo", ["data.mean=-5"])
