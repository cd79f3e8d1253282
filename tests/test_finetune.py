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
    load_finetune_config,
    read_class_csv,
    run_finetune,
    sample_mixup,
)
from asit.models import build_backbone

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
    with the same weights and results as an uninterrupted run."""
    from asit.eval.finetune import FAULT_EPOCH_ENV

    encoder, cache = demo_encoder

    def run(out, *extra_args, fault=None):
        overrides = _demo_overrides(encoder, cache, out, "train.epochs=2", "train.max_steps_per_epoch=2",
                                    "augment.mixup_prob=0.5", "train.average_start=null", "train.average_end=null")
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
    """eval_windows=all: a clip of 2.5 windows is cut into 3 (the last zero-padded) and its score is the
    mean of the windows' scores, computed independently here with the model on each window."""
    import soundfile as sf
    import torch.nn as nn

    from asit.eval.finetune import Finetuner, LabelledClips, collate_clips

    sr, n = 8000, 8000
    g = torch.Generator().manual_seed(0)
    lengths = (n // 3, 2 * n + n // 2, n)
    rows = ["path,label"]
    for i, length in enumerate(lengths):
        sf.write(tmp_path / f"c{i}.wav", (0.3 * torch.randn(length, generator=g)).numpy(), sr, subtype="FLOAT")
        rows.append(f"c{i}.wav,{'ab'[i % 2]}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    entries = load_manifest(tmp_path / "m.csv")
    targets = np.eye(2, dtype=np.float32)[[0, 1, 0]]

    items = [LabelledClips(entries, targets, sample_rate=sr, num_samples=n, train=False, all_windows=True)[i]
             for i in range(3)]
    assert [x["wave"].shape for x in items] == [(1, n), (3, n), (1, n)]
    assert torch.equal(items[1]["wave"][2, n // 2 :], torch.zeros(n - n // 2))  # padded tail
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
