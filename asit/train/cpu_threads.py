"""How many threads torch may use when training on the CPU, so that processes sharing the cores do not collapse.

torch's default is one intra-op thread per core of the machine, whoever else runs there: two training
processes on two cores, or one beside its own loader workers, then fight over the cores and run many
times slower than with one thread each. :func:`choose_cpu_threads` takes the cores this process may
use (``os.sched_getaffinity``: a ``taskset`` or a container's CPU set), divides them between the
processes of this node (``LOCAL_WORLD_SIZE`` under torchrun) and leaves one core per DataLoader worker,
at least one thread. ``OMP_NUM_THREADS``, when set, is the user's choice (or torchrun's ``1`` when it
starts several processes per node) and is left as it is. :func:`set_cpu_threads` applies the choice,
logs it once and gives back a handle that restores the previous count.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["CpuThreads", "available_cores", "choose_cpu_threads", "set_cpu_threads"]

log = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; the machine's count where that is not known)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def choose_cpu_threads(num_workers: int, *, environ: Mapping[str, str] | None = None,
                       cores: int | None = None) -> tuple[int | None, str]:
    """``(threads, why)``: the intra-op threads for one training process on the CPU, or None when
    ``OMP_NUM_THREADS`` is set (then torch already follows it); ``why`` says how it was chosen.

    ``threads = max(1, cores // LOCAL_WORLD_SIZE - num_workers)``: the process's share of the
    ``cores`` (default: :func:`available_cores`) less one core per loader worker. ``environ`` defaults
    to ``os.environ``.
    """
    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS", "").strip():
        return None, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS'].strip()}"
    cores = available_cores() if cores is None else cores
    try:
        local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    share = max(1, cores // local)
    threads = max(1, share - max(0, num_workers))
    why = (f"{cores} cores, {local} process{'es' if local > 1 else ''} on this node, "
           f"{num_workers} loader worker{'s' if num_workers != 1 else ''} per process")
    return threads, why


@dataclass
class CpuThreads:
    """What :func:`set_cpu_threads` did: the thread count before (to :meth:`restore`) and now."""

    before: int
    now: int

    def restore(self) -> None:
        """Give torch back the thread count it had before (for a trainer run inside a longer process)."""
        if self.now != self.before:
            torch.set_num_threads(self.before)
            self.now = self.before


def set_cpu_threads(device: torch.device, num_workers: int, *, announce: bool = True) -> CpuThreads:
    """On the CPU, set torch's intra-op threads by :func:`choose_cpu_threads` and log the choice once
    (``announce``: this process logs); on other devices change nothing."""
    before = torch.get_num_threads()
    if device.type != "cpu":
        return CpuThreads(before, before)
    threads, why = choose_cpu_threads(num_workers)
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    now = torch.get_num_threads()
    if announce:
        advice = "" if threads is None else "; set OMP_NUM_THREADS to choose another count"
        log.info("CPU training with %d torch thread%s (%s%s)", now, "s" if now != 1 else "", why, advice)
    return CpuThreads(before, now)
