"""Checkpoint files that survive crashes.

* Written atomically (:mod:`asit.atomic_io`): a temporary file in the same folder, fsynced, renamed into
  place, folder fsynced.
* Checked on load: a SHA-256 sidecar (``<file>.sha256``, ``sha256sum -c`` format) written atomically
  after the file, then ``torch.load(weights_only=True)`` (no arbitrary pickles) and the required keys.
  Any failure there raises :class:`CorruptCheckpointError`; a resume then falls back to an older file.
* Pruned: the newest ``keep_last`` files, plus any the caller marks as permanent (:func:`permanent_rule`),
  are kept.
* Compared across ranks before writing (:func:`replica_digests`): DDP replicas that drifted apart raise
  :class:`ReplicaMismatchError` instead of saving one rank's view.
* RNG side files, one per rank, are named by :func:`rng_file` for every recipe.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from asit.atomic_io import atomic_write, fsync_dir

__all__ = [
    "CheckpointError", "CorruptCheckpointError", "REQUIRED_KEYS", "ReplicaMismatchError", "atomic_save",
    "checkpoint_path", "checkpoint_step", "file_sha256", "find_latest_checkpoint", "list_checkpoints",
    "load_checkpoint", "permanent_rule", "prune_checkpoints", "quarantine", "replica_digests", "rng_file",
    "rng_path", "tensor_digest",
]

log = logging.getLogger(__name__)
_STEP_RE = re.compile(r"^checkpoint_(\d+)\.pt$")
_RNG_RE = re.compile(r"^rng_(\d+)_rank\d+\.pt$")
CHECKSUM_SUFFIX = ".sha256"
REQUIRED_KEYS = ("student", "teacher", "optimizer", "loss", "step", "epoch", "config")


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used for this run; the message names the file."""


class ReplicaMismatchError(RuntimeError):
    """The ranks' weights or centres differ at a checkpoint: the DDP replicas drifted apart."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is damaged: unreadable, truncated, a checksum mismatch or missing keys.

    Unlike a plain :class:`CheckpointError` (a sound file that does not fit the run), an older
    checkpoint may be used instead."""


