"""Continuing a run: which checkpoint to restore, whether it fits, and the RNG states beside it.

:func:`find_restorable` walks a run's checkpoints from the newest, moves damaged ones aside (the ranks
agree on the choice) and refuses a sound one written in another layout; :func:`check_model_matches`,
:func:`warn_changed_config` and :func:`load_module_states` then check and apply it. RNG states are saved
per rank in side files named by :func:`asit.train.checkpoint.rng_file` (:func:`rng_state`,
:func:`save_rng`, :func:`load_rng`, :func:`set_rng_state`), so a resumed run draws the same random numbers
as an uninterrupted one. Every function takes what it needs as arguments; none reads the config, so the
pretraining and fine-tuning recipes share them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    atomic_save,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    quarantine,
    rng_file,
)
from .distributed import DistInfo

__all__ = [
    "RESUME_FREE_KEYS", "check_model_matches", "find_restorable", "flatten_config", "layout_misfit",
    "load_module_states", "load_rng", "rng_state", "save_rng", "set_rng_state", "warn_changed_config",
]

log = logging.getLogger(__name__)

# Config keys that may differ on resume without changing what is trained: where output goes, how often it is
# logged and checkpointed, guard thresholds, and speed settings that keep the batches, the masks and the maths
# (up to float rounding: loss.fused_head, which fuses the token output layer into the local loss, and
# train.ops_backend, which picks the Triton kernels or their PyTorch twins). A change of any other key is listed
# in a warning (data order, schedules, objective or numerics).
# Not free: train.sync_free (its GMML sampler draws blocks with a fixed candidate budget, so other masks from
# the same generator), train.compile / compile_mode (Inductor draws drop-path's random numbers its own way) and
# model.mlp_gelu (the tanh GELU differs from the exact one by up to 5e-4: another function, not a rounding).
RESUME_FREE_KEYS = frozenset({
    "name", "train.output_dir", "train.log_every", "train.progress", "train.checkpoint_every_steps",
    "train.checkpoint_every_minutes",
    "train.keep_last", "train.keep_every_steps", "train.keep_every_epochs", "train.auto_resume",
    "train.verify_replicas", "train.image_every_epochs", "train.max_consecutive_nonfinite",
    "data.max_bad_fraction", "data.num_workers", "data.batch_ring", "data.fbank_on", "data.cache_dir",
    "model.attn_backend", "model.residual_dtype", "train.ema", "train.teacher_bf16", "train.cuda_graph",
    "loss.fused_head", "train.ops_backend",
    # the probe monitor only reads the teacher, its RNG use set aside
    "eval.probe_manifest", "eval.every_epochs", "eval.knn_k", "eval.knn_temperature", "eval.linear_folds",
})


# --------------------------------------------------------------------------- RNG states


def rng_state(*, cuda: bool, device: torch.device | None = None, **extra: Any) -> dict[str, Any]:
    """This process's RNG states: ``torch`` (CPU), the ``extra`` entries as given (a generator's
    ``get_state()``, a NumPy generator's state as JSON), and ``cuda`` (the state of ``device``, default the
    current one) when ``cuda``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), **extra}
    if cuda:
        state["cuda"] = torch.cuda.get_rng_state() if device is None else torch.cuda.get_rng_state(device)
    return state


def set_rng_state(rng: Mapping[str, Any], *, cuda: bool, device: torch.device | None = None) -> None:
    """Restore the ``torch`` and (when ``cuda`` and saved) ``cuda`` states of :func:`rng_state`; the caller
    restores its ``extra`` entries."""
    torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng and cuda:
        if device is None:
            torch.cuda.set_rng_state(rng["cuda"].cpu())
        else:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), device)


def save_rng(folder: str | Path, tag: int | str, rank: int, state: Mapping[str, Any]) -> Path:
    """Write one rank's RNG ``state`` (:func:`rng_state`) atomically, with its checksum, as
    ``<folder>/rng_<tag>_rank<rank>.pt``; returns the path."""
    return atomic_save(dict(state), rng_file(folder, tag, rank))


