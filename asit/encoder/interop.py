"""Moving encoders in and out of asit: plain timm models and the ASiT authors' checkpoints.

Our backbone *is* a timm ``VisionTransformer`` with timm's parameter names, so export is a
strict ``load_state_dict``. The authors' checkpoints (DINO layout) hold ``student`` / ``teacher``
dicts whose keys carry a ``module.`` prefix (DDP; not always) and then ``backbone.`` for the ViT
(also timm/DINO names), next to ``head.*`` / ``head_cls.*`` / ``head_recons.*``; import strips the
prefixes and keeps the backbone. Their ``main_ASiT.py`` also saves its ``argparse.Namespace`` under
``args``: the file is read with ``torch.load(weights_only=True)`` allowing that one class.
:func:`export_authors_checkpoint` (and ``scripts/import_authors.py``) turns such a checkpoint into
an encoder file (:func:`asit.encoder.export_encoder`) that ``load_encoder``, fine-tuning,
probing and HEAR read.

The v2 checkpoint is used at 16 kHz and at least one wrapper feeds it frequency-first input
(``(B, 1, F, T)``). If it was trained that way its patch kernel and positional grid are the
transpose of ours; ``transpose_patches=True`` converts them to our time-first layout.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from asit.data import AUDIOSET_MEAN, AUDIOSET_STD
from asit.models import VIT_PRESETS, build_backbone

from .audio_encoder import AudioEncoder, load_encoder
from .format import EncoderError, export_encoder

__all__ = [
    "AUTHORS_SAMPLE_RATE",
    "export_authors_checkpoint",
    "import_authors_checkpoint",
    "load_authors_checkpoint",
    "to_timm",
    "transpose_patch_layout",
]

log = logging.getLogger(__name__)

# Sample rate each version of the authors' models was trained at (docs/design.md §1, v1 → v2 table).
AUTHORS_SAMPLE_RATE = {"v1": 32000, "v2": 16000}

_HEAD_PREFIXES = ("head.", "head_cls.", "head_recons.", "head_rec.", "recons_head.")


def to_timm(encoder: AudioEncoder | str | os.PathLike) -> VisionTransformer:
    """A plain timm ``VisionTransformer`` holding the encoder's weights (strict load).

    Built with ``img_size=(frames, mels)``, ``in_chans=1``, ``num_classes=0``, ``global_pool=''``,
    so ``model.forward_features(x)`` on ``(B, 1, frames, mels)`` returns ``[B, 1 + N, D]`` like
    :func:`asit.models.encode`. Nothing of asit is needed to use the result.
    """
    if not isinstance(encoder, AudioEncoder):
        encoder = load_encoder(encoder)
    src = encoder.backbone
    blocks = src.blocks
    model = VisionTransformer(
        img_size=(encoder.target_frames, encoder.num_mel_bins),
        patch_size=encoder.patch_size,
        in_chans=int(src.patch_embed.proj.in_channels),
        num_classes=0,
        global_pool="",
        embed_dim=encoder.embed_dim,
        depth=len(blocks),
        num_heads=int(blocks[0].attn.num_heads),
        mlp_ratio=blocks[0].mlp.fc1.out_features / encoder.embed_dim,
        qkv_bias=blocks[0].attn.qkv.bias is not None,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    model.load_state_dict(src.state_dict(), strict=True)
    return model.eval()


def transpose_patch_layout(
    state: Mapping[str, torch.Tensor], grid: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """Convert a frequency-first ViT state dict to our time-first layout.

    Args:
        state: backbone state dict trained on ``(B, C, F, T)`` input.
        grid: ``(gt, gf)`` our token grid (time patches, frequency patches); the source grid
            of ``pos_embed`` is ``(gf, gt)``.

    The patch kernel ``[D, C, pF, pT]`` becomes ``[D, C, pT, pF]`` and the positional grid
    ``(gf × gt)`` is transposed to ``(gt × gf)``; the [CLS] position stays first.
    """
    out = dict(state)
    out["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].transpose(-1, -2).contiguous()
    pos = state["pos_embed"]  # [1, 1 + gf·gt, D]
    gt, gf = grid
    if pos.shape[1] != 1 + gt * gf:
        raise ValueError(f"pos_embed has {pos.shape[1]} positions, expected 1 + {gf}·{gt} for grid {grid}")
    cls_pos, grid_pos = pos[:, :1], pos[:, 1:]
    grid_pos = grid_pos.reshape(1, gf, gt, -1).transpose(1, 2).reshape(1, gt * gf, -1)
    out["pos_embed"] = torch.cat([cls_pos, grid_pos], dim=1).contiguous()
    return out


def load_authors_checkpoint(path: str | os.PathLike) -> dict[str, object]:
    """Read an authors' checkpoint file with ``torch.load(weights_only=True)``.

    The weights-only unpickler accepts tensors and plain containers; ``argparse.Namespace`` (the
    ``args`` entry ``main_ASiT.py`` saves, as DINO does) is allowed too. Anything else is refused
    rather than executed.

    Raises:
        EncoderError: the file is missing, is not a PyTorch checkpoint, or holds other objects
            (the message names the file; load a file you trust yourself and pass the dict).
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise EncoderError(f"{name}: checkpoint file does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            raw = torch.load(name, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip), EOFError, ... : all mean "unreadable"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EncoderError(
            f"{name}: cannot read it with torch.load(weights_only=True) ({type(exc).__name__}: {first}). "
            "If you trust the file, load it with torch.load(..., weights_only=False) and pass the dict instead."
        ) from exc
    if not isinstance(raw, Mapping):
        raise EncoderError(f"{name}: holds a {type(raw).__name__}, not a checkpoint dict")
    return dict(raw)


