"""asit.finetune.config: the shipped presets, overrides and validation errors."""

from __future__ import annotations

import pytest

from asit.config import ConfigError
from asit.finetune import available_presets, load_finetune_config

pytestmark = pytest.mark.usefixtures("one_thread")


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
