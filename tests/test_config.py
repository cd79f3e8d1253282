"""Recipes, overrides and validation of ``asit.config``."""

from __future__ import annotations

import dataclasses

import pytest

from asit.config import Config, ConfigError, available_recipes, config_to_dict, load_config, save_config


def test_shipped_recipes_are_listed() -> None:
    assert set(available_recipes()) >= {"asit_vit_base", "asit_vit_small", "asit_v2_vit_base", "demo_cpu"}


@pytest.mark.parametrize("name", available_recipes())
def test_every_recipe_loads_and_names_itself(name: str) -> None:
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert cfg.name == name


def test_v1_base_values() -> None:
    cfg = load_config("asit_vit_base")
    d, m, lo, o, t = cfg.data, cfg.model, cfg.loss, cfg.optim, cfg.train
    assert d.sample_rate == 32000
    assert (d.target_frames, d.num_mel_bins) == (592, 128)
    assert d.crop_seconds == 6.0 and d.num_views == 2 and d.local_views == 0 and d.roll_prob == 0.5
    assert m.arch == "base" and m.patch_size == 16
    assert (m.head_out_cls, m.head_out_tokens) == (8192, 1024)
    assert (m.head_hidden, m.head_bottleneck, m.trainable_g) == (2048, 256, False)
    assert (m.recon_hidden, m.recon_out) == (768, 128)
    assert lo.student_temp == 0.1
    assert (lo.warmup_teacher_temp, lo.teacher_temp, lo.warmup_teacher_temp_epochs) == (0.04, 0.07, 30)
    assert (lo.weight_global, lo.weight_local, lo.weight_recon) == (1.0, 1.0, 2.0)
    assert lo.center_momentum == 0.9 and lo.global_pairs == "v1"
    assert o.lr == 5e-4 and o.min_lr == 1e-6 and o.warmup_epochs == 10
    assert (o.weight_decay, o.weight_decay_end) == (0.04, 0.4)
    assert o.clip_grad == 3.0 and o.freeze_last_layer_epochs == 1 and o.momentum_teacher == 0.996
    assert t.epochs == 100 and t.batch_size == 32
    assert cfg.gmml.zero_ratio == (0.5, 0.7) and cfg.gmml.alien_ratio == 0.3 and cfg.gmml.align == 1


def test_v2_base_values() -> None:
    cfg = load_config("asit_v2_vit_base")
    assert cfg.data.sample_rate == 16000
    assert cfg.data.local_views == 4 and cfg.data.local_target_frames == 192
    assert cfg.model.head_out_tokens is None and cfg.model.trainable_g is True
    assert (cfg.loss.weight_global, cfg.loss.weight_local, cfg.loss.weight_recon) == (0.5, 0.5, 1.0)
    assert cfg.loss.warmup_teacher_temp_epochs == 5 and cfg.loss.global_pairs == "v2"
    assert cfg.train.batch_size == 20 and cfg.train.precision == "fp32"
    assert cfg.model.recon_out == 768


def test_small_is_the_small_arch_with_v1_settings() -> None:
    small, base = load_config("asit_vit_small"), load_config("asit_vit_base")
    assert small.model.arch == "small"
    # apart from the arch (and names/paths) the recipes agree
    strip = {"name", "output_dir", "arch"}

    def flat(cfg: Config) -> dict:
        return {(sec, k): v for sec, vals in config_to_dict(cfg).items() if isinstance(vals, dict)
                for k, v in vals.items() if k not in strip}

    assert flat(small) == flat(base)


def test_defaults_equal_v1_base_for_the_method() -> None:
    """The dataclass defaults are the v1 values (the recipe spells them out)."""
    default, base = Config(), load_config("asit_vit_base")
    for section in ("model", "gmml", "loss", "optim"):
        assert getattr(default, section) == getattr(base, section), section


def test_dotted_overrides_scalars_lists_and_null() -> None:
    cfg = load_config("asit_vit_base", [
        "optim.lr=1e-4",  # YAML 1.1 reads this as a string: must still become a float
        "gmml.zero_ratio=[0.4, 0.6]",
        "optim.betas=[0.9,0.95]",
        "model.head_out_tokens=null",
        "train.max_steps_per_epoch=7",
        "train.progress=false",
        "data.train_manifest=/data/x.json",
        "name=mine",
    ])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.gmml.zero_ratio == (0.4, 0.6)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.head_out_tokens is None
    assert cfg.train.max_steps_per_epoch == 7
    assert cfg.train.progress is False
    assert cfg.data.train_manifest == "/data/x.json"
    assert cfg.name == "mine"
    # untouched values stay
    assert cfg.model.head_out_cls == 8192


