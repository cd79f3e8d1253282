"""Host-side helpers shared by the kernels: every block size comes from here.

A launcher is split in two: a ``*_launches`` function that allocates the outputs and returns them
with the list of :class:`Launch` records it would run (kernel, grid, arguments, constexprs,
``num_warps``), and the launcher proper, which runs that list. The kernel report
(``bench/kernel_report.py``) calls the same ``*_launches`` functions on meta tensors and compiles
each record for a GPU target, so what it judges is exactly what the ops launch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

# Set to "1" (tests do) to fill every launcher-allocated output with NaN / 0xFF bytes, so an
# element the kernel forgets to write cannot pass for a correct one.
POISON_ENV = "ASIT_KERNELS_POISON"

# Largest tile (elements per tensor) one program holds at once; keeps register use moderate.
MAX_TILE = 8192
# Elementwise kernels: elements per block, and roughly how many programs a launch should have.
ELEMENTWISE_BLOCK = 1024
TARGET_PROGRAMS = 1024


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](*args, **kwargs)``; constexprs and ``num_warps`` sit in ``kwargs``."""

    kernel: Any  # a @triton.jit function
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


def run_launches(launches: list[Launch]) -> None:
    """Run launches in order (on the current stream)."""
    for launch in launches:
        launch()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints. Host-side launch arithmetic uses these plain functions:
    ``triton.cdiv`` and ``triton.next_power_of_2`` are ``@jit`` functions, and each call from
    Python goes through ``JITFunction.__call__`` (several µs, about a sixth of a fused op's host
    time)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` (0 for 0), as ``triton.next_power_of_2``."""
    return 1 << (int(n) - 1).bit_length() if n > 0 else 0


def pow2_block(n: int, *, max_block: int = MAX_TILE, min_block: int = 16) -> int:
    """Power-of-two block covering ``n`` elements, clamped to ``[min_block, max_block]``."""
    return max(min_block, min(max_block, next_power_of_2(max(int(n), 1))))


def elementwise_blocks(n: int) -> tuple[int, int, int]:
    """``(BLOCK, TILES, programs)`` for a flat reduction over ``n`` elements.

    Each program walks ``TILES`` consecutive blocks of ``BLOCK`` elements; ``TILES`` is a power of
    two so that few kernel variants are ever compiled.
    """
    block = min(ELEMENTWISE_BLOCK, pow2_block(n))
    n_blocks = cdiv(max(n, 1), block)
    tiles = min(64, next_power_of_2(cdiv(n_blocks, TARGET_PROGRAMS)))
    return block, tiles, cdiv(n_blocks, tiles)


def row_blocks(n_rows: int, n_cols: int) -> tuple[int, int]:
    """``(ROWS, BLOCK_K)`` for row-wise kernels: a ``ROWS × BLOCK_K`` tile of at most ``MAX_TILE``."""
    block_k = pow2_block(n_cols, max_block=4096)
    rows = max(1, min(MAX_TILE // block_k, next_power_of_2(max(n_rows, 1)), 8))
    return rows, block_k


def gmml_blocks(patch: int) -> tuple[int, int, int]:
    """``(BLOCK_P, TOKENS, BLOCK_W)`` for the GMML painter.

    A program covers one band of ``patch`` rows (padded to ``BLOCK_P``) and ``TOKENS`` whole
    patches along the width (``TOKENS · patch`` columns, padded to ``BLOCK_W``), so no patch is
    split between programs.
    """
    tokens = max(1, 128 // patch)
    return next_power_of_2(patch), tokens, next_power_of_2(tokens * patch)


def num_warps_for(tile: int) -> int:
    """Warps per program for a tile of ``tile`` elements (Triton tutorial heuristic)."""
    if tile >= 8192:
        return 8
    if tile >= 2048:
        return 4
    return 2


@triton.jit
def load_scalar_f32(ptr):
    """Load element 0 of a one-element tensor as an fp32 scalar (masked, like every load)."""
    idx = tl.arange(0, 1)
    return tl.sum(tl.load(ptr + idx, mask=idx < 1, other=0.0).to(tl.float32), axis=0)


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer, or a poisoned one when ``ASIT_KERNELS_POISON=1``."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get(POISON_ENV) == "1":
        if out.is_floating_point():
            out.fill_(float("nan"))
        else:
            out.view(torch.uint8).fill_(0xFF)
    return out
