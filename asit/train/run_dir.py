"""One run per folder: a fresh pretraining run never writes into another run's ``train.output_dir``.

A folder *holds a run* when it has a checkpoint (``checkpoints/checkpoint_<step>.pt``, damaged ones
included), an exported encoder (``teacher_encoder.safetensors``) or a non-empty ``log.jsonl``. A fresh
start (no ``--resume``) into such a folder is refused with :class:`RunDirError`, whose message names the
ways out: ``--resume`` continues that run; ``--overwrite`` (or another ``train.output_dir``) starts a new
one. With ``--overwrite`` the old folder is renamed, whole, to ``<dir>.old-<YYYYmmdd-HHMMSS>`` and a
warning says where it went: nothing of it is deleted. So checkpoint pruning (``train.keep_last``) and
``log.jsonl`` only ever see one run's files.

The check (:func:`check_run_dir`) reads the folder and changes nothing; the move and the run's
``config.yaml`` come later (:func:`claim_run_dir`), once setup has succeeded, so a start that fails on
its config or data leaves the folder as it was. A worker restarted by torchrun without
``train.auto_resume`` belongs to the same launch as the files it finds: they are moved aside as with
``--overwrite``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asit.config import Config, save_config

from .checkpoint import list_checkpoints

__all__ = ["RunDirError", "check_run_dir", "claim_run_dir", "holds_run", "move_aside", "run_dir_problem"]

log = logging.getLogger(__name__)

ENCODER_FILE = "teacher_encoder.safetensors"


class RunDirError(ValueError):
    """``train.output_dir`` holds another run and this start would write over it."""


def holds_run(run_dir: str | Path) -> list[str]:
    """What in ``run_dir`` belongs to an earlier run (relative names; empty when nothing does)."""
    run_dir = Path(run_dir)
    found: list[str] = []
    ckpts = list_checkpoints(run_dir)
    folder = run_dir / "checkpoints"
    damaged = sorted(p.name for p in folder.glob("checkpoint_*.pt.corrupt")) if folder.is_dir() else []
    if ckpts or damaged:
        newest = ckpts[-1].name if ckpts else damaged[-1]
        found.append(f"checkpoints/ ({len(ckpts) + len(damaged)} checkpoint(s), newest {newest})")
    if (run_dir / ENCODER_FILE).exists():
        found.append(ENCODER_FILE)
    log_file = run_dir / "log.jsonl"
    if log_file.is_file() and log_file.stat().st_size > 0:
        found.append("log.jsonl")
    return found


def run_dir_problem(run_dir: str | Path, *, resume: bool, overwrite: bool) -> str | None:
    """Why a start may not use ``run_dir`` (see the module docstring), or None; reads only."""
    if resume or overwrite:
        return None
    found = holds_run(run_dir)
    if not found:
        return None
    return (f"train.output_dir={run_dir} already holds a run ({', '.join(found)}): continue it with the same "
            f"command plus --resume, or start a new run with --overwrite (the old folder is kept as "
            f"{Path(run_dir).name}.old-<time>) or another train.output_dir=...")


def check_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool, is_main: bool = True,
                  gather: Callable[[Any], list[Any]] | None = None) -> None:
    """Refuse a fresh start into a folder that holds a run. Rank 0 looks (``is_main``), every rank gets its
    verdict through ``gather`` (an all-gather of Python objects; None in a single process).

    Raises:
        RunDirError: on every rank, when rank 0 found a run and neither ``resume`` nor ``overwrite`` is set.
    """
    problem = run_dir_problem(run_dir, resume=resume, overwrite=overwrite) if is_main else None
    if gather is not None:
        problem = gather(problem)[0]
    if problem:
        raise RunDirError(problem)


def move_aside(run_dir: str | Path, *, stamp: str | None = None) -> Path:
    """Rename ``run_dir`` to ``<run_dir>.old-<stamp>`` (a free name; ``stamp`` defaults to the local time)
    and return the new path. Nothing is copied or deleted."""
    run_dir = Path(run_dir).resolve()
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    try:
        os.rename(run_dir, target)
    except OSError as err:
        raise RunDirError(f"--overwrite: cannot rename train.output_dir={run_dir} to {target} ({err}); "
                          f"move it yourself or choose another train.output_dir") from err
    return target


def claim_run_dir(cfg: Config, *, resume: bool, overwrite: bool, restarted: bool) -> Path | None:
    """Make ``cfg.train.output_dir`` this run's folder (rank 0 only, at the end of a successful setup):
    move an earlier run aside when ``overwrite`` (or ``restarted`` without ``resume``: a torchrun restart
    with ``train.auto_resume=false``), create the folder and write ``config.yaml``.

    Returns where the earlier run went, or None.
    """
    run_dir = Path(cfg.train.output_dir)
    moved = None
    if (overwrite or (restarted and not resume)) and run_dir.exists() and any(run_dir.iterdir()):
        moved = move_aside(run_dir)
        why = "--overwrite" if overwrite else "torchrun restarted the workers and train.auto_resume=false"
        log.warning("%s: the earlier run in %s was moved to %s (nothing was deleted)", why, run_dir, moved)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return moved