def test_integer_is_accepted_for_a_float_field() -> None:
    assert load_config("demo_cpu", ["optim.clip_grad=2"]).optim.clip_grad == 2.0


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "optim.lrr"),
    ("model.head.out=3", "model.head"),
    ("nosection.x=1", "nosection"),
    ("trian.epochs=3", "trian"),
])
def test_unknown_keys_are_rejected_by_dotted_name(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("demo_cpu", [override])


def test_unknown_key_in_a_yaml_file_is_named(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n  warmup_epoch: 3\n")
    with pytest.raises(ConfigError, match="'optim.warmup_epoch'"):
        load_config(path)


@pytest.mark.parametrize("override, fragment", [
    ("train.epochs=1.5", "train.epochs"),
    ("train.epochs=ten", "train.epochs"),
    ("train.epochs=true", "train.epochs"),  # bool is not an int
    ("optim.lr=fast", "optim.lr"),
    ("train.progress=1", "train.progress"),
    ("train.precision=fp8", "train.precision"),
    ("gmml.zero_ratio=[0.5]", "gmml.zero_ratio"),
    ("gmml.zero_ratio=0.5", "gmml.zero_ratio"),
    ("model.head_out_tokens=many", "model.head_out_tokens"),
    ("data.train_manifest=[1, 2]", "data.train_manifest"),
    ("optim=3", "optim"),
    ("train.epochs.x=1", "train.epochs"),
])
def test_wrong_types_are_rejected_naming_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config("demo_cpu", [override])


@pytest.mark.parametrize("override", ["train.epochs", "=3", "  =3"])
def test_malformed_overrides(override: str) -> None:
    with pytest.raises(ConfigError):
        load_config("demo_cpu", [override])


@pytest.mark.parametrize("overrides, fragment", [
    (["data.target_frames=100"], "data.target_frames"),
    (["data.num_mel_bins=60"], "data.num_mel_bins"),
    (["data.local_views=2", "data.local_target_frames=100", "loss.global_pairs=v2"],
     "data.local_target_frames"),
    (["data.local_views=2", "loss.global_pairs=v1"], "loss.global_pairs=v2"),  # v1 pairs would ignore the local views
    (["data.num_views=3"], "data.num_views"),
    (["train.epochs=0"], "train.epochs"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.seed=-1"], "train.seed must be >= 0"),  # NumPy's SeedSequence would fail in the loader workers
    (["train.max_steps_per_epoch=0"], "train.max_steps_per_epoch"),
    (["train.keep_last=0"], "train.keep_last"),
    (["train.checkpoint_every_steps=-1"], "train.checkpoint_every_steps"),
    (["train.max_consecutive_nonfinite=0"], "train.max_consecutive_nonfinite"),
    (["loss.teacher_temp=0"], "temperatures"),
    (["loss.center_momentum=1.5"], "loss.center_momentum"),
    (["optim.momentum_teacher=-0.1"], "optim.momentum_teacher"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.clip_grad=-1"], "optim.clip_grad"),
    (["optim.warmup_epochs=-1"], "optim.warmup_epochs"),
    (["gmml.zero_ratio=[0.7, 0.5]"], "gmml.zero_ratio"),
    (["gmml.max_block_frac=0"], "gmml.max_block_frac"),
    (["data.std=0"], "data.std"),
])
def test_cross_field_errors(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config("demo_cpu", overrides)


@pytest.mark.parametrize("overrides, fragment", [
    (["model.patch_size=0"], "model.patch_size must be >= 1"),  # was a ZeroDivisionError in the checks
    (["model.patch_size=-16"], "model.patch_size must be >= 1"),
    (["model.head_out_cls=0"], "model.head_out_cls must be >= 1"),
    (["model.head_out_tokens=0"], "model.head_out_tokens must be >= 1"),
    (["model.depth=0"], "model.depth must be >= 1"),
    (["model.recon_out=0"], "model.recon_out must be >= 1"),
    (["data.target_frames=0"], "data.target_frames must be >= 1"),  # 0 is a multiple of the patch size
    (["model.num_heads=3"], r"model.embed_dim \(128\) must be a multiple of model.num_heads \(3\)"),
    (["model.arch=base", "model.embed_dim=null", "model.num_heads=5"], r"model.embed_dim \(768\)"),
    (["optim.betas=[1.5,0.9]"], r"optim.betas must both be in \[0, 1\)"),
    (["optim.betas=[0.9,1.0]"], "optim.betas"),
    (["model.drop_path_rate=1.5"], "model.drop_path_rate"),
    (["model.drop_path_rate=-0.1"], "model.drop_path_rate"),
    (["data.local_crop_seconds=0"], "data.local_crop_seconds must be > 0"),  # demo_cpu has local views
    (["data.roll_prob=1.5"], "data.roll_prob"),
    (["loss.weight_recon=-2"], "loss.weight_recon must be >= 0"),
    (["loss.weight_global=0", "loss.weight_local=0", "loss.weight_recon=0"], "must not all be 0"),
    (["train.batch_size=1"], "train.batch_size must be >= 2"),  # every batch would be skipped
])
def test_value_ranges_are_checked_naming_the_key(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config("demo_cpu", overrides)


def test_values_at_the_range_edges_are_accepted() -> None:
    cfg = load_config("demo_cpu", ["train.batch_size=2", "model.drop_path_rate=0", "data.roll_prob=1",
                                   "loss.weight_recon=0", "optim.betas=[0,0.999]", "model.num_heads=8"])
    assert cfg.train.batch_size == 2 and cfg.model.num_heads == 8
    # local views off: their crop length is not used, so not checked
    assert load_config("asit_vit_base", ["data.local_crop_seconds=0"]).data.local_views == 0


def test_unknown_recipe_and_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_none_recipe_gives_defaults() -> None:
    assert load_config(None) == Config()


def test_max_consecutive_nonfinite_default() -> None:
    assert Config().train.max_consecutive_nonfinite == 20


@pytest.mark.parametrize("name", available_recipes())
def test_save_then_load_round_trips(tmp_path, name: str) -> None:
    cfg = load_config(name, ["optim.lr=3e-4", "gmml.zero_ratio=[0.45, 0.65]", "model.head_out_tokens=null",
                             "train.max_steps_per_epoch=5"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    # and with an override on top of the saved file
    assert load_config(path, ["train.epochs=3"]).train.epochs == 3
