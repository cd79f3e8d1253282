"""The ASiT model (encoder + projection head + reconstruction head) and the student/teacher pair."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .heads import ProjectionHead, ReconstructionHead
from .pretrained import load_imagenet_init
from .vit import POS_EMBED_FITS, VIT_PRESETS, build_backbone, encode, token_grid

__all__ = ["EMA_KINDS", "ASiTModel", "StudentTeacher", "build_asit", "unwrap_model"]

EMA_KINDS = ("per_tensor", "foreach", "fused")


def unwrap_model(module: nn.Module) -> nn.Module:
    """Strip ``DistributedDataParallel`` (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


class ASiTModel(nn.Module):
    """ViT encoder whose output tokens feed a projection head and (optionally) a reconstruction head.

    State-dict prefixes are ``backbone.``, ``head.`` and ``recon_head.`` (the authors' checkpoints
    use ``backbone.``, ``head.`` and ``head_recons.``). ``pos_embed_fit`` says how the positional
    embedding meets inputs of another length than the pretraining views, e.g. v2's local views
    (:func:`asit.models.fit_pos_embed`). ``token_logits=False`` makes :meth:`forward` return the data
    tokens' bottleneck features and output weight instead of their logits, for a loss that fuses the
    output layer (``loss.fused_head``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: ProjectionHead,
        recon_head: ReconstructionHead | None = None,
        *,
        pos_embed_fit: str = "bicubic",
        token_logits: bool = True,
    ) -> None:
        super().__init__()
        if pos_embed_fit not in POS_EMBED_FITS:
            raise ValueError(f"pos_embed_fit must be one of {POS_EMBED_FITS}, got {pos_embed_fit!r}")
        self.backbone = backbone
        self.head = head
        self.recon_head = recon_head
        self.pos_embed_fit = pos_embed_fit
        self.token_logits = token_logits

    def forward(self, x: torch.Tensor, *, with_recon: bool = True,
                token_logits: bool | None = None) -> dict[str, torch.Tensor | None]:
        """Args:
            x: spectrograms ``[B, 1, T, F]``. ``T`` and ``F`` need not be multiples of the patch
                size ``p``: trailing rows/columns that do not fill a patch are ignored, and the
                reconstruction covers the floor grid only, ``T' = (T // p) * p``, ``F' = (F // p) * p``.
            with_recon: set False to skip the reconstruction head (e.g. for clean local views).
            token_logits: None follows the model's ``token_logits`` setting.

        Returns: dict with ``cls_logits [B, K_cls]``, ``recon [B, 1, T', F']`` (None without a
        reconstruction head or with ``with_recon=False``), ``tokens [B, 1+N, D]`` (encoder output,
        [CLS] first) and either ``token_logits [B, N, K_tok]`` or, with ``token_logits=False``,
        ``token_embed [B, N, Db]`` and ``token_weight [K_tok, Db]`` (``token_logits = token_embed · token_weightᵀ``).
        """
        tokens = encode(self.backbone, x, pos_embed_fit=self.pos_embed_fit)  # [B, 1+N, D]
        if token_logits is None:
            token_logits = self.token_logits
        if token_logits:
            cls_logits, logits = self.head(tokens)  # [B, Kc], [B, N, Kt]
            out = dict(cls_logits=cls_logits, token_logits=logits)
        else:
            cls_logits, token_embed, token_weight = self.head.features(tokens)  # [B, Kc], [B, N, Db], [Kt, Db]
            out = dict(cls_logits=cls_logits, token_embed=token_embed, token_weight=token_weight)
        recon = None
        if with_recon and self.recon_head is not None:
            recon = self.recon_head(tokens[:, 1:], token_grid(self.backbone, x))  # [B, 1, T', F']
        return dict(out, recon=recon, tokens=tokens)


class StudentTeacher(nn.Module):
    """Student and EMA teacher.

    On construction the student's weights (backbone + projection head, and buffers) are copied
    into the teacher, the teacher gets ``requires_grad_(False)`` and stays in eval mode whatever
    ``train()`` is called with. The teacher should be built with ``drop_path_rate=0`` and may
    have no reconstruction head; the student's reconstruction head is never averaged.

    DDP / torch.compile: pass the plain student (a wrapped one is unwrapped here; the wrapper
    itself is not stored). Wrap ``self.student`` in DDP afterwards and keep the wrapper in the
    engine: DDP shares the parameters, so ``update_teacher`` still sees the trained weights.
    Under DDP build the pair identically on every rank (same seed) or broadcast afterwards.

    :meth:`configure_ema` picks how the EMA runs (``ema``) and may keep a low-precision copy of the teacher
    (``teacher_copy``, not a submodule: not in the state dict) that :meth:`update_teacher` refreshes, for a
    teacher forward that reads bf16 weights without autocast's per-step casts.
    """

    _SKIP_PREFIX = "recon_head."

    def __init__(self, student: ASiTModel, teacher: ASiTModel) -> None:
        super().__init__()
        self.student = unwrap_model(student)
        self.teacher = unwrap_model(teacher)
        self._pairs_built = False
        self.ema = "foreach"
        self.teacher_copy: ASiTModel | None = None
        self._copy_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._student_params: list[torch.Tensor] = []
        self._teacher_params: list[torch.Tensor] = []
        self._student_buffers: list[torch.Tensor] = []
        self._teacher_buffers: list[torch.Tensor] = []
        self._build_pairs()
        self.teacher.requires_grad_(False)
        with torch.no_grad():
            self._copy_all()
        self.teacher.eval()

    def _build_pairs(self) -> None:
        """Match student and teacher tensors by name once (backbone + head, recon head skipped)."""

        def pair(student_named, teacher_named, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            s_map = {n: t for n, t in student_named if not n.startswith(self._SKIP_PREFIX)}
            t_map = {n: t for n, t in teacher_named if not n.startswith(self._SKIP_PREFIX)}
            if s_map.keys() != t_map.keys():
                diff = sorted(s_map.keys() ^ t_map.keys())
                raise ValueError(f"student and teacher {kind} differ: {diff[:8]}")
            names = list(s_map)
            for n in names:
                if s_map[n].shape != t_map[n].shape:
                    raise ValueError(
                        f"{kind} {n!r}: student {tuple(s_map[n].shape)} != teacher {tuple(t_map[n].shape)}"
                    )
            return [s_map[n] for n in names], [t_map[n] for n in names]

        self._student_params, self._teacher_params = pair(
            self.student.named_parameters(), self.teacher.named_parameters(), "parameters"
        )
        self._student_buffers, self._teacher_buffers = pair(
            self.student.named_buffers(), self.teacher.named_buffers(), "buffers"
        )
        self._pairs_built = True
        if self.teacher_copy is not None:
            src = [*self.teacher.parameters(), *self.teacher.buffers()]
            dst = [*self.teacher_copy.parameters(), *self.teacher_copy.buffers()]
            self._copy_pairs = (dst, src)

    def configure_ema(self, kind: str = "foreach", *, teacher_dtype: torch.dtype | None = None) -> None:
        """How :meth:`update_teacher` averages, and whether a ``teacher_dtype`` copy of the teacher is kept.

        Args:
            kind: ``"per_tensor"`` (a Python loop of ``t.mul_(m).add_((1 - m) * s)``, the authors' DINO
                update), ``"foreach"`` (two multi-tensor ops; one ``lerp_`` per tensor when the momentum is
                a device tensor) or ``"fused"`` (one multi-tensor ``lerp``).
            teacher_dtype: None (no copy) or e.g. ``torch.bfloat16``: ``teacher_copy`` holds the teacher's
                weights in that dtype, refreshed after every update; call this after moving the pair to
                its device.
        """
        if kind not in EMA_KINDS:
            raise ValueError(f"ema must be one of {EMA_KINDS}, got {kind!r}")
        self.ema = kind
        copy_ = None
        if teacher_dtype is not None:
            copy_ = copy.deepcopy(self.teacher).to(teacher_dtype)
            copy_.requires_grad_(False)
            copy_.eval()
        self.__dict__["teacher_copy"] = copy_  # not a submodule: the state dict stays the teacher's
        self._build_pairs()

    def refresh_teacher_copy(self) -> None:
        """Copy the teacher's weights into ``teacher_copy`` (after loading a checkpoint); no-op without one."""
        if self.teacher_copy is not None:
            with torch.no_grad():
                torch._foreach_copy_(*self._copy_pairs)

    def _copy_all(self) -> None:
        if self._teacher_params:
            torch._foreach_copy_(self._teacher_params, self._student_params)
        if self._teacher_buffers:
            torch._foreach_copy_(self._teacher_buffers, self._student_buffers)

    def _apply(self, fn, recurse: bool = True):  # nn.Module's signature
        # .to() / .cuda() / .half() may replace parameter tensors: rebuild the cached lists.
        out = super()._apply(fn, recurse)
        if self.teacher_copy is not None:
            self.teacher_copy._apply(fn, recurse)
        if self._pairs_built:
            self._build_pairs()
        return out

    def train(self, mode: bool = True) -> StudentTeacher:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float | torch.Tensor) -> None:
        """EMA step ``t = m * t + (1 - m) * s`` over all matched parameters; buffers are copied, and the
        low-precision ``teacher_copy`` (if any) refreshed.

        ``momentum`` may be a 0-d tensor on the parameters' device (decided there without a host sync;
        1 leaves the teacher's parameters exactly as they are). With ``ema="foreach"`` each parameter is then
        ``lerp_``-ed towards the student's with weight ``1 - m``: the two foreach ops take only a host scalar
        here, and one ``lerp_`` per tensor reads each pair once, with no temporary copy of the student."""
        with torch.profiler.record_function("asit.ema"):
            self._average(momentum)
            if self._teacher_buffers:
                torch._foreach_copy_(self._teacher_buffers, self._student_buffers)
            if self.teacher_copy is not None:
                torch._foreach_copy_(*self._copy_pairs)

    def _average(self, momentum: float | torch.Tensor) -> None:
        if self.ema == "per_tensor":  # the authors' loop (DINO's main_dino.py)
            for t, s in zip(self._teacher_params, self._student_params, strict=True):
                t.mul_(momentum).add_((1 - momentum) * s)
        elif self.ema == "fused" and self._teacher_params:
            if isinstance(momentum, torch.Tensor):  # _foreach_lerp_ takes a host scalar only: t += (s - t)·w
                diff = torch._foreach_sub(self._student_params, self._teacher_params)
                torch._foreach_mul_(diff, 1.0 - momentum)
                torch._foreach_add_(self._teacher_params, diff)
            else:
                torch._foreach_lerp_(self._teacher_params, self._student_params, 1.0 - float(momentum))
        elif isinstance(momentum, torch.Tensor):
            weight = 1.0 - momentum
            for t, s in zip(self._teacher_params, self._student_params, strict=True):
                t.lerp_(s, weight)
        elif self._teacher_params:
            m = float(momentum)
            torch._foreach_mul_(self._teacher_params, m)
            torch._foreach_add_(self._teacher_params, self._student_params, alpha=1.0 - m)


def _build_model(
    vit_kwargs: dict,
    *,
    img_size: tuple[int, int],
    patch_size: int,
    in_chans: int,
    drop_path_rate: float,
    attn_backend: str,
    cls_token_std: float,
    pos_embed_fit: str,
    head_kwargs: dict,
    recon_kwargs: dict | None,
    token_logits: bool,
) -> ASiTModel:
    backbone = build_backbone(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        drop_path_rate=drop_path_rate,
        attn_backend=attn_backend,
        cls_token_std=cls_token_std,
        **vit_kwargs,
    )
    dim = backbone.embed_dim
    head = ProjectionHead(dim, **head_kwargs)
    recon = None
    if recon_kwargs is not None:
        recon = ReconstructionHead(dim, patch_size=patch_size, in_chans=in_chans, **recon_kwargs)
    return ASiTModel(backbone, head, recon, pos_embed_fit=pos_embed_fit, token_logits=token_logits)


def build_asit(
    *,
    preset: str | dict,
    img_size: tuple[int, int] = (592, 128),
    patch_size: int = 16,
    in_chans: int = 1,
    drop_path_rate: float = 0.1,
    out_cls: int = 8192,
    out_tokens: int | None = 1024,
    head_hidden: int = 2048,
    head_bottleneck: int = 256,
    trainable_g: bool = False,
    recon_hidden: int = 768,
    recon_out: int = 128,
    attn_backend: str = "sdpa",
    cls_token_std: float = 0.02,
    pos_embed_fit: str = "bicubic",
    init: str | None = None,
    residual_dtype: str = "fp32",
    mlp_gelu: str = "separate",
    token_logits: bool = True,
) -> StudentTeacher:
    """Build the student (drop path as given, with reconstruction head) and its teacher
    (drop path 0, no reconstruction head), initialised to the same weights.

    Args:
        preset: a key of ``VIT_PRESETS`` (``"tiny" | "small" | "base"``) or a dict of
            ``build_backbone`` keyword arguments (``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``).
        out_tokens: ``None`` shares the [CLS] output layer with the data tokens (v2).
        cls_token_std: the [CLS] token's initial std (0.02: the authors'; 1e-6: timm's).
        pos_embed_fit: how the positional embedding meets shorter (local) views, see
            :func:`asit.models.fit_pos_embed` (``"bicubic"``: the authors' plain bicubic resize).
        init: ``None`` (random initialisation) or an ImageNet ViT to start the backbone from, as a
            timm model name or a checkpoint file (:func:`asit.models.load_imagenet_init`); the
            teacher starts from the same weights.
        residual_dtype, mlp_gelu: numerics switches of :func:`asit.models.build_backbone` (student and teacher
            alike; no parameter changes).
        token_logits: False: both models return the data tokens' features and output weight instead of
            their logits (:class:`ASiTModel`), for ``loss.fused_head``.
    """
    if isinstance(preset, str):
        if preset not in VIT_PRESETS:
            raise ValueError(f"unknown ViT preset {preset!r}; choose from {sorted(VIT_PRESETS)} or a dict")
        vit_kwargs = dict(VIT_PRESETS[preset])
    else:
        vit_kwargs = dict(preset)
    vit_kwargs.update(residual_dtype=residual_dtype, mlp_gelu=mlp_gelu)
    head_kwargs = dict(
        out_cls=out_cls,
        out_tokens=out_tokens,
        hidden_dim=head_hidden,
        bottleneck_dim=head_bottleneck,
        trainable_g=trainable_g,
    )
    common = dict(
        img_size=tuple(img_size),
        patch_size=patch_size,
        in_chans=in_chans,
        attn_backend=attn_backend,
        cls_token_std=cls_token_std,
        pos_embed_fit=pos_embed_fit,
        head_kwargs=head_kwargs,
        token_logits=token_logits,
    )
    student = _build_model(
        vit_kwargs,
        drop_path_rate=drop_path_rate,
        recon_kwargs=dict(hidden_dim=recon_hidden, out_dim=recon_out),
        **common,
    )
    if init is not None:
        load_imagenet_init(student.backbone, init)
    teacher = _build_model(vit_kwargs, drop_path_rate=0.0, recon_kwargs=None, **common)
    return StudentTeacher(student, teacher)  # copies the student's weights into the teacher
