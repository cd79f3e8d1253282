"""asit.eval.finetune: presets, mixup, SpecAugment, balanced sampling, schedule, folds, end to end."""

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
import torch.nn.functional as F
from test_eval_encoder import write_encoder  # tests/ is on sys.path under pytest

from asit.config import ConfigError
from asit.data import AudioEntry, load_manifest
from asit.eval.finetune import (
    FinetuneModel,
    Finetuner,
    LabelSpace,
    SpecAugment,
    WeightedDistributedSampler,
    apply_mixup,
    assign_folds,
    available_presets,
    balanced_sample_weights,
    evaluate_scores,
    finetune_lr_schedule,
    labels_from_metadata,
    load_finetune_config,
    load_finetuned_model,
    read_class_csv,
    run_finetune,
    sample_mixup,
)
from asit.models import build_backbone, encode, fit_pos_embed

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    "preset, lr, epochs, batch, freqm, timem, mixup",
    [
        ("as20k", 5e-5, 25, 12, 48, 192, 0.5),
        ("as2m", 1e-5, 5, 12, 48, 192, 0.5),
        ("esc50", 1e-4, 50, 48, 24, 96, 0.0),
        ("scv2", 2.5e-4, 30, 128, 48, 48, 0.6),
    ],
)
def test_presets_carry_the_ast_recipe(preset, lr, epochs, batch, freqm, timem, mixup):
    cfg = load_finetune_config(preset)
    assert cfg.name == preset
    assert cfg.optim.lr == pytest.approx(lr)
    assert (cfg.train.epochs, cfg.train.batch_size) == (epochs, batch)
    assert (cfg.augment.freqm, cfg.augment.timem) == (freqm, timem)
    assert cfg.augment.mixup_prob == pytest.approx(mixup)


def test_preset_specifics():
    as20k = load_finetune_config("as20k")
    assert (as20k.optim.schedule, as20k.optim.decay_start, as20k.optim.decay_every) == ("step", 10, 5)
    assert as20k.optim.decay_factor == 0.5
    assert (as20k.train.average_start, as20k.train.average_end, as20k.train.report) == (6, 25, "averaged")
    assert as20k.data.task == "multi_label"
    assert load_finetune_config("as2m").data.balanced_sampling
    esc = load_finetune_config("esc50")
    assert esc.data.cv_folds == 5 and esc.data.task == "single_label"
    assert esc.data.fold_csv.endswith("meta/esc50.csv") and esc.model.pos_embed_fit == "crop"
    for name, split in (("scv1", "speechcommands_v1/"), ("scv2", "speechcommands_v2/"), ("voxceleb_sid", "sid_")):
        cfg = load_finetune_config(name)
        assert cfg.data.test_manifest.startswith(cfg.data.val_manifest.rsplit("/", 1)[0])
        assert split + "test" in cfg.data.test_manifest and cfg.train.report == "best"
    for name in ("scv1", "scv2"):  # AST/SSAST's Speech Commands protocol: BCE, cut positions
        cfg = load_finetune_config(name)
        assert (cfg.optim.loss, cfg.model.pos_embed_fit, cfg.data.target_frames) == ("bce", "crop", 128)
    assert load_finetune_config("as20k").model.pos_embed_fit == "resample"  # the default
    assert {"as20k", "as2m", "esc50", "scv1", "scv2", "voxceleb_sid", "demo"} <= set(available_presets())
    for name in available_presets():  # every shipped preset validates
        load_finetune_config(name)


