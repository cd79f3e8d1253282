"""Clean interrupts and timed checkpoints, decided by all ranks together at step boundaries.

:class:`StepBoundary` is built by the trainer and asked after every optimisation step
(:meth:`StepBoundary.poll`) whether to write a checkpoint now and whether to stop. Its answer is the same
on every rank: under ``torch.distributed`` the ranks all-reduce (MAX) two numbers per step, the signal this
rank received (0: none) and rank 0's "a timed checkpoint is due" (``train.checkpoint_every_minutes``, on
rank 0's clock), on the gloo host group when the trainer has one (sync-free under NCCL) so the check never
waits for the device. A single process reads its own flag and clock and runs no collective.

While :meth:`StepBoundary.install` is in force, the first SIGINT or SIGTERM a process receives is only
recorded (the step in progress finishes); the step boundary after it writes a checkpoint on every rank and
raises :class:`Interrupted`, which ``scripts/pretrain.py`` reports as one line and turns into exit status
128 + the signal number (130 for SIGINT, 143 for SIGTERM). A second signal ends the process at once with
that status, without a checkpoint. Children forked by the process (data-loader workers) inherit the
handler and ignore the signals: the main process decides when they stop.

Test hook (not for real runs): ``ASIT_SIGNAL_AT_STEP=N`` makes rank ``ASIT_SIGNAL_RANK`` (default: the last)
send ``ASIT_SIGNAL`` (``INT`` or ``TERM``, default ``INT``) right after step N, to itself or, with
``ASIT_SIGNAL_TO=launcher``, to its parent process (torchrun, which forwards it to every worker), or with
``ASIT_SIGNAL_TO=group`` to its whole process group (what Ctrl-C in a terminal does); it then waits (up to
60 s) until the signal arrives, so the stop step is known.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .distributed import DistInfo

__all__ = ["Decision", "Interrupted", "SIGNAL_AT_STEP_ENV", "StepBoundary", "exit_status"]

log = logging.getLogger(__name__)

SIGNAL_AT_STEP_ENV = "ASIT_SIGNAL_AT_STEP"
_clock = time.monotonic  # the checkpoint clock (a test replaces it)
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum: int) -> int:
    """The shell's status for a process ended by ``signum``: 128 + its number (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signum)


class Interrupted(Exception):
    """Training stopped on a signal at a step boundary; every rank wrote its part of a checkpoint there."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = int(signum), int(step)
        self.exit_status = exit_status(signum)
        super().__init__(f"interrupted at step {step}; checkpoint written; continue with the same command "
                         f"plus --resume")


@dataclass(frozen=True)
class Decision:
    """What all ranks do at a step boundary: write a checkpoint (``save``), and stop on ``stop`` (the
    signal number, 0: go on)."""

    save: bool
    stop: int


class StepBoundary:
    """Signals and the checkpoint clock, agreed by the ranks after every step (module docstring).

    Args:
        dist_info: this process's place in the job.
        every_minutes: a checkpoint when this many minutes passed since the last one (rank 0's clock;
            0: never on time alone).
        group: the process group of the agreement (None: the default group).
    """

    def __init__(self, dist_info: DistInfo, *, every_minutes: float = 0.0, group: Any = None) -> None:
        self.dist, self.group = dist_info, group
        self.every_s = 60.0 * float(every_minutes)
        self.received = 0  # the first signal this process got (0: none)
        self.stop = 0  # the signal all ranks agreed to stop on
        self._last_save = _clock()
        self._owner = os.getpid()
        self._previous: dict[int, Any] = {}
        on_host = group is not None or not dist_info.distributed or dist.get_backend() == "gloo"
        self._device = torch.device("cpu") if on_host else dist_info.device
        self._hook = _test_hook(dist_info)

    # ------------------------------------------------------------------ signal handlers
    def install(self) -> None:
        """Catch SIGINT and SIGTERM (main thread only; elsewhere a no-op) until :meth:`uninstall`."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Restore the handlers :meth:`install` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._owner:  # a forked loader worker: the main process decides
            return
        name = signal.Signals(signum).name
        if self.received:
            os.write(2, f"\n{name} again: exiting now, without a checkpoint\n".encode())
            os._exit(exit_status(signum))
        self.received = signum
        if self.dist.is_main:
            os.write(2, f"\n{name}: stopping after this step and writing a checkpoint "
                        f"(send it again to exit at once, without one)\n".encode())

    # ------------------------------------------------------------------ the step boundary
    def poll(self, step: int, *, scheduled: bool = False) -> Decision:
        """After step ``step`` (every rank, every step): checkpoint now? stop? ``scheduled``: the trainer
        writes a checkpoint at this step anyway (the same on every rank); it restarts the clock."""
        if self._hook is not None and step == self._hook[0]:
            self._fire(*self._hook[1:])
        now = _clock()
        due = bool(self.every_s and self.dist.is_main and now - self._last_save >= self.every_s)
        stop = self.received
        if self.dist.distributed:
            flags = torch.tensor([stop, int(due)], dtype=torch.int64, device=self._device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            stop, due = (int(v) for v in flags.tolist())
        self.stop = stop
        save = bool(scheduled or due or stop)
        if save:
            self._last_save = now
        return Decision(save=save, stop=stop)

    def raise_if_stopped(self, step: int) -> None:
        """Raise :class:`Interrupted` when the ranks agreed to stop (after the checkpoint is written)."""
        if self.stop:
            raise Interrupted(self.stop, step)

    def _fire(self, signum: int, to: str) -> None:
        log.warning("%s=%d: sending %s to %s (test hook)", SIGNAL_AT_STEP_ENV, self._hook[0],
                    signal.Signals(signum).name, to)
        if to == "group":
            os.killpg(os.getpgid(0), signum)
        else:
            os.kill(os.getppid() if to == "launcher" else os.getpid(), signum)
        deadline = time.monotonic() + 60
        while not self.received and time.monotonic() < deadline:
            time.sleep(0.01)


def _test_hook(dist_info: DistInfo) -> tuple[int, int, str] | None:
    """(step, signal, ``self``/``launcher``/``group``) from the ``ASIT_SIGNAL_*`` test variables for this
    rank, or None."""
    raw = os.environ.get(SIGNAL_AT_STEP_ENV)
    if not raw:
        return None
    if int(os.environ.get("ASIT_SIGNAL_RANK", str(dist_info.world_size - 1))) != dist_info.rank:
        return None
    name = os.environ.get("ASIT_SIGNAL", "INT").upper().removeprefix("SIG")
    if name not in ("INT", "TERM"):
        raise ValueError(f"ASIT_SIGNAL={name!r}: expected INT or TERM")
    to = os.environ.get("ASIT_SIGNAL_TO", "self")
    if to not in ("self", "launcher", "group"):
        raise ValueError(f"ASIT_SIGNAL_TO={to!r}: expected self, launcher or group")
    return int(raw), int(getattr(signal, f"SIG{name}")), to
