"""The representation monitor of pretraining (asit.train.probe_monitor) and DINO's weighted k-NN
(asit.train.probes): the k-NN against hand computations, high scores on a separable toy set, the
monitor's embeddings equal to the downstream encoder's, the probe keys in a tiny run's log.jsonl (with the
training itself unchanged), and validation of the ``eval.*`` keys."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_config import TINY_MODEL

from asit.config import ConfigError, load_config
from asit.data import ensure_demo_dataset, load_audio, load_manifest
from asit.encoder import AudioEncoder
from asit.models import build_backbone
from asit.train import Pretrainer
from asit.train.probe_monitor import ProbeMonitor, cache_probe_clips, probe_scores
from asit.train.probes import knn_accuracy, knn_predict

PROBE_KEYS = {"probe/knn_acc", "probe/linear_acc", "probe/linear_acc_std", "probe/seconds"}


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    """Demo corpus in a temp dir (ASIT_CACHE) and a single intra-op thread for this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASIT_CACHE", str(tmp_path_factory.mktemp("asit_cache")))
        yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- k-NN


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_knn_weights_votes_by_exp_similarity_over_temperature() -> None:
    """One close neighbour of class 0 against two far ones of class 1 (k = 3): the exp(sim / T) weights
    decide. Hand computation: cos 10° = 0.985, cos 80° = 0.174 (twice), cos 180° = -1 (not among the 3).
    T = 0.07: class 0 gets e^(0.985/0.07) = 1.3e6, class 1 gets 2·e^(0.174/0.07) = 24 → class 0.
    T = 10: e^0.0985 = 1.10 against 2·e^0.0174 = 2.04 → class 1 (the plain majority)."""
    train = torch.tensor([_unit(10), _unit(80), _unit(-80), _unit(180)], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0])
    test = torch.tensor([_unit(0)], dtype=torch.float64) * 5.0  # length does not matter: cosine
    assert knn_predict(train, labels, test, num_classes=2, k=3, temperature=0.07).tolist() == [0]
    assert knn_predict(train, labels, test, num_classes=2, k=3, temperature=10.0).tolist() == [1]
    # k = 1: only the nearest votes, whatever the temperature
    assert knn_predict(train, labels, test, num_classes=2, k=1, temperature=10.0).tolist() == [0]


def test_knn_accuracy_is_leave_one_out() -> None:
    """Two clips of class 0 side by side, one of class 1 near them (k = 1): the class-1 clip is classified by
    its nearest *other* clip (class 0), so 2 of 3 are right; voting for itself would give 3 of 3."""
    x = np.array([_unit(0), _unit(1), _unit(20)])
    assert knn_accuracy(x, np.array([0, 0, 1]), k=1) == pytest.approx(2 / 3)
    # k larger than the candidates is clipped to N - 1; a two-clip set: each one sees only the other
    assert knn_accuracy(np.array([_unit(0), _unit(90)]), np.array([0, 1]), k=20) == 0.0


def test_knn_matches_a_direct_loop_on_random_data() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((37, 5)), rng.integers(0, 4, 37)
    k, temp = 6, 0.07
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    hits = 0
    for i in range(len(x)):
        sims = sorted(((float(xn[i] @ xn[j]), j) for j in range(len(x)) if j != i), reverse=True)[:k]
        votes = np.zeros(4)
        for s, j in sims:
            votes[y[j]] += math.exp(s / temp)
        hits += int(votes.argmax() == y[i])
    assert knn_accuracy(x, y, k=k, temperature=temp) == pytest.approx(hits / len(x))


def test_separable_blobs_score_high_and_shuffled_labels_do_not() -> None:
    rng = np.random.default_rng(1)
    centres = np.zeros((2, 16))
    centres[0, 0], centres[1, 1] = 4.0, 4.0  # directions 90° apart: cosine separates them
    labels = np.repeat([0, 1], 40)
    x = centres[labels] + rng.standard_normal((80, 16))
    scores = probe_scores(x, labels, folds=3)
    assert scores["probe/knn_acc"] > 0.9 and scores["probe/linear_acc"] > 0.9, scores
    shuffled = probe_scores(x, rng.permutation(labels), folds=3)
    assert shuffled["probe/knn_acc"] < 0.8 and shuffled["probe/linear_acc"] < 0.8, shuffled


# --------------------------------------------------------------------------- the monitor


def _tiny_encoder(frames: int = 96, mels: int = 32) -> AudioEncoder:
    torch.manual_seed(0)
    backbone = build_backbone(img_size=(frames, mels), patch_size=16, embed_dim=32, depth=1, num_heads=2)
    return AudioEncoder(backbone.eval().requires_grad_(False), sample_rate=16000, num_mel_bins=mels, mean=-3.65,
                        std=3.79)


def test_monitor_embeddings_equal_the_downstream_encoders(tmp_path) -> None:
    """Cached fbank windows + the backbone give AudioEncoder.embed's [CLS] clip embeddings (clips of 3 s and
    1 s windows: several windows per clip, the last one ending at the clip's end)."""
    manifest = ensure_demo_dataset(tmp_path / "demo", num_clips=12, sample_rate=16000, seconds=3.0, seed=0)
    entries = load_manifest(manifest)
    encoder = _tiny_encoder()
    clips = cache_probe_clips(encoder, entries)
    assert clips.windows.shape[0] > len(entries)  # several windows per clip
    monitor = ProbeMonitor(encoder, clips, every_epochs=1, epochs=1, knn_k=3, linear_folds=2)
    expected = encoder.embed([load_audio(e.path, 16000) for e in entries], 16000, pool="cls").clip
    np.testing.assert_allclose(monitor.embed(), expected.double().numpy(), rtol=1e-5, atol=1e-5)
    assert len(clips.classes) == 6 and sorted(set(clips.labels.tolist())) == list(range(6))

    before = torch.get_rng_state()
    values = monitor.evaluate()
    assert torch.equal(torch.get_rng_state(), before)  # the training's random numbers are untouched
    assert set(values) == PROBE_KEYS and all(0.0 <= values[k] <= 1.0 for k in PROBE_KEYS - {"probe/seconds"})