def test_config_overrides_and_errors(tmp_path):
    cfg = load_finetune_config("esc50", ["optim.lr=3e-4", "data.cv_folds=0", "data.val_manifest=x.csv"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.data.cv_folds == 0
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_finetune_config("esc50", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="val_manifest"):
        load_finetune_config("scv2", ["data.val_manifest=null"])
    with pytest.raises(ConfigError, match="mixup_prob"):
        load_finetune_config("scv2", ["augment.mixup_prob=1.5"])
    with pytest.raises(ConfigError, match="unknown fine-tuning preset"):
        load_finetune_config("nope")
    with pytest.raises(ConfigError, match="average_start"):
        load_finetune_config("scv2", ["train.report=averaged"])
    with pytest.raises(ConfigError, match="train.seed"):
        load_finetune_config("scv2", ["train.seed=-1"])


# --------------------------------------------------------------------------- augmentation


def test_mixup_mixes_inputs_and_labels_with_the_same_lambda():
    rng = np.random.default_rng(0)
    B, S, K = 9, 50, 9
    x = torch.randn(B, S, dtype=torch.float64)
    y = torch.eye(K, dtype=torch.float64)[torch.randperm(K)]  # every clip a different class
    lam, partner = sample_mixup(B, alpha=10.0, prob=1.0, rng=rng)
    assert (partner != torch.arange(B)).all()  # a derangement: nobody mixes with itself
    assert sorted(partner.tolist()) == list(range(B))
    xm, ym = apply_mixup(x, y, lam, partner)
    lam64 = lam.double()
    torch.testing.assert_close(xm, lam64[:, None] * x + (1 - lam64[:, None]) * x[partner])
    # the weight of the clip's own class is λ and the partner's 1 - λ: the same λ as the input's
    own, other = y.argmax(1), y[partner].argmax(1)
    torch.testing.assert_close(ym[torch.arange(B), own], lam64)
    torch.testing.assert_close(ym[torch.arange(B), other], 1 - lam64)
    torch.testing.assert_close(ym.sum(1), torch.ones(B, dtype=torch.float64))
    # λ recovered from the inputs equals the label weight
    lam_from_x = ((xm - x[partner]) / (x - x[partner]))[:, 0]
    torch.testing.assert_close(lam_from_x, ym[torch.arange(B), own])
    assert ((lam > 0) & (lam < 1)).all() and (lam - 0.5).abs().max() < 0.45  # Beta(10, 10) is near 0.5


def test_mixup_probability():
    rng = np.random.default_rng(1)
    lam, _ = sample_mixup(4000, alpha=10.0, prob=0.3, rng=rng)
    assert (lam < 1).float().mean().item() == pytest.approx(0.3, abs=0.03)
    lam0, _ = sample_mixup(16, alpha=10.0, prob=0.0, rng=rng)
    x, y = torch.randn(16, 5), torch.rand(16, 3)
    xm, ym = apply_mixup(x, y, lam0, torch.randperm(16))
    assert torch.equal(xm, x) and torch.equal(ym, y)


def _band(mask_1d: torch.Tensor) -> tuple[int, int]:
    """(start, width) of the True run; asserts the run is contiguous."""
    idx = mask_1d.nonzero().flatten()
    if idx.numel() == 0:
        return 0, 0
    assert idx[-1] - idx[0] + 1 == idx.numel(), "mask band not contiguous"
    return int(idx[0]), int(idx.numel())


@pytest.mark.parametrize("freqm, timem", [(10, 20), (0, 7), (5, 0)])
def test_specaugment_masks_one_band_per_axis_within_the_widths(freqm, timem, seed):
    B, T, Fq = 64, 100, 40
    x = torch.rand(B, 1, T, Fq) + 1.0  # never 0, so 0 means masked
    out = SpecAugment(freqm, timem)(x)
    masked = out[:, 0] == 0  # [B, T, F]
    time_rows = masked.all(2)  # [B, T]
    freq_cols = masked.all(1)  # [B, F]
    widths_t, widths_f = [], []
    for b in range(B):
        _, wt = _band(time_rows[b])
        _, wf = _band(freq_cols[b])
        widths_t.append(wt)
        widths_f.append(wf)
        # nothing masked outside the two bands, and the rest untouched
        expected = time_rows[b][:, None] | freq_cols[b][None, :]
        assert torch.equal(masked[b], expected)
        assert torch.equal(out[b, 0][~expected], x[b, 0][~expected])
    assert max(widths_t) < max(timem, 1) and max(widths_f) < max(freqm, 1)
    if timem > 2:
        assert len(set(widths_t)) > 1  # independent per clip
    if freqm > 2:
        assert len(set(widths_f)) > 1


# --------------------------------------------------------------------------- sampling


def test_balanced_weights_are_sums_of_inverse_label_counts():
    rng = np.random.default_rng(2)
    targets = (rng.random((40, 7)) < 0.25).astype(np.float32)
    targets[0] = 0  # an unlabelled clip
    w = balanced_sample_weights(targets)
    counts = targets.sum(0)
    for i in range(40):
        assert w[i] == pytest.approx(sum(1.0 / counts[k] for k in np.flatnonzero(targets[i])))
    assert w[0] == 0
    ast = targets @ (1000.0 / (counts + 0.01))  # AST's weights: proportional up to the smoothing
    np.testing.assert_allclose(w[1:] / w[1:].sum(), ast[1:] / ast[1:].sum(), rtol=1e-3)


def test_weighted_sampler_follows_the_weights_and_splits_ranks():
    weights = [1.0, 3.0, 0.0, 6.0]
    ranks = [WeightedDistributedSampler(weights, 3000, rank=r, world_size=3, seed=5) for r in range(3)]
    for s in ranks:
        s.set_epoch(1)
    draws = [list(s) for s in ranks]
    assert all(len(d) == len(s) == 1000 for d, s in zip(draws, ranks))
    single = WeightedDistributedSampler(weights, 3000, seed=5)
    single.set_epoch(1)
    merged = [None] * 3000
    for r, d in enumerate(draws):
        merged[r::3] = d
    assert merged == list(single)  # the ranks partition one weighted draw
    freq = np.bincount(merged, minlength=4) / 3000
    np.testing.assert_allclose(freq, [0.1, 0.3, 0.0, 0.6], atol=0.03)
    single.set_epoch(2)
    assert list(single) != merged


# --------------------------------------------------------------------------- schedule


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


# --------------------------------------------------------------------------- labels, folds, metrics


def test_class_csv_maps_mids_and_names(tmp_path):
    path = tmp_path / "class_labels_indices.csv"
    path.write_text('index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/05zppz,"Male speech, man speaking"\n'
                    "2,/m/02zsn,Female speech\n")
    labels = read_class_csv(path)
    assert labels.names == ("Speech", "Male speech, man speaking", "Female speech")
    assert labels.encode(["/m/02zsn", "Speech"]) == [0, 2]
    with pytest.raises(ValueError, match="/m/nope"):
        labels.encode(["/m/nope"], "clip x")


def test_folds_from_names_folders_csv_and_stratified(tmp_path):
    esc = [AudioEntry(f"/d/audio/{f}-1000{i}-A-{i % 3}.wav", (f"c{i % 3}",)) for f in (1, 2, 3) for i in range(4)]
    folds = assign_folds(esc, 3)
    assert folds.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    us8k = [AudioEntry(f"/d/fold{f}/x{i}.wav", ("a",)) for f in (10, 2) for i in range(2)]
    assert assign_folds(us8k, 2, source="path").tolist() == [1, 1, 0, 0]  # numbers sorted: 2 → 0, 10 → 1
    meta = tmp_path / "meta.csv"
    meta.write_text("filename,fold,target\n" + "".join(
        f"{Path(e.path).name},{5 - int(Path(e.path).name[0])},0\n" for e in esc))
    assert assign_folds(esc, 3, fold_csv=str(meta)).tolist() == [2] * 4 + [1] * 4 + [0] * 4
    plain = [AudioEntry(f"/d/x{i}.wav", (f"c{i % 2}",)) for i in range(10)]
    folds = assign_folds(plain, 5, seed=3)
    assert np.bincount(folds).tolist() == [2] * 5
    with pytest.raises(ValueError, match="fold numbers"):
        assign_folds(esc, 5, source="path")


def test_evaluate_scores_per_class():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.7, 0.0]])
    value, per = evaluate_scores(scores, np.array([0, 1, 0]), multilabel=False)
    assert value == pytest.approx(2 / 3) and per == [0.5, 1.0, None]
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
    value, per = evaluate_scores(scores, targets, multilabel=True)
    assert per[2] is None and per[1] == pytest.approx(1.0) and per[0] == pytest.approx(1.0)
    assert value == pytest.approx(1.0)


