"""Output heads: the DINO-style projection head and the spectrogram reconstruction head.

Parameter names follow the public DINO / ASiT code (``mlp.0``, ``mlp.2``, ``mlp.4``,
``last_layer.weight_g``, ``last_layer.weight_v``, ``convTrans``) so the authors' checkpoints
map onto these modules by changing the prefix only.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ProjectionHead", "ReconstructionHead", "WeightNormLinear"]


def _init_linear(module: nn.Module) -> None:
    """trunc_normal(std=.02) weights and zero biases for every ``nn.Linear`` (DINO's init)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, nlayers: int, act_last: bool) -> nn.Sequential:
    """``in → hidden → … → out`` as an ``nn.Sequential`` of Linear/GELU (linears at even indices)."""
    if nlayers < 1:
        raise ValueError(f"nlayers must be >= 1, got {nlayers}")
    dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(nlayers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < nlayers - 1 or act_last:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class WeightNormLinear(nn.Module):
    """Bias-free weight-normalised linear layer: ``y = x @ (g * v / ||v||_row)^T``.

    Stores ``weight_g`` ``[out, 1]`` and ``weight_v`` ``[out, in]`` (the key names of
    ``torch.nn.utils.weight_norm`` used by DINO/ASiT checkpoints) but computes the weight with
    plain tensor ops, so it traces under ``torch.compile`` and deep-copies cleanly.

    Args:
        trainable_g: if False (v1), ``g`` is fixed to 1 (``requires_grad=False``), so every row
            of the effective weight has unit norm; if True (v2), ``g`` is learned (initialised to 1).
    """

    def __init__(self, in_features: int, out_features: int, trainable_g: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=trainable_g)
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        # nn.Linear's default init, as DINO builds last_layer after its trunc_normal pass.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    @property
    def trainable_g(self) -> bool:
        return self.weight_g.requires_grad

    @property
    def weight(self) -> torch.Tensor:
        """Effective weight ``[out, in]``: rows of ``v`` scaled to norm ``g``."""
        return self.weight_g * F.normalize(self.weight_v, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}"
            f", out_features={self.out_features}"
            f", trainable_g={self.trainable_g}"
        )


class ProjectionHead(nn.Module):
    """DINO-style projection head shared by the [CLS] and the data tokens.

    ``tokens → MLP (in → hidden → hidden → bottleneck, GELU between) → L2-normalise`` then
    ``last_layer`` (→ ``out_cls``) on the [CLS] token and ``last_layer_tokens`` (→ ``out_tokens``)
    on the data tokens. With ``out_tokens=None`` (v2) the data tokens also go through
    ``last_layer`` and no ``last_layer_tokens`` exists.
    """

    def __init__(
        self,
        in_dim: int,
        out_cls: int = 8192,
        out_tokens: int | None = 1024,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        trainable_g: bool = False,
    ) -> None:
        super().__init__()
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, act_last=False)
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_cls, trainable_g)
        self.last_layer_tokens = (
            WeightNormLinear(bottleneck_dim, out_tokens, trainable_g) if out_tokens is not None else None
        )

    @property
    def last_layers(self) -> list[WeightNormLinear]:
        """The output layers (frozen by the engine during the first epoch)."""
        return [m for m in (self.last_layer, self.last_layer_tokens) if m is not None]

    @property
    def shared(self) -> bool:
        """True when [CLS] and data tokens share ``last_layer`` (v2)."""
        return self.last_layer_tokens is None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, 1+N, D] -> [B, 1+N, Db]
        """MLP then L2-normalisation: the bottleneck features the output layers see."""
        return F.normalize(self.mlp(tokens), dim=-1, eps=1e-6)

    @property
    def token_layer(self) -> WeightNormLinear:
        """The output layer of the data tokens (``last_layer`` when shared, v2)."""
        return self.last_layer if self.last_layer_tokens is None else self.last_layer_tokens

    def features(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The head without the data tokens' output layer, for a loss that applies it itself
        (:func:`asit.ops.linear_centered_softmax_cross_entropy`).

        Returns: ``cls_logits [B, K_cls]``, ``token_embed [B, N, Db]`` (the bottleneck features) and
        ``token_weight [K_tok, Db]`` (the effective weight of :attr:`token_layer`, with its graph to ``g``, ``v``).
        """
        z = self.embed(tokens)  # [B, 1+N, Db]
        return self.last_layer(z[:, 0]), z[:, 1:], self.token_layer.weight

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: tokens ``[B, 1+N, D]``, [CLS] first.

        Returns: ``cls_logits [B, K_cls]``, ``token_logits [B, N, K_tok]``.
        """
        z = self.embed(tokens)  # [B, 1+N, Db]
        return self.last_layer(z[:, 0]), self.token_layer(z[:, 1:])  # [B, K_cls], [B, N, K_tok]


class ReconstructionHead(nn.Module):
    """Reconstructs the spectrogram from the data tokens.

    ``MLP (in → hidden → … → out, GELU after every linear)`` per token, then
    ``ConvTranspose2d(out → in_chans, kernel=stride=patch_size)`` on the token grid, which
    paints one ``p x p`` patch per token (computed as the equivalent per-token matmul).
    v1: ``hidden_dim=768, out_dim=128``; v2: ``hidden_dim=768, out_dim=768`` (three 768 x 768
    linears for a 768-wide backbone).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 768,
        out_dim: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        nlayers: int = 3,
    ) -> None:
        super().__init__()
        self.mlp = _mlp(in_dim, hidden_dim, out_dim, nlayers, act_last=True)
        self.mlp.apply(_init_linear)
        # The authors' name, so their `head_recons.convTrans.*` keys map by prefix only.
        self.convTrans = nn.ConvTranspose2d(out_dim, in_chans, kernel_size=patch_size, stride=patch_size)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Args: data tokens ``[B, N, D]`` in row-major grid order, ``grid = (gh, gw)``, ``N = gh * gw``.

        Returns: ``[B, in_chans, gh * p, gw * p]``.
        """
        B, N, _ = tokens.shape
        gh, gw = grid
        if N != gh * gw:
            raise ValueError(f"tokens has N={N} data tokens but grid {grid} needs {gh * gw}")
        y = self.mlp(tokens)  # [B, N, C]
        # The transposed convolution with kernel = stride = p paints disjoint patches, so it is one
        # linear map per token (C → k*p*p) and a reshape: same parameters and result, without cuDNN
        # (whose backward picked a memory format the compiled graph did not expect on CUDA). One
        # F.linear, so autocast gives the output the compute dtype, as it did the convolution's.
        w = self.convTrans.weight  # [C, k, p, p]
        c, k, p, _ = w.shape
        bias = self.convTrans.bias
        patches = F.linear(y, w.reshape(c, k * p * p).t(), None if bias is None else bias.repeat_interleave(p * p))
        patches = patches.view(B, gh, gw, k, p, p).permute(0, 3, 1, 4, 2, 5)  # [B, k, gh, p, gw, p]
        return patches.reshape(B, k, gh * p, gw * p)
