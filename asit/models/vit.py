"""The ViT encoder: timm's ``VisionTransformer`` configured for log-mel spectrograms.

Input layout is ``(B, 1, T, F)``: time is the image height, frequency the width. With the
default 592 x 128 input and 16 x 16 patches the token grid is 37 x 8 = 296 data tokens, plus
one [CLS] token in front. Parameter names are exactly timm's (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv``, ``norm``), so encoders load into timm
and other tools without a key-mapping script.

Attention runs through ``F.scaled_dot_product_attention`` (PyTorch picks its flash / cuDNN /
memory-efficient kernels on CUDA; ``attn_backend="sdpa_flash"`` or ``"sdpa_cudnn"`` holds it to one).
With ``attn_backend="flash_attn"`` each block's attention calls ``flash_attn.flash_attn_qkvpacked_func``
instead, for CUDA fp16/bf16 inputs; ``"naive"`` materialises the attention matrix as DINO's ViT (the
authors' code) does.

Two numerics switches of :func:`build_backbone`, both off by default and neither changing a parameter (a
checkpoint loads whatever their values): ``residual_dtype="bf16"`` keeps the residual stream in bf16 under
bf16 autocast (the tokens are cast once after the positional embedding, each block's LayerNorms take and
return bf16 with fp32 statistics, so the residual adds stay bf16; without it autocast's fp32 LayerNorms turn
the stream fp32 at every block); the final norm still returns fp32 as before. ``mlp_gelu="fused"`` makes the
MLP's GELU the tanh form and, where no gradient is taken (the teacher's forward, evaluation) on CUDA, runs
``fc1`` + GELU as one cuBLASLt GEMM with its GELU epilogue (``torch._addmm_activation``); with a gradient
``fc1`` and the tanh GELU run separately, since the epilogue does not return the pre-activation that the
GELU's backward needs (recomputing it costs a GEMM, more than the elementwise pass saved).
"""

from __future__ import annotations

import importlib.util
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, resample_abs_pos_embed
from timm.models.vision_transformer import Attention, VisionTransformer

__all__ = [
    "ATTN_BACKENDS",
    "VIT_PRESETS",
    "BF16StreamCast",
    "BF16StreamLayerNorm",
    "FP32LayerNorm",
    "FlashAttnAttention",
    "GeluTanhMlp",
    "MLP_GELUS",
    "NaiveAttention",
    "POS_EMBED_FITS",
    "RESIDUAL_DTYPES",
    "SdpaKernelAttention",
    "build_backbone",
    "encode",
    "fit_pos_embed",
    "flash_attn_available",
    "linear_gelu_tanh",
    "resolve_attn_backend",
    "token_grid",
]

VIT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}

ATTN_BACKENDS = ("auto", "sdpa", "flash_attn", "sdpa_flash", "sdpa_cudnn", "naive")

POS_EMBED_FITS = ("resample", "crop", "bicubic")

RESIDUAL_DTYPES = ("fp32", "bf16")

MLP_GELUS = ("separate", "fused")


def flash_attn_available() -> bool:
    """True when the ``flash_attn`` package can be imported."""
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_backend(attn_backend: str) -> str:
    """Map a name of :data:`ATTN_BACKENDS` to the backend actually used: ``"auto"`` is ``"flash_attn"`` when
    the package is installed, else ``"sdpa"``; the other names stand for themselves.

    Raises:
        ValueError: unknown name.
        ImportError: ``"flash_attn"`` requested explicitly but the package is not installed.
    """
    if attn_backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {attn_backend!r}")
    if attn_backend not in ("auto", "flash_attn"):
        return attn_backend
    available = flash_attn_available()
    if attn_backend == "flash_attn" and not available:
        raise ImportError(
            "attn_backend='flash_attn' was requested but the 'flash_attn' package is not installed; "
            "install it (pip install 'asit[flash]') or use attn_backend='sdpa' / 'auto'"
        )
    return "flash_attn" if available else "sdpa"


def _attention_out(attn: Attention, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """The tail of timm's ``Attention.forward`` after the heads are merged, ``x`` ``[B, N, H·Dh]``: its
    optional norm, the optional gate, the output projection and its dropout."""
    norm = getattr(attn, "norm", None)  # absent in older timm releases
    if norm is not None:
        x = norm(x)
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x))