@pytest.mark.parametrize("pool", ["tokens", "cls", "both"])
def test_model_pools_and_head(pool):
    backbone = build_backbone(img_size=(32, 32), patch_size=16, embed_dim=24, depth=1, num_heads=2)
    model = FinetuneModel(backbone, 5, pool)
    out = model(torch.randn(3, 1, 48, 32))  # other lengths than the positional grid work
    assert out.shape == (3, 5)
    assert isinstance(model.head[0], torch.nn.LayerNorm) and model.head[1].out_features == 5


# --------------------------------------------------------------------------- end to end


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
    entries = load_manifest(cache / "demo" / "manifest.csv")
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
    from asit.eval.finetune import FAULT_EPOCH_ENV

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


def test_resume_after_an_interrupted_epoch_is_exact(demo_encoder, tmp_path, monkeypatch):
    """Kill the run (an exception) in epoch 3, after epoch 2's resume point, resume with train.resume=true:
    the weights, AdamW state and results equal an uninterrupted run's, bit for bit. Mixup, SpecAugment,
    noise and weight averaging are on, so every RNG stream that a resume must restore is exercised."""
    from asit.eval.finetune import Finetuner

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


def test_resume_refuses_a_different_length_and_skips_finished_folds(demo_encoder, tmp_path, caplog):
    encoder, cache = demo_encoder
    out = tmp_path / "cv"
    extra = ("train.epochs=1", "data.val_manifest=null", "data.cv_folds=2", "train.max_steps_per_epoch=2",
             "train.average_start=null", "train.average_end=null", "train.resume=true")
    first = run_finetune(load_finetune_config("demo", _demo_overrides(encoder, cache, out, *extra)))
    (out / "fold_1" / "results.json").unlink()  # as if the run died during fold 1's evaluation
    with caplog.at_level("INFO", logger="asit.eval.finetune"):
        again = run_finetune(load_finetune_config("demo", _demo_overrides(encoder, cache, out, *extra)))
    assert "fold 0 already finished" in caplog.text
    assert again["value"] == first["value"] and again["folds"][0]["history"] == first["folds"][0]["history"]

    longer = load_finetune_config("demo", _demo_overrides(encoder, cache, out / "fold_1", "train.epochs=2",
                                                          "train.max_steps_per_epoch=2", "train.resume=true"))
    with pytest.raises(ValueError, match=r"cannot resume from .*last\.pt: .*train\.epochs: 1 there, 2 here"):
        run_finetune(longer)


