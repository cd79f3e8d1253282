"""Typed configuration: dataclasses loaded from YAML recipes, with dotted command-line overrides.

``load_config("asit_vit_base", ["optim.lr=1e-4", "data.train_manifest=/data/as2m.json"])``
reads ``asit/configs/asit_vit_base.yaml`` (or any YAML path), applies the overrides and
validates every key and type. Unknown keys raise :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from asit.atomic_io import atomic_write_text

__all__ = [
    "Config", "ConfigError", "DataConfig", "EvalConfig", "GMMLConfig", "LossConfig", "ModelConfig", "OptimConfig",
    "TrainConfig", "available_recipes", "config_to_dict", "load_config", "rename_old_keys", "save_config",
]

log = logging.getLogger(__name__)

RECIPE_DIR = Path(__file__).parent / "configs"
# Mean and standard deviation of AudioSet's fbank values (the AST statistics); asit.data re-exports them.
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974


class ConfigError(ValueError):
    """A configuration key, value or file is invalid; the message names it."""


@dataclass
class DataConfig:
    """Where the audio comes from and how it becomes spectrogram views."""

    # JSON/CSV manifest, a folder of audio, "demo" (built-in synthetic set), or WebDataset shards:
    # "shards:/dir/prefix-{000000..000099}.tar", "shards:/dir" or a folder holding a shard index.json
    train_manifest: str = "demo"
    backend: Literal["torch", "dali"] = "torch"  # dali: NVIDIA DALI decodes and crops (pip install asit[dali])
    dali_fbank: Literal["torch", "dali"] = "torch"  # dali backend: Kaldi-exact fbank in torch, or DALI's own
    # torch backend: where the fbank is computed. loader: per clip in the DataLoader workers; device: the
    # workers send the waveform crops and the trainer computes the fbank of the whole batch on its device;
    # auto: device when training on CUDA in train.mode=fast, else loader
    fbank_on: Literal["auto", "loader", "device"] = "auto"
    # torch backend with loader workers: the workers write batches into pre-allocated shared memory
    # (asit.data.ring) instead of a new shared-memory segment per batch; auto: on when training on CUDA
    # in train.mode=fast from a manifest (not shards)
    batch_ring: Literal["auto", "enabled", "disabled"] = "auto"
    max_bad_fraction: float = 0.05  # stop when more than this fraction of an epoch's clips is unreadable
    shuffle_buffer: int = 256  # shards: clips in each worker's shuffle buffer
    sample_rate: int = 32000
    crop_seconds: float = 6.0
    num_views: int = 2
    num_mel_bins: int = 128
    target_frames: int = 592
    local_views: int = 0  # v2: extra clean short views that only enter the [CLS] loss
    local_crop_seconds: float = 2.0
    local_target_frames: int = 192
    mean: float = AUDIOSET_MEAN
    std: float = AUDIOSET_STD
    roll_prob: float = 0.5  # v1 random circular time shift
    roll_mode: Literal["clip", "view"] = "clip"  # the authors roll the whole clip once; "view": each crop
    # v2 cuts its local views from the clip zero-padded to crop_seconds; "clip": from the clip as it is
    local_crop_from: Literal["padded", "clip"] = "padded"
    num_workers: int = 4
    demo_clips: int = 240
    demo_seconds: float = 3.0
    cache_dir: str | None = None  # demo data location; default $ASIT_CACHE or ~/.cache/asit


@dataclass
class ModelConfig:
    """ViT backbone and heads (docs/design.md §1 'Model')."""

    arch: Literal["tiny", "small", "base"] = "base"
    embed_dim: int | None = None  # overrides of the arch preset (for small demo models)
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int = 16
    drop_path_rate: float = 0.1
    head_out_cls: int = 8192
    head_out_tokens: int | None = 1024  # None: the [CLS] head is shared by the tokens (v2)
    head_hidden: int = 2048
    head_bottleneck: int = 256
    trainable_g: bool = False
    recon_hidden: int = 768
    recon_out: int = 128
    # auto: flash_attn when installed, else SDPA (the naive attention in train.mode=authors); sdpa_flash /
    # sdpa_cudnn: SDPA held to that kernel on CUDA; naive: q·kᵀ, softmax, ·v materialised (DINO's ViT)
    attn_backend: Literal["auto", "sdpa", "flash_attn", "sdpa_flash", "sdpa_cudnn", "naive"] = "auto"
    # None: random weights. Otherwise an ImageNet ViT to start the backbone from (a timm model name, fetched
    # when online, or a checkpoint file), converted as the authors' v2 does (RGB kernels summed, grid resized)
    init: str | None = None
    cls_token_std: float = 0.02  # the authors' (DINO's) [CLS] initialisation; timm's is 1e-6
    # how shorter (local) views meet the positional embedding: "bicubic" as the authors (no antialiasing),
    # "resample" as timm's dynamic_img_size (antialiased)
    local_pos_embed: Literal["bicubic", "resample"] = "bicubic"
    # the residual stream's dtype under autocast: fp32 (autocast's LayerNorms return fp32) or bf16 (bf16
    # precision only: tokens cast once after the positional embedding, the blocks' LayerNorms in and out bf16)
    residual_dtype: Literal["fp32", "bf16"] = "fp32"
    # separate: exact GELU after fc1. fused: the tanh GELU, in fc1's GEMM epilogue (cuBLASLt) where no gradient
    # is taken on CUDA (the teacher's forward), a separate op elsewhere
    mlp_gelu: Literal["separate", "fused"] = "separate"


@dataclass
class GMMLConfig:
    """Group-masked corruption of the student input (docs/design.md §1 'GMML corruption')."""

    zero_ratio: tuple[float, float] = (0.5, 0.7)
    alien_ratio: float = 0.3
    alien_prob: float = 0.5
    max_block_frac: float = 0.3
    align: int = 1
    allow_self_alien: bool = False  # True reproduces the authors' defect (a sample may replace itself)
    # candidate blocks drawn per sample when the step runs sync-free (train.sync_free): a fixed number, so
    # no host check; a sample they do not cover to its target is counted (gmml_shortfall in the log)
    candidate_budget: int = 256


@dataclass
class LossConfig:
    """Self-distillation and reconstruction losses."""

    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    center_momentum: float = 0.9
    weight_global: float = 1.0
    weight_local: float = 1.0
    weight_recon: float = 2.0
    local_tokens: Literal["all", "corrupted"] = "all"  # "corrupted": the paper's Eq. 6
    global_pairs: Literal["v1", "v2"] = "v1"  # v2: all teacher-global × student-view pairs
    fused_head: bool = False  # local loss with the token output layer fused in (logits never whole)


@dataclass
class OptimConfig:
    """AdamW and its schedules (docs/design.md §1 'Optimisation')."""

    lr: float = 5e-4  # per 256 samples of global batch
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0  # 0 disables
    clip_mode: Literal["global", "per_param"] = "per_param"  # the authors' (DINO's) per-tensor clip; global: one norm
    freeze_last_layer_epochs: int = 1
    momentum_teacher: float = 0.996


@dataclass
class TrainConfig:
    """The run: length, precision, output, checkpoints."""

    epochs: int = 100
    batch_size: int = 32  # per process, >= 2
    max_steps_per_epoch: int | None = None  # cap for demos and tests
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    output_dir: str = "runs/asit"
    log_every: int = 10
    checkpoint_every_steps: int = 0  # 0: only at epoch ends
    # >0: also a checkpoint when this many minutes passed since the last one (rank 0's clock; 0: off)
    checkpoint_every_minutes: float = 0.0
    keep_last: int = 2  # the newest checkpoints kept (besides the permanent ones below)
    keep_every_steps: int = 0  # >0: checkpoints at multiples of this step are never pruned
    keep_every_epochs: int = 0  # >0: the checkpoint after every this many epochs is never pruned
    # resume from the latest good checkpoint when torchrun restarts the workers (TORCHELASTIC_RESTART_COUNT > 0)
    auto_resume: bool = True
    verify_replicas: bool = True  # at each checkpoint, hash the weights on every rank; stop if they differ
    image_every_epochs: int = 1
    progress: bool = True
    max_consecutive_nonfinite: int = 20  # stop after this many skipped (NaN/Inf) steps in a row
    # fast: GMML on the device, fused ops, torch.compile (CUDA), bf16. authors: the authors' step shape
    # (per-sample CPU GMML in the loader's collate, naive attention, eager PyTorch losses, no compile,
    # fp16 + scaler on CUDA, per-parameter clipping with host reads, per-tensor EMA, for-loop AdamW).
    # "reference" is read as "authors" (its old name), with a warning
    mode: Literal["fast", "authors"] = "fast"
    # the teacher's EMA: auto (per_tensor in authors mode, else foreach), per_tensor (a Python loop of
    # t.mul_(m).add_((1-m)·s), the authors'), foreach (two multi-tensor ops, or a lerp_ per tensor when the
    # momentum is a device tensor), fused (one multi-tensor lerp)
    ema: Literal["auto", "per_tensor", "foreach", "fused"] = "auto"
    teacher_bf16: bool = False  # the teacher's forward runs on a bf16 copy of its weights (bf16 precision only)
    compile: bool | None = None  # None: compile in fast mode on CUDA only
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # No host sync inside the step: GMML blocks from a fixed candidate budget, and the NaN/Inf guard applied
    # on the device (fused AdamW skips on its found_inf flag; teacher and centres keep their values), its
    # counters read back at log intervals, checkpoints and epoch ends. None: on in fast mode on CUDA
    # unless fp16 (whose loss scaler reads its overflow flag on the host). false: check every step.
    sync_free: bool | None = None
    # The whole sync-free step (GMML, forwards, losses, backward, clipping, AdamW, EMA, centres, guard) captured
    # as one CUDA graph after a few eager warm-up steps and replayed (asit.train.step_graph). Needs CUDA, fast
    # mode, sync-free, bf16/fp32, one process, a compile_mode without its own CUDA graphs. Off by default.
    cuda_graph: bool = False
    # the fused ops (GMML sampler and painter, distillation CE, masked L1): auto (Triton on CUDA, PyTorch on the
    # CPU) or reference (the ops' eager PyTorch twins everywhere, as in authors mode): the bench's on/off lever
    ops_backend: Literal["auto", "reference"] = "auto"


@dataclass
class EvalConfig:
    """Representation quality while pretraining (:mod:`asit.train.probe_monitor`): rank 0 embeds a small
    labelled set with the teacher's backbone and logs a weighted k-NN and a linear-probe accuracy."""

    # a single-label manifest (JSON/CSV, like data.train_manifest), "demo" (the built-in demo clips and their
    # classes, as data.demo_* make them), or null: no probe
    probe_manifest: str | None = None
    every_epochs: int = 1  # probe after every this many epochs, and after the last one
    knn_k: int = 20  # DINO's k-NN: the k most similar clips vote (leave-one-out)
    knn_temperature: float = 0.07  # each vote weighs exp(cosine similarity / T)
    linear_folds: int = 3  # stratified folds of the linear probe