def _authors_num_heads(raw: Mapping[str, object], embed_dim: int, where: str) -> int:
    """Heads of the authors' ViT: their ``args.arch`` (``vit_small``, ``vit_base``...) when saved and
    consistent with the width, else the one preset of that width."""
    args = raw.get("args")
    arch = args.get("arch") if isinstance(args, Mapping) else getattr(args, "arch", None)
    preset = VIT_PRESETS.get(str(arch).removeprefix("vit_")) if arch else None
    if preset is not None and preset["embed_dim"] == embed_dim:
        return preset["num_heads"]
    by_width = [p for p in VIT_PRESETS.values() if p["embed_dim"] == embed_dim]
    if len(by_width) == 1:
        return by_width[0]["num_heads"]
    raise EncoderError(
        f"{where}: cannot tell the number of attention heads of a {embed_dim}-wide ViT; "
        "give num_heads (scripts/import_authors.py: --num-heads)"
    )


def export_authors_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, object],
    out: str | os.PathLike,
    *,
    which: Literal["teacher", "student"] = "teacher",
    version: Literal["v1", "v2"] = "v1",
    transpose_patches: bool = False,
    img_size: tuple[int, int] = (592, 128),
    num_heads: int | None = None,
    sample_rate: int | None = None,
    mean: float = AUDIOSET_MEAN,
    std: float = AUDIOSET_STD,
) -> Path:
    """Turn an authors' checkpoint into an asit encoder file (what ``scripts/import_authors.py`` does).

    The backbone comes from :func:`import_authors_checkpoint` and is written by
    :func:`asit.encoder.export_encoder`, so :func:`load_encoder`, ``scripts/finetune.py``,
    ``scripts/linear_probe.py``, ``scripts/extract.py`` and :mod:`asit.hear` accept the result.

    Args:
        checkpoint, which, version, transpose_patches, img_size: see :func:`import_authors_checkpoint`.
        out: the ``.safetensors`` file to write.
        num_heads: attention heads; default: from the checkpoint's ``args.arch``, else the preset
            of the same width (384 → 6, 768 → 12).
        sample_rate: default :data:`AUTHORS_SAMPLE_RATE` of ``version`` (v1 32 kHz, v2 16 kHz).
        mean, std: the fbank statistics the model was trained with (default AudioSet's, as the
            authors used).

    Returns:
        the written path.
    """
    where = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "<state dict>"
    raw = load_authors_checkpoint(where) if isinstance(checkpoint, (str, os.PathLike)) else dict(checkpoint)
    state = import_authors_checkpoint(
        raw, which=which, version=version, transpose_patches=transpose_patches, img_size=img_size,
        num_heads=num_heads,
    )
    embed_dim = int(state["patch_embed.proj.weight"].shape[0])
    heads = num_heads if num_heads is not None else _authors_num_heads(raw, embed_dim, where)
    source = {"checkpoint": where, "which": which, "version": version, "transpose_patches": transpose_patches}
    if isinstance(raw.get("epoch"), int):
        source["epoch"] = raw["epoch"]
    return export_encoder(
        state,
        out,
        sample_rate=sample_rate if sample_rate is not None else AUTHORS_SAMPLE_RATE[version],
        mean=mean,
        std=std,
        img_size=img_size,
        num_heads=heads,
        arch=f"authors-{version}",
        config={"source": source, "model": {"num_heads": heads}},
        step=0,
    )