class FlashAttnAttention(Attention):
    """timm ``Attention`` whose forward calls ``flash_attn_qkvpacked_func`` when it can.

    Same parameters and names as timm's ``Attention`` (it is only ever swapped in for an
    existing instance). The FlashAttention path is taken for CUDA fp16/bf16 inputs without an
    attention mask and without q/k normalisation; anything else falls back to timm's own
    forward (SDPA).
    """

    def _use_flash(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> bool:
        return (
            x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16)
            and attn_mask is None
            and not is_causal
            and isinstance(self.q_norm, nn.Identity)
            and isinstance(self.k_norm, nn.Identity)
        )

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,  # [B, N, D]
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:  # [B, N, D]
        if not self._use_flash(x, attn_mask, is_causal):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        from flash_attn import flash_attn_qkvpacked_func

        B, N, _ = x.shape
        attn_dim = self.num_heads * self.head_dim
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # [B, N, 3, H, Dh]
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = flash_attn_qkvpacked_func(qkv, dropout_p=dropout_p, softmax_scale=self.scale)  # [B, N, H, Dh]
        return _attention_out(self, x.reshape(B, N, attn_dim), gate)


class NaiveAttention(Attention):
    """timm ``Attention`` computed as DINO's ViT (the authors' code) does: the ``[B, H, N, N]`` attention
    matrix materialised, ``softmax((q·kᵀ)·scale)·v``. Under fp16/bf16 autocast the matmuls run in the low
    precision and the softmax in fp32 (autocast's rule for ``softmax``), as in the authors' runs. Same
    parameters and names as timm's ``Attention``; the benchmark's baseline, not a fast path."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,  # [B, N, D]
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:  # [B, N, D]
        if attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, Dh] each
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q @ k.transpose(-2, -1)) * self.scale  # [B, H, N, N]
        attn = self.attn_drop(attn.softmax(dim=-1))
        return _attention_out(self, (attn @ v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))


class SdpaKernelAttention(Attention):
    """timm ``Attention`` whose SDPA call is held to the kernels in ``sdpa_backends`` (a list of
    ``torch.nn.attention.SDPBackend``, set per instance by :func:`build_backbone`) on CUDA; on other devices
    PyTorch's own choice. Same parameters and names as timm's ``Attention``."""

    sdpa_backends: list = []

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,  # [B, N, D]
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:  # [B, N, D]
        if not (x.is_cuda and self.sdpa_backends):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.sdpa_backends):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)


def _bf16_autocast(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16


class BF16StreamCast(nn.Module):
    """Casts the token stream to bf16 once, where it enters the blocks (the backbone's ``norm_pre`` slot,
    after the positional embedding), when bf16 autocast is on for its device; otherwise the identity. No
    parameters: the state dict is the plain backbone's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D]
        if x.dtype == torch.float32 and _bf16_autocast(x.device.type):
            return x.to(torch.bfloat16)
        return x


class BF16StreamLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that keeps a bf16 input in bf16: outside autocast's fp32 rule, with its weight and
    bias cast to bf16; the statistics are accumulated in fp32 inside the kernel. Other inputs go through
    ``nn.LayerNorm`` as usual. Same parameters and names (only ever swapped in for an existing instance)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class FP32LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed in and returning fp32 whatever the input's dtype and autocast: the final norm
    after a bf16 stream, so the heads get fp32 tokens as with the default stream (CUDA autocast runs LayerNorm
    in fp32 anyway; the CPU's would return bf16). Same parameters and names as ``nn.LayerNorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``GELU_tanh(x·Wᵀ + b)`` for ``x`` ``[..., In]``, ``weight`` ``[Out, In]``, ``bias`` ``[Out]``.

    On CUDA without a gradient to take, one GEMM with cuBLASLt's GELU epilogue (``torch._addmm_activation``,
    whose CUDA GELU is the tanh form; on the CPU it computes the exact GELU, so it is not used there). With
    a gradient, the GEMM and ``F.gelu(approximate="tanh")`` separately: ``_addmm_activation`` has no
    derivative and does not return the pre-activation the GELU's backward reads."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    if x.is_cuda and not needs_grad:
        return _gelu_epilogue(x, weight, bias)
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def _epilogue_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the epilogue GEMM runs in: autocast's for ``x``'s device when autocast is on, as ``F.linear``
    would get (autocast has no rule for ``_addmm_activation``), else ``x``'s and ``weight``'s promoted dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


def _gelu_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x·Wᵀ + b`` with ``torch._addmm_activation``'s GELU (cuBLASLt's epilogue on CUDA: the tanh form), its
    operands cast to :func:`_epilogue_dtype` (a bf16 stream and fp32 weights, or the reverse, meet in one dtype)."""
    dtype = _epilogue_dtype(x, weight)
    with torch.autocast(x.device.type, enabled=False):
        out = torch._addmm_activation(bias.to(dtype), x.reshape(-1, x.shape[-1]).to(dtype), weight.to(dtype).t(),
                                      use_gelu=True)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class GeluTanhMlp(Mlp):
    """timm ``Mlp`` (``fc1``, GELU, ``fc2``) whose ``fc1`` + GELU is :func:`linear_gelu_tanh`: the tanh GELU,
    fused into the GEMM where no gradient is taken on CUDA. Same parameters and names as timm's ``Mlp``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D]
        x = linear_gelu_tanh(x, self.fc1.weight, self.fc1.bias)
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