@dataclass
class Config:
    """A whole pretraining recipe."""

    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    gmml: GMMLConfig = field(default_factory=GMMLConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a nested dict, rejecting unknown keys by name."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown config key '{full}' (valid keys here: {sorted(names)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        full = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], full)
        elif dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], {}, full)
    return cls(**kwargs)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def available_recipes() -> list[str]:
    """Names of the recipes shipped in ``asit/configs``."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_tree(source: str | Path | None, overrides: Sequence[str], *, recipe_dir: Path, kind: str,
              shipped: Callable[[], list[str]]) -> dict[str, Any]:
    """The raw nested dict of a config: a shipped name (``<recipe_dir>/<name>.yaml``) or a YAML path
    (None = empty), with ``section.key=value`` overrides applied (values parsed as YAML).

    Shared by :func:`load_config` and the fine-tuning presets; ``kind`` names the source in errors.
    """
    tree: dict[str, Any] = {}
    if source is not None:
        path = Path(source)
        if not path.suffix:
            path = recipe_dir / f"{source}.yaml"
            if not path.exists():
                raise ConfigError(f"unknown {kind} '{source}' (shipped: {', '.join(shipped())})")
        elif not path.exists():
            raise ConfigError(f"config file not found: {path}")
        tree = _read_yaml(path)
        tree.setdefault("name", path.stem)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': cannot parse value: {err}") from err
        _set_dotted(tree, key, value)
    return tree


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a recipe (shipped name or YAML path; None = defaults) and apply ``key=value`` overrides.

    Values in overrides are parsed as YAML (``optim.lr=1e-4``, ``model.head_out_tokens=null``,
    ``gmml.zero_ratio=[0.4,0.6]``).
    """
    tree = load_tree(recipe, overrides, recipe_dir=RECIPE_DIR, kind="recipe", shipped=available_recipes)
    cfg = _build(Config, rename_old_keys(tree))
    _validate(cfg)
    return cfg