def load_rng(folder: str | Path, tag: int | str, rank: int, *, required: Iterable[str] = ("torch",),
             checkpoint: Path | None = None) -> dict[str, Any]:
    """One rank's RNG states saved by :func:`save_rng`.

    Raises:
        CorruptCheckpointError: the file is missing (named with its ``checkpoint``), damaged or lacks a
            ``required`` key.
    """
    side = rng_file(folder, tag, rank)
    if not side.is_file():
        owner = f"checkpoint {checkpoint}: " if checkpoint is not None else ""
        raise CorruptCheckpointError(f"{owner}the RNG file of rank {rank}, {side.name}, is missing")
    return load_checkpoint(side, required=tuple(required))


# --------------------------------------------------------------------------- choosing a checkpoint


def layout_misfit(path: Path, state: dict[str, Any], *, world_size: int, iters_per_epoch: int) -> str | None:
    """Why checkpoint ``path`` cannot continue in this run's layout (another world size or number of steps
    per epoch), or None. Checked before the RNG side files: a larger world has ranks without one.

    Raises:
        CorruptCheckpointError: the checkpoint lacks the two values.
    """
    try:
        world, iters = int(state["world_size"]), int(state["iters_per_epoch"])
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptCheckpointError(f"checkpoint {path} lacks a valid world_size/iters_per_epoch") from err
    if world != world_size:
        return (f"{path} was written by {world} process(es), this run has {world_size}: exact "
                f"resume needs the same world size. Relaunch with {world} process(es) in total (torchrun "
                "--nnodes × --nproc_per_node), or use a new train.output_dir to start a separate run")
    if iters != iters_per_epoch:
        return (f"{path}: {iters} steps/epoch there, {iters_per_epoch} now (dataset, "
                "train.batch_size or train.max_steps_per_epoch changed): resume with the settings it was "
                "written with, or use a new train.output_dir")
    return None


def _checkpoint_rng(path: Path, state: dict[str, Any], rank: int, required: Iterable[str]) -> dict[str, Any]:
    """This rank's RNG states for checkpoint ``path``: rank 0's are inside it, the others' in side files
    (only called once the world sizes are known to match)."""
    if rank == 0:
        return state["rng"]
    return load_rng(path.parent, checkpoint_step(path), rank, required=required, checkpoint=path)


def find_restorable(run_dir: Path, dist_info: DistInfo, *, gather: Callable[[Any], list[Any]],
                    misfit: Callable[[Path, dict[str, Any]], str | None],
                    rng_keys: Iterable[str]) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """The newest checkpoint of ``run_dir`` that every rank can read, as ``(path, state, this rank's RNG
    states)``, or None when there is none (a fresh start). Collective: every rank calls it.

    Damaged candidates (unreadable, truncated, checksum mismatch, missing keys or RNG file) are reported
    by name, renamed to ``*.corrupt`` and the next older one is tried; the ranks agree on the choice through
    ``gather`` (an all-gather of Python objects). ``misfit(path, state)`` says why a sound checkpoint does not
    fit this run (e.g. :func:`layout_misfit`), checked before the RNG files; ``rng_keys``: what those hold.

    Raises:
        CheckpointError: a sound checkpoint that does not fit (on every rank, before any training step).
        CorruptCheckpointError: every checkpoint is damaged.
    """
    names = [p.name for p in list_checkpoints(run_dir)]
    if dist_info.distributed:  # rank 0's view decides (all ranks must try the same files)
        holder = [names]
        dist.broadcast_object_list(holder, src=0)
        names = holder[0]
    folder = run_dir / "checkpoints"
    damaged: list[str] = []
    for name in reversed(names):
        path = folder / name
        state, rng, problem, wrong = None, None, None, None
        try:
            state = load_checkpoint(path, map_location=dist_info.device)
            wrong = misfit(path, state)
            if wrong is None:
                rng = _checkpoint_rng(path, state, dist_info.rank, rng_keys)
        except CorruptCheckpointError as err:
            problem = str(err)
        # a sound checkpoint of another world size or epoch length: stop on every rank (its files are
        # fine, so nothing is moved aside; an older checkpoint of the same run would not fit either)
        reports = gather((problem, wrong))
        misfits = [m for _, m in reports if m]
        if misfits:
            raise CheckpointError(misfits[0])
        problems = [p for p, _ in reports if p]
        if not problems:
            return path, state, rng
        damaged.append(name)
        if dist_info.is_main:
            for p in dict.fromkeys(problems):
                log.warning("%s; using an older checkpoint", p)
            log.warning("moved the damaged checkpoint aside: %s", quarantine(path))
        if dist_info.distributed:
            dist.barrier()
    if damaged:
        raise CorruptCheckpointError(
            f"no usable checkpoint in {folder}: all of {damaged} are damaged (renamed to *.corrupt; "
            "see the warnings above). Remove --resume or the folder to start from scratch")
    if dist_info.is_main:
        log.info("no checkpoint in %s: starting from scratch", run_dir)
    return None


