"""The ``teacher_encoder.safetensors`` file format: what an exported ASiT encoder holds and how it is written.

An encoder file is safetensors: the ViT backbone's tensors under timm's parameter names plus string
metadata (``format`` = :data:`ENCODER_FORMAT`, ``arch``, ``patch_size``, ``img_size``, ``sample_rate``,
``num_mel_bins``, fbank ``mean`` / ``std``, ``embed_dim``, ``depth``, ``num_heads``, the producer's
``config`` and ``step``). :func:`export_encoder` checks the tensors against the architecture they
describe and writes the file atomically; :func:`read_encoder_metadata` reads the metadata back and
:func:`backbone_spec` turns tensors plus metadata into the :func:`asit.models.build_backbone` arguments
that rebuild the model. Pretraining (``Pretrainer.export_teacher_encoder``), the checkpoint conversions
in :mod:`asit.encoder.interop`, :func:`asit.encoder.load_encoder`, fine-tuning, probing and HEAR all go
through this module; every error is an :class:`EncoderError` that names the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from asit.atomic_io import atomic_path
from asit.models import VIT_PRESETS, build_backbone

__all__ = ["ENCODER_FORMAT", "EncoderError", "backbone_spec", "export_encoder", "read_encoder_metadata"]

ENCODER_FORMAT = "asit-encoder-v1"


class EncoderError(ValueError):
    """An encoder file is missing, unreadable or inconsistent; the message names the file."""


def read_encoder_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Return the string metadata stored in an encoder safetensors file."""
    from safetensors import safe_open

    name = os.fspath(path)
    if not os.path.isfile(name):
        raise EncoderError(f"{name}: encoder file does not exist")
    try:
        with safe_open(name, framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise EncoderError(f"{name}: cannot read safetensors header: {exc}") from exc


def backbone_spec(state: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments of :func:`build_backbone` that reproduce the tensors in ``state``.

    Widths, depth, patch size and MLP ratio come from the tensor shapes. The number of heads is
    invisible in the shapes: it comes from the ``num_heads`` metadata (written by
    :func:`export_encoder`), else from the stored config's ``model.num_heads``, else from the
    ``arch`` preset when its width matches.
    """
    try:
        proj = state["patch_embed.proj.weight"]  # [D, C, p, p]
        fc1 = state["blocks.0.mlp.fc1.weight"]  # [hidden, D]
    except KeyError as exc:
        raise EncoderError(f"not a ViT state dict: missing {exc.args[0]!r}") from exc
    embed_dim, in_chans, ph, pw = (int(s) for s in proj.shape)
    if ph != pw:
        raise EncoderError(f"non-square patches {ph}x{pw} are not supported")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    config = json.loads(meta.get("config", "{}") or "{}")
    model_cfg = config.get("model") or {}
    num_heads = meta.get("num_heads") or model_cfg.get("num_heads")
    if num_heads is None:
        arch = meta.get("arch") or model_cfg.get("arch")
        preset = VIT_PRESETS.get(arch or "")
        if preset is None or preset["embed_dim"] != embed_dim:
            raise EncoderError(
                "cannot tell the number of attention heads: no num_heads metadata, no config.model.num_heads "
                f"and no preset with embed_dim={embed_dim}"
            )
        num_heads = preset["num_heads"]
    num_heads = int(num_heads)
    if num_heads <= 0 or embed_dim % num_heads:
        raise EncoderError(f"num_heads={num_heads} does not divide embed_dim={embed_dim}")
    if "img_size" in meta:
        img_size = tuple(int(v) for v in json.loads(meta["img_size"]))
    else:  # the positional grid alone does not say which side is time
        raise EncoderError("metadata has no img_size")
    return dict(
        img_size=img_size,
        patch_size=ph,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=fc1.shape[0] / embed_dim,
    )


def export_encoder(
    backbone: VisionTransformer | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    sample_rate: int,
    mean: float,
    std: float,
    img_size: tuple[int, int] | None = None,
    num_heads: int | None = None,
    arch: str = "custom",
    config: Mapping[str, Any] | None = None,
    step: int = 0,
) -> Path:
    """Write an encoder file that :func:`load_encoder`, fine-tuning, probing and HEAR read.

    The file is safetensors: the backbone's tensors under timm's names plus string metadata
    (``format``, ``arch``, ``patch_size``, ``img_size``, ``sample_rate``, ``num_mel_bins``,
    ``mean``, ``std``, ``embed_dim``, ``depth``, ``num_heads``, ``config``, ``step``). It is
    written to a temporary name and renamed, so a reader never sees half a file.

    Args:
        backbone: a ViT from :func:`asit.models.build_backbone`, or its state dict (then
            ``img_size`` and ``num_heads`` are required: neither shows in the tensor shapes).
        path: the output file (``.safetensors``).
        sample_rate: the rate the encoder expects; :meth:`AudioEncoder.embed` resamples to it.
        mean, std: the fbank statistics of its input normalisation ``(fbank - mean) / (2 std)``.
        img_size: ``(frames, mels)`` of one input window; read from ``backbone`` when it is a model.
        num_heads: attention heads; read from ``backbone`` when it is a model.
        arch: a name for the architecture (informational: the shapes and ``num_heads`` define it).
        config: JSON-serialisable description of where the weights come from (the trainer stores
            its resolved config).
        step: training step of the weights.

    Raises:
        EncoderError: the tensors do not form a ViT of the given size, or ``std <= 0``.
    """
    from safetensors.torch import save_file

    name = os.fspath(path)
    if isinstance(backbone, nn.Module):
        img_size = tuple(int(v) for v in backbone.patch_embed.img_size) if img_size is None else img_size
        num_heads = int(backbone.blocks[0].attn.num_heads) if num_heads is None else num_heads
        state = backbone.state_dict()
    else:
        if img_size is None or num_heads is None:
            raise EncoderError(f"{name}: exporting a state dict needs img_size and num_heads")
        state = dict(backbone)
    if not std > 0:
        raise EncoderError(f"{name}: std must be positive, got {std}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {
        "format": ENCODER_FORMAT,
        "arch": str(arch),
        "img_size": json.dumps([int(v) for v in img_size]),
        "sample_rate": str(int(sample_rate)),
        "num_mel_bins": str(int(img_size[1])),
        "mean": str(float(mean)),
        "std": str(float(std)),
        "num_heads": str(int(num_heads)),
        "config": json.dumps(dict(config or {})),
        "step": str(int(step)),
    }
    spec = backbone_spec(tensors, meta)
    with torch.device("meta"):  # check the names and shapes against the architecture, no memory needed
        reference = build_backbone(**spec).state_dict()
    if set(reference) != set(tensors) or any(reference[k].shape != tensors[k].shape for k in reference):
        missing, extra = sorted(set(reference) - set(tensors)), sorted(set(tensors) - set(reference))
        raise EncoderError(
            f"{name}: the tensors are not a ViT with {spec}: missing {missing[:5]}, unexpected {extra[:5]}"
            + ("" if missing or extra else ", shapes differ")
        )
    # the resolved width / depth / patch (an arch name alone is wrong when they were overridden)
    meta.update(patch_size=str(spec["patch_size"]), embed_dim=str(spec["embed_dim"]), depth=str(spec["depth"]))
    with atomic_path(name) as tmp:  # a unique temporary name, fsynced, then renamed
        save_file(tensors, str(tmp), metadata=meta)
    return Path(name)
