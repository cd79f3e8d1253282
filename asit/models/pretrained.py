"""Starting the encoder from an ImageNet ViT, converted the way the authors' v2 training does it.

The authors' v2 script starts ASiT from an ImageNet-trained ViT by default: the RGB patch
kernels are summed over the three colour channels into one spectrogram channel, and the
square positional grid (14 x 14 at 224 px) is resized to the spectrogram's token grid (37 x 8)
with plain bicubic interpolation. Everything else in the backbone (the [CLS] token, the blocks,
the final norm) is copied as it is; classifier heads are dropped.

The source is a timm checkpoint file (``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors``, a bare
state dict or one under ``"model"`` / ``"state_dict"``) or a timm model name, whose weights timm
fetches when the machine is online.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

__all__ = ["ImageNetInitError", "convert_imagenet_vit", "load_imagenet_init", "read_imagenet_state"]

log = logging.getLogger(__name__)

_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
_DROPPED_PREFIXES = ("head.", "head_dist.", "fc_norm.", "pre_logits.")


class ImageNetInitError(ValueError):
    """``model.init`` names weights that cannot be read or do not fit the backbone."""


def _looks_like_file(source: str) -> bool:
    return os.sep in source or source.endswith(_FILE_SUFFIXES) or Path(source).exists()


def _unwrap(state: Mapping[str, object]) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "module"):
        inner = state.get(key)
        if isinstance(inner, Mapping):
            state = inner
            break
    out = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            out[name.removeprefix("module.")] = value
    return out


def _fetch_timm(name: str) -> dict[str, torch.Tensor]:
    import timm

    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as err:  # offline, unknown tag, hub errors: all end in the same advice
        raise ImageNetInitError(
            f"model.init={name!r}: timm could not provide these weights ({type(err).__name__}: {err}). "
            f"On a machine without internet, save them where timm can fetch them, e.g. "
            f"python -c \"import timm, torch; torch.save(timm.create_model('{name}', pretrained=True)"
            f".state_dict(), '{name}.pth')\", copy the file here and set model.init=/path/to/{name}.pth "
            f"(or model.init=null to start from random weights)"
        ) from err
    return model.state_dict()


def read_imagenet_state(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the ImageNet ViT's state dict from a checkpoint file or a timm model name.

    Raises:
        ImageNetInitError: the file is missing or unreadable, or timm cannot fetch the model.
    """
    text = os.fspath(source)
    if not _looks_like_file(text):
        return _fetch_timm(text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise ImageNetInitError(f"model.init={text!r}: no such file (give a timm checkpoint file or a timm "
                                f"model name, or model.init=null for random weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ImageNetInitError(f"model.init={text!r}: cannot read the checkpoint ({err})") from err
    if not isinstance(state, Mapping):
        raise ImageNetInitError(f"model.init={text!r}: expected a state dict, got {type(state).__name__}")
    return _unwrap(state)


def _resize_grid(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[1, G*G, D]`` square grid → ``[1, gh*gw, D]`` by plain bicubic interpolation (no antialiasing)."""
    side = math.isqrt(pos.shape[1])
    if side * side != pos.shape[1]:
        raise ImageNetInitError(f"model.init: positional grid of {pos.shape[1]} tokens is not square")
    dim = pos.shape[-1]
    img = pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # [1, D, G, G]
    img = F.interpolate(img, size=grid, mode="bicubic", align_corners=False)  # [1, D, gh, gw]
    return img.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(pos.dtype)


def convert_imagenet_vit(state: Mapping[str, torch.Tensor], backbone: VisionTransformer) -> dict[str, torch.Tensor]:
    """Convert an ImageNet timm ViT state dict to ``backbone``'s layout, as the authors' v2 does.

    The patch kernel ``[D, 3, p, p]`` is summed over its input channels when the backbone takes one
    channel; the positional embedding keeps its [CLS] entry and has its square grid resized to the
    backbone's token grid by plain bicubic interpolation (a distillation token and its position are
    dropped); classifier keys are dropped.

    Raises:
        ImageNetInitError: missing keys, or shapes that do not fit the backbone (other width,
            depth or patch size).
    """
    target = backbone.state_dict()
    out: dict[str, torch.Tensor] = {}
    prefix = 2 if "dist_token" in state else 1
    for name, value in state.items():
        if name.startswith(_DROPPED_PREFIXES) or name == "dist_token":
            continue
        if name == "patch_embed.proj.weight" and value.ndim == 4:
            want = target[name].shape[1]
            if value.shape[1] != want and want == 1:
                value = value.sum(dim=1, keepdim=True)  # RGB kernels → one spectrogram channel
        elif name == "pos_embed":
            grid = tuple(int(g) for g in backbone.patch_embed.grid_size)
            value = torch.cat([value[:, :1], _resize_grid(value[:, prefix:], grid)], dim=1)
        out[name] = value
    missing = sorted(set(target) - set(out))
    if missing:
        raise ImageNetInitError(f"model.init: the checkpoint lacks {len(missing)} backbone tensors, "
                                f"e.g. {missing[:4]} (is it a timm ViT?)")
    unused = sorted(set(out) - set(target))
    if unused:
        log.info("model.init: ignoring %d tensors the backbone does not have, e.g. %s", len(unused), unused[:4])
    for name in list(out):
        if name not in target:
            del out[name]
        elif out[name].shape != target[name].shape:
            raise ImageNetInitError(f"model.init: {name} has shape {tuple(out[name].shape)} in the checkpoint "
                                    f"but {tuple(target[name].shape)} in this model (another ViT size or patch "
                                    f"size? model.arch must match the ImageNet model)")
    return out


def load_imagenet_init(backbone: VisionTransformer, source: str | os.PathLike) -> None:
    """Load an ImageNet ViT (checkpoint file or timm model name) into ``backbone``, converted by
    :func:`convert_imagenet_vit`. Raises :class:`ImageNetInitError` with advice when it cannot."""
    converted = convert_imagenet_vit(read_imagenet_state(source), backbone)
    with torch.no_grad():
        backbone.load_state_dict(converted, strict=True)
    log.info("backbone initialised from ImageNet weights %s", os.fspath(source))