def _swap_attention(attn: Attention, backend: str) -> None:
    """Give ``attn`` (timm's ``Attention``) the forward of ``backend``: same parameters, other class."""
    attn.fused_attn = True  # timm reads TIMM_FUSED_ATTN from the environment; we always want the SDPA path
    if type(attn) is not Attention:
        return
    if backend == "flash_attn":
        attn.__class__ = FlashAttnAttention
    elif backend == "naive":
        attn.__class__ = NaiveAttention
    elif backend in ("sdpa_flash", "sdpa_cudnn"):
        from torch.nn.attention import SDPBackend

        attn.__class__ = SdpaKernelAttention
        attn.sdpa_backends = [SDPBackend.FLASH_ATTENTION if backend == "sdpa_flash"
                              else SDPBackend.CUDNN_ATTENTION]


def build_backbone(
    *,
    img_size: tuple[int, int] = (592, 128),
    patch_size: int = 16,
    in_chans: int = 1,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.0,
    attn_backend: str = "sdpa",
    cls_token_std: float = 0.02,
    residual_dtype: str = "fp32",
    mlp_gelu: str = "separate",
) -> VisionTransformer:
    """Build the ViT encoder (timm ``VisionTransformer``, no classifier, no pooling).

    ``img_size`` is ``(T, F)`` and sets the size of the learned positional embedding; other
    input sizes work too (``dynamic_img_size``): the embedding is resampled to the current
    token grid, e.g. for the 192-frame local views of v2 (:func:`encode` can crop it instead).

    Args:
        attn_backend: ``"sdpa"`` (PyTorch SDPA), ``"flash_attn"`` (the flash-attn package;
            ImportError if missing), ``"auto"`` (flash-attn when importable, else SDPA), ``"sdpa_flash"`` /
            ``"sdpa_cudnn"`` (SDPA held to that kernel on CUDA) or ``"naive"`` (:class:`NaiveAttention`).
        cls_token_std: std of the truncated normal the [CLS] token starts from: 0.02 as the
            authors' (DINO's) ViT, 1e-6 as timm's.
        residual_dtype: ``"fp32"`` (autocast's own rules: the stream turns fp32 at each LayerNorm) or
            ``"bf16"`` (under bf16 autocast the stream stays bf16: :class:`BF16StreamCast` in ``norm_pre``,
            :class:`BF16StreamLayerNorm` as each block's norms; the final ``norm`` returns fp32 as before,
            :class:`FP32LayerNorm`).
        mlp_gelu: ``"separate"`` (timm's ``Mlp``, exact GELU) or ``"fused"`` (:class:`GeluTanhMlp`: tanh GELU,
            fused into ``fc1``'s GEMM where no gradient is taken on CUDA).
    """
    if not cls_token_std > 0:
        raise ValueError(f"cls_token_std must be > 0, got {cls_token_std}")
    if residual_dtype not in RESIDUAL_DTYPES:
        raise ValueError(f"residual_dtype must be one of {RESIDUAL_DTYPES}, got {residual_dtype!r}")
    if mlp_gelu not in MLP_GELUS:
        raise ValueError(f"mlp_gelu must be one of {MLP_GELUS}, got {mlp_gelu!r}")
    backend = resolve_attn_backend(attn_backend)
    model = VisionTransformer(
        img_size=tuple(img_size),
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=0,
        global_pool="",
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        class_token=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        dynamic_img_size=True,
        drop_path_rate=drop_path_rate,
    )
    if cls_token_std != 1e-6:  # timm draws it from N(0, 1e-6); the authors' ViT from a truncated N(0, 0.02)
        nn.init.trunc_normal_(model.cls_token, std=cls_token_std)
    for block in model.blocks:
        _swap_attention(block.attn, backend)
        if residual_dtype == "bf16":
            block.norm1.__class__ = block.norm2.__class__ = BF16StreamLayerNorm
        if mlp_gelu == "fused":
            if type(block.mlp) is not Mlp or not isinstance(block.mlp.act, nn.GELU):
                raise TypeError(f"mlp_gelu='fused' expects timm's Mlp with GELU, got {block.mlp}")
            block.mlp.__class__ = GeluTanhMlp
    if residual_dtype == "bf16":
        model.norm_pre = BF16StreamCast()  # timm's norm_pre is an Identity without pre_norm
        model.norm.__class__ = FP32LayerNorm
    return model


