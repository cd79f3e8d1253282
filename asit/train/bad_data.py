"""Unusable clips during training: counted per reason, summed over the ranks, and a limit per epoch.

Loaders drop clips they cannot decode and report them with each batch (``skip_reasons``,
``num_skipped``). :class:`BadDataTally` collects this rank's counts, adds every rank's at the same points
(:meth:`BadDataTally.reduce`, a collective), and raises :class:`BadDataError` when an epoch's share of them
passes ``data.max_bad_fraction`` (the rule is :func:`bad_fraction_error`). :func:`batch_usable` is the ranks'
agreement that a batch holds enough clips to train on. Nothing here reads the config.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .distributed import DistInfo

__all__ = ["BadDataError", "BadDataTally", "bad_fraction_error", "batch_usable"]

log = logging.getLogger(__name__)


class BadDataError(RuntimeError):
    """Too many clips of an epoch could not be decoded (``data.max_bad_fraction``)."""


def bad_fraction_error(skipped: Counter[str] | dict[str, int], seen: int, planned: int, limit: float, *,
                       epoch_done: bool) -> str | None:
    """Why an epoch has too many unusable clips (``data.max_bad_fraction``), or None.

    ``skipped``: unusable clips per reason so far, ``seen``: clips loaded so far (usable or not), ``planned``:
    the clips the epoch draws (steps × batch × processes). At the epoch end the rule is ``bad > limit · seen``.
    Before that only a spent budget counts, never the rate of a prefix (bad files cluster, and a prefix over
    the limit says little about a 2M-clip epoch): a loader that replaces unusable clips (DALI) can load at
    most ``planned + bad`` clips, so ``bad > limit · (planned + bad)`` now means over the limit at the end,
    whatever the rest of the epoch holds.
    """
    bad = sum(skipped.values())
    if not bad:
        return None
    counts = dict(Counter(skipped).most_common(5))
    if epoch_done:
        if bad <= limit * seen:
            return None
        return (f"{bad} of {seen} clips ({bad / seen:.1%}, all processes) could not be used, more than "
                f"data.max_bad_fraction={limit}; reasons: {counts}")
    if bad <= limit * (planned + bad):
        return None
    return (f"{bad} clips (of {seen} loaded so far, all processes) could not be used, already more than "
            f"data.max_bad_fraction={limit} of the epoch's {planned} clips; reasons: {counts}")


class BadDataTally:
    """Unusable and loaded clips: ``total`` per reason over finished epochs (all ranks), ``epoch`` and
    ``epoch_seen`` for the current epoch up to the last :meth:`reduce` (identical on every rank), and this
    rank's counts since then.

    Args:
        limit: ``data.max_bad_fraction``.
        source: the training data, named in the error.
    """

    def __init__(self, limit: float, source: str) -> None:
        self.limit, self.source = limit, source
        self.total: Counter[str] = Counter()
        self.epoch: Counter[str] = Counter()
        self.epoch_seen = 0
        self._pending: Counter[str] = Counter()
        self._pending_seen = 0

    def state_dict(self) -> dict[str, Any]:
        """The counts under the checkpoint's keys (the current epoch's as of the last :meth:`reduce`)."""
        return {"bad_inputs": dict(self.total), "epoch_bad_inputs": dict(self.epoch), "epoch_seen": self.epoch_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Counts from a checkpoint (absent keys count 0); ``total`` stays the same object."""
        self.total.update(state.get("bad_inputs", {}))
        self.epoch = Counter(state.get("epoch_bad_inputs", {}))
        self.epoch_seen = int(state.get("epoch_seen", 0))

    def count(self, batch: dict[str, Any]) -> None:
        """Add a loader batch's unusable clips (by reason) and its loaded clips to this rank's counts."""
        self._pending.update(batch.get("skip_reasons", []))
        self._pending_seen += batch["views"].shape[0] + int(batch.get("num_skipped", 0))

    def reduce(self, gather: Callable[..., list[Any]], group: Any = None) -> None:
        """Add every rank's counts since the last call to the epoch's, which are then the same on every rank.
        A collective through ``gather(obj, group=group)`` (an all-gather of Python objects): all ranks call it
        at the same points (log steps, checkpoints, epoch ends)."""
        mine = (dict(self._pending), self._pending_seen)
        for bad, seen in gather(mine, group=group):
            self.epoch.update(bad)
            self.epoch_seen += seen
        self._pending, self._pending_seen = Counter(), 0

    def check(self, epoch: int, planned: int, *, epoch_done: bool) -> None:
        """Raise :class:`BadDataError` when the epoch's unusable clips (all ranks, as of the last :meth:`reduce`)
        exceed the limit; ``planned``: the clips the epoch draws. The same verdict on every rank."""
        message = bad_fraction_error(self.epoch, self.epoch_seen, planned, self.limit, epoch_done=epoch_done)
        if message:
            raise BadDataError(f"epoch {epoch + 1}: {message}. Check the manifest {self.source} "
                               "(the log names each file) or raise the limit.")

    def end_epoch(self, epoch: int, planned: int, gather: Callable[..., list[Any]], group: Any = None, *,
                  is_main: bool) -> None:
        """At an epoch's end: reduce, report the epoch's unusable clips (``is_main``), check the limit and add
        them to ``total``."""
        self.reduce(gather, group)
        bad = sum(self.epoch.values())
        if bad and is_main:
            log.warning("epoch %d: skipped %d of %d clip(s) (%.2f%%, all processes): %s", epoch + 1, bad,
                        self.epoch_seen, 100 * bad / max(self.epoch_seen, 1), dict(self.epoch.most_common(5)))
        self.check(epoch, planned, epoch_done=True)
        self.total.update(self.epoch)
        self.epoch, self.epoch_seen = Counter(), 0


def batch_usable(batch: dict[str, Any], dist_info: DistInfo, host_group: Any = None) -> bool:
    """True when every rank has at least 2 decodable clips (GMML's alien mode and the batch statistics
    need 2). Ranks must agree, or DDP's gradient all-reduce would pair up different steps and hang.
    ``host_group``: a gloo group for the agreement (sync-free under NCCL: on the host, never waiting for
    the device queue), else the default group."""
    too_small = batch["views"].shape[0] < 2
    if not dist_info.distributed:
        return not too_small
    device = "cpu" if host_group is not None else dist_info.device
    flag = torch.tensor([float(too_small)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=host_group)
    return not bool(flag[0])