# --------------------------------------------------------------------------- checking and applying it


def check_model_matches(path: Path, ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor],
                        saved_config: Any, model_config: Mapping[str, Any]) -> None:
    """Raise a :class:`CheckpointError` naming ``path`` and the differing settings when the checkpoint's
    weights ``theirs`` were written for another model than ``ours`` (before any tensor is copied).
    ``saved_config``: the config stored in the checkpoint (a dict, or anything else when unknown);
    ``model_config``: this run's ``model`` section as a dict."""
    missing = sorted(ours.keys() - theirs.keys())
    unexpected = sorted(theirs.keys() - ours.keys())
    reshaped = sorted(k for k in ours.keys() & theirs.keys() if ours[k].shape != theirs[k].shape)
    if not (missing or unexpected or reshaped):
        return
    saved = saved_config.get("model", {}) if isinstance(saved_config, dict) else {}
    settings = [f"model.{k}: {saved[k]!r} there, {v!r} here" for k, v in model_config.items()
                if k in saved and saved[k] != v]
    tensors = []
    if reshaped:
        k = reshaped[0]
        tensors.append(f"{len(reshaped)} tensor(s) of another shape, e.g. {k} {tuple(theirs[k].shape)} there, "
                       f"{tuple(ours[k].shape)} here")
    if missing:
        tensors.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        tensors.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    raise CheckpointError(f"{path} was written for a different model ({'; '.join(settings + tensors)}): "
                          "resume with the same model settings or use a new train.output_dir")


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys: ``{"optim": {"lr": 1}}`` → ``{"optim.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def warn_changed_config(path: Path, saved_config: Any, config: dict[str, Any], free: Iterable[str]) -> None:
    """Warn, listing them, when keys outside ``free`` (e.g. :data:`RESUME_FREE_KEYS`) differ between this
    run's ``config`` and the one saved in checkpoint ``path``: the run continues, but not as the saved one
    would have. Nothing to compare when the saved config is not a dict."""
    if not isinstance(saved_config, dict):
        return
    saved, now, free = flatten_config(saved_config), flatten_config(config), frozenset(free)
    changed = [f"{k}: {saved[k]!r} there, {v!r} here" for k, v in now.items()
               if k in saved and saved[k] != v and k not in free]
    if changed:
        log.warning("resuming from %s with %d setting(s) changed: %s. The run continues with the new values "
                    "(data order, schedules or the objective may differ from the run that wrote the checkpoint); "
                    "resume with the values found 'there' for an exact continuation", path,
                    len(changed), "; ".join(changed))


def load_module_states(path: Path, state: Mapping[str, Any], modules: Mapping[str, nn.Module],
                       optimizer: torch.optim.Optimizer, optimizer_key: str = "optimizer") -> None:
    """Copy ``state[name]`` into each of ``modules``, then ``state[optimizer_key]`` into ``optimizer``.

    Raises:
        CheckpointError: naming ``path``, when a module's tensors or the optimiser's parameter groups do
            not fit.
    """
    try:
        for name, module in modules.items():
            module.load_state_dict(state[name])
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not match the configured model: {err}") from err
    try:
        optimizer.load_state_dict(state[optimizer_key])
    except ValueError as err:  # e.g. parameter groups of another split (asit before the DINO decay rule)
        raise CheckpointError(f"{path}: its optimiser state does not fit this run's parameter groups ({err}); "
                              "resume with the asit version that wrote it, or use a new train.output_dir") from err
