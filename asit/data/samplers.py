"""Epoch orders for every loader: one ``set_epoch(epoch, skip)`` contract and the rules behind it.

Every loader a trainer drives takes ``set_epoch(epoch, skip=0)`` before each epoch
(:class:`EpochControl`): the index samplers here, the shard dataset's control
(:meth:`~asit.data.shards.ShardPretrainDataset.epoch_control`) and
:class:`~asit.data.dali.DaliPretrainLoader`. The rule is the same for all of them: ``epoch`` fixes
an order of the clips seeded by ``(seed, epoch)`` alone (the same on every rank, independent of the
epochs before), each rank takes its own share of that order, and a run resumed mid-epoch starts
after the first ``skip`` samples of this rank's share (for the batch loaders, a whole number of
batches: :func:`check_skip`). The shared pieces are :func:`epoch_permutation` (the seeded order),
:func:`contiguous_share` (a rank's contiguous part of it) and :class:`RankSampler` (an index sampler
whose rank keeps every ``world_size``-th index of one seeded draw, with the skip applied); each
loader keeps its own seeding and split, so every order is exactly the one it has always been.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Sampler, WeightedRandomSampler

__all__ = [
    "EpochControl",
    "EpochSampler",
    "RankSampler",
    "WeightedDistributedSampler",
    "check_skip",
    "contiguous_share",
    "epoch_permutation",
]


@runtime_checkable
class EpochControl(Protocol):
    """What a trainer calls before each epoch: start epoch ``epoch`` after this rank's first ``skip``
    samples of it (0 unless the run resumes mid-epoch)."""

    def set_epoch(self, epoch: int, skip: int = 0) -> None: ...


def check_skip(skip: int, batch_size: int) -> int:
    """``skip`` as an int, after checking that it is a whole number of batches of ``batch_size``."""
    if skip % batch_size:
        raise ValueError(f"skip of {skip} samples is not a multiple of batch_size={batch_size}")
    return int(skip)


def epoch_permutation(n: int, seed: int, epoch: int, *salt: int) -> list[int]:
    """A permutation of ``range(n)`` seeded by ``(seed, epoch, *salt)`` (NumPy's generator), the same
    on every rank; ``salt`` tells apart the several orders one epoch needs (a pass, a shard)."""
    return np.random.default_rng([seed, epoch, *salt]).permutation(n).tolist()


def contiguous_share(length: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous part of ``length`` positions cut into
    ``world_size`` parts whose sizes differ by at most one."""
    return length * rank // world_size, length * (rank + 1) // world_size


class RankSampler(Sampler[Any]):
    """An index sampler for one rank: each epoch one draw from a ``torch.Generator`` seeded by
    ``seed * seed_stride + epoch`` (:meth:`epoch_indices`, every rank the same draw, each keeping its
    own every ``world_size``-th index), less the first ``skip`` indices of this rank's share.

    Subclasses set ``per_rank`` (indices per rank and epoch) and ``seed_stride``, and define
    :meth:`epoch_indices`."""

    seed_stride: int
    per_rank: int

    def __init__(self, *, rank: int, world_size: int, seed: int) -> None:
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Draw epoch ``epoch``'s order and leave out this rank's first ``skip`` indices of it."""
        self.epoch, self.skip = int(epoch), int(skip)

    def epoch_generator(self) -> torch.Generator:
        """The epoch's generator (a fresh one each call)."""
        return torch.Generator().manual_seed(self.seed * self.seed_stride + self.epoch)

    def epoch_indices(self) -> list[Any]:
        """This rank's whole share of the epoch's draw, before the skip."""
        raise NotImplementedError

    def __iter__(self):
        return iter(self.epoch_indices()[self.skip :])

    def __len__(self) -> int:
        return max(self.per_rank - self.skip, 0)


class EpochSampler(RankSampler):
    """Shuffled indices of a map-style dataset of ``size`` clips for one rank: a permutation seeded by
    ``(seed, epoch)``, every ``world_size``-th index from ``rank`` on, the first ``num_samples`` of
    them, less the first ``skip`` (resuming mid-epoch)."""

    seed_stride = 100_003

    def __init__(self, size: int, *, rank: int, world_size: int, seed: int, num_samples: int) -> None:
        super().__init__(rank=rank, world_size=world_size, seed=seed)
        self.size, self.num_samples = size, num_samples

    @property
    def per_rank(self) -> int:
        return self.num_samples

    def epoch_indices(self) -> list[int]:
        perm = torch.randperm(self.size, generator=self.epoch_generator())
        return perm[self.rank :: self.world_size][: self.num_samples].tolist()


class WeightedDistributedSampler(RankSampler, WeightedRandomSampler):
    """:class:`~torch.utils.data.WeightedRandomSampler` (with replacement) split across DDP ranks.

    Every rank draws the same ``num_samples`` indices (rounded up to a multiple of ``world_size``)
    from a generator seeded by ``(seed, epoch)`` and keeps every ``world_size``-th one, so the ranks
    see disjoint parts of one weighted draw. With ``tag_repeats`` it yields ``(index, r)`` pairs
    instead, ``r`` counting the earlier draws of that index in the whole draw (0 the first time), so
    a dataset can crop a repeat differently.
    """

    seed_stride = 1_000_003

    def __init__(self, weights: Sequence[float], num_samples: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, tag_repeats: bool = False) -> None:
        WeightedRandomSampler.__init__(self, weights, num_samples, replacement=True)
        RankSampler.__init__(self, rank=rank, world_size=world_size, seed=seed)
        self.per_rank = math.ceil(num_samples / world_size)
        self.tag_repeats = tag_repeats

    def epoch_indices(self) -> list[Any]:
        draw = torch.multinomial(self.weights, self.per_rank * self.world_size, replacement=True,
                                 generator=self.epoch_generator())
        mine = draw[self.rank :: self.world_size].tolist()
        if not self.tag_repeats:
            return mine
        seen: dict[int, int] = {}
        repeats = []
        for i in draw.tolist():
            repeats.append(seen.get(i, 0))
            seen[i] = repeats[-1] + 1
        return list(zip(mine, repeats[self.rank :: self.world_size]))