def test_all_windows_evaluation_averages_the_scores_of_each_clip(tmp_path):
    """eval_windows=all: a clip of 2.5 windows is cut into 3 (the last one ending at the clip's end) and
    its score is the mean of the windows' scores, computed independently here with the model on each window."""
    import soundfile as sf
    import torch.nn as nn

    from asit.eval.finetune import Finetuner, LabelledClips, collate_clips

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


@pytest.mark.parametrize("length", [1, 599, 600, 601, 1199, 1200, 2401])
def test_all_windows_are_full_of_audio(tmp_path, length):
    """eval_windows=all: windows are consecutive slices of the clip from its start, except the last, which
    ends at the clip's end (overlapping the one before); only a clip shorter than a window is zero-padded."""
    import soundfile as sf

    from asit.eval.finetune import LabelledClips

    sr, n = 8000, 600
    wave = 0.1 + 0.5 * torch.rand(length)  # never 0, so a padded sample shows
    sf.write(tmp_path / "c.wav", wave.numpy(), sr, subtype="FLOAT")
    clips = LabelledClips([AudioEntry(str(tmp_path / "c.wav"), ("a",))], np.ones((1, 1), np.float32),
                          sample_rate=sr, num_samples=n, train=False, all_windows=True)
    windows = clips[0]["wave"]
    assert windows.shape == (max(1, -(-length // n)), n)
    if length <= n:
        assert torch.equal(windows[0, :length], wave) and not windows[0, length:].any()
    else:
        for k in range(windows.shape[0] - 1):
            assert torch.equal(windows[k], wave[k * n : (k + 1) * n]), k
        assert torch.equal(windows[-1], wave[-n:])


def test_balanced_sampler_gives_repeats_their_own_crops(tmp_path):
    """A clip drawn twice in one epoch (sampling with replacement) is cropped differently the second time;
    the first draw keeps the crop keyed on (seed, epoch, clip), and the ranks split one tagged draw."""
    import soundfile as sf

    from asit.eval.finetune import LabelledClips

    weights = [5.0, 1.0, 0.0, 2.0, 1.0]
    plain = WeightedDistributedSampler(weights, 39, seed=3)
    tagged = WeightedDistributedSampler(weights, 39, seed=3, tag_repeats=True)
    ranks = [WeightedDistributedSampler(weights, 39, rank=r, world_size=3, seed=3, tag_repeats=True) for r in range(3)]
    for s in (plain, tagged, *ranks):
        s.set_epoch(2)
    pairs = list(tagged)
    assert [i for i, _ in pairs] == list(plain)
    assert [r for _, r in pairs] == [[i for i, _ in pairs[:k]].count(i) for k, (i, _) in enumerate(pairs)]
    assert max(r for _, r in pairs) >= 1  # clip 0 (weight 5 of 9) is drawn many times
    merged = [None] * 39
    for r, s in enumerate(ranks):
        merged[r::3] = list(s)
    assert merged == pairs

    sr, n = 8000, 500
    sf.write(tmp_path / "c.wav", torch.randn(3 * n + 7).numpy(), sr, subtype="FLOAT")
    clips = LabelledClips([AudioEntry(str(tmp_path / "c.wav"), ("a",))], np.ones((1, 1), np.float32),
                          sample_rate=sr, num_samples=n, train=True, seed=11)
    clips.set_epoch(2)
    first = clips[0]["wave"]
    assert torch.equal(clips[(0, 0)]["wave"], first)
    assert not torch.equal(clips[(0, 1)]["wave"], first) and not torch.equal(clips[(0, 2)]["wave"], first)
    assert torch.equal(clips[(0, 1)]["wave"], clips[(0, 1)]["wave"])  # still reproducible (exact resume)


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


def test_labels_from_metadata_csv(tmp_path):
    entries = [AudioEntry(f"/d/audio/{i}.wav") for i in range(3)] + [AudioEntry("/d/audio/x.wav", ("kept",))]
    both = tmp_path / "both.csv"
    both.write_text("filename,fold,target,category\n0.wav,1,4,dog\n1.wav,2,7,rain\n2.wav,1,4,dog\n")
    assert [e.labels for e in labels_from_metadata(entries, str(both))] == [("dog",), ("rain",), ("dog",), ("kept",)]
    target_only = tmp_path / "target.csv"
    target_only.write_text("filename,fold,target\n0.wav,1,4\n1.wav,2,7\n2.wav,1,4\n")
    assert [e.labels for e in labels_from_metadata(entries, str(target_only))][:3] == [("4",), ("7",), ("4",)]
    no_labels = tmp_path / "folds.csv"
    no_labels.write_text("filename,fold\n0.wav,1\n")
    assert labels_from_metadata(entries, str(no_labels)) == entries  # nothing to take: unchanged
    partial = tmp_path / "partial.csv"
    partial.write_text("filename,fold,category\n0.wav,1,dog\n2.wav,1,\n")
    with pytest.raises(ValueError, match=r"partial\.csv: no 'category' for 2 unlabelled clip\(s\), e\.g\. /d/audio/1"):
        labels_from_metadata(entries, str(partial))


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
    with caplog.at_level("INFO", logger="asit.eval.finetune"):
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


def test_official_folds_are_never_replaced_silently(tmp_path, caplog):
    """A fold CSV that misses some clips is an error (auto and metadata), not a switch to stratified folds."""
    entries = [AudioEntry(f"/d/clip{i}.wav", (("dog", "rain")[i % 2],)) for i in range(11)]
    meta = tmp_path / "folds.csv"
    meta.write_text("filename,fold\n" + "".join(f"clip{i}.wav,{i // 2 + 1}\n" for i in range(10)))
    for source in ("auto", "metadata"):
        with pytest.raises(ValueError, match=r"folds\.csv: no fold for 1 of 11 clip\(s\), e\.g\. /d/clip10\.wav"):
            assign_folds(entries, 6, source=source, fold_csv=str(meta))
    with caplog.at_level("INFO", logger="asit.eval.finetune"):
        folds = assign_folds(entries[:10], 5, fold_csv=str(meta))
        assert folds.tolist() == [i // 2 for i in range(10)]
        assert "folds from metadata" in caplog.text
        caplog.clear()
        assign_folds(entries, 5, fold_csv=str(meta), source="stratified")
        assert "folds from stratified" in caplog.text


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


@pytest.mark.parametrize("old, new, start", [
    ((37, 8), (8, 8), (14, 0)),  # Speech Commands: 1 s of a 6 s window, SSAST's int(37/2) - int(8/2)
    ((37, 8), (32, 8), (2, 0)),  # ESC-50: 5 s
    ((7, 3), (4, 3), (1, 0)),
    ((7, 3), (6, 2), (0, 0)),
    ((5, 3), (5, 3), (0, 0)),
])
def test_fit_pos_embed_crop_keeps_the_centre_positions(old, new, start):
    D = 5
    pos = torch.randn(1, 1 + old[0] * old[1], D)
    out = fit_pos_embed(pos, new, old, "crop")
    grid = pos[:, 1:].reshape(1, *old, D)
    h, w = start
    assert out.shape == (1, 1 + new[0] * new[1], D)
    assert torch.equal(out[:, 0], pos[:, 0])  # [CLS] untouched
    assert torch.equal(out[:, 1:].reshape(1, *new, D), grid[:, h : h + new[0], w : w + new[1]])
    if new != old:
        assert not torch.allclose(fit_pos_embed(pos, new, old, "resample"), out)


def test_fit_pos_embed_crop_resamples_only_a_longer_axis():
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 1 + 7 * 3, 4)
    cut = torch.cat([pos[:, :1], pos[:, 1:].reshape(1, 7, 3, 4)[:, 1:5].reshape(1, 12, 4)], 1)  # time 7 -> 4
    torch.testing.assert_close(fit_pos_embed(pos, (4, 5), (7, 3), "crop"),
                               resample_abs_pos_embed(cut, new_size=(4, 5), old_size=(4, 3), num_prefix_tokens=1))
    torch.testing.assert_close(fit_pos_embed(pos, (9, 3), (7, 3), "crop"), fit_pos_embed(pos, (9, 3), (7, 3)))
    with pytest.raises(ValueError, match="mode"):
        fit_pos_embed(pos, (4, 3), (7, 3), "centre")


def test_crop_equals_a_model_built_for_the_shorter_input():
    """encode(..., pos_embed_fit='crop') on 4 of 7 time patches is exactly a ViT built for 4 time patches
    whose positional embedding is rows 1-4 of the pretraining one (SSAST builds its fine-tuning model so)."""
    torch.manual_seed(0)
    backbone = build_backbone(img_size=(112, 48), patch_size=16, embed_dim=24, depth=2, num_heads=2).eval()
    short = build_backbone(img_size=(64, 48), patch_size=16, embed_dim=24, depth=2, num_heads=2).eval()
    state = dict(backbone.state_dict())
    state["pos_embed"] = torch.cat([state["pos_embed"][:, :1],
                                    state["pos_embed"][:, 1:].reshape(1, 7, 3, 24)[:, 1:5].reshape(1, 12, 24)], 1)
    short.load_state_dict(state)
    x = torch.randn(3, 1, 64 + 9, 48)  # 9 trailing frames that fill no patch
    with torch.no_grad():
        want = short.forward_features(x[:, :, :64])
        torch.testing.assert_close(encode(backbone, x, pos_embed_fit="crop"), want)
        assert not torch.allclose(encode(backbone, x), want, atol=1e-3)  # resampling is another model
        full = torch.randn(2, 1, 112, 48)  # the pretraining grid: both are timm's forward
        torch.testing.assert_close(encode(backbone, full, pos_embed_fit="crop"), backbone.forward_features(full))
    model = FinetuneModel(backbone, 4, "tokens", "crop").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(want[:, 1:].mean(1)))
    with pytest.raises(ValueError, match="pos_embed_fit"):
        FinetuneModel(backbone, 4, "tokens", "cut")


def test_test_manifest_scores_the_reported_model(demo_encoder, tmp_path):
    """data.test_manifest: after training the best model (train.report=best, read from best.pt) is scored on
    the test clips; that is the reported value, the validation score stays as val_value. The saved best.pt
    reloads (load_finetuned_model) with its pooling and cropped positions. BCE and crop on, as in scv2."""
    from asit.eval.finetune import _resolve_manifest

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
