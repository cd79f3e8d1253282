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
# Elementwise kernels: elements per block (8 warps, 8 elements a thread), and the fewest programs a
# launch should have: 1,056 resident blocks of 256 threads fill the 132 SMs of an H100 once.
ELEMENTWISE_BLOCK = 2048
TARGET_PROGRAMS = 2048


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


def elementwise_blocks(n: int) -> tuple[int, int, int, int]:
    """``(BLOCK, TILES, programs, num_warps)`` for a flat pass over ``n`` elements.

    Each program walks ``TILES`` consecutive blocks of ``BLOCK`` elements in a loop (one block of
    loads in flight at a time keeps registers low; many resident programs keep the bytes in
    flight). ``TILES`` is a power of two so that few kernel variants are ever compiled, and small
    enough that the grid keeps at least about ``TARGET_PROGRAMS / 2`` programs.
    """
    block = min(ELEMENTWISE_BLOCK, pow2_block(n))
    n_blocks = cdiv(max(n, 1), block)
    tiles = min(64, next_power_of_2(cdiv(n_blocks, TARGET_PROGRAMS)))
    return block, tiles, cdiv(n_blocks, tiles), max(1, min(8, block // 256))


# Row kernels whose whole row fits one tile (one pass over the data): widest row, elements per
# program tile, and how many programs the row tiles are dealt to (each program walks a contiguous
# run of tiles and keeps one per-column partial sum, so the partials stay few).
ONE_PASS_MAX_K = 2048
ONE_PASS_TILE = 4096
ROW_PROGRAMS = 1024


def one_pass_blocks(n_rows: int, n_cols: int) -> tuple[int, int, int, int, int]:
    """``(ROWS, BLOCK_K, TILES_PER_PROGRAM, programs, num_warps)`` for a one-pass row kernel.

    A program holds ``ROWS × BLOCK_K`` elements of each input (16 a thread at 8 warps, so the
    kernel fits in 128 registers and two blocks share an SM) and walks ``TILES_PER_PROGRAM``
    consecutive row tiles; the tiles are dealt evenly to at most ``ROW_PROGRAMS`` programs.
    """
    block_k = pow2_block(n_cols, max_block=ONE_PASS_MAX_K)
    rows = max(1, min(ONE_PASS_TILE // block_k, next_power_of_2(max(n_rows, 1))))
    n_tiles = cdiv(max(n_rows, 1), rows)
    per_program = cdiv(n_tiles, ROW_PROGRAMS)
    return rows, block_k, per_program, cdiv(n_tiles, per_program), max(1, min(8, rows * block_k // 512))


# Split-K row kernels: row tiles × splits should reach this many programs (a full wave of 6-8 blocks on 132 SMs).
SPLIT_TARGET_PROGRAMS = 1024
# Split-K tiles hold at most 16 rows: the per-row-tile partial column sums are 1/16 of the teacher's rows.
SPLIT_ROWS = 16
# Split path: up to this many row tiles, the last program of each split sums the partial column sums
# itself (inside the statistics kernel); more row tiles go to the separate column-sum kernel.
SPLIT_FUSED_SUM_MAX_PARTS = 64


def grid_tile_blocks(n_rows: int, n_cols: int, *, target: int = SPLIT_TARGET_PROGRAMS,
                     min_tile: int = 1024) -> tuple[int, int, int]:
    """``(ROWS, BLOCK_K, num_warps)``: a tile of at most ``SPLIT_ROWS`` rows for kernels that cover an
    ``n_rows × n_cols`` matrix with a 2-D grid of tiles.

    The tile holds 4,096 elements (16 a thread on 8 warps) when the matrix has at least ``target`` such
    tiles, otherwise fewer, down to ``min_tile`` (still on 8 warps), so that a small matrix (128 × 8,192)
    still spreads over ``target`` programs.
    """
    n_rows, n_cols = max(n_rows, 1), max(n_cols, 1)
    per_program = max(1, n_rows * n_cols // target)
    tile = min(ONE_PASS_TILE, max(min_tile, 1 << (per_program.bit_length() - 1)))
    rows = min(SPLIT_ROWS, next_power_of_2(n_rows))
    block_k = min(ONE_PASS_MAX_K, tile // rows, next_power_of_2(n_cols))
    return rows, block_k, max(1, min(8, rows * block_k * 8 // min_tile))


def split_k_blocks(n_rows: int, n_cols: int, *, target: int = SPLIT_TARGET_PROGRAMS,
                   min_tile: int = 1024) -> tuple[int, int, int, int, int]:
    """``(ROWS, BLOCK_K, splits, split_cols, num_warps)`` for a row kernel whose rows do not fit one tile.

    Tiles from :func:`grid_tile_blocks`; K is cut into ``splits`` ranges of ``split_cols`` columns (whole
    chunks of ``BLOCK_K``) when the row tiles alone are fewer than ``target``.
    """
    rows, block_k, warps = grid_tile_blocks(n_rows, n_cols, target=target, min_tile=min_tile)
    chunks = cdiv(max(n_cols, 1), block_k)
    splits = min(chunks, next_power_of_2(cdiv(target, cdiv(max(n_rows, 1), rows))))
    split_cols = cdiv(chunks, splits) * block_k
    return rows, block_k, cdiv(max(n_cols, 1), split_cols), split_cols, warps


# The split path's gradient kernel and the backward's scaling: 2,048 programs of at least 512 elements (2 a
# thread on 8 warps). Those kernels need few registers, so 8 blocks share an SM: 1,056 fill 132 SMs.
GRAD_TARGET_PROGRAMS = 2048
GRAD_MIN_TILE = 512


def column_sum_blocks(n_parts: int, n_cols: int) -> tuple[int, int, int, int]:
    """``(ROWS, BLOCK_K, groups, num_warps)`` for summing ``n_parts`` partial rows of ``n_cols`` columns.

    A 2-D grid of ``cdiv(n_cols, BLOCK_K) × groups`` programs, each summing one group of ``ROWS``
    partial rows over 32 columns (one 128-byte line a row) with 2 elements a thread, so that the 948 ×
    1,024 partials of the local head make 1,920 programs: more than the 132 × 8 resident slots.
    """
    block_k = pow2_block(n_cols, max_block=32)
    rows = max(1, min(512 // block_k, next_power_of_2(max(n_parts, 1))))
    return rows, block_k, cdiv(max(n_parts, 1), rows), max(1, min(8, rows * block_k // 64))


# GMML painter: boxes per chunk (the inner dimension of its int8 matrix product; 32 at least).
GMML_BOX_CHUNK = 32


def gmml_blocks(patch: int) -> tuple[int, int, int]:
    """``(BLOCK_P, TOKENS, BLOCK_W)`` for the GMML painter.

    A program covers one band of ``patch`` rows (padded to ``BLOCK_P``, at least 16 for the
    matrix product) and ``TOKENS`` whole patches along the width (``TOKENS · patch`` columns,
    padded to ``BLOCK_W``), so no patch is split between programs.
    """
    tokens = max(1, 128 // patch)
    return max(16, next_power_of_2(patch)), tokens, max(16, next_power_of_2(tokens * patch))


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
