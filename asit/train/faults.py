"""Fault injection for the restart tests: a worker that dies abruptly at a chosen point.

``ASIT_FAULT_AT_STEP=N`` makes rank ``ASIT_FAULT_RANK`` (default: the last rank) exit with ``os._exit(1)``
right after step N, once per run directory: a marker file there records that it fired, so the workers
restarted by torchrun run on. Real runs leave the variables unset, and the hook then does nothing. A
recipe builds one :class:`FaultHook` at setup and calls it after every step (or epoch) with its counter;
``every_rank=True`` makes every process die at that point instead of one (fine-tuning's crash test).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["FAULT_RANK_ENV", "FAULT_STEP_ENV", "FaultHook", "fault_step", "inject_fault"]

log = logging.getLogger(__name__)

FAULT_STEP_ENV = "ASIT_FAULT_AT_STEP"
FAULT_RANK_ENV = "ASIT_FAULT_RANK"


def fault_step(rank: int, world_size: int, env: str = FAULT_STEP_ENV, *, every_rank: bool = False) -> int | None:
    """The step after which this rank simulates a crash (the ``env`` test hook, ``ASIT_FAULT_AT_STEP`` by
    default), or None."""
    raw = os.environ.get(env)
    if not raw:
        return None
    target = int(os.environ.get(FAULT_RANK_ENV, str(world_size - 1)))
    return int(raw) if every_rank or rank == target else None


def inject_fault(run_dir: Path, step: int, env: str = FAULT_STEP_ENV, *, marker_tag: str = "") -> None:
    """Exit this worker at once (no cleanup, like a segfault or an OOM kill), unless it already happened
    in this run directory (``marker_tag`` tells the processes' markers apart when each of them dies)."""
    marker = Path(run_dir) / f".fault_injected_step{step}{marker_tag}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    log.error("%s=%d: simulating a crash of this worker (test hook)", env, step)
    os._exit(1)


class FaultHook:
    """Calls :func:`inject_fault` when the recipe's counter reaches the step chosen by ``env`` for this rank.

    ``hook = FaultHook(run_dir, rank, world_size)`` at setup, ``hook(step)`` after every step.
    """

    def __init__(self, run_dir: Path, rank: int, world_size: int, env: str = FAULT_STEP_ENV, *,
                 every_rank: bool = False) -> None:
        self.run_dir, self.env = Path(run_dir), env
        self.at = fault_step(rank, world_size, env, every_rank=every_rank)
        self.tag = f"_rank{rank}" if every_rank else ""

    def __call__(self, step: int) -> None:
        if step == self.at:
            inject_fault(self.run_dir, step, self.env, marker_tag=self.tag)