# --------------------------------------------------------------------------- writing


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through (no second read of the file)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh, self.sha = fh, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically, then its SHA-256 to ``<path>.sha256`` (atomically).

    A crash between the two leaves a complete file without a sidecar, which :func:`load_checkpoint`
    still accepts after its structural checks."""
    path = Path(path)
    digest: list[str] = []

    def write(fh: IO[bytes]) -> None:
        hashing = _HashingWriter(fh)
        torch.save(obj, hashing)
        digest.append(hashing.sha.hexdigest())

    atomic_write(path, write)
    line = f"{digest[0]}  {path.name}\n".encode()
    atomic_write(_checksum_path(path), lambda fh: fh.write(line))
    return path


# --------------------------------------------------------------------------- reading


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            sha.update(block)
    return sha.hexdigest()


def _verify_checksum(path: Path) -> bool:
    """True when the sidecar exists and matches, False when there is none; raises on a mismatch."""
    sidecar = _checksum_path(path)
    try:
        text = sidecar.read_text(encoding="ascii")
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"checkpoint {path}: cannot read its checksum file {sidecar}: {err}") from err
    expected = text.split()[0].lower() if text.split() else ""
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise CorruptCheckpointError(f"checkpoint {path}: its checksum file {sidecar} is malformed")
    try:
        actual = file_sha256(path)
    except OSError as err:
        raise CorruptCheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if actual != expected:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: SHA-256 {actual[:12]}… does not match "
                                     f"{expected[:12]}… recorded in {sidecar.name}")
    return True


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    required: Iterable[str] = REQUIRED_KEYS) -> dict[str, Any]:
    """Load a checkpoint safely: the SHA-256 sidecar (when present) must match, ``torch.load`` runs with
    ``weights_only=True`` (no arbitrary pickles) and the ``required`` top-level keys must be there.

    Raises:
        CorruptCheckpointError: any of these checks failed (the message names the file and why).
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptCheckpointError(f"checkpoint {path} does not exist")
    _verify_checksum(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means an unusable file
        raise CorruptCheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    missing = [k for k in required if k not in state]
    if missing:
        raise CorruptCheckpointError(f"checkpoint {path} lacks {missing}: not an asit pretraining checkpoint")
    return state


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of ``tensors`` (bitwise identity, any device)."""
    sha = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        sha.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        sha.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return sha.hexdigest()


def replica_digests(parts: Mapping[str, Any], gather: Callable[[Any], list[Any]], *, step: int,
                    folder: Path) -> list[str]:
    """SHA-256 of every ``parts`` module's state dict (keys prefixed ``<part>.``) on every rank, in rank
    order (``gather``: an all-gather of Python objects).

    Raises:
        ReplicaMismatchError: some rank differs from rank 0 (the message names them, ``step`` and the
            ``folder`` of the last good checkpoint).
    """
    tensors = {f"{part}.{k}": v for part, module in parts.items() for k, v in module.state_dict().items()}
    digests = gather(tensor_digest(tensors))
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ReplicaMismatchError(
            f"step {step}: the weights/centres of rank(s) {differ} differ from rank 0's "
            f"(SHA-256 {[d[:12] for d in digests]}); the DDP replicas drifted apart, so no checkpoint "
            f"was written. The last good one is in {folder}")
    return digests


# --------------------------------------------------------------------------- layout and pruning


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """``<run_dir>/checkpoints/checkpoint_<step:09d>.pt``."""
    return Path(run_dir) / "checkpoints" / f"checkpoint_{step:09d}.pt"


def rng_file(folder: str | Path, tag: int | str, rank: int) -> Path:
    """``<folder>/rng_<tag>_rank<rank>.pt``: one rank's RNG states at a resume point; an integer ``tag`` is a
    global step, written ``<step:09d>`` (the one RNG-file naming of every recipe)."""
    name = f"{tag:09d}" if isinstance(tag, int) else tag
    return Path(folder) / f"rng_{name}_rank{rank}.pt"


def rng_path(run_dir: str | Path, step: int, rank: int) -> Path:
    """``<run_dir>/checkpoints/rng_<step:09d>_rank<rank>.pt``: one rank's RNG states at ``step``."""
    return rng_file(Path(run_dir) / "checkpoints", step, rank)


def checkpoint_step(path: str | Path) -> int:
    m = _STEP_RE.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not named checkpoint_<step>.pt")
    return int(m.group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first (by global step)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run by name (not verified), or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _unlink_with_checksum(path: Path) -> None:
    path.unlink(missing_ok=True)
    _checksum_path(path).unlink(missing_ok=True)


def permanent_rule(keep_every_steps: int, keep_every_epochs: int, iters_per_epoch: int) -> Callable[[int], bool]:
    """Which checkpoints are never pruned (``keep`` of :func:`prune_checkpoints`): every ``keep_every_steps``
    steps and every ``keep_every_epochs`` epochs (0: none)."""
    def permanent(step: int) -> bool:
        if keep_every_steps and step % keep_every_steps == 0:
            return True
        it = iters_per_epoch
        return bool(keep_every_epochs and step % it == 0 and (step // it) % keep_every_epochs == 0)

    return permanent


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep: Callable[[int], bool] | None = None) -> list[Path]:
    """Delete all checkpoints but the newest ``keep_last`` and those whose step ``keep(step)`` marks
    permanent, with their checksum and RNG files; also RNG files of older steps without a checkpoint and
    temporary files left by killed writers. Call only while no other process writes to the folder.

    Returns the deleted checkpoints.
    """
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return []
    gone = [p for p in ckpts[:-keep_last] if keep is None or not keep(checkpoint_step(p))]
    for path in gone:
        _unlink_with_checksum(path)
    kept = {checkpoint_step(p) for p in ckpts if p not in gone}
    newest = max(kept)
    folder = ckpts[0].parent
    for f in folder.iterdir():
        m = _RNG_RE.match(f.name)
        if m and int(m.group(1)) not in kept and int(m.group(1)) < newest:
            _unlink_with_checksum(f)
        elif f.name.startswith(".") and f.name.endswith(".tmp"):
            f.unlink(missing_ok=True)
    return gone


def quarantine(path: str | Path) -> Path:
    """Rename a damaged checkpoint (and its checksum file) to ``<name>.corrupt`` so it is no longer a
    resume candidate but stays for inspection. Returns the new path."""
    path = Path(path)
    target = path.with_name(path.name + ".corrupt")
    if path.exists():
        os.replace(path, target)
    sidecar = _checksum_path(path)
    if sidecar.exists():
        os.replace(sidecar, target.with_name(target.name + CHECKSUM_SUFFIX))
    fsync_dir(path.parent)
    return target