def test_monitor_is_due_every_n_epochs_and_after_the_last(tmp_path) -> None:
    monitor = ProbeMonitor(None, None, every_epochs=3, epochs=7)  # type: ignore[arg-type]
    assert [e for e in range(7) if monitor.due(e)] == [2, 5, 6]


def test_a_multi_label_probe_set_is_refused_naming_the_key(tmp_path) -> None:
    manifest = ensure_demo_dataset(tmp_path / "demo", num_clips=6, sample_rate=16000, seconds=1.0, seed=0)
    rows = manifest.read_text().splitlines()
    rows[1] += ";other"  # the first clip gets two labels
    bad = manifest.parent / "multi.csv"  # beside the corpus: its paths are relative to it
    bad.write_text("\n".join(rows) + "\n")
    cfg = load_config("demo_cpu", [f"eval.probe_manifest={bad}", "data.num_mel_bins=32", "data.target_frames=96"])
    with pytest.raises(ValueError, match=r"eval\.probe_manifest .*exactly one label"):
        ProbeMonitor.from_config(cfg, _tiny_encoder().backbone)


# --------------------------------------------------------------------------- in a pretraining run

TINY = [*TINY_MODEL, "train.batch_size=8", "train.epochs=2", "train.max_steps_per_epoch=3", "train.log_every=1",
        "train.progress=false", "train.image_every_epochs=0"]


def _run(out: Path, *extra: str) -> tuple[Pretrainer, list[dict]]:
    trainer = Pretrainer(load_config("demo_cpu", [*TINY, f"train.output_dir={out}", *extra]))
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    with open(out / "log.jsonl", encoding="utf-8") as fh:
        return trainer, [json.loads(line) for line in fh]


def test_pretraining_logs_the_probe_and_trains_as_without_it(tmp_path) -> None:
    with_probe, log = _run(tmp_path / "probe", "eval.probe_manifest=demo", "eval.every_epochs=1",
                           "eval.linear_folds=2")
    probe_rows = [r for r in log if "probe/knn_acc" in r]
    assert [(r["step"], r["epoch"]) for r in probe_rows] == [(3, 0), (6, 1)]
    for row in probe_rows:
        assert PROBE_KEYS <= row.keys()
        assert 0.0 <= row["probe/knn_acc"] <= 1.0 and 0.0 <= row["probe/linear_acc"] <= 1.0
    assert len(with_probe.probe.clips.labels) == 48  # data.demo_clips of the tiny config
    assert list((tmp_path / "probe" / "tensorboard").iterdir())

    without, plain_log = _run(tmp_path / "plain", "eval.probe_manifest=null")
    assert without.probe is None
    losses = [(r["step"], r["loss"]) for r in log if "loss" in r]
    assert losses == [(r["step"], r["loss"]) for r in plain_log if "loss" in r]  # same training, bit for bit
    for name, tensor in without.teacher.state_dict().items():
        assert torch.equal(tensor, with_probe.teacher.state_dict()[name]), name


# --------------------------------------------------------------------------- config


def test_eval_defaults_are_off_in_the_paper_recipes_and_on_in_the_demo() -> None:
    for name in ("asit_vit_base", "asit_vit_small", "asit_v2_vit_base"):
        assert load_config(name).eval.probe_manifest is None
    demo = load_config("demo_cpu").eval
    assert demo.probe_manifest == "demo" and demo.every_epochs >= 1
    assert (demo.knn_k, demo.knn_temperature) == (20, 0.07)


@pytest.mark.parametrize("override, fragment", [
    ("eval.every_epochs=0", "eval.every_epochs must be >= 1"),
    ("eval.knn_k=0", "eval.knn_k must be >= 1"),
    ("eval.knn_temperature=0", "eval.knn_temperature must be > 0"),
    ("eval.linear_folds=1", "eval.linear_folds must be >= 2"),
    ("eval.probe_manifest=' '", "eval.probe_manifest must be"),
    ("eval.every_epochs=often", "eval.every_epochs"),
    ("eval.knn=5", "eval.knn"),
])
def test_eval_keys_are_validated_naming_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config("demo_cpu", [override])


def test_changing_the_probe_on_resume_is_not_a_changed_setting(caplog) -> None:
    """The probe does not change what is trained, so resuming with other eval.* values warns of nothing."""
    from asit.config import config_to_dict
    from asit.train.resume import RESUME_FREE_KEYS, warn_changed_config

    saved = config_to_dict(load_config("demo_cpu"))
    now = config_to_dict(load_config("demo_cpu", ["eval.probe_manifest=null", "eval.every_epochs=2",
                                                  "eval.knn_k=5", "eval.knn_temperature=0.1",
                                                  "eval.linear_folds=4"]))
    with caplog.at_level("WARNING"):
        warn_changed_config(Path("ckpt.pt"), saved, now, RESUME_FREE_KEYS)
    assert not [r for r in caplog.records if "setting(s) changed" in r.getMessage()]
    changed = config_to_dict(load_config("demo_cpu", ["optim.lr=1e-3"]))
    with caplog.at_level("WARNING"):
        warn_changed_config(Path("ckpt.pt"), saved, changed, RESUME_FREE_KEYS)
    assert [r for r in caplog.records if "setting(s) changed" in r.getMessage()]  # the check itself works