def _patch_size(backbone: VisionTransformer) -> tuple[int, int]:
    ph, pw = backbone.patch_embed.patch_size
    return int(ph), int(pw)


def token_grid(backbone: VisionTransformer, x: torch.Tensor) -> tuple[int, int]:
    """Token grid ``(gh, gw)`` for input ``x`` ``[B, C, T, F]``: ``(T // p, F // p)`` (floor)."""
    ph, pw = _patch_size(backbone)
    return x.shape[-2] // ph, x.shape[-1] // pw


def fit_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], old_grid: tuple[int, int], mode: str = "resample"
) -> torch.Tensor:
    """Fit a learned positional embedding ``[1, 1 + Gh·Gw, D]`` ([CLS] first) to a token grid ``(gh, gw)``.

    ``"resample"``: bicubic resampling of the whole grid with antialiasing (timm's ``dynamic_img_size``),
    so a shorter input sees every pretraining position, squeezed. ``"bicubic"``: the same without
    antialiasing (plain ``F.interpolate(mode="bicubic")``, as the authors' v2 code resizes its local
    views). ``"crop"``: along each axis with fewer tokens than
    the pretraining grid, keep the centre ``g`` positions, ``[G // 2 - g // 2, G // 2 - g // 2 + g)``
    (SSAST's and AST's "cut" for fine-tuning inputs shorter than pretraining); an axis with more tokens
    is still resampled. The [CLS] position is kept as it is.

    Returns:
        ``[1, 1 + gh·gw, D]``; ``pos_embed`` itself when the grids agree.
    """
    if mode not in POS_EMBED_FITS:
        raise ValueError(f"mode must be one of {POS_EMBED_FITS}, got {mode!r}")
    gh, gw = (int(g) for g in grid)
    Gh, Gw = (int(g) for g in old_grid)
    if mode == "crop" and (gh < Gh or gw < Gw):
        cls_pos, pos = pos_embed[:, :1], pos_embed[:, 1:].reshape(1, Gh, Gw, -1)  # [1, Gh, Gw, D]
        h0, w0 = (Gh // 2 - gh // 2 if gh < Gh else 0), (Gw // 2 - gw // 2 if gw < Gw else 0)
        pos = pos[:, h0 : h0 + min(gh, Gh), w0 : w0 + min(gw, Gw)]
        Gh, Gw = pos.shape[1:3]
        pos_embed = torch.cat([cls_pos, pos.reshape(1, Gh * Gw, -1)], dim=1)
    return resample_abs_pos_embed(pos_embed, new_size=(gh, gw), old_size=(Gh, Gw), num_prefix_tokens=1,
                                  antialias=mode != "bicubic")


def encode(backbone: VisionTransformer, x: torch.Tensor, *, pos_embed_fit: str = "resample") -> torch.Tensor:
    """Encode spectrograms into tokens after the final norm, [CLS] first.

    Args:
        x: ``[B, C, T, F]``. If ``T`` or ``F`` is not a multiple of the patch size the trailing
            rows/columns that do not fill a whole patch are dropped (the floor grid).
        pos_embed_fit: how the positional embedding meets a token grid other than the pretraining
            one, see :func:`fit_pos_embed`. ``"resample"`` is timm's own forward.

    Returns:
        ``[B, 1 + gh * gw, D]``; data tokens in row-major (time-major) order of the grid.
    """
    ph, pw = _patch_size(backbone)
    gh, gw = token_grid(backbone, x)
    if x.shape[-2] != gh * ph or x.shape[-1] != gw * pw:
        x = x[..., : gh * ph, : gw * pw]
    old_grid = tuple(backbone.patch_embed.grid_size)
    if pos_embed_fit == "resample" or (gh, gw) == old_grid:
        return backbone.forward_features(x)  # [B, 1+N, D]
    # timm's forward_features with the fitted embedding in place of its resampled one
    tokens = backbone.patch_embed(x)  # [B, gh, gw, D] (dynamic_img_size: channels last)
    B, D = tokens.shape[0], tokens.shape[-1]
    pos = fit_pos_embed(backbone.pos_embed, (gh, gw), old_grid, pos_embed_fit)  # [1, 1+N, D]
    tokens = torch.cat([backbone.cls_token.expand(B, -1, -1), tokens.reshape(B, gh * gw, D)], dim=1) + pos
    tokens = backbone.norm_pre(backbone.patch_drop(backbone.pos_drop(tokens)))
    return backbone.norm(backbone.blocks(tokens))  # [B, 1+N, D]