def rename_old_keys(tree: dict[str, Any]) -> dict[str, Any]:
    """A config tree (from YAML or a checkpoint) with old value names replaced, each with a warning:
    ``train.mode=reference`` is ``train.mode=authors``. Changes ``tree`` in place and returns it."""
    train = tree.get("train") if isinstance(tree, dict) else None
    if isinstance(train, dict) and train.get("mode") == "reference":
        log.warning("train.mode=reference is now called train.mode=authors; reading it as authors")
        train["mode"] = "authors"
    return tree


def _validate_ranges(cfg: Config) -> None:
    """Value ranges of single keys (and the width/heads split), each message naming the key. Run before the
    cross-field checks of :func:`_validate`, which divide by ``model.patch_size``."""
    d, m, lo, o, e = cfg.data, cfg.model, cfg.loss, cfg.optim, cfg.eval
    counts = {"model.patch_size": m.patch_size, "model.embed_dim": m.embed_dim, "model.depth": m.depth,
              "model.num_heads": m.num_heads, "model.head_out_cls": m.head_out_cls,
              "model.head_out_tokens": m.head_out_tokens, "model.head_hidden": m.head_hidden,
              "model.head_bottleneck": m.head_bottleneck, "model.recon_hidden": m.recon_hidden,
              "model.recon_out": m.recon_out, "data.target_frames": d.target_frames,
              "data.num_mel_bins": d.num_mel_bins, "data.shuffle_buffer": d.shuffle_buffer}
    if d.local_views > 0:
        counts["data.local_target_frames"] = d.local_target_frames
    for key, value in counts.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    checks = [
        (all(0 <= b < 1 for b in o.betas), f"optim.betas must both be in [0, 1), got {list(o.betas)}"),
        (0 <= m.drop_path_rate < 1, f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}"),
        (m.cls_token_std > 0, f"model.cls_token_std must be > 0, got {m.cls_token_std}"),
        (m.init is None or m.init.strip() != "", "model.init must be a timm model name, a file or null"),
        (0 <= d.roll_prob <= 1, f"data.roll_prob must be in [0, 1], got {d.roll_prob}"),
        (d.local_views == 0 or d.local_crop_seconds > 0,
         f"data.local_crop_seconds must be > 0 when data.local_views > 0, got {d.local_crop_seconds}"),
        (d.demo_seconds > 0, f"data.demo_seconds must be > 0, got {d.demo_seconds}"),
        (e.probe_manifest is None or e.probe_manifest.strip() != "",
         "eval.probe_manifest must be a manifest path, demo or null (off)"),
        (e.every_epochs >= 1, f"eval.every_epochs must be >= 1, got {e.every_epochs}"),
        (e.knn_k >= 1, f"eval.knn_k must be >= 1, got {e.knn_k}"),
        (e.knn_temperature > 0, f"eval.knn_temperature must be > 0, got {e.knn_temperature}"),
        (e.linear_folds >= 2, f"eval.linear_folds must be >= 2, got {e.linear_folds}"),
    ]
    weights = {key: getattr(lo, key) for key in ("weight_global", "weight_local", "weight_recon")}
    for key, value in weights.items():
        checks.append((value >= 0, f"loss.{key} must be >= 0, got {value}"))
    checks.append((sum(weights.values()) > 0, "loss.weight_global/weight_local/weight_recon must not all be 0"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if m.embed_dim is not None or m.num_heads is not None:  # the presets themselves divide evenly
        from asit.models.vit import VIT_PRESETS  # lazy: torch and timm, only for overridden widths

        dim = m.embed_dim if m.embed_dim is not None else VIT_PRESETS[m.arch]["embed_dim"]
        heads = m.num_heads if m.num_heads is not None else VIT_PRESETS[m.arch]["num_heads"]
        if dim % heads:
            raise ConfigError(f"model.embed_dim ({dim}) must be a multiple of model.num_heads ({heads})")


def _validate(cfg: Config) -> None:
    """Cross-field checks that single field types cannot express."""
    _validate_ranges(cfg)
    d, m, t = cfg.data, cfg.model, cfg.train
    checks = [
        (d.sample_rate > 0, "data.sample_rate must be > 0"),
        (d.crop_seconds > 0, "data.crop_seconds must be > 0"),
        (d.num_views == 2, "data.num_views must be 2 (ASiT's two global views)"),
        (d.std > 0, "data.std must be > 0"),
        (d.target_frames % m.patch_size == 0, "data.target_frames must be a multiple of model.patch_size"),
        (d.num_mel_bins % m.patch_size == 0, "data.num_mel_bins must be a multiple of model.patch_size"),
        (d.local_views >= 0, "data.local_views must be >= 0"),
        (d.local_views == 0 or d.local_target_frames % m.patch_size == 0,
         "data.local_target_frames must be a multiple of model.patch_size"),
        (t.epochs > 0, "train.epochs must be > 0"),
        (0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction must be in [0, 1]"),
        (t.batch_size >= 2, "train.batch_size must be >= 2 per process (GMML's alien mode needs 2 clips)"),
        (t.seed >= 0, f"train.seed must be >= 0 (it seeds NumPy's SeedSequence), got {t.seed}"),
        (t.max_steps_per_epoch is None or t.max_steps_per_epoch > 0, "train.max_steps_per_epoch must be > 0"),
        (t.log_every > 0, "train.log_every must be > 0"),
        (t.keep_last >= 1, "train.keep_last must be >= 1"),
        (t.keep_every_steps >= 0 and t.keep_every_epochs >= 0, "train.keep_every_steps/epochs must be >= 0 (0: off)"),
        (cfg.loss.student_temp > 0 and cfg.loss.teacher_temp > 0 and cfg.loss.warmup_teacher_temp > 0,
         "loss temperatures must be > 0"),
        (0 <= cfg.loss.center_momentum <= 1, "loss.center_momentum must be in [0, 1]"),
        (0 <= cfg.optim.momentum_teacher <= 1, "optim.momentum_teacher must be in [0, 1]"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.clip_grad >= 0, "optim.clip_grad must be >= 0"),
        (cfg.optim.min_lr >= 0, "optim.min_lr must be >= 0"),
        (cfg.optim.weight_decay >= 0 and cfg.optim.weight_decay_end >= 0, "optim weight decays must be >= 0"),
        (cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
        (cfg.optim.freeze_last_layer_epochs >= 0, "optim.freeze_last_layer_epochs must be >= 0"),
        (cfg.loss.warmup_teacher_temp_epochs >= 0, "loss.warmup_teacher_temp_epochs must be >= 0"),
        (d.local_views == 0 or cfg.loss.global_pairs == "v2",
         "data.local_views > 0 needs loss.global_pairs=v2 (the v1 [CLS] loss ignores local views)"),
        (d.num_workers >= 0, "data.num_workers must be >= 0"),
        (d.demo_clips > 0, "data.demo_clips must be > 0"),
        (0 < cfg.gmml.zero_ratio[0] <= cfg.gmml.zero_ratio[1] <= 1,
         "gmml.zero_ratio must satisfy 0 < low <= high <= 1"),
        (0 < cfg.gmml.alien_ratio <= 1, "gmml.alien_ratio must be in (0, 1]"),
        (0 <= cfg.gmml.alien_prob <= 1, "gmml.alien_prob must be in [0, 1]"),
        (0 < cfg.gmml.max_block_frac <= 1, "gmml.max_block_frac must be in (0, 1]"),
        (cfg.gmml.align >= 1, "gmml.align must be >= 1"),
        (t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps must be >= 0 (0: epoch ends only)"),
        (t.checkpoint_every_minutes >= 0, "train.checkpoint_every_minutes must be >= 0 (0: off)"),
        (t.image_every_epochs >= 0, "train.image_every_epochs must be >= 0 (0: never)"),
        (t.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite must be >= 1"),
        (cfg.gmml.candidate_budget >= 1, "gmml.candidate_budget must be >= 1"),
        (not (d.fbank_on == "device" and t.mode == "authors"),
         "data.fbank_on=device contradicts train.mode=authors (its loader corrupts the fbank views)"),
        (not (d.fbank_on == "device" and d.backend == "dali"),
         "data.fbank_on applies to data.backend=torch (the DALI loader computes the fbank on the device)"),
        (not (d.batch_ring == "enabled" and (t.mode == "authors" or d.num_workers == 0 or d.backend == "dali"
                                        or d.train_manifest.startswith("shards:"))),
         "data.batch_ring=enabled needs loader workers (data.num_workers > 0), data.backend=torch, a manifest or "
         "folder (not shards) and train.mode=fast"),
        (not (cfg.loss.fused_head and t.mode == "authors"),
         "loss.fused_head=true contradicts train.mode=authors (the authors' output layer, then the loss)"),
        (not (t.sync_free and t.mode == "authors"),
         "train.sync_free=true contradicts train.mode=authors (the authors' per-step pipeline)"),
        (not (t.teacher_bf16 and t.precision in ("fp32", "fp16")),
         "train.teacher_bf16=true needs train.precision bf16 (or auto, which is bf16 on CUDA in fast mode)"),
        (not (m.residual_dtype == "bf16" and t.precision in ("fp32", "fp16")),
         "model.residual_dtype=bf16 needs train.precision bf16 (or auto, which is bf16 on CUDA in fast mode)"),
        (not (t.sync_free and t.precision == "fp16"),
         "train.sync_free=true needs train.precision bf16 or fp32: fp16's loss scaler reads its overflow flag "
         "on the host"),
    ]
    if t.cuda_graph:
        checks += [
            (t.mode == "fast", "train.cuda_graph=true needs train.mode=fast (the authors' step reads back every step)"),
            (t.device != "cpu", "train.cuda_graph=true needs a CUDA device, not train.device=cpu"),
            (t.sync_free is not False, "train.cuda_graph=true needs the sync-free step: train.sync_free=true or null"),
            (t.precision != "fp16", "train.cuda_graph=true needs train.precision bf16 or fp32 (not fp16: its loss "
             "scaler reads its overflow flag on the host)"),
            (t.compile_mode not in ("reduce-overhead", "max-autotune"),
             f"train.cuda_graph=true captures the step itself: train.compile_mode={t.compile_mode} would capture "
             "its own CUDA graphs inside it; use default or max-autotune-no-cudagraphs"),
        ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with :func:`load_config`), atomically."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