def import_authors_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, object],
    *,
    which: Literal["teacher", "student"] = "teacher",
    version: Literal["v1", "v2"] = "v1",
    transpose_patches: bool = False,
    img_size: tuple[int, int] = (592, 128),
    num_heads: int | None = None,
) -> dict[str, torch.Tensor]:
    """Backbone weights of an ASiT authors' checkpoint, in our (timm) names and layout.

    Args:
        checkpoint: a path (read by :func:`load_authors_checkpoint`) or an already loaded dict:
            either the full checkpoint with ``student`` / ``teacher`` entries or one of those dicts.
        which: the network to take; the paper fine-tunes the teacher.
        version: ``"v1"`` (32 kHz) or ``"v2"`` (16 kHz). ``transpose_patches`` is only
            accepted for v2, the checkpoint that is fed frequency-first by others.
        transpose_patches: the weights expect ``(F, T)`` input; convert them to ``(T, F)``.
        img_size: our ``(frames, mels)`` input, which fixes the positional grid.
        num_heads: used only to build the reference backbone whose keys and shapes are checked
            (any divisor of the width gives the same shapes).

    Raises:
        EncoderError: the file cannot be read, no backbone keys, or keys/shapes that do not match
            our backbone.
    """
    if version not in AUTHORS_SAMPLE_RATE:
        raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
    if transpose_patches and version != "v2":
        raise ValueError("transpose_patches applies to the v2 checkpoint only")
    where = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "<state dict>"
    raw = load_authors_checkpoint(where) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    net = raw.get(which, raw) if isinstance(raw, Mapping) else None
    if not isinstance(net, Mapping):
        raise EncoderError(f"{where}: no {which!r} state dict in the checkpoint")

    state: dict[str, torch.Tensor] = {}
    dropped = []
    for key, value in net.items():
        name = key.removeprefix("module.")
        if name.startswith("backbone."):
            state[name.removeprefix("backbone.")] = value
        elif not name.startswith(_HEAD_PREFIXES):
            dropped.append(key)
    if dropped:
        log.warning(
            "%s: ignoring %d keys that are neither backbone nor head: %s", where, len(dropped), dropped[:5]
        )
    if not state:
        raise EncoderError(f"{where}: no 'backbone.' keys in the {which!r} dict (keys like {list(net)[:3]})")

    try:
        proj = state["patch_embed.proj.weight"]
    except KeyError as exc:
        raise EncoderError(f"{where}: backbone has no patch_embed.proj.weight") from exc
    patch = int(proj.shape[-1])
    grid = (img_size[0] // patch, img_size[1] // patch)
    if transpose_patches:
        state = transpose_patch_layout(state, grid)
    _check_against_backbone(state, img_size, num_heads, where)
    return state


def _check_against_backbone(
    state: dict[str, torch.Tensor], img_size: tuple[int, int], num_heads: int | None, where: str
) -> None:
    """Build our backbone with the same widths and compare keys and shapes (extra keys are dropped)."""
    proj = state["patch_embed.proj.weight"]
    embed_dim, in_chans, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[-1])
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    if depth == 0:
        raise EncoderError(f"{where}: backbone has no transformer blocks")
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    with torch.device("meta"):  # shapes only, no memory or init time
        ref = build_backbone(
            img_size=img_size,
            patch_size=patch,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads or 1,
            mlp_ratio=mlp_ratio,
        ).state_dict()
    extra = sorted(set(state) - set(ref))
    for key in extra:  # e.g. the authors' mask token: not part of the encoder
        del state[key]
    if extra:
        log.warning("%s: dropping backbone keys our ViT does not have: %s", where, extra)
    missing = sorted(set(ref) - set(state))
    if missing:
        raise EncoderError(f"{where}: backbone lacks {len(missing)} keys of our ViT, e.g. {missing[:5]}")
    bad = [(k, tuple(state[k].shape), tuple(ref[k].shape)) for k in ref if state[k].shape != ref[k].shape]
    if bad:
        raise EncoderError(
            f"{where}: shape mismatch (key, checkpoint, expected for img_size={img_size}): {bad[:5]}"
        )
